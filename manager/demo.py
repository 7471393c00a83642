"""The demo guest: with ``SYSVM_DEMO_GUEST=on`` the manager keeps one guest VM (a QEMU
guest with a VNC console, :mod:`manager.guests`) so that a newcomer who ran ``scripts/run``
can open a console at once::

    cs createConsoleEndpoint virtualmachineid=<id>

:func:`ensure_demo_guest` is idempotent across restarts: the guest is found by its name
(:data:`DEMO_NAME`, owned by the root admin's account) and booted again (guests die with
the manager process); only when there is none is one deployed. It waits (up to
``host_wait`` seconds) for the guests' VNC address to exist on this host — the zone's
control bridge appears when the first system VM boots — and logs its id and the exact
``cs`` command. Failures are logged, never raised into the daemon (the guest is a
convenience). The pure decision is :func:`plan_demo`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from manager.consoleproxy import records
from manager.consoleproxy.runtime import ConsoleError, get_runtime
from manager.guests import GuestError, GuestState
from manager.logs import kv

log = logging.getLogger("sysvm.demo")

ENV = "SYSVM_DEMO_GUEST"
DEMO_NAME = "sysvm-demo"
DEMO_DISPLAY_NAME = "sysvm demo guest (console test pattern)"
ADMIN_USER = "admin"
HOST_WAIT = 600.0  # seconds to wait for the guests' VNC address (first system VM boot)
HOST_POLL = 1.0


class DemoAction(enum.StrEnum):
    DEPLOY = "deploy"  # no demo guest yet
    BOOT = "boot"  # it exists but is not running (the manager restarted)
    KEEP = "keep"  # running already


def demo_enabled(env: Mapping[str, str]) -> bool:
    """Pure: ``SYSVM_DEMO_GUEST`` is ``on``/``1``/``true``/``yes``."""
    return env.get(ENV, "").strip().lower() in ("on", "1", "true", "yes")


def find_demo(guests: Sequence[records.GuestRecord], account_id: str) -> records.GuestRecord | None:
    """Pure: the account's oldest live guest named :data:`DEMO_NAME` (a destroyed one is
    gone: a new one replaces it)."""
    for g in guests:
        if g.name == DEMO_NAME and g.account_id == account_id and g.state != GuestState.DESTROYED:
            return g
    return None


def plan_demo(existing: records.GuestRecord | None, running: bool) -> DemoAction:
    """Pure: what to do, given the demo guest's record (if any) and whether its QEMU runs
    in this manager process."""
    if existing is None:
        return DemoAction.DEPLOY
    if running and existing.state == GuestState.RUNNING:
        return DemoAction.KEEP
    return DemoAction.BOOT


def console_command(vm_id: str) -> str:
    """Pure: the ``cs`` command that returns a console URL for the guest."""
    return f"cs createConsoleEndpoint virtualmachineid={vm_id}"


async def ensure_demo_guest(
    ctx: Any,
    *,
    env: Mapping[str, str] | None = None,
    host_wait: float = HOST_WAIT,
) -> None:
    """Deploys (or boots again) the demo guest when ``SYSVM_DEMO_GUEST=on``; see the
    module docstring. Run it as a task the app owns (it may wait for the control bridge)."""
    if not demo_enabled(os.environ if env is None else env):
        return
    try:
        await _ensure(ctx, host_wait)
    except asyncio.CancelledError:
        raise
    except (ConsoleError, GuestError, OSError) as e:
        log.error("event=demo_guest_failed error=%s", kv(str(e)))
    except Exception:
        log.exception("event=demo_guest_failed")


async def _ensure(ctx: Any, host_wait: float) -> None:
    rt = get_runtime(ctx)
    if rt is None:
        log.warning("event=demo_guest_skipped reason=console_runtime_off")
        return
    admin = await ctx.store.get_user_by_username(ADMIN_USER)
    zones = await ctx.store.list_zones()
    if admin is None or not zones:
        log.warning("event=demo_guest_skipped reason=not_initialized")
        return
    existing = find_demo(await records.list_guests(ctx.store), admin.account_id)
    live = rt.guests.get(existing.id) if existing is not None else None
    action = plan_demo(existing, live is not None and live.state is GuestState.RUNNING)
    if action is DemoAction.KEEP:
        assert existing is not None
        _announce(existing.id, action)
        return
    if not await _wait_vnc_host(rt.guests, host_wait):
        log.error(
            "event=demo_guest_failed reason=vnc_host_missing host=%s waited=%.0f",
            rt.guests.vnc_host,
            host_wait,
        )
        return
    if existing is None:
        existing = await rt.deploy_guest(
            name=DEMO_NAME,
            display_name=DEMO_DISPLAY_NAME,
            account_id=admin.account_id,
            zone_id=zones[0].id,
        )
    booted = await rt.boot_guest(existing)
    _announce(booted.id, action)


async def _wait_vnc_host(guests: Any, timeout: float) -> bool:  # noqa: ASYNC109
    """Polls until this host has the guests' VNC address (True) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    logged = False
    while not guests.vnc_host_ready():
        if time.monotonic() >= deadline:
            return False
        if not logged:
            log.info("event=demo_guest_waiting host=%s reason=no_such_address_yet", guests.vnc_host)
            logged = True
        await asyncio.sleep(HOST_POLL)
    return True


def _announce(vm_id: str, action: DemoAction) -> None:
    log.info(
        "event=demo_guest_ready vm=%s name=%s action=%s console=%s",
        vm_id,
        DEMO_NAME,
        action.value,
        kv(console_command(vm_id)),
    )
