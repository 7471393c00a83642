"""Several console proxies: least-loaded and sticky assignment over real load reports, a
token only works at the proxy it was issued for, drain before a stop, and the capacity scan
starting and stopping proxies (agent processes on the External hypervisor)."""

from __future__ import annotations

from typing import Any

import pytest

from manager.consoleproxy import records, tokens
from tests.integration.consolemgr.conftest import (
    TIMING,
    ExternalLifecycle,
    Manager,
    wait_for,
)
from tests.integration.consolemgr.test_console_endpoint import (
    _endpoint,
    _refused,
    _rfb_open,
    _ws_url,
)

pytestmark = pytest.mark.integration


def _proxy_of(m: Manager, ep: dict[str, Any]) -> str:
    port = int(ep["websocket"]["port"])
    [vm_id] = [a.vm_id for a in m.agents.values() if a.port == port]
    return vm_id


async def test_least_loaded_sticky_wrong_proxy_and_drain(manager: Manager) -> None:
    m = manager
    await m.set("consoleproxy.loadscan.interval", "1")  # drain flags show in reports sooner
    p1 = await m.new_proxy()
    p2 = await m.new_proxy()
    a = (await m.call("deployVirtualMachine", name="vm-a"))["virtualmachine"]["id"]
    b = (await m.call("deployVirtualMachine", name="vm-b"))["virtualmachine"]["id"]

    ep_a = await _endpoint(m, a)
    first = _proxy_of(m, ep_a)
    second = p2.vm_id if first == p1.vm_id else p1.vm_id
    origin_first = f"http://127.0.0.1:{m.agents[first].port}"
    _, _, conn = await _rfb_open(_ws_url(ep_a, a), origin_first)
    try:
        await wait_for(lambda: m.svc.session_count(first) == 1, 10, "report from first proxy")
        # The other VM goes to the least-loaded proxy.
        ep_b = await _endpoint(m, b)
        assert _proxy_of(m, ep_b) == second
        # A token issued for one proxy is refused (and burnt) at another.
        ws = ep_b["websocket"]
        stolen = f"ws://127.0.0.1:{m.agents[first].port}/websockify?vm={b}&token={ws['token']}"
        status, body = await _refused(stolen, origin_first)
        assert status == 403 and "another proxy" in body
        status, body = await _refused(_ws_url(ep_b, b), f"http://127.0.0.1:{ws['port']}")
        assert status == 403 and "already used" in body
        # Sticky: VM a's next console goes back to the proxy that holds its session.
        assert _proxy_of(m, await _endpoint(m, a)) == first

        # Drain the first proxy: it reports the session a stop would cut, takes no new
        # session (sticky or not), and its agent refuses new upgrades.
        assert await m.svc.drain(first) == 1
        assert _proxy_of(m, await _endpoint(m, a)) == second
        await wait_for(lambda: m.svc.reports[first].report.draining, 10, "agent applied draining")
        # The draining proxy's agent turns new upgrades away itself (503), even with a
        # token that is valid for it.
        token = tokens.new_token()
        now = m.svc.clock()
        record = tokens.ConsoleToken(tokens.hash_token(token), a, "acct", now, now + 60)
        async with m.ctx.store.transaction() as tx:
            await records.add_token(tx, record, first)
        url = f"ws://127.0.0.1:{m.agents[first].port}/websockify?vm={a}&token={token}"
        status, body = await _refused(url, origin_first)
        assert status == 503 and "draining" in body
        late = await m.svc.create_endpoint(a, account_id="x", is_admin=True)
        assert _proxy_of(m, late["consoleendpoint"]) == second
        # The live session is not cut by the drain itself.
        await conn.ping()
        # A stop waiting 0.2 s cuts the one session still open.
        cut = await m.svc.drain_for_stop(first, wait=0.2 * TIMING)
        assert cut.ready and cut.sessions_cut == 1
    finally:
        await conn.close()
    # Once the session ended, a drain-for-stop reports nothing to cut.
    await wait_for(lambda: m.svc.session_count(first) == 0, 10, "session gone")
    done = await m.svc.drain_for_stop(first, wait=5 * TIMING)
    assert done.ready and done.sessions_cut == 0
    await m.svc.undrain(first)
    await wait_for(lambda: not m.svc.reports[first].report.draining, 10, "agent applied undrain")


async def test_capacity_scan_starts_and_stops_proxies(
    manager: Manager, lifecycle: ExternalLifecycle
) -> None:
    m = manager
    m.svc.idle_grace = 0.5
    await m.set("consoleproxy.session.max", "1")
    await m.set("consoleproxy.capacity.standby", "1")
    await m.set("consoleproxy.launch.max", "2")
    first = await m.new_proxy()
    # One idle proxy with one free slot: standby is met, nothing to do.
    [plan] = await m.svc.capacity_scan()
    assert (plan.start, plan.stop) == (0, ())
    vm = (await m.call("deployVirtualMachine", name="vm-s"))["virtualmachine"]["id"]
    ep = await _endpoint(m, vm)
    _, _, conn = await _rfb_open(_ws_url(ep, vm), f"http://127.0.0.1:{first.port}")
    try:
        await wait_for(lambda: m.svc.session_count(first.vm_id) == 1, 10, "session report")
        # No free slot left: the scan starts a second proxy (launch.max = 2 allows it).
        [plan] = await m.svc.capacity_scan()
        assert plan.start == 1
        assert len(lifecycle.started) == 1
        second = lifecycle.started[0]
        assert m.ctx.links.is_connected(second)
        # Full again (one busy, one free = standby): no third proxy.
        [plan] = await m.svc.capacity_scan()
        assert plan.start == 0 and plan.stop == ()
    finally:
        await conn.close()
    await wait_for(lambda: m.svc.session_count(first.vm_id) == 0, 10, "session closed")

    # Both idle past the grace period: the newest extra one is drained and stopped.
    async def scanned_stop() -> bool:
        await m.svc.capacity_scan()
        return bool(lifecycle.stopped)

    await wait_for(scanned_stop, 10, "idle extra proxy stopped")
    assert lifecycle.stopped == [second]
    vm_rec = await m.ctx.store.get_system_vm(second)
    assert vm_rec is not None and vm_rec.state == "Stopped"
    # The last proxy stays.
    [plan] = await m.svc.capacity_scan()
    assert plan.stop == ()
    assert m.ctx.links.is_connected(first.vm_id)
