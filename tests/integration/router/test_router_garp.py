"""Gratuitous ARP: a replacement router takes over its addresses at once. Peers whose ARP
cache still names another MAC for the router's guest gateway or public IPs (as after a
rolling replacement) learn the router's real MAC when the manager bumps ``announce``,
and when an address is newly added. See conftest.py for the topology."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.roles.router import garp
from tests.integration.router.conftest import (
    CTL_IP,
    GUEST_GW,
    LB_IP,
    SNAT_IP,
    Harness,
    Topology,
    base_config,
    wait_for,
)

pytestmark = pytest.mark.integration

OLD_MAC = "02:00:00:00:00:99"  # "the old router"
NEW_IP = "198.51.100.13"
ROUNDS = len(garp.SCHEDULE)


async def _mac(topo: Topology, dev: str) -> str:
    return (await topo.x("vr", "cat", f"/sys/class/net/{dev}/address")).strip()


async def _neigh(topo: Topology, ns: str, ip: str) -> str | None:
    out = json.loads(await topo.x(ns, "ip", "-j", "neigh", "show", ip, "dev", "eth0") or "[]")
    return out[0].get("lladdr") if out else None


async def _learns(topo: Topology, ns: str, ip: str, mac: str) -> None:
    async def now() -> bool:
        return await _neigh(topo, ns, ip) == mac

    await wait_for(now, f"{ns} to learn {ip} is at {mac}")


async def _poison(topo: Topology, ns: str, ip: str) -> None:
    """The peer believes ``ip`` is at the old router's MAC (a fresh, reachable entry:
    within its ARP locktime a plain ARP update would be ignored; a gratuitous one is not)."""
    await topo.x(
        ns, "ip", "neigh", "replace", ip, "dev", "eth0", "lladdr", OLD_MAC, "nud", "reachable"
    )
    assert await _neigh(topo, ns, ip) == OLD_MAC


async def _settled(h: Harness) -> dict[str, Any]:
    """Status once every round of announcements has gone out."""
    status: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal status
        status = (await h.call("status"))["status"]
        return status["garp_pending"] == 0

    await wait_for(done, "announcements sent")
    return status


async def test_announce_and_new_addresses_update_peers_arp_caches(topo: Topology) -> None:
    h = await Harness.spawn(topo)
    assert (await h.call("start", applied=None))["ok"]
    cfg = base_config()
    res = await h.apply(cfg)
    assert res["ok"], res
    # First apply (a boot): every guest and public address was added, so announced.
    st = await _settled(h)
    assert st["garp_sent"] == (1 + 3) * 2 * ROUNDS, st  # gateway + 3 public IPs, 2 forms
    guest_mac, pub_mac = await _mac(topo, "gst0"), await _mac(topo, "pub0")

    # Peers that still point at the old router's MAC.
    await _poison(topo, "g2", GUEST_GW)
    await _poison(topo, "pc", LB_IP)
    await _poison(topo, "pc", SNAT_IP)
    await _poison(topo, "mg", CTL_IP)

    # The same config again: nothing changes, nothing is announced.
    res = await h.apply(cfg)
    assert res["ok"] and res["status"]["last_actions"] == {}, res
    assert (await _settled(h))["garp_sent"] == st["garp_sent"]
    assert await _neigh(topo, "g2", GUEST_GW) == OLD_MAC

    # The manager bumps the generation (after destroying the old router): every guest
    # and public address is announced, and the peers switch to our MAC.
    cfg["router"]["announce"] = 1
    res = await h.apply(cfg)
    assert res["ok"], res
    assert res["status"]["last_actions"] == {} and res["status"]["last_restored"] == [], res
    for ns, ip, mac in (
        ("g2", GUEST_GW, guest_mac),
        ("pc", LB_IP, pub_mac),
        ("pc", SNAT_IP, pub_mac),
    ):
        await _learns(topo, ns, ip, mac)
    st2 = await _settled(h)
    assert st2["garp_sent"] - st["garp_sent"] == (1 + 3) * 2 * ROUNDS
    assert await _neigh(topo, "mg", CTL_IP) == OLD_MAC  # the control NIC is never announced

    # A config change adding a public IP announces that one only.
    await _poison(topo, "pc", NEW_IP)
    await _poison(topo, "g2", GUEST_GW)
    cfg["router"]["interfaces"]["public"]["ips"].append(NEW_IP)
    res = await h.apply(cfg)
    assert res["ok"], res
    await _learns(topo, "pc", NEW_IP, pub_mac)
    st3 = await _settled(h)
    assert st3["garp_sent"] - st2["garp_sent"] == 1 * 2 * ROUNDS
    assert await _neigh(topo, "g2", GUEST_GW) == OLD_MAC
    await h.stop()
