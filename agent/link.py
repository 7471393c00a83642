"""The agent's side of the link: enrol, mutual-TLS channel, hello, heartbeats, desired
config, commands, requests, reconnects, certificate renewal.

Structure: :class:`Agent` owns three long-lived tasks — the link loop (one connection at a
time, reconnecting with exponential backoff and FULL jitter across ``manager_urls``), the
config worker (applies the newest config through the role; survives reconnects so an apply
is never cut in half by a dropped socket) and command tasks (tracked; at most once per id).
Everything the agent must not forget is in the state directory (:mod:`agent.state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from agent import identity
from agent.bootdata import BootData
from agent.roles import load as load_role
from agent.roles.base import ApplyError, LinkDown, RequestFailed, Role, RoleContext
from agent.state import StateDir, command_record
from protocol import closecodes
from protocol import messages as m
from protocol.codec import MANAGER_TO_AGENT
from protocol.conversation import (
    Close,
    Conversation,
    PeerSilent,
    Received,
    Reply,
    RequestTimedOut,
    ResponseArrived,
    Side,
)
from protocol.versions import SUPPORTED_VERSIONS, silence_timeout

log = logging.getLogger("sysvm.agent")

AGENT_VERSION = "0.1.0"
OPEN_TIMEOUT = 10.0
WELCOME_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
MAX_COMMAND_DELAY = 60.0
RENEW_CHECK_INTERVAL = 3600.0
SEND_TIMEOUT = 20.0
HEARTBEAT_SETTING = "sysvm.agent.heartbeat.interval"
ENROL_TIMEOUT = 60.0


# --- pure decisions -------------------------------------------------------------------


def backoff_delay(attempt: int, rng: random.Random, base: float = 0.5, cap: float = 60.0) -> float:
    """FULL jitter: uniform in [0, min(cap, base * 2**attempt)] (AWS architecture blog's
    'Exponential Backoff And Jitter'), so a fleet reconnecting after a manager restart
    spreads out instead of stampeding."""
    return rng.uniform(0.0, min(cap, base * (2.0 ** min(attempt, 30))))


def should_apply(version: int, applied: int) -> bool:
    """A config at or below what is applied is acknowledged without applying again."""
    return version > applied


def read_image_version(path: Path = Path("/etc/sysvm-release")) -> str:
    """``VERSION=x`` (or ``SYSVM_VERSION=x``) from the release file, else its first line."""
    try:
        text = path.read_text(errors="replace")[:4096]
    except OSError:
        return ""
    first = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("VERSION", "SYSVM_VERSION", "IMAGE_VERSION"):
            return value.strip().strip('"')[:64]
        first = first or line
    return first[:64]


def read_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:64]
    except OSError:
        return ""


class EnrolmentRefused(Exception):
    pass


class Refused(Exception):
    """The manager refused this VM's certificate (HTTP 401/403) — keep backing off."""


@dataclass
class AgentOptions:
    renew_fraction: float = 2.0 / 3.0
    backoff_base: float = 0.5
    backoff_cap: float = 60.0
    rng: random.Random = field(default_factory=random.SystemRandom)


# --- built-in commands ----------------------------------------------------------------


async def _cmd_echo(args: Mapping[str, Any]) -> dict[str, Any]:
    """Returns its args, plus a nonce made when it ran (tests see whether it ran twice)."""
    delay = args.get("delay", 0)
    if isinstance(delay, int | float) and 0 < delay <= MAX_COMMAND_DELAY:
        await asyncio.sleep(float(delay))
    return {"args": dict(args), "nonce": secrets.token_hex(8), "ran_at": time.time()}


CommandFn = Callable[[Mapping[str, Any]], Awaitable[Mapping[str, Any]]]


class Agent:
    def __init__(
        self,
        boot: BootData,
        state: StateDir,
        *,
        options: AgentOptions | None = None,
        role: Role | None = None,
        image_version: str | None = None,
    ) -> None:
        self.boot = boot
        self.state = state
        self.opts = options or AgentOptions()
        self.image_version = read_image_version() if image_version is None else image_version
        self.boot_id = read_boot_id()
        self.applied_version = 0
        self.role: Role | None = role
        self._conv: Conversation | None = None
        self._ws: ClientConnection | None = None
        self._waiters: dict[int, asyncio.Future[m.Response]] = {}
        self._config_slot: tuple[int, dict[str, Any]] | None = None
        self._config_event = asyncio.Event()
        self._records: dict[str, dict[str, Any]] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._send_lock = asyncio.Lock()
        self._retry_after: float | None = None
        self.connected = asyncio.Event()
        self.commands: dict[str, CommandFn] = {"echo": _cmd_echo, "noop": _cmd_echo}
        self.methods: dict[str, Callable[[Mapping[str, Any]], Awaitable[Mapping[str, Any]]]] = {
            "status": self._method_status,
            "ping": self._method_ping,
        }

    # --- lifecycle --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, ready: Callable[[], None] | None = None) -> None:
        self.state.ensure()
        applied = self.state.load_applied()
        self.applied_version = applied.version if applied else 0
        self._records = self.state.load_commands()
        # A command that was running when the agent died is reported as interrupted, never
        # run again (at most once).
        for cid, rec in self._records.items():
            if rec.get("state") == "running":
                self._records[cid] = command_record(False, {}, "interrupted: agent restarted")
        if self.role is None:
            ctx = RoleContext(
                vm_id=self.boot.vm_id,
                name=self.boot.name,
                zone_id=self.boot.zone_id,
                role=self.boot.role,
                state_dir=self.state.path,
                extra=self.boot.extra,
                request=self.request,
                notify=self.notify,
            )
            self.role = load_role(self.boot.role, ctx)
        await self.role.start(applied.config if applied else None)
        log.info(
            "event=agent_started vm=%s role=%s applied=%d image=%s",
            self.boot.vm_id,
            self.boot.role,
            self.applied_version,
            self.image_version or "-",
        )
        if ready is not None:
            ready()
        worker = asyncio.create_task(self._config_worker())
        linker = asyncio.create_task(self._link_loop(stop))
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({linker, worker, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (linker, worker, stopper, *self._inflight.values(), *self._tasks):
                t.cancel()
            await asyncio.gather(
                linker, worker, stopper, *self._inflight.values(), *self._tasks,
                return_exceptions=True,
            )  # fmt: skip
            for t in (linker, worker):
                if t.done() and not t.cancelled() and t.exception() is not None:
                    log.error("event=agent_task_failed error=%r", t.exception())
            await self.role.stop()
            log.info("event=agent_stopped vm=%s", self.boot.vm_id)

    async def _link_loop(self, stop: asyncio.Event) -> None:
        urls = list(self.boot.manager_urls)
        idx = self.opts.rng.randrange(len(urls))
        attempt = 0
        while not stop.is_set():
            url = urls[idx % len(urls)]
            established = False
            try:
                if not self.state.has_identity():
                    await self.enrol(url)
                established = await self._session(url)
            except asyncio.CancelledError:
                raise
            except (EnrolmentRefused, Refused, identity.TrustError) as e:
                log.warning("event=link_refused url=%s error=%s", url, _one_line(e))
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake, ssl.SSLError) as e:
                log.warning("event=link_failed url=%s error=%s", url, _one_line(e))
            finally:
                self.connected.clear()
            if established:
                attempt = 0
            else:
                attempt += 1
                idx += 1
            if self._retry_after is not None:
                delay = self._retry_after + self.opts.rng.uniform(0, self._retry_after)
                self._retry_after = None
            else:
                delay = backoff_delay(
                    attempt, self.opts.rng, self.opts.backoff_base, self.opts.backoff_cap
                )
            log.info("event=reconnect_wait seconds=%.2f attempt=%d", delay, attempt)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    # --- enrolment --------------------------------------------------------------------

    async def enrol(self, url: str) -> None:
        async with asyncio.timeout(ENROL_TIMEOUT):
            await self._enrol(url)

    async def _enrol(self, url: str) -> None:
        ca_pem = await identity.fetch_ca(url, self.boot.ca_fingerprint)
        key = identity.ensure_key(self.state)
        csr = identity.make_csr(key, self.boot.vm_id)
        ctx = identity.client_context(ca_pem, None, None)
        conv = Conversation(Side.AGENT, now=time.monotonic())
        async with connect(
            url + "/enrol",
            ssl=ctx,
            open_timeout=OPEN_TIMEOUT,
            close_timeout=5,
            compression=None,
            max_size=MANAGER_TO_AGENT.max_frame,
            ping_interval=None,
            user_agent_header=f"sysvm-agent/{AGENT_VERSION}",
        ) as ws:
            _check_server(ws)
            await ws.send(conv.send(m.Enrol(vm_id=self.boot.vm_id, token=self.boot.token, csr=csr)))
            try:
                frame = await asyncio.wait_for(ws.recv(), WELCOME_TIMEOUT)
            except ConnectionClosed as e:
                raise EnrolmentRefused(f"manager closed: {e.rcvd.reason if e.rcvd else ''}") from e
            for ev in conv.receive(frame, time.monotonic()):
                if isinstance(ev, Received) and isinstance(ev.msg, m.Enrolled):
                    identity.check_issued(ev.msg.certificate, ca_pem, key)
                    self.state.write_ca(ca_pem)
                    self.state.write_cert(ev.msg.certificate)
                    log.info(
                        "event=enrolled vm=%s serial=%x",
                        self.boot.vm_id,
                        identity.cert_serial(ev.msg.certificate),
                    )
                    return
                if isinstance(ev, Received) and isinstance(ev.msg, m.Error):
                    raise EnrolmentRefused(f"{ev.msg.code}: {ev.msg.reason}")
            raise EnrolmentRefused("manager did not answer with a certificate")

    # --- one session ------------------------------------------------------------------

    async def _session(self, url: str) -> bool:
        """One connection; returns True once it got as far as ``welcome``."""
        ca_pem = self.state.ca_path.read_bytes()
        ctx = identity.client_context(ca_pem, str(self.state.cert_path), str(self.state.key_path))
        try:
            ws = await connect(
                url + "/agent",
                ssl=ctx,
                open_timeout=OPEN_TIMEOUT,
                close_timeout=5,
                compression=None,
                max_size=MANAGER_TO_AGENT.max_frame,
                max_queue=16,
                ping_interval=None,
                user_agent_header=f"sysvm-agent/{AGENT_VERSION}",
            )
        except InvalidStatus as e:
            status = e.response.status_code
            raise Refused(f"manager refused the certificate: HTTP {status}") from e
        async with ws:
            _check_server(ws)
            now = time.monotonic()
            conv = Conversation(Side.AGENT, now=now)
            hello_status = self._status()
            await ws.send(
                conv.send(
                    m.Hello(
                        versions=list(SUPPORTED_VERSIONS),
                        agent_version=AGENT_VERSION,
                        image_version=self.image_version,
                        role=self.boot.role,
                        boot_id=self.boot_id,
                        applied_version=self.applied_version,
                        status=hello_status,
                    )
                )
            )
            frame = await asyncio.wait_for(ws.recv(), WELCOME_TIMEOUT)
            welcome = None
            for ev in conv.receive(frame, time.monotonic()):
                if isinstance(ev, Received) and isinstance(ev.msg, m.Welcome):
                    welcome = ev.msg
                elif isinstance(ev, Close):
                    await ws.close(ev.code, ev.reason)
                    return False
            if welcome is None:
                await ws.close(closecodes.CLOSE_POLICY, "expected welcome")
                return False
            self._conv, self._ws = conv, ws
            self.connected.set()
            log.info(
                "event=connected url=%s version=%d heartbeat=%.1f ack_every=%d desired=%d"
                " applied=%d",
                url,
                welcome.version,
                welcome.heartbeat_interval,
                conv.ack_every,
                welcome.desired_version,
                self.applied_version,
            )
            # Renewal is a request: it needs the read loop running, so it runs beside it.
            renew = asyncio.create_task(self._maybe_renew())
            try:
                await self._converse(ws, conv)
            finally:
                renew.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renew
                self._conv, self._ws = None, None
                for fut in self._waiters.values():
                    if not fut.done():
                        fut.set_exception(LinkDown("link closed"))
                self._waiters.clear()
            log.info(
                "event=disconnected url=%s code=%s reason=%s",
                url,
                ws.close_code,
                _one_line(ws.close_reason or "-"),
            )
            return True

    async def _converse(self, ws: ClientConnection, conv: Conversation) -> None:
        while True:
            now = time.monotonic()
            if conv.heartbeat_due(now):
                await self._send_frame(conv.heartbeat(self._status(), now))
            deadline = conv.next_deadline()
            timeout = max(0.0, deadline - now) if deadline is not None else 30.0
            try:
                frame = await asyncio.wait_for(ws.recv(), timeout + 0.01)
            except TimeoutError:
                frame = None
            except ConnectionClosed:
                return
            now = time.monotonic()
            events = (conv.receive(frame, now) if frame is not None else []) + conv.tick(now)
            for ev in events:
                if isinstance(ev, Received):
                    await self._dispatch(ev.msg)
                elif isinstance(ev, Reply):
                    await self._send_frame(ev.frame)
                elif isinstance(ev, ResponseArrived):
                    fut = self._waiters.get(ev.request_id)
                    if fut is not None and not fut.done():
                        fut.set_result(ev.response)
                elif isinstance(ev, RequestTimedOut):
                    fut = self._waiters.get(ev.request_id)
                    if fut is not None and not fut.done():
                        fut.set_exception(TimeoutError("request timed out"))
                elif isinstance(ev, PeerSilent):
                    log.warning("event=manager_silent seconds=%.1f", conv.peer_timeout)
                    await ws.close(closecodes.CLOSE_GOING_AWAY, "manager silent")
                    return
                elif isinstance(ev, Close):
                    await ws.close(ev.code, ev.reason)
                    return

    async def _dispatch(self, msg: m.Message) -> None:
        if isinstance(msg, m.Config):
            self._adopt_heartbeat_interval(msg.config)
            # Newest wins: a slow apply never queues stale versions behind it.
            if self._config_slot is None or msg.version > self._config_slot[0]:
                self._config_slot = (msg.version, msg.config)
                self._config_event.set()
        elif isinstance(msg, m.Command):
            await self._command(msg)
        elif isinstance(msg, m.Request):
            await self._manager_request(msg)
        elif isinstance(msg, m.GoingAway):
            self._retry_after = max(0.0, min(msg.retry_after, 300.0))
            log.info(
                "event=manager_going_away reason=%s retry_after=%.1f",
                _one_line(msg.reason),
                msg.retry_after,
            )
        elif isinstance(msg, m.Error):
            log.warning("event=manager_error code=%s reason=%s", msg.code, _one_line(msg.reason))
        # heartbeat_ack and anything else: liveness only (the Conversation noted it).

    def _adopt_heartbeat_interval(self, config: Mapping[str, Any]) -> None:
        """``sysvm.agent.heartbeat.interval`` is an agent setting: a change reaches live
        agents with their config, not only at the next welcome."""
        settings = config.get("settings")
        value = settings.get(HEARTBEAT_SETTING) if isinstance(settings, Mapping) else None
        conv = self._conv
        if conv is None or isinstance(value, bool) or not isinstance(value, int | float):
            return
        interval = float(value)
        if 0.0 < interval <= 3600.0 and interval != conv.heartbeat_interval:
            conv.heartbeat_interval = interval
            conv.peer_timeout = silence_timeout(interval, conv.ack_every)
            log.info("event=heartbeat_interval seconds=%.1f", interval)

    async def _send_frame(self, frame: bytes) -> bool:
        ws = self._ws
        if ws is None:
            return False
        try:
            async with self._send_lock, asyncio.timeout(SEND_TIMEOUT):
                await ws.send(frame)
        except ConnectionClosed:
            return False
        except TimeoutError:
            log.warning("event=send_timeout seconds=%.0f", SEND_TIMEOUT)
            ws.transport.abort()
            return False
        return True

    async def _send(self, msg: m.Message) -> bool:
        conv = self._conv
        if conv is None:
            return False
        return await self._send_frame(conv.send(msg))

    # --- desired config ---------------------------------------------------------------

    async def _config_worker(self) -> None:
        assert self.role is not None
        while True:
            await self._config_event.wait()
            self._config_event.clear()
            slot, self._config_slot = self._config_slot, None
            if slot is None:
                continue
            version, config = slot
            if not should_apply(version, self.applied_version):
                await self._send(m.ConfigAck(version=version, ok=True))
                continue
            try:
                await self.role.apply(config)
            except ApplyError as e:
                log.warning("event=config_failed version=%d error=%s", version, _one_line(e.reason))
                await self._send(m.ConfigAck(version=version, ok=False, error=e.reason[:500]))
                continue
            except Exception as e:
                log.exception("event=config_crashed version=%d", version)
                await self._send(m.ConfigAck(version=version, ok=False, error=repr(e)[:500]))
                continue
            # Persist BEFORE acking: an ack is a promise that survives a reboot.
            self.state.save_applied(version, config)
            self.applied_version = version
            log.info("event=config_applied version=%d", version)
            await self._send(m.ConfigAck(version=version, ok=True))

    # --- commands (at most once per id) -----------------------------------------------

    async def _command(self, msg: m.Command) -> None:
        rec = self._records.get(msg.id)
        if rec is not None and rec.get("state") != "running":
            log.info("event=command_replayed id=%s name=%s", msg.id, msg.name)
            await self._send(_result_msg(msg.id, rec))
            return
        if msg.id in self._inflight:
            return  # its result is sent when it finishes
        fn = self.commands.get(msg.name)
        if fn is None:
            rec = command_record(False, {}, f"unknown command {msg.name[:64]!r}")
            self._records[msg.id] = rec
            self.state.save_commands(self._records)
            await self._send(_result_msg(msg.id, rec))
            return
        # Mark it running on disk first: if we die mid-way it is reported, not re-run.
        self._records[msg.id] = {"state": "running", "at": time.time(), "name": msg.name}
        self.state.save_commands(self._records)
        log.info("event=command_start id=%s name=%s", msg.id, msg.name)
        task = asyncio.create_task(self._run_command(msg.id, msg.name, fn, msg.args))
        self._inflight[msg.id] = task
        task.add_done_callback(self._command_finished)

    def _command_finished(self, task: asyncio.Task[None]) -> None:
        for cid, t in list(self._inflight.items()):
            if t is task:
                del self._inflight[cid]

    async def _run_command(
        self, cid: str, name: str, fn: CommandFn, args: Mapping[str, Any]
    ) -> None:
        try:
            result = await fn(args)
            rec = command_record(True, result, "")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            rec = command_record(False, {}, repr(e)[:500])
        self._records[cid] = rec
        self.state.save_commands(self._records)
        log.info("event=command_run id=%s name=%s ok=%s", cid, name, rec["ok"])
        await self._send(_result_msg(cid, rec))

    # --- requests -----------------------------------------------------------------------

    async def request(self, method: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
        """RoleContext.request: RPC to the manager; LinkDown if there is no channel."""
        conv = self._conv
        if conv is None or self._ws is None:
            raise LinkDown(f"no manager link for request {method}")
        rid, frame = conv.request(method, params, time.monotonic(), REQUEST_TIMEOUT)
        fut: asyncio.Future[m.Response] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        try:
            if not await self._send_frame(frame):
                raise LinkDown("link closed")
            resp = await asyncio.wait_for(fut, REQUEST_TIMEOUT + 1)
        finally:
            self._waiters.pop(rid, None)
        if not resp.ok:
            raise RequestFailed(method, resp.error)
        return resp.result

    def notify(self, name: str, data: Mapping[str, Any]) -> None:
        """RoleContext.notify: fire-and-forget event (dropped while the link is down)."""
        if self._conv is None or self._ws is None:
            return
        task = asyncio.create_task(self._send(m.Event(name=name, data=dict(data))))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _manager_request(self, msg: m.Request) -> None:
        fn = self.methods.get(msg.method)
        if fn is None:
            await self._send(
                m.Response(id=msg.id, ok=False, error=f"unknown method {msg.method[:64]!r}")
            )
            return
        try:
            result = await fn(msg.params)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._send(m.Response(id=msg.id, ok=False, error=repr(e)[:500]))
            return
        await self._send(m.Response(id=msg.id, ok=True, result=dict(result)))

    async def _method_status(self, params: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"status": self._status(), "applied_version": self.applied_version}

    async def _method_ping(self, params: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"pong": True, "time": time.time()}

    def _status(self) -> dict[str, Any]:
        try:
            role_status = self.role.status() if self.role is not None else {}
        except Exception as e:  # a broken role must not break heartbeats
            role_status = {"error": repr(e)[:200]}
        return {"applied_version": self.applied_version, "role": role_status}

    # --- certificate renewal ------------------------------------------------------------

    async def _maybe_renew(self) -> None:
        """While connected: renew once the certificate is past ``renew_fraction`` of its
        life; checked at connect and then hourly."""
        while True:
            try:
                await self._renew_if_due()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never take the link down over a renewal
                log.warning("event=renew_failed error=%s", _one_line(e))
            await asyncio.sleep(RENEW_CHECK_INTERVAL)

    async def _renew_if_due(self) -> None:
        cert_pem = self.state.cert_path.read_bytes()
        now = dt.datetime.now(dt.UTC)
        if not identity.renewal_due(cert_pem, now, self.opts.renew_fraction):
            return
        key = identity.ensure_key(self.state)
        csr = identity.make_csr(key, self.boot.vm_id)
        try:
            result = await self.request("renew_certificate", {"csr": csr})
        except (LinkDown, RequestFailed, TimeoutError) as e:
            log.warning("event=renew_failed error=%s", _one_line(e))
            return
        new_pem = result.get("certificate")
        if not isinstance(new_pem, bytes):
            log.warning("event=renew_failed error=no_certificate_in_response")
            return
        identity.check_issued(new_pem, self.state.ca_path.read_bytes(), key)
        self.state.write_cert(new_pem)
        log.info("event=certificate_renewed serial=%x", identity.cert_serial(new_pem))


def _result_msg(cid: str, rec: Mapping[str, Any]) -> m.CommandResult:
    return m.CommandResult(
        id=cid,
        ok=bool(rec.get("ok")),
        result=dict(rec.get("result") or {}),
        error=str(rec.get("error") or ""),
    )


def _check_server(ws: ClientConnection) -> None:
    sslobj = ws.transport.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    identity.check_server_certificate(der)


def _one_line(e: object) -> str:
    text = str(e).replace("\n", " ")[:300] or type(e).__name__
    return '"' + text.replace('"', "'") + '"' if " " in text else text


def default_state_dir() -> Path:
    return Path(os.environ.get("SYSVM_AGENT_STATE", "/var/lib/sysvm-agent"))
