"""System VMs' public NIC: the pure parts (NIC plan, boot data) and the allocator that
shares the zone's public pool with routers' public IPs (on a real store)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from manager.bootstrap import ensure_initialized
from manager.hypervisor.base import bridge_name, validate_spec
from manager.hypervisor.lifecycle import boot_extra, control_address, public_nic, vm_spec
from manager.network import store as ns
from manager.network.model import PublicIp
from manager.network.validate import NetError
from manager.settings import Settings
from manager.store.base import Role, SystemVm, VmState, Zone
from manager.store.sqlite import SqliteStore

PUBLIC = "100.64.7.0/24"


def zone(public_cidr: str = PUBLIC) -> Zone:
    return Zone("z1", "z1", "Enabled", "Advanced", "8.8.8.8", "10.0.0.2", public_cidr, "",
                "169.254.0.0/16", 0)  # fmt: skip


def vm(role: Role = Role.CONSOLE_PROXY, public_ip: str | None = "100.64.7.5") -> SystemVm:
    return SystemVm(
        id="vm1", seq=3, name="v-3-VM", role=role, zone_id="z1", pod_id=None,
        host_id=None, state=VmState.STARTING, template_id=None, hypervisor="Embedded",
        public_ip=public_ip, private_ip=None, linklocal_ip=None, desired_version=1,
        applied_version=0, agent_version=None, image_version=None, last_seen=None, created=0,
    )  # fmt: skip


@pytest.mark.parametrize("role", [Role.CONSOLE_PROXY, Role.SECONDARY_STORAGE])
def test_cpvm_and_ssvm_get_eth1_on_the_public_bridge(role: Role) -> None:
    spec = vm_spec(vm(role), zone(), {}, "sv")
    validate_spec(spec)
    control, public = spec.nics
    assert control.kind == "control" and not control.default_route
    assert public.kind == "public"
    assert public.bridge == bridge_name("sv", "z1", "public") != control.bridge
    assert public.address == "100.64.7.5/24"
    assert public.gateway == "100.64.7.1" and public.bridge_address == "100.64.7.1/24"
    assert public.default_route


def test_no_public_nic_without_address_range_or_for_routers() -> None:
    assert public_nic(vm(public_ip=None), zone(), "sv") is None
    assert public_nic(vm(), zone(""), "sv") is None
    assert public_nic(vm(public_ip="100.64.8.5"), zone(), "sv") is None  # not in the range
    assert public_nic(vm(Role.ROUTER), zone(), "sv") is None  # routers: their own NIC plan
    assert [n.kind for n in vm_spec(vm(public_ip=None), zone(), {}, "sv").nics] == ["control"]


def test_console_proxy_listens_on_its_public_ip() -> None:
    assert boot_extra(vm(), zone()) == {"listen_host": "100.64.7.5"}
    control = control_address("169.254.0.0/16", 3)[0].split("/")[0]
    assert boot_extra(vm(public_ip=None), zone()) == {"listen_host": control}
    assert boot_extra(vm(Role.SECONDARY_STORAGE), zone()) == {}


# ---------------------------------------------------------------- the shared pool


@dataclass
class Ctx:
    home: Path
    store: SqliteStore
    settings: Settings
    clock: Callable[[], float] = time.time
    api_url: str = "http://127.0.0.1:18080/client/api"


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[Ctx]:
    store = await SqliteStore.open(tmp_path / "home" / "sysvm.db")
    try:
        c = Ctx(tmp_path / "home", store, Settings(store))
        await ensure_initialized(c)
        yield c
    finally:
        await store.close()


async def test_system_vms_and_routers_share_the_public_pool(ctx: Ctx) -> None:
    (z,) = await ctx.store.list_zones()
    z = replace(z, public_cidr="100.64.9.0/29")  # hosts .1 (gateway) to .6
    async with ctx.store.transaction() as tx:
        await tx.execute("UPDATE zones SET public_cidr = ?", (z.public_cidr,))
        cp = await tx.create_system_vm(role=Role.CONSOLE_PROXY, zone_id=z.id, hypervisor="x")
        ss = await tx.create_system_vm(role=Role.SECONDARY_STORAGE, zone_id=z.id, hypervisor="x")
        # a public IP the network part holds (as a router's source NAT would)
        await ns.add_public_ip(tx, PublicIp(
            id=ns.new_id(), zone_id=z.id, address="100.64.9.2", network_id=None,
            is_source_nat=False, static_nat_vm_id=None, static_nat_ip=None,
            account_id="a", allocated=0,
        ))  # fmt: skip
        a = await ns.allocate_system_public_ip(tx, z, cp.id)
        b = await ns.allocate_system_public_ip(tx, z, ss.id)
        again = await ns.allocate_system_public_ip(tx, z, cp.id)
    assert (a, b, again) == ("100.64.9.3", "100.64.9.4", a)
    for vid, addr in ((cp.id, a), (ss.id, b)):
        got = await ctx.store.get_system_vm(vid)
        assert got is not None and got.public_ip == addr
        assert ipaddress.ip_address(addr) in ipaddress.ip_network(z.public_cidr)
    assert await ns.used_public_addresses(ctx.store, z.id) == {"100.64.9.2", a, b}

    # destroyed: its address goes back to the pool
    async with ctx.store.transaction() as tx:
        await tx.update_system_vm(cp.id, state=VmState.DESTROYED, public_ip=None)
        new = await tx.create_system_vm(role=Role.CONSOLE_PROXY, zone_id=z.id, hypervisor="x")
        assert await ns.allocate_system_public_ip(tx, z, new.id) == a
        others = [
            await tx.create_system_vm(role=Role.CONSOLE_PROXY, zone_id=z.id, hypervisor="x")
            for _ in range(3)
        ]
        assert await ns.allocate_system_public_ip(tx, z, others[0].id) == "100.64.9.5"
        assert await ns.allocate_system_public_ip(tx, z, others[1].id) == "100.64.9.6"
        with pytest.raises(NetError):
            await ns.allocate_system_public_ip(tx, z, others[2].id)


def test_console_proxy_on_the_host_network_listens_on_loopback() -> None:
    # a driver that plugs no NICs (process driver without namespaces): no address of the
    # spec exists in the VM, so loopback and a free port (the proxy reports which)
    assert boot_extra(vm(), zone(), host_network=True) == {
        "listen_host": "127.0.0.1",
        "listen_port": 0,
    }
    assert boot_extra(vm(Role.SECONDARY_STORAGE), zone(), host_network=True) == {}
