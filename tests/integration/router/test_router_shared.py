"""A Shared network's router: no public NIC, its own address in the range, the provider's
gateway (another namespace) is the guests' gateway. The router serves DHCP, DNS and
userdata only, and routes nothing. See conftest.py (``shared_topo``) for the topology."""

from __future__ import annotations

import json

import pytest

from tests.integration.router.conftest import (
    BEHIND,
    DOMAIN,
    HERE,
    PY,
    S1,
    S2,
    SH_GW,
    SH_ME,
    Harness,
    Topology,
    dhcp,
    shared_config,
    wait_for,
)

pytestmark = pytest.mark.integration

DIG = ["dig", "+short", "+time=1", "+tries=2", f"@{SH_ME}"]


async def _upstream(topo: Topology) -> None:
    """Behind the gateway: a DNS server that knows upstream.example, and a web server."""
    await topo.spawn(
        "gw",
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--pid-file=",
        "--log-facility=-",
        "--bind-interfaces",
        f"--listen-address={BEHIND}",
        "--address=/upstream.example/100.64.12.7",
    )
    await topo.spawn("gw", PY, str(HERE / "peer_http.py"), "behind", BEHIND, "9000")

    async def up() -> bool:
        listening = await topo.x("gw", "ss", "-lnH")
        return f"{BEHIND}:53" in listening and f"{BEHIND}:9000" in listening

    await wait_for(up, "upstream DNS and HTTP behind the gateway")


async def test_shared_router_serves_dhcp_dns_userdata_and_routes_nothing(
    shared_topo: Topology,
) -> None:
    topo = shared_topo
    await _upstream(topo)
    h = await Harness.spawn(topo)
    assert (await h.call("start", applied=None))["ok"]
    res = await h.apply(shared_config())
    assert res["ok"], res

    # The router holds its own address (not the gateway's), its default route points at
    # the provider's gateway, and it does not forward.
    addrs = json.loads(await topo.x("vr", "ip", "-j", "-4", "addr", "show", "dev", "gst0"))
    assert [f"{a['local']}/{a['prefixlen']}" for a in addrs[0]["addr_info"]] == [f"{SH_ME}/24"]
    routes = json.loads(await topo.x("vr", "ip", "-j", "route", "show", "default"))
    assert [(r["gateway"], r["dev"]) for r in routes] == [(SH_GW, "gst0")]
    assert (await topo.x("vr", "cat", "/proc/sys/net/ipv4/ip_forward")).strip() == "0"
    assert await topo.curl("vr", f"http://{BEHIND}:9000/") == f"behind {SH_ME}\n"
    # No public side: nothing in nat or mangle but our empty chains.
    nat = await topo.x("vr", "iptables-save", "-t", "nat")
    mangle = await topo.x("vr", "iptables-save", "-t", "mangle")
    assert ":SVM-PREROUTING - [0:0]" in nat and not [x for x in nat.split("\n") if "-A SVM" in x]
    assert not [x for x in mangle.split("\n") if "-A SVM" in x]

    # DHCP: the lease's router option is the provider's gateway; DNS is the router.
    for g, (_mac, ip, _name) in (("g1", S1), ("g2", S2)):
        lease = await dhcp(topo, g)
        assert lease["ip"] == ip and lease["router"] == SH_GW, lease
        assert lease["dns"] == SH_ME and lease["domain"] == DOMAIN, lease
        routes = json.loads(await topo.x(g, "ip", "-j", "route", "show", "default"))
        assert [r["gateway"] for r in routes] == [SH_GW]

    # DNS on the router's address: guest names, and anything else forwarded upstream
    # (which the router reaches only through its default route via the gateway).
    assert (await topo.x("g1", *DIG, f"s2.{DOMAIN}")).strip() == S2[1]
    assert (await topo.x("g2", *DIG, "s1")).strip() == S1[1]
    assert (await topo.x("g1", *DIG, "upstream.example")).strip() == "100.64.12.7"

    # Userdata / metadata from the router's address, chosen by the guest's source IP.
    assert await topo.curl("g1", f"http://{SH_ME}/latest/user-data") == (
        "#cloud-config\nhostname: s1\n"
    )
    assert await topo.curl("g2", f"http://{SH_ME}/latest/user-data") == "s2 data"
    assert await topo.curl("g2", f"http://{SH_ME}/latest/meta-data/instance-id") == "i-s2"

    # Guests go out through the gateway; through the router nothing passes.
    assert await topo.curl("g1", f"http://{BEHIND}:9000/") == f"behind {S1[1]}\n"
    await topo.x("g2", "ip", "route", "replace", f"{BEHIND}/32", "via", SH_ME)
    assert not await topo.reachable("g2", f"http://{BEHIND}:9000/")
    await topo.x("g2", "ip", "route", "del", f"{BEHIND}/32")
    assert await topo.reachable("g2", f"http://{BEHIND}:9000/")

    # Applying the same config again changes nothing and announces nothing.
    st = (await h.call("status"))["status"]
    res = await h.apply(shared_config())
    assert res["ok"], res
    st2 = res["status"]
    assert st2["last_actions"] == {} and st2["last_restored"] == [], st2
    assert st2["pids"] == st["pids"] and st2["garp_sent"] == st["garp_sent"], (st, st2)

    # Traffic stats: no public IPs, nothing to count, nothing sent.
    h.requests.clear()
    res = await h.call("stats")
    assert res["ok"] and res["status"]["stats_pending"] == 0, res
    assert h.requests == []
    await h.stop()
