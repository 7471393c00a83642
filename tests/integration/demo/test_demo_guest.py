"""``SYSVM_DEMO_GUEST=on``: the manager deploys one demo guest (a real QEMU guest with a
VNC console) and, after a restart on the same home, boots that same guest again instead of
deploying a second one. A real manager context (store, settings, bootstrap, console
runtime) in this process; no API listener is needed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from manager.app import make_config, open_context
from manager.bootstrap import ensure_initialized
from manager.consoleproxy import records, runtime
from manager.context import ManagerContext
from manager.demo import DEMO_NAME, ensure_demo_guest
from manager.guests import GuestState
from manager.hypervisor.hostvm import alive

pytestmark = pytest.mark.integration
ON = {"SYSVM_DEMO_GUEST": "on"}


async def _boot_manager(home: Path) -> tuple[ManagerContext, runtime.ConsoleRuntime]:
    ctx = await open_context(make_config({}, home=str(home)))
    await ensure_initialized(ctx)
    rt = await runtime.setup(ctx)
    return ctx, rt


async def _shutdown(ctx: ManagerContext, rt: runtime.ConsoleRuntime) -> None:
    await rt.stop()  # stops the guests
    for driver in ctx.hypervisors.values():
        await driver.close()
    await ctx.store.close()


async def test_demo_guest_is_deployed_once_and_rebooted_after_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sysvm.demo")
    home = tmp_path / "home"
    pids: list[int] = []

    ctx, rt = await _boot_manager(home)
    try:
        await ensure_demo_guest(ctx, env={})  # off: nothing happens
        assert await records.list_guests(ctx.store) == []
        await ensure_demo_guest(ctx, env=ON, host_wait=5)
        [g] = await records.list_guests(ctx.store)
        assert (g.name, g.state) == (DEMO_NAME, GuestState.RUNNING)
        live = rt.guests.get(g.id)
        assert live is not None and live.pid is not None and live.vnc_port > 0
        pids.append(live.pid)
        first_id = g.id
        # called again while it runs: kept, not redeployed
        await ensure_demo_guest(ctx, env=ON, host_wait=5)
        assert [x.id for x in await records.list_guests(ctx.store)] == [first_id]
        again = rt.guests.get(first_id)
        assert again is not None and again.pid == pids[0]
    finally:
        await _shutdown(ctx, rt)
    assert not alive(pids[0], None), "the demo guest outlived its manager"

    # restart on the same home: the same guest boots again (a new QEMU)
    ctx, rt = await _boot_manager(home)
    try:
        [g] = await records.list_guests(ctx.store)
        assert g.state == GuestState.STOPPED  # its QEMU died with the previous manager
        await ensure_demo_guest(ctx, env=ON, host_wait=5)
        [g] = await records.list_guests(ctx.store)
        assert (g.id, g.state) == (first_id, GuestState.RUNNING)
        live = rt.guests.get(first_id)
        assert live is not None and live.pid is not None and live.pid != pids[0]
        pids.append(live.pid)
    finally:
        await _shutdown(ctx, rt)
    assert not alive(pids[1], None)

    lines = [r.getMessage() for r in caplog.records if "event=demo_guest_ready" in r.getMessage()]
    assert [line.split("action=")[1].split()[0] for line in lines] == ["deploy", "keep", "boot"]
    assert f'console="cs createConsoleEndpoint virtualmachineid={first_id}"' in lines[-1]
