"""The two RFB (VNC) handshakes the console proxy terminates. Pure: bytes in, bytes out.

Toward the hypervisor the proxy is the VNC *client*: it takes the server's version (3.3, 3.7
or 3.8), chooses VNC authentication (security type 2: the 16-byte challenge DES-encrypted
with the password, RFB's bit-reversed key) or None when the server offers only that, and
reads the SecurityResult. Toward the browser the proxy is the VNC *server*: it offers only
"None", so the browser never sees the VNC password, or — when the hypervisor side failed —
no security type at all with the reason, which noVNC shows as a ``securityfailure``.

After both handshakes the proxy relays bytes unchanged (ClientInit, ServerInit and the rest).
"""

from __future__ import annotations

import enum
import struct

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

SEC_INVALID = 0
SEC_NONE = 1
SEC_VNC_AUTH = 2
MAX_REASON = 4096
_VERSIONS = {b"RFB 003.003\n": 3, b"RFB 003.007\n": 7, b"RFB 003.008\n": 8}


class RfbError(Exception):
    """Handshake failed; ``reason`` is safe to show a user (no password in it)."""

    def __init__(self, reason: str, *, auth: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.auth = auth  # True: the hypervisor refused our password


def _reverse_bits(b: int) -> int:
    return int(f"{b:08b}"[::-1], 2)


def des_key(password: str) -> bytes:
    """RFB's VNC-auth key: the first 8 bytes of the password (zero padded), each byte's bits
    reversed."""
    raw = password.encode("latin-1", errors="replace")[:8].ljust(8, b"\0")
    return bytes(_reverse_bits(b) for b in raw)


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    if len(challenge) != 16:
        raise ValueError("VNC challenge must be 16 bytes")
    # Single DES = 3DES with K1 = K2 = K3 (cryptography has no plain DES).
    # RFB fixes DES-ECB; this is protocol compatibility, not a choice.
    enc = Cipher(TripleDES(des_key(password) * 3), modes.ECB()).encryptor()  # noqa: S305
    return enc.update(challenge) + enc.finalize()


def parse_version(line: bytes) -> int:
    """Minor version (3, 7, 8) of a 12-byte ProtocolVersion line; other 3.x minors map to
    the nearest lower one as RFC 6143 says (3.4-3.6 -> 3; 3.9+ -> 8)."""
    if line in _VERSIONS:
        return _VERSIONS[line]
    if len(line) == 12 and line.startswith(b"RFB 003.") and line.endswith(b"\n"):
        try:
            minor = int(line[8:11])
        except ValueError:
            pass
        else:
            return 8 if minor >= 8 else 7 if minor == 7 else 3
    raise RfbError("not a VNC server (bad protocol version)")


class _Step(enum.Enum):
    VERSION = 1
    SEC_TYPES_COUNT = 2
    SEC_TYPES = 3
    SEC_TYPE_33 = 4
    CHALLENGE = 5
    RESULT = 6
    REASON_LEN = 7
    REASON = 8
    DONE = 9


class HypervisorHandshake:
    """Client side of the RFB handshake with the hypervisor's VNC server.

    ``receive(data)`` returns bytes to send; raises :class:`RfbError` on failure. When
    ``done`` is true the connection is authenticated and ready for the browser's ClientInit;
    ``leftover`` holds any bytes received beyond the handshake."""

    def __init__(self, password: str) -> None:
        self._password = password
        self._buf = bytearray()
        self._step = _Step.VERSION
        self._version = 8
        self._count = 0
        self._reason_len = 0
        self._auth_failed = False
        self.done = False
        self.leftover = b""

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def receive(self, data: bytes) -> bytes:
        if self.done:
            raise RfbError("handshake already complete")
        self._buf += data
        if len(self._buf) > MAX_REASON + 64:
            raise RfbError("VNC server sent too much during the handshake")
        out = bytearray()
        while not self.done:
            step = self._step
            if step is _Step.VERSION:
                line = self._take(12)
                if line is None:
                    break
                self._version = parse_version(line)
                out += b"RFB 003.%03d\n" % self._version
                self._step = _Step.SEC_TYPES_COUNT if self._version >= 7 else _Step.SEC_TYPE_33
            elif step is _Step.SEC_TYPES_COUNT:
                b = self._take(1)
                if b is None:
                    break
                self._count = b[0]
                self._step = _Step.SEC_TYPES if self._count else _Step.REASON_LEN
            elif step is _Step.SEC_TYPES:
                types = self._take(self._count)
                if types is None:
                    break
                out += self._choose(types)
            elif step is _Step.SEC_TYPE_33:
                raw = self._take(4)
                if raw is None:
                    break
                (sec,) = struct.unpack("!I", raw)
                if sec == SEC_INVALID:
                    self._step = _Step.REASON_LEN
                else:
                    self._choose_33(sec)
            elif step is _Step.CHALLENGE:
                challenge = self._take(16)
                if challenge is None:
                    break
                out += vnc_auth_response(self._password, challenge)
                self._step = _Step.RESULT
            elif step is _Step.RESULT:
                raw = self._take(4)
                if raw is None:
                    break
                (result,) = struct.unpack("!I", raw)
                if result == 0:
                    self._finish()
                elif self._version >= 8:
                    self._auth_failed = True
                    self._step = _Step.REASON_LEN
                else:
                    raise RfbError("VNC authentication to the hypervisor failed", auth=True)
            elif step is _Step.REASON_LEN:
                raw = self._take(4)
                if raw is None:
                    break
                (self._reason_len,) = struct.unpack("!I", raw)
                if self._reason_len > MAX_REASON:
                    raise RfbError("VNC server sent an oversized failure reason")
                self._step = _Step.REASON
            elif step is _Step.REASON:
                raw = self._take(self._reason_len)
                if raw is None:
                    break
                text = raw.decode("utf-8", "replace").replace("\0", "").strip()
                if self._auth_failed:
                    raise RfbError(
                        f"VNC authentication to the hypervisor failed: {text or 'no reason'}",
                        auth=True,
                    )
                raise RfbError(f"VNC server refused the connection: {text or 'no reason'}")
        return bytes(out)

    def _choose(self, types: bytes) -> bytes:
        if self._password and SEC_VNC_AUTH in types:
            self._step = _Step.CHALLENGE
            return bytes([SEC_VNC_AUTH])
        if SEC_NONE in types:
            self._step = _Step.RESULT if self._version >= 8 else _Step.DONE
            if self._step is _Step.DONE:
                self._finish()
            return bytes([SEC_NONE])
        if SEC_VNC_AUTH in types:
            raise RfbError("the hypervisor asks for a VNC password but none is on record")
        raise RfbError(f"no supported VNC security type (server offers {list(types)})")

    def _choose_33(self, sec: int) -> None:
        if sec == SEC_VNC_AUTH:
            if not self._password:
                raise RfbError("the hypervisor asks for a VNC password but none is on record")
            self._step = _Step.CHALLENGE
        elif sec == SEC_NONE:
            self._finish()
        else:
            raise RfbError(f"unsupported VNC security type {sec}")

    def _finish(self) -> None:
        self.done = True
        self._step = _Step.DONE
        self.leftover = bytes(self._buf)
        self._buf.clear()


SERVER_VERSION = b"RFB 003.008\n"


class BrowserHandshake:
    """Server side of the RFB handshake toward the browser. The proxy sends
    :data:`SERVER_VERSION` first (``greeting()``), then feeds the browser's bytes.

    With ``failure`` set, the browser is told there is no security type, with that reason
    (3.7/3.8), or security type 0 + reason (3.3), and ``done`` never becomes true."""

    def __init__(self, failure: str | None = None) -> None:
        self._failure = failure
        self._buf = bytearray()
        self._version = 0
        self.done = False
        self.failed = False
        self.leftover = b""

    @staticmethod
    def greeting() -> bytes:
        return SERVER_VERSION

    @staticmethod
    def _reason(text: str) -> bytes:
        raw = text.encode("utf-8")[:MAX_REASON]
        return struct.pack("!I", len(raw)) + raw

    def receive(self, data: bytes) -> bytes:
        if self.done or self.failed:
            raise RfbError("handshake already finished")
        self._buf += data
        if len(self._buf) > 64:
            raise RfbError("browser sent too much during the handshake")
        out = b""
        if self._version == 0:
            if len(self._buf) < 12:
                return b""
            line = bytes(self._buf[:12])
            del self._buf[:12]
            self._version = parse_version(line)
            if self._failure is not None:
                self.failed = True
                if self._version >= 7:
                    return b"\x00" + self._reason(self._failure)
                return struct.pack("!I", SEC_INVALID) + self._reason(self._failure)
            if self._version == 3:
                return self._complete(struct.pack("!I", SEC_NONE))
            out = bytes([1, SEC_NONE])
        if not self._buf:
            return out
        choice = self._buf[0]
        del self._buf[:1]
        if choice != SEC_NONE:
            raise RfbError(f"browser chose security type {choice}, only None is offered")
        if self._version >= 8:
            return self._complete(out + struct.pack("!I", 0))
        return self._complete(out)

    def _complete(self, out: bytes) -> bytes:
        self.done = True
        self.leftover = bytes(self._buf)
        self._buf.clear()
        return out
