"""The lifecycle loop against the real manager parts (SQLite store, settings, PKI, agent
endpoint on loopback) and the process driver running real ``sysvm-agent`` processes:
one CPVM + one SSVM appear, enrol and turn Running; a killed agent is restarted with an
alert and an event; a destroyed VM is replaced; a driver failure is an alert, not a crash."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from manager.app import make_config, open_context
from manager.bootstrap import ensure_initialized
from manager.hypervisor.base import PowerState
from manager.hypervisor.cleanup import cleanup_all
from manager.hypervisor.lifecycle import (
    Kind,
    LifecycleLoop,
    PlanSettings,
    destroy_system_vm,
    stop_system_vm,
)
from manager.hypervisor.process import ProcessDriver
from manager.store.base import Role, VmState

TIMING_FACTOR = float(os.environ.get("SYSVM_TEST_TIMING", "1"))
FAST = PlanSettings(agent_timeout=30, start_timeout=60, settle=0.5)


async def until(cond, timeout: float, what: str) -> Any:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout * TIMING_FACTOR
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def ctx(tmp_path: Path, netns_prefix: str, free_port) -> AsyncIterator[Any]:  # type: ignore[no-untyped-def]
    port = free_port()
    cfg = make_config({}, home=str(tmp_path / "home"), api_listen="127.0.0.1:1",
                      agent_listen=f"127.0.0.1:{port}")  # fmt: skip
    c = await open_context(cfg)
    prefix = f"{netns_prefix}l"
    # the agents run on the host's loopback (no namespace): they reach 127.0.0.1 directly
    c.hypervisors.clear()
    c.hypervisors["Embedded"] = ProcessDriver(tmp_path / "vms", prefix, netns=False)
    await ensure_initialized(c)
    await c.links.start("127.0.0.1", port)
    try:
        yield c
    finally:
        for d in c.hypervisors.values():
            await d.close()
        await c.links.close("test over")
        await c.store.close()
        rep = await cleanup_all(prefix)
        assert rep.empty(), f"left behind: {rep}"


async def vms_by_role(ctx: Any) -> dict[Role, Any]:
    live = await ctx.store.list_system_vms(states=[VmState.STARTING, VmState.RUNNING])
    return {v.role: v for v in live}


async def test_loop_keeps_one_cpvm_and_ssvm_and_heals(ctx: Any) -> None:
    loop = LifecycleLoop(ctx, interval=0.2, settings=lambda: FAST)
    acts = await loop.run_once()
    assert sorted(a.kind for a in acts) == [Kind.CREATE, Kind.CREATE]
    vms = await vms_by_role(ctx)
    assert set(vms) == {Role.CONSOLE_PROXY, Role.SECONDARY_STORAGE}
    drv = ctx.hypervisors["Embedded"]

    async def all_running() -> bool:
        await loop.run_once()
        live = await ctx.store.list_system_vms(states=[VmState.RUNNING])
        return len(live) == 2

    await until(all_running, 30, "both agents to enrol and their VMs to be Running")
    assert await loop.run_once() == []  # steady state: nothing to do

    # kill the CPVM's agent: crashed -> restarted, with an alert and an event
    cp = vms[Role.CONSOLE_PROXY]
    os.kill(drv.run_info(cp.id)["pid"], signal.SIGKILL)

    async def restarted() -> bool:
        acts = await loop.run_once()
        return any(a.kind is Kind.RESTART and a.vm_id == cp.id for a in acts)

    await until(restarted, 10, "a restart of the crashed CPVM")
    assert await drv.state(cp.id) is PowerState.RUNNING
    alerts = await ctx.store.list_alerts()
    assert any(
        a.name == "ALERT.SERVICE.CONSOLEPROXY" and "crashed" in a.description for a in alerts
    )
    events = await ctx.store.list_events()
    assert any(e.type == "PROXY.RESTART" and e.resource_id == cp.id for e in events)
    await until(lambda: ctx.links.is_connected(cp.id), 30, "the restarted agent to reconnect")

    # destroy the SSVM: it is replaced by a new one
    ss = vms[Role.SECONDARY_STORAGE]
    got = await destroy_system_vm(ctx, ss.id)
    assert got.state == VmState.DESTROYED
    assert await drv.state(ss.id) is PowerState.ABSENT
    acts = await loop.run_once()
    creates = [(a.kind, a.role) for a in acts if a.kind is not Kind.MARK_RUNNING]
    assert creates == [(Kind.CREATE, Role.SECONDARY_STORAGE)]
    new_ss = (await vms_by_role(ctx))[Role.SECONDARY_STORAGE]
    assert new_ss.id != ss.id

    # an admin stop is clean and the VM is Stopped (the loop then starts it again: CloudStack
    # keeps one CPVM per zone running)
    stopped = await stop_system_vm(ctx, cp.id, timeout=10)
    assert stopped.state == VmState.STOPPED and await drv.state(cp.id) is PowerState.STOPPED

    # (within ``settle`` of the loop's own restart of this VM it waits: poll, bounded; the
    # new SSVM may be marked Running in the same pass)
    async def started() -> list[tuple[Kind, str | None]]:
        acts = await loop.run_once()
        return [(a.kind, a.vm_id) for a in acts if a.kind is not Kind.MARK_RUNNING]

    assert await until(started, 5, "the loop to start the stopped CPVM") == [(Kind.START, cp.id)]


async def test_driver_failure_is_an_alert_not_a_crash(ctx: Any, tmp_path: Path) -> None:
    # an agent binary that does not exist: the process driver cannot start VMs
    ctx.hypervisors["Embedded"] = ProcessDriver(
        tmp_path / "vms2", ctx.hypervisors["Embedded"].prefix, agent=["/nonexistent/agent"],
        netns=False,
    )  # fmt: skip
    loop = LifecycleLoop(ctx, interval=0.2, settings=lambda: FAST)
    acts = await loop.run_once()  # must not raise
    assert len(acts) == 2
    vms = await ctx.store.list_system_vms(states=[VmState.ERROR])
    assert len(vms) == 2
    alerts = await ctx.store.list_alerts()
    assert sum("start failed" in a.description for a in alerts) == 2
    assert any("/nonexistent/agent" in a.description for a in alerts)
    # VMs in Error block new creates (no storm); the loop keeps serving
    assert [a.kind for a in await loop.run_once()] in ([], [Kind.RESTART, Kind.RESTART])
    loop.start()
    await until(lambda: loop.passes >= 3, 10, "the loop to keep running")
    await loop.close()
