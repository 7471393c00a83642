"""``sysvm-manager external-bootdata``: which VMs get boot data (pure)."""

from __future__ import annotations

import pytest

from manager.app import ConfigError
from manager.main import pick_external
from manager.store.base import Role, VmState
from tests.unit.link.test_link_pure import vm

FLEET = [
    vm(id="r1", name="r-1-VM", role=Role.ROUTER),
    vm(id="r2", name="r-2-VM", role=Role.ROUTER, zone_id="z2"),
    vm(id="r3", name="r-3-VM", role=Role.ROUTER, state=VmState.DESTROYED),
    vm(id="r4", name="r-4-VM", role=Role.ROUTER, hypervisor="Embedded"),
    vm(id="s1", name="s-1-VM"),
]


def ids(vms: list[object]) -> list[str]:
    return [v.id for v in vms]  # type: ignore[attr-defined]


def test_only_live_external_vms_matching_every_filter() -> None:
    assert ids(pick_external(FLEET, None, None, [])) == ["r1", "r2", "s1"]
    assert ids(pick_external(FLEET, Role.ROUTER, None, [])) == ["r1", "r2"]
    assert ids(pick_external(FLEET, Role.ROUTER, "z1", [])) == ["r1"]
    assert ids(pick_external(FLEET, None, None, ["s1", "r2"])) == ["r2", "s1"]
    assert ids(pick_external(FLEET, Role.CONSOLE_PROXY, None, [])) == []


@pytest.mark.parametrize(
    ("wanted", "message"),
    [
        ("nope", "no VM with id 'nope'"),
        ("r3", "VM r-3-VM is Destroyed"),
        ("r4", "VM r-4-VM runs on the Embedded hypervisor"),
    ],
)
def test_a_named_vm_that_cannot_get_boot_data_is_refused_by_name(wanted: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        pick_external(FLEET, None, None, ["r1", wanted])
