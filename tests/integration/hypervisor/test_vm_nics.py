"""VM NICs on the host, with the process driver (real namespaces, veths, bridges): every boot
gets a fresh network namespace (nothing of a previous boot survives), a stopped VM holds no
NIC, and a per-network guest bridge lives as long as a VM port is on it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from manager import netplumb
from manager.hypervisor.base import (
    NicSpec,
    PowerState,
    VmSpec,
    bridge_name,
    guest_bridge_name,
    netns_name,
    veth_name,
)
from manager.hypervisor.cleanup import cleanup_all, leftovers
from manager.hypervisor.process import ProcessDriver

# a stand-in agent: lives until SIGTERM (the driver appends --bootdata/--state-dir)
STUB = [sys.executable, "-c", "import time\nwhile True: time.sleep(60)"]
ZONE = "zone-nics"


@pytest.fixture
async def prefix(netns_prefix: str) -> AsyncIterator[str]:
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root (CI runs as root)")
    p = f"{netns_prefix}q"
    await cleanup_all(p)
    yield p
    rep = await cleanup_all(p)
    rep.links = [x for x in rep.links if x[len(p)] != "b"]  # zone bridges outlive VMs
    assert rep.empty(), f"left behind: {rep}"


def spec(prefix: str, vm_id: str, seq: int, network_id: str) -> VmSpec:
    net = 50 + os.getpid() % 150
    boot = {"vm_id": vm_id, "name": f"r-{seq}-VM", "role": "domainrouter", "zone_id": ZONE}
    return VmSpec(
        vm_id=vm_id,
        name=f"r-{seq}-VM",
        role="domainrouter",
        boot_data=boot,
        nics=(
            NicSpec(
                "control",
                bridge_name(prefix, ZONE, "control"),
                f"169.254.{net}.{seq}/24",
                bridge_address=f"169.254.{net}.1/24",
            ),
            NicSpec("guest", guest_bridge_name(prefix, network_id), "10.249.0.1/24"),
        ),
    )


async def ports(bridge: str) -> list[str]:
    return sorted(await netplumb.bridge_ports(bridge))


async def test_fresh_namespace_per_boot_and_guest_bridge_lifetime(
    tmp_path: Path, prefix: str
) -> None:
    drv = ProcessDriver(tmp_path / "vms", prefix, agent=STUB)
    network = str(uuid.uuid4())
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    sa, sb = spec(prefix, a, 2, network), spec(prefix, b, 3, network)
    gbr = guest_bridge_name(prefix, network)
    ns = netns_name(prefix, a)
    foreign_ns = f"{prefix}-fgn"
    try:
        await drv.start(sa)
        await drv.start(sb)
        assert await ports(gbr) == sorted([veth_name(prefix, a, 1), veth_name(prefix, b, 1)])
        addrs = json.loads(await netplumb.run(["ip", "-j", "addr", "show", "dev", gbr]))
        assert [x for x in addrs[0]["addr_info"] if x["family"] == "inet"] == []
        out = json.loads(await netplumb.run(["ip", "-n", ns, "-j", "addr", "show", "eth1"]))
        assert out[0]["addr_info"][0]["local"] == "10.249.0.1"

        # state a previous boot leaves behind: an address, a firewall rule
        await netplumb.run(["ip", "-n", ns, "addr", "add", "10.9.9.9/32", "dev", "lo"])
        await netplumb.run(["ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-j", "DROP"])

        # a stopped VM holds no NIC on the host: namespace and veths are gone
        await drv.stop(a, timeout=10)
        assert await drv.state(a) is PowerState.STOPPED
        assert not os.path.exists(f"/run/netns/{ns}")
        assert not await netplumb.link_exists(veth_name(prefix, a, 0))
        assert await ports(gbr) == [veth_name(prefix, b, 1)]  # the guest bridge stays

        # booted again: same NICs (MACs, addresses), a fresh stack without the old state
        await drv.start(sa)
        lo = await netplumb.run(["ip", "-n", ns, "-4", "addr", "show", "dev", "lo"])
        assert "10.9.9.9" not in lo
        rules = await netplumb.run(["ip", "netns", "exec", ns, "iptables", "-S", "INPUT"])
        assert "DROP" not in rules.replace("-P INPUT ACCEPT", "")
        link = json.loads(await netplumb.run(["ip", "-n", ns, "-j", "link", "show", "eth1"]))
        assert link[0]["address"] == sa.nics[1].mac or link[0]["address"].startswith("1e:")

        # something that is no VM of ours plugged into the guest bridge
        await netplumb.run(["ip", "netns", "add", foreign_ns])
        await netplumb.run(["ip", "link", "add", f"{prefix}xf", "type", "veth", "peer", "name",
                            "eth0", "netns", foreign_ns])  # fmt: skip
        await netplumb.run(["ip", "link", "set", f"{prefix}xf", "master", gbr, "up"])

        # destroying one VM keeps the bridge while another VM's port is on it ...
        await drv.destroy(a)
        assert await netplumb.link_exists(gbr)
        assert await ports(gbr) == sorted([f"{prefix}xf", veth_name(prefix, b, 1)])
        # ... the last VM's destroy removes it (the foreign port does not keep it)
        await drv.destroy(b)
        assert not await netplumb.link_exists(gbr)
        assert await netplumb.link_exists(bridge_name(prefix, ZONE, "control"))  # zone bridge
    finally:
        for vm in (a, b):
            await drv.destroy(vm)
        await drv.close()
        await netplumb.run(["ip", "netns", "del", foreign_ns], check=False)
    left = await leftovers(prefix)
    assert not left.processes and not left.netns, left


async def test_concurrent_plug_and_release_never_lose_the_bridge(
    tmp_path: Path, prefix: str
) -> None:
    """A VM starting on a guest bridge while another VM of it is destroyed: the bridge is
    never removed under the VM being plugged (both hold the bridge's lock)."""
    drv = ProcessDriver(tmp_path / "vms", prefix, agent=STUB)
    network = str(uuid.uuid4())
    vms = [str(uuid.uuid4()) for _ in range(4)]
    specs = [spec(prefix, vm, i + 2, network) for i, vm in enumerate(vms)]
    gbr = guest_bridge_name(prefix, network)
    try:
        await drv.start(specs[0])
        for _ in range(3):
            await asyncio.gather(drv.destroy(vms[0]), drv.start(specs[1]))
            assert await ports(gbr) == [veth_name(prefix, vms[1], 1)]
            vms[0], vms[1] = vms[1], vms[0]
            specs[0], specs[1] = specs[1], specs[0]
    finally:
        for vm in vms:
            await drv.destroy(vm)
        await drv.close()
    assert not await netplumb.link_exists(gbr)
