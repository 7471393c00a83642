"""Pure decisions of the link, trust and desired-state code (no loop, no sockets)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent import bootdata, identity
from agent.link import backoff_delay, read_image_version, should_apply
from agent.roles import UnknownRole, load
from agent.roles.base import ApplyError, RoleContext
from agent.roles.secondarystorage import validate
from agent.state import MAX_COMMANDS, StateDir, command_record
from manager import pki
from manager.agentlink import (
    RateLimitedLog,
    classify_tls_error,
    hello_changes_record,
    needs_push,
    refusal_status,
)
from manager.app import ConfigError, make_config, parse_agent_urls, parse_listen
from manager.desired import SECTION_RENDERERS, register_section, render_config
from manager.enrolment import new_token, token_hash, token_matches, well_formed_token
from manager.metrics import Metrics, quantile
from manager.store.base import Role, SystemVm, VmState
from manager.systemd import notify_address, watchdog_interval

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


# --- desired state ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("desired", "acked", "sent", "push"),
    [
        (0, 0, 0, False),
        (1, 0, 0, True),
        (3, 3, 0, False),  # the agent has it (hello or ack)
        (3, 0, 3, False),  # already in flight
        (4, 3, 3, True),  # something newer than everything
        (5, 0, 0, True),  # an agent that lost its disk reports 0: it gets the config again
    ],
)
def test_needs_push(desired: int, acked: int, sent: int, push: bool) -> None:
    assert needs_push(desired, acked, sent) is push


def test_agent_ignores_versions_at_or_below_applied() -> None:
    assert should_apply(5, 4)
    assert not should_apply(4, 4)
    assert not should_apply(3, 4)


class FakeSettings:
    def agent_settings(self, zone_id: str | None) -> dict[str, Any]:
        return {"a.b": 1, "zone": zone_id}


def vm(**kw: Any) -> SystemVm:
    base: dict[str, Any] = dict(
        id="vm-1", seq=1, name="s-1-VM", role=Role.SECONDARY_STORAGE, zone_id="z1", pod_id=None,
        host_id=None, state=VmState.RUNNING, template_id=None, hypervisor="External",
        public_ip=None, private_ip=None, linklocal_ip=None, desired_version=2,
        applied_version=1, agent_version=None, image_version=None, last_seen=None, created=0.0,
    )  # fmt: skip
    base.update(kw)
    return SystemVm(**base)


def test_render_config_settings_section_and_registered_sections() -> None:
    assert render_config(vm(), FakeSettings()) == {"settings": {"a.b": 1, "zone": "z1"}}
    register_section("demo", lambda v, s: {"name": v.name} if v.role == Role.ROUTER else None)
    try:
        assert "demo" not in render_config(vm(), FakeSettings())
        assert render_config(vm(role=Role.ROUTER), FakeSettings())["demo"] == {"name": "s-1-VM"}
        with pytest.raises(ValueError):
            register_section("settings", lambda v, s: {})
    finally:
        SECTION_RENDERERS.pop("demo")


def test_plain_reconnect_writes_nothing() -> None:
    v = vm(agent_version="0.1.0", image_version="img", applied_version=4)
    assert not hello_changes_record(v, "0.1.0", "img", 4)
    assert not hello_changes_record(v, "0.1.0", "img", 3)
    assert hello_changes_record(v, "0.1.1", "img", 4)
    assert hello_changes_record(v, "0.1.0", None, 4)
    assert hello_changes_record(v, "0.1.0", "img", 5)


# --- reconnect ----------------------------------------------------------------------------


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(60.0, 0.5 * 2**attempt)
        samples = [backoff_delay(attempt, rng) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # Full jitter: spread over the whole range, not clustered near the ceiling.
        assert min(samples) < ceiling * 0.1 and max(samples) > ceiling * 0.8
    assert backoff_delay(10_000, rng) <= 60.0


# --- refusals and logging -----------------------------------------------------------------


def test_refusal_status() -> None:
    assert refusal_status("revoked") == 403 and refusal_status("unknown_vm") == 403
    assert refusal_status("no_certificate") == 401 and refusal_status("bad_eku") == 401


def test_classify_tls_error() -> None:
    plain = ssl.SSLError(1, "http request")
    plain.reason = "HTTP_REQUEST"
    assert classify_tls_error(plain) == "plain_http"
    wrong = ssl.SSLError(1, "x")
    wrong.reason = "WRONG_VERSION_NUMBER"
    assert classify_tls_error(wrong) == "not_tls"
    assert classify_tls_error(ssl.SSLCertVerificationError(1, "bad")) == "bad_certificate"
    assert classify_tls_error(ssl.SSLError(1, "other")) == "tls_error"


def test_rate_limited_log_counts_what_it_drops() -> None:
    rl = RateLimitedLog(per_interval=2, interval=10.0)
    assert rl.allow("k", 0.0) == (True, 0)
    assert rl.allow("k", 1.0) == (True, 0)
    assert rl.allow("k", 2.0) == (False, 0)
    assert rl.allow("k", 3.0) == (False, 0)
    assert rl.allow("other", 3.0) == (True, 0)
    assert rl.allow("k", 11.0) == (True, 2)  # new window reports the two dropped lines


# --- daemon configuration -----------------------------------------------------------------


def test_listen_and_agent_urls() -> None:
    assert parse_listen("127.0.0.1:8080", "x") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:8250", "x") == ("::1", 8250)
    assert parse_listen(":8250", "x") == ("0.0.0.0", 8250)
    for bad in ("8080", "host:", "host:99999", "host:http"):
        with pytest.raises(ConfigError):
            parse_listen(bad, "x")
    with pytest.raises(ConfigError):
        parse_agent_urls("ws://a:1")
    with pytest.raises(ConfigError):
        parse_agent_urls("wss://a")
    assert parse_agent_urls("wss://a:1, wss://b:2/") == ("wss://a:1", "wss://b:2")


def test_make_config_flags_over_env_over_defaults() -> None:
    cfg = make_config({})
    assert str(cfg.home) == "/var/lib/sysvm"
    assert cfg.api_listen == ("127.0.0.1", 8080) and cfg.agent_listen == ("0.0.0.0", 8250)
    assert cfg.agent_urls == ("wss://127.0.0.1:8250",)
    env = {"SYSVM_HOME": "/h", "SYSVM_AGENT_LISTEN": "10.0.0.1:9000",
           "SYSVM_AGENT_URLS": "wss://m1:9000,wss://m2:9000"}  # fmt: skip
    cfg = make_config(env)
    assert str(cfg.home) == "/h" and cfg.agent_urls == ("wss://m1:9000", "wss://m2:9000")
    cfg = make_config(env, home="/flag", agent_listen="127.0.0.1:1", agent_urls="wss://x:1")
    assert str(cfg.home) == "/flag" and cfg.agent_urls == ("wss://x:1",)


# --- metrics ------------------------------------------------------------------------------


def test_metrics_render_prometheus_text() -> None:
    mt = Metrics()
    mt.inc("sysvm_enrolments_total", result="refused", reason='a"b')
    mt.inc("sysvm_enrolments_total", result="refused", reason='a"b')
    mt.set("sysvm_agents_connected", 3)
    mt.inc("sysvm_unregistered")
    text = mt.render()
    assert "# TYPE sysvm_enrolments_total counter" in text
    assert 'sysvm_enrolments_total{reason="a\\"b",result="refused"} 2' in text
    assert "sysvm_agents_connected 3" in text
    assert "# TYPE sysvm_unregistered untyped" in text
    assert mt.get("sysvm_agents_connected") == 3 and mt.total("sysvm_enrolments_total") == 2


def test_quantile_nearest_rank() -> None:
    values = sorted(float(i) for i in range(1, 101))
    assert quantile(values, 0.5) == 50.0 and quantile(values, 0.99) == 99.0
    assert quantile([], 0.5) == 0.0 and quantile([3.0], 0.99) == 3.0


# --- systemd ------------------------------------------------------------------------------


def test_notify_socket_and_watchdog_parsing() -> None:
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/n"}) == "/run/n"
    assert notify_address({"NOTIFY_SOCKET": "@abs"}) == b"\0abs"
    assert notify_address({"NOTIFY_SOCKET": "vsock:1:2"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 5) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "6"}, 5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}, 5) is None
    assert watchdog_interval({}, 5) is None


# --- boot data ----------------------------------------------------------------------------

GOOD = {"vm_id": "0b6c7c5e-1", "name": "s-1-VM", "role": "secondarystorage", "zone_id": "z",
        "manager_urls": ["wss://10.0.0.1:8250"], "ca_fingerprint": "sha256:" + "a" * 64,
        "token": "T" * 32, "extra": {"k": 1}}  # fmt: skip


def test_bootdata_parse_and_refusals() -> None:
    b = bootdata.parse(json.dumps(GOOD), "t")
    assert b.vm_id == "0b6c7c5e-1" and b.manager_urls == ("wss://10.0.0.1:8250",)
    assert "T" * 32 not in repr(b)
    bad_cases = [
        ("not json", "{"),
        ("not object", "[]"),
        ("http url", json.dumps({**GOOD, "manager_urls": ["https://x:1"]})),
        ("no urls", json.dumps({**GOOD, "manager_urls": []})),
        ("fingerprint", json.dumps({**GOOD, "ca_fingerprint": "md5:x"})),
        ("short token", json.dumps({**GOOD, "token": "abc"})),
        ("vm id", json.dumps({**GOOD, "vm_id": "../etc"})),
        ("extra", json.dumps({**GOOD, "extra": []})),
    ]
    for what, raw in bad_cases:
        with pytest.raises(bootdata.BootDataError) as ei:
            bootdata.parse(raw, "t")
        assert "T" * 32 not in str(ei.value), what


def test_bootdata_sources_in_order(tmp_path: Path) -> None:
    etc, fw, cmdline = tmp_path / "etc.json", tmp_path / "fw", tmp_path / "cmdline"
    enc = base64.urlsafe_b64encode(json.dumps({**GOOD, "name": "cmd"}).encode()).decode()
    cmdline.write_text(f"console=ttyS0 sysvm.bootdata={enc.rstrip('=')} quiet\n")
    kw = {"etc_path": etc, "fw_cfg_path": fw, "cmdline_path": cmdline}
    assert bootdata.load(**kw).name == "cmd"
    fw.write_text(json.dumps({**GOOD, "name": "fw"}))
    assert bootdata.load(**kw).name == "fw"
    etc.write_text(json.dumps({**GOOD, "name": "etc"}))
    assert bootdata.load(**kw).name == "etc"
    explicit = tmp_path / "x.json"
    explicit.write_text(json.dumps({**GOOD, "name": "explicit"}))
    assert bootdata.load(explicit, **kw).name == "explicit"
    with pytest.raises(bootdata.BootDataError):
        bootdata.load(etc_path=tmp_path / "no1", fw_cfg_path=tmp_path / "no2",
                      cmdline_path=tmp_path / "no3")  # fmt: skip


# --- PKI ----------------------------------------------------------------------------------


def _agent_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    *,
    eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
    days: int = 1,
    cn: str = "vm-1",
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return pki.issue(
        ca_key, ca, public_key=key.public_key(), common_name=cn, eku=eku,
        not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=days),
        serial=pki.new_serial(),
    )  # fmt: skip


def test_check_agent_certificate() -> None:
    ca_key, ca = pki.make_ca(NOW)
    assert pki.check_agent_certificate(_agent_cert(ca_key, ca), ca, NOW) == "vm-1"
    other_key, other = pki.make_ca(NOW)
    cases = [
        ("foreign_ca", _agent_cert(other_key, other)),
        ("bad_eku", _agent_cert(ca_key, ca, eku=ExtendedKeyUsageOID.SERVER_AUTH)),
        ("expired", _agent_cert(ca_key, ca, days=-0)),
    ]
    for reason, cert in cases:
        when = NOW + dt.timedelta(seconds=1) if reason == "expired" else NOW
        with pytest.raises(pki.CertificateRefused) as ei:
            pki.check_agent_certificate(cert, ca, when)
        assert ei.value.reason == reason


def test_csr_signing_uses_the_vm_id_not_the_csr_subject(tmp_path: Path) -> None:
    p = pki.Pki.open(tmp_path)
    assert (tmp_path / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
    key = ec.generate_private_key(ec.SECP256R1())
    csr = identity.make_csr(key, "someone-else")
    issued = p.sign_agent_csr(csr, "vm-9", dt.timedelta(days=30))
    cert = x509.load_pem_x509_certificate(issued.pem)
    assert pki.check_agent_certificate(cert, p.ca_cert, dt.datetime.now(dt.UTC)) == "vm-9"
    identity.check_issued(issued.pem, p.ca_pem, key)
    with pytest.raises(identity.TrustError):
        identity.check_issued(issued.pem, p.ca_pem, ec.generate_private_key(ec.SECP256R1()))
    # Re-opening keeps the same CA; the fingerprint pins it.
    again = pki.Pki.open(tmp_path)
    assert again.ca_fingerprint == p.ca_fingerprint
    assert identity.check_pinned_ca(p.ca_pem, p.ca_fingerprint) == p.ca_pem
    with pytest.raises(identity.TrustError):
        identity.check_pinned_ca(p.ca_pem, "sha256:" + "0" * 64)
    # The server certificate is serverAuth only.
    srv = x509.load_pem_x509_certificate(p.server_cert_pem)
    identity.check_server_certificate(srv.public_bytes(serialization.Encoding.DER))
    with pytest.raises(identity.TrustError):
        identity.check_server_certificate(cert.public_bytes(serialization.Encoding.DER))


def test_parse_csr_refuses_garbage_and_other_keys() -> None:
    with pytest.raises(pki.PkiError):
        pki.parse_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n")
    with pytest.raises(pki.PkiError):
        pki.parse_csr(b"x" * 20000)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(
            rsa_key,
            __import__("cryptography.hazmat.primitives.hashes").hazmat.primitives.hashes.SHA256(),
        )
    )
    with pytest.raises(pki.PkiError):
        pki.parse_csr(csr.public_bytes(serialization.Encoding.PEM))


def test_renewal_due() -> None:
    ca_key, ca = pki.make_ca(NOW)
    cert = _agent_cert(ca_key, ca, days=2)  # valid NOW-1d .. NOW+2d
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert not identity.renewal_due(pem, NOW, 2 / 3)
    assert identity.renewal_due(pem, NOW + dt.timedelta(days=1), 2 / 3)
    assert identity.renewal_due(pem, NOW, 0.0)


def test_parse_http_response() -> None:
    assert identity.parse_http_response(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody") == (200, b"body")
    with pytest.raises(identity.TrustError):
        identity.parse_http_response(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(identity.TrustError):
        identity.parse_http_response(b"garbage\r\n\r\n")


# --- tokens -------------------------------------------------------------------------------


def test_tokens() -> None:
    t = new_token()
    assert len(base64.urlsafe_b64decode(t + "==")) * 8 >= 128
    assert well_formed_token(t) and not well_formed_token("short") and not well_formed_token(5)
    assert token_matches(t, token_hash(t)) and not token_matches(t + "x", token_hash(t))
    assert new_token() != t


# --- agent state --------------------------------------------------------------------------


def test_state_files_are_atomic_and_private(tmp_path: Path) -> None:
    st = StateDir(tmp_path / "s")
    st.ensure()
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    st.write_key(b"secret")
    assert st.key_path.stat().st_mode & 0o777 == 0o600
    assert st.load_applied() is None
    st.save_applied(3, {"settings": {"x": 1}, "blob": b"\x00\x01"})
    applied = st.load_applied()
    assert applied is not None and applied.version == 3
    assert applied.config["blob"] == b"\x00\x01"
    assert [p.name for p in (tmp_path / "s").iterdir() if p.name.startswith(".")] == []
    records = {f"c{i}": {**command_record(True, {}, ""), "at": float(i)} for i in range(1100)}
    st.save_commands(records)
    kept = st.load_commands()
    assert len(kept) == MAX_COMMANDS and "c1099" in kept and "c0" not in kept


def test_image_version(tmp_path: Path) -> None:
    p = tmp_path / "rel"
    assert read_image_version(p) == ""
    p.write_text("# sysvm image\nNAME=sysvm\nVERSION=2026.11.1\n")
    assert read_image_version(p) == "2026.11.1"
    p.write_text("4.21.0-sysvm\n")
    assert read_image_version(p) == "4.21.0-sysvm"


# --- roles --------------------------------------------------------------------------------


def test_roles_load_and_secondarystorage_validation(tmp_path: Path) -> None:
    ctx = RoleContext(vm_id="v", name="s-1-VM", zone_id="z", role="secondarystorage",
                      state_dir=tmp_path)  # fmt: skip
    role = load("secondarystorage", ctx)
    assert role.status()["configured"] is False
    with pytest.raises(UnknownRole):
        load("mainframe", ctx)
    assert validate({"settings": {"a": 1}}) == {"settings": {"a": 1}, "secondarystorage": {}}
    with pytest.raises(ApplyError) as ei:
        validate({"settings": []})
    assert "settings" in ei.value.reason


def test_gc_freeze_decision() -> None:
    from manager.agentlink import GC_FREEZE_MIN_NEW, GC_FREEZE_SETTLE, freeze_decision

    settled = GC_FREEZE_SETTLE
    # a settled burst of new sessions is frozen; an unsettled one or a small one is not
    assert (
        freeze_decision(live=GC_FREEZE_MIN_NEW, frozen=0, closed_since=0, quiet_for=settled)
        == "freeze"
    )
    assert (
        freeze_decision(live=GC_FREEZE_MIN_NEW, frozen=0, closed_since=0, quiet_for=settled - 1)
        is None
    )
    assert (
        freeze_decision(live=GC_FREEZE_MIN_NEW - 1, frozen=0, closed_since=0, quiet_for=settled)
        is None
    )
    # a long ramp is frozen step by step, without waiting for it to settle
    from manager.agentlink import GC_FREEZE_RAMP_STEP

    assert (
        freeze_decision(live=GC_FREEZE_RAMP_STEP, frozen=0, closed_since=0, quiet_for=0) == "freeze"
    )
    assert (
        freeze_decision(
            live=2 * GC_FREEZE_RAMP_STEP - 1,
            frozen=GC_FREEZE_RAMP_STEP,
            closed_since=0,
            quiet_for=0,
        )
        == "refreeze"  # not a new step yet: only what is new since is frozen
    )
    # no freeze before a full collection swept the closed sessions' garbage
    assert (
        freeze_decision(live=5000, frozen=0, closed_since=0, quiet_for=settled, swept=False) is None
    )
    # many frozen sessions closed: unfreeze so their cycles can be collected
    assert freeze_decision(live=8000, frozen=10000, closed_since=1001, quiet_for=0) == "unfreeze"
    # frozen and staying so: what was allocated since is frozen too, each tick
    assert (
        freeze_decision(live=9900, frozen=10000, closed_since=100, quiet_for=settled) == "refreeze"
    )
    # ... until the heap has been frozen for GC_FROZEN_MAX_AGE: one full collection
    from manager.agentlink import GC_FROZEN_MAX_AGE

    assert (
        freeze_decision(
            live=10000, frozen=10000, closed_since=0, quiet_for=0, frozen_for=GC_FROZEN_MAX_AGE
        )
        == "unfreeze"
    )
    assert freeze_decision(live=500, frozen=500, closed_since=101, quiet_for=0) == "unfreeze"
