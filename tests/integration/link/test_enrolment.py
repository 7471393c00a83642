"""Enrolment and every refusal, against a real manager process over real TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from agent import identity
from manager import pki as mpki
from manager.enrolment import token_hash
from manager.store import open_store
from manager.store.base import VmState
from protocol import messages as m
from protocol.codec import MANAGER_TO_AGENT, decode, encode

pytestmark = pytest.mark.integration


def ca_pem(home: Path) -> bytes:
    return (home / "pki" / "ca.pem").read_bytes()


async def enrol_raw(url: str, cafile: bytes, msg: m.Message | bytes) -> tuple[Any, int | None]:
    """Sends one frame on /enrol; returns (decoded answer or None, close code)."""
    ctx = identity.client_context(cafile, None, None)
    async with connect(url + "/enrol", ssl=ctx, open_timeout=10, compression=None) as ws:
        await ws.send(msg if isinstance(msg, bytes) else encode(msg))
        answer = None
        try:
            frame = await asyncio.wait_for(ws.recv(), 10)
            answer = decode(frame, MANAGER_TO_AGENT)
            await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed:
            pass
        await asyncio.wait_for(ws.wait_closed(), 10)
        return answer, ws.close_code


def new_csr(vm_id: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, identity.make_csr(key, vm_id)


def load_ca(home: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key((home / "pki" / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, x509.load_pem_x509_certificate(ca_pem(home))


def write_client_cert(
    tmp: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    cn: str,
    *,
    eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
    not_after: dt.datetime | None = None,
) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = mpki.issue(
        ca_key,
        ca_cert,
        public_key=key.public_key(),
        common_name=cn,
        eku=eku,
        not_before=now - dt.timedelta(days=2),
        not_after=not_after or now + dt.timedelta(days=1),
        serial=mpki.new_serial(),
    )
    tag = uuid.uuid4().hex[:8]
    cp, kp = tmp / f"c-{tag}.pem", tmp / f"k-{tag}.pem"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    kp.chmod(0o600)
    return str(cp), str(kp)


async def open_agent_ws(url: str, cafile: bytes, cert: str | None, key: str | None) -> Any:
    ctx = identity.client_context(cafile, cert, key)
    return await connect(url + "/agent", ssl=ctx, open_timeout=10, compression=None)


async def test_agent_enrols_connects_and_applies_first_config(cluster: Any) -> None:
    mgr = cluster.manager
    await mgr.start()
    (boot,) = await mgr.create_vms(1)
    a = cluster.agent(boot)
    await a.start()
    await a.wait_log("event=connected")
    await a.wait_log("event=config_applied version=1")
    applied = a.applied()
    assert applied is not None and applied["version"] == 1
    assert "sysvm.agent.heartbeat.interval" in applied["config"]["settings"]
    assert (a.state_dir / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (mgr.home / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
    m_ = await mgr.metrics()
    assert m_["sysvm_agents_connected"] == 1
    assert m_['sysvm_enrolments_total{reason="ok",result="ok"}'] == 1
    await cluster.wait_for(
        lambda: mgr.lines(f"event=config_applied vm={boot['vm_id']} version=1"), 10, "ack"
    )
    # The secret never reaches a log.
    assert boot["token"] not in mgr.log()
    assert boot["token"] not in a.log()
    # Identity: the certificate's CN is the VM id, EKU clientAuth.
    cert = x509.load_pem_x509_certificate((a.state_dir / "cert.pem").read_bytes())
    assert cert.subject.rfc4514_string() == f"CN={boot['vm_id']}"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # The manager recorded the hello and the ack in the store (group-committed).
    store = await open_store(mgr.home)
    try:

        async def recorded() -> bool:
            vm = await store.get_system_vm(boot["vm_id"])
            return vm is not None and vm.agent_version == "0.1.0" and vm.applied_version == 1

        await cluster.wait_for(recorded, 10, "hello and ack recorded")
    finally:
        await store.close()


async def test_external_bootdata_reissues_tokens_for_existing_vms(
    cluster: Any, tmp_path: Path
) -> None:
    """``external-bootdata`` gives an existing External VM a fresh token (the old unused
    one stops working) and boot data a real agent enrols and runs with."""
    mgr = cluster.manager
    await mgr.start()
    old_boots = await mgr.create_vms(2)
    target = old_boots[1]
    out = tmp_path / "again.jsonl"
    rc, err = await mgr.cli("external-bootdata", "--vm", target["vm_id"], "--out", str(out))
    assert rc == 0, err[-2000:]
    assert out.stat().st_mode & 0o777 == 0o600
    (boot,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert boot["vm_id"] == target["vm_id"] and boot["role"] == target["role"]
    assert boot["token"] != target["token"]
    assert boot["token"] not in mgr.log() and boot["token"] not in err
    # The superseded token is refused; the new one enrols a real agent.
    answer, code = await enrol_raw(
        mgr.url,
        ca_pem(mgr.home),
        m.Enrol(vm_id=target["vm_id"], token=target["token"], csr=new_csr(target["vm_id"])[1]),
    )
    assert isinstance(answer, m.Error) and code == 4001, (answer, code)
    a = cluster.agent(boot)
    await a.start()
    await a.wait_log("event=config_applied version=1")
    # Role filter: both VMs, one line each.
    rc, err = await mgr.cli("external-bootdata", "--role", "ssvm", "--out", str(out))
    assert rc == 0, err[-2000:]
    ids = sorted(json.loads(line)["vm_id"] for line in out.read_text().splitlines())
    assert ids == sorted(b["vm_id"] for b in old_boots)
    # Clear refusals, exit 2, nothing written.
    out.unlink()
    rc, err = await mgr.cli("external-bootdata", "--vm", "no-such-vm", "--out", str(out))
    assert rc == 2 and "no VM with id 'no-such-vm'" in err, err
    rc, err = await mgr.cli("external-bootdata", "--role", "cpvm", "--out", str(out))
    assert rc == 2 and "no live VM on the External hypervisor matches" in err, err
    assert not out.exists()


async def test_enrol_refusals_are_counted_and_logged(cluster: Any, tmp_path: Path) -> None:
    mgr = cluster.manager
    await mgr.start()
    a, b, c = await mgr.create_vms(3)
    ca = ca_pem(mgr.home)
    # A CA fetched from the manager pins to the boot data's fingerprint.
    assert await identity.fetch_ca(mgr.url, a["ca_fingerprint"]) == ca
    with pytest.raises(identity.TrustError):
        await identity.fetch_ca(mgr.url, "sha256:" + "0" * 64)

    _, csr_a = new_csr(a["vm_id"])
    refusals: list[tuple[str, m.Message | bytes, str]] = [
        # (what, frame, expected metric reason)
        ("foreign token", m.Enrol(vm_id=a["vm_id"], token="x" * 32, csr=csr_a), "token_unknown"),
        ("token of another VM", m.Enrol(vm_id=b["vm_id"], token=a["token"], csr=csr_a),
         "token_wrong_vm"),
        ("unknown vm", m.Enrol(vm_id=str(uuid.uuid4()), token=a["token"], csr=csr_a),
         "unknown_vm"),
        ("bad csr", m.Enrol(vm_id=a["vm_id"], token=a["token"], csr=b"-----BEGIN junk"),
         "bad_csr"),
        ("not an enrol", m.Hello(versions=[1]), "unexpected_message"),
        ("garbage bytes", b"\xc1\xff\x00garbage", "malformed"),
    ]  # fmt: skip
    for what, frame, reason in refusals:
        answer, code = await enrol_raw(mgr.url, ca, frame)
        assert not isinstance(answer, m.Enrolled), what
        assert code in (4001, 1008), (what, code)
        key = f'sysvm_enrolments_total{{reason="{reason}",result="refused"}}'
        assert await mgr.metric(key) >= 1, (what, key)
        assert mgr.lines(f"event=enrol_refused reason={reason}"), what

    # The real token still works after all that (refusals consumed nothing) ...
    key_a, csr_a = new_csr(a["vm_id"])
    answer, code = await enrol_raw(
        mgr.url, ca, m.Enrol(vm_id=a["vm_id"], token=a["token"], csr=csr_a)
    )
    assert isinstance(answer, m.Enrolled) and code == 1000
    identity.check_issued(answer.certificate, ca, key_a)
    # ... once: a replay is refused.
    answer, code = await enrol_raw(
        mgr.url, ca, m.Enrol(vm_id=a["vm_id"], token=a["token"], csr=csr_a)
    )
    assert isinstance(answer, m.Error) and code == 4001
    assert await mgr.metric('sysvm_enrolments_total{reason="token_used",result="refused"}') == 1

    # An expired token (written straight into the store, TTL in the past).
    store = await open_store(mgr.home)
    expired = "E" * 32
    try:
        async with store.transaction() as tx:
            await tx.add_enrolment_token(b["vm_id"], token_hash(expired), time.time() - 1)
    finally:
        await store.close()
    _, csr_b = new_csr(b["vm_id"])
    answer, code = await enrol_raw(mgr.url, ca, m.Enrol(vm_id=b["vm_id"], token=expired, csr=csr_b))
    assert isinstance(answer, m.Error) and code == 4001
    assert await mgr.metric('sysvm_enrolments_total{reason="token_expired",result="refused"}') == 1

    # A real agent with a replayed token does not crash and is not let in.
    replay = cluster.agent(a)
    await replay.start()
    await replay.wait_log("event=link_refused", timeout=15)
    assert replay.running
    assert not (replay.state_dir / "cert.pem").exists()

    # None of the refusals leaked a token into the log; the manager still serves others.
    log = mgr.log()
    for secret in (a["token"], b["token"], expired):
        assert secret not in log
    good = cluster.agent(c)
    await good.start()
    await good.wait_log("event=connected")
    assert mgr.running


async def test_agent_endpoint_refusals(cluster: Any, tmp_path: Path) -> None:
    mgr = cluster.manager
    await mgr.start()
    vm1, vm2 = await mgr.create_vms(2)
    ca = ca_pem(mgr.home)
    ca_key, ca_cert = load_ca(mgr.home)

    # 1. No client certificate: 401 before the upgrade.
    with pytest.raises(InvalidStatus) as ei:
        await open_agent_ws(mgr.url, ca, None, None)
    assert ei.value.response.status_code == 401
    assert await mgr.metric('sysvm_agent_refused_total{reason="no_certificate"}') == 1

    # 2. A certificate from a foreign CA: refused in the TLS handshake, counted.
    other_key, other_ca = mpki.make_ca(dt.datetime.now(dt.UTC))
    cert, key = write_client_cert(tmp_path, other_key, other_ca, vm1["vm_id"])
    with pytest.raises((ssl.SSLError, InvalidHandshake, ConnectionError, ConnectionClosed)):
        ws = await open_agent_ws(mgr.url, ca, cert, key)
        await ws.recv()  # TLS 1.3: the server's alert may arrive after the handshake
    # 3. Expired certificate from our CA.
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    cert, key = write_client_cert(tmp_path, ca_key, ca_cert, vm1["vm_id"], not_after=past)
    with pytest.raises((ssl.SSLError, InvalidHandshake, ConnectionError, ConnectionClosed)):
        ws = await open_agent_ws(mgr.url, ca, cert, key)
        await ws.recv()
    await cluster.wait_for(
        lambda: mgr.metric('sysvm_tls_handshake_failures_total{reason="bad_certificate"}'),
        10,
        "TLS refusals counted",
    )
    assert await mgr.metric('sysvm_tls_handshake_failures_total{reason="bad_certificate"}') >= 2

    # 4. The manager's own server certificate (EKU serverAuth) is not an agent identity.
    srv_cert, srv_key = str(mgr.home / "pki" / "server.pem"), str(mgr.home / "pki" / "server.key")
    with pytest.raises((ssl.SSLError, InvalidHandshake, ConnectionError, ConnectionClosed)):
        ws = await open_agent_ws(mgr.url, ca, srv_cert, srv_key)
        await ws.recv()
    # 5. A serverAuth certificate from our CA with a VM's CN: refused too.
    cert, key = write_client_cert(
        tmp_path, ca_key, ca_cert, vm1["vm_id"], eku=ExtendedKeyUsageOID.SERVER_AUTH
    )
    with pytest.raises((ssl.SSLError, InvalidHandshake, ConnectionError, ConnectionClosed)):
        ws = await open_agent_ws(mgr.url, ca, cert, key)
        await ws.recv()

    # 6. A valid certificate for a VM the manager does not know: 403.
    cert, key = write_client_cert(tmp_path, ca_key, ca_cert, str(uuid.uuid4()))
    with pytest.raises(InvalidStatus) as ei:
        await open_agent_ws(mgr.url, ca, cert, key)
    assert ei.value.response.status_code == 403

    # 7. Plain HTTP and plain ws:// to the TLS port.
    for request in (
        b"GET /ca.pem HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /agent HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", mgr.agent_port)
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(4096), 10)
        assert b"101" not in data and b"BEGIN CERTIFICATE" not in data
        writer.close()
    await cluster.wait_for(
        lambda: mgr.metric('sysvm_tls_handshake_failures_total{reason="plain_http"}'),
        10,
        "plain HTTP counted",
    )
    assert await mgr.metric('sysvm_tls_handshake_failures_total{reason="plain_http"}') == 2

    # 8. Revocation: a connected VM whose certificates are revoked is closed with 4003 and
    #    refused (403) afterwards; same for a VM that is destroyed.
    a1, a2 = cluster.agent(vm1), cluster.agent(vm2)
    await a1.start()
    await a2.start()
    await a1.wait_log("event=connected")
    await a2.wait_log("event=connected")
    store = await open_store(mgr.home)
    try:
        async with store.transaction() as tx:
            serials = await tx.revoke_certificates(vm1["vm_id"], "test", time.time())
            await tx.update_system_vm(vm2["vm_id"], state=VmState.DESTROYED)
    finally:
        await store.close()
    assert serials
    await a1.wait_log("code=4003")
    await a2.wait_log("code=4003")
    await a1.wait_log("HTTP 403")
    await a2.wait_log("HTTP 403")
    # The destroyed VM's certificates were revoked by the manager too, so both are "revoked".
    assert await mgr.metric('sysvm_agent_refused_total{reason="revoked"}') >= 2
    assert mgr.lines(f"event=certificates_revoked vm={vm2['vm_id']}")
    assert await mgr.metric("sysvm_agents_connected") == 0
    assert mgr.lines("event=agent_refused reason=revoked")
    # The agents keep running (backing off), the manager keeps serving.
    assert a1.running and a2.running and mgr.running
    assert json.loads((mgr.home / "credentials.json").read_text())["apikey"]
