"""The router role with its real daemons (dnsmasq, haproxy, apache2, sshd) and real
traffic between network namespaces. See conftest.py for the topology."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

import pytest

from agent.roles.router.proc import CommandError
from tests.integration.router.conftest import (
    CTL_IP,
    DOMAIN,
    G1,
    G2,
    GUEST_GW,
    HERE,
    LB_IP,
    PUB_GW,
    PY,
    SNAT_IP,
    STATIC_IP,
    Harness,
    Topology,
    base_config,
    dhcp,
    sh,
    wait_for,
)

pytestmark = pytest.mark.integration


async def bring_up(topo: Topology, config: dict[str, Any] | None = None) -> Harness:
    """Role started and configured, guests leased by DHCP, tiny services running."""
    h = await Harness.spawn(topo)
    res = await h.call("start", applied=None)
    assert res["ok"], res
    res = await h.apply(config or base_config())
    assert res["ok"], res
    for g, (_mac, ip, name) in (("g1", G1), ("g2", G2)):
        lease = await dhcp(topo, g)
        assert lease["ip"] == ip and lease["router"] == GUEST_GW, lease
        assert lease["dns"] == GUEST_GW and lease["domain"] == DOMAIN, lease
        await topo.spawn(g, PY, str(HERE / "peer_http.py"), name, "0.0.0.0", "8000")
        await topo.spawn(g, PY, str(HERE / "peer_http.py"), f"{name}-9001", "0.0.0.0", "9001")
    await topo.spawn("pc", PY, str(HERE / "peer_http.py"), "outside", PUB_GW, "9000")
    for ns, url in (
        ("g1", f"http://{G1[1]}:8000/"),
        ("g2", f"http://{G2[1]}:8000/"),
        ("g1", f"http://{G2[1]}:9001/"),
        ("pc", f"http://{PUB_GW}:9000/"),
    ):
        await wait_for(lambda ns=ns, url=url: topo.reachable(ns, url), f"{url} in {ns}")
    return h


async def core_traffic_works(topo: Topology) -> None:
    """Port forward, static NAT both ways, source NAT, load balancing."""
    # Port forwarding: public LB_IP:8080 -> g1:8000; g1 sees the real client.
    assert await topo.curl("pc", f"http://{LB_IP}:8080/") == f"g1 {PUB_GW}\n"
    # Static NAT in and out.
    assert await topo.curl("pc", f"http://{STATIC_IP}:8000/") == f"g2 {PUB_GW}\n"
    assert await topo.curl("g2", f"http://{PUB_GW}:9000/") == f"outside {STATIC_IP}\n"
    # Source NAT out.
    assert await topo.curl("g1", f"http://{PUB_GW}:9000/") == f"outside {SNAT_IP}\n"
    # Load balancing (haproxy, roundrobin) over both guests.
    seen = {(await topo.curl("pc", f"http://{LB_IP}:80/")).split()[0] for _ in range(4)}
    assert seen == {"g1", "g2"}


async def test_router_serves_guests_and_public(topo: Topology) -> None:
    h = await bring_up(topo)
    await core_traffic_works(topo)

    # DNS: guest names (short and qualified), extra entries, from dnsmasq on the gateway.
    dig = ["dig", "+short", "+time=1", "+tries=2", f"@{GUEST_GW}"]
    assert (await topo.x("g1", *dig, f"g2.{DOMAIN}")).strip() == G2[1]
    assert (await topo.x("g2", *dig, "g1")).strip() == G1[1]
    assert (await topo.x("g1", *dig, "files.test.internal")).strip() == "10.11.0.99"

    # Userdata / metadata: each guest gets its own, chosen by its source IP.
    ud = await topo.curl("g1", f"http://{GUEST_GW}/latest/user-data")
    assert ud == "#cloud-config\nhostname: g1\n"
    assert await topo.curl("g2", f"http://{GUEST_GW}/latest/user-data") == "g2 data"
    assert await topo.curl("g1", f"http://{GUEST_GW}/latest/meta-data/instance-id") == "i-g1"
    listing = await topo.curl("g1", f"http://{GUEST_GW}/latest/meta-data/")
    assert listing.split() == ["instance-id", "local-hostname"]
    assert await topo.curl("g2", f"http://{GUEST_GW}/latest/meta-data/instance-id") == "i-g2"
    # Anything else on apache is refused; the public side cannot reach it at all.
    assert not await topo.reachable("g1", f"http://{GUEST_GW}/etc/passwd")
    assert not await topo.reachable("pc", f"http://{SNAT_IP}/latest/user-data")

    # Firewall: g2:9001 is up (reachable from g1 inside) but not opened on the static NAT IP.
    assert not await topo.reachable("pc", f"http://{STATIC_IP}:9001/")
    # No firewall rule at all for the source NAT IP; guests are not routable from outside.
    assert not await topo.reachable("pc", f"http://{SNAT_IP}:8080/")
    await topo.x("pc", "ip", "route", "add", "10.11.0.0/24", "via", SNAT_IP)
    assert not await topo.reachable("pc", f"http://{G1[1]}:8000/")
    # ICMP echo allowed to LB_IP only.
    await topo.x("pc", "ping", "-c", "1", "-W", "1", LB_IP)
    try:
        await topo.x("pc", "ping", "-c", "1", "-W", "1", SNAT_IP)
        raise AssertionError("ping to SNAT_IP should be dropped")
    except CommandError:
        pass

    # SSH: on the control NIC only, with the configured key only.
    banner = await topo.x("mg", PY, "-c", _BANNER, CTL_IP, "3922")
    assert banner.startswith("SSH-2.0-OpenSSH"), banner
    try:
        await topo.x("g1", PY, "-c", _BANNER, GUEST_GW, "3922")
        raise AssertionError("sshd must not answer on the guest network")
    except CommandError:
        pass
    key = topo.tmp / "id_ed25519"
    await sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    ssh = [
        "ssh", "-i", str(key), "-p", "3922", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={topo.tmp}/known",
        "-o", "ConnectTimeout=3", f"root@{CTL_IP}", "echo", "inside-the-router",
    ]  # fmt: skip
    try:
        await topo.x("mg", *ssh)
        raise AssertionError("login must fail before the key is configured")
    except CommandError as e:
        assert "Permission denied" in e.stderr, e.stderr
    cfg = base_config()
    cfg["router"]["ssh_authorized_key"] = (topo.tmp / "id_ed25519.pub").read_text().strip()
    res = await h.apply(cfg)
    assert res["ok"] and res["status"]["last_actions"] == {}, res  # a file, no reload
    assert (await topo.x("mg", *ssh)).strip() == "inside-the-router"

    # Egress: default allow with an exception denying tcp/9000 to the public network.
    cfg["router"]["egress"] = {
        "default": "allow",
        "rules": [{"protocol": "tcp", "ports": 9000, "destination_cidrs": ["198.51.100.0/24"]}],
    }
    res = await h.apply(cfg)
    assert res["ok"] and res["status"]["last_restored"] == ["filter"], res
    assert not await topo.reachable("g1", f"http://{PUB_GW}:9000/")
    assert await topo.curl("pc", f"http://{LB_IP}:8080/") == f"g1 {PUB_GW}\n"  # ingress fine
    cfg["router"]["egress"] = {"default": "allow"}
    assert (await h.apply(cfg))["ok"]
    assert await topo.curl("g1", f"http://{PUB_GW}:9000/") == f"outside {SNAT_IP}\n"
    await h.stop()


_BANNER = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
print(s.makefile().readline().strip())
"""


async def _save(topo: Topology, *args: str) -> str:
    return await topo.x("vr", "iptables-save", *args)


def _ours(save: str) -> list[str]:
    return [line for line in save.splitlines() if "SVM-" in line and not line.startswith("#")]


async def test_apply_twice_changes_nothing_and_changes_reload_only_what_changed(
    topo: Topology,
) -> None:
    h = await bring_up(topo)
    await core_traffic_works(topo)
    before = _ours(await _save(topo, "-c"))
    pids = (await h.call("status"))["status"]["pids"]

    res = await h.apply(base_config())
    assert res["ok"], res
    st = res["status"]
    assert st["last_actions"] == {} and st["last_restored"] == [], st
    assert st["pids"] == pids
    # Same rules, and counters kept (not reset): every counted rule still has its count.
    after = _ours(await _save(topo, "-c"))
    assert [line.split("] ", 1)[-1] for line in after] == [
        line.split("] ", 1)[-1] for line in before
    ]

    def packets(line: str) -> int:
        return int(line[1:].split(":", 1)[0])

    counted = [(b, a) for b, a in zip(before, after, strict=True) if b.startswith("[")]
    assert any(packets(b) > 0 for b, _ in counted)  # traffic was counted before...
    for b, a in counted:
        assert packets(a) >= packets(b), (b, a)  # ...and no counter went back to zero

    # A change: new DHCP/DNS entry and another LB algorithm → dnsmasq HUP, haproxy
    # reload (same master, new worker), only the filter table untouched... nat unchanged.
    cfg = base_config()
    cfg["router"]["dhcp"].append({"mac": "02:00:0a:0b:00:07", "ip": "10.11.0.7", "hostname": "g3"})
    cfg["router"]["load_balancers"][0]["algorithm"] = "leastconn"
    res = await h.apply(cfg)
    assert res["ok"], res
    st = res["status"]
    assert st["last_actions"] == {"dnsmasq": "reload", "haproxy": "reload"}, st
    assert st["last_restored"] == [], st
    assert st["pids"] == pids  # reloads, not restarts
    dig = ["dig", "+short", "+time=1", "+tries=2", f"@{GUEST_GW}"]
    assert (await topo.x("g1", *dig, "g3")).strip() == "10.11.0.7"
    await core_traffic_works(topo)

    # A firewall change re-writes only the mangle table's firewall chain.
    stats_before = [x for x in _ours(await _save(topo, "-c")) if "SVM-STATS" in x]
    cfg["router"]["firewall"].append({"public_ip": STATIC_IP, "protocol": "tcp", "ports": 9001})
    res = await h.apply(cfg)
    assert res["ok"] and res["status"]["last_restored"] == ["mangle"], res
    stats_after = [x for x in _ours(await _save(topo, "-c")) if "SVM-STATS" in x]
    for b, a in zip(stats_before, stats_after, strict=True):
        if b.startswith("["):
            assert packets(a) >= packets(b), (b, a)  # counting chains untouched
    assert res["status"]["last_actions"] == {}
    assert await topo.curl("pc", f"http://{STATIC_IP}:9001/") == f"g2-9001 {PUB_GW}\n"
    await h.stop()


async def test_broken_config_is_refused_with_the_failing_line_and_traffic_keeps_flowing(
    topo: Topology,
) -> None:
    h = await bring_up(topo)
    before = _ours(await _save(topo))
    pids = (await h.call("status"))["status"]["pids"]

    # Passes the schema (ICMP type names are iptables' business) but iptables refuses it.
    bad = base_config()
    bad["router"]["firewall"].append(
        {"public_ip": LB_IP, "protocol": "icmp", "icmp_type": "no-such-type"}
    )
    bad["router"]["dhcp"].append({"mac": "02:00:0a:0b:00:07", "ip": "10.11.0.7", "hostname": "g3"})
    res = await h.apply(bad)
    assert not res["ok"]
    err = res["error"]
    assert "iptables-restore (mangle) failed at line" in err, err
    assert "--icmp-type no-such-type" in err and "firewall[4]" in err, err
    assert "Unknown ICMP type" in err, err
    # Nothing changed: rules, daemons, files (g3 unknown to DNS), traffic.
    assert _ours(await _save(topo)) == before
    st = (await h.call("status"))["status"]
    assert st["pids"] == pids and st["error"] == err
    dig = ["dig", "+short", "+time=1", "+tries=2", f"@{GUEST_GW}"]
    assert (await topo.x("g1", *dig, "g3")).strip() == ""
    await core_traffic_works(topo)

    # Schema errors name the field.
    bad = base_config()
    bad["router"]["port_forwarding"][0]["guest_ports"] = "8000-8001"
    res = await h.apply(bad)
    assert not res["ok"]
    assert res["error"] == (
        "invalid config: router.port_forwarding[0].guest_ports: must be as long as public_ports"
    )

    # A failure after the switch (haproxy cannot bind: the port is taken) is rolled back.
    taker = await topo.spawn("vr", PY, "-c", _TAKE_PORT, LB_IP, "7777")
    await wait_for(lambda: _listening(topo, f"{LB_IP}:7777"), "port 7777 taken", timeout=10)
    bad = base_config()
    bad["router"]["load_balancers"].append(
        {
            "name": "clash",
            "public_ip": LB_IP,
            "public_port": 7777,
            "members": [{"ip": G1[1], "port": 8000}],
        }
    )
    bad["router"]["firewall"].append({"public_ip": STATIC_IP, "protocol": "tcp", "ports": 9001})
    res = await h.apply(bad)
    assert not res["ok"]
    assert "haproxy" in res["error"], res
    assert _ours(await _save(topo)) == before  # the filter change was rolled back too
    assert not await topo.reachable("pc", f"http://{STATIC_IP}:9001/")
    await core_traffic_works(topo)
    taker.send_signal(signal.SIGKILL)
    await h.stop()


_TAKE_PORT = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()
while True: time.sleep(60)
"""


async def _listening(topo: Topology, addr: str) -> bool:
    return addr in await topo.x("vr", "ss", "-ltnH")


async def test_hard_reset_reapplies_the_persisted_config(topo: Topology) -> None:
    h = await bring_up(topo)
    await core_traffic_works(topo)
    applied = base_config()  # what the agent persisted in applied.json
    # Stats the manager has not acknowledged yet must survive the reset.
    h.ack = False
    res = await h.call("stats")
    assert res["status"]["stats_pending"] == 1
    unacked = h.requests[-1]["params"]["batches"][0]

    # "Reboot": kill -9 everything in the VR (role and daemons), drop its rules and
    # addresses, as a hard reset would.
    pids = await _ns_pids(topo)
    assert len(pids) >= 5  # harness + dnsmasq + haproxy + apache + sshd (+ workers)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    await wait_for(lambda: _ns_empty(topo), "VR processes gone")
    await topo.x("vr", "nft", "flush", "ruleset")
    for dev in ("pub0", "gst0", "ctl0"):
        await topo.x("vr", "ip", "addr", "flush", "dev", dev)
    assert not await topo.reachable("pc", f"http://{LB_IP}:8080/", timeout=0.5)

    h2 = await Harness.spawn(topo)
    res = await h2.call("start", applied=applied)
    assert res["ok"], res
    assert res["status"]["applied"] and res["status"]["error"] == "", res
    await core_traffic_works(topo)
    dig = ["dig", "+short", "+time=1", "+tries=2", f"@{GUEST_GW}"]
    assert (await topo.x("g1", *dig, "g2")).strip() == G2[1]
    assert await topo.curl("g2", f"http://{GUEST_GW}/latest/user-data") == "g2 data"
    # The persisted, unacknowledged batch is resent (same id: the manager de-duplicates).
    assert res["status"]["stats_pending"] == 1
    res = await h2.call("stats")
    assert res["status"]["stats_pending"] == 0
    sent = h2.requests[-1]["params"]["batches"]
    assert sent[0] == unacked
    assert all(b["epoch"] != unacked["epoch"] for b in sent[1:])  # counters restarted
    await h2.stop()
    assert h.proc.returncode is not None  # the first role died with the "reset"


async def _ns_pids(topo: Topology) -> list[str]:
    return (await sh("ip", "netns", "pids", topo.ns("vr"))).split()


async def _ns_empty(topo: Topology) -> bool:
    return not await _ns_pids(topo)


async def test_stats_deltas_match_bytes_sent(topo: Topology) -> None:
    h = await bring_up(topo)
    # Baseline: account whatever bring_up sent.
    res = await h.call("stats")
    assert res["ok"], res
    assert res["status"]["stats_pending"] == 0
    h.requests.clear()

    n = 1_000_000
    body = topo.tmp / "payload"
    body.write_bytes(b"x" * n)
    out = await topo.curl("g1", f"http://{PUB_GW}:9000/", "--data-binary", f"@{body}")
    assert out == f"outside {SNAT_IP} {n}\n"
    got = await topo.curl("pc", f"http://{STATIC_IP}:8000/")  # a little inbound on .11
    assert got.startswith("g2 ")

    # Manager unreachable: the delta stays pending (persisted), nothing is lost.
    await h.call("link", up=True)
    h.ack = False
    res = await h.call("stats")
    assert res["status"]["stats_pending"] == 1
    saved = json.loads((topo.tmp / "state" / "router" / "router-stats.json").read_text())
    assert len(saved["pending"]) == 1
    # More traffic, then the manager acks: both batches arrive, each once.
    out = await topo.curl("g1", f"http://{PUB_GW}:9000/", "--data-binary", f"@{body}")
    h.ack = True
    h.requests.clear()
    res = await h.call("stats")
    assert res["status"]["stats_pending"] == 0
    assert len(h.requests) == 1
    batches = h.requests[0]["params"]["batches"]
    assert len(batches) == 2 and len({b["id"] for b in batches}) == 2
    first, second = (b["bytes"] for b in batches)
    # Bytes out of the source NAT IP: the payload plus TCP/IP and HTTP overhead.
    for d in (first, second):
        out_bytes = d[SNAT_IP][1]
        assert n <= out_bytes <= n * 1.06 + 20_000, d
        assert d[SNAT_IP][0] < 100_000  # the acks coming back
    assert 0 < first[STATIC_IP][0] < 10_000 and 0 < first[STATIC_IP][1] < 10_000
    assert STATIC_IP not in second

    # Nothing new → nothing sent, nothing counted twice.
    h.requests.clear()
    res = await h.call("stats")
    assert res["status"]["stats_pending"] == 0 and h.requests == []

    # Periodic sending: router.stats.interval > 0 makes the role send on its own.
    cfg = base_config()
    cfg["router"]["stats"]["interval"] = 0.3
    assert (await h.apply(cfg))["ok"]
    await topo.curl("g1", f"http://{PUB_GW}:9000/", "--data-binary", f"@{body}")

    async def sent_by_itself() -> bool:
        await h.call("status")  # relays any request the role made meanwhile
        return any(
            b["bytes"].get(SNAT_IP, [0, 0])[1] >= n
            for r in h.requests
            for b in r["params"]["batches"]
        )

    await wait_for(sent_by_itself, "a periodic router.stats request", timeout=10)
    await h.stop()


async def test_a_crashed_daemon_is_restarted(topo: Topology) -> None:
    h = await bring_up(topo)
    pids = (await h.call("status"))["status"]["pids"]
    os.kill(pids["dnsmasq"], signal.SIGKILL)
    # apache's master killed alone leaves workers holding port 80: the whole group goes.
    os.kill(pids["apache"], signal.SIGKILL)

    async def back() -> bool:
        st = (await h.call("status"))["status"]
        return (
            st["daemons"] == {d: "running" for d in ("dnsmasq", "haproxy", "apache", "sshd")}
            and st["pids"]["dnsmasq"] not in (None, pids["dnsmasq"])
            and st["pids"]["apache"] not in (None, pids["apache"])
        )

    await wait_for(back, "dnsmasq and apache restarted", timeout=15)
    dig = ["dig", "+short", "+time=1", "+tries=2", f"@{GUEST_GW}"]
    assert (await topo.x("g1", *dig, "g2")).strip() == G2[1]
    assert await topo.curl("g2", f"http://{GUEST_GW}/latest/user-data") == "g2 data"

    # The agent itself crashes (its daemons survive, holding their ports); the next agent
    # kills them (found by their config path) and starts its own.
    old = (await h.call("status"))["status"]["pids"]
    h.proc.send_signal(signal.SIGKILL)
    await h.proc.wait()
    survivors = {n for n, p in old.items() if _alive(p)}
    assert {"dnsmasq", "haproxy", "sshd"} <= survivors, survivors  # holding their ports
    h2 = await Harness.spawn(topo)
    res = await h2.call("start", applied=base_config())
    assert res["ok"] and res["status"]["error"] == "", res
    assert not any(_alive(p) for p in old.values())
    assert set(res["status"]["pids"].values()).isdisjoint(old.values())
    await core_traffic_works(topo)
    await h2.stop()


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for the slow reaper of this machine's PID 1)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
