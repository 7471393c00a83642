"""The CPVM websocket endpoint against a real QEMU guest: refusals before the upgrade, the
RFB handshake the proxy terminates, timers, caps and load reports."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from manager.guests import GuestManager, GuestVm

pytestmark = pytest.mark.integration

TIMING = float(os.environ.get("SYSVM_TEST_TIMING", "1"))
Console = Any


async def _refused(console: Console, url: str, origin: str | None = None) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(url, origin=origin or console.origin, open_timeout=10):
            pass
    resp = info.value.response
    return resp.status_code, resp.body.decode()


async def _rfb_open(ws: ClientConnection) -> tuple[int, int]:
    """Browser side of the proxy's RFB handshake; returns the framebuffer size."""
    async with asyncio.timeout(10 * TIMING):
        assert await ws.recv() == b"RFB 003.008\n"
        await ws.send(b"RFB 003.008\n")
        assert await ws.recv() == b"\x01\x01"  # one security type: None
        await ws.send(b"\x01")
        assert await ws.recv() == b"\x00\x00\x00\x00"  # SecurityResult OK
        await ws.send(b"\x01")  # ClientInit, shared -> relayed to QEMU
        server_init = await ws.recv()
    assert isinstance(server_init, bytes)
    w, h = struct.unpack("!HH", server_init[:4])
    return w, h


async def _poll(cond: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout * TIMING):
        while not cond():
            await asyncio.sleep(0.02)


async def test_token_relays_to_guest_and_is_single_use(console: Console, guest_vm: GuestVm) -> None:
    token = await console.mint(guest_vm)
    url = console.ws_url(guest_vm.id, token)
    async with websockets.connect(url, origin=console.origin) as ws:
        w, h = await _rfb_open(ws)
        assert w > 0 and h > 0
        # A FramebufferUpdateRequest through the relay gets a FramebufferUpdate back.
        await ws.send(struct.pack("!BBHHHH", 3, 0, 0, 0, w, h))
        async with asyncio.timeout(10 * TIMING):
            update = await ws.recv()
        assert isinstance(update, bytes) and update[0] == 0
        await _poll(lambda: console.role.status()["sessions"] == 1)
    status, body = await _refused(console, url)
    assert status == 403 and "already used" in body
    await _poll(lambda: console.role.status()["sessions"] == 0)

    def closes() -> list[dict[str, Any]]:
        return [d for n, d in console.events if n == "console.sessions" and d["reason"] == "close"]

    await _poll(lambda: closes() and closes()[-1]["count"] == 0)


async def test_forged_expired_other_vm_and_destroyed_tokens_refused(
    console: Console, guests: GuestManager, guest_vm: GuestVm
) -> None:
    status, body = await _refused(console, console.ws_url(guest_vm.id, "A" * 32))
    assert (status, body.strip()) == (403, "unknown console token")
    status, _ = await _refused(console, console.ws_url(guest_vm.id, "bad%20token%21"))
    assert status == 403

    expiring = await console.mint(guest_vm, ttl=5)
    console.clock.offset = 6
    status, body = await _refused(console, console.ws_url(guest_vm.id, expiring))
    assert status == 403 and "expired" in body
    console.clock.offset = 0

    other = await guests.deploy("other-vm", account_id="acct-2")
    token_for_other = await console.mint(other)
    status, body = await _refused(console, console.ws_url(guest_vm.id, token_for_other))
    assert status == 403 and "another VM" in body

    doomed = await console.mint(other)
    await guests.destroy(other.id)
    status, body = await _refused(console, console.ws_url(other.id, doomed))
    assert status == 403 and "unknown" in body  # tokens died with the VM

    stopped_token = await console.mint(guest_vm)
    await guests.stop(guest_vm.id)
    status, body = await _refused(console, console.ws_url(guest_vm.id, stopped_token))
    assert status == 404 and "not running" in body
    # No VNC connection was attempted for any refusal; the proxy still serves.
    assert "vnc_unreachable" not in console.counters()
    await guests.start(guest_vm.id)
    ok = await console.mint(guest_vm)
    async with websockets.connect(console.ws_url(guest_vm.id, ok), origin=console.origin) as ws:
        await _rfb_open(ws)


async def test_origin_and_malformed_requests_refused(console: Console, guest_vm: GuestVm) -> None:
    token = await console.mint(guest_vm)
    url = console.ws_url(guest_vm.id, token)
    status, body = await _refused(console, url, origin="https://evil.example.net")
    assert status == 403 and "Origin" in body
    # The Origin refusal happened before the token was looked at: it still works.
    async with websockets.connect(url, origin=console.origin) as ws:
        await _rfb_open(ws)
    status, body = await _refused(console, console.ws_url(guest_vm.id, ""))
    assert status == 403 and "missing" in body
    # Garbage on the socket gets a 400 and the server keeps serving.
    reader, writer = await asyncio.open_connection("127.0.0.1", console.port)
    writer.write(b"\x16\x03\x01garbage\r\n\r\n")
    async with asyncio.timeout(5 * TIMING):
        assert (await reader.read(100)).startswith(b"HTTP/1.1 400")
    writer.close()
    # The page and the noVNC library are served.
    reader, writer = await asyncio.open_connection("127.0.0.1", console.port)
    writer.write(b"GET /novnc/core/rfb.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(5 * TIMING):
        resp = await reader.read()
    assert resp.startswith(b"HTTP/1.1 200") and b"text/javascript" in resp
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", console.port)
    writer.write(
        b"GET /novnc/../../../etc/passwd.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    async with asyncio.timeout(5 * TIMING):
        resp = await reader.read()
    assert not resp.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_wrong_vnc_password_reported_to_browser(console: Console, guest_vm: GuestVm) -> None:
    console.records.password_override[guest_vm.id] = "nope1234"
    token = await console.mint(guest_vm)
    async with websockets.connect(console.ws_url(guest_vm.id, token), origin=console.origin) as ws:
        async with asyncio.timeout(10 * TIMING):
            assert await ws.recv() == b"RFB 003.008\n"
            await ws.send(b"RFB 003.008\n")
            failure = await ws.recv()
            assert isinstance(failure, bytes)
            assert failure[0] == 0  # no security types: the reason follows
            (n,) = struct.unpack("!I", failure[1:5])
            reason = failure[5 : 5 + n].decode()
            with pytest.raises(ConnectionClosed):
                await ws.recv()
    assert reason.startswith("VNC authentication to the hypervisor failed")
    assert "nope1234" not in reason
    assert console.counters()["vnc_auth_failed"] == 1


async def test_idle_handshake_and_per_ip_limits(console_short: Console, guest_vm: GuestVm) -> None:
    c = console_short
    # Idle: no traffic either way for idle_timeout -> closed with 4000.
    async with websockets.connect(
        c.ws_url(guest_vm.id, await c.mint(guest_vm)), origin=c.origin
    ) as ws:
        await _rfb_open(ws)
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(10 * TIMING):
                while True:
                    await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 4000
        assert time.monotonic() - t0 >= 0.9
    # Handshake deadline: upgrade, then never answer the RFB greeting.
    async with websockets.connect(
        c.ws_url(guest_vm.id, await c.mint(guest_vm)), origin=c.origin
    ) as ws:
        assert await ws.recv() == b"RFB 003.008\n"
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(10 * TIMING):
                await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    # Per-IP cap (2): the third concurrent session from 127.0.0.1 is refused with 429.
    a = await websockets.connect(c.ws_url(guest_vm.id, await c.mint(guest_vm)), origin=c.origin)
    b = await websockets.connect(c.ws_url(guest_vm.id, await c.mint(guest_vm)), origin=c.origin)
    try:
        status, body = await _refused(c, c.ws_url(guest_vm.id, await c.mint(guest_vm)))
        assert status == 429 and "too many" in body
    finally:
        await a.close()
        await b.close()
    await _poll(lambda: not c.role.server.per_ip)


async def test_load_reports_and_draining(console: Console, guest_vm: GuestVm) -> None:
    async with websockets.connect(
        console.ws_url(guest_vm.id, await console.mint(guest_vm)), origin=console.origin
    ) as ws:
        await _rfb_open(ws)
        n = len(console.events)
        # Periodic reports (interval 0.2 s here) carry the session detail.
        await _poll(lambda: any(d["reason"] == "scan" for _, d in console.events[n:]))
        scan = next(d for _, d in console.events[n:] if d["reason"] == "scan")
        assert scan["count"] == 1
        (s,) = scan["sessions"]
        assert s["vm_id"] == guest_vm.id and s["client"] == "127.0.0.1"
        assert s["started"] <= s["last_used"] <= time.time() + 1
        # Draining: the live session stays, new ones are refused.
        await console.role.apply(
            {
                "settings": {"consoleproxy.loadscan.interval": 0.2},
                "consoleproxy": {
                    "listen_host": "127.0.0.1",
                    "listen_port": 0,
                    "draining": True,
                },
            }
        )
        status, body = await _refused(
            console, console.ws_url(guest_vm.id, await console.mint(guest_vm))
        )
        assert status == 503 and "draining" in body
        assert console.role.status()["draining"] is True
        await ws.send(struct.pack("!BBHHHH", 3, 1, 0, 0, 8, 8))
        async with asyncio.timeout(10 * TIMING):
            assert isinstance(await ws.recv(), bytes)


async def test_silent_connection_dropped_and_upgrade_after_page_request(
    console_short: Console,
) -> None:
    c = console_short
    # A client that connects and sends nothing is dropped after the handshake deadline.
    reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
    async with asyncio.timeout(10 * TIMING):
        resp = await reader.read()
    assert resp.startswith(b"HTTP/1.1 408")
    writer.close()
    # An upgrade on a connection that already served a page gets a clear 400 (browsers
    # open a fresh connection for every websocket).
    reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5 * TIMING):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(
                b":"
            )[1]
        )
        body = await reader.readexactly(length)
    assert b'"sessions": 0' in body
    writer.write(
        b"GET /websockify?vm=a&token=b HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    async with asyncio.timeout(5 * TIMING):
        resp = await reader.readuntil(b"\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 400")
    writer.close()


async def test_stop_closes_sessions_going_away(console: Console, guest_vm: GuestVm) -> None:
    async with websockets.connect(
        console.ws_url(guest_vm.id, await console.mint(guest_vm)), origin=console.origin
    ) as ws:
        await _rfb_open(ws)
        await console.role.stop()
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(5 * TIMING):
                while True:
                    await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert console.role.status() == {"listening": None, "sessions": 0}


async def test_bad_requests_get_clear_errors_and_server_keeps_serving(
    console: Console, guest_vm: GuestVm
) -> None:
    async def exchange(raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", console.port)
        writer.write(raw)
        async with asyncio.timeout(5 * TIMING):
            data = await reader.read()
        writer.close()
        return data

    assert (await exchange(b"GET / HTTP/1.1\r\nX: " + b"a" * 9000)).startswith(b"HTTP/1.1 400")
    upgrade = (
        b"GET /websockify?vm=a&token=b HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    )
    bad_key = await exchange(upgrade + b"Sec-WebSocket-Key: short\r\n\r\n")
    assert bad_key.startswith(b"HTTP/1.1 400") and b"bad websocket upgrade" in bad_key
    early = await exchange(upgrade + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nxx")
    assert early.startswith(b"HTTP/1.1 400")
    page = await exchange(b"GET /console HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert page.startswith(b"HTTP/1.1 200") and b"no-referrer" in page
    assert b"/static/boot.js" in page
    assert (
        await exchange(b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    ).startswith(b"HTTP/1.1 404")
    # Still serving consoles.
    async with websockets.connect(
        console.ws_url(guest_vm.id, await console.mint(guest_vm)), origin=console.origin
    ) as ws:
        await _rfb_open(ws)
