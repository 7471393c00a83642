"""Removes every host object the drivers made under one prefix (Ctrl-C of scripts/run,
test teardown, recovery after a crash): containers, QEMU processes, agent processes,
overlay mounts, veth/tap/bridge links and network namespaces.

What belongs to a prefix is decided by name only (see :mod:`manager.hypervisor.base`);
:func:`owned_link` and :func:`owned_process` are the pure rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from manager import netplumb
from manager.hypervisor.base import check_prefix
from manager.hypervisor.cgroups import CgroupLimiter, detect
from manager.hypervisor.hostvm import proc_start_time
from manager.hypervisor.nspawn import find_leader

log = logging.getLogger("sysvm.hypervisor")


@dataclass
class CleanupReport:
    processes: list[int] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.processes or self.mounts or self.links or self.netns or self.cgroups)


def owned_link(prefix: str, ifname: str) -> bool:
    """VM ports (veth/tap), zone bridges and per-network guest bridges of ``prefix``."""
    return (
        re.fullmatch(
            rf"{re.escape(prefix)}(?:[vt][0-9a-f]{{6}}\d|b[0-9a-f]{{4}}[cpgs]|g[0-9a-f]{{6}}b)",
            ifname,
        )
        is not None
    )


def owned_process(prefix: str, argv: Sequence[str]) -> bool:
    """nspawn ``--machine=<prefix>-…`` or QEMU ``-name <prefix>-…``."""
    if not argv:
        return False
    exe = os.path.basename(argv[0])
    mine = re.compile(rf"{re.escape(prefix)}-[0-9a-f]{{6}}")
    if exe == "systemd-nspawn":
        return any(a.startswith("--machine=") and mine.fullmatch(a[10:]) for a in argv)
    if exe.startswith("qemu-system"):
        return any(a == "-name" and i + 1 < len(argv) and mine.fullmatch(argv[i + 1].split(",")[0])
                   for i, a in enumerate(argv))  # fmt: skip
    return False


def overlay_mounts(prefix: str) -> list[str]:
    source = f"sysvm-{prefix}"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            rparts = right.split()
            if len(rparts) >= 2 and rparts[0] == "overlay" and rparts[1] == source:
                out.append(left.split()[4].replace("\\040", " "))
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def find_processes(prefix: str) -> list[int]:
    """Pids of this prefix's nspawn/QEMU processes, container leaders, and anything living
    in one of its network namespaces."""
    pids: set[int] = set()
    for d in os.listdir("/proc"):
        if d.isdigit() and owned_process(prefix, _cmdline(int(d))):
            pid = int(d)
            pids.add(pid)
            leader = find_leader(pid)
            if leader is not None:
                pids.add(leader)
    for ns in netplumb.list_netns(f"{prefix}-"):
        pids.update(netplumb.netns_pids(ns))
    pids.discard(os.getpid())
    return sorted(pids)


async def cleanup_all(prefix: str, timeout: float = 15.0) -> CleanupReport:  # noqa: ASYNC109
    check_prefix(prefix)
    report = CleanupReport()
    pids = find_processes(prefix)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    report.processes = pids
    deadline = time.monotonic() + timeout
    while any(proc_start_time(p) is not None for p in pids) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    for mnt in overlay_mounts(prefix):
        await netplumb.run(["umount", "-l", mnt], timeout=30)
        report.mounts.append(mnt)
    for link in await netplumb.list_links():
        name = str(link.get("ifname", ""))
        if owned_link(prefix, name):
            await netplumb.delete_link(name)
            report.links.append(name)
    for ns in netplumb.list_netns(f"{prefix}-"):
        await netplumb.delete_netns(ns)
        report.netns.append(ns)
    limiter = CgroupLimiter(detect())
    for cg in limiter.owned(prefix):
        await limiter.remove_when_empty(cg.name, within=timeout)
        report.cgroups.append(str(cg))
    if not report.empty():
        log.info(
            "event=cleanup prefix=%s processes=%d mounts=%d links=%d netns=%d cgroups=%d",
            prefix, len(report.processes), len(report.mounts), len(report.links),
            len(report.netns), len(report.cgroups),
        )  # fmt: skip
    return report


async def leftovers(prefix: str) -> CleanupReport:
    """What cleanup_all would remove (for assertions: must be empty after a test)."""
    names = [str(x.get("ifname", "")) for x in await netplumb.list_links()]
    return CleanupReport(
        processes=[p for p in find_processes(prefix) if proc_start_time(p) is not None],
        mounts=overlay_mounts(prefix),
        links=[n for n in names if owned_link(prefix, n)],
        netns=netplumb.list_netns(f"{prefix}-"),
        cgroups=[str(d) for d in CgroupLimiter(detect()).owned(prefix)],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m manager.hypervisor.cleanup [PREFIX]``: removes everything of PREFIX
    (default ``$SYSVM_HOST_PREFIX`` or ``sv``) and prints what it removed."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    prefix = args[0] if args else os.environ.get("SYSVM_HOST_PREFIX", "sv")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rep = asyncio.run(cleanup_all(prefix))
    print(
        f"cleanup prefix={prefix} processes={len(rep.processes)} mounts={len(rep.mounts)} "
        f"links={len(rep.links)} netns={len(rep.netns)} cgroups={len(rep.cgroups)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
