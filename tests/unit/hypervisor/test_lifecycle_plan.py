"""The lifecycle planner: plain data in, actions out (no loop, no I/O)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from manager.hypervisor.base import DriverError, PowerState
from manager.hypervisor.lifecycle import (
    Kind,
    Observed,
    PlanSettings,
    control_address,
    plan,
    restart_reason,
    vm_spec,
)
from manager.store.base import Role, SystemVm, VmState, Zone

NOW = 10_000.0
S = PlanSettings(agent_timeout=150, start_timeout=300, settle=120)


def zone(zid: str = "z1", state: str = "Enabled") -> Zone:
    return Zone(zid, zid, state, "Advanced", "8.8.8.8", "10.0.0.2", "", "", "169.254.0.0/16", 0)


def vm(
    vid: str,
    role: Role = Role.CONSOLE_PROXY,
    state: VmState = VmState.RUNNING,
    zone_id: str = "z1",
    last_seen: float | None = NOW - 5,
    seq: int = 1,
    created: float = NOW - 1000,
    hypervisor: str = "Embedded",
) -> SystemVm:
    return SystemVm(
        id=vid, seq=seq, name=f"v-{seq}-VM", role=role, zone_id=zone_id, pod_id=None,
        host_id=None, state=state, template_id=None, hypervisor=hypervisor, public_ip=None,
        private_ip=None, linklocal_ip=None, desired_version=1, applied_version=1,
        agent_version=None, image_version=None, last_seen=last_seen, created=created,
    )  # fmt: skip


def healthy_pair(zone_id: str = "z1") -> list[SystemVm]:
    return [
        vm(f"cp-{zone_id}", Role.CONSOLE_PROXY, zone_id=zone_id),
        vm(f"ss-{zone_id}", Role.SECONDARY_STORAGE, zone_id=zone_id, seq=2),
    ]


def kinds(actions: list) -> list[tuple[str, str, str | None]]:  # type: ignore[type-arg]
    return sorted((a.kind.value, a.role.value, a.vm_id) for a in actions)


def test_empty_enabled_zone_gets_one_cpvm_and_one_ssvm() -> None:
    assert kinds(plan([zone()], [], NOW, S)) == [
        ("create", "consoleproxy", None),
        ("create", "secondarystorage", None),
    ]


def test_disabled_zone_gets_nothing_and_healthy_zone_needs_nothing() -> None:
    assert plan([zone(state="Disabled")], [], NOW, S) == []
    obs = Observed(connected=frozenset({"cp-z1", "ss-z1"}))
    assert plan([zone()], healthy_pair(), NOW, S, obs) == []


def test_each_zone_is_planned_on_its_own() -> None:
    acts = plan([zone("z1"), zone("z2")], healthy_pair("z1"), NOW, S)
    assert {(a.zone_id, a.kind) for a in acts} == {("z2", Kind.CREATE)}
    assert len(acts) == 2


def test_destroyed_vm_is_replaced_and_stopped_one_is_started_first() -> None:
    vms = [vm("cp", state=VmState.DESTROYED), vm("ss", Role.SECONDARY_STORAGE)]
    assert kinds(plan([zone()], vms, NOW, S)) == [("create", "consoleproxy", None)]
    vms = [vm("old", state=VmState.STOPPED, seq=3), vm("older", state=VmState.STOPPED, seq=1),
           vm("ss", Role.SECONDARY_STORAGE)]  # fmt: skip
    assert kinds(plan([zone()], vms, NOW, S)) == [("start", "consoleproxy", "older")]


def test_no_duplicate_create_while_one_is_in_flight() -> None:
    obs = Observed(last_create={("z1", "consoleproxy"): NOW - 10})
    assert kinds(plan([zone()], [vm("ss", Role.SECONDARY_STORAGE)], NOW, S, obs)) == []
    obs = Observed(last_create={("z1", "consoleproxy"): NOW - 500})
    assert kinds(plan([zone()], [vm("ss", Role.SECONDARY_STORAGE)], NOW, S, obs)) == [
        ("create", "consoleproxy", None)
    ]


def test_a_vm_in_error_or_stopping_blocks_a_new_create() -> None:
    vms = [vm("cp", state=VmState.STOPPING), vm("ss", Role.SECONDARY_STORAGE)]
    assert plan([zone()], vms, NOW, S) == []


@pytest.mark.parametrize(
    ("power", "expect"),
    [
        (PowerState.CRASHED, "vm process crashed"),
        (PowerState.ABSENT, "vm process absent"),
        (PowerState.RUNNING, ""),
    ],
)
def test_dead_process_means_restart(power: PowerState, expect: str) -> None:
    obs = Observed(power={"cp": power}, connected=frozenset({"cp"}))
    assert restart_reason(vm("cp"), NOW, S, obs) == expect


def test_silent_agent_is_restarted_after_the_timeout_only() -> None:
    obs = Observed(power={"cp": PowerState.RUNNING})
    assert restart_reason(vm("cp", last_seen=NOW - 100), NOW, S, obs) == ""
    assert restart_reason(vm("cp", last_seen=NOW - 200), NOW, S, obs) == "agent silent for 200 s"
    # connected agents are never "silent", whatever last_seen says (it is written coarsely)
    obs2 = Observed(power={"cp": PowerState.RUNNING}, connected=frozenset({"cp"}))
    assert restart_reason(vm("cp", last_seen=NOW - 9999), NOW, S, obs2) == ""
    acts = plan([zone()], [vm("cp", last_seen=NOW - 200), vm("ss", Role.SECONDARY_STORAGE)],
                NOW, S, Observed(connected=frozenset({"ss"})))  # fmt: skip
    assert kinds(acts) == [("restart", "consoleproxy", "cp")]


def test_starting_vm_gets_start_timeout_not_agent_timeout() -> None:
    starting = replace(
        vm("cp", state=VmState.STARTING, last_seen=None), details={"started_at": NOW - 200}
    )
    assert restart_reason(starting, NOW, S, Observed()) == ""
    late = replace(starting, details={"started_at": NOW - 301})
    assert "no agent hello" in restart_reason(late, NOW, S, Observed())


def test_starting_vm_with_connected_agent_is_marked_running() -> None:
    vms = [vm("cp", state=VmState.STARTING), vm("ss", Role.SECONDARY_STORAGE)]
    acts = plan([zone()], vms, NOW, S, Observed(connected=frozenset({"cp", "ss"})))
    assert kinds(acts) == [("mark_running", "consoleproxy", "cp")]


def test_settle_time_prevents_restart_storms() -> None:
    vms = [vm("cp", last_seen=NOW - 999), vm("ss", Role.SECONDARY_STORAGE)]
    conn = frozenset({"ss"})
    assert plan([zone()], vms, NOW, S, Observed(connected=conn, last_action={"cp": NOW - 30})) == []
    again = plan([zone()], vms, NOW, S, Observed(connected=conn, last_action={"cp": NOW - 121}))
    assert kinds(again) == [("restart", "consoleproxy", "cp")]


def test_error_vm_restarted_only_when_a_driver_knows_it() -> None:
    err = vm("cp", state=VmState.ERROR)
    assert (
        restart_reason(err, NOW, S, Observed(power={"cp": PowerState.STOPPED}))
        == "vm in Error state"
    )
    assert restart_reason(err, NOW, S, Observed()) == ""  # External: nobody to restart it


def test_control_address_and_spec() -> None:
    assert control_address("169.254.0.0/16", 1) == ("169.254.0.3/16", "169.254.0.1/16")
    assert control_address("169.254.7.0/24", 300)[0].startswith("169.254.7.")
    with pytest.raises(DriverError):
        control_address("169.254.0.0/31", 1)
    spec = vm_spec(vm("cp"), zone(), {"vm_id": "cp"}, "sv")
    assert spec.nics[0].kind == "control" and spec.nics[0].bridge.startswith("svb")
    assert spec.role == "consoleproxy" and spec.boot_data == {"vm_id": "cp"}


def test_console_proxy_boot_data_names_its_listen_address() -> None:
    from manager.hypervisor.lifecycle import boot_extra

    z = zone()
    cpvm = vm("c1", Role.CONSOLE_PROXY, seq=7)
    want = control_address(z.linklocal_cidr, 7)[0].split("/")[0]
    assert boot_extra(cpvm, z) == {"listen_host": want}
    assert boot_extra(replace(cpvm, role=Role.SECONDARY_STORAGE), z) == {}
