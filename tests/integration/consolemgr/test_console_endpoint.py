"""createConsoleEndpoint end to end: a QEMU guest deployed with ``cs``, a console proxy agent
process authorising each websocket through the real manager over the mutual-TLS agent link,
and a websocket client speaking RFB through the proxy to the guest's password-protected VNC."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import websockets
from cs import CloudStackApiException
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from tests.integration.consolemgr.conftest import TIMING, AgentProc, Manager, wait_for

pytestmark = pytest.mark.integration


async def _rfb_open(url: str, origin: str) -> tuple[int, int, Any]:
    """Opens the console websocket and does the browser's side of the proxy's RFB
    handshake; returns (width, height, open connection)."""
    ws = await websockets.connect(url, origin=Origin(origin), open_timeout=10 * TIMING)
    async with asyncio.timeout(10 * TIMING):
        assert await ws.recv() == b"RFB 003.008\n"
        await ws.send(b"RFB 003.008\n")
        assert await ws.recv() == b"\x01\x01"  # security type None (the proxy did VNC auth)
        await ws.send(b"\x01")
        assert await ws.recv() == b"\x00\x00\x00\x00"
        await ws.send(b"\x01")  # ClientInit
        server_init = await ws.recv()
    assert isinstance(server_init, bytes)
    w, h = struct.unpack("!HH", server_init[:4])
    return w, h, ws


async def _refused(url: str, origin: str) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(url, origin=Origin(origin), open_timeout=10 * TIMING):
            pass
    resp = info.value.response
    return resp.status_code, resp.body.decode(errors="replace")


def _ws_url(endpoint: dict[str, Any], vm_id: str) -> str:
    ws = endpoint["websocket"]
    return f"ws://{ws['host']}:{ws['port']}/{ws['path']}?vm={vm_id}&token={ws['token']}"


async def _endpoint(m: Manager, vm_id: str) -> dict[str, Any]:
    r = await m.call("createConsoleEndpoint", virtualmachineid=vm_id)
    ep: dict[str, Any] = r["consoleendpoint"]
    return ep


async def _sessions_listed(m: Manager, proxy: AgentProc) -> int:
    r = await m.call("listSystemVms", id=proxy.vm_id)
    return int(r["systemvm"][0].get("activeviewersessions", -1))


async def test_console_token_works_once_through_real_proxy(manager: Manager) -> None:
    m = manager
    proxy = await m.new_proxy()
    deployed = await m.call("deployVirtualMachine", name="web-1")
    vm = deployed["virtualmachine"]
    assert vm["state"] == "Running"
    guest = m.svc.guests.get(vm["id"])
    assert guest is not None and guest.vnc_password

    ep = await _endpoint(m, vm["id"])
    origin = f"http://127.0.0.1:{proxy.port}"
    # CloudStack's shape; the URL and the websocket block point at the assigned proxy.
    assert ep["success"] is True
    ws = ep["websocket"]
    assert (ws["host"], ws["port"], ws["path"]) == ("127.0.0.1", str(proxy.port), "websockify")
    url = urlsplit(ep["url"])
    assert url.netloc == f"127.0.0.1:{proxy.port}" and url.path == "/console"
    assert parse_qs(url.query) == {"vm": [vm["id"]], "token": [ws["token"]]}
    assert len(ws["token"]) >= 22  # >= 128 bits, urlsafe base64
    # The VNC password and port never leave the manager.
    listed = json.dumps(await m.call("listVirtualMachines", id=vm["id"]))
    for secret in (guest.vnc_password, f"{guest.vnc_port}"):
        assert secret not in json.dumps(ep) and secret not in listed

    # First use: the proxy authorises through the manager and relays RFB to QEMU.
    w, h, conn = await _rfb_open(_ws_url(ep, vm["id"]), origin)
    try:
        assert w > 0 and h > 0
        await conn.send(struct.pack("!BBHHHH", 3, 0, 0, 0, w, h))  # FramebufferUpdateRequest
        async with asyncio.timeout(10 * TIMING):
            update = await conn.recv()
        assert isinstance(update, bytes) and update[0] == 0  # FramebufferUpdate
        # The load report reaches the manager: sessions with VM and client, sticky, listed.
        await wait_for(lambda: m.svc.session_count(proxy.vm_id) == 1, 10, "session report")
        report = m.svc.reports[proxy.vm_id].report
        assert [(s.vm_id, s.client) for s in report.sessions] == [(vm["id"], "127.0.0.1")]
        assert (
            await wait_for(lambda: _sessions_listed(m, proxy), 10, "activeviewersessions == 1") == 1
        )
        rows = await m.ctx.store.fetchall("SELECT * FROM console_assignments")
        assert [(r["vm_id"], r["proxy_vm_id"]) for r in rows] == [(vm["id"], proxy.vm_id)]
    finally:
        await conn.close()

    # Second use of the same token: refused by the manager, relayed as 403.
    status, body = await _refused(_ws_url(ep, vm["id"]), origin)
    assert status == 403 and "already used" in body
    await wait_for(lambda: m.svc.session_count(proxy.vm_id) == 0, 10, "session closed report")

    # Forged token.
    forged = dict(ep, websocket=dict(ep["websocket"], token="A" * 32))
    status, body = await _refused(_ws_url(forged, vm["id"]), origin)
    assert (status, body.strip()) == (403, "unknown console token")

    # A token presented for another VM id.
    other = await _endpoint(m, vm["id"])
    status, body = await _refused(_ws_url(other, "0" * 8 + "-0000-4000-8000-" + "0" * 12), origin)
    assert status == 403 and "another VM" in body

    # Expired: the manager's clock moves past the TTL.
    late = await _endpoint(m, vm["id"])
    m.clock.offset += 3600
    status, body = await _refused(_ws_url(late, vm["id"]), origin)
    assert status == 403 and "expired" in body
    m.clock.offset = 0

    # Tokens die with their VM; a destroyed VM gets no new endpoint.
    doomed = await _endpoint(m, vm["id"])
    await m.call("destroyVirtualMachine", id=vm["id"])
    status, body = await _refused(_ws_url(doomed, vm["id"]), origin)
    assert (status, body.strip()) == (403, "unknown console token")
    with pytest.raises(CloudStackApiException) as err:
        await _endpoint(m, vm["id"])
    assert err.value.error["errorcode"] == 431
    # The manager kept serving through all of it.
    assert m.ctx.links.is_connected(proxy.vm_id)


async def test_stopped_vm_and_bad_input_get_clear_errors(manager: Manager) -> None:
    m = manager
    await m.new_proxy()
    vm = (await m.call("deployVirtualMachine", name="web-2"))["virtualmachine"]
    await m.call("stopVirtualMachine", id=vm["id"])
    listed = await m.call("listVirtualMachines", id=vm["id"])
    assert listed["virtualmachine"][0]["state"] == "Stopped"
    with pytest.raises(CloudStackApiException) as err:
        await _endpoint(m, vm["id"])
    assert err.value.error["errorcode"] == 431 and "not running" in err.value.error["errortext"]
    with pytest.raises(CloudStackApiException) as err:
        await m.call("createConsoleEndpoint", virtualmachineid="not-a-uuid")
    assert err.value.error["errorcode"] == 431
    # Started again: a fresh VNC password, and a console works.
    await m.call("startVirtualMachine", id=vm["id"])
    ep = await _endpoint(m, vm["id"])
    assert ep["success"] is True
