"""The demo guest's decisions and the guests' VNC address rule (pure: no loop, no I/O)."""

from __future__ import annotations

from pathlib import Path

import pytest

from manager.consoleproxy.records import GuestRecord
from manager.demo import (
    DEMO_NAME,
    DemoAction,
    console_command,
    demo_enabled,
    find_demo,
    plan_demo,
)
from manager.guests import GuestError, GuestState
from manager.guests.vm import check_vnc_host, default_vnc_host, qemu_argv, vnc_listen


def guest(name: str = DEMO_NAME, state: str = GuestState.RUNNING, account: str = "a1",
          vm_id: str = "g1", created: float = 1.0) -> GuestRecord:  # fmt: skip
    return GuestRecord(
        id=vm_id, name=name, display_name=name, account_id=account, zone_id="z1",
        state=state, memory_mb=64, created=created, updated=created,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("value", "on"),
    [("on", True), ("ON", True), ("1", True), ("true", True), ("yes", True),
     ("", False), ("off", False), ("0", False), ("no", False)],
)  # fmt: skip
def test_demo_enabled(value: str, on: bool) -> None:
    assert demo_enabled({"SYSVM_DEMO_GUEST": value}) is on
    assert demo_enabled({}) is False


def test_find_demo_takes_the_accounts_oldest_live_demo_guest() -> None:
    rows = [
        guest(vm_id="gone", state=GuestState.DESTROYED, created=1),
        guest(vm_id="other-name", name="web-1", created=2),
        guest(vm_id="other-account", account="a2", created=3),
        guest(vm_id="demo", state=GuestState.STOPPED, created=4),
        guest(vm_id="later", created=5),
    ]
    found = find_demo(rows, "a1")
    assert found is not None and found.id == "demo"
    assert find_demo(rows[:3], "a1") is None


def test_plan_demo_is_idempotent_across_restarts() -> None:
    assert plan_demo(None, running=False) is DemoAction.DEPLOY
    # the manager restarted: the record says Stopped (its QEMU died with the old process)
    assert plan_demo(guest(state=GuestState.STOPPED), running=False) is DemoAction.BOOT
    assert plan_demo(guest(state=GuestState.ERROR), running=False) is DemoAction.BOOT
    # a record still saying Running whose QEMU is not ours is booted again, not trusted
    assert plan_demo(guest(state=GuestState.RUNNING), running=False) is DemoAction.BOOT
    assert plan_demo(guest(state=GuestState.RUNNING), running=True) is DemoAction.KEEP


def test_console_command_is_the_exact_cs_line() -> None:
    assert console_command("abc") == "cs createConsoleEndpoint virtualmachineid=abc"


# ------------------------------------------------------------ where guests' VNC listens


def test_vnc_host_follows_the_agent_url_cpvms_use() -> None:
    env = {"SYSVM_AGENT_URLS": "wss://169.254.0.1:8250,wss://10.1.1.1:8250"}
    assert default_vnc_host(env) == "169.254.0.1"


def test_vnc_host_override_and_fallbacks() -> None:
    assert default_vnc_host({}) == "127.0.0.1"
    assert default_vnc_host({"SYSVM_AGENT_URLS": "wss://manager.example:8250"}) == "127.0.0.1"
    env = {"SYSVM_GUEST_VNC_HOST": "10.9.8.7", "SYSVM_AGENT_URLS": "wss://169.254.0.1:1"}
    assert default_vnc_host(env) == "10.9.8.7"
    assert default_vnc_host({"SYSVM_AGENT_URLS": "wss://[fd00::1]:8250"}) == "fd00::1"


@pytest.mark.parametrize("bad", ["0.0.0.0", "::", "[::]", "manager.example", "224.0.0.1"])
def test_vnc_host_is_never_a_wildcard_or_a_name(bad: str) -> None:
    with pytest.raises(GuestError):
        check_vnc_host(bad)
    with pytest.raises(GuestError):
        default_vnc_host({"SYSVM_GUEST_VNC_HOST": bad})
    # from the agent URL, a wildcard is not taken either
    if bad in ("0.0.0.0", "[::]"):
        assert default_vnc_host({"SYSVM_AGENT_URLS": f"wss://{bad}:1"}) == "127.0.0.1"


def test_qemu_vnc_on_the_bridge_address_keeps_the_password() -> None:
    argv = qemu_argv(
        "qemu-system-x86_64", image=Path("/g.img"), qmp_path=Path("/q"),
        vnc_host="169.254.0.1", memory_mb=64, name="g",
    )  # fmt: skip
    assert argv[argv.index("-vnc") + 1] == "169.254.0.1:0,to=2000,password=on"
    assert vnc_listen("fd00::1") == "[fd00::1]"
