"""Routers' NICs and sizing (pure): the network part's NIC plan becomes the hypervisor's
NicSpecs (eth{i} = plan[i]), guest NICs on a per-network bridge without a host address,
memory/CPUs from the router's service offering; naming and cleanup rules of guest bridges;
nspawn's environment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from manager.hypervisor.base import (
    DriverError,
    boot_data_for,
    bridge_name,
    guest_bridge_name,
    is_guest_bridge,
    is_vm_port,
    tap_name,
    validate_spec,
    veth_name,
)
from manager.hypervisor.cleanup import owned_link
from manager.hypervisor.lifecycle import (
    DEFAULT_CPUS,
    DEFAULT_MEMORY_MB,
    router_nics,
    router_sizing,
    vm_spec,
)
from manager.hypervisor.nspawn import nspawn_env
from manager.store.base import Role, SystemVm, VmState, Zone

NET = "7d3e5a2b-1c4f-4e8a-9b6d-0a1b2c3d4e5f"
PLAN: list[dict[str, Any]] = [
    {"kind": "control", "address": "169.254.7.9/24", "gateway": None,
     "default_route": False, "network_id": None},
    {"kind": "public", "address": "100.64.7.2/24", "gateway": "100.64.7.1",
     "default_route": True, "network_id": None},
    {"kind": "guest", "address": "10.250.3.1/24", "gateway": None,
     "default_route": False, "network_id": NET},
]  # fmt: skip


def zone() -> Zone:
    return Zone("z1", "z1", "Enabled", "Advanced", "8.8.8.8", "10.0.0.2", "100.64.7.0/24", "",
                "169.254.7.0/24", 0)  # fmt: skip


def router() -> SystemVm:
    return SystemVm(
        id="r1", seq=9, name="r-9-VM", role=Role.ROUTER, zone_id="z1", pod_id=None,
        host_id=None, state=VmState.STARTING, template_id=None, hypervisor="Embedded",
        public_ip="100.64.7.2", private_ip="10.250.3.1", linklocal_ip="169.254.7.9",
        desired_version=1, applied_version=0, agent_version=None, image_version=None,
        last_seen=None, created=0,
    )  # fmt: skip


def test_router_nics_follow_the_plan_in_device_order() -> None:
    control, public, guest = router_nics(PLAN, zone(), "sv")
    assert control.kind == "control" and control.bridge == bridge_name("sv", "z1", "control")
    assert control.address == "169.254.7.9/24" and control.bridge_address == "169.254.7.1/24"
    assert public.bridge == bridge_name("sv", "z1", "public")
    assert public.address == "100.64.7.2/24" and public.gateway == "100.64.7.1"
    assert public.bridge_address == "100.64.7.1/24" and public.default_route
    # the guest NIC: its network's own bridge, no host address, the router is the gateway
    assert guest.bridge == guest_bridge_name("sv", NET) and guest.bridge_address is None
    assert guest.address == "10.250.3.1/24" and guest.gateway is None
    assert not guest.default_route and not control.default_route


def test_a_shared_network_plan_without_public_nic_is_taken_as_is() -> None:
    plan = [PLAN[0], PLAN[2]]  # eth0 control, eth1 guest
    nics = router_nics(plan, zone(), "sv")
    assert [n.kind for n in nics] == ["control", "guest"]
    spec = vm_spec(router(), zone(), {"vm_id": "r1"}, "sv", nic_plan=plan)
    validate_spec(spec)
    assert [(n["name"], n["kind"]) for n in boot_data_for(spec)["extra"]["nics"]] == [
        ("eth0", "control"), ("eth1", "guest")]  # fmt: skip


def test_router_spec_boot_data_lists_every_nic_and_sizing() -> None:
    spec = vm_spec(router(), zone(), {"vm_id": "r1"}, "sv", 256, 2, PLAN)
    validate_spec(spec)
    assert (spec.memory_mb, spec.cpus) == (256, 2)
    nics = boot_data_for(spec)["extra"]["nics"]
    assert [(n["name"], n["kind"], n["address"]) for n in nics] == [
        ("eth0", "control", "169.254.7.9/24"),
        ("eth1", "public", "100.64.7.2/24"),
        ("eth2", "guest", "10.250.3.1/24"),
    ]
    assert nics[1]["default_route"] and nics[1]["gateway"] == "100.64.7.1"
    assert len({n["mac"] for n in nics}) == 3
    # without a plan (a driver that plugs nothing): the control NIC only, as before
    assert [n.kind for n in vm_spec(router(), zone(), {}, "sv").nics] == ["control"]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"kind": "public", "address": "None/24"}, "not ADDR/PREFIX"),
        ({"kind": "guest", "address": "10.0.0.1/24"}, "network_id"),
        ({"kind": "bogus", "address": "10.0.0.1/24"}, "unknown NIC kind"),
    ],
)
def test_unpluggable_plans_are_clear_errors(entry: dict[str, Any], problem: str) -> None:
    with pytest.raises(DriverError, match=problem):
        router_nics([PLAN[0], entry], zone(), "sv")


@dataclass
class Offering:
    id: str
    memory_mb: int
    cpu_number: int


def test_router_sizing_from_its_offering() -> None:
    offerings = [Offering("small", 128, 1), Offering("big", 1024, 4)]
    assert router_sizing(offerings, "big") == (1024, 4)
    assert router_sizing(offerings, "gone") == (DEFAULT_MEMORY_MB, DEFAULT_CPUS)
    assert router_sizing(offerings, None) == (DEFAULT_MEMORY_MB, DEFAULT_CPUS)
    assert router_sizing([Offering("tiny", 16, 0)], "tiny") == (64, 1)  # bootable minimum


def test_guest_bridge_names_and_cleanup_rules() -> None:
    name = guest_bridge_name("t12345r", NET)
    assert len(name) <= 15 and name.startswith("t12345rg") and name.endswith("b")
    assert name == guest_bridge_name("t12345r", NET) != guest_bridge_name("t12345r", NET + "x")
    assert is_guest_bridge("t12345r", name) and owned_link("t12345r", name)
    assert not is_guest_bridge("t12345r", bridge_name("t12345r", "z", "public"))
    assert not owned_link("t1234", name)
    # what keeps a guest bridge: VM ports of the prefix, not anything else plugged in
    assert is_vm_port("sv", veth_name("sv", "vm", 2)) and is_vm_port("sv", tap_name("sv", "v", 0))
    assert not is_vm_port("sv", "svxg") and not is_vm_port("sv", name)
    assert not is_vm_port("s", veth_name("sv", "vm", 2))


def test_nspawn_network_sysctls_writable_only_in_its_own_namespace() -> None:
    base = {"PATH": "/usr/bin", "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "1"}
    assert nspawn_env("sv-abc123", base) == {
        "PATH": "/usr/bin", "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}  # fmt: skip
    assert nspawn_env(None, base) == {"PATH": "/usr/bin"}
