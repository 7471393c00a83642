"""Memory and CPU limits of a VM that runs as host processes (the nspawn containers),
through the kernel's cgroups: the sizing of a system VM's service offering made real.

Each VM gets a cgroup of its own, ``sysvm-<machine>``, under the manager's own cgroup:

- cgroup v1 (this machine: controllers mounted at ``/sys/fs/cgroup/<controller>``):
  ``memory.limit_in_bytes`` in the memory hierarchy and ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us`` in the cpu hierarchy;
- cgroup v2 (``/sys/fs/cgroup/cgroup.controllers`` exists): ``memory.max`` and ``cpu.max``.
  A cgroup that holds processes cannot hand controllers to its children, so the manager
  first moves itself into a ``manager`` child of its own cgroup; under systemd the unit
  delegates the controllers (``Delegate=memory cpu``).

The VM's process joins its cgroups before it execs (``join_argv``), so nothing it forks
escapes them. Where the limits cannot be set the VM runs without them and the reason is
logged: a missing controller must not keep system VMs from running.

The decisions (which files, which values, which directories) are pure; ``CgroupLimiter``
does the writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("sysvm.hypervisor.cgroups")

CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Layout:
    """Where VM cgroups go: ``bases`` maps a v1 controller (``memory``, ``cpu``) or ``""``
    (v2) to the manager's own cgroup directory in that hierarchy."""

    version: int
    root: Path
    bases: Mapping[str, Path]


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` → controller → path; the v2 entry (``0::/path``) under ``""``.
    A v1 line naming several controllers (``cpu,cpuacct``) gives each the same path."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, controllers, path = parts
        if not controllers:
            out[""] = path
            continue
        for c in controllers.split(","):
            if c and not c.startswith("name="):
                out[c] = path
    return out


def layout_from(root: Path, own: Mapping[str, str], v2_controllers: str | None) -> Layout | None:
    """Pure: the layout for a cgroup filesystem at ``root``, this process's cgroups
    (``parse_proc_cgroup``) and, for a pure v2 host, the root's ``cgroup.controllers``
    text (None when the host is not pure v2). None: no usable memory and cpu control."""
    if v2_controllers is not None:
        if not {"memory", "cpu"} <= set(v2_controllers.split()) or "" not in own:
            return None
        return Layout(2, root, {"": root / own[""].lstrip("/")})
    if "memory" not in own or "cpu" not in own:
        return None
    return Layout(
        1,
        root,
        {
            "memory": root / "memory" / own["memory"].lstrip("/"),
            "cpu": root / "cpu" / own["cpu"].lstrip("/"),
        },
    )


def limit_files(
    version: int, memory_mb: int, cpus: int, period_us: int = CPU_PERIOD_US
) -> dict[str, dict[str, str]]:
    """Pure: hierarchy (as in ``Layout.bases``) → file → value for these limits."""
    if memory_mb < 1 or cpus < 1:
        raise ValueError(f"limits must be positive: {memory_mb} MiB, {cpus} CPUs")
    memory = str(memory_mb * 1024 * 1024)
    quota = str(cpus * period_us)
    if version == 2:
        return {"": {"memory.max": memory, "cpu.max": f"{quota} {period_us}"}}
    return {
        "memory": {"memory.limit_in_bytes": memory},
        "cpu": {"cpu.cfs_period_us": str(period_us), "cpu.cfs_quota_us": quota},
    }


def join_argv(procs_files: Sequence[Path], argv: Sequence[str]) -> list[str]:
    """Pure: ``argv`` run by a shell that first writes its own PID into each
    ``cgroup.procs`` (so ``argv`` and all it forks start inside) and refuses to run it
    (exit 125) when it cannot."""
    script = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
    return ["/bin/sh", "-c", script, "sysvm-cgroup-join", *map(str, procs_files), "--", *argv]


def detect(
    root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")
) -> Layout | None:
    try:
        own = parse_proc_cgroup(proc.read_text())
        v2 = (
            (root / "cgroup.controllers").read_text()
            if (root / "cgroup.controllers").exists()
            else None
        )
    except OSError:
        return None
    return layout_from(root, own, v2)


class CgroupLimiter:
    """Creates, fills and removes the VMs' cgroups for one layout (None: no limits)."""

    def __init__(self, layout: Layout | None) -> None:
        self.layout = layout
        self._v2_ready = False
        self.unavailable = "" if layout is not None else "no cgroup memory and cpu controllers"

    def _dirs(self, name: str) -> dict[str, Path]:
        assert self.layout is not None
        return {key: base / name for key, base in self.layout.bases.items()}

    def _prepare_v2(self) -> None:
        """Hands memory and cpu to the children of the manager's cgroup; if it holds
        processes, the manager moves itself into its ``manager`` child first."""
        assert self.layout is not None
        base = self.layout.bases[""]
        control = base / "cgroup.subtree_control"
        if {"memory", "cpu"} <= set(control.read_text().split()):
            self._v2_ready = True
            return
        if (base / "cgroup.procs").read_text().split():
            (base / "manager").mkdir(exist_ok=True)
            (base / "manager" / "cgroup.procs").write_text(f"{os.getpid()}\n")
        control.write_text("+memory +cpu\n")
        self._v2_ready = True

    def create(self, name: str, memory_mb: int, cpus: int) -> list[Path]:
        """Makes (or refills) the VM's cgroups with these limits; returns the
        ``cgroup.procs`` files its process must join ([] when limits are unavailable)."""
        if self.layout is None:
            return []
        try:
            if self.layout.version == 2 and not self._v2_ready:
                self._prepare_v2()
            files = limit_files(self.layout.version, memory_mb, cpus)
            dirs = self._dirs(name)
            for key, d in dirs.items():
                d.mkdir(exist_ok=True)
                for fname, value in files[key].items():
                    (d / fname).write_text(f"{value}\n")
        except OSError as e:
            self.unavailable = f"{type(e).__name__}: {e}"
            log.warning("event=vm_limits_unavailable vm=%s reason=%s", name, self.unavailable)
            self.remove(name)
            return []
        return [d / "cgroup.procs" for d in dirs.values()]

    def remove(self, name: str) -> bool:
        """Removes the VM's cgroups; one that still holds a task (a guest process not yet
        reaped) stays. Returns whether none is left."""
        if self.layout is None:
            return True
        left = False
        for d in self._dirs(name).values():
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left = True
        return not left

    async def remove_when_empty(self, name: str, within: float = 10.0) -> None:
        """``remove``, asked again every 0.1 s while a dead VM's last tasks are reaped;
        logged if the cgroups outlive ``within`` seconds."""
        deadline = time.monotonic() + within
        while not self.remove(name):
            if time.monotonic() >= deadline:
                log.warning("event=vm_cgroup_not_removed vm=%s", name)
                return
            await asyncio.sleep(0.1)

    def owned(self, prefix: str) -> list[Path]:
        """The cgroups of this host prefix's VMs (``sysvm-<prefix>-*``) that exist."""
        if self.layout is None:
            return []
        return sorted(
            d
            for base in self.layout.bases.values()
            for d in base.glob(f"sysvm-{prefix}-*")
            if d.is_dir()
        )

    def limits_of(self, pid: int) -> dict[str, str]:
        """The limit files' values of the cgroups ``pid`` is in (for checks and status)."""
        if self.layout is None:
            return {}
        own = parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
        out: dict[str, str] = {}
        for key, fnames in limit_files(self.layout.version, 1, 1).items():
            mount = self.layout.root if key == "" else self.layout.root / key
            for fname in fnames:
                with contextlib.suppress(OSError):
                    out[fname] = (mount / own.get(key, "/").lstrip("/") / fname).read_text().strip()
        return out
