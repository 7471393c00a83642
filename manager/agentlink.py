"""The agent endpoint: one TLS listener (``websockets`` asyncio server) with three paths.

- ``GET /ca.pem`` — the CA certificate, for agents to pin by fingerprint.
- ``/enrol`` — token + CSR in, client certificate out (no client certificate needed).
- ``/agent`` — authenticated in ``process_request`` BEFORE the upgrade: a client certificate
  from our CA with EKU clientAuth (else 401), not revoked and of a live VM (else 403). The
  VM id is the certificate's CN, never a message field.

Per connection the state is one :class:`Session` (slots) plus the protocol's
:class:`~protocol.conversation.Conversation`; there is no per-connection timer task — a single
ticker drives every conversation's deadlines, a single pusher sends desired configs, and a
single flusher persists last-seen times coarsely (never a DB write per heartbeat).

Durable desired state: ``desired_version`` is bumped by whoever changes state, inside their
transaction; :meth:`AgentLinks.desired_changed` (called after commit) marks VMs dirty; the
pusher reads the VM's version FIRST and the setting values AFTER, so the rendered config
carries at least everything committed up to that version. ``config_ack`` and hello facts are
recorded with ``record_applied`` (max) in group commits (one transaction per burst); the
agent is the truth for what it applied: on reconnect its ``hello.applied_version`` decides
and anything newer is re-sent. Commands are stored before they are sent and re-sent while pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import gc
import logging
import random
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import DATA_OPCODES, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Event

from manager import enrolment, vm_events
from manager.desired import render_config
from manager.logs import kv
from manager.metrics import Metrics
from manager.pki import CertificateRefused, Pki, PkiError, check_agent_certificate, parse_csr
from manager.store.base import Store, SystemVm, TokenOutcome, VmState
from protocol import closecodes
from protocol import messages as m
from protocol.codec import AGENT_TO_MANAGER, DecodeError, decode, encode, starts_as
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
from protocol.versions import SPARSE_ACKS_VERSION

log = logging.getLogger("sysvm.agentlink")

HELLO_TIMEOUT = 10.0
SEND_TIMEOUT = 10.0
WRITE_LIMIT = 64 * 1024
FAST_SEND_BUFFER = WRITE_LIMIT // 2
ENROL_TIMEOUT = 10.0
FLUSH_INTERVAL = 30.0
RECONCILE_INTERVAL = 30.0
LAST_SEEN_GRANULARITY = 300.0
RECORD_BATCH_WINDOW = 0.05
SQL_CHUNK = 500  # ids per statement in bulk reads/writes (well under SQLite's 32,766 params)
TICK_INTERVAL = 2.0
TICK_CHUNK = 1000  # sessions ticked between two yields to the loop
# Heap freezing (see freeze_decision): sessions that must be new since the last freeze, and
# quiet seconds (no new session) before freezing.
GC_FREEZE_MIN_NEW = 1000
GC_FREEZE_SETTLE = 10.0
GC_FREEZE_RAMP_STEP = 2000  # during a long ramp of connections, freeze every this many
GC_FROZEN_MAX_AGE = 600.0  # a frozen heap is unfrozen (one full collection) this often
LIVE_STATES = frozenset({VmState.STARTING, VmState.RUNNING, VmState.STOPPING, VmState.STOPPED})
DEAD_STATES = frozenset({VmState.DESTROYED, VmState.EXPUNGING})

MethodHandler = Callable[[str, Mapping[str, Any]], Awaitable[Mapping[str, Any]]]
EventHandler = Callable[[str, str, Mapping[str, Any]], None]


class LinkError(Exception):
    """The VM has no live channel, or it dropped before an answer came."""


class RequestError(Exception):
    """The agent answered a request with ``ok=False``."""


# --- pure decisions -------------------------------------------------------------------


def needs_push(desired: int, acked: int, sent: int) -> bool:
    """A config must be sent when the VM's desired version is newer than what its agent has
    (its hello's ``applied_version``, then its acks) and than what is already in flight."""
    return desired > max(acked, sent)


def hello_changes_record(
    vm: SystemVm, agent_version: str | None, image_version: str | None, applied: int
) -> bool:
    """Pure: does a hello carry anything the store does not already have?"""
    return (
        vm.agent_version != agent_version
        or vm.image_version != image_version
        or applied > vm.applied_version
    )


def freeze_decision(
    *,
    live: int,
    frozen: int,
    closed_since: int,
    quiet_for: float,
    swept: bool = True,
    frozen_for: float = 0.0,
) -> str | None:
    """Pure: what to do with the collector's permanent generation, given the live sessions,
    the sessions live at the last ``gc.freeze()`` (0: nothing frozen), sessions closed since
    and seconds since the last new session.

    Why: 10,000 sessions are ~1 M long-lived objects; each full collection walked them all
    (~1 s on the 2-core target, every ~30 s at 2,000 heartbeats/s: the loop's worst lag and
    ~3% of a core). Once a burst of connections has settled they are frozen (never walked
    again); when many frozen sessions have closed, the heap is unfrozen so their cycles are
    collected (one full collection, at a time of churn anyway), and frozen again later.

    ``"unfreeze"``: more than a tenth (at least 100) of the frozen sessions closed.
    ``"freeze"``: (``swept``) a full collection ran since the last unfreeze, so the closed
    sessions' garbage is not frozen again, and either at least ``GC_FREEZE_MIN_NEW``
    sessions more than at the last freeze with no new session for ``GC_FREEZE_SETTLE``
    seconds, or ``GC_FREEZE_RAMP_STEP`` more while connections keep coming (a ramp of
    10,000 agents lasts about a minute, and its unfrozen full collections took ~1.4 s).
    ``"refreeze"``: the heap is frozen and stays so; what was allocated since and is still
    alive is frozen too, after a young collection. websockets keeps ~4 objects per idle
    connection that it replaces with each frame (parser generator, last frame, buffers):
    at 10,000 agents ~40,000 young objects the collector walked every ~15 s (gen 0, 1 and
    often 2: ~35 + 40 + 120 ms). Frozen every tick, a young collection sees ~2 s of them.
    ``"unfreeze"`` also every ``GC_FROZEN_MAX_AGE`` seconds: a cycle that became garbage
    after it was frozen is found by the full collection that follows.
    ``None``: nothing."""
    if frozen and (closed_since > max(100, frozen // 10) or frozen_for >= GC_FROZEN_MAX_AGE):
        return "unfreeze"
    new = live - frozen
    if swept and (
        (new >= GC_FREEZE_MIN_NEW and quiet_for >= GC_FREEZE_SETTLE) or new >= GC_FREEZE_RAMP_STEP
    ):
        return "freeze"
    if frozen:
        return "refreeze"
    return None


def refusal_status(reason: str) -> HTTPStatus:
    """401 for 'who are you?', 403 for 'we know you, and no'."""
    return HTTPStatus.FORBIDDEN if reason in ("revoked", "unknown_vm") else HTTPStatus.UNAUTHORIZED


def classify_tls_error(exc: ssl.SSLError) -> str:
    """Pure: metric label for a refused TLS handshake."""
    reason = str(getattr(exc, "reason", None) or "").upper()
    if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE" in reason:
        return "bad_certificate"
    if reason == "HTTP_REQUEST":
        return "plain_http"
    if reason in ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "UNSUPPORTED_PROTOCOL"):
        return "not_tls"
    return "tls_error"


class RateLimitedLog:
    """At most ``per_interval`` lines per key per interval; the rest are counted and the
    count is reported with the next line that gets through (a fuzzer cannot flood stderr)."""

    def __init__(self, per_interval: int = 20, interval: float = 10.0) -> None:
        self.per_interval = per_interval
        self.interval = interval
        self._window: dict[str, tuple[float, int, int]] = {}

    def allow(self, key: str, now: float) -> tuple[bool, int]:
        start, n, suppressed = self._window.get(key, (now, 0, 0))
        if now - start >= self.interval:
            start, n = now, 0
        if n < self.per_interval:
            self._window[key] = (start, n + 1, 0)
            return True, suppressed
        self._window[key] = (start, n, suppressed + 1)
        return False, 0


# --- TLS handshake accounting ---------------------------------------------------------


def count_tls_failures(ctx: ssl.SSLContext, on_failure: Callable[[str], None]) -> None:
    """Makes every refused TLS handshake on ``ctx`` call ``on_failure(label)``. The event
    loop only debug-logs these, so this is where plain-HTTP / plain-ws clients and foreign,
    expired or revoked-by-expiry certificates become visible."""

    class _CountingSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as e:
                on_failure(classify_tls_error(e))
                raise

    ctx.sslobject_class = _CountingSSLObject


# --- sessions -------------------------------------------------------------------------


class AgentConnection(ServerConnection):
    """websockets connection plus what ``process_request`` learnt from the certificate.

    While a session is open, ``fast_frame`` sees each complete binary frame as the
    protocol parses it, before it is queued for ``recv()``; it returns True when it took
    the frame. Heartbeats go that way: waking the session's reader for each one built a
    future, a coroutine chain and an async-generator step per frame (~11 objects a
    connection kept alive until the next frame) — at 10,000 agents a young generation of
    ~110,000 live objects that the collector walked for ~100 ms every ~15 s, besides the
    CPU of the wake-ups themselves."""

    vm: SystemVm | None = None
    serial: int = 0
    fast_frame: Callable[[bytes], bool] | None = None
    #: Messages queued for ``recv()`` and not yet taken (see :meth:`took`). The fast path
    #: is used only when nothing is queued, so frames are still handled in order.
    queued: int = 0

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame) and event.opcode in DATA_OPCODES:
            fast = self.fast_frame
            if (
                fast is not None
                and not self.queued
                and event.opcode is Opcode.BINARY
                and event.fin
                and fast(event.data if isinstance(event.data, bytes) else bytes(event.data))
            ):
                return
            if event.fin:
                self.queued += 1
        super().process_event(event)

    def took(self) -> None:
        """The session's reader took one message from ``recv()``."""
        self.queued = max(0, self.queued - 1)


async def _wait_woken(
    waiters: dict[str, list[asyncio.Future[None]]], key: str, within: float
) -> None:
    """Registers a future under ``key`` in ``waiters`` and waits until it is woken (its
    result set), at most ``within`` s (TimeoutError); it is always unregistered."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.setdefault(key, []).append(fut)
    try:
        await asyncio.wait_for(fut, within)
    finally:
        left = waiters.get(key, [])
        if fut in left:
            left.remove(fut)
        if not left:
            waiters.pop(key, None)


class Session:
    __slots__ = (
        "acked",
        "conv",
        "failed_error",
        "failed_version",
        "last_seen",
        "persisted_seen",
        "sent",
        "serial",
        "status_cache",
        "status_frame",
        "vm_id",
        "waiters",
        "ws",
        "zone_id",
    )

    def __init__(self, vm: SystemVm, serial: int, ws: ServerConnection, conv: Conversation) -> None:
        self.vm_id = vm.id
        self.zone_id = vm.zone_id
        self.serial = serial
        self.ws = ws
        self.conv = conv
        self.acked = vm.applied_version
        self.sent = 0
        self.failed_version = 0
        self.failed_error = ""  # the agent's reason, from its config_ack
        self.last_seen = 0.0
        self.persisted_seen = 0.0
        self.status_cache: Mapping[str, Any] | None = {}
        self.status_frame: bytes | bytearray | memoryview = b""
        self.waiters: dict[int, asyncio.Future[m.Response]] = {}

    @property
    def status(self) -> Mapping[str, Any]:
        """The last status the agent reported (hello or heartbeat). A heartbeat's is kept
        as its frame and decoded on first use: 2,000 heartbeats/s each keeping a few fresh
        dicts alive for one interval promoted ~8,000 objects/s into the collector's oldest
        generation, and with 10,000 agents its full collections (~1 M objects) stalled the
        loop for ~1 s every ~30 s. Bytes are not tracked by the collector."""
        cached = self.status_cache
        if cached is None:
            cached = {}
            with contextlib.suppress(DecodeError):
                msg = decode(self.status_frame, AGENT_TO_MANAGER)
                if isinstance(msg, m.Heartbeat):
                    cached = msg.status
            self.status_cache = cached
            self.status_frame = b""
        return cached

    @status.setter
    def status(self, value: Mapping[str, Any]) -> None:
        self.status_cache = value
        self.status_frame = b""

    def heartbeat(self, frame: bytes | bytearray | memoryview, now: float) -> None:
        """Records a heartbeat the conversation accepted (``frame`` is its bytes)."""
        self.last_seen = now
        self.status_cache = None
        self.status_frame = frame


@dataclass
class LinkConfig:
    heartbeat_interval: Callable[[], float]
    peer_timeout_factor: Callable[[], float]
    cert_validity: Callable[[], dt.timedelta]
    going_away_retry: float = 2.0
    #: Heartbeats per ack for agents speaking protocol 2+ (``welcome.ack_every``).
    ack_every: Callable[[], int] = lambda: 1
    reconcile_interval: float = RECONCILE_INTERVAL


class AgentLinks:
    def __init__(
        self,
        *,
        store: Store,
        settings: Any,
        metrics: Metrics,
        pki: Pki,
        clock: Callable[[], float] = time.time,
        config: LinkConfig | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.pki = pki
        self.clock = clock
        self.config = config or LinkConfig(
            heartbeat_interval=lambda: float(settings.get("sysvm.agent.heartbeat.interval")),
            peer_timeout_factor=lambda: float(settings.get("ping.timeout")),
            ack_every=lambda: int(settings.get("sysvm.agent.heartbeat.ack.every")),
            cert_validity=lambda: dt.timedelta(days=int(settings.get("sysvm.agent.cert.validity"))),
        )
        self.sessions: dict[str, Session] = {}
        self.methods: dict[str, MethodHandler] = {}
        self.event_handlers: list[EventHandler] = []
        self._dirty: set[str] = set()
        # VM id -> futures of disconnect_and_wait() callers; woken when its session changes.
        self._session_changed: dict[str, list[asyncio.Future[None]]] = {}
        self._dirty_event = asyncio.Event()
        self._command_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._ack_waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._logrl = RateLimitedLog()
        # Group commit of hello records and acks (one transaction per batch, not per agent).
        self._pending_fields: dict[str, dict[str, Any]] = {}
        self._pending_applied: dict[str, int] = {}
        self._record_event = asyncio.Event()
        # Heap freezing (freeze_decision): sessions live at the last freeze, closed since,
        # and when the last session was registered (monotonic).
        self._gc_frozen = 0
        self._gc_closed = 0
        self._gc_full_at_unfreeze = -1  # full collections counted at the last unfreeze
        self._gc_frozen_at = 0.0  # when the heap was last frozen from unfrozen
        self._last_connect = 0.0
        # Per-frame counters: a cell each, incremented in place (the hot path).
        self._frames_in = metrics.counter("sysvm_frames_in_total")
        self._frames_out = metrics.counter("sysvm_frames_out_total")
        self._heartbeats = metrics.counter("sysvm_heartbeats_total")
        self.register_method("renew_certificate", self._renew_certificate)

    # --- public API (ManagerContext.links) --------------------------------------------

    def register_method(self, name: str, handler: MethodHandler) -> None:
        """``handler(vm_id, params) -> result`` answers agent ``request``s named ``name``.
        It runs inline in the VM's session: keep it short (a few DB reads/writes)."""
        self.methods[name] = handler

    def on_event(self, handler: EventHandler) -> None:
        """``handler(vm_id, name, data)`` for every ``event`` an agent sends."""
        self.event_handlers.append(handler)

    def is_connected(self, vm_id: str) -> bool:
        return vm_id in self.sessions

    def connected_ids(self) -> list[str]:
        return list(self.sessions)

    def acked_version(self, vm_id: str) -> int:
        """The newest config version the connected agent acknowledged (0: not connected).
        Ahead of the store's ``applied_version``, which acks reach by group commit."""
        sess = self.sessions.get(vm_id)
        return sess.acked if sess is not None else 0

    def failed_version(self, vm_id: str) -> int:
        """The newest config version the connected agent reported it could not apply."""
        sess = self.sessions.get(vm_id)
        return sess.failed_version if sess is not None else 0

    async def wait_config_acks(self, vm_ids: Collection[str], timeout: float) -> None:  # noqa: ASYNC109
        """Returns at the next config ack (applied or failed) from one of these VMs'
        agents, or after ``timeout`` seconds — whichever comes first. Only the waiters of
        the VM that acked wake (100 jobs waiting on 100 routers: 100 wake-ups, not 10,000)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for vm_id in vm_ids:
            self._ack_waiters.setdefault(vm_id, set()).add(fut)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout)
        finally:
            for vm_id in vm_ids:
                waiters = self._ack_waiters.get(vm_id)
                if waiters is not None:
                    waiters.discard(fut)
                    if not waiters:
                        del self._ack_waiters[vm_id]

    def _wake_ack_waiters(self, vm_id: str) -> None:
        for fut in self._ack_waiters.pop(vm_id, ()):
            if not fut.done():
                fut.set_result(None)

    def status(self, vm_id: str) -> Mapping[str, Any] | None:
        """Last status an agent reported (hello or heartbeat), if connected."""
        s = self.sessions.get(vm_id)
        return None if s is None else s.status

    def last_seen(self, vm_id: str) -> float | None:
        s = self.sessions.get(vm_id)
        return None if s is None else s.last_seen

    def desired_changed(self, vm_ids: list[str] | tuple[str, ...] | set[str]) -> None:
        """Call after the transaction that bumped these VMs' desired_version committed."""
        n = 0
        for vm_id in vm_ids:
            if vm_id in self.sessions:
                self._dirty.add(vm_id)
                n += 1
        if n:
            self._dirty_event.set()

    async def send_command(
        self,
        vm_id: str,
        name: str,
        args: Mapping[str, Any],
        command_id: str | None = None,
    ) -> str:
        """Stores the command (idempotent by id) and sends it if the VM is connected; it is
        re-sent on every reconnect until the agent reports a result."""
        cid = command_id or str(uuid.uuid4())
        async with self.store.transaction() as tx:
            await tx.add_command(vm_id, cid, name, dict(args), self.clock())
        cmd = await self.store.get_command(cid)
        if cmd is None or cmd.vm_id != vm_id:
            raise LinkError(f"command {cid} belongs to another VM")
        if cmd.state == "pending":
            sess = self.sessions.get(vm_id)
            if sess is not None:
                await self._send(sess, m.Command(id=cid, name=cmd.name, args=dict(cmd.args)))
                self.metrics.inc("sysvm_commands_total")
        return cid

    async def wait_command(self, command_id: str, timeout: float) -> Any:  # noqa: ASYNC109
        """Waits until the command is done or failed; returns the store's Command."""
        deadline = time.monotonic() + timeout
        while True:
            cmd = await self.store.get_command(command_id)
            if cmd is None:
                raise LinkError(f"no command {command_id}")
            if cmd.state != "pending":
                return cmd
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"command {command_id} still pending after {timeout}s")
            with contextlib.suppress(TimeoutError):
                await _wait_woken(self._command_waiters, command_id, min(remaining, 5.0))

    async def request(
        self,
        vm_id: str,
        method: str,
        params: Mapping[str, Any],
        timeout: float,  # noqa: ASYNC109 - the contract's signature
    ) -> dict[str, Any]:
        sess = self.sessions.get(vm_id)
        if sess is None:
            raise LinkError(f"vm {vm_id} is not connected")
        rid, frame = sess.conv.request(method, dict(params), self.clock(), timeout)
        fut: asyncio.Future[m.Response] = asyncio.get_running_loop().create_future()
        sess.waiters[rid] = fut
        try:
            await self._send_frame(sess, frame)
            resp = await asyncio.wait_for(fut, timeout + 1.0)
        except TimeoutError as e:
            raise TimeoutError(f"request {method} to vm {vm_id} timed out") from e
        finally:
            sess.waiters.pop(rid, None)
        if not resp.ok:
            raise RequestError(f"{method}: {resp.error}")
        return dict(resp.result)

    def disconnect(self, vm_id: str, reason: str, code: int = closecodes.CLOSE_POLICY) -> bool:
        """Closes the VM's live session (if any); returns whether there was one."""
        sess = self.sessions.get(vm_id)
        if sess is None:
            return False
        self._spawn(self._close(sess, code, reason))
        return True

    async def disconnect_and_wait(self, vm_id: str, reason: str, within: float) -> bool:
        """Closes the VM's live session (if any) and waits at most ``within`` seconds until
        it is gone (or replaced by a newer one). Returns whether it is."""
        old = self.sessions.get(vm_id)
        if old is None:
            return True
        self.disconnect(vm_id, reason)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.sessions.get(vm_id) is old:
            try:
                await _wait_woken(self._session_changed, vm_id, max(0.0, deadline - loop.time()))
            except TimeoutError:
                break
        return self.sessions.get(vm_id) is not old

    def _wake_session_changed(self, vm_id: str) -> None:
        for fut in self._session_changed.pop(vm_id, ()):
            if not fut.done():
                fut.set_result(None)

    async def revoke(self, vm_id: str, reason: str) -> list[int]:
        """Revokes every certificate of the VM (call when it is destroyed) and closes its live
        session with 4003. Later connections with those certificates get 403."""
        async with self.store.transaction() as tx:
            serials = await tx.revoke_certificates(vm_id, reason, self.clock())
        log.info(
            "event=certificates_revoked vm=%s count=%d reason=%s", vm_id, len(serials), kv(reason)
        )
        sess = self.sessions.get(vm_id)
        if sess is not None:
            await self._close(sess, closecodes.CLOSE_REVOKED, "certificate revoked")
        return serials

    # --- lifecycle --------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        ctx = self.pki.server_ssl_context()
        count_tls_failures(ctx, self._tls_refused)
        self._server = await serve(
            self._handler,
            host,
            port,
            ssl=ctx,
            process_request=self._process_request,
            create_connection=AgentConnection,
            compression=None,
            max_size=AGENT_TO_MANAGER.max_frame,
            max_queue=4,
            write_limit=WRITE_LIMIT,
            ping_interval=None,  # the protocol's heartbeats do liveness; no timer per socket
            open_timeout=10,
            close_timeout=5,
            ssl_handshake_timeout=10,
            server_header=None,
            backlog=1024,
        )
        for coro in (
            self._ticker(),
            self._pusher(),
            self._flusher(),
            self._reconciler(),
            self._recorder(),
        ):
            self._spawn(coro)
        log.info("event=agent_endpoint_listening host=%s port=%d", host, port)

    @property
    def port(self) -> int:
        assert self._server is not None
        for s in self._server.sockets:
            return int(s.getsockname()[1])
        raise RuntimeError("agent endpoint has no socket")

    async def close(self, reason: str = "manager stopping") -> None:
        """Tells every agent ``going_away``, closes with 1001, stops the listener and the
        background tasks, persists last-seen times."""
        self._closing = True
        if self._server is not None:
            self._server.close(close_connections=False)
        sessions = list(self.sessions.values())
        for sess in sessions:
            retry = self.config.going_away_retry * (1 + random.random())  # noqa: S311
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._send(sess, m.GoingAway(reason=reason, retry_after=retry)), 1.0
                )
        await asyncio.gather(
            *(self._close(s, closecodes.CLOSE_GOING_AWAY, reason) for s in sessions),
            return_exceptions=True,
        )
        if self._server is not None:
            self._server.close(close_connections=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 10)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush_records(), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush_last_seen(force=True), 10)
        if self._gc_frozen:
            gc.unfreeze()
            self._gc_frozen = 0
        log.info("event=agent_endpoint_closed sessions=%d", len(sessions))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=link_task_failed error=%s", kv(repr(task.exception())))

    # --- TLS / HTTP refusals ---------------------------------------------------------

    def _tls_refused(self, reason: str) -> None:
        self.metrics.inc("sysvm_tls_handshake_failures_total", reason=reason)
        self.metrics.inc("sysvm_agent_refused_total", reason=f"tls_{reason}")
        ok, suppressed = self._logrl.allow("tls:" + reason, time.monotonic())
        if ok:
            log.warning("event=tls_refused reason=%s suppressed=%d", reason, suppressed)

    def _refuse(self, conn: ServerConnection, reason: str, detail: str = "") -> Response:
        self.metrics.inc("sysvm_agent_refused_total", reason=reason)
        ok, suppressed = self._logrl.allow("refuse:" + reason, time.monotonic())
        if ok:
            log.warning(
                "event=agent_refused reason=%s peer=%s detail=%s suppressed=%d",
                reason,
                _peer(conn),
                kv(detail or "-"),
                suppressed,
            )
        status = refusal_status(reason)
        return conn.respond(status, f"{status.phrase}: {reason}\n")

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/ca.pem":
            resp = conn.respond(HTTPStatus.OK, self.pki.ca_pem.decode())
            resp.headers["Content-Type"] = "application/x-pem-file"
            return resp
        if path == "/enrol":
            if self._closing:
                return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "stopping\n")
            return None
        if path != "/agent":
            return conn.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        if self._closing:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "stopping\n")
        sslobj = conn.transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            return self._refuse(conn, "no_certificate")
        try:
            cert = x509.load_der_x509_certificate(der)
            # OpenSSL verified the chain against our CA (the only one the context trusts).
            vm_id = check_agent_certificate(
                cert, self.pki.ca_cert, dt.datetime.now(dt.UTC), verify_signature=False
            )
        except CertificateRefused as e:
            return self._refuse(conn, e.reason, str(e))
        except ValueError:
            return self._refuse(conn, "bad_certificate")
        serial = cert.serial_number
        if await self.store.is_revoked(serial):
            return self._refuse(conn, "revoked", f"vm={vm_id} serial={serial:x}")
        vm = await self.store.get_system_vm(vm_id)
        if vm is None or vm.state in DEAD_STATES:
            return self._refuse(conn, "unknown_vm", f"vm={vm_id}")
        assert isinstance(conn, AgentConnection)
        conn.vm = vm
        conn.serial = serial
        return None

    # --- connection handlers ---------------------------------------------------------

    async def _handler(self, conn: ServerConnection) -> None:
        assert conn.request is not None
        path = urlsplit(conn.request.path).path
        if path == "/enrol":
            await self._enrol(conn)
        elif path == "/agent" and isinstance(conn, AgentConnection) and conn.vm is not None:
            await self._agent(conn, conn.vm, conn.serial)
        else:  # pragma: no cover - process_request refused everything else
            await conn.close(closecodes.CLOSE_POLICY, "no such endpoint")

    async def _enrol(self, conn: ServerConnection) -> None:
        peer = _peer(conn)
        try:
            frame = await asyncio.wait_for(conn.recv(), ENROL_TIMEOUT)
        except TimeoutError:
            await self._enrol_refused(conn, "timeout", closecodes.CLOSE_POLICY, peer)
            return
        except ConnectionClosed as e:
            if _too_big(e):
                self.metrics.inc("sysvm_decode_errors_total", kind="too_big")
                await self._enrol_refused(conn, "malformed", closecodes.CLOSE_TOO_BIG, peer)
            return
        self._frames_in.value += 1
        try:
            msg = decode(frame, AGENT_TO_MANAGER)
        except DecodeError as e:
            self.metrics.inc("sysvm_decode_errors_total", code=e.code)
            code = closecodes.CLOSE_TOO_BIG if e.code == "too_big" else closecodes.CLOSE_POLICY
            await self._enrol_refused(conn, "malformed", code, peer)
            return
        if not isinstance(msg, m.Enrol):
            await self._enrol_refused(conn, "unexpected_message", closecodes.CLOSE_POLICY, peer)
            return
        if not enrolment.well_formed_vm_id(msg.vm_id):
            await self._enrol_refused(conn, "malformed", closecodes.CLOSE_POLICY, peer)
            return
        try:
            parse_csr(msg.csr)
        except PkiError as e:
            await self._enrol_refused(conn, "bad_csr", closecodes.CLOSE_POLICY, peer, str(e))
            return
        vm = await self.store.get_system_vm(msg.vm_id)
        if vm is None or vm.state in DEAD_STATES:
            # Consume nothing: a token for a dead VM is as good as unknown.
            await self._enrol_refused(conn, "unknown_vm", closecodes.CLOSE_UNAUTHORIZED, peer)
            return
        now = self.clock()
        issued = None
        async with self.store.transaction() as tx:
            outcome = await enrolment.consume_token(tx, msg.vm_id, msg.token, now)
            if outcome is TokenOutcome.OK:
                issued = self.pki.sign_agent_csr(msg.csr, vm.id, self.config.cert_validity())
                await tx.record_certificate(vm.id, issued.serial, issued.not_after)
        if outcome is not TokenOutcome.OK or issued is None:
            await self._enrol_refused(
                conn, f"token_{outcome.value}", closecodes.CLOSE_UNAUTHORIZED, peer, f"vm={vm.id}"
            )
            return
        self.metrics.inc("sysvm_enrolments_total", result="ok", reason="ok")
        log.info(
            "event=enrolled vm=%s name=%s serial=%x peer=%s", vm.id, vm.name, issued.serial, peer
        )
        with contextlib.suppress(ConnectionClosed):
            await conn.send(encode(m.Enrolled(certificate=issued.pem, ca=self.pki.ca_pem)))
            self._frames_out.value += 1
            await conn.close(closecodes.CLOSE_NORMAL, "enrolled")

    async def _enrol_refused(
        self, conn: ServerConnection, reason: str, code: int, peer: str, detail: str = ""
    ) -> None:
        self.metrics.inc("sysvm_enrolments_total", result="refused", reason=reason)
        ok, suppressed = self._logrl.allow("enrol:" + reason, time.monotonic())
        if ok:
            log.warning(
                "event=enrol_refused reason=%s peer=%s detail=%s suppressed=%d",
                reason,
                peer,
                kv(detail or "-"),
                suppressed,
            )
        with contextlib.suppress(ConnectionClosed):
            await conn.send(encode(m.Error(code="enrol_refused", reason=reason)))
            self._frames_out.value += 1
            await conn.close(code, reason[:100])

    async def _agent(self, conn: ServerConnection, vm: SystemVm, serial: int) -> None:
        now = self.clock()
        interval = self.config.heartbeat_interval()
        conv = Conversation(
            Side.MANAGER,
            now=now,
            heartbeat_interval=interval,
            peer_timeout=self._peer_timeout(interval),
        )
        sess = Session(vm, serial, conn, conv)
        # Hello first.
        try:
            frame = await asyncio.wait_for(conn.recv(), HELLO_TIMEOUT)
            if isinstance(conn, AgentConnection):
                conn.took()
        except TimeoutError:
            await conn.close(closecodes.CLOSE_POLICY, "no hello")
            self.metrics.inc("sysvm_sessions_closed_total", reason="no_hello")
            return
        except ConnectionClosed:
            return
        hello = None
        for ev in self._receive(sess, frame):
            if isinstance(ev, Received) and isinstance(ev.msg, m.Hello):
                hello = ev.msg
            elif isinstance(ev, Close):
                await conn.close(ev.code, ev.reason)
                reason = "unsupported_version" if ev.code == 4002 else "protocol"
                self.metrics.inc("sysvm_sessions_closed_total", reason=reason)
                return
        if hello is None or conv.version is None:
            await conn.close(closecodes.CLOSE_POLICY, "first frame must be hello")
            self.metrics.inc("sysvm_sessions_closed_total", reason="no_hello")
            return
        version = conv.version
        old = self.sessions.get(vm.id)
        if old is not None:
            await self._close(old, closecodes.CLOSE_POLICY, "replaced by a newer connection")
        sess.last_seen = now
        sess.status = hello.status
        agent_version = hello.agent_version[:64] or None
        image_version = hello.image_version[:64] or None
        if hello_changes_record(vm, agent_version, image_version, hello.applied_version):
            self._record(
                vm.id,
                {"agent_version": agent_version, "image_version": image_version, "last_seen": now},
                hello.applied_version,
            )
            sess.persisted_seen = now
        # else: a plain reconnect writes nothing now (last_seen is flushed coarsely), which
        # keeps a reconnect storm after a manager restart off the disk.
        # What the agent HAS is what its hello says (it may have lost its disk); the store's
        # applied_version is only the record of acks.
        sess.acked = max(0, hello.applied_version)
        fresh = await self.store.get_system_vm(vm.id)
        if fresh is None or fresh.state in DEAD_STATES:
            await conn.close(closecodes.CLOSE_REVOKED, "vm destroyed")
            return
        reason = "closed"
        try:
            # Welcome goes out before the session is registered, so no push or command can
            # overtake it.
            await self._send(
                sess,
                m.Welcome(
                    version=version,
                    vm_id=vm.id,
                    heartbeat_interval=interval,
                    desired_version=fresh.desired_version,
                    ack_every=self.config.ack_every() if version >= SPARSE_ACKS_VERSION else 1,
                ),
            )
            # Registered from here: a change committed from now on reaches desired_changed;
            # one committed before is seen by the pusher, which re-reads the VM.
            self.sessions[vm.id] = sess
            self._wake_session_changed(vm.id)
            if isinstance(conn, AgentConnection):
                conn.fast_frame = functools.partial(self._fast_frame, sess)
            self._last_connect = time.monotonic()
            self.metrics.set("sysvm_agents_connected", len(self.sessions))
            log.info(
                "event=agent_connected vm=%s name=%s peer=%s version=%d applied=%d desired=%d",
                vm.id,
                vm.name,
                _peer(conn),
                version,
                hello.applied_version,
                fresh.desired_version,
            )
            self._dirty.add(vm.id)
            self._dirty_event.set()
            for cmd in await self.store.pending_commands(vm.id):
                await self._send(sess, m.Command(id=cmd.id, name=cmd.name, args=dict(cmd.args)))
                self.metrics.inc("sysvm_commands_total")
            async for frame in conn:
                if isinstance(conn, AgentConnection):
                    conn.took()
                if await self._on_frame(sess, frame):
                    reason = "protocol"
        except ConnectionClosed as e:
            if _too_big(e):
                reason = "too_big"
                self.metrics.inc("sysvm_decode_errors_total", kind="too_big")
        except LinkError:
            reason = "too_slow"
        finally:
            if isinstance(conn, AgentConnection):
                conn.fast_frame = None
            if self.sessions.get(vm.id) is sess:
                del self.sessions[vm.id]
                self._gc_closed += 1
                self._dirty.discard(vm.id)
            self._wake_session_changed(vm.id)
            for fut in sess.waiters.values():
                if not fut.done():
                    fut.set_exception(LinkError(f"vm {vm.id} disconnected"))
            self.metrics.set("sysvm_agents_connected", len(self.sessions))
            self.metrics.inc("sysvm_sessions_closed_total", reason=reason)
            log.info(
                "event=agent_disconnected vm=%s code=%s reason=%s",
                vm.id,
                conn.close_code,
                kv(conn.close_reason or reason),
            )

    async def _on_frame(self, sess: Session, frame: bytes | str) -> bool:
        """One frame of an open session; True when the conversation closed it. A method of
        its own so that nothing of the frame (the last message, its status dicts) stays
        referenced while the session waits for the next one (see :attr:`Session.status`)."""
        for ev in self._receive(sess, frame):
            if isinstance(ev, Received):
                msg = ev.msg
                if isinstance(msg, m.Heartbeat) and not isinstance(frame, str):
                    # Inline: the one message every agent sends every few seconds.
                    sess.heartbeat(frame, self.clock())
                    self._heartbeats.value += 1  # the Conversation replies the ack
                else:
                    await self._dispatch(sess, msg)
            elif isinstance(ev, Reply):
                await self._send_frame(sess, ev.frame)
            elif isinstance(ev, Close):
                await sess.ws.close(ev.code, ev.reason)
                return True
            elif isinstance(ev, ResponseArrived):
                self._resolve(sess, ev.request_id, ev.response)
        return False

    def _fast_frame(self, sess: Session, frame: bytes) -> bool:
        """A binary frame straight from the protocol (see :class:`AgentConnection`):
        heartbeats are handled here, synchronously; anything else goes to the session's
        reader (False). Never raises: it runs inside the transport's data callback."""
        if not starts_as(frame, "heartbeat"):
            return False
        try:
            for ev in self._receive(sess, frame):
                if isinstance(ev, Received):
                    if isinstance(ev.msg, m.Heartbeat):
                        sess.heartbeat(frame, self.clock())
                        self._heartbeats.value += 1
                    else:  # not with this prefix; still, never drop a message
                        self._spawn(self._dispatch(sess, ev.msg))
                elif isinstance(ev, Reply):  # the ack (every Nth) or an error reply
                    self._spawn(self._send_quietly(sess, ev.frame))
                elif isinstance(ev, Close):
                    self._spawn(self._close(sess, ev.code, ev.reason))
                elif isinstance(ev, ResponseArrived):
                    self._resolve(sess, ev.request_id, ev.response)
        except Exception:
            log.exception("event=fast_frame_failed vm=%s", sess.vm_id)
            self._spawn(self._close(sess, closecodes.CLOSE_POLICY, "internal error"))
        return True

    async def _send_quietly(self, sess: Session, frame: bytes) -> None:
        """A reply from the fast path: a closed or too-slow peer ends its own session."""
        with contextlib.suppress(ConnectionClosed, LinkError):
            await self._send_frame(sess, frame)

    def _peer_timeout(self, interval: float) -> float:
        return interval * max(2.0, self.config.peer_timeout_factor()) + 5.0

    def _receive(self, sess: Session, frame: bytes | str) -> list[Any]:
        self._frames_in.value += 1
        events = sess.conv.receive(frame, self.clock())
        # A frame the application gets starts with Received / ResponseArrived; a refused one
        # yields only a Reply (error) or a Close.
        if events and not isinstance(events[0], Received | ResponseArrived):
            # Only a Reply (error) or a Close: the frame was refused (bad bytes, bad field,
            # unknown or unexpected type, out of order).
            kind = "fatal" if any(isinstance(ev, Close) for ev in events) else "refused"
            self.metrics.inc("sysvm_decode_errors_total", kind=kind)
        return events

    async def _dispatch(self, sess: Session, msg: m.Message) -> None:
        if isinstance(msg, m.Heartbeat):
            sess.last_seen = self.clock()
            sess.status = msg.status
            self._heartbeats.value += 1  # the Conversation replies the ack
        elif isinstance(msg, m.ConfigAck):
            await self._config_ack(sess, msg)
        elif isinstance(msg, m.CommandResult):
            await self._command_result(sess, msg)
        elif isinstance(msg, m.Request):
            await self._agent_request(sess, msg)
        elif isinstance(msg, m.Response):
            self._resolve(sess, msg.id, msg)
        elif isinstance(msg, m.Event):
            for h in list(self.event_handlers):
                try:
                    h(sess.vm_id, msg.name, msg.data)
                except Exception:
                    log.exception(
                        "event=event_handler_failed vm=%s name=%s", sess.vm_id, kv(msg.name)
                    )
        elif isinstance(msg, m.Error):
            log.warning(
                "event=agent_error vm=%s code=%s reason=%s",
                sess.vm_id,
                kv(msg.code),
                kv(msg.reason),
            )
        else:
            await self._send(
                sess, m.Error(code="unexpected", reason=f"{msg.type} is not accepted here")
            )

    async def _config_ack(self, sess: Session, msg: m.ConfigAck) -> None:
        try:
            self._note_config_ack(sess, msg)
        finally:
            self._wake_ack_waiters(sess.vm_id)

    def _note_config_ack(self, sess: Session, msg: m.ConfigAck) -> None:
        if msg.ok:
            self.metrics.inc("sysvm_config_acks_total", result="ok")
            if msg.version > sess.acked:
                sess.acked = msg.version
                self._record(sess.vm_id, None, msg.version)
            log.info("event=config_applied vm=%s version=%d", sess.vm_id, msg.version)
            self._dirty.add(sess.vm_id)  # something newer may have been committed meanwhile
            self._dirty_event.set()
        else:
            self.metrics.inc("sysvm_config_acks_total", result="failed")
            if msg.version > sess.failed_version:  # once per version: event + alert
                self._spawn(self._config_failure(sess.vm_id, msg.version, sess.acked, msg.error))
            if msg.version >= sess.failed_version:
                sess.failed_version = msg.version
                sess.failed_error = msg.error[:500]
            log.warning(
                "event=config_failed vm=%s version=%d error=%s",
                sess.vm_id,
                msg.version,
                kv(msg.error[:300]),
            )

    async def _config_failure(self, vm_id: str, version: int, kept: int, error: str) -> None:
        """What an operator sees of a config the agent could not apply (it rolled back and
        keeps serving ``kept``): an ERROR event and an alert. An API change also fails its
        job with the reason; a settings change has no job, so this is where it shows."""
        try:
            vm = await self.store.get_system_vm(vm_id)
            if vm is None or vm.role not in vm_events.ALERT_TYPES:
                return
            reason = " ".join(error.split())[:300] or "(no reason given)"
            text = f"could not apply config version {version}, keeps version {kept}: {reason}"
            async with self.store.transaction() as tx:
                await vm_events.record(
                    tx, vm, "CONFIG.FAILED", "ERROR", text, now=self.clock(), alert=True
                )
        except Exception as e:  # an alert must never take the link down
            log.warning("event=config_failure_not_recorded vm=%s error=%s", vm_id, kv(repr(e)))

    async def _command_result(self, sess: Session, msg: m.CommandResult) -> None:
        cmd = await self.store.get_command(msg.id)
        self.metrics.inc("sysvm_command_results_total", result="ok" if msg.ok else "failed")
        if cmd is None or cmd.vm_id != sess.vm_id:
            log.warning("event=command_result_unknown vm=%s id=%s", sess.vm_id, kv(msg.id[:64]))
            return
        if cmd.state == "pending":
            async with self.store.transaction() as tx:
                await tx.complete_command(msg.id, msg.ok, msg.result, msg.error)
            log.info(
                "event=command_done vm=%s id=%s name=%s ok=%s",
                sess.vm_id,
                msg.id,
                kv(cmd.name),
                msg.ok,
            )
        for fut in self._command_waiters.pop(msg.id, []):
            if not fut.done():
                fut.set_result(None)

    async def _agent_request(self, sess: Session, msg: m.Request) -> None:
        handler = self.methods.get(msg.method)
        if handler is None:
            await self._send(
                sess, m.Response(id=msg.id, ok=False, error=f"unknown method {msg.method[:64]!r}")
            )
            return
        try:
            result = await asyncio.wait_for(handler(sess.vm_id, msg.params), 30)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning(
                "event=agent_request_failed vm=%s method=%s error=%s",
                sess.vm_id,
                kv(msg.method),
                kv(repr(e)[:300]),
            )
            await self._send(sess, m.Response(id=msg.id, ok=False, error=str(e)[:500]))
            return
        await self._send(sess, m.Response(id=msg.id, ok=True, result=dict(result)))

    async def _renew_certificate(self, vm_id: str, params: Mapping[str, Any]) -> dict[str, Any]:
        csr = params.get("csr")
        if not isinstance(csr, bytes):
            raise PkiError("params.csr must be PEM bytes")
        issued = self.pki.sign_agent_csr(csr, vm_id, self.config.cert_validity())
        async with self.store.transaction() as tx:
            await tx.record_certificate(vm_id, issued.serial, issued.not_after)
        self.metrics.inc("sysvm_certificates_renewed_total")
        log.info("event=certificate_renewed vm=%s serial=%x", vm_id, issued.serial)
        return {"certificate": issued.pem, "ca": self.pki.ca_pem}

    def _resolve(self, sess: Session, request_id: int, response: m.Response | None) -> None:
        fut = sess.waiters.get(request_id)
        if fut is None or fut.done():
            return
        if response is None:
            fut.set_exception(TimeoutError(f"request {request_id} timed out"))
        else:
            fut.set_result(response)

    async def _send(self, sess: Session, msg: m.Message) -> None:
        await self._send_frame(sess, sess.conv.send(msg))

    async def _send_frame(self, sess: Session, frame: bytes) -> None:
        """Sends one frame; an agent that does not read (its socket buffer stays full for
        SEND_TIMEOUT) is cut off, so it can never stall the pusher or shutdown."""
        ws = sess.ws
        try:
            if ws.transport.get_write_buffer_size() < FAST_SEND_BUFFER:
                # Below the high-water mark send() does not wait: skip the timer (hot path,
                # one heartbeat ack per heartbeat).
                await ws.send(frame)
            else:
                async with asyncio.timeout(SEND_TIMEOUT):
                    await ws.send(frame)
        except TimeoutError:
            log.warning("event=agent_too_slow vm=%s", sess.vm_id)
            self.metrics.inc("sysvm_sessions_closed_total", reason="too_slow")
            sess.ws.transport.abort()
            raise LinkError(f"vm {sess.vm_id} does not read its socket") from None
        self._frames_out.value += 1

    async def _close(self, sess: Session, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sess.ws.close(code, reason), 6)

    # --- background tasks ------------------------------------------------------------

    def _manage_heap(self) -> None:
        action = freeze_decision(
            live=len(self.sessions),
            frozen=self._gc_frozen,
            closed_since=self._gc_closed,
            quiet_for=time.monotonic() - self._last_connect,
            swept=gc.get_stats()[-1]["collections"] > self._gc_full_at_unfreeze,
            frozen_for=time.monotonic() - self._gc_frozen_at,
        )
        if action == "refreeze":
            gc.collect(1)
            gc.freeze()
        elif action == "freeze":
            gc.collect(1)
            gc.freeze()
            if not self._gc_frozen:
                self._gc_frozen_at = time.monotonic()
            log.info(
                "event=heap_frozen sessions=%d objects=%d",
                len(self.sessions),
                gc.get_freeze_count(),
            )
            self._gc_frozen = len(self.sessions)
            self._gc_closed = 0
        elif action == "unfreeze":
            gc.unfreeze()
            self._gc_full_at_unfreeze = gc.get_stats()[-1]["collections"]
            log.info("event=heap_unfrozen closed=%d", self._gc_closed)
            self._gc_frozen = 0
            self._gc_closed = 0

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL)
            self._manage_heap()
            now = self.clock()
            for n, sess in enumerate(list(self.sessions.values()), 1):
                if n % TICK_CHUNK == 0:  # 10,000 sessions: yield to heartbeats in between
                    await asyncio.sleep(0)
                if sess.conv.closed:
                    continue
                for ev in sess.conv.tick(now):
                    if isinstance(ev, PeerSilent):
                        log.warning("event=agent_silent vm=%s", sess.vm_id)
                        self.metrics.inc("sysvm_sessions_closed_total", reason="silent")
                        self._spawn(self._close(sess, closecodes.CLOSE_GOING_AWAY, "peer silent"))
                    elif isinstance(ev, RequestTimedOut):
                        self._resolve(sess, ev.request_id, None)
                    elif isinstance(ev, Close):
                        self._spawn(self._close(sess, ev.code, ev.reason))

    async def _pusher(self) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            batch, self._dirty = self._dirty, set()
            try:
                await self._push_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=push_failed count=%d", len(batch))
                # Keep them dirty; retry after a pause (a DB hiccup must not lose pushes).
                self._dirty |= batch
                await asyncio.sleep(1.0)
                self._dirty_event.set()

    async def _push_batch(self, batch: set[str]) -> None:
        ids = [i for i in batch if i in self.sessions]
        if not ids:
            return
        # Versions FIRST, setting values AFTER: the change that bumped version V committed
        # together with its values, so a config rendered now contains at least V.
        # A cheap versions-only read first: after a reconnect storm almost every agent is
        # up to date, and none of those needs its VM record read.
        versions = await self._desired_versions(ids)
        stale = []
        for vm_id, desired in versions.items():
            sess = self.sessions.get(vm_id)
            if sess is not None and needs_push(desired, sess.acked, sess.sent):
                stale.append(vm_id)
        if not stale:
            return
        if len(stale) > 1000:
            wanted = set(stale)
            vms = [vm for vm in await self.store.list_system_vms() if vm.id in wanted]
        else:
            vms = [
                vm for vm in [await self.store.get_system_vm(i) for i in stale] if vm is not None
            ]
        todo = []
        for vm in vms:
            sess = self.sessions.get(vm.id)
            if sess is None:
                continue
            if needs_push(vm.desired_version, sess.acked, sess.sent):
                todo.append((sess, vm))
        if not todo:
            return
        snapshot = await self._settings_snapshot()
        # The heartbeat interval travels in the config; never judge an agent silent by a
        # shorter timeout than the interval it may still be using.
        timeout = self._peer_timeout(float(snapshot.get("sysvm.agent.heartbeat.interval")))
        for sess, vm in todo:
            sess.conv.peer_timeout = max(sess.conv.peer_timeout, timeout)
            config = render_config(vm, snapshot)
            sess.sent = vm.desired_version
            try:
                await self._send(sess, m.Config(version=vm.desired_version, config=config))
            except (ConnectionClosed, LinkError):
                continue
            self.metrics.inc("sysvm_config_pushes_total")
            log.info("event=config_pushed vm=%s version=%d", vm.id, vm.desired_version)

    async def _desired_versions(self, ids: list[str]) -> dict[str, int]:
        """``desired_version`` of these VMs as committed now (absent: no such VM)."""
        out: dict[str, int] = {}
        for i in range(0, len(ids), SQL_CHUNK):
            chunk = ids[i : i + SQL_CHUNK]
            rows = await self.store.fetchall(
                "SELECT id, desired_version FROM system_vms"  # noqa: S608 - only placeholders
                f" WHERE id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            for row in rows:
                out[row["id"]] = int(row["desired_version"])
        return out

    async def _settings_snapshot(self) -> Any:
        """Setting values as committed now (not the in-memory cache, which is updated only
        after commit callbacks run)."""
        snap = type(self.settings)(self.store)
        await snap.load()
        return snap

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self._flush_last_seen()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=last_seen_flush_failed")

    def _record(self, vm_id: str, fields: dict[str, Any] | None, applied: int) -> None:
        """Queues what a hello / ack taught us for the next group commit. Losing a batch in a
        crash loses nothing: the agent's next hello reports its applied version again."""
        if fields:
            self._pending_fields.setdefault(vm_id, {}).update(fields)
        if applied > self._pending_applied.get(vm_id, 0):
            self._pending_applied[vm_id] = applied
        self._record_event.set()

    async def _recorder(self) -> None:
        while True:
            await self._record_event.wait()
            await asyncio.sleep(RECORD_BATCH_WINDOW)  # let a burst (reconnect storm) gather
            self._record_event.clear()
            try:
                await self._flush_records()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=record_flush_failed")
                await asyncio.sleep(1.0)
                self._record_event.set()

    async def _flush_records(self) -> None:
        fields, self._pending_fields = self._pending_fields, {}
        applied, self._pending_applied = self._pending_applied, {}
        if not fields and not applied:
            return
        try:
            async with self.store.transaction() as tx:
                await self._write_records(tx, fields, applied)
        except Exception:
            # One bad row (a VM deleted meanwhile) must not sink the batch: retry one by one.
            for vm_id in set(fields) | set(applied):
                try:
                    async with self.store.transaction() as tx:
                        await self._write_records(
                            tx,
                            {vm_id: fields[vm_id]} if vm_id in fields else {},
                            {vm_id: applied[vm_id]} if vm_id in applied else {},
                        )
                except Exception as e:
                    log.warning("event=record_dropped vm=%s error=%s", vm_id, kv(repr(e)[:200]))

    @staticmethod
    async def _write_records(tx: Any, fields: dict[str, Any], applied: dict[str, int]) -> None:
        for vm_id, f in fields.items():
            await tx.update_system_vm(vm_id, **f)
        for vm_id, version in applied.items():
            await tx.record_applied(vm_id, max(0, version))

    async def _reconciler(self) -> None:
        """Safety net for revocation: a live session whose VM is no longer live (destroyed
        by any code path) or whose certificate serial was revoked is revoked and closed 4003."""
        while True:
            await asyncio.sleep(self.config.reconcile_interval)
            try:
                await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=reconcile_failed")

    async def _reconcile(self) -> None:
        if not self.sessions:
            return
        # Ids only: building 10,000 VM records every 30 s just to test membership showed
        # up as loop lag.
        rows = await self.store.fetchall(
            "SELECT id FROM system_vms"  # noqa: S608 - only placeholders
            f" WHERE state IN ({','.join('?' * len(LIVE_STATES))})",
            [st.value for st in LIVE_STATES],
        )
        live = {row["id"] for row in rows}
        revoked = await self.store.revoked_serials()
        for sess in list(self.sessions.values()):
            if sess.vm_id not in live:
                await self.revoke(sess.vm_id, "vm destroyed")
            elif sess.serial in revoked:
                log.info("event=session_revoked vm=%s serial=%x", sess.vm_id, sess.serial)
                await self._close(sess, closecodes.CLOSE_REVOKED, "certificate revoked")

    async def _flush_last_seen(self, force: bool = False) -> None:
        """Persists last-seen times coarsely: a session is written when its stored value is
        more than LAST_SEEN_GRANULARITY old (all of them on shutdown), so 10,000 agents cost a
        few dozen row updates per second, not one per heartbeat."""
        horizon = 0.0 if force else LAST_SEEN_GRANULARITY
        stale = [s for s in self.sessions.values() if s.last_seen - s.persisted_seen > horizon]
        # One statement per chunk, one (non-durable) transaction per chunk: the loop gets
        # the writer back between chunks instead of 10,000 row updates in one go.
        for i in range(0, len(stale), SQL_CHUNK):
            chunk = stale[i : i + SQL_CHUNK]
            seen = [(s.vm_id, s.last_seen) for s in chunk]
            params: list[Any] = []
            for vm_id, at in seen:
                params.append(vm_id)
                params.append(at)
            values = ",".join("(?,?)" for _ in seen)
            async with self.store.transaction(durable=False) as tx:
                await tx.execute(
                    f"WITH seen(id, at) AS (VALUES {values}) "  # noqa: S608 - placeholders
                    "UPDATE system_vms SET last_seen = "
                    "(SELECT at FROM seen WHERE seen.id = system_vms.id) "
                    "WHERE id IN (SELECT id FROM seen)",
                    params,
                )
            for s, (_, at) in zip(chunk, seen, strict=True):
                s.persisted_seen = at


def _too_big(e: ConnectionClosed) -> bool:
    """The websocket layer refused a frame over ``max_size`` (we sent close 1009)."""
    return e.sent is not None and e.sent.code == closecodes.CLOSE_TOO_BIG


def _peer(conn: ServerConnection) -> str:
    try:
        addr = conn.remote_address
    except Exception:
        return "-"
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return "-"


__all__ = [
    "AgentLinks",
    "LinkError",
    "RequestError",
    "Session",
    "needs_push",
]
