"""The console proxy's manager side, wired: storage, the agent link, the API, the scaler.

:func:`setup` (which :mod:`manager.app` calls) builds one :class:`ConsoleRuntime` for the
manager context and:

- answers the agent request ``console.authorize`` (a CPVM asks before each websocket
  upgrade): the token is consumed (single use) and must have been issued for *this* proxy
  (the caller's identity is its certificate's VM id, never a message field), for this VM,
  not expired; the VM must still exist and run, and still belong to the account the token
  was issued to. The answer is the VNC host/port/password from the manager's records;
- takes ``console.sessions`` events (load reports): kept in memory at once (assignment uses
  the freshest view), written to the store by one owned flusher task (coalesced, never a
  write per event in the event path), including each session's sticky assignment and
  ``details.activeviewersessions`` (listSystemVms);
- runs the capacity scan every ``consoleproxy.capacityscan.interval`` (the pure
  :func:`manager.consoleproxy.scale.plan_capacity`), starting/stopping proxies through a
  :class:`ProxyLifecycle` (by default the hypervisor lifecycle functions);
- drains a proxy before a stop/restart (:meth:`ConsoleRuntime.drain`): it takes no new
  session and its agent gets ``consoleproxy.draining`` in its desired config;
- adds the ``consoleproxy`` section (``{"draining": true}`` while draining) to CPVM configs.

The runtime is reachable from API handlers as ``ctx.console`` (:func:`get_runtime`).
Functions for other parts: :func:`session_count` (listSystemVms ``activeviewersessions``),
:func:`drain_for_stop` (stopSystemVm / rebootSystemVm of a console proxy),
:func:`proxy_stopped`.

Pure decisions are the module-level functions at the top (tested without I/O).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from manager.consoleproxy import records, scale, tokens, urls
from manager.consoleproxy.assign import Choice, ProxyLoad, ProxyState, choose_proxy
from manager.consoleproxy.load import LoadReport, ReportError, parse_report, to_load
from manager.desired import SECTION_RENDERERS, register_section
from manager.guests import GuestError, GuestManager, GuestState
from manager.logs import kv
from manager.store.base import Role, SystemVm, VmState

log = logging.getLogger("sysvm.consoleproxy")

CTX_ATTR = "console"
METHOD_AUTHORIZE = "console.authorize"
EVENT_SESSIONS = "console.sessions"
WEBSOCKET_PATH = "websockify"
FLUSH_MIN_INTERVAL = 0.5  # seconds between two flushes of load reports (coalescing)
TOKEN_PURGE_KEEP = 3600.0  # used/expired tokens kept this long for reporting
IDLE_GRACE = 60.0  # an extra proxy idle this long may be stopped by the scaler
DRAIN_TIMEOUT = 30.0  # default wait for sessions to end before a stop/restart
START_RETRY = 300.0  # after a failed proxy start, the scaler retries this much later
YIELD_EVERY = 256  # proxies looked at between two yields to the loop in a scan
_LIVE_VM_STATES = (VmState.STARTING, VmState.RUNNING, VmState.STOPPING)


class ConsoleError(Exception):
    """A console request cannot be served; ``code`` is an API error code (431 bad
    parameter, 533 resource unavailable), ``text`` is safe to show."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class LifecycleUnavailable(Exception):
    pass


class ProxyLifecycle(Protocol):
    """How the scaler starts and stops console proxy VMs (the hypervisor part's job)."""

    async def start_proxy(self, zone_id: str) -> str:
        """Creates and boots a new console proxy VM in the zone; returns its id."""
        ...

    async def stop_proxy(self, vm_id: str) -> None: ...


# ======================================================================== pure decisions


def planner_state(vm_state: str, connected: bool) -> str:
    """A proxy serves consoles only while its agent is connected (``console.authorize`` goes
    over that link): Starting/Running without a link counts as Starting (capacity on its
    way, not assignable); Starting with a link is Running (External VMs are booted by
    someone else and never go through the lifecycle's Running transition)."""
    if vm_state in (VmState.STARTING, VmState.RUNNING):
        return ProxyState.RUNNING if connected else ProxyState.STARTING
    return vm_state


def proxy_endpoint(
    public_ip: str | None, status: Mapping[str, Any] | None
) -> tuple[str | None, int | None]:
    """(ip, port) a browser reaches the proxy at: its public IP when it has one, else the
    address its console server reports listening on (unless a wildcard); the port is the
    reported one (``None``: the scheme's default)."""
    host: str | None = public_ip
    port: int | None = None
    role = status.get("role") if isinstance(status, Mapping) else None
    listening = role.get("listening") if isinstance(role, Mapping) else None
    if isinstance(listening, str) and ":" in listening:
        lhost, _, lport = listening.rpartition(":")
        lhost = lhost.strip("[]")
        if not (lport.isdigit() and 0 < int(lport) < 65536):
            return host, None
        port = int(lport)
        if host is None:
            try:
                ip = ipaddress.ip_address(lhost)
            except ValueError:
                ip = None
            if ip is not None and not ip.is_unspecified:
                host = str(ip)
    return host, port


def with_pending(load: ProxyLoad, pending_vm_ids: Sequence[str]) -> ProxyLoad:
    """Counts consoles handed out to this proxy but not yet in its report as sessions, so
    a burst of createConsoleEndpoint calls spreads before the next report arrives."""
    extra = [v for v in pending_vm_ids if v not in load.session_vm_ids]
    if not extra:
        return load
    return replace(
        load,
        sessions=load.sessions + len(extra),
        session_vm_ids=load.session_vm_ids | frozenset(extra),
        idle_since=None,
    )


def endpoint_body(
    url: str, token: str, host: str, port: int, *, success: bool = True
) -> dict[str, Any]:
    """CloudStack's createConsoleEndpoint body (``consoleendpoint`` object)."""
    return {
        "consoleendpoint": {
            "success": success,
            "url": url,
            "websocket": {
                "token": token,
                "host": host,
                "port": str(port),
                "path": WEBSOCKET_PATH,
                "extra": "",
            },
        }
    }


def draining_section(vm: SystemVm, _settings: Any) -> dict[str, Any] | None:
    """``manager.desired`` renderer: the ``consoleproxy`` section of a CPVM's config."""
    if vm.role is not Role.CONSOLE_PROXY:
        return None
    if vm.details.get(records.DRAIN_KEY) is not None and not drain_outlived(vm.details):
        return {"draining": True}
    return None


def drain_outlived(details: Mapping[str, Any]) -> bool:
    """A drain set before the proxy's latest start (``details["started_at"]``, written by
    the lifecycle) is over: the stop/restart it prepared has happened."""
    drained = details.get(records.DRAIN_KEY)
    started = details.get("started_at")
    return (
        isinstance(drained, int | float) and isinstance(started, int | float) and started > drained
    )


def scale_live(views: Sequence[ProxyLoad]) -> int:
    """Proxies the standby rule counts as live (Starting or Running)."""
    return sum(1 for v in views if v.state in scale.LIVE_STATES)


def prune_pending(
    pending: Mapping[str, Mapping[str, float]], now: float
) -> dict[str, dict[str, float]]:
    """Drops handed-out consoles whose token expired unused."""
    out: dict[str, dict[str, float]] = {}
    for proxy, vms in pending.items():
        alive = {vm: exp for vm, exp in vms.items() if exp > now}
        if alive:
            out[proxy] = alive
    return out


# ======================================================================== the runtime


@dataclass
class ProxyReport:
    report: LoadReport
    received: float


class GuestRecords:
    """:class:`manager.consoleproxy.tokens.ConsoleRecords`: the guest record must say
    Running, and the VNC target comes from the guest manager's memory (never stored)."""

    def __init__(self, rt: ConsoleRuntime) -> None:
        self.rt = rt

    async def console_target(self, vm_id: str) -> tokens.ConsoleTarget | None:
        rec = await records.get_guest(self.rt.ctx.store, vm_id)
        if rec is None or rec.state != GuestState.RUNNING:
            return None
        return await self.rt.guests.console_target(vm_id)


class ConsoleRuntime:
    def __init__(
        self,
        ctx: Any,
        guests: GuestManager,
        lifecycle: ProxyLifecycle | None = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.ctx = ctx
        self.clock: Callable[[], float] = clock or ctx.clock
        self.guests = guests
        self.lifecycle = lifecycle
        self.idle_grace = IDLE_GRACE
        # True when the hypervisor lifecycle loop already keeps one proxy per zone.
        self.first_proxy_elsewhere = isinstance(lifecycle, HypervisorLifecycle)
        self.reports: dict[str, ProxyReport] = {}
        self.views: dict[str, ProxyLoad] = {}  # last planner view (keeps idle_since)
        self.pending: dict[str, dict[str, float]] = {}  # proxy -> vm -> token expiry
        self.records: tokens.ConsoleRecords = GuestRecords(self)
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()
        self._wake_scan = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: set[str] = set()  # proxies the scaler is stopping
        self._report_waiters: set[asyncio.Future[None]] = set()
        self._start_refused: dict[str, float] = {}  # zone -> when a start last failed

    # ------------------------------------------------------------------ wiring
    async def load(self) -> None:
        """State kept across restarts: the last load reports. Guests that were running
        died with the previous manager process (their QEMU dies with its parent)."""
        now = self.clock()
        for proxy, stored in (await records.load_reports(self.ctx.store)).items():
            self.reports[proxy] = ProxyReport(
                LoadReport(stored.sessions, stored.draining, stored.session_list),
                stored.reported_at,
            )
        stale = [
            g
            for g in await records.list_guests(self.ctx.store)
            if g.state in (GuestState.RUNNING, GuestState.STARTING, GuestState.STOPPING)
            and self.guests.get(g.id) is None
        ]
        if stale:
            async with self.ctx.store.transaction() as tx:
                for g in stale:
                    await records.set_guest_state(tx, g.id, GuestState.STOPPED, now)
            log.info("event=guests_marked_stopped count=%d reason=manager_restart", len(stale))

    def register(self) -> None:
        links = getattr(self.ctx, "links", None)
        if links is not None:
            links.register_method(METHOD_AUTHORIZE, self.authorize)
            links.on_event(self.on_event)
        register_section("consoleproxy", draining_section)
        self.guests.on_destroy(self._guest_destroyed)

    def start(self) -> None:
        """Starts the owned background loops (capacity scan, report flusher)."""
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._capacity_loop(), name="console-capacity"),
            asyncio.create_task(self._flush_loop(), name="console-flush"),
        ]

    async def stop(self) -> None:
        """Cancels and awaits the loops, writes pending reports, stops the guest VMs."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        try:
            await self.flush()
        except Exception:
            log.exception("event=load_flush_failed when=stop")
        await self.guests.close()
        if SECTION_RENDERERS.get("consoleproxy") is draining_section:
            del SECTION_RENDERERS["consoleproxy"]

    # ------------------------------------------------------------------ load reports
    def on_event(self, vm_id: str, name: str, data: Mapping[str, Any]) -> None:
        if name != EVENT_SESSIONS:
            return
        metrics = getattr(self.ctx, "metrics", None)
        try:
            report = parse_report(data)
        except ReportError as e:
            log.warning("event=bad_load_report vm=%s error=%s", vm_id, kv(str(e)))
            if metrics is not None:
                metrics.inc("sysvm_console_reports_total", result="bad")
            return
        now = self.clock()
        self.reports[vm_id] = ProxyReport(report, now)
        served = {s.vm_id for s in report.sessions}
        if vm_id in self.pending:
            left = {v: e for v, e in self.pending[vm_id].items() if v not in served}
            if left:
                self.pending[vm_id] = left
            else:
                del self.pending[vm_id]
        self._dirty.add(vm_id)
        self._dirty_event.set()
        for fut in self._report_waiters:
            if not fut.done():
                fut.set_result(None)
        if metrics is not None:
            metrics.inc("sysvm_console_reports_total", result="ok")

    async def _next_report(self, within: float) -> None:
        """Returns when any load report arrives, or after ``within`` seconds."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._report_waiters.add(fut)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, within)):
                    await fut
        finally:
            self._report_waiters.discard(fut)

    def session_count(self, proxy_vm_id: str) -> int:
        r = self.reports.get(proxy_vm_id)
        return r.report.count if r is not None else 0

    async def flush(self) -> int:
        """Writes the reports received since the last flush; returns how many."""
        dirty, self._dirty = self._dirty, set()
        written = 0
        metrics = getattr(self.ctx, "metrics", None)
        for proxy in sorted(dirty):
            r = self.reports.get(proxy)
            vm = await self.ctx.store.get_system_vm(proxy)
            if vm is not None and vm.role is not Role.CONSOLE_PROXY:
                log.warning("event=load_report_ignored vm=%s reason=not_a_console_proxy", proxy)
                self.reports.pop(proxy, None)
                continue
            if r is None or vm is None:
                continue
            async with self.ctx.store.transaction(durable=False) as tx:
                await records.save_report(tx, proxy, r.report, r.received)
            if metrics is not None:
                metrics.set("sysvm_console_sessions", r.report.count, vm=vm.name)
            written += 1
        return written

    async def _flush_loop(self) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=load_flush_failed")
            await asyncio.sleep(FLUSH_MIN_INTERVAL)  # coalesce bursts of reports

    # ------------------------------------------------------------------ planner view
    async def proxies(self, zone_id: str | None) -> list[tuple[SystemVm, ProxyLoad]]:
        """Every live console proxy of the zone with its planner view."""
        vms = await self.ctx.store.list_system_vms(
            zone_id=zone_id, role=Role.CONSOLE_PROXY, states=list(_LIVE_VM_STATES)
        )
        links = getattr(self.ctx, "links", None)
        now = self.clock()
        self.pending = prune_pending(self.pending, now)
        out = []
        for n, vm in enumerate(vms, 1):
            if n % YIELD_EVERY == 0:  # thousands of proxies: let heartbeats in between
                await asyncio.sleep(0)
            connected = bool(links is not None and links.is_connected(vm.id))
            r = self.reports.get(vm.id)
            load = to_load(
                vm.id,
                planner_state(vm.state, connected),
                r.report if r is not None else None,
                now=now,
                previous=self.views.get(vm.id),
                started=vm.created,
            )
            drained = vm.details.get(records.DRAIN_KEY) is not None
            if (drained and not drain_outlived(vm.details)) or vm.id in self._stopping:
                load = replace(load, draining=True)
            self.views[vm.id] = load
            out.append((vm, with_pending(load, list(self.pending.get(vm.id, {})))))
        return out

    def _setting(self, name: str, zone_id: str | None) -> Any:
        return self.ctx.settings.get(name, zone_id)

    # ------------------------------------------------------------------ the API side
    async def create_endpoint(
        self, vm_id: str, *, account_id: str, is_admin: bool, client: str = ""
    ) -> dict[str, Any]:
        store = self.ctx.store
        guest = await records.get_guest(store, vm_id)
        if guest is None or guest.state == GuestState.DESTROYED:
            raise ConsoleError(431, f"Unable to find virtual machine with id {vm_id}")
        if not is_admin and guest.account_id != account_id:
            # Same answer as for a VM that does not exist: ids of others are not confirmed.
            raise ConsoleError(431, f"Unable to find virtual machine with id {vm_id}")
        if guest.state != GuestState.RUNNING or await self.guests.console_target(vm_id) is None:
            raise ConsoleError(431, f"virtual machine {vm_id} is not running ({guest.state})")
        zone_id = guest.zone_id
        now = self.clock()
        proxies = await self.proxies(zone_id)
        previous = await records.get_assignment(store, vm_id)
        choice: Choice = choose_proxy(
            [p for _, p in proxies],
            vm_id,
            previous,
            now=now,
            session_max=int(self._setting("consoleproxy.session.max", zone_id)),
            session_timeout=float(self._setting("consoleproxy.session.timeout", zone_id)),
        )
        if choice.proxy_vm_id is None:
            self._wake_scan.set()
            raise ConsoleError(
                533, "no console proxy available in this zone now; one is being started"
            )
        proxy_vm = next(vm for vm, _ in proxies if vm.id == choice.proxy_vm_id)
        links = getattr(self.ctx, "links", None)
        status = links.status(proxy_vm.id) if links is not None else None
        host, port = proxy_endpoint(proxy_vm.public_ip, status)
        if host is None:
            raise ConsoleError(533, f"console proxy {proxy_vm.name} has no reachable address")
        ssl = bool(self._setting("consoleproxy.sslEnabled", zone_id))
        domain = str(self._setting("consoleproxy.url.domain", zone_id))
        try:
            ws_host = urls.proxy_host(host, domain)  # validates the domain before minting
        except urls.UrlDomainError as e:
            raise ConsoleError(431, f"consoleproxy.url.domain: {e}") from e
        ttl = tokens.DEFAULT_TTL
        token = tokens.new_token()
        record = tokens.ConsoleToken(
            token_hash=tokens.hash_token(token),
            vm_id=vm_id,
            account_id=guest.account_id,
            created=now,
            expires_at=now + ttl,
        )
        async with store.transaction() as tx:
            await records.add_token(tx, record, proxy_vm.id)
            await records.set_assignment(tx, vm_id, proxy_vm.id, now)
        self.pending.setdefault(proxy_vm.id, {})[vm_id] = now + ttl
        url = urls.console_url(
            public_ip=host, url_domain=domain, ssl=ssl, vm_id=vm_id, token=token, port=port
        )
        log.info(
            "event=console_endpoint vm=%s proxy=%s reason=%s account=%s client=%s",
            vm_id,
            proxy_vm.name,
            choice.reason.value,
            account_id,
            kv(client or "-"),
        )
        return endpoint_body(url, token, ws_host, port or (443 if ssl else 80))

    # ------------------------------------------------------------------ the agent side
    async def authorize(self, proxy_vm_id: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Handler of the agent request ``console.authorize``. Raises
        :class:`~manager.consoleproxy.tokens.ConsoleRefused` (sent as ``"<code>: <reason>"``)."""
        metrics = getattr(self.ctx, "metrics", None)
        proxy = await self.ctx.store.get_system_vm(proxy_vm_id)
        try:
            if proxy is None or proxy.role is not Role.CONSOLE_PROXY:
                raise tokens.ConsoleRefused("bad_request", "the caller is not a console proxy")
            reply = await tokens.handle_authorize_request(
                records.ProxyTokenStorage(self.ctx.store, proxy_vm_id),
                self.records,
                params,
                self.clock(),
            )
        except tokens.ConsoleRefused as e:
            log.warning(
                "event=console_refused proxy=%s vm=%s code=%s client=%s",
                proxy_vm_id,
                kv(str(params.get("vm_id", ""))[:64]),
                e.code,
                kv(str(params.get("client", ""))[:64]),
            )
            if metrics is not None:
                metrics.inc("sysvm_console_authorize_total", result=e.code)
            raise
        log.info(
            "event=console_authorized proxy=%s vm=%s client=%s",
            proxy_vm_id,
            reply["vm_id"],
            kv(str(params.get("client", ""))[:64]),
        )
        if metrics is not None:
            metrics.inc("sysvm_console_authorize_total", result="ok")
        return reply

    # ------------------------------------------------------------------ guests
    async def _guest_destroyed(self, vm_id: str) -> None:
        async with self.ctx.store.transaction() as tx:
            dropped = await records.drop_tokens(tx, vm_id)
            await records.drop_assignment(tx, vm_id)
        for vms in self.pending.values():
            vms.pop(vm_id, None)
        log.info("event=console_tokens_dropped vm=%s count=%d", vm_id, dropped)

    async def deploy_guest(
        self,
        *,
        name: str | None,
        display_name: str,
        account_id: str,
        zone_id: str | None,
        memory_mb: int = 64,
    ) -> records.GuestRecord:
        """Records the guest (Starting); :meth:`boot_guest` boots it. An unnamed guest is
        named ``VM-<id>`` (as CloudStack does)."""
        now = self.clock()
        vm_id = str(uuid.uuid4())
        name = name or f"VM-{vm_id}"
        rec = records.GuestRecord(
            id=vm_id,
            name=name,
            display_name=display_name or name,
            account_id=account_id,
            zone_id=zone_id,
            state=GuestState.STARTING,
            memory_mb=memory_mb,
            created=now,
            updated=now,
        )
        async with self.ctx.store.transaction() as tx:
            await records.add_guest(tx, rec)
        return rec

    async def boot_guest(self, rec: records.GuestRecord) -> records.GuestRecord:
        try:
            if self.guests.get(rec.id) is None:
                await self.guests.deploy(
                    rec.name, account_id=rec.account_id, memory_mb=rec.memory_mb, vm_id=rec.id
                )
            else:
                await self.guests.start(rec.id)
        except (GuestError, OSError) as e:
            await self._set_guest(rec.id, GuestState.ERROR)
            raise ConsoleError(533, f"unable to start virtual machine {rec.name}: {e}") from e
        return await self._set_guest(rec.id, GuestState.RUNNING)

    async def stop_guest(self, vm_id: str) -> records.GuestRecord:
        if self.guests.get(vm_id) is not None:
            await self._set_guest(vm_id, GuestState.STOPPING)
            await self.guests.stop(vm_id)
        return await self._set_guest(vm_id, GuestState.STOPPED)

    async def destroy_guest(self, vm_id: str) -> records.GuestRecord:
        if self.guests.get(vm_id) is not None:
            await self.guests.destroy(vm_id)  # its on_destroy hook drops the tokens
        else:
            await self._guest_destroyed(vm_id)
        return await self._set_guest(vm_id, GuestState.DESTROYED)

    async def _set_guest(self, vm_id: str, state: str) -> records.GuestRecord:
        async with self.ctx.store.transaction() as tx:
            await records.set_guest_state(tx, vm_id, state, self.clock())
        rec = await records.get_guest(self.ctx.store, vm_id)
        assert rec is not None
        return rec

    # ------------------------------------------------------------------ drain
    async def drain(self, proxy_vm_id: str, reason: str = "stop") -> int:
        """The proxy takes no new session from now on; returns its sessions right now (what
        a stop would cut). Idempotent."""
        vm = await self.ctx.store.get_system_vm(proxy_vm_id)
        if vm is None or vm.role is not Role.CONSOLE_PROXY:
            raise ConsoleError(431, f"{proxy_vm_id} is not a console proxy VM")
        if vm.details.get(records.DRAIN_KEY) is None:
            await self._set_drain(proxy_vm_id, self.clock())
            log.info(
                "event=console_drain_started proxy=%s sessions=%d reason=%s",
                vm.name,
                self.session_count(proxy_vm_id),
                kv(reason),
            )
        return self.session_count(proxy_vm_id)

    async def undrain(self, proxy_vm_id: str) -> None:
        vm = await self.ctx.store.get_system_vm(proxy_vm_id)
        if vm is None or vm.details.get(records.DRAIN_KEY) is None:
            return
        await self._set_drain(proxy_vm_id, None)
        log.info("event=console_drain_ended proxy=%s", vm.name)

    async def _set_drain(self, proxy_vm_id: str, started: float | None) -> None:
        links = getattr(self.ctx, "links", None)
        async with self.ctx.store.transaction() as tx:
            await records.set_draining(tx, [proxy_vm_id], started)
            await tx.bump_desired([proxy_vm_id])
            if links is not None:
                tx.on_commit(lambda: links.desired_changed([proxy_vm_id]))

    async def drain_for_stop(
        self, proxy_vm_id: str, *, wait: float = DRAIN_TIMEOUT
    ) -> scale.DrainStatus:
        """Drains, then waits up to ``wait`` seconds for the proxy's sessions to end (its
        load reports say so; ``wait=0``: don't wait). The status says how many sessions
        the stop now cuts."""
        await self.drain(proxy_vm_id)
        started = self.clock()
        while True:
            view = ProxyLoad(
                proxy_vm_id, ProxyState.RUNNING, sessions=self.session_count(proxy_vm_id)
            )
            now = self.clock()
            status = scale.drain_status(view, drain_started=started, now=now, drain_timeout=wait)
            if status.ready:
                return status
            await self._next_report(started + wait - now)

    async def proxy_stopped(self, proxy_vm_id: str) -> None:
        """Call after a proxy stopped: forgets its sessions and ends its drain."""
        self.reports.pop(proxy_vm_id, None)
        self.views.pop(proxy_vm_id, None)
        self.pending.pop(proxy_vm_id, None)
        async with self.ctx.store.transaction() as tx:
            await records.forget_proxy(tx, proxy_vm_id)
            await records.set_draining(tx, [proxy_vm_id], None)

    # ------------------------------------------------------------------ scaling
    async def capacity_scan(self) -> list[scale.ScalePlan]:
        """One pass of the standby rule over every zone; returns the plans (applied)."""
        plans = []
        for zone in await self.ctx.store.list_zones():
            pairs = await self.proxies(zone.id)
            plannable = []
            for n, (vm, view) in enumerate(pairs, 1):
                if n % YIELD_EVERY == 0:  # thousands of proxies: let heartbeats in between
                    await asyncio.sleep(0)
                if drain_outlived(vm.details):  # restarted since: clear the stale flag
                    await self.undrain(vm.id)
                plannable.append(self._plannable(vm, view))
            views = [p for _, p in pairs]
            plan = scale.plan_capacity(
                plannable,
                now=self.clock(),
                session_max=int(self._setting("consoleproxy.session.max", zone.id)),
                standby=int(self._setting("consoleproxy.capacity.standby", zone.id)),
                launch_max=int(self._setting("consoleproxy.launch.max", zone.id)),
                idle_grace=self.idle_grace,
            )
            plans.append(plan)
            if plan.start or plan.stop:
                log.info(
                    "event=console_scale zone=%s start=%d stop=%s free=%d reason=%s",
                    zone.name,
                    plan.start,
                    ",".join(plan.stop) or "-",
                    plan.free_slots,
                    kv(plan.reason),
                )
                await self._apply(zone.id, plan, live=scale_live(views))
        await self._purge_tokens()
        return plans

    def _plannable(self, vm: SystemVm, view: ProxyLoad) -> ProxyLoad:
        """The planner's view of a proxy: one the lifecycle cannot stop (an ``External``
        VM, someone else boots and stops those) never counts as idle, so the scaler does
        not drain it and then fail to stop it on every scan (with 10,000 such proxies that
        was a drain transaction and a stop attempt per proxy per scan)."""
        can_stop = getattr(self.lifecycle, "can_stop", None)
        if view.idle_since is None or can_stop is None or can_stop(vm):
            return view
        return replace(view, idle_since=None)

    def _may_start(self, zone_id: str) -> bool:
        """After a failed start, wait ``START_RETRY`` seconds before trying again (no start
        storm against a broken hypervisor)."""
        failed = self._start_refused.get(zone_id)
        return failed is None or self.clock() - failed >= START_RETRY

    async def _apply(self, zone_id: str, plan: scale.ScalePlan, *, live: int) -> None:
        if self.lifecycle is None:
            log.warning("event=console_scale_skipped zone=%s reason=no_lifecycle", zone_id)
            return
        starts = plan.start if self._may_start(zone_id) else 0
        if live == 0 and self.first_proxy_elsewhere:
            # The hypervisor lifecycle loop keeps one proxy per zone; two creators of the
            # first one would race. The scaler adds capacity beyond it.
            log.info("event=console_scale_deferred zone=%s reason=lifecycle_keeps_one", zone_id)
            starts = 0
        for _ in range(starts):
            try:
                vm_id = await self.lifecycle.start_proxy(zone_id)
            except asyncio.CancelledError:
                raise
            except LifecycleUnavailable as e:
                self._start_refused[zone_id] = self.clock()
                log.warning("event=console_scale_skipped zone=%s reason=%s", zone_id, kv(e))
                break
            except Exception as e:
                self._start_refused[zone_id] = self.clock()
                log.error("event=console_proxy_start_failed zone=%s error=%s", zone_id, kv(e))
                break
            log.info("event=console_proxy_started zone=%s vm=%s", zone_id, vm_id)
        for vm_id in plan.stop:
            self._stopping.add(vm_id)
            try:
                await self.drain(vm_id, reason="idle")
                await self.lifecycle.stop_proxy(vm_id)
                await self.proxy_stopped(vm_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("event=console_proxy_stop_failed vm=%s error=%s", vm_id, kv(e))
            finally:
                self._stopping.discard(vm_id)

    async def _purge_tokens(self) -> None:
        async with self.ctx.store.transaction(durable=False) as tx:
            n = await records.purge_tokens(tx, self.clock(), TOKEN_PURGE_KEEP)
        if n:
            log.info("event=console_tokens_purged count=%d", n)

    async def _capacity_loop(self) -> None:
        while True:
            interval = float(self._setting("consoleproxy.capacityscan.interval", None))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake_scan.wait()
            self._wake_scan.clear()
            try:
                await self.capacity_scan()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=console_capacity_scan_failed")


# ======================================================================== entry points


class HypervisorLifecycle:
    """:class:`ProxyLifecycle` over :mod:`manager.hypervisor.lifecycle`
    (``create_system_vm(ctx, zone_id, role, hypervisor)`` — record, then boot — and
    ``stop_system_vm(ctx, vm_id)``). New proxies go on the zone's first cluster's hypervisor
    (``Embedded`` when there is none). Refuses (:class:`LifecycleUnavailable`, before
    creating anything) when that module or a driver for the hypervisor is missing, or the
    hypervisor is ``External`` (someone else boots those)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    @staticmethod
    def _fn(name: str) -> Any:
        try:
            mod = importlib.import_module("manager.hypervisor.lifecycle")
        except ImportError:
            return None
        return getattr(mod, name, None)

    async def start_proxy(self, zone_id: str) -> str:
        create = self._fn("create_system_vm")
        if create is None:
            raise LifecycleUnavailable("manager.hypervisor.lifecycle.create_system_vm missing")
        clusters = await self.ctx.store.list_clusters(zone_id)
        hypervisor = clusters[0].hypervisor if clusters else "Embedded"
        if hypervisor == "External":
            raise LifecycleUnavailable("the zone's hypervisor is External")
        if hypervisor not in getattr(self.ctx, "hypervisors", {}):
            raise LifecycleUnavailable(f"no driver for hypervisor {hypervisor}")
        vm = await create(self.ctx, zone_id, Role.CONSOLE_PROXY, hypervisor)
        return str(vm.id)

    def can_stop(self, vm: SystemVm) -> bool:
        """Whether :meth:`stop_proxy` can stop this proxy (a driver for its hypervisor,
        which is not ``External``)."""
        return vm.hypervisor != "External" and vm.hypervisor in getattr(self.ctx, "hypervisors", {})

    async def stop_proxy(self, vm_id: str) -> None:
        stop = self._fn("stop_system_vm")
        if stop is None:
            raise LifecycleUnavailable("manager.hypervisor.lifecycle.stop_system_vm missing")
        await stop(self.ctx, vm_id)


async def setup(
    ctx: Any,
    *,
    lifecycle: ProxyLifecycle | None = None,
    clock: Callable[[], float] | None = None,
) -> ConsoleRuntime:
    """Builds the console runtime for ``ctx`` (guests under ``<home>/guests``), registers
    the agent method/event handlers and the desired-config section, loads persisted state,
    and makes it ``ctx.console``. The caller owns the result: ``start()`` its loops once the
    agent endpoint is up, ``await stop()`` at shutdown before the store closes (it stops
    the guests too)."""
    guests = GuestManager(Path(ctx.home) / "guests")
    rt = ConsoleRuntime(ctx, guests, lifecycle or HypervisorLifecycle(ctx), clock=clock)
    await rt.load()
    rt.register()
    setattr(ctx, CTX_ATTR, rt)  # ManagerContext has no typed slot for it (yet)
    return rt


def get_runtime(ctx: Any) -> ConsoleRuntime | None:
    rt = getattr(ctx, CTX_ATTR, None)
    return rt if isinstance(rt, ConsoleRuntime) else None


def session_count(ctx: Any, vm_id: str) -> int:
    """Live console sessions of a console proxy VM (listSystemVms ``activeviewersessions``);
    0 when unknown. Also persisted as ``details["activeviewersessions"]``."""
    rt = get_runtime(ctx)
    return rt.session_count(vm_id) if rt is not None else 0


async def drain_for_stop(ctx: Any, vm_id: str, *, wait: float = DRAIN_TIMEOUT) -> int:
    """For stopSystemVm / rebootSystemVm of a console proxy: drain it (no new session goes
    there), wait up to ``wait`` s for its sessions to end, and return how many sessions the
    stop will cut. 0 (and nothing done) when the console runtime is not running."""
    rt = get_runtime(ctx)
    if rt is None:
        return 0
    status = await rt.drain_for_stop(vm_id, wait=wait)
    return status.sessions_cut


async def proxy_stopped(ctx: Any, vm_id: str) -> None:
    """For the lifecycle: a console proxy stopped (its sessions are gone, drain over)."""
    rt = get_runtime(ctx)
    if rt is not None:
        await rt.proxy_stopped(vm_id)
