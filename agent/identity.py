"""The agent's identity: key pair, CA pinning, TLS contexts, certificate renewal timing.

The image holds no secrets: the key pair is made here (EC P-256, ``key.pem`` 0600, never
leaves the VM); the CA is fetched over an unverified TLS connection and accepted only if its
``sha256(DER)`` equals the boot data's fingerprint; from then on the manager is verified
against that CA with EKU serverAuth (a VM's clientAuth certificate cannot pose as it).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import ssl
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.state import StateDir

FETCH_TIMEOUT = 10.0
MAX_CA_RESPONSE = 64 * 1024


class TrustError(Exception):
    """The manager could not be trusted (fingerprint mismatch, bad certificate)."""


def fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def pem_to_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def check_pinned_ca(pem: bytes, expected: str) -> bytes:
    """Pure: returns the CA PEM if its fingerprint matches ``expected``, else TrustError."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise TrustError("manager sent something that is not a PEM certificate") from e
    der = cert.public_bytes(serialization.Encoding.DER)
    if not hmac.compare_digest(fingerprint(der).encode(), expected.lower().encode()):
        raise TrustError(f"CA fingerprint mismatch: got {fingerprint(der)}, pinned {expected}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as e:
        raise TrustError("pinned certificate is not a CA") from e
    if not bc.ca:
        raise TrustError("pinned certificate is not a CA")
    return cert.public_bytes(serialization.Encoding.PEM)


def parse_http_response(raw: bytes) -> tuple[int, bytes]:
    """Pure: (status, body) of a small HTTP/1.1 response read until EOF."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise TrustError("truncated HTTP response from manager")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise TrustError("malformed HTTP status line from manager")
    return int(status_line[1]), body


async def fetch_ca(url: str, expected_fingerprint: str) -> bytes:
    """GET /ca.pem over TLS without verification, then pin by fingerprint."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the fingerprint check below is the verification
    async with asyncio.timeout(FETCH_TIMEOUT):
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
        try:
            hosthdr = f"[{host}]" if ":" in host else host
            writer.write(
                f"GET /ca.pem HTTP/1.1\r\nHost: {hosthdr}:{port}\r\nConnection: close\r\n"
                "User-Agent: sysvm-agent\r\n\r\n".encode()
            )
            await writer.drain()
            raw = await reader.read(MAX_CA_RESPONSE)
            while len(raw) < MAX_CA_RESPONSE:
                more = await reader.read(MAX_CA_RESPONSE - len(raw))
                if not more:
                    break
                raw += more
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    status, body = parse_http_response(raw)
    if status != 200:
        raise TrustError(f"GET /ca.pem answered HTTP {status}")
    return check_pinned_ca(body, expected_fingerprint)


def ensure_key(state: StateDir) -> ec.EllipticCurvePrivateKey:
    """Loads ``key.pem`` or makes a new P-256 key (written 0600 from creation)."""
    if state.key_path.exists():
        key = serialization.load_pem_private_key(state.key_path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
        raise TrustError(f"{state.key_path} is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    state.write_key(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, vm_id: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, vm_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def client_context(ca_pem: bytes, cert_path: str | None, key_path: str | None) -> ssl.SSLContext:
    """Verifies the manager against the pinned CA (purpose serverAuth: OpenSSL refuses a
    certificate whose EKU lacks it). The manager's URL may be any address it listens on, so
    identity is the CA + EKU, not the host name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca_pem.decode())
    if cert_path and key_path:
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def check_server_certificate(der: bytes | None) -> None:
    """Pure: belt and braces on top of OpenSSL's purpose check."""
    if not der:
        raise TrustError("manager presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as e:
        raise TrustError("manager certificate has no extended key usage") from e
    if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise TrustError("manager certificate is not for serverAuth")


def renewal_due(cert_pem: bytes, now: dt.datetime, fraction: float) -> bool:
    """Pure: True once ``fraction`` of the certificate's lifetime has passed."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= start + (end - start) * fraction


def cert_serial(cert_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(cert_pem).serial_number


def check_issued(cert_pem: bytes, ca_pem: bytes, key: ec.EllipticCurvePrivateKey) -> None:
    """Pure: the certificate the manager returned is for our key and from our CA."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as e:
        raise TrustError("manager returned an unreadable certificate") from e
    if cert.public_key() != key.public_key():
        raise TrustError("issued certificate is not for this VM's key")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception as e:
        raise TrustError("issued certificate is not signed by the pinned CA") from e
