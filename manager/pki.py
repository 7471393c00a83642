"""The manager's certificate authority.

On first start :meth:`Pki.open` creates, in ``$SYSVM_HOME/pki/``:

- ``ca.key`` / ``ca.pem`` — EC P-256 CA (key file 0600, created before anything is written);
- ``server.key`` / ``server.pem`` — the agent endpoint's certificate (EKU serverAuth only).

Agent certificates are signed from a CSR (:meth:`Pki.sign_agent_csr`): the subject CN is the
VM id chosen by the manager (never by the CSR), EKU clientAuth only, so a VM's certificate can
never pose as the manager and the manager's can never enrol as a VM. Pure helpers
(:func:`fingerprint`, :func:`check_agent_certificate`) are separated from file I/O.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY_DAYS = 3650
SERVER_VALIDITY_DAYS = 825
CLOCK_SKEW = dt.timedelta(minutes=5)


class PkiError(Exception):
    """A CSR or certificate was refused; the message is safe to log and to send back."""


class CertificateRefused(PkiError):
    """A presented agent certificate is not acceptable; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def fingerprint(der: bytes) -> str:
    """``sha256:<64 hex>`` of a certificate's DER form (the boot data's ``ca_fingerprint``)."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def fingerprint_matches(der: bytes, expected: str) -> bool:
    return hmac.compare_digest(fingerprint(der).encode(), expected.strip().lower().encode())


def write_private(path: Path, data: bytes) -> None:
    """Atomically writes a secret: temp file created 0600 before any byte, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_serial() -> int:
    return x509.random_serial_number()


def make_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sysvm"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"sysvm manager CA {secrets.token_hex(4)}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    eku: x509.ObjectIdentifier,
    not_before: dt.datetime,
    not_after: dt.datetime,
    serial: int,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def parse_csr(pem: bytes) -> x509.CertificateSigningRequest:
    """Pure: a CSR we accept — PEM, valid self-signature, EC P-256 key."""
    if not isinstance(pem, bytes | bytearray) or len(pem) > 16384:
        raise PkiError("csr must be PEM bytes of at most 16 KiB")
    try:
        csr = x509.load_pem_x509_csr(bytes(pem))
    except ValueError as e:
        raise PkiError("csr is not a valid PEM certificate signing request") from e
    if not csr.is_signature_valid:
        raise PkiError("csr signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise PkiError("csr key must be EC P-256")
    return csr


def check_agent_certificate(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    now: dt.datetime,
    *,
    verify_signature: bool = True,
) -> str:
    """Pure: returns the VM id (subject CN) of an agent certificate issued by ``ca_cert``, or
    raises :class:`CertificateRefused`. Checks issuer, signature (skippable when the TLS layer,
    which trusts only our CA, has just verified it), validity and that the EKU is clientAuth
    (a server certificate is not an agent identity)."""
    if cert.issuer != ca_cert.subject:
        raise CertificateRefused("foreign_ca", "issuer is not this manager's CA")
    if verify_signature:
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise CertificateRefused("foreign_ca", "signature does not verify against CA") from e
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise CertificateRefused("expired", "certificate outside its validity period")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as e:
        raise CertificateRefused("bad_eku", "no extended key usage") from e
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku or ExtendedKeyUsageOID.SERVER_AUTH in eku:
        raise CertificateRefused("bad_eku", "extended key usage is not clientAuth")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str) or not cns[0].value:
        raise CertificateRefused("bad_subject", "subject must have exactly one CN")
    return cns[0].value


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    pem: bytes
    serial: int
    not_after: float  # unix time


class Pki:
    """Files under ``dir``; use :meth:`open`."""

    def __init__(
        self,
        directory: Path,
        ca_key: ec.EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        server_cert_pem: bytes,
    ) -> None:
        self.dir = directory
        self._ca_key = ca_key
        self.ca_cert = ca_cert
        self.ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        self.ca_der = ca_cert.public_bytes(serialization.Encoding.DER)
        self.ca_fingerprint = fingerprint(self.ca_der)
        self.server_cert_pem = server_cert_pem

    @property
    def server_key_path(self) -> Path:
        return self.dir / "server.key"

    @property
    def server_cert_path(self) -> Path:
        return self.dir / "server.pem"

    @property
    def ca_cert_path(self) -> Path:
        return self.dir / "ca.pem"

    @classmethod
    def open(cls, home: Path, server_names: Sequence[str] = ()) -> Pki:
        """Loads the CA (creating it on first start) and (re)issues the server certificate
        when it is missing, near expiry, or lacks one of ``server_names``."""
        d = Path(home) / "pki"
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        key_path, cert_path = d / "ca.key", d / "ca.pem"
        now = _now()
        if key_path.exists() and cert_path.exists():
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise PkiError(f"{key_path}: not an EC private key")
            ca_key = loaded
            ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        else:
            ca_key, ca_cert = make_ca(now)
            write_private(key_path, _key_pem(ca_key))
            write_public(cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
        names = _default_server_names(server_names)
        server_pem = _ensure_server_cert(d, ca_key, ca_cert, names, now)
        return cls(d, ca_key, ca_cert, server_pem)

    def sign_agent_csr(
        self, csr_pem: bytes, vm_id: str, validity: dt.timedelta, now: dt.datetime | None = None
    ) -> IssuedCertificate:
        csr = parse_csr(csr_pem)
        pub = csr.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)  # checked by parse_csr
        now = now or _now()
        serial = new_serial()
        not_after = now + validity
        cert = issue(
            self._ca_key,
            self.ca_cert,
            public_key=pub,
            common_name=vm_id,
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
            not_before=now - CLOCK_SKEW,
            not_after=not_after,
            serial=serial,
        )
        return IssuedCertificate(
            pem=cert.public_bytes(serialization.Encoding.PEM),
            serial=serial,
            not_after=not_after.timestamp(),
        )

    def server_ssl_context(self) -> ssl.SSLContext:
        """TLS for the agent endpoint: client certificate optional at the TLS layer (``/ca.pem``
        and ``/enrol`` need none); when one is sent it must chain to our CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.server_cert_path, self.server_key_path)
        ctx.load_verify_locations(cadata=self.ca_pem.decode())
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx


def _default_server_names(extra: Sequence[str]) -> list[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    with contextlib.suppress(OSError):
        names.append(socket.gethostname())
    for n in extra:
        if n and n not in names and n not in ("0.0.0.0", "::"):
            names.append(n)
    return names


def _sans(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def _ensure_server_cert(
    d: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: Sequence[str],
    now: dt.datetime,
) -> bytes:
    key_path, cert_path = d / "server.key", d / "server.pem"
    wanted = _sans(names)
    if key_path.exists() and cert_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        try:
            have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            covers = all(n in have for n in wanted)
        except x509.ExtensionNotFound:
            covers = False
        fresh = cert.not_valid_after_utc - now > dt.timedelta(days=30)
        if covers and fresh and cert.issuer == ca_cert.subject:
            return cert_path.read_bytes()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue(
        ca_key,
        ca_cert,
        public_key=key.public_key(),
        common_name="sysvm manager",
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        not_before=now - CLOCK_SKEW,
        not_after=now + dt.timedelta(days=SERVER_VALIDITY_DAYS),
        serial=new_serial(),
        sans=wanted,
    )
    write_private(key_path, _key_pem(key))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    write_public(cert_path, pem)
    return pem
