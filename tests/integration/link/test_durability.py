"""Durable desired state and commands across manager crashes (SIGKILL) and restarts."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import time
from typing import Any

import pytest
from cs import CloudStack, CloudStackException

from manager.store import open_store

pytestmark = pytest.mark.integration

SETTING = "router.stats.interval"  # agent=True, int; harmless for a secondary storage VM


def applied_versions(agent: Any) -> list[int]:
    return [int(v) for v in re.findall(r"event=config_applied version=(\d+)", agent.log())]


def api_client(home: Any) -> CloudStack:
    creds = json.loads((home / "credentials.json").read_text())
    return CloudStack(
        endpoint=creds["endpoint"], key=creds["apikey"], secret=creds["secretkey"], timeout=5
    )


async def test_sigkill_during_config_pushes_loses_nothing_and_applies_nothing_twice(
    cluster: Any,
) -> None:
    mgr = cluster.manager
    await mgr.start()
    (boot,) = await mgr.create_vms(1)
    agent = cluster.agent(boot)
    await agent.start()
    await agent.wait_log("event=config_applied version=1")
    api = api_client(mgr.home)
    rng = random.Random(1234)

    successes: list[int] = []
    attempted_after_last_success: list[int] = []
    stop_chaos = asyncio.Event()
    kills = 0

    async def chaos() -> None:
        nonlocal kills
        while not stop_chaos.is_set():
            # Random moments, not waits for a condition: this is the crash schedule.
            await asyncio.sleep(rng.uniform(0.1, 0.6))
            if stop_chaos.is_set():
                break
            mgr.signal(signal.SIGKILL)
            await mgr.wait()
            kills += 1
            await mgr.start()

    async def change(value: int) -> bool:
        try:
            await asyncio.wait_for(
                asyncio.to_thread(api.updateConfiguration, name=SETTING, value=str(value)), 10
            )
        except (CloudStackException, OSError, TimeoutError, Exception):
            return False
        return True

    chaos_task = asyncio.create_task(chaos())
    try:
        value = 1000
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (kills < 5 or len(successes) < 20):
            value += 1
            if await change(value):
                successes.append(value)
                attempted_after_last_success.clear()
            else:
                attempted_after_last_success.append(value)
                # Wait for the manager to be back rather than hammering a dead port.
                await cluster.wait_for(lambda: mgr.running, 30, "manager restarted")
    finally:
        stop_chaos.set()
        await chaos_task
    print(f"kills={kills} successes={len(successes)} ambiguous={len(attempted_after_last_success)}")
    assert kills >= 3, f"only {kills} kills happened"
    assert len(successes) >= 10, f"only {len(successes)} changes succeeded"
    if not mgr.running:
        await mgr.start()

    # Every change whose API call returned success is applied: the config is whole-state,
    # so the last success (or a later attempt whose outcome was unknown) must be applied,
    # and the store must show the agent caught up.
    acceptable = {successes[-1], *attempted_after_last_success}

    def caught_up() -> bool:
        a = agent.applied()
        return a is not None and a["config"]["settings"].get(SETTING) in acceptable

    await cluster.wait_for(caught_up, 30, "agent applied the last acknowledged change")
    store = await open_store(mgr.home)
    try:

        async def versions_match() -> bool:
            vm = await store.get_system_vm(boot["vm_id"])
            return vm is not None and vm.applied_version == vm.desired_version

        await cluster.wait_for(versions_match, 30, "applied_version == desired_version")
        vm = await store.get_system_vm(boot["vm_id"])
        assert vm is not None
        final = agent.applied()
        assert final is not None and final["version"] == vm.desired_version
        # The durable value in the store is what the agent has.
        values = {sv.name: sv.value for sv in await store.list_setting_values()}
        assert int(values[SETTING]) == final["config"]["settings"][SETTING]
    finally:
        await store.close()

    # Applied versions are strictly increasing: nothing applied twice, none out of order.
    versions = applied_versions(agent)
    assert versions == sorted(set(versions)), versions
    assert len(versions) >= 2
    assert agent.running


async def test_restart_sends_going_away_and_agent_reconnects(cluster: Any) -> None:
    mgr = cluster.manager
    await mgr.start()
    (boot,) = await mgr.create_vms(1)
    agent = cluster.agent(boot)
    await agent.start()
    await agent.wait_log("event=connected")
    await cluster.wait_for(
        lambda: mgr.metric("sysvm_agents_connected"), 10, "agent counted as connected"
    )

    mgr.signal(signal.SIGTERM)
    assert await mgr.wait(20) == 0
    await agent.wait_log("event=manager_going_away")
    await agent.wait_log("code=1001")
    assert mgr.lines("event=manager_stopped")

    await mgr.start()
    await agent.wait_log("event=connected", count=2)

    async def one_connected() -> bool:
        return bool(await mgr.metric("sysvm_agents_connected") == 1)

    await cluster.wait_for(one_connected, 15, "agent reconnected")
    # Hard crash too: the agent notices and comes back after a restart.
    mgr.signal(signal.SIGKILL)
    await mgr.wait()
    await mgr.start()
    await agent.wait_log("event=connected", count=3, timeout=30)
    # Nothing re-applied: version 1 applied exactly once over three connections.
    assert applied_versions(agent) == [1]


async def test_commands_run_at_most_once_across_reconnects(cluster: Any) -> None:
    mgr = cluster.manager
    await mgr.start()
    (boot,) = await mgr.create_vms(1)
    vm_id = boot["vm_id"]
    agent = cluster.agent(boot)
    await agent.start()
    await agent.wait_log("event=connected")

    # Queue a slow command while the manager is down (the durable queue is the store).
    mgr.signal(signal.SIGKILL)
    await mgr.wait()
    store = await open_store(mgr.home)
    try:
        async with store.transaction() as tx:
            assert await tx.add_command(vm_id, "cmd-1", "echo", {"delay": 1.5, "x": 1}, time.time())
            # Same id again: idempotent, changes nothing.
            assert not await tx.add_command(vm_id, "cmd-1", "echo", {"x": 2}, time.time())
    finally:
        await store.close()

    await mgr.start()
    await agent.wait_log("event=command_start id=cmd-1")
    # Crash the manager while the agent runs it: the result cannot be delivered.
    mgr.signal(signal.SIGKILL)
    await mgr.wait()
    await agent.wait_log("event=command_run id=cmd-1")
    await mgr.start()
    # Re-sent on reconnect (still pending in the store), answered from the agent's record.
    await agent.wait_log("event=command_replayed id=cmd-1", timeout=30)
    store = await open_store(mgr.home)
    try:

        async def done() -> Any:
            cmd = await store.get_command("cmd-1")
            return cmd if cmd is not None and cmd.state != "pending" else None

        cmd = await cluster.wait_for(done, 20, "command completed in the store")
    finally:
        await store.close()
    assert cmd.state == "done" and cmd.result["args"] == {"delay": 1.5, "x": 1}
    assert len(agent.lines("event=command_start id=cmd-1")) == 1
    assert len(agent.lines("event=command_run id=cmd-1")) == 1
    records = json.loads((agent.state_dir / "commands.json").read_text())
    assert records["cmd-1"]["result"]["nonce"] == cmd.result["nonce"]

    # Unknown commands fail cleanly, the agent keeps serving.
    store = await open_store(mgr.home)
    try:
        async with store.transaction() as tx:
            await tx.add_command(vm_id, "cmd-2", "no-such-command", {}, time.time())
    finally:
        await store.close()
    mgr.signal(signal.SIGKILL)
    await mgr.wait()
    await mgr.start()
    store = await open_store(mgr.home)
    try:

        async def failed() -> Any:
            c = await store.get_command("cmd-2")
            return c if c is not None and c.state != "pending" else None

        c2 = await cluster.wait_for(failed, 20, "unknown command answered")
    finally:
        await store.close()
    assert c2.state == "failed" and "unknown command" in c2.error
    assert agent.running


async def test_agent_that_lost_its_applied_state_gets_the_config_again(cluster: Any) -> None:
    mgr = cluster.manager
    await mgr.start()
    (boot,) = await mgr.create_vms(1)
    agent = cluster.agent(boot)
    await agent.start()
    await agent.wait_log("event=config_applied version=1")
    agent.signal(signal.SIGTERM)
    assert await agent.wait(20) == 0
    (agent.state_dir / "applied.json").unlink()
    await agent.start()
    # hello says applied_version=0; the store's record of the old ack does not stop a push.
    await agent.wait_log("event=config_applied version=1", count=2)
    applied = agent.applied()
    assert applied is not None and applied["version"] == 1
    # And a restart WITH its state re-applies nothing (re-applied at boot by the role only).
    agent.signal(signal.SIGTERM)
    assert await agent.wait(20) == 0
    await agent.start()
    await agent.wait_log("event=connected", count=3)
    await cluster.wait_for(
        lambda: len(mgr.lines(f"event=agent_connected vm={boot['vm_id']}")) == 3, 10, "hello"
    )
    assert len(agent.lines("event=config_applied version=1")) == 2
