"""The console proxy server: console page (aiohttp) and the websocket-to-VNC relay.

One TCP listener. Each accepted connection starts in :class:`Conn`, a raw asyncio Protocol
that reads the HTTP request head:

- ``GET /websockify`` with ``Upgrade: websocket`` is ours. Before upgrading, the request is
  checked (draining, global and per-client-IP caps, Origin allowlist, well-formed token and
  VM id), then the token is authorised (:data:`Authorizer`, by default the manager's
  ``console.authorize``), then the proxy connects to the hypervisor's VNC port and
  authenticates there itself (:mod:`.rfb`). Only then does it answer ``101``; the browser
  then gets an RFB handshake offering security "None" (or the hypervisor-side failure as an
  RFB security failure, which noVNC shows) and the bytes are relayed both ways by the two
  protocols' ``data_received`` callbacks — no task, no stream reader per session.
- Anything else is handed to aiohttp (the page, the noVNC files, ``/healthz``): the
  connection's transport is switched to aiohttp's request handler protocol. Browsers open a
  fresh connection for every websocket, so an upgrade never arrives on a connection aiohttp
  already owns; if one does, aiohttp answers 400 with a clear message.

Limits per session: handshake deadline, idle timeout (traffic either way resets it), maximum
session length, write buffers bounded both ways (a full buffer toward one side pauses reading
from the other), websocket frames capped. A housekeeping task enforces the timers and sends
``console.sessions`` load reports; every session open/close sends one too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from aiohttp import web

from agent.roles.consoleproxy import rfb, wsframe

log = logging.getLogger("sysvm.consoleproxy")

STATIC_DIR = Path(__file__).with_name("static")
MAX_HEAD = 8192
WS_PATH = "/websockify"
MAX_EARLY = 64 * 1024  # VNC bytes held while the browser finishes its RFB handshake
REPORT_GAP = 0.1  # seconds between session-change reports (they are coalesced)


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    host: str = "0.0.0.0"
    port: int = 80
    novnc_dir: Path = Path("/usr/share/sysvm/novnc")
    allowed_origins: frozenset[str] = frozenset()  # besides the page's own origin
    allow_same_origin: bool = True
    allow_missing_origin: bool = False  # browsers always send Origin
    handshake_timeout: float = 10.0
    authorize_timeout: float = 5.0
    idle_timeout: float = 900.0
    max_session: float = 8 * 3600.0
    max_sessions: int = 500
    max_per_ip: int = 20
    max_frame: int = 1 << 20
    write_high: int = 256 * 1024
    write_low: int = 64 * 1024
    loadscan_interval: float = 5.0
    sweep_interval: float = 1.0
    draining: bool = False
    session_max_report: int = 50  # consoleproxy.session.max, only reported
    tls_cert: str = ""  # PEM chain; with tls_key: HTTPS/WSS (consoleproxy.sslEnabled)
    tls_key: str = field(default="", repr=False)


class ConfigError(ValueError):
    pass


def _num(v: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise ConfigError(f"{name} must be a number in [{lo:g}, {hi:g}]")
    return float(v)


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}]")
    return v


def config_from(desired: dict[str, Any] | Any, base: ProxyConfig) -> ProxyConfig:
    """Pure: the VM's desired config (``{"settings": {...}, "consoleproxy": {...}}``) over
    ``base``. Unknown keys are ignored; bad values raise :class:`ConfigError`."""
    section = desired.get("consoleproxy") or {}
    settings = desired.get("settings") or {}
    if not isinstance(section, dict) or not isinstance(settings, dict):
        raise ConfigError("consoleproxy/settings sections must be maps")
    cfg = base
    if "listen_host" in section:
        if not isinstance(section["listen_host"], str):
            raise ConfigError("listen_host must be a string")
        cfg = replace(cfg, host=section["listen_host"])
    if "listen_port" in section:
        cfg = replace(cfg, port=_int(section["listen_port"], "listen_port", 0, 65535))
    if "novnc_dir" in section:
        cfg = replace(cfg, novnc_dir=Path(str(section["novnc_dir"])))
    if "allowed_origins" in section:
        origins = section["allowed_origins"]
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise ConfigError("allowed_origins must be a list of strings")
        cfg = replace(cfg, allowed_origins=frozenset(o.rstrip("/") for o in origins))
    for key in ("allow_same_origin", "allow_missing_origin", "draining"):
        if key in section:
            if not isinstance(section[key], bool):
                raise ConfigError(f"{key} must be a boolean")
            cfg = replace(cfg, **{key: section[key]})
    floats = {
        "handshake_timeout": (0.1, 300),
        "authorize_timeout": (0.1, 120),
        "idle_timeout": (1, 86400 * 7),
        "max_session": (1, 86400 * 30),
        "sweep_interval": (0.05, 60),
    }
    changes: dict[str, Any] = {}
    for key, (lo, hi) in floats.items():
        if key in section:
            changes[key] = _num(section[key], key, lo, hi)
    ints = {
        "max_sessions": (1, 1_000_000),
        "max_per_ip": (1, 1_000_000),
        "max_frame": (1024, 64 << 20),
        "write_high": (4096, 64 << 20),
    }
    for key, (ilo, ihi) in ints.items():
        if key in section:
            changes[key] = _int(section[key], key, ilo, ihi)
    if "write_high" in changes:
        changes["write_low"] = changes["write_high"] // 4
    cfg = replace(cfg, **changes)
    if "consoleproxy.loadscan.interval" in settings:
        v = settings["consoleproxy.loadscan.interval"]
        cfg = replace(cfg, loadscan_interval=_num(v, "consoleproxy.loadscan.interval", 0.05, 3600))
    if "tls" in section:
        tls = section["tls"] or {}
        if not isinstance(tls, dict) or not all(
            isinstance(tls.get(k, ""), str) for k in ("cert", "key")
        ):
            raise ConfigError("tls must be a map with PEM strings cert and key")
        cfg = replace(cfg, tls_cert=tls.get("cert", ""), tls_key=tls.get("key", ""))
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("tls needs both cert and key")
    if settings.get("consoleproxy.sslEnabled") is True and not cfg.tls_cert:
        raise ConfigError("consoleproxy.sslEnabled is true but no certificate was provided")
    if "consoleproxy.session.max" in settings:
        v = settings["consoleproxy.session.max"]
        cfg = replace(cfg, session_max_report=_int(v, "consoleproxy.session.max", 1, 1_000_000))
    return cfg


# ---------------------------------------------------------------------------- authorisation


@dataclass(frozen=True, slots=True)
class AuthRequest:
    token: str
    vm_id: str
    client: str
    origin: str


@dataclass(frozen=True, slots=True)
class Target:
    vm_id: str
    host: str
    port: int
    password: str = field(repr=False)
    resume_token: str = field(default="", repr=False)  # becomes an HttpOnly cookie


class Refused(Exception):
    """The authoriser says no. ``status`` is the HTTP status for the browser."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


Authorizer = Callable[[AuthRequest], Awaitable[Target]]
Notify = Callable[[str, dict[str, Any]], None]


def target_from_reply(reply: Any) -> Target:
    """Validates a ``console.authorize`` reply (never trusts its shape)."""
    try:
        host, port, vm_id = reply["host"], reply["port"], reply["vm_id"]
        password = reply.get("password", "")
        resume = reply.get("resume_token", "")
    except (KeyError, TypeError, AttributeError) as e:
        raise Refused(502, "bad authorisation reply from the manager") from e
    if (
        not isinstance(host, str)
        or not host
        or isinstance(port, bool)
        or not isinstance(port, int)
        or not 0 < port < 65536
        or not isinstance(vm_id, str)
        or not isinstance(password, str)
        or not isinstance(resume, str)
    ):
        raise Refused(502, "bad authorisation reply from the manager")
    return Target(vm_id=vm_id, host=host, port=port, password=password, resume_token=resume)


RESUME_MAX_AGE = 600


def resume_cookie_name(vm_id: str) -> str:
    return "sysvm_resume_" + "".join(c for c in vm_id if c.isalnum() or c == "-")


def cookie_value(header: str, name: str) -> str:
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return ""


# ---------------------------------------------------------------------------- HTTP head


@dataclass(frozen=True, slots=True)
class Head:
    method: str
    target: str
    version: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "


class HeadError(ValueError):
    pass


def parse_head(raw: bytes) -> Head:
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError as e:  # pragma: no cover - latin-1 decodes everything
        raise HeadError("undecodable request") from e
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HeadError("bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HeadError("bad header line")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Head(parts[0], parts[1], parts[2], headers)


def _has_token(value: str, token: str) -> bool:
    return token in (t.strip().lower() for t in value.split(","))


def origin_allowed(origin: str | None, host: str | None, scheme: str, cfg: ProxyConfig) -> bool:
    """Pure: ``Origin`` must be the page's own origin (``scheme://Host``) or listed."""
    if origin is None:
        return cfg.allow_missing_origin
    origin = origin.rstrip("/")
    if origin in cfg.allowed_origins:
        return True
    return cfg.allow_same_origin and host is not None and origin == f"{scheme}://{host}"


def http_response(status: int, reason: str, body: str = "", extra: Iterable[str] = ()) -> bytes:
    payload = (body + "\n").encode() if body else b""
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(payload)}",
        "Connection: close",
        "Cache-Control: no-store",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


_STATUS_TEXT = {
    400: "Bad Request",
    408: "Request Timeout",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


# ---------------------------------------------------------------------------- sessions

_ids = itertools.count(1)


class Session:
    __slots__ = (
        "browser",
        "client",
        "close_reason",
        "early",
        "id",
        "last",
        "relaying",
        "started",
        "started_wall",
        "vm_id",
        "vnc",
    )

    def __init__(self, client: str, now: float) -> None:
        self.id = next(_ids)
        self.client = client
        self.vm_id = ""
        self.started = now
        self.started_wall = time.time()
        self.last = now
        self.relaying = False
        self.browser: Conn | None = None
        self.vnc: VncSide | None = None
        self.close_reason = ""
        self.early = b""

    def info(self, mono_now: float, wall_now: float) -> dict[str, Any]:
        return {
            "vm_id": self.vm_id,
            "client": self.client,
            "started": round(self.started_wall, 3),
            "last_used": round(wall_now - (mono_now - self.last), 3),
        }


def expired_sessions(
    sessions: Iterable[Session], cfg: ProxyConfig, now: float
) -> list[tuple[Session, int, str]]:
    """Pure: which sessions a sweep at ``now`` (monotonic) ends, with close code and reason.
    Idle counts traffic either way (``last`` is bumped by both sides' reads)."""
    out = []
    for s in sessions:
        if not s.relaying:
            if now - s.started > cfg.handshake_timeout:
                out.append((s, 1008, "handshake timeout"))
        elif now - s.last > cfg.idle_timeout:
            out.append((s, 4000, "idle timeout"))
        elif now - s.started > cfg.max_session:
            out.append((s, 4001, "maximum session length reached"))
    return out


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class VncSide(asyncio.Protocol):
    """The connection to the hypervisor's VNC server."""

    __slots__ = ("handshake", "ready", "server", "session", "transport")

    def __init__(self, server: ConsoleServer, session: Session, password: str) -> None:
        self.server = server
        self.session = session
        self.handshake: rfb.HypervisorHandshake | None = rfb.HypervisorHandshake(password)
        self.ready: asyncio.Future[bytes] = server.loop.create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        _nodelay(transport)
        self.transport.set_write_buffer_limits(
            self.server.cfg.write_high, self.server.cfg.write_low
        )

    def data_received(self, data: bytes) -> None:
        session = self.session
        session.last = self.server.loop.time()
        hs = self.handshake
        if hs is None:
            if not session.relaying:  # the browser is still in its RFB handshake: hold it
                if len(session.early) + len(data) > MAX_EARLY:
                    self.server.close_session(session, 1011, "VNC server spoke out of turn")
                else:
                    session.early += data
                return
            browser = session.browser
            if browser is not None and browser.transport is not None:
                n = len(data)
                if n < 4096:  # small: one copy is cheaper than a two-buffer writev
                    browser.transport.write(wsframe.header(wsframe.OP_BINARY, n) + data)
                else:
                    browser.transport.writelines((wsframe.header(wsframe.OP_BINARY, n), data))
            return
        try:
            out = hs.receive(data)
        except rfb.RfbError as e:
            self.handshake = None
            if not self.ready.done():
                self.ready.set_exception(e)
            if self.transport is not None:
                self.transport.close()
            return
        if out and self.transport is not None:
            self.transport.write(out)
        if hs.done:
            self.handshake = None
            if not self.ready.done():
                self.ready.set_result(hs.leftover)

    def pause_writing(self) -> None:
        browser = self.session.browser
        if browser is not None and browser.transport is not None:
            browser.transport.pause_reading()

    def resume_writing(self) -> None:
        browser = self.session.browser
        if browser is not None and browser.transport is not None:
            browser.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(
                rfb.RfbError("the VM's console closed the connection during the handshake")
            )
        if self.session.vnc is self:
            self.server.vnc_lost(self.session)


class Conn(asyncio.Protocol):
    """One accepted connection: HTTP head, then either aiohttp or the websocket relay."""

    __slots__ = (
        "accepted",
        "head_buf",
        "mode",
        "parser",
        "peer",
        "rfb_hs",
        "server",
        "session",
        "task",
        "transport",
        "ws_closing",
    )

    def __init__(self, server: ConsoleServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.head_buf = b""
        self.mode = "head"  # head | auth | rfb | relay | closing
        self.parser: wsframe.FrameParser | None = None
        self.rfb_hs: rfb.BrowserHandshake | None = None
        self.session: Session | None = None
        self.task: asyncio.Task[None] | None = None
        self.peer = ""
        self.ws_closing = False
        self.accepted = server.loop.time()

    # -- lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "unix"
        self.server.conn_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.mode = "closing"
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.server.conn_lost(self)

    def pause_writing(self) -> None:
        s = self.session
        if s is not None and s.vnc is not None and s.vnc.transport is not None:
            s.vnc.transport.pause_reading()

    def resume_writing(self) -> None:
        s = self.session
        if s is not None and s.vnc is not None and s.vnc.transport is not None:
            s.vnc.transport.resume_reading()

    # -- input
    def data_received(self, data: bytes) -> None:
        mode = self.mode
        if mode == "relay":
            session = self.session
            assert session is not None and self.parser is not None
            session.last = self.server.loop.time()
            try:
                parts, controls = self.parser.feed(data)
            except wsframe.WsError as e:
                self.ws_fail(e.code, e.reason)
                return
            if parts:
                vnc = session.vnc
                if vnc is not None and vnc.transport is not None:
                    if len(parts) == 1:
                        vnc.transport.write(parts[0])
                    else:
                        vnc.transport.writelines(parts)
            if controls:
                self._controls(controls)
            return
        if mode == "head":
            self._head(data)
        elif mode == "rfb":
            self._rfb(data)
        elif mode == "auth":
            # A client must wait for 101; anything now is a protocol violation.
            self.http_error(400, "data before the websocket upgrade completed")

    def _head(self, data: bytes) -> None:
        buf = self.head_buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self.http_error(400, "request head too large")
            else:
                self.head_buf = buf
            return
        raw, rest = buf[:end], buf[end + 4 :]
        self.head_buf = b""
        try:
            head = parse_head(raw)
        except HeadError as e:
            self.http_error(400, str(e))
            return
        path = urllib.parse.urlsplit(head.target).path
        if path != WS_PATH or "websocket" not in head.headers.get("upgrade", "").lower():
            self.server.to_aiohttp(self, buf)
            return
        if rest:
            self.http_error(400, "data before the websocket upgrade completed")
            return
        self.mode = "auth"
        self.server.start_upgrade(self, head)

    def _rfb(self, data: bytes) -> None:
        assert self.parser is not None and self.rfb_hs is not None
        try:
            parts, controls = self.parser.feed(data)
        except wsframe.WsError as e:
            self.ws_fail(e.code, e.reason)
            return
        if controls:
            self._controls(controls)
        payload = b"".join(parts)
        if not payload or self.mode != "rfb":
            return
        hs = self.rfb_hs
        try:
            out = hs.receive(payload)
        except rfb.RfbError as e:
            self.ws_fail(1002, e.reason)
            return
        if out:
            self.send_binary(out)
        if hs.failed:
            self.ws_close(1000, "console unavailable")
        elif hs.done:
            self.rfb_hs = None
            self.server.relay_started(self, hs.leftover)

    def _controls(self, controls: list[tuple[int, bytes]]) -> None:
        for opcode, payload in controls:
            if opcode == wsframe.OP_PING:
                self._write(wsframe.frame(wsframe.OP_PONG, payload))
            elif opcode == wsframe.OP_CLOSE:
                code, _ = wsframe.parse_close(payload)
                if self.session is not None and not self.session.close_reason:
                    self.session.close_reason = "browser closed"
                self.ws_close(1000 if code in (1005, 1006) else code, "")
                return

    # -- output
    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_binary(self, data: bytes) -> None:
        self._write(wsframe.header(wsframe.OP_BINARY, len(data)) + data)

    def http_error(self, status: int, reason: str, extra: Iterable[str] = ()) -> None:
        self.mode = "closing"
        self._write(http_response(status, _STATUS_TEXT.get(status, "Error"), reason, extra))
        if self.transport is not None:
            self.transport.close()

    def ws_close(self, code: int, reason: str) -> None:
        if not self.ws_closing:
            self.ws_closing = True
            self._write(wsframe.close_frame(code, reason))
        self.mode = "closing"
        if self.transport is not None:
            self.transport.close()

    def ws_fail(self, code: int, reason: str) -> None:
        if self.session is not None and not self.session.close_reason:
            self.session.close_reason = f"protocol error: {reason}"
        self.ws_close(code, reason)


# ---------------------------------------------------------------------------- server


class ConsoleServer:
    """Owns the listener, the sessions, the housekeeping task and the aiohttp app."""

    def __init__(
        self,
        cfg: ProxyConfig,
        authorizer: Authorizer,
        notify: Notify,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.ssl_context = ssl_context
        self.authorize = authorizer
        self.notify = notify
        self.loop = asyncio.get_running_loop()
        self.conns: set[Conn] = set()
        self.sessions: set[Session] = set()
        self.per_ip: dict[str, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.counters: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._housekeeper: asyncio.Task[None] | None = None
        self._last_report = -1e9
        self._report_handle: asyncio.TimerHandle | None = None
        self._pending_reason = ""
        self.address: tuple[str, int] = ("", 0)

    # -- start / stop
    async def start(self) -> None:
        app = web.Application()
        setup_page(app, self)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._server = await self.loop.create_server(
            lambda: Conn(self),
            self.cfg.host,
            self.cfg.port,
            backlog=512,
            ssl=self.ssl_context,
            ssl_handshake_timeout=self.cfg.handshake_timeout if self.ssl_context else None,
        )
        sock = self._server.sockets[0].getsockname()
        self.address = (str(sock[0]), int(sock[1]))
        self._housekeeper = asyncio.create_task(self._housekeeping())
        log.info(
            "event=listening host=%s port=%d novnc=%s",
            self.address[0],
            self.address[1],
            self.cfg.novnc_dir,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._report_handle is not None:
            self._report_handle.cancel()
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for s in list(self.sessions):
            self.close_session(s, 1001, "console proxy stopping")
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()
        log.info("event=stopped host=%s port=%d", *self.address)

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # -- connection accounting
    def conn_opened(self, conn: Conn) -> None:
        self.conns.add(conn)

    def conn_lost(self, conn: Conn) -> None:
        self.conns.discard(conn)
        if conn.session is not None:
            self._end_session(conn.session)

    def to_aiohttp(self, conn: Conn, buffered: bytes) -> None:
        """Hands the connection to aiohttp's request handler (the page, files)."""
        self.conns.discard(conn)
        assert self._runner is not None and conn.transport is not None
        server = self._runner.server
        assert server is not None
        proto = server()
        conn.mode = "aiohttp"
        conn.transport.set_protocol(proto)
        proto.connection_made(conn.transport)
        proto.data_received(buffered)

    # -- the upgrade
    def start_upgrade(self, conn: Conn, head: Head) -> None:
        """Synchronous checks, then a tracked task for the awaits (authorise, VNC)."""
        cfg = self.cfg
        h = head.headers
        log.debug("event=upgrade_request client=%s", conn.peer)
        if cfg.draining:
            self.count("refused_draining")
            conn.http_error(503, "console proxy is draining; request a new console link")
            return
        if len(self.sessions) >= cfg.max_sessions:
            self.count("refused_capacity")
            conn.http_error(503, "console proxy is full", ["Retry-After: 5"])
            return
        if self.per_ip.get(conn.peer, 0) >= cfg.max_per_ip:
            self.count("refused_per_ip")
            conn.http_error(429, "too many console sessions from this address")
            return
        if (
            head.method != "GET"
            or not _has_token(h.get("connection", ""), "upgrade")
            or h.get("sec-websocket-version") != "13"
            or not wsframe.valid_client_key(h.get("sec-websocket-key", ""))
        ):
            self.count("refused_bad_upgrade")
            conn.http_error(400, "bad websocket upgrade request", ["Sec-WebSocket-Version: 13"])
            return
        if not origin_allowed(h.get("origin"), h.get("host"), "http", cfg) and not (
            origin_allowed(h.get("origin"), h.get("host"), "https", cfg)
        ):
            self.count("refused_origin")
            log.warning("event=refused reason=origin client=%s", conn.peer)
            conn.http_error(403, "websocket Origin not allowed")
            return
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(head.target).query)
        token = (query.get("token") or [""])[0]
        vm_id = (query.get("vm") or [""])[0]
        if not token and vm_id:  # reconnect: the resume token set as a cookie last time
            token = cookie_value(h.get("cookie", ""), resume_cookie_name(vm_id))
        if not token or not vm_id:
            self.count("refused_no_token")
            conn.http_error(403, "missing console token")
            return
        session = Session(conn.peer, self.loop.time())
        session.browser = conn
        conn.session = session
        self.sessions.add(session)
        self.per_ip[conn.peer] = self.per_ip.get(conn.peer, 0) + 1
        req = AuthRequest(token=token, vm_id=vm_id, client=conn.peer, origin=h.get("origin", ""))
        task = asyncio.create_task(self._upgrade(conn, session, head, req))
        conn.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _upgrade(self, conn: Conn, session: Session, head: Head, req: AuthRequest) -> None:
        cfg = self.cfg
        deadline = self.loop.time() + cfg.handshake_timeout
        try:
            async with asyncio.timeout(min(cfg.authorize_timeout, cfg.handshake_timeout)):
                target = await self.authorize(req)
        except Refused as e:
            self.count("refused_token")
            log.warning("event=refused reason=authorize status=%d client=%s", e.status, conn.peer)
            conn.http_error(e.status, e.reason)
            return
        except TimeoutError:
            self.count("refused_authorize_timeout")
            log.warning("event=refused reason=authorize_timeout client=%s", conn.peer)
            conn.http_error(504, "the manager did not answer in time")
            return
        except Exception as e:
            self.count("refused_authorize_error")
            log.error("event=authorize_error client=%s error=%s", conn.peer, type(e).__name__)
            conn.http_error(502, "console authorisation failed")
            return
        session.vm_id = target.vm_id
        failure: str | None = None
        leftover = b""
        vnc: VncSide | None = None
        try:
            async with asyncio.timeout_at(deadline):
                _, proto = await self.loop.create_connection(
                    lambda: VncSide(self, session, target.password), target.host, target.port
                )
                vnc = proto
                session.vnc = vnc
                leftover = await vnc.ready
        except rfb.RfbError as e:
            failure = e.reason
            self.count("vnc_auth_failed" if e.auth else "vnc_handshake_failed")
            log.warning(
                "event=vnc_failed vm=%s host=%s port=%d auth=%s reason=%r",
                target.vm_id,
                target.host,
                target.port,
                e.auth,
                e.reason,
            )
        except (OSError, TimeoutError) as e:
            failure = "cannot reach the VM's console on its hypervisor"
            self.count("vnc_unreachable")
            log.warning(
                "event=vnc_unreachable vm=%s host=%s port=%d error=%s",
                target.vm_id,
                target.host,
                target.port,
                type(e).__name__,
            )
        except asyncio.CancelledError:
            if vnc is not None and vnc.transport is not None:
                vnc.transport.close()
            raise
        if failure is not None and vnc is not None:
            session.vnc = None  # its close must not end the browser side before the reason
            if vnc.transport is not None:
                vnc.transport.close()
        if conn.mode != "auth" or conn.transport is None or conn.transport.is_closing():
            if vnc is not None and vnc.transport is not None:
                vnc.transport.close()
            return
        # Upgrade.
        h = head.headers
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {wsframe.accept_key(h['sec-websocket-key'])}",
        ]
        offered = [p.strip() for p in h.get("sec-websocket-protocol", "").split(",") if p.strip()]
        if "binary" in offered:
            lines.append("Sec-WebSocket-Protocol: binary")
        if target.resume_token and failure is None:
            lines.append(
                f"Set-Cookie: {resume_cookie_name(target.vm_id)}={target.resume_token}; "
                f"Path={WS_PATH}; Max-Age={RESUME_MAX_AGE}; HttpOnly; SameSite=Strict"
            )
        conn.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        _nodelay(conn.transport)
        conn.transport.set_write_buffer_limits(cfg.write_high, cfg.write_low)
        conn.parser = wsframe.FrameParser(cfg.max_frame)
        conn.rfb_hs = rfb.BrowserHandshake(failure)
        conn.mode = "rfb"
        conn.send_binary(rfb.BrowserHandshake.greeting())
        # A VNC server speaks after the handshake only when asked; keep anything anyway.
        session.early = leftover + session.early

    def relay_started(self, conn: Conn, leftover: bytes) -> None:
        session = conn.session
        assert session is not None
        vnc = session.vnc
        if vnc is None or vnc.transport is None or vnc.transport.is_closing():
            conn.ws_close(1011, "the VM's console closed")
            return
        session.relaying = True
        session.last = self.loop.time()
        conn.mode = "relay"
        if leftover:
            vnc.transport.write(leftover)
        if session.early:
            conn.send_binary(session.early)
            session.early = b""
        self.count("sessions_opened")
        log.info("event=session_open id=%d vm=%s client=%s", session.id, session.vm_id, conn.peer)
        self.report_soon("open")

    # -- ending
    def vnc_lost(self, session: Session) -> None:
        conn = session.browser
        if conn is not None and conn.mode in ("relay", "rfb"):
            if not session.close_reason:
                session.close_reason = "VM console closed"
            conn.ws_close(1011 if conn.mode == "relay" else 1000, "the VM's console closed")

    def close_session(self, session: Session, code: int, reason: str) -> None:
        if not session.close_reason:
            session.close_reason = reason
        conn = session.browser
        if conn is not None:
            if conn.mode in ("relay", "rfb"):
                conn.ws_close(code, reason)
            elif conn.transport is not None:
                conn.transport.close()
        vnc = session.vnc
        if vnc is not None and vnc.transport is not None:
            vnc.transport.close()

    def _end_session(self, session: Session) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        n = self.per_ip.get(session.client, 0) - 1
        if n > 0:
            self.per_ip[session.client] = n
        else:
            self.per_ip.pop(session.client, None)
        vnc = session.vnc
        if vnc is not None and vnc.transport is not None:
            vnc.transport.close()
        if session.relaying:
            session.relaying = False
            self.count("sessions_closed")
            log.info(
                "event=session_close id=%d vm=%s client=%s seconds=%.1f reason=%r",
                session.id,
                session.vm_id,
                session.client,
                self.loop.time() - session.started,
                session.close_reason or "connection closed",
            )
            self.report_soon("close")

    # -- timers and reports
    def expired(self, now: float) -> list[tuple[Session, int, str]]:
        return expired_sessions(self.sessions, self.cfg, now)

    def snapshot(self, reason: str) -> dict[str, Any]:
        mono, wall = self.loop.time(), time.time()
        live = [s for s in self.sessions if s.relaying]
        return {
            "count": len(live),
            "max": self.cfg.session_max_report,
            "draining": self.cfg.draining,
            "reason": reason,
            "sessions": [s.info(mono, wall) for s in live],
        }

    def report_soon(self, reason: str) -> None:
        """Session open/close: report now, or — within ``REPORT_GAP`` of the last report —
        once at the end of the gap (a burst of 500 opens sends a few reports, not 500 of
        up to 500 sessions each)."""
        now = self.loop.time()
        self._pending_reason = reason  # a coalesced report is labelled with the latest change
        if now - self._last_report >= REPORT_GAP:
            self.report(reason)
        elif self._report_handle is None:
            self._report_handle = self.loop.call_at(
                self._last_report + REPORT_GAP, self._deferred_report
            )

    def _deferred_report(self) -> None:
        self._report_handle = None
        self.report(self._pending_reason)

    def report(self, reason: str) -> None:
        self._last_report = self.loop.time()
        try:
            self.notify("console.sessions", self.snapshot(reason))
        except Exception as e:  # a broken notifier must not break the relay
            log.error("event=notify_failed error=%s", type(e).__name__)

    async def _housekeeping(self) -> None:
        next_scan = self.loop.time() + self.cfg.loadscan_interval
        while True:
            await asyncio.sleep(self.cfg.sweep_interval)
            now = self.loop.time()
            for s, code, reason in self.expired(now):
                self.count("sessions_" + reason.split()[0])
                self.close_session(s, code, reason)
            for c in [c for c in self.conns if c.mode == "head"]:
                if now - c.accepted > self.cfg.handshake_timeout:  # slow or silent client
                    self.count("request_timeout")
                    c.http_error(408, "request head not received in time")
            if now >= next_scan:
                next_scan = now + self.cfg.loadscan_interval
                self.report("scan")

    def status(self) -> dict[str, Any]:
        return {
            "listening": f"{self.address[0]}:{self.address[1]}",
            "sessions": sum(1 for s in self.sessions if s.relaying),
            "draining": self.cfg.draining,
            "tls": self.ssl_context is not None,
            "counters": dict(self.counters),
        }


# ---------------------------------------------------------------------------- the page

SERVER_KEY: web.AppKey[ConsoleServer] = web.AppKey("console_server", ConsoleServer)

_SECURITY_HEADERS = {
    "Referrer-Policy": "no-referrer",  # the URL carries a token
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'self'"
    ),
}


def _static_missing(name: str) -> bool:
    return not (STATIC_DIR / name).is_file()


async def _page(request: web.Request) -> web.StreamResponse:
    if _static_missing("console.html"):
        log.error("event=page_missing dir=%s", STATIC_DIR)
        raise web.HTTPServiceUnavailable(text=f"console page files missing in {STATIC_DIR}\n")
    return web.FileResponse(
        STATIC_DIR / "console.html", headers={"Cache-Control": "no-store", **_SECURITY_HEADERS}
    )


async def _asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ("boot.js", "console.js", "console.css") or _static_missing(name):
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC_DIR / name, headers=_SECURITY_HEADERS)


async def _novnc(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER_KEY]
    root = server.cfg.novnc_dir.resolve()
    rel = request.match_info["path"]
    if not rel.endswith(".js"):
        raise web.HTTPNotFound()
    path = (root / rel).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        if not (root / "core" / "rfb.js").is_file():
            raise web.HTTPServiceUnavailable(text=f"noVNC is not installed at {root}\n")
        raise web.HTTPNotFound()
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "text/javascript; charset=utf-8",
            "Cache-Control": "public, max-age=3600",
            **_SECURITY_HEADERS,
        },
    )


async def _favicon(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204)


async def _health(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[SERVER_KEY].status())


async def _ws_on_aiohttp(request: web.Request) -> web.StreamResponse:
    raise web.HTTPBadRequest(
        text="open the console websocket on a new connection (not after another request)\n"
    )


def setup_page(app: web.Application, server: ConsoleServer) -> None:
    app[SERVER_KEY] = server
    app.router.add_get("/console", _page)
    app.router.add_get("/", _page)
    app.router.add_get("/static/{name}", _asset)
    app.router.add_get("/novnc/{path:.+}", _novnc)
    app.router.add_get("/healthz", _health)
    app.router.add_get("/favicon.ico", _favicon)
    app.router.add_get(WS_PATH, _ws_on_aiohttp)
