"""WSS on the CPVM (consoleproxy.sslEnabled): real TLS to a real QEMU guest's console, and a
certificate change that keeps live sessions."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import os
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.roles.base import ApplyError
from manager.guests import GuestVm

pytestmark = pytest.mark.integration
TIMING = float(os.environ.get("SYSVM_TEST_TIMING", "1"))
Console = Any


def make_cert(cn: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def config(cert: str, key: str) -> dict[str, Any]:
    return {
        "settings": {"consoleproxy.sslEnabled": True},
        "consoleproxy": {
            "listen_host": "127.0.0.1",
            "listen_port": 0,
            "tls": {"cert": cert, "key": key},
        },
    }


def client_ctx(*certs: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata="".join(certs))
    return ctx


async def _rfb_open(ws: Any) -> None:
    async with asyncio.timeout(10 * TIMING):
        assert await ws.recv() == b"RFB 003.008\n"
        await ws.send(b"RFB 003.008\n")
        assert await ws.recv() == b"\x01\x01"
        await ws.send(b"\x01")
        assert await ws.recv() == b"\0\0\0\0"
        await ws.send(b"\x01")
        await ws.recv()  # ServerInit


def peer_fingerprint(ws: Any) -> str:
    der = ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


async def test_wss_and_certificate_rotation_keeps_sessions(
    console: Console, guest_vm: GuestVm, tmp_path: Path
) -> None:
    cert1, key1 = make_cert("cp-one")
    cert2, key2 = make_cert("cp-two")
    await console.role.apply(config(cert1, key1))
    assert console.role.status()["tls"] is True
    key_file = console.role.ctx.state_dir / "console-tls" / "key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    port = console.port
    url = f"wss://127.0.0.1:{port}/websockify?vm={guest_vm.id}&token="
    origin = f"https://127.0.0.1:{port}"
    both = client_ctx(cert1, cert2)
    ws1 = await websockets.connect(url + await console.mint(guest_vm), origin=origin, ssl=both)
    try:
        await _rfb_open(ws1)
        first = peer_fingerprint(ws1)
        # A bad pair is refused and changes nothing.
        with pytest.raises(ApplyError, match="rejected"):
            await console.role.apply(config(cert2, key1))
        # Rotate: same listener, new certificate for new connections.
        await console.role.apply(config(cert2, key2))
        assert console.port == port
        async with websockets.connect(
            url + await console.mint(guest_vm), origin=origin, ssl=both
        ) as ws2:
            await _rfb_open(ws2)
            assert peer_fingerprint(ws2) != first
        # The session opened before the rotation still relays.
        await ws1.send(struct.pack("!BBHHHH", 3, 0, 0, 0, 16, 16))
        async with asyncio.timeout(10 * TIMING):
            update = await ws1.recv()
        assert isinstance(update, bytes) and update[0] == 0
    finally:
        await ws1.close()
    # Plain HTTP to the TLS port does not reach the relay.
    with pytest.raises((OSError, websockets.exceptions.InvalidMessage, EOFError, TimeoutError)):
        async with asyncio.timeout(5 * TIMING):
            async with websockets.connect(url.replace("wss", "ws") + "x" * 32, origin=origin):
                pass


async def test_ssl_enabled_without_certificate_is_refused(console: Console) -> None:
    with pytest.raises(ApplyError, match="no certificate"):
        await console.role.apply(
            {"settings": {"consoleproxy.sslEnabled": True}, "consoleproxy": {}}
        )
    assert console.role.status()["tls"] is False  # still serving as before
