"""Pure parts of the system VM actions: request checks, planner coordination with the API
(busy VMs, settle after an API stop, crash restarts), image pins, the loop interval."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from manager.api.commands.sysvm_actions import check_request
from manager.api.commands.templates import visible
from manager.api.responses import ApiError
from manager.app import ConfigError, lifecycle_interval
from manager.hypervisor.base import PowerState
from manager.hypervisor.lifecycle import Kind, Observed, PlanSettings, image_pin, plan
from manager.store.base import Role, SystemVm, VmState, Zone

NOW = 10_000.0
S = PlanSettings(agent_timeout=150, start_timeout=300, settle=120, crash_settle=10)


def zone() -> Zone:
    return Zone("z1", "z1", "Enabled", "Advanced", "8.8.8.8", "10.0.0.2", "", "", "", 0)


def vm(
    vid: str,
    role: Role = Role.CONSOLE_PROXY,
    state: VmState = VmState.RUNNING,
    hypervisor: str = "Embedded",
    seq: int = 1,
) -> SystemVm:
    return SystemVm(
        id=vid, seq=seq, name=f"v-{seq}-VM", role=role, zone_id="z1", pod_id=None,
        host_id=None, state=state, template_id=None, hypervisor=hypervisor, public_ip=None,
        private_ip=None, linklocal_ip=None, desired_version=1, applied_version=1,
        agent_version=None, image_version=None, last_seen=NOW - 5, created=NOW - 1000,
    )  # fmt: skip


SSVM = vm("ss", Role.SECONDARY_STORAGE, seq=2)


def kinds(actions: list) -> list[tuple[str, str, str | None]]:  # type: ignore[type-arg]
    return sorted((a.kind.value, a.role.value, a.vm_id) for a in actions)


# ---------------------------------------------------------------- check_request


@pytest.mark.parametrize("state", [None, VmState.DESTROYED, VmState.EXPUNGING])
def test_unknown_or_destroyed_vm_is_a_431(state: VmState | None) -> None:
    target = None if state is None else vm("a", state=state)
    with pytest.raises(ApiError) as e:
        check_request("stopSystemVm", target, "a")
    assert e.value.errorcode == 431 and "Unable to find system vm by id a" in e.value.text


def test_routers_are_sent_to_the_router_commands() -> None:
    with pytest.raises(ApiError) as e:
        check_request("rebootSystemVm", vm("r", Role.ROUTER), "r")
    assert e.value.errorcode == 431 and "rebootRouter" in e.value.text


def test_external_vms_cannot_be_operated() -> None:
    with pytest.raises(ApiError) as e:
        check_request("startSystemVm", vm("x", hypervisor="External", state=VmState.STOPPED), "x")
    assert "External" in e.value.text


@pytest.mark.parametrize("state", [VmState.STOPPED, VmState.STARTING, VmState.ERROR])
def test_only_a_running_vm_reboots(state: VmState) -> None:
    with pytest.raises(ApiError) as e:
        check_request("rebootSystemVm", vm("a", state=state), "a")
    assert e.value.errorcode == 431 and state.value in e.value.text


def test_start_of_a_stopping_vm_is_refused_but_the_rest_pass() -> None:
    with pytest.raises(ApiError):
        check_request("startSystemVm", vm("a", state=VmState.STOPPING), "a")
    for cmd, state in (
        ("startSystemVm", VmState.STOPPED),
        ("startSystemVm", VmState.ERROR),
        ("startSystemVm", VmState.RUNNING),  # a no-op, as in CloudStack
        ("stopSystemVm", VmState.RUNNING),
        ("stopSystemVm", VmState.ERROR),
        ("rebootSystemVm", VmState.RUNNING),
        ("destroySystemVm", VmState.STOPPED),
        ("destroySystemVm", VmState.ERROR),
    ):
        check_request(cmd, vm("a", state=state), "a")


# ---------------------------------------------------------------- planner and the API


def test_a_vm_an_api_operation_works_on_is_left_alone() -> None:
    cp = vm("cp", state=VmState.STARTING)
    obs = Observed(
        power={"cp": PowerState.CRASHED}, connected=frozenset({"cp"}), busy=frozenset({"cp"})
    )
    assert plan([zone()], [cp, SSVM], NOW, S, obs) == []


def test_a_vm_stopped_through_the_api_is_neither_restarted_nor_replaced_for_a_while() -> None:
    cp = vm("cp", state=VmState.STOPPED)
    s = replace(S, restart_stopped_after=30)
    obs = Observed(power={"cp": PowerState.STOPPED}, api_ops={"cp": NOW - 20})
    assert plan([zone()], [cp, SSVM], NOW, s, obs) == []
    # then the loop starts it again (CloudStack's capacity scan keeps a zone's CPVM and SSVM)
    obs = Observed(power={"cp": PowerState.STOPPED}, api_ops={"cp": NOW - 31})
    assert kinds(plan([zone()], [cp, SSVM], NOW, s, obs)) == [("start", "consoleproxy", "cp")]


def test_a_stopped_vm_within_settle_is_not_replaced_by_a_new_one() -> None:
    cp = vm("cp", state=VmState.STOPPED)
    obs = Observed(power={"cp": PowerState.STOPPED}, last_action={"cp": NOW - 30})
    assert plan([zone()], [cp, SSVM], NOW, S, obs) == []


def test_a_busy_stopped_vm_blocks_creation_too() -> None:
    cp = vm("cp", state=VmState.STOPPED)
    assert plan([zone()], [cp, SSVM], NOW, S, Observed(busy=frozenset({"cp"}))) == []


def test_a_crashed_vm_is_restarted_after_crash_settle_not_settle() -> None:
    cp = vm("cp")
    recent = Observed(power={"cp": PowerState.CRASHED}, last_action={"cp": NOW - 5})
    assert plan([zone()], [cp, SSVM], NOW, S, recent) == []
    later = Observed(power={"cp": PowerState.CRASHED}, last_action={"cp": NOW - 11})
    [a] = plan([zone()], [cp, SSVM], NOW, S, later)
    assert (a.kind, a.vm_id, a.reason) == (Kind.RESTART, "cp", "vm process crashed")


def test_a_silent_agent_still_waits_for_the_full_settle() -> None:
    cp = vm("cp")
    cp = replace(cp, last_seen=NOW - 500)
    obs = Observed(power={"cp": PowerState.RUNNING}, last_action={"cp": NOW - 60})
    assert plan([zone()], [cp, SSVM], NOW, S, obs) == []
    obs = Observed(power={"cp": PowerState.RUNNING}, last_action={"cp": NOW - 121})
    assert kinds(plan([zone()], [cp, SSVM], NOW, S, obs)) == [("restart", "consoleproxy", "cp")]


def test_a_destroyed_vm_is_replaced() -> None:
    cp = vm("cp", state=VmState.DESTROYED)
    assert kinds(plan([zone()], [cp, SSVM], NOW, S, Observed())) == [
        ("create", "consoleproxy", None)
    ]


# ---------------------------------------------------------------- small pure helpers


def test_image_pin_is_the_rootfs_for_nspawn_and_the_directory_for_qemu() -> None:
    img = Path("/images/abc")
    assert image_pin("nspawn", img) == img / "rootfs"
    assert image_pin("qemu", img) == img


def test_system_templates_show_under_all_or_when_asked_for_by_type() -> None:
    assert visible("SYSTEM", "all", None)
    assert visible("SYSTEM", "featured", "SYSTEM")
    assert not visible("SYSTEM", "featured", None)
    assert not visible("SYSTEM", "all", "USER")


def test_lifecycle_interval() -> None:
    assert lifecycle_interval({}) == 10.0
    assert lifecycle_interval({"SYSVM_LIFECYCLE_INTERVAL": "2"}) == 2.0
    assert lifecycle_interval({"SYSVM_LIFECYCLE_INTERVAL": "0"}) == 0.5
    with pytest.raises(ConfigError):
        lifecycle_interval({"SYSVM_LIFECYCLE_INTERVAL": "soon"})


def test_a_cleanly_stopped_running_vm_is_restarted_without_an_alert() -> None:
    cp = vm("cp")
    [a] = plan([zone()], [cp, SSVM], NOW, S, Observed(power={"cp": PowerState.STOPPED}))
    assert (a.kind, a.reason, a.alert) == (Kind.RESTART, "vm process stopped", False)
    [a] = plan([zone()], [cp, SSVM], NOW, S, Observed(power={"cp": PowerState.CRASHED}))
    assert a.alert is True
