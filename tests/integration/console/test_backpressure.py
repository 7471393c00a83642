"""Bounded buffers with backpressure both ways through the CPVM relay.

The VNC side here is a small RFB server in the test (a real TCP endpoint on loopback) that
can flood or stop reading on command — QEMU cannot be made to do either on demand."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import websockets

from manager.consoleproxy import tokens

pytestmark = pytest.mark.integration

TIMING = float(os.environ.get("SYSVM_TEST_TIMING", "1"))
FLOOD = 24 << 20
CHUNK = 64 << 10
Console = Any


@dataclass
class Endpoint:
    port: int
    sent: int = 0
    received: int = 0
    reading: asyncio.Event | None = None
    flood: bool = False


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint(0, reading=asyncio.Event())
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            writer.write(b"RFB 003.008\n")
            await reader.readexactly(12)
            writer.write(b"\x01\x01")  # None only
            await reader.readexactly(1)
            writer.write(b"\0\0\0\0")
            await reader.readexactly(1)  # ClientInit
            if ep.flood:
                block = bytes(range(256)) * (CHUNK // 256)
                while ep.sent < FLOOD:
                    writer.write(block)
                    await writer.drain()
                    ep.sent += len(block)
            assert ep.reading is not None
            await ep.reading.wait()
            while data := await reader.read(1 << 16):
                ep.received += len(data)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    ep.port = server.sockets[0].getsockname()[1]
    try:
        yield ep
    finally:
        server.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def _plateau(value: Any, timeout: float = 15.0) -> int:
    """Polls ``value()`` until it stops changing for 0.3 s; returns it."""
    async with asyncio.timeout(timeout * TIMING):
        last, since = value(), asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(0.05)
            v = value()
            now = asyncio.get_running_loop().time()
            if v != last:
                last, since = v, now
            elif now - since >= 0.3:
                return int(v)


async def _session(console: Console, ep: Endpoint) -> tuple[Any, str]:
    vm = "flood-vm"
    console.records.extra[vm] = tokens.ConsoleTarget(vm, "acct-f", "127.0.0.1", ep.port, "")
    token = await tokens.mint(console.storage, vm_id=vm, account_id="acct-f", now=console.clock())
    return console.ws_url(vm, token), vm


async def _rfb(ws: Any) -> None:
    assert await ws.recv() == b"RFB 003.008\n"
    await ws.send(b"RFB 003.008\n")
    assert await ws.recv() == b"\x01\x01"
    await ws.send(b"\x01")
    assert await ws.recv() == b"\0\0\0\0"
    await ws.send(b"\x01")


async def test_slow_browser_pauses_vnc_side(console: Console, endpoint: Endpoint) -> None:
    endpoint.flood = True
    url, _ = await _session(console, endpoint)
    async with websockets.connect(url, origin=console.origin, max_queue=1) as ws:
        await _rfb(ws)
        sent = await _plateau(lambda: endpoint.sent)
        assert sent < FLOOD, "the flood was never held back"
        (session,) = console.role.server.sessions
        cfg = console.role.server.cfg
        assert not session.vnc.transport.is_reading()
        assert session.browser.transport.get_write_buffer_size() <= cfg.write_high + (256 << 10)
        got = 0
        async with asyncio.timeout(30 * TIMING):
            while got < FLOOD:
                msg = await ws.recv()
                got += len(msg)
        assert got == FLOOD and endpoint.sent == FLOOD


async def test_stalled_vnc_pauses_browser_side(console: Console, endpoint: Endpoint) -> None:
    url, _ = await _session(console, endpoint)
    async with websockets.connect(url, origin=console.origin) as ws:
        await _rfb(ws)
        sent = 0
        block = os.urandom(CHUNK)

        async def pump() -> None:
            nonlocal sent
            while sent < FLOOD:
                await ws.send(block)
                sent += len(block)

        pumping = asyncio.create_task(pump())
        try:
            held = await _plateau(lambda: sent)
            assert held < FLOOD, "the client was never held back"
            (session,) = console.role.server.sessions
            cfg = console.role.server.cfg
            assert not session.browser.transport.is_reading()
            assert session.vnc.transport.get_write_buffer_size() <= cfg.write_high + (256 << 10)
            assert endpoint.reading is not None
            endpoint.reading.set()
            async with asyncio.timeout(30 * TIMING):
                await pumping
                while endpoint.received < FLOOD + 0:
                    await asyncio.sleep(0.02)
        finally:
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)
        assert endpoint.received == FLOOD
