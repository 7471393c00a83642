"""TLS for the console listener: a server context, and loading a PEM chain + key into it.

``ssl`` loads certificates from files only, so the PEMs go to ``state_dir/console-tls/``:
the key file is created 0600 before anything is written, both are written atomically.
Loading into an existing context changes what *new* handshakes present; established
connections are untouched (certificate rotation without dropping consoles).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path


class TlsError(ValueError):
    pass


def server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _write_private(path: Path, data: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_chain(ctx: ssl.SSLContext, state_dir: Path, cert_pem: str, key_pem: str) -> None:
    """Validates (key matches, chain parses) and loads; raises :class:`TlsError` without
    changing ``ctx`` when the pair is bad."""
    d = state_dir / "console-tls"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert, key = d / "cert.pem", d / "key.pem"
    check_cert, check_key = d / "check-cert.pem", d / "check-key.pem"
    _write_private(check_cert, cert_pem)
    _write_private(check_key, key_pem)
    try:
        server_context().load_cert_chain(check_cert, check_key)  # try on a scratch context
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"certificate/key rejected: {getattr(e, 'reason', None) or e}") from e
    finally:
        check_key.unlink(missing_ok=True)
    os.replace(check_cert, cert)
    _write_private(key, key_pem)
    ctx.load_cert_chain(cert, key)
