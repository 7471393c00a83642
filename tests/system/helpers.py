"""Helpers shared by the system tests (polling with a timeout, boot data, a real manager
process and the boot data it issues)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

TIMING_FACTOR = float(os.environ.get("SYSVM_TEST_TIMING", "1"))
BIN = Path(sys.executable).parent


def free_port_any() -> int:
    """A free TCP port on all addresses (the agent endpoint listens on 0.0.0.0)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def manager_argv(home: Path, api_port: int, agent_port: int) -> list[str]:
    return [str(BIN / "sysvm-manager"), "--home", str(home), "--api-listen",
            f"127.0.0.1:{api_port}", "--agent-listen", f"0.0.0.0:{agent_port}"]  # fmt: skip


async def start_manager(
    argv: list[str], log: Path, env: dict[str, str]
) -> asyncio.subprocess.Process:
    """A real ``sysvm-manager`` with its output appended to ``log``."""
    with log.open("ab") as f:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=f, stderr=f, env=env
        )


async def external_bootdata(
    argv: list[str], role: str, out: Path, env: dict[str, str]
) -> dict[str, Any]:
    """One VM record on the External hypervisor and its boot data, from the manager's own
    ``create-external-vms`` (same home and agent listener as ``argv``)."""
    gen = await asyncio.create_subprocess_exec(
        *argv[:3], *argv[-2:],
        "create-external-vms", "--role", role, "--count", "1", "--out", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    _, err = await asyncio.wait_for(gen.communicate(), 60)
    assert gen.returncode == 0, err.decode()[-2000:]
    boot: dict[str, Any] = json.loads(out.read_text().splitlines()[0])
    return boot


async def wait_for(
    cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Polls ``cond`` (sync or async) until truthy; fails naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout * TIMING_FACTOR
    last: Any = None
    while True:
        value = cond()
        if isinstance(value, Awaitable):
            value = await value
        last = value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last={last!r})")
        await asyncio.sleep(interval)


def boot_data(vm_id: str, urls: list[str], role: str = "secondarystorage") -> dict[str, Any]:
    """Well-formed boot data (the fingerprint and token are not a real manager's)."""
    return {
        "vm_id": vm_id,
        "name": "s-1-VM",
        "role": role,
        "zone_id": str(uuid.uuid4()),
        "manager_urls": urls,
        "ca_fingerprint": "sha256:" + "ab" * 32,
        "token": "t" * 32,
        "extra": {},
    }


# ---------------------------------------------------------------- namespaces and processes
# (added for tests/system/test_router_nspawn.py)


async def sh(*argv: str, timeout: float = 30.0, check: bool = True) -> str:
    """Runs argv (no shell) under a timeout; returns stdout, fails with its stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout * TIMING_FACTOR)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{list(argv)} timed out after {timeout} s") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{list(argv)} exited {proc.returncode}: {err.decode()[-800:]}")
    return out.decode(errors="replace")


async def netns_on_bridge(
    ns: str, host_if: str, bridge: str, *, mac: str | None = None, address: str | None = None
) -> None:
    """A network namespace ``ns`` whose ``eth0`` (``mac``, ``address``) is a veth whose host
    end ``host_if`` is a port of ``bridge``. Deleting the namespace deletes both ends."""
    await sh("ip", "netns", "add", ns)
    mac_arg = ["address", mac] if mac else []
    await sh("ip", "link", "add", host_if, "type", "veth",
             "peer", "name", "eth0", *mac_arg, "netns", ns)  # fmt: skip
    await sh("ip", "link", "set", host_if, "master", bridge, "up")
    for dev in ("lo", "eth0"):
        await sh("ip", "-n", ns, "link", "set", dev, "up")
    if address:
        await sh("ip", "-n", ns, "addr", "add", address, "dev", "eth0")


async def delete_netns(ns: str) -> None:
    """Kills whatever still runs in ``ns``, then deletes it (no error if it is gone)."""
    from contextlib import suppress

    pids = await sh("ip", "netns", "pids", ns, check=False)
    for pid in pids.split():
        with suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    await sh("ip", "netns", "del", ns, check=False)


async def spawn_in_netns(ns: str, *argv: str) -> asyncio.subprocess.Process:
    """A background process in ``ns`` (own session: kill it with os.killpg)."""
    return await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, *argv,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
