"""Host network plumbing for the embedded hypervisors: bridges, namespaces, veth and taps.

Thin async wrappers over ``ip`` (argv lists, every call under a timeout, failures raise
:class:`PlumbError` with argv, exit code and stderr tail). Idempotent where a retry is
likely: ``ensure_bridge`` on an existing bridge, ``delete_link`` of a missing link.

Bridges that come and go with their users (per-network guest bridges) are guarded by
:func:`bridge_lock`: whoever plugs a port into one holds it from ``ensure_bridge`` until the
port is enslaved, and :func:`delete_bridge_if_unused` holds it while it looks and deletes,
so a bridge is never removed under a VM that is being plugged into it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("sysvm.netplumb")
NETNS_DIR = Path("/run/netns")


class PlumbError(RuntimeError):
    def __init__(self, argv: Sequence[str], code: int | None, stderr: str) -> None:
        tail = stderr.strip().splitlines()[-3:]
        what = "timed out" if code is None else f"exit {code}"
        super().__init__(f"{' '.join(argv)}: {what}: {' | '.join(tail)}")
        self.argv = list(argv)
        self.code = code
        self.stderr = stderr


async def run(argv: Sequence[str], *, timeout: float = 10.0, check: bool = True) -> str:  # noqa: ASYNC109
    """Runs argv (no shell); returns stdout. Raises PlumbError on failure or timeout."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise PlumbError(argv, None, "") from None
    if check and proc.returncode != 0:
        raise PlumbError(argv, proc.returncode, err.decode(errors="replace"))
    return out.decode(errors="replace")


async def link_exists(name: str, netns: str | None = None) -> bool:
    argv = ["ip", *(["-n", netns] if netns else []), "link", "show", "dev", name]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 10) == 0


async def list_links(prefix: str = "") -> list[dict[str, Any]]:
    out = await run(["ip", "-j", "link", "show"])
    links: list[dict[str, Any]] = json.loads(out or "[]")
    return [x for x in links if str(x.get("ifname", "")).startswith(prefix)]


def list_netns(prefix: str = "") -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


async def ensure_bridge(name: str, address: str | None = None) -> None:
    """Creates bridge ``name`` (up, no STP, forwarding delay 0) with ``address`` if given."""
    if not await link_exists(name):
        try:
            await run(["ip", "link", "add", "name", name, "type", "bridge", "forward_delay", "0"])
        except PlumbError:
            if not await link_exists(name):  # lost a race with another start: fine
                raise
    if address:
        await run(["ip", "addr", "replace", address, "dev", name])
    await run(["ip", "link", "set", "dev", name, "up"])


_BRIDGE_LOCKS: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Lock]] = {}


def bridge_lock(name: str) -> asyncio.Lock:
    """The lock of bridge ``name`` in this process (one per event loop)."""
    loop = asyncio.get_running_loop()
    entry = _BRIDGE_LOCKS.get(name)
    if entry is None or entry[0] is not loop:
        entry = (loop, asyncio.Lock())
        _BRIDGE_LOCKS[name] = entry
    return entry[1]


async def bridge_ports(name: str) -> list[str]:
    """Names of the links enslaved to bridge ``name`` ([] if there is no such bridge)."""
    if not await link_exists(name):
        return []
    out = await run(["ip", "-j", "link", "show", "master", name])
    return [str(x.get("ifname", "")) for x in json.loads(out or "[]")]


async def delete_bridge_if_unused(name: str, is_user: Callable[[str], bool]) -> bool:
    """Deletes bridge ``name`` when none of its ports satisfies ``is_user`` (other ports are
    released from it). Returns whether it was deleted. Holds :func:`bridge_lock`."""
    async with bridge_lock(name):
        if not await link_exists(name):
            return False
        users = [p for p in await bridge_ports(name) if is_user(p)]
        if users:
            log.info("event=bridge_kept bridge=%s ports=%s", name, ",".join(users))
            return False
        await delete_link(name)
        log.info("event=bridge_removed bridge=%s", name)
        return True


async def delete_link(name: str, netns: str | None = None) -> None:
    if await link_exists(name, netns):
        await run(["ip", *(["-n", netns] if netns else []), "link", "del", "dev", name])


async def create_netns(name: str) -> None:
    if not (NETNS_DIR / name).exists():
        await run(["ip", "netns", "add", name])
    await run(["ip", "-n", name, "link", "set", "dev", "lo", "up"])


async def delete_netns(name: str) -> None:
    if (NETNS_DIR / name).exists():
        await run(["ip", "netns", "del", name])


def netns_pids(name: str) -> list[int]:
    """Pids whose network namespace is ``name`` (like ``ip netns pids``, without a fork)."""
    try:
        target = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return []
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{d}/ns/net")
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(d))
    return pids


async def add_veth_into_netns(
    *,
    host_name: str,
    netns: str,
    inner_name: str,
    bridge: str,
    mac: str,
    address: str | None,
) -> None:
    """veth pair: ``host_name`` on ``bridge`` (host side), peer moved into ``netns`` and
    renamed ``inner_name`` with ``mac`` and ``address``, both ends up."""
    await delete_link(host_name)
    await delete_link(inner_name, netns)
    # the peer is created directly inside the namespace: no name clash in the host's
    await run(
        [
            "ip", "link", "add", "name", host_name, "type", "veth",
            "peer", "name", inner_name, "address", mac, "netns", netns,
        ]
    )  # fmt: skip
    await run(["ip", "link", "set", "dev", host_name, "master", bridge, "up"])
    if address:
        await run(["ip", "-n", netns, "addr", "replace", address, "dev", inner_name])
    await run(["ip", "-n", netns, "link", "set", "dev", inner_name, "up"])


async def add_default_route(netns: str, gateway: str, dev: str) -> None:
    await run(["ip", "-n", netns, "route", "replace", "default", "via", gateway, "dev", dev])


async def add_tap(name: str, bridge: str) -> None:
    await delete_link(name)
    await run(["ip", "tuntap", "add", "dev", name, "mode", "tap"])
    await run(["ip", "link", "set", "dev", name, "master", bridge, "up"])
