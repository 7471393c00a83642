#!/usr/bin/env python3
"""Agents benchmark: N simulated agents against one real ``sysvm-manager`` process, and the
same load against a bare ``websockets`` TLS echo server (the baseline), in the same run.

    .venv/bin/python scripts/bench/agents.py                       # quick: 1,000 agents, 20 s
    .venv/bin/python scripts/bench/agents.py -n 10000 --rate 2000 --duration 30

What it does, all on loopback with real TLS (mutual, P-256 certificates from the manager's CA)
and the real protocol (``protocol.Conversation``: hello/welcome, heartbeats and their acks,
config acks, command results, responses):

1. starts ``sysvm-manager`` in a temporary home, sets ``sysvm.agent.heartbeat.interval``
   through the CloudStack API (``cs``, signed with ``credentials.json``) so the manager
   expects the bench's pace, creates N VMs with ``sysvm-manager create-external-vms`` and
   enrols every one over ``/enrol`` (CA pinned by fingerprint, CSR, certificate checked);
2. baseline: a ``websockets`` echo server (same TLS and websocket settings as the manager's
   agent endpoint) gets the same N connections and heartbeats;
3. manager: the N agents connect to ``/agent``; for ``--duration`` seconds the bench
   measures heartbeats/s (the manager's ``sysvm_heartbeats_total``), the manager's CPU and
   RSS (``/proc``), its event-loop lag (``sysvm_loop_lag_seconds`` from ``/metrics``: p99
   over the manager's last 60 s window) and the heartbeat→ack round trip seen by agents;
4. reconnect storm: every agent's TCP connection is aborted at once and reconnects at
   once; reports the time until all are welcomed again and whether the manager survived;
5. stops the manager with SIGTERM (graceful stop time and exit code reported).

Heartbeats are paced by the bench (each agent every N/rate seconds, phases staggered), not
by ``welcome.heartbeat_interval``, so the rate is the ``--rate`` asked for; the manager's
interval is set to the same value (clamped to its 1..3600 s range) so it does not think a
slower agent is silent. Client load is spread over ``--workers`` processes (one asyncio +
uvloop loop each); their CPU and loop lag are printed so a saturated client shows.

Internal sub-commands (started by the bench itself): ``_worker`` (simulated agents),
``_echo`` (the baseline server). Both read JSON commands on stdin and answer JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import os
import random
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from common import (
    Child,
    ProcSample,
    answer,
    cpu_percent,
    free_port,
    log,
    machine_load,
    machine_sample,
    metric,
    parse_prometheus,
    proc_sample,
    quantile,
    raise_nofile,
    stdin_lines,
    table,
    terminate,
    tls_server_argv,
    tls_server_context,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from agent.identity import check_issued, client_context, fetch_ca, make_csr
from agent.link import backoff_delay
from manager.metrics import LoopLagMonitor, Metrics
from protocol import messages as m
from protocol.codec import AGENT_TO_MANAGER, MANAGER_TO_AGENT, decode, encode
from protocol.conversation import Close, Conversation, Received, Reply, Side
from protocol.versions import SUPPORTED_VERSIONS

HERE = Path(__file__).resolve()
# What a console proxy might report; ~130 bytes on the wire, like a real small status.
STATUS: dict[str, Any] = {
    "load": [0.12, 0.08, 0.05],
    "mem": {"total": 1 << 30, "available": 700 << 20},
    "role": {"sessions": 3, "ok": True},
    "uptime": 12345.6,
}
# Same websocket settings as the manager's agent endpoint (manager/agentlink.py).
WS_SERVER_OPTIONS: dict[str, Any] = {
    "compression": None,
    "max_size": AGENT_TO_MANAGER.max_frame,
    "max_queue": 4,
    "write_limit": 64 * 1024,
    "ping_interval": None,
    "open_timeout": 10,
    "close_timeout": 5,
    "backlog": 1024,
}
WS_CLIENT_OPTIONS: dict[str, Any] = {
    "compression": None,
    "max_size": MANAGER_TO_AGENT.max_frame,
    "max_queue": 4,
    "ping_interval": None,
    "open_timeout": 120,
    "close_timeout": 5,
    "proxy": None,
    "user_agent_header": "sysvm-bench",
}


# =====================================================================================
# Worker: a share of the simulated agents
# =====================================================================================


SEND_TIMEOUT = 30.0


async def send(ws: ClientConnection | ServerConnection, frame: bytes | str) -> None:
    """``ws.send`` waits while the server is not reading; never wait for ever."""
    async with asyncio.timeout(SEND_TIMEOUT):
        await ws.send(frame)


class SimAgent:
    __slots__ = (
        "applied",
        "boot",
        "ctx",
        "dropped",
        "gen",
        "idx",
        "last_sent",
        "last_seq",
        "live",
        "retry_after",
        "vm_id",
        "ws",
    )

    def __init__(self, idx: int, boot: dict[str, Any]) -> None:
        self.idx = idx
        self.boot = boot
        self.vm_id: str = boot["vm_id"]
        self.ctx: ssl.SSLContext | None = None
        self.ws: ClientConnection | None = None
        self.live = False
        self.dropped = False
        self.gen = 0
        self.last_seq = 0
        self.last_sent = 0.0
        self.applied = 0
        self.retry_after = 0.0


class HandshakeFailed(Exception):
    pass


class Worker:
    def __init__(self, boots: list[dict[str, Any]], state_dir: Path, seed: int) -> None:
        self.agents = [SimAgent(i, b) for i, b in enumerate(boots)]
        self.expected = 0
        self.state_dir = state_dir
        self.rng = random.Random(seed)
        self.ca_pem = b""
        self.mode = "agent"
        self.url = ""
        self.interval = 1.0
        self.stopping = False
        self.gate: asyncio.Semaphore | None = None
        self.live = 0
        self.all_live = asyncio.Event()
        self.storm_waiting: set[int] | None = None
        self.storm_done = asyncio.Event()
        self.heap: list[tuple[float, int, int]] = []
        self.heap_changed = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.lag: list[float] = []
        self.ack_every = 1  # the largest welcome.ack_every seen (kept across resets)
        self.reset_counters()

    def reset_counters(self) -> None:
        self.hb_sent = 0
        self.acks = 0
        self.rtts: list[float] = []
        self.failures: Counter[str] = Counter()
        self.configs = 0
        self.commands = 0
        self.lag = []

    # -- enrolment ---------------------------------------------------------------------

    async def enrol(self, concurrency: int) -> dict[str, Any]:
        t0 = time.monotonic()
        first = self.agents[0].boot
        self.ca_pem = await fetch_ca(first["manager_urls"][0], first["ca_fingerprint"])
        enrol_ctx = client_context(self.ca_pem, None, None)
        gate = asyncio.Semaphore(concurrency)
        failures: Counter[str] = Counter()

        async def one(a: SimAgent) -> None:
            async with gate:
                for attempt in range(5):
                    try:
                        await self._enrol_one(a, enrol_ctx)
                        return
                    except (OSError, ConnectionClosed, TimeoutError) as e:
                        failures[type(e).__name__] += 1
                        await asyncio.sleep(backoff_delay(attempt, self.rng, 0.2, 5.0))
                    except HandshakeFailed as e:
                        failures[str(e)[:60]] += 1
                        return

        async with asyncio.TaskGroup() as tg:
            for a in self.agents:
                tg.create_task(one(a))
        ok = sum(1 for a in self.agents if a.ctx is not None)
        return {"enrolled": ok, "failures": dict(failures), "seconds": time.monotonic() - t0}

    async def _enrol_one(self, a: SimAgent, enrol_ctx: ssl.SSLContext) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = make_csr(key, a.vm_id)
        url = a.boot["manager_urls"][0] + "/enrol"
        loop = asyncio.get_running_loop()
        async with connect(url, ssl=enrol_ctx, **WS_CLIENT_OPTIONS) as ws:
            conv = Conversation(Side.AGENT, now=loop.time())
            await ws.send(conv.send(m.Enrol(vm_id=a.vm_id, token=a.boot["token"], csr=csr)))
            frame = await asyncio.wait_for(ws.recv(), 60)
        enrolled = None
        for ev in conv.receive(frame, loop.time()):
            if isinstance(ev, Received) and isinstance(ev.msg, m.Enrolled):
                enrolled = ev.msg
            elif isinstance(ev, Received) and isinstance(ev.msg, m.Error):
                raise HandshakeFailed(f"enrol refused: {ev.msg.reason}")
        if enrolled is None:
            raise HandshakeFailed("no enrolled message")
        check_issued(enrolled.certificate, self.ca_pem, key)
        path = self.state_dir / f"{a.vm_id}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # secret: 0600 first
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            f.write(enrolled.certificate)
        a.ctx = client_context(self.ca_pem, str(path), str(path))

    # -- connections -------------------------------------------------------------------

    def spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def connect_all(
        self, url: str | None, mode: str, interval: float, concurrency: int, timeout: float
    ) -> dict[str, Any]:
        self.mode, self.interval, self.stopping = mode, interval, False
        self.gate = asyncio.Semaphore(concurrency)
        self.reset_counters()
        self.all_live.clear()
        self.expected = sum(1 for a in self.agents if a.ctx is not None)
        t0 = time.monotonic()
        self.spawn(self._heartbeats())
        self.spawn(self._lag_sampler())
        for a in self.agents:
            if a.ctx is not None:
                target = url or a.boot["manager_urls"][0] + "/agent"
                self.spawn(self._run(a, target))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_live.wait(), timeout)
        self.gate = None  # from now on (reconnect storm) nobody waits for a slot
        return {"live": self.live, "seconds": time.monotonic() - t0, **self.counters()}

    def _set_live(self, a: SimAgent, live: bool) -> None:
        if live == a.live:
            return
        a.live = live
        self.live += 1 if live else -1
        if live:
            a.gen += 1
            due = asyncio.get_running_loop().time() + self.rng.uniform(0, self.interval)
            heapq.heappush(self.heap, (due, a.idx, a.gen))
            self.heap_changed.set()
            if self.live >= self.expected:
                self.all_live.set()
            if self.storm_waiting is not None:
                self.storm_waiting.discard(a.idx)
                if not self.storm_waiting:
                    self.storm_done.set()
        else:
            self.all_live.clear()

    def is_stopping(self) -> bool:
        return self.stopping

    async def _run(self, a: SimAgent, url: str) -> None:
        attempt = 0
        while not self.stopping:
            try:
                if await self._session(a, url):
                    attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure: count it, back off, retry (like an agent)
                self.failures[type(e).__name__] += 1
                attempt += 1
            if self.is_stopping():
                return
            if a.dropped:  # the storm: reconnect at once
                a.dropped = False
                continue
            delay = a.retry_after or backoff_delay(attempt, self.rng, 0.5, 10.0)
            a.retry_after = 0.0
            await asyncio.sleep(delay)

    async def _session(self, a: SimAgent, url: str) -> bool:
        """One connection; returns whether it got as far as welcome."""
        loop = asyncio.get_running_loop()
        gate = self.gate
        if gate is not None:
            await gate.acquire()
        welcomed = False
        try:
            ws = await connect(url, ssl=a.ctx, **WS_CLIENT_OPTIONS)
        except BaseException:
            if gate is not None:
                gate.release()
            raise
        try:
            hello = m.Hello(
                versions=list(SUPPORTED_VERSIONS),
                agent_version="bench",
                image_version="bench",
                role=a.boot.get("role", ""),
                boot_id=a.vm_id,
                applied_version=a.applied,
                status=STATUS,
            )
            conv = Conversation(Side.AGENT, now=loop.time())
            try:
                if self.mode == "agent":
                    await send(ws, conv.send(hello))
                    frame = await asyncio.wait_for(ws.recv(), 60)
                    events = conv.receive(frame, loop.time())
                    if not any(
                        isinstance(ev, Received) and isinstance(ev.msg, m.Welcome) for ev in events
                    ):
                        raise HandshakeFailed(f"no welcome: {events!r:.200}")
                    self.ack_every = max(self.ack_every, conv.ack_every)
                else:  # echo: the server sends our hello back
                    await send(ws, encode(hello))
                    await asyncio.wait_for(ws.recv(), 60)
            finally:
                if gate is not None:
                    gate.release()
            welcomed = True
            a.ws = ws
            self._set_live(a, True)
            if self.mode == "agent":
                await self._converse(a, ws, conv)
            else:
                await self._echo_loop(a, ws)
        except ConnectionClosed:
            pass
        finally:
            self._set_live(a, False)
            a.ws = None
            if not a.dropped and not ws.transport.is_closing():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 6)
        return welcomed

    async def _converse(self, a: SimAgent, ws: ClientConnection, conv: Conversation) -> None:
        async for frame in ws:
            # time.monotonic, not loop.time: uvloop's clock has millisecond steps.
            now = time.monotonic()
            for ev in conv.receive(frame, now):
                if isinstance(ev, Received):
                    msg = ev.msg
                    if isinstance(msg, m.HeartbeatAck):
                        self.acks += 1
                        if msg.seq == a.last_seq and len(self.rtts) < 500_000:
                            self.rtts.append(now - a.last_sent)
                    elif isinstance(msg, m.Config):
                        error = self.check_config(a, msg)
                        if error is None:
                            a.applied = max(a.applied, msg.version)
                        self.configs += 1
                        await send(
                            ws,
                            conv.send(
                                m.ConfigAck(
                                    version=msg.version, ok=error is None, error=error or ""
                                )
                            ),
                        )
                        self.config_acked(a, msg, error)
                    elif isinstance(msg, m.Command):
                        self.commands += 1
                        await send(ws, conv.send(m.CommandResult(id=msg.id, ok=True)))
                    elif isinstance(msg, m.Request):
                        await send(ws, conv.send(m.Response(id=msg.id, ok=True)))
                    elif isinstance(msg, m.GoingAway):
                        a.retry_after = msg.retry_after
                    elif isinstance(msg, m.Error):
                        self.failures[f"error:{msg.code}"] += 1
                elif isinstance(ev, Reply):
                    await send(ws, ev.frame)
                elif isinstance(ev, Close):
                    await ws.close(ev.code, ev.reason)
                    return

    def check_config(self, a: SimAgent, msg: m.Config) -> str | None:
        """What the agent makes of a config before acking it: None = applied, else the
        error it reports. Plain agents apply everything (the router bench checks more)."""
        return None

    def config_acked(self, a: SimAgent, msg: m.Config, error: str | None) -> None:
        """Called right after a config's ack was sent (the router bench times these)."""

    async def _echo_loop(self, a: SimAgent, ws: ClientConnection) -> None:
        async for frame in ws:
            now = time.monotonic()
            msg = decode(frame, MANAGER_TO_AGENT)  # the same decoding work as an ack
            if isinstance(msg, m.Heartbeat):
                self.acks += 1
                if msg.seq == a.last_seq and len(self.rtts) < 500_000:
                    self.rtts.append(now - a.last_sent)

    async def _heartbeats(self) -> None:
        """One scheduler for all of this worker's agents (a heap of due times)."""
        loop = asyncio.get_running_loop()
        frame_status = dict(STATUS)
        while True:
            now = loop.time()
            while self.heap and self.heap[0][0] <= now:
                due, idx, gen = heapq.heappop(self.heap)
                a = self.agents[idx]
                ws = a.ws
                if not a.live or gen != a.gen or ws is None:
                    continue
                a.last_seq += 1
                a.last_sent = time.monotonic()
                frame = encode(m.Heartbeat(seq=a.last_seq, status=frame_status))
                nxt = due + self.interval
                heapq.heappush(self.heap, (nxt if nxt > now else now + self.interval, idx, gen))
                try:
                    await send(ws, frame)
                    self.hb_sent += 1
                except ConnectionClosed:
                    continue
                except TimeoutError:  # the server stopped reading: drop this connection
                    self.failures["send_timeout"] += 1
                    ws.transport.abort()
            self.heap_changed.clear()
            wait = 0.05 if not self.heap else min(0.05, max(0.0, self.heap[0][0] - loop.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.heap_changed.wait(), wait)

    async def _lag_sampler(self) -> None:
        while True:
            expected = time.monotonic() + 0.25
            await asyncio.sleep(0.25)
            if len(self.lag) < 100_000:
                self.lag.append(max(0.0, time.monotonic() - expected))

    def counters(self) -> dict[str, Any]:
        return {
            "hb_sent": self.hb_sent,
            "acks": self.acks,
            "ack_every": self.ack_every,
            "rtts": self.rtts[-20_000:],
            "failures": dict(self.failures),
            "configs": self.configs,
            "commands": self.commands,
            "lag_p99": quantile(self.lag, 0.99),
            "live": self.live,
        }

    async def drop_all(self, timeout: float) -> dict[str, Any]:
        """Aborts every TCP connection at once (no close handshake) and waits until all
        agents are welcomed again."""
        t0 = time.monotonic()
        self.failures.clear()
        self.storm_waiting = set()
        self.storm_done.clear()
        for a in self.agents:
            if a.ws is not None:
                a.dropped = True
                self.storm_waiting.add(a.idx)
                self._set_live(a, False)
                a.ws.transport.abort()
        dropped = len(self.storm_waiting)
        if dropped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.storm_done.wait(), timeout)
        back = dropped - len(self.storm_waiting)
        self.storm_waiting = None
        return {
            "dropped": dropped,
            "back": back,
            "live": self.live,
            "seconds": time.monotonic() - t0,
            "failures": dict(self.failures),
        }

    async def disconnect_all(self) -> dict[str, Any]:
        self.stopping = True
        closing = [a.ws for a in self.agents if a.ws is not None]
        await asyncio.gather(
            *(asyncio.wait_for(ws.close(), 6) for ws in closing), return_exceptions=True
        )
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.heap.clear()
        return {"closed": len(closing), "live": self.live}


async def worker_main(args: argparse.Namespace) -> int:
    raise_nofile()
    boots = []
    with open(args.boot) as f:
        for i, raw in enumerate(f):
            if i % args.workers == args.index:
                boots.append(json.loads(raw))
    state_dir = Path(args.dir)
    worker = Worker(boots, state_dir, seed=args.seed * 1000 + args.index)
    reader = await stdin_lines()
    answer({"ready": True, "agents": len(boots)})
    while line := await reader.readline():
        cmd = json.loads(line)
        try:
            op = cmd["cmd"]
            if op == "enrol":
                res = await worker.enrol(int(cmd["concurrency"]))
            elif op == "connect":
                res = await worker.connect_all(
                    cmd.get("url"),
                    cmd["mode"],
                    float(cmd["interval"]),
                    int(cmd["concurrency"]),
                    float(cmd["timeout"]),
                )
            elif op == "stats":
                res = worker.counters()
                if cmd.get("reset"):
                    worker.reset_counters()
            elif op == "drop":
                res = await worker.drop_all(float(cmd["timeout"]))
            elif op == "disconnect":
                res = await worker.disconnect_all()
            else:
                res = {"error": f"unknown command {op!r}"}
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}"}
        answer(res)
    await worker.disconnect_all()
    return 0


# =====================================================================================
# Baseline: a bare websockets echo server over TLS
# =====================================================================================


async def echo_main(args: argparse.Namespace) -> int:
    raise_nofile()
    # Like the manager: a client certificate is verified when presented.
    ctx = tls_server_context(args.cert, args.key, args.ca, ssl.CERT_OPTIONAL)
    metrics = Metrics()
    lag = LoopLagMonitor(metrics)  # the manager's own sampler, for a like-for-like figure
    state = {"connections": 0, "frames": 0}

    async def handler(ws: ServerConnection) -> None:
        state["connections"] += 1
        try:
            async for frame in ws:
                state["frames"] += 1
                await send(ws, frame)
        except (ConnectionClosed, TimeoutError):
            pass
        finally:
            state["connections"] -= 1

    async with asyncio.TaskGroup() as tg:
        lag_task = tg.create_task(lag.run())
        async with serve(handler, "127.0.0.1", 0, ssl=ctx, **WS_SERVER_OPTIONS) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            reader = await stdin_lines()
            answer({"port": port})
            while line := await reader.readline():
                cmd = json.loads(line)
                if cmd.get("cmd") == "stats":
                    lag.publish()
                    answer(
                        {
                            **state,
                            "lag_p99": metrics.get("sysvm_loop_lag_seconds", quantile="0.99"),
                            "lag_p50": metrics.get("sysvm_loop_lag_seconds", quantile="0.5"),
                        }
                    )
                else:
                    answer({"error": "unknown command"})
        lag_task.cancel()
    return 0


# =====================================================================================
# Orchestrator
# =====================================================================================


def verdict_cpu(cpu_pct: float, rate: float, target_rate: float = 2000, limit: float = 30) -> str:
    """Pure: the CPU target is judged only near the target rate (idle costs do not scale)."""
    if rate < 0.9 * target_rate:
        return f"not judged (measured below {0.9 * target_rate:.0f}/s: use --rate 2000)"
    return "PASS" if cpu_pct * target_rate / rate <= limit else "FAIL"


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.home = tmp / "home"
        self.api_port = free_port()
        self.agent_port = free_port()
        self.manager: asyncio.subprocess.Process | None = None
        self.manager_log = tmp / "manager.log"
        self.workers: list[Child] = []
        self.http: aiohttp.ClientSession | None = None
        self.results: dict[str, dict[str, Any]] = {"echo": {}, "manager": {}}
        self.notes: list[str] = []
        self.slow_scrapes = 0

    @property
    def n(self) -> int:
        return int(self.args.agents)

    @property
    def connect_timeout(self) -> float:
        t = self.args.connect_timeout
        return float(t) if t else max(120.0, self.n / 20)

    @property
    def interval(self) -> float:
        return float(self.n / self.args.rate)

    def manager_argv(self, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "manager.main",
            "--home",
            str(self.home),
            "--api-listen",
            f"127.0.0.1:{self.api_port}",
            "--agent-listen",
            f"127.0.0.1:{self.agent_port}",
            "--log-level",
            "WARNING",
            *extra,
        ]

    # -- manager -----------------------------------------------------------------------

    async def start_manager(self) -> None:
        self.home.mkdir(mode=0o700)
        argv = self.manager_argv()
        with open(self.manager_log, "ab") as err:
            self.manager = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.manager.returncode is not None:
                break
            with contextlib.suppress(aiohttp.ClientError, OSError):
                if await self.scrape() is not None:
                    log("manager_ready", pid=self.manager.pid, api=self.api_port)
                    return
            await asyncio.sleep(0.2)
        raise RuntimeError(
            f"manager did not become ready: argv={argv} rc={self.manager.returncode} "
            f"stderr tail:\n{self.manager_log.read_text()[-2000:]}"
        )

    async def scrape(
        self, timeout: float = 10.0
    ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        """The manager's /metrics, or None if it answered with an error status."""
        assert self.http is not None
        url = f"http://127.0.0.1:{self.api_port}/metrics"
        async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                return None
            return parse_prometheus(await r.text())

    async def scrape_patiently(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """/metrics during load: a busy manager may answer late; 3 tries of 30 s each."""
        last: Exception | None = None
        for _ in range(3):
            try:
                v = await self.scrape(30.0)
            except (TimeoutError, aiohttp.ClientError) as e:
                last = e
                self.slow_scrapes += 1
                continue
            if v is not None:
                return v
        raise RuntimeError(f"manager /metrics did not answer 3 times in 30 s ({last!r})")

    async def set_heartbeat_interval(self) -> None:
        from cs import AIOCloudStack

        value = min(3600.0, max(1.0, self.interval))
        creds = json.loads((self.home / "credentials.json").read_text())
        try:
            async with AIOCloudStack(
                endpoint=creds["endpoint"], key=creds["apikey"], secret=creds["secretkey"]
            ) as api:
                await asyncio.wait_for(
                    api.updateConfiguration(
                        name="sysvm.agent.heartbeat.interval", value=f"{value:g}"
                    ),
                    30,
                )
            log("heartbeat_interval_set", manager=value, bench=self.interval)
        except Exception as e:
            self.notes.append(
                f"could not set sysvm.agent.heartbeat.interval through the API ({e!r:.120});"
                " the manager keeps its default"
            )
            log("heartbeat_interval_not_set", error=repr(e)[:200])

    async def create_vms(self) -> Path:
        out = self.tmp / "boot.jsonl"
        argv = self.manager_argv(
            "create-external-vms",
            "--role",
            self.args.role,
            "--count",
            str(self.n),
            "--out",
            str(out),
        )
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 120 + self.n / 50)
        except TimeoutError:
            await terminate(proc, 5)
            raise RuntimeError(f"timed out: {argv}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{argv} exited with {proc.returncode}: {err.decode()[-1500:]}")
        lines = sum(1 for _ in out.open())
        if lines != self.n:
            raise RuntimeError(f"{out} has {lines} lines, expected {self.n}")
        return out

    async def stop_manager(self) -> tuple[int | None, float]:
        assert self.manager is not None
        t0 = time.monotonic()
        rc = await terminate(self.manager, 60)
        return rc, time.monotonic() - t0

    # -- workers -----------------------------------------------------------------------

    async def start_workers(self, boot: Path) -> None:
        agents_dir = self.tmp / "agents"
        agents_dir.mkdir(mode=0o700)
        for i in range(self.args.workers):
            argv = [
                sys.executable,
                str(HERE),
                "_worker",
                "--boot",
                str(boot),
                "--index",
                str(i),
                "--workers",
                str(self.args.workers),
                "--dir",
                str(agents_dir),
                "--seed",
                str(self.args.seed),
            ]
            child = await Child.start(f"worker{i}", argv, self.tmp / f"worker{i}.log")
            self.workers.append(child)
        for w in self.workers:
            await w.read(60)

    async def all_workers(self, wait: float, **cmd: Any) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.call(wait, **cmd) for w in self.workers)))

    def worker_samples(self) -> list[ProcSample]:
        return [proc_sample(w.pid) for w in self.workers]

    # -- phases ------------------------------------------------------------------------

    async def enrol(self) -> None:
        res = await self.all_workers(
            600 + self.n / 10, cmd="enrol", concurrency=self.args.concurrency
        )
        ok = sum(r["enrolled"] for r in res)
        secs = max(r["seconds"] for r in res)
        failures: Counter[str] = Counter()
        for r in res:
            failures.update(r["failures"])
        log("enrolled", agents=ok, seconds=secs, failures=dict(failures) or "-")
        self.results["enrol"] = {"ok": ok, "seconds": secs}
        if ok != self.n:
            self.notes.append(f"only {ok}/{self.n} agents enrolled ({dict(failures)})")

    async def measure(
        self,
        name: str,
        pid: int,
        url: str | None,
        mode: str,
        server_stats: Callable[[], Awaitable[dict[str, float]]],
    ) -> None:
        """Connect all agents, then measure for --duration seconds."""
        res = self.results[name]
        before = proc_sample(pid)
        timeout = self.connect_timeout
        t0 = time.monotonic()
        conn = await self.all_workers(
            timeout + 30,
            cmd="connect",
            url=url,
            mode=mode,
            interval=self.interval,
            concurrency=self.args.concurrency,
            timeout=timeout,
        )
        res["connect_s"] = time.monotonic() - t0
        res["live"] = sum(c["live"] for c in conn)
        log(f"{name}_connected", live=res["live"], seconds=res["connect_s"])
        # Let the heartbeat phases settle (each agent's first beat is within one interval).
        await asyncio.sleep(min(5.0, self.interval + 1.0))
        await self.all_workers(30, cmd="stats", reset=True)
        s0, c0, w0 = await server_stats(), proc_sample(pid), self.worker_samples()
        m0 = machine_sample()
        await asyncio.sleep(self.args.duration)
        s1, c1, w1 = await server_stats(), proc_sample(pid), self.worker_samples()
        res["machine_busy"], res["machine_stall"] = machine_load(m0, machine_sample())
        stats = await self.all_workers(30, cmd="stats", reset=True)
        window = c1.at - c0.at
        res["server_connected"] = s1["connected"]
        res["hb_per_s"] = (s1["frames"] - s0["frames"]) / window
        res["cpu_pct"] = cpu_percent(c0, c1)
        res["rss"] = c1.rss
        res["rss_per_agent"] = (c1.rss - before.rss) / max(1, res["live"])
        res["lag_p99"] = s1["lag_p99"]
        res["lag_p50"] = s1["lag_p50"]
        rtts = [x for s in stats for x in s["rtts"]]
        res["rtt_p50"] = quantile(rtts, 0.5)
        res["rtt_p99"] = quantile(rtts, 0.99)
        res["hb_sent_per_s"] = sum(s["hb_sent"] for s in stats) / window
        res["acks_per_s"] = sum(s["acks"] for s in stats) / window
        res["ack_every"] = max(s["ack_every"] for s in stats)
        res["client_cpu_pct"] = sum(cpu_percent(a, b) for a, b in zip(w0, w1, strict=True))
        res["client_lag_p99"] = max(s["lag_p99"] for s in stats)
        failures: Counter[str] = Counter()
        for s in stats:
            failures.update(s["failures"])
        res["failures"] = dict(failures)
        res["configs_per_s"] = sum(s["configs"] for s in stats) / window
        res["commands_per_s"] = sum(s["commands"] for s in stats) / window
        log(
            f"{name}_measured",
            hb_per_s=res["hb_per_s"],
            cpu_pct=res["cpu_pct"],
            rss_mib=c1.rss / 2**20,
            lag_p99_ms=res["lag_p99"] * 1000,
        )

    async def baseline(self) -> None:
        argv = tls_server_argv(HERE, "_echo", self.home)
        echo = await Child.start("echo", argv, self.tmp / "echo.log")
        try:
            port = (await echo.read(60))["port"]

            async def stats() -> dict[str, float]:
                s = await echo.call(30, cmd="stats")
                return {
                    "connected": s["connections"],
                    "frames": s["frames"],
                    "lag_p99": s["lag_p99"],
                    "lag_p50": s["lag_p50"],
                }

            await self.measure("echo", echo.pid, f"wss://127.0.0.1:{port}/agent", "echo", stats)
            await self.all_workers(120, cmd="disconnect")
        finally:
            await echo.stop()

    async def manager_phase(self) -> None:
        assert self.manager is not None

        async def stats() -> dict[str, float]:
            v = await self.scrape_patiently()
            return {
                "connected": metric(v, "sysvm_agents_connected") or 0.0,
                "frames": metric(v, "sysvm_heartbeats_total") or 0.0,
                "lag_p99": metric(v, "sysvm_loop_lag_seconds", quantile="0.99") or 0.0,
                "lag_p50": metric(v, "sysvm_loop_lag_seconds", quantile="0.5") or 0.0,
            }

        await self.measure("manager", self.manager.pid, None, "agent", stats)

    async def storm(self) -> None:
        assert self.manager is not None
        res: dict[str, Any] = {}
        before = proc_sample(self.manager.pid)
        t0 = time.monotonic()
        drops = await self.all_workers(
            self.connect_timeout + 30, cmd="drop", timeout=self.connect_timeout
        )
        res["client_s"] = time.monotonic() - t0
        res["dropped"] = sum(d["dropped"] for d in drops)
        res["live"] = sum(d["live"] for d in drops)
        res["back"] = sum(d["back"] for d in drops)
        failures: Counter[str] = Counter()
        for d in drops:
            failures.update(d["failures"])
        res["failures"] = dict(failures)
        # The manager's view: sessions replaced or closed, then all connected again.
        deadline = time.monotonic() + 60
        connected = 0.0
        while time.monotonic() < deadline:
            v = await self.scrape_patiently()
            connected = metric(v, "sysvm_agents_connected") or 0.0
            if connected >= res["live"]:
                break
            await asyncio.sleep(0.2)
        res["manager_s"] = time.monotonic() - t0
        res["manager_connected"] = connected
        after = proc_sample(self.manager.pid)
        res["cpu_s"] = after.cpu - before.cpu
        try:
            answered = bool(await self.scrape_patiently())
        except RuntimeError:
            answered = False
        res["alive"] = self.manager.returncode is None and answered
        self.results["storm"] = res
        log(
            "storm_done",
            seconds=res["client_s"],
            live=res["live"],
            manager_connected=connected,
            alive=res["alive"],
        )

    # -- report ------------------------------------------------------------------------

    def report(self) -> str:
        e, mg = self.results["echo"], self.results["manager"]
        n = self.n

        def fmt(d: dict[str, Any], key: str, scale: float = 1.0, spec: str = ".1f") -> str:
            return "-" if key not in d else format(d[key] * scale, spec)

        def ratio(key: str) -> str:
            if key not in e or key not in mg or not e[key]:
                return "-"
            return f"{mg[key] / e[key]:.2f}x"

        rows = [
            [
                "agents connected (client / server)",
                f"{mg.get('live', 0)}/{mg.get('server_connected', 0):.0f}",
                f"{e.get('live', 0)}/{e.get('server_connected', 0):.0f}",
                "",
            ],
            [
                "time to connect all (s)",
                fmt(mg, "connect_s"),
                fmt(e, "connect_s"),
                ratio("connect_s"),
            ],
            [
                "heartbeats/s received by server",
                fmt(mg, "hb_per_s"),
                fmt(e, "hb_per_s"),
                ratio("hb_per_s"),
            ],
            ["server CPU (% of one core)", fmt(mg, "cpu_pct"), fmt(e, "cpu_pct"), ratio("cpu_pct")],
            [
                "server CPU per 1,000 hb/s (%)",
                f"{1000 * mg['cpu_pct'] / mg['hb_per_s']:.1f}" if mg.get("hb_per_s") else "-",
                f"{1000 * e['cpu_pct'] / e['hb_per_s']:.1f}" if e.get("hb_per_s") else "-",
                "",
            ],
            ["server RSS (MiB)", fmt(mg, "rss", 2**-20), fmt(e, "rss", 2**-20), ratio("rss")],
            [
                "server RSS per agent (KiB)",
                fmt(mg, "rss_per_agent", 1 / 1024),
                fmt(e, "rss_per_agent", 1 / 1024),
                ratio("rss_per_agent"),
            ],
            [
                "loop lag p50 / p99 (ms, last 60 s)",
                f"{fmt(mg, 'lag_p50', 1000)} / {fmt(mg, 'lag_p99', 1000)}",
                f"{fmt(e, 'lag_p50', 1000)} / {fmt(e, 'lag_p99', 1000)}",
                ratio("lag_p99"),
            ],
            [
                "heartbeat->ack RTT p50 / p99 (ms)",
                f"{fmt(mg, 'rtt_p50', 1000)} / {fmt(mg, 'rtt_p99', 1000)}",
                f"{fmt(e, 'rtt_p50', 1000)} / {fmt(e, 'rtt_p99', 1000)}",
                ratio("rtt_p99"),
            ],
            [
                "client: sent / acked per s",
                f"{fmt(mg, 'hb_sent_per_s')} / {fmt(mg, 'acks_per_s')}",
                f"{fmt(e, 'hb_sent_per_s')} / {fmt(e, 'acks_per_s')}",
                "",
            ],
            [
                "heartbeats per ack (welcome.ack_every)",
                f"{mg.get('ack_every', '-')}",
                "1" if e else "-",
                "",
            ],
            [
                "client: CPU % (all workers) / lag p99 ms",
                f"{fmt(mg, 'client_cpu_pct')} / {fmt(mg, 'client_lag_p99', 1000)}",
                f"{fmt(e, 'client_cpu_pct')} / {fmt(e, 'client_lag_p99', 1000)}",
                "",
            ],
            [
                "client: configs / commands received per s",
                f"{fmt(mg, 'configs_per_s')} / {fmt(mg, 'commands_per_s')}",
                "",
                "",
            ],
            [
                f"machine: CPU busy % ({os.cpu_count()} CPUs) / CPU stall %",
                f"{fmt(mg, 'machine_busy')} / {fmt(mg, 'machine_stall')}",
                f"{fmt(e, 'machine_busy')} / {fmt(e, 'machine_stall')}",
                "",
            ],
        ]
        out = [
            f"sysvm agents benchmark: {n} agents, {self.args.rate:g} heartbeats/s asked "
            f"(each agent every {self.interval:.2f} s), {self.args.duration:g} s measured, "
            f"{self.args.workers} client processes, role {self.args.role}, loopback, mutual TLS",
            "",
            table(rows, ["", "sysvm-manager", "websockets echo", "manager/echo"]),
            "",
        ]
        if "enrol" in self.results:
            en = self.results["enrol"]
            out.append(
                f"enrolment: {en['ok']}/{n} agents in {en['seconds']:.1f} s "
                f"({en['ok'] / max(en['seconds'], 1e-9):.0f}/s)"
            )
        st = self.results.get("storm")
        if st:
            out.append(
                f"reconnect storm: {st['dropped']} connections aborted at once; "
                f"{st['back']}/{st['dropped']} welcomed again after {st['client_s']:.1f} s "
                f"({st['live']}/{n} live) "
                f"(manager reports {st['manager_connected']:.0f} connected after "
                f"{st['manager_s']:.1f} s, {st['cpu_s']:.1f} CPU s); manager survived: "
                f"{'yes' if st['alive'] else 'NO'}; client retries: {st['failures'] or 'none'}"
            )
        stop = self.results.get("stop")
        if stop:
            out.append(
                f"manager stop (SIGTERM): exit code {stop['rc']} after {stop['seconds']:.1f} s"
            )
        if mg.get("failures"):
            out.append(f"manager phase client errors: {mg['failures']}")
        out.append("")
        out.append("targets (2-core machine):")
        if mg.get("live") and "rss_per_agent" in mg:
            per_agent = mg["rss_per_agent"]
            projected = mg["rss"] + per_agent * max(0, 10_000 - mg["live"])
            out.append(
                f"  10,000 agents in <= 1 GiB RSS: {mg['rss'] / 2**20:.0f} MiB at {mg['live']}"
                f" agents; {projected / 2**20:.0f} MiB projected at 10,000 -> "
                f"{'PASS' if projected <= 2**30 else 'FAIL'}"
                + ("" if mg["live"] >= 10_000 else " (projection: run with -n 10000)")
            )
        if mg.get("hb_per_s"):
            verdict = verdict_cpu(mg["cpu_pct"], mg["hb_per_s"])
            out.append(
                f"  2,000 heartbeats/s at <= 30% of one core: {mg['cpu_pct']:.1f}% at "
                f"{mg['hb_per_s']:.0f}/s -> {verdict}"
            )
        if "lag_p99" in mg:
            out.append(
                f"  loop lag p99 < 50 ms: {mg['lag_p99'] * 1000:.1f} ms -> "
                f"{'PASS' if mg['lag_p99'] < 0.05 else 'FAIL'}"
            )
        stall = max(mg.get("machine_stall", 0.0), e.get("machine_stall", 0.0))
        if stall > 20:
            out.append(
                f"note: tasks waited for a CPU {stall:.0f}% of the time (/proc/pressure/cpu):"
                " the machine is shared and busy, so lag and RTT include scheduling delay;"
                " CPU and RSS figures are not affected"
            )
        if self.slow_scrapes:
            out.append(
                f"note: the manager's /metrics took over 30 s to answer {self.slow_scrapes}"
                " time(s) under load"
            )
        for note in self.notes:
            out.append(f"note: {note}")
        if self.args.duration < 60:
            out.append(
                "note: loop-lag quantiles are the servers' last-60-s window, so with a"
                " shorter --duration they include the connect phase"
            )
        return "\n".join(out)

    async def run(self) -> str:
        async with aiohttp.ClientSession() as self.http:
            await self.start_manager()
            await self.set_heartbeat_interval()
            boot = await self.create_vms()
            log("vms_created", count=self.n)
            await self.start_workers(boot)
            await self.enrol()
            if not self.args.no_baseline:
                await self.baseline()
            await self.manager_phase()
            if not self.args.no_storm:
                await self.storm()
            await self.all_workers(120, cmd="disconnect")
            rc, secs = await self.stop_manager()
            self.results["stop"] = {"rc": rc, "seconds": secs}
        return self.report()

    async def cleanup(self) -> None:
        await asyncio.gather(*(w.stop(15) for w in self.workers), return_exceptions=True)
        if self.manager is not None and self.manager.returncode is None:
            await terminate(self.manager, 30)


async def bench_main(args: argparse.Namespace) -> int:
    nofile = raise_nofile()
    if nofile < args.agents + 256:
        log("nofile_low", limit=nofile, agents=args.agents)
    tmp = Path(tempfile.mkdtemp(prefix="sysvm-bench-"))
    bench = Bench(args, tmp)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        runner = asyncio.ensure_future(bench.run())
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if runner not in done:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            log("interrupted")
            print("PARTIAL RESULTS (interrupted)\n" + bench.report(), flush=True)
            return 130
        try:
            print(runner.result(), flush=True)
        except Exception:
            print("PARTIAL RESULTS (the run failed, see below)\n" + bench.report(), flush=True)
            raise
        return 0
    finally:
        await bench.cleanup()
        if args.keep:
            log("kept", dir=tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        p = argparse.ArgumentParser(prog="agents.py _worker")
        p.add_argument("--boot", required=True)
        p.add_argument("--index", type=int, required=True)
        p.add_argument("--workers", type=int, required=True)
        p.add_argument("--dir", required=True)
        p.add_argument("--seed", type=int, default=1)
        ns = p.parse_args(argv[1:])
        ns.mode = "worker"
        return ns
    if argv and argv[0] == "_echo":
        p = argparse.ArgumentParser(prog="agents.py _echo")
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
        p.add_argument("--ca", required=True)
        ns = p.parse_args(argv[1:])
        ns.mode = "echo"
        return ns
    p = argparse.ArgumentParser(prog="agents.py", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("-n", "--agents", type=int, default=1000, help="simulated agents (1000)")
    p.add_argument("--rate", type=float, default=2000.0, help="total heartbeats/s (2000)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (20)")
    p.add_argument("--workers", type=int, default=2, help="client processes (2)")
    p.add_argument(
        "--concurrency", type=int, default=64, help="handshakes in flight per worker (64)"
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=0.0,
        help="seconds to wait for all agents to connect (and to reconnect after the storm);"
        " default max(120, N/20); the run goes on with those connected by then",
    )
    p.add_argument(
        "--role",
        default="consoleproxy",
        choices=["consoleproxy", "router", "secondarystorage"],
        help="role of the simulated VMs (consoleproxy)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-baseline", action="store_true", help="skip the echo baseline")
    p.add_argument("--no-storm", action="store_true", help="skip the reconnect storm")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ns = p.parse_args(argv)
    if ns.agents < 1 or ns.rate <= 0 or ns.duration <= 0 or ns.workers < 1:
        p.error("--agents, --rate, --duration and --workers must be positive")
    ns.workers = min(ns.workers, ns.agents)
    ns.mode = "bench"
    return ns


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    entry = {"worker": worker_main, "echo": echo_main, "bench": bench_main}[args.mode]
    return uvloop.run(entry(args))


if __name__ == "__main__":
    sys.exit(main())
