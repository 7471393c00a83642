"""The real `sysvm-manager` process on free loopback ports, driven by the `cs` client and
libcloud's CloudStack driver unchanged; restarted to check keys and settings persist."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from manager.api import signing

TIMING = float(os.environ.get("SYSVM_TEST_TIMING", "1"))
START_TIMEOUT = 30 * TIMING
STOP_TIMEOUT = 15 * TIMING
MANAGER = Path(sys.executable).with_name("sysvm-manager")


@dataclass
class Proc:
    home: Path
    proc: asyncio.subprocess.Process
    url: str
    creds: dict[str, str]
    stderr: bytearray


async def _drain(stream: asyncio.StreamReader, into: bytearray) -> None:
    while chunk := await stream.read(65536):
        into.extend(chunk)
        del into[:-65536]  # keep the tail only


async def start_manager(
    home: Path, api_port: int, agent_port: int
) -> tuple[Proc, asyncio.Task[None]]:
    argv = [
        str(MANAGER),
        "--home",
        str(home),
        "--api-listen",
        f"127.0.0.1:{api_port}",
        "--agent-listen",
        f"127.0.0.1:{agent_port}",
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    err = bytearray()
    drain = asyncio.create_task(_drain(proc.stderr, err))
    url = f"http://127.0.0.1:{api_port}/client/api"
    creds_file = home / "credentials.json"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    last = "no attempt"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        while True:
            if proc.returncode is not None:
                await asyncio.wait_for(drain, STOP_TIMEOUT)
                raise AssertionError(f"{argv} exited {proc.returncode}: {err[-3000:].decode()}")
            if creds_file.exists():
                try:
                    async with s.get(url, params={"command": "listZones"}) as r:
                        last = f"HTTP {r.status}"
                        if r.status == 401:  # up and refusing unsigned requests
                            break
                except aiohttp.ClientError as e:
                    last = repr(e)
            else:
                last = "no credentials.json yet"
            if loop.time() > deadline:
                proc.kill()
                await proc.wait()
                await asyncio.wait_for(drain, STOP_TIMEOUT)
                raise AssertionError(
                    f"{argv} not serving in {START_TIMEOUT}s (last: {last}): "
                    f"{err[-3000:].decode(errors='replace')}"
                )
            await asyncio.sleep(0.05)  # polling a condition, bounded by the deadline above
    creds = json.loads(creds_file.read_text())
    return Proc(home, proc, url, creds, err), drain


async def stop_manager(p: Proc, drain: asyncio.Task[None]) -> int:
    if p.proc.returncode is None:
        p.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(p.proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            p.proc.kill()
            await p.proc.wait()
            await asyncio.wait_for(drain, STOP_TIMEOUT)
            raise AssertionError(
                f"manager did not stop within {STOP_TIMEOUT}s of SIGTERM: "
                f"{p.stderr[-3000:].decode(errors='replace')}"
            ) from None
    await asyncio.wait_for(drain, STOP_TIMEOUT)
    return p.proc.returncode if p.proc.returncode is not None else -1


@pytest.fixture
async def manager(tmp_path: Path, free_port: Callable[[], int]) -> AsyncIterator[Callable[[], Any]]:
    home = tmp_path / "home"
    ports = (free_port(), free_port())
    while ports[1] == ports[0]:
        ports = (ports[0], free_port())
    running: list[tuple[Proc, asyncio.Task[None]]] = []

    async def start() -> Proc:
        p, d = await start_manager(home, *ports)
        running.append((p, d))
        return p

    try:
        yield start
    finally:
        problems: list[str] = []
        for p, d in running:  # stop every one, even if an earlier stop failed
            try:
                await stop_manager(p, d)
            except AssertionError as e:
                problems.append(str(e))
        assert not problems, problems


def cs_for(p: Proc) -> Any:
    from cs import CloudStack

    return CloudStack(
        endpoint=p.creds["endpoint"], key=p.creds["apikey"], secret=p.creds["secretkey"]
    )


async def test_real_manager_with_cs_and_libcloud(manager: Callable[[], Any]) -> None:
    p: Proc = await manager()
    assert p.creds["endpoint"] == p.url
    assert stat.S_IMODE((p.home / "credentials.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((p.home / "sysvm.db").stat().st_mode) == 0o600
    assert p.creds["secretkey"].encode() not in p.stderr  # never logged
    cs = cs_for(p)
    zones = await asyncio.to_thread(cs.listZones)
    assert zones["count"] == 1
    assert (await asyncio.to_thread(cs.listSystemVms)) == {}
    up = await asyncio.to_thread(
        cs.updateConfiguration, name="consoleproxy.session.max", value="77"
    )
    assert up["configuration"]["value"] == "77"
    caps = await asyncio.to_thread(cs.listCapabilities)
    assert caps["capability"]["cloudstackversion"]

    from libcloud.compute.drivers.cloudstack import CloudStackNodeDriver

    drv = CloudStackNodeDriver(
        key=p.creds["apikey"], secret=p.creds["secretkey"], url=p.url, secure=False
    )
    assert [loc.name for loc in await asyncio.to_thread(drv.list_locations)] == ["zone1"]
    hosts = await asyncio.to_thread(drv._sync_request, "listHosts")
    assert hosts["count"] == 1

    # A signature for one request does not authorise another.
    params = {"command": "listZones", "response": "json", "apiKey": p.creds["apikey"]}
    params["signature"] = signing.sign(params, p.creds["secretkey"])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(p.url, params={**params, "command": "listHosts"}) as r:
            assert r.status == 401
        async with s.get(p.url, params=params) as r:
            assert r.status == 200


async def test_restart_keeps_keys_and_settings(manager: Callable[[], Any]) -> None:
    first: Proc = await manager()
    home_creds = first.creds
    cs = cs_for(first)
    await asyncio.to_thread(cs.updateConfiguration, name="ping.interval", value="45")
    first.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(first.proc.wait(), STOP_TIMEOUT) == 0, first.stderr[-2000:]
    second: Proc = await manager()
    assert second.creds == home_creds
    got = await asyncio.to_thread(cs_for(second).listConfigurations, name="ping.interval")
    assert got["configuration"][0]["value"] == "45"
