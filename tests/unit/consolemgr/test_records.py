"""Console persistence (110_console.sql) and the service's report/authorize paths against a
real SQLite store in a temp dir. No sockets, no agents: the agent link is absent, as the
service allows; QEMU guests are not started (the target records are stubbed only where a
test needs a running guest — a guest needs QEMU, which the integration tests run)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from manager.consoleproxy import records, tokens
from manager.consoleproxy.load import LoadReport, SessionInfo
from manager.consoleproxy.runtime import (
    START_RETRY,
    ConsoleError,
    ConsoleRuntime,
    HypervisorLifecycle,
    LifecycleUnavailable,
)
from manager.guests import GuestManager
from manager.metrics import Metrics
from manager.settings import Settings
from manager.store.base import Role, Zone
from manager.store.sqlite import SqliteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Ctx:
    home: Path
    store: SqliteStore
    settings: Settings
    clock: Clock
    metrics: Metrics = field(default_factory=Metrics)


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[Ctx]:
    clock = Clock()
    store = await SqliteStore.open(tmp_path / "sysvm.db", clock=clock)
    settings = Settings(store)
    await settings.load()
    try:
        yield Ctx(tmp_path, store, settings, clock)
    finally:
        await store.close()


async def _proxy(c: Ctx) -> str:
    zone = Zone(str(uuid.uuid4()), "z1", "Enabled", "Advanced", "", "", "", "", "", 0.0)
    async with c.store.transaction() as tx:
        await tx.add_zone(zone)
        vm = await tx.create_system_vm(
            role=Role.CONSOLE_PROXY, zone_id=zone.id, hypervisor="External"
        )
    return vm.id


def _token(vm_id: str, now: float, ttl: float = 60.0) -> tuple[str, tokens.ConsoleToken]:
    t = tokens.new_token()
    return t, tokens.ConsoleToken(tokens.hash_token(t), vm_id, "acct", now, now + ttl)


async def test_token_take_is_single_use_and_bound_to_its_proxy(ctx: Ctx) -> None:
    now = ctx.clock()
    _, tok = _token("vm1", now)
    _, tok2 = _token("vm1", now)
    async with ctx.store.transaction() as tx:
        await records.add_token(tx, tok, "proxy-a")
        await records.add_token(tx, tok2, "proxy-a")
    a = records.ProxyTokenStorage(ctx.store, "proxy-a")
    b = records.ProxyTokenStorage(ctx.store, "proxy-b")
    first = await a.take(tok.token_hash, now + 1)
    assert first is not None and first.used_at is None  # this call consumed it
    again = await a.take(tok.token_hash, now + 2)
    assert again is not None and again.used_at == now + 1
    # Presented at another proxy: refused, and burnt for the right one too.
    with pytest.raises(tokens.ConsoleRefused) as e:
        await b.take(tok2.token_hash, now + 1)
    assert e.value.code == "wrong_proxy"
    burnt = await a.take(tok2.token_hash, now + 2)
    assert burnt is not None and burnt.used_at is not None
    assert await a.take(b"\0" * 32, now) is None
    # Tokens die with their VM; old ones are purged.
    assert await a.drop_vm("vm1") == 2
    _, old = _token("vm2", now - 10_000)
    async with ctx.store.transaction() as tx:
        await records.add_token(tx, old, "proxy-a")
    assert await a.purge(now, keep=3600) == 1


async def test_report_saved_with_sessions_sticky_and_listed_count(ctx: Ctx) -> None:
    proxy = await _proxy(ctx)
    report = LoadReport(
        2,
        False,
        (SessionInfo("g1", "203.0.113.7", 1.0, 2.0), SessionInfo("g2", "203.0.113.8", 1.0, 3.0)),
    )
    async with ctx.store.transaction() as tx:
        await records.save_report(tx, proxy, report, 100.0)
    vm = await ctx.store.get_system_vm(proxy)
    assert vm is not None and vm.details[records.SESSIONS_KEY] == 2
    stored = await records.load_reports(ctx.store)
    assert stored[proxy].sessions == 2
    assert [s.client for s in stored[proxy].session_list] == ["203.0.113.7", "203.0.113.8"]
    sticky = await records.get_assignment(ctx.store, "g2")
    assert sticky is not None and (sticky.proxy_vm_id, sticky.assigned_at) == (proxy, 100.0)
    # A later, smaller report replaces the sessions (not appends).
    async with ctx.store.transaction() as tx:
        await records.save_report(tx, proxy, LoadReport(0, False, ()), 200.0)
    assert (await records.load_reports(ctx.store))[proxy].session_list == ()
    async with ctx.store.transaction() as tx:
        await records.forget_proxy(tx, proxy)
    assert proxy not in await records.load_reports(ctx.store)


async def test_draining_flag_lives_in_details_and_keeps_other_keys(ctx: Ctx) -> None:
    proxy = await _proxy(ctx)
    async with ctx.store.transaction() as tx:
        await tx.update_system_vm(proxy, details={"keep": "me"})
        await records.set_draining(tx, [proxy], 42.0)
    vm = await ctx.store.get_system_vm(proxy)
    assert vm is not None and vm.details == {"keep": "me", records.DRAIN_KEY: 42.0}
    async with ctx.store.transaction() as tx:
        await records.set_draining(tx, [proxy], None)
    vm = await ctx.store.get_system_vm(proxy)
    assert vm is not None and vm.details == {"keep": "me"}


@dataclass
class _Targets:
    """Stands in for the QEMU guest's VNC target (no QEMU in the unit tier)."""

    targets: dict[str, tokens.ConsoleTarget] = field(default_factory=dict)

    async def console_target(self, vm_id: str) -> tokens.ConsoleTarget | None:
        return self.targets.get(vm_id)


async def test_service_reports_and_authorize_refusals(ctx: Ctx) -> None:
    proxy = await _proxy(ctx)
    svc = ConsoleRuntime(ctx, GuestManager(ctx.home / "guests"))
    # Bad reports are refused with a log line and counted; the handler never raises.
    svc.on_event(proxy, "console.sessions", {"sessions": "nope"})
    svc.on_event(proxy, "console.sessions", {"count": -1})
    svc.on_event(proxy, "other.event", {"count": 5})
    assert svc.session_count(proxy) == 0
    assert "result=bad" in ctx.metrics.render().replace('"', "")
    svc.on_event(
        proxy,
        "console.sessions",
        {"count": 1, "sessions": [{"vm_id": "g1", "client": "c", "started": 1, "last_used": 2}]},
    )
    assert svc.session_count(proxy) == 1
    assert await svc.flush() == 1
    vm = await ctx.store.get_system_vm(proxy)
    assert vm is not None and vm.details[records.SESSIONS_KEY] == 1
    # A report from a VM that is not a console proxy is not stored.
    async with ctx.store.transaction() as tx:
        ssvm = await tx.create_system_vm(
            role=Role.SECONDARY_STORAGE, zone_id=vm.zone_id, hypervisor="External"
        )
    svc.on_event(ssvm.id, "console.sessions", {"count": 3})
    assert await svc.flush() == 0

    # console.authorize: only a console proxy may ask; a refusal names its code.
    targets = _Targets()
    svc.records = targets
    with pytest.raises(tokens.ConsoleRefused) as e:
        await svc.authorize(ssvm.id, {"token": "A" * 32, "vm_id": "g1"})
    assert e.value.code == "bad_request"
    now = ctx.clock()
    token, tok = _token("g1", now)
    async with ctx.store.transaction() as tx:
        await records.add_token(tx, tok, proxy)
    # VM gone (no target): refused, and the token is spent.
    with pytest.raises(tokens.ConsoleRefused) as e:
        await svc.authorize(proxy, {"token": token, "vm_id": "g1"})
    assert e.value.code == "vm_gone"
    token, tok = _token("g1", now)
    async with ctx.store.transaction() as tx:
        await records.add_token(tx, tok, proxy)
    targets.targets["g1"] = tokens.ConsoleTarget("g1", "acct", "127.0.0.1", 5900, "pw")
    reply: dict[str, Any] = await svc.authorize(proxy, {"token": token, "vm_id": "g1"})
    assert (reply["host"], reply["port"], reply["password"]) == ("127.0.0.1", 5900, "pw")
    assert reply["resume_token"] and reply["resume_token"] != token
    # The resume token works once at the same proxy; its own resume token is bound to that
    # proxy too (refused, and burnt, at another one).
    resumed = await svc.authorize(proxy, {"token": reply["resume_token"], "vm_id": "g1"})
    assert resumed["vm_id"] == "g1"
    async with ctx.store.transaction() as tx:
        other = await tx.create_system_vm(
            role=Role.CONSOLE_PROXY, zone_id=vm.zone_id, hypervisor="External"
        )
    with pytest.raises(tokens.ConsoleRefused) as e:
        await svc.authorize(other.id, {"token": resumed["resume_token"], "vm_id": "g1"})
    assert e.value.code == "wrong_proxy"
    with pytest.raises(tokens.ConsoleRefused) as e:
        await svc.authorize(proxy, {"token": resumed["resume_token"], "vm_id": "g1"})
    assert e.value.code == "used"
    with pytest.raises(tokens.ConsoleRefused) as e:
        await svc.authorize(proxy, {"token": token, "vm_id": "g1"})
    assert e.value.code == "used"
    await svc.guests.close()


async def test_endpoint_refusals_before_any_proxy_work(ctx: Ctx) -> None:
    rt = ConsoleRuntime(ctx, GuestManager(ctx.home / "guests"))
    rec = await rt.deploy_guest(name=None, display_name="", account_id="owner", zone_id=None)
    assert rec.name == f"VM-{rec.id}" and rec.state == "Starting"
    # Another account's VM looks exactly like a missing one.
    with pytest.raises(ConsoleError) as e:
        await rt.create_endpoint(rec.id, account_id="intruder", is_admin=False)
    assert e.value.code == 431 and "Unable to find" in e.value.text
    with pytest.raises(ConsoleError) as e:
        await rt.create_endpoint(str(uuid.uuid4()), account_id="owner", is_admin=False)
    assert e.value.code == 431 and "Unable to find" in e.value.text
    # The owner (or an admin) is told it is not running.
    for account, admin in (("owner", False), ("root", True)):
        with pytest.raises(ConsoleError) as e:
            await rt.create_endpoint(rec.id, account_id=account, is_admin=admin)
        assert e.value.code == 431 and "not running" in e.value.text
    # Garbage from a console proxy gets a refusal, never a crash.
    proxy = await _proxy(ctx)
    for params in ({}, {"token": 5, "vm_id": None}, {"token": "x" * 5000, "vm_id": "v"}):
        with pytest.raises(tokens.ConsoleRefused) as r:
            await rt.authorize(proxy, params)
        assert r.value.code in ("bad_request", "unknown")
    await rt.guests.close()


class _BrokenLifecycle:
    """Stands in for the hypervisor lifecycle (another part, in progress) to check how the
    scaler reacts when starting a proxy fails."""

    def __init__(self) -> None:
        self.starts = 0

    async def start_proxy(self, zone_id: str) -> str:
        self.starts += 1
        raise LifecycleUnavailable("no hypervisor here")

    async def stop_proxy(self, vm_id: str) -> None:
        raise AssertionError("nothing to stop")


async def test_scaler_backs_off_after_a_failed_start(ctx: Ctx) -> None:
    lc = _BrokenLifecycle()
    rt = ConsoleRuntime(ctx, GuestManager(ctx.home / "guests"), lc)
    await _proxy(ctx)  # a zone with one Starting proxy whose agent is not connected
    async with ctx.store.transaction() as tx:
        await ctx.settings.update(tx, "consoleproxy.capacity.standby", "100")
    [plan] = await rt.capacity_scan()
    assert plan.start > 0 and lc.starts == 1
    [plan] = await rt.capacity_scan()  # still short, but within the retry delay
    assert plan.start > 0 and lc.starts == 1
    ctx.clock.now += START_RETRY
    await rt.capacity_scan()
    assert lc.starts == 2
    await rt.guests.close()


async def test_hypervisor_lifecycle_refuses_before_creating_anything(ctx: Ctx) -> None:
    await _proxy(ctx)
    [zone] = await ctx.store.list_zones()
    lc = HypervisorLifecycle(ctx)  # ctx has no drivers: the zone's hypervisor has none
    with pytest.raises(LifecycleUnavailable, match="no driver"):
        await lc.start_proxy(zone.id)
    vms = await ctx.store.list_system_vms(role=Role.CONSOLE_PROXY)
    assert len(vms) == 1  # only the one the test made
    rt = ConsoleRuntime(ctx, GuestManager(ctx.home / "guests"), lc)
    assert rt.first_proxy_elsewhere
    await rt.guests.close()
