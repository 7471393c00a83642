#!/usr/bin/env python3
"""Console proxy data path benchmark: sysvm's CPVM relay vs websockify vs a raw TCP relay.

Each proxy runs as its own process in front of the same VNC-like endpoint (an RFB server
that does VNC authentication, then echoes), all on loopback, all measured in the same run:

- throughput (MB/s) and proxy CPU-seconds per GB relayed, at 1 KiB and 64 KiB messages
  (client -> proxy -> endpoint -> proxy -> client; bytes counted both ways);
- round-trip latency p50/p99 of small messages, and what the proxy adds over a direct
  connection to the endpoint;
- memory per idle session (proxy PSS growth / sessions) at 200 sessions;
- sessions per core at 200 KiB/s each (proxy CPU while N sessions stream).

Two more relays written the usual way (``async for msg in ws`` + stream writer) on
aiohttp's websocket and on the ``websockets`` library show what the raw-Protocol data path
buys over either library.

The sysvm proxy authenticates to the endpoint with VNC auth itself and offers the client
"None"; websockify and the raw relay pass the handshake through, so their clients do VNC
auth end to end. CPU and RSS are read from /proc for the proxy's whole process tree
(websockify forks one process per connection).

Usage: .venv/bin/python scripts/bench/console.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import uvloop
from websockets.speedups import apply_mask

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from agent.roles.consoleproxy import rfb  # noqa: E402

PASSWORD = "benchpw1"
TOKEN = "b" * 32
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------ servers (subprocesses)


class EchoEndpoint(asyncio.Protocol):
    """RFB 3.8 server with VNC auth, then swallows ClientInit and echoes everything."""

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.state = "version"
        self.buf = b""
        self.challenge = os.urandom(16)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(b"RFB 003.008\n")

    def data_received(self, data: bytes) -> None:
        if self.state == "echo":
            self.t.write(data)
            return
        self.buf += data
        while True:
            if self.state == "version" and len(self.buf) >= 12:
                self.buf = self.buf[12:]
                self.t.write(b"\x01\x02")
                self.state = "choice"
            elif self.state == "choice" and len(self.buf) >= 1:
                self.buf = self.buf[1:]
                self.t.write(self.challenge)
                self.state = "response"
            elif self.state == "response" and len(self.buf) >= 16:
                ok = self.buf[:16] == rfb.vnc_auth_response(PASSWORD, self.challenge)
                self.buf = self.buf[16:]
                self.t.write(struct.pack("!I", 0 if ok else 1))
                if not ok:
                    self.t.close()
                    return
                self.state = "init"
            elif self.state == "init" and len(self.buf) >= 1:
                self.buf = self.buf[1:]
                self.state = "echo"
                if self.buf:
                    self.t.write(self.buf)
                    self.buf = b""
                return
            else:
                return


class RawRelay(asyncio.Protocol):
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.peer: Any = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.pause_reading()
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._connect(loop))

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        _, self.peer = await loop.create_connection(lambda: _Back(self), *self.target)
        self.t.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.peer.t.write(data)

    def pause_writing(self) -> None:
        self.peer.t.pause_reading()

    def resume_writing(self) -> None:
        self.peer.t.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.t.close()


class _Back(asyncio.Protocol):
    def __init__(self, front: RawRelay) -> None:
        self.front = front

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.front.t.write(data)

    def pause_writing(self) -> None:
        self.front.t.pause_reading()

    def resume_writing(self) -> None:
        self.front.t.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.t.close()


async def _pump_down(reader: asyncio.StreamReader, send: Any) -> None:
    while data := await reader.read(65536):
        await send(data)


async def serve_aiohttp(target_port: int) -> int:
    """The same relay written the usual way on aiohttp's websocket (for comparison)."""
    from aiohttp import WSMsgType, web

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        reader, writer = await asyncio.open_connection("127.0.0.1", target_port)

        async def up() -> None:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    writer.write(msg.data)
                    await writer.drain()
            writer.close()

        down = asyncio.create_task(_pump_down(reader, ws.send_bytes))
        await up()
        down.cancel()
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]


async def serve_websockets(target_port: int) -> int:
    """The same relay on the `websockets` library (for comparison)."""
    from websockets.asyncio.server import serve as ws_serve
    from websockets.exceptions import ConnectionClosed

    async def handler(ws: Any) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", target_port)
        down = asyncio.create_task(_pump_down(reader, ws.send))
        try:
            async for msg in ws:
                writer.write(msg)
                await writer.drain()
        except (ConnectionClosed, ConnectionError):
            pass  # the bench client closes abruptly
        finally:
            down.cancel()
            writer.close()

    server = await ws_serve(handler, "127.0.0.1", 0, max_size=None, compression=None)
    return int(server.sockets[0].getsockname()[1])


async def serve(kind: str, target_port: int) -> None:
    loop = asyncio.get_running_loop()
    if kind == "echo":
        server = await loop.create_server(EchoEndpoint, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
    elif kind == "raw":
        server = await loop.create_server(
            lambda: RawRelay(("127.0.0.1", target_port)), "127.0.0.1", 0, backlog=1024
        )
        port = server.sockets[0].getsockname()[1]
    elif kind == "aiohttp":
        port = await serve_aiohttp(target_port)
    elif kind == "websockets":
        port = await serve_websockets(target_port)
    else:
        from agent.roles.consoleproxy.server import ConsoleServer, ProxyConfig, Target

        async def authorize(req: Any) -> Target:
            return Target(req.vm_id, "127.0.0.1", target_port, PASSWORD)

        cfg = ProxyConfig(
            host="127.0.0.1",
            port=0,
            max_sessions=10_000,
            max_per_ip=10_000,
            allow_missing_origin=True,
            loadscan_interval=5.0,
        )
        cs = ConsoleServer(cfg, authorize, lambda name, data: None)
        await cs.start()
        port = cs.address[1]
    print(port, flush=True)
    await asyncio.Event().wait()


# ------------------------------------------------------------------ client


class Client(asyncio.Protocol):
    """Bench client: websocket (masked frames) or plain TCP; byte-stream interface."""

    def __init__(self, ws: bool) -> None:
        self.ws = ws
        self.raw = b""
        self.stream = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.want = 0
        self.received = 0
        self.need = 0
        self.upgraded = not ws
        self.closed = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.waiter and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.raw += data
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.raw.startswith(b"HTTP/1.1 101"):
                raise SystemExit(f"upgrade refused: {self.raw[:200]!r}")
            data = self.raw[end + 4 :]
            self.raw = b""
            self.upgraded = True
        if self.ws:
            buf = self.raw + data if self.raw else data
            pos, n = 0, len(buf)
            got = 0
            while n - pos >= 2:
                ln = buf[pos + 1] & 0x7F
                hl = 2
                if ln == 126:
                    if n - pos < 4:
                        break
                    ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                    hl = 4
                elif ln == 127:
                    if n - pos < 10:
                        break
                    ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                    hl = 10
                if n - pos < hl + ln:
                    break
                if self.want == 0:
                    self.stream += buf[pos + hl : pos + hl + ln]
                got += ln
                pos += hl + ln
            self.raw = buf[pos:]
        else:
            got = len(data)
            if self.want == 0:
                self.stream += data
        self.received += got
        w = self.waiter
        if (
            w is not None
            and not w.done()
            and (
                (self.want and self.received >= self.want)
                or (not self.want and len(self.stream) >= self.need)
            )
        ):
            w.set_result(None)

    def send(self, data: bytes) -> None:
        if self.ws:
            mask = os.urandom(4)
            n = len(data)
            if n < 126:
                head = bytes((0x82, 0x80 | n))
            elif n < 65536:
                head = struct.pack("!BBH", 0x82, 0xFE, n)
            else:
                head = struct.pack("!BBQ", 0x82, 0xFF, n)
            self.t.write(head + mask + apply_mask(data, mask))
        else:
            self.t.write(data)

    async def read_exact(self, n: int) -> bytes:
        self.need = n
        while len(self.stream) < n:
            self.waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.waiter, 10)
        out = bytes(self.stream[:n])
        del self.stream[:n]
        return out

    async def wait_received(self, total: int) -> None:
        self.want = total
        while self.received < total:
            self.waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.waiter, 120)


async def open_session(kind: str, port: int) -> Client:
    loop = asyncio.get_running_loop()
    ws = kind in ("sysvm", "websockify")
    _, c = await loop.create_connection(lambda: Client(ws), "127.0.0.1", port)
    if ws:
        path = f"/websockify?vm=bench-vm&token={TOKEN}" if kind == "sysvm" else "/"
        c.t.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:{port}\r\n\r\n"
            ).encode()
        )
    assert await c.read_exact(12) == b"RFB 003.008\n"
    c.send(b"RFB 003.008\n")
    if kind == "sysvm":
        assert await c.read_exact(2) == b"\x01\x01"
        c.send(b"\x01")
    else:  # end-to-end VNC auth through a transparent relay
        assert await c.read_exact(2) == b"\x01\x02"
        c.send(b"\x02")
        challenge = await c.read_exact(16)
        c.send(rfb.vnc_auth_response(PASSWORD, challenge))
    assert await c.read_exact(4) == b"\0\0\0\0"
    c.send(b"\x01")  # ClientInit
    return c


# ------------------------------------------------------------------ measurements


def tree(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / TICK


def rss_bytes(pid: int) -> int:
    """PSS of the process tree (shared pages split between sharers: fair to forking
    websockify), RSS where smaps_rollup is unavailable."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            try:
                with open(f"/proc/{p}/statm") as f:
                    total += int(f.read().split()[1]) * PAGE
            except OSError:
                pass
    return total


async def throughput(kind: str, port: int, pid: int, msg: int, total: int) -> tuple[float, float]:
    c = await open_session(kind, port)
    payload = os.urandom(msg)
    window = max(8, (512 * 1024) // msg)
    count = total // msg
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    sent = 0
    window_bytes = window * msg
    while sent < count:
        while sent < count and sent * msg - c.received < window_bytes:
            c.send(payload)
            sent += 1
        target = sent * msg - window_bytes // 2
        if target > c.received:
            await c.wait_received(target)
    await c.wait_received(count * msg)
    dt, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    c.t.close()
    relayed = 2 * count * msg
    return relayed / dt / 1e6, cpu / (relayed / 1e9)


def set_realtime(pids: list[int], on: bool) -> bool:
    """SCHED_FIFO for the measured processes (their whole trees) and this one, so that other
    processes on a busy machine do not decide the p99; they all block on I/O, none spins.
    Needs root; returns False where not allowed."""
    policy = os.SCHED_FIFO if on else os.SCHED_OTHER
    param = os.sched_param(10 if on else 0)
    try:
        for root in pids:
            for p in tree(root):
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setscheduler(p, policy, param)
        os.sched_setscheduler(0, policy, param)
    except PermissionError:
        return False
    return True


async def latency(
    sessions: dict[str, tuple[str, int]], n: int, rt_pids: list[int] | None = None
) -> dict[str, list[float]]:
    """Round trips of an 8-byte message, interleaved across the proxies (and the direct
    path) so that noise from other processes hits them alike. With ``rt_pids``, the
    measurement runs under real-time scheduling (see :func:`set_realtime`)."""
    clients = {name: await open_session(kind, port) for name, (kind, port) in sessions.items()}
    rt = bool(rt_pids) and set_realtime(rt_pids or [], True)
    try:
        return await _round_trips(clients, n)
    finally:
        if rt:
            set_realtime(rt_pids or [], False)
        for c in clients.values():
            c.t.close()


async def _round_trips(clients: dict[str, Client], n: int) -> dict[str, list[float]]:
    msg = b"\x04\x01\x00\x00\x00\x00\xff\x0d"  # a KeyEvent
    rtts: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(n):
        for name, c in clients.items():
            c.received = 0
            t0 = time.perf_counter()
            c.send(msg)
            await c.wait_received(len(msg))
            rtts[name].append((time.perf_counter() - t0) * 1e3)
    return rtts


def pct(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(len(ys) * q))]


async def idle_memory(kind: str, port: int, pid: int, sessions: int) -> float:
    base = rss_bytes(pid)
    clients = [await open_session(kind, port) for _ in range(sessions)]
    await asyncio.sleep(0.5)  # let the proxy settle (not a condition: a measurement window)
    grown = rss_bytes(pid) - base
    for c in clients:
        c.t.close()
    return grown / sessions


async def streaming(kind: str, port: int, pid: int, sessions: int, seconds: float) -> float:
    """Sessions per core at 200 KiB/s each: N sessions x 1 KiB x 200/s; proxy CPU share."""
    clients = [await open_session(kind, port) for _ in range(sessions)]
    payload = os.urandom(1024)
    for c in clients:
        c.received, c.want = 0, 1 << 62  # count only
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    ticks = int(seconds * 50)
    for i in range(ticks):
        for c in clients:
            for _ in range(4):  # 4 KiB per 20 ms = 200 KiB/s
                c.send(payload)
        next_t = t0 + (i + 1) / 50
        await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
    dt = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    behind = sum(ticks * 4 * 1024 - c.received for c in clients)
    for c in clients:
        c.t.close()
    load = cpu / dt  # cores used
    if behind > sessions * 256 * 1024:
        print(f"    ({kind}: {behind / 1e6:.1f} MB not yet echoed: saturated)")
    return sessions / load if load > 0 else float("inf")


def start(argv: list[str]) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    return p, int(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.05)


async def main(quick: bool, only: str) -> None:
    me = [sys.executable, __file__]
    procs: list[subprocess.Popen[str]] = []
    try:
        echo, echo_port = start([*me, "--serve", "echo", "0"])
        procs.append(echo)
        ours, ours_port = start([*me, "--serve", "sysvm", str(echo_port)])
        raw, raw_port = start([*me, "--serve", "raw", str(echo_port)])
        aio, aio_port = start([*me, "--serve", "aiohttp", str(echo_port)])
        wsl, wsl_port = start([*me, "--serve", "websockets", str(echo_port)])
        procs += [ours, raw, aio, wsl]
        wsf_port = free_port()
        wsf_bin = shutil.which("websockify", path=str(Path(sys.executable).parent))
        assert wsf_bin, "websockify not installed in the venv"
        wsf = subprocess.Popen(
            [wsf_bin, f"127.0.0.1:{wsf_port}", f"127.0.0.1:{echo_port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(wsf)
        await wait_port(wsf_port)
        targets = {
            "sysvm": (ours_port, ours.pid),
            "websockify": (wsf_port, wsf.pid),
            "aiohttp-ws": (aio_port, aio.pid),
            "websockets": (wsl_port, wsl.pid),
            "raw-tcp": (raw_port, raw.pid),
        }
        kinds = {
            "sysvm": "sysvm",
            "websockify": "websockify",
            "aiohttp-ws": "websockify",  # transparent relays: path "/", end-to-end VNC auth
            "websockets": "websockify",
            "raw-tcp": "raw",
        }
        scale = 0.25 if quick else 1.0
        results: dict[str, dict[str, float]] = {k: {} for k in targets}
        if only == "throughput":
            for size, total in ((1024, int(64e6 * scale)), (65536, int(512e6 * scale))):
                for name, (port, pid) in targets.items():
                    mbs, cpu_gb = await throughput(kinds[name], port, pid, size, total)
                    print(f"  {size:6d} {name:11s} {mbs:8.1f} MB/s   {cpu_gb:7.2f} CPU-s/GB")
            return
        for size, total in ((1024, int(32e6 * scale)), (65536, int(256e6 * scale))):
            print(f"throughput, {size // 1024} KiB messages, {total / 1e6:.0f} MB each way:")
            for name, (port, pid) in targets.items():
                mbs, cpu_gb = await throughput(kinds[name], port, pid, size, total)
                results[name][f"mbs_{size}"] = mbs
                results[name][f"cpu_{size}"] = cpu_gb
                print(f"  {name:11s} {mbs:8.1f} MB/s   {cpu_gb:7.2f} CPU-s/GB")
        n_lat = 500 if quick else 3000
        lat_targets = {"direct": ("raw", echo_port)} | {
            name: (kinds[name], port) for name, (port, _) in targets.items()
        }
        all_pids = [echo.pid] + [pid for _, pid in targets.values()]
        for rt in (False, True):
            rtts = await latency(lat_targets, n_lat, all_pids if rt else None)
            d50, d99 = pct(rtts["direct"], 0.5), pct(rtts["direct"], 0.99)
            how = "real-time scheduling (the proxies' own cost)" if rt else "normal scheduling"
            print(
                f"round trip, {n_lat} x 8-byte messages, interleaved, {how} (direct to "
                f"endpoint: p50 {d50:.3f} ms, p99 {d99:.3f} ms):"
            )
            for name in targets:
                p50, p99 = pct(rtts[name], 0.5), pct(rtts[name], 0.99)
                key = "rt_" if rt else ""
                results[name][f"{key}added_p50"] = p50 - d50
                results[name][f"{key}added_p99"] = p99 - d99
                print(
                    f"  {name:11s} p50 {p50:.3f} ms  p99 {p99:.3f} ms  added: p50 "
                    f"{p50 - d50:+.3f} ms, p99 {p99 - d99:+.3f} ms"
                )
        n_idle = 200
        print(f"memory per idle session at {n_idle} sessions (proxy PSS growth / sessions):")
        for name, (port, pid) in targets.items():
            per = await idle_memory(kinds[name], port, pid, n_idle)
            results[name]["idle_kib"] = per / 1024
            print(f"  {name:11s} {per / 1024:8.1f} KiB/session")
            await asyncio.sleep(1.0)  # let closes finish before the next proxy's baseline
        n_stream, secs = (20, 2.0) if quick else (40, 4.0)
        print(f"sessions per core at 200 KiB/s each ({n_stream} sessions, {secs:g} s):")
        for name, (port, pid) in targets.items():
            spc = await streaming(kinds[name], port, pid, n_stream, secs)
            results[name]["spc"] = spc
            print(f"  {name:11s} {spc:8.0f} sessions/core")
        o, w = results["sysvm"], results["websockify"]
        print("ratios (sysvm vs websockify):")
        print(f"  CPU/GB at 1 KiB:  {o['cpu_1024'] / w['cpu_1024']:.3f} (target <= 0.2)")
        print(f"  CPU/GB at 64 KiB: {o['cpu_65536'] / w['cpu_65536']:.3f}")
        print(f"  MB/s at 1 KiB:    {o['mbs_1024'] / w['mbs_1024']:.2f}x")
        print(
            f"  idle memory:      {o['idle_kib']:.1f} KiB vs {w['idle_kib']:.1f} KiB "
            f"(target <= 32 KiB)"
        )
        print(
            f"  added p99:        {o['added_p99']:.3f} ms normal, {o['rt_added_p99']:.3f} ms "
            f"real-time (target <= 0.5 ms); websockify {w['added_p99']:.3f} / "
            f"{w['rt_added_p99']:.3f} ms"
        )
        print(f"  sessions/core:    {o['spc'] / w['spc']:.1f}x")
        for lib in ("aiohttp-ws", "websockets"):
            x = results[lib]
            print(
                f"sysvm vs a plain {lib} relay: CPU/GB at 1 KiB "
                f"{o['cpu_1024'] / x['cpu_1024']:.2f}, "
                f"at 64 KiB {o['cpu_65536'] / x['cpu_65536']:.2f}; idle memory "
                f"{o['idle_kib']:.1f} vs {x['idle_kib']:.1f} KiB"
            )
        r = results["raw-tcp"]
        print(
            "  added p99 beyond a raw TCP relay's (the machine's noise floor): "
            f"{o['added_p99'] - r['added_p99']:+.3f} ms normal, "
            f"{o['rt_added_p99'] - r['rt_added_p99']:+.3f} ms real-time"
        )
        print("ratio sysvm vs raw TCP relay (the floor):")
        print(
            f"  CPU/GB at 1 KiB: {o['cpu_1024'] / r['cpu_1024']:.2f}x, "
            f"at 64 KiB: {o['cpu_65536'] / r['cpu_65536']:.2f}x"
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller volumes (a smoke run)")
    ap.add_argument("--only", default="", help="run one phase: throughput")
    ap.add_argument("--serve", nargs=2, metavar=("KIND", "TARGET_PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve[0], int(args.serve[1])))
    else:
        uvloop.run(main(args.quick, args.only))
