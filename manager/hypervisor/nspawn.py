"""The embedded default hypervisor: the system VM image booted in ``systemd-nspawn``.

Each VM boots the image's own systemd (``--boot``) on a copy-on-write overlay of the shared
rootfs (upper dir per VM: the image is never written), in its own network namespace whose
NICs are veth pairs on the zone's host bridges. Boot data is bind-mounted read-only at
``/etc/sysvm/bootdata.json``. This host's PID 1 is not systemd, hence ``--keep-unit
--register=no`` (no machined, no scope). The container console (systemd's status lines) goes
to ``console.log``. In its own network namespace the VM's ``/proc/sys/net`` is writable
(``SYSTEMD_NSPAWN_API_VFS_WRITABLE=network``): a router sets ``ip_forward`` there.

The VM's service offering sizes it for real: nspawn and the container run inside cgroups
of their own with its memory and CPU limits (``manager.hypervisor.cgroups``).

Clean stop: SIGTERM to nspawn, which asks the container's systemd to halt. Forced: SIGKILL
to the container's PID 1 (everything in its PID namespace dies), then to nspawn. A reboot
issued inside the VM makes nspawn exit 133; the driver boots it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from manager import netplumb
from manager.hypervisor.base import DriverError, VmSpec, machine_name, netns_name
from manager.hypervisor.cgroups import CgroupLimiter, detect, join_argv
from manager.hypervisor.hostvm import HostDriver, alive, proc_start_time, spawn

NSPAWN_REBOOT_EXIT = 133
_SAFE_PATH = re.compile(r"^[A-Za-z0-9/_.+-]+$")


def default_image_dir() -> Path:
    """``$SYSVM_IMAGE`` or the repository's ``build/image/current``."""
    env = os.environ.get("SYSVM_IMAGE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "build" / "image" / "current"


def overlay_options(lower: Path, upper: Path, work: Path) -> str:
    for p in (lower, upper, work):
        if not _SAFE_PATH.match(str(p)):
            raise DriverError(f"path {str(p)!r} cannot be used in overlay options")
    return f"lowerdir={lower},upperdir={upper},workdir={work}"


def nspawn_argv(
    *, prefix: str, spec: VmSpec, root: Path, bootdata: Path, netns: str | None
) -> list[str]:
    argv = [
        "systemd-nspawn",
        "--quiet",
        "--keep-unit",
        "--register=no",
        "--boot",
        f"--directory={root}",
        f"--machine={machine_name(prefix, spec.vm_id)}",
        f"--hostname={spec.name}",
        "--console=pipe",
        "--link-journal=no",
        "--resolv-conf=off",
        "--timezone=off",
        f"--bind-ro={bootdata}:/etc/sysvm/bootdata.json",
    ]
    if netns is not None:
        # its own namespace: network admin inside it (addresses, iptables of the roles)
        # cannot touch the host's
        argv += [f"--network-namespace-path=/run/netns/{netns}", "--capability=CAP_NET_ADMIN"]
    argv += ["--", "--show-status=yes"]
    return argv


def nspawn_env(netns: str | None, base: Mapping[str, str]) -> dict[str, str]:
    """nspawn's environment. In its own network namespace the VM may change its network
    sysctls (``/proc/sys/net`` writable: the router turns on ``ip_forward``); nspawn mounts
    it read-only for ``--network-namespace-path`` otherwise. Never on the host's network."""
    env = {k: v for k, v in base.items() if k != "SYSTEMD_NSPAWN_API_VFS_WRITABLE"}
    if netns is not None:
        env["SYSTEMD_NSPAWN_API_VFS_WRITABLE"] = "network"
    return env


def find_leader(nspawn_pid: int) -> int | None:
    """The container's PID 1: a descendant of nspawn that is pid 1 in its own namespace."""
    todo = [nspawn_pid]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:") and pid != nspawn_pid:
                ids = line.split()[1:]
                if len(ids) > 1 and ids[-1] == "1":
                    return pid
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                kids = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return None


class NspawnDriver(HostDriver):
    name = "nspawn"

    def __init__(
        self,
        state_dir: Path,
        prefix: str = "sv",
        image_dir: Path | None = None,
        limiter: CgroupLimiter | None = None,
    ) -> None:
        super().__init__(state_dir, prefix)
        self.image_dir = image_dir or default_image_dir()
        self.limiter = limiter if limiter is not None else CgroupLimiter(detect())

    def _cgroup_name(self, vm_id: str) -> str:
        return f"sysvm-{machine_name(self.prefix, vm_id)}"

    def _rootfs(self) -> Path:
        rootfs = (self.image_dir / "rootfs").resolve()
        if not (rootfs / "etc" / "sysvm-release").exists():
            raise DriverError(f"no system VM image at {self.image_dir} (run scripts/build-image)")
        return rootfs

    async def _prepare(self, spec: VmSpec, vmdir: Path) -> None:
        root = vmdir / "root"
        if os.path.ismount(root):  # noqa: ASYNC240
            return
        lower_file = vmdir / "image"
        lower = Path(lower_file.read_text().strip()) if lower_file.exists() else None
        if lower is None or not (lower / "etc" / "sysvm-release").exists():
            lower = self._rootfs()  # first start (or its image was removed): current image
            lower_file.write_text(f"{lower}\n")
        for d in ("upper", "work", "root"):
            (vmdir / d).mkdir(mode=0o755, exist_ok=True)
        await netplumb.run(
            [
                "mount", "-t", "overlay", f"sysvm-{self.prefix}",
                "-o", overlay_options(lower, vmdir / "upper", vmdir / "work"), str(root),
            ]
        )  # fmt: skip

    async def _launch(self, spec: VmSpec, vmdir: Path) -> asyncio.subprocess.Process:
        netns = netns_name(self.prefix, spec.vm_id) if self.uses_netns else None
        argv = nspawn_argv(
            prefix=self.prefix,
            spec=spec,
            root=vmdir / "root",
            bootdata=vmdir / "bootdata.json",
            netns=netns,
        )
        # The offering's sizing: the container and all it forks run inside its cgroups.
        procs = self.limiter.create(self._cgroup_name(spec.vm_id), spec.memory_mb, spec.cpus)
        if procs:
            argv = join_argv(procs, argv)
        return await spawn(spec.vm_id, argv, vmdir / "console.log", nspawn_env(netns, os.environ))

    async def _after_launch(self, spec: VmSpec, vmdir: Path, pid: int) -> dict[str, Any]:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            leader = find_leader(pid)
            if leader is not None:
                return {
                    "leader": leader,
                    "leader_start": proc_start_time(leader),
                    "limits": self.limiter.limits_of(leader),
                }
            if proc_start_time(pid) is None:
                break
            await asyncio.sleep(0.02)
        tail = (vmdir / "console.log").read_bytes()[-600:].decode(errors="replace")
        raise DriverError(f"vm {spec.vm_id}: nspawn (pid {pid}) started no container: {tail}")

    def _exit_means_reboot(self, returncode: int) -> bool:
        return returncode == NSPAWN_REBOOT_EXIT

    async def _request_shutdown(self, vm_id: str, run: Mapping[str, Any]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(run["pid"]), signal.SIGTERM)

    async def _cleanup_stopped(self, vm_id: str, vmdir: Path) -> None:
        root = vmdir / "root"
        if os.path.ismount(root):  # noqa: ASYNC240
            await netplumb.run(["umount", str(root)], timeout=30)
        await self.limiter.remove_when_empty(self._cgroup_name(vm_id))

    async def _destroy_disk(self, vm_id: str, vmdir: Path) -> None:
        for d in ("upper", "work", "root"):
            shutil.rmtree(vmdir / d, ignore_errors=True)
        await self.limiter.remove_when_empty(self._cgroup_name(vm_id))

    # ------------------------------------------------------------ inspection helpers

    def leader(self, vm_id: str) -> int:
        run = self._running(vm_id)
        leader = run.get("leader") if run else None
        if not isinstance(leader, int) or not alive(
            leader, run.get("leader_start") if run else None
        ):
            raise DriverError(f"vm {vm_id}: not running")
        return leader

    async def exec_in(
        self,
        vm_id: str,
        argv: Sequence[str],
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> tuple[int, str, str]:
        """Runs argv inside the VM (all its namespaces); returns (rc, stdout, stderr)."""
        leader = self.leader(vm_id)
        proc = await asyncio.create_subprocess_exec(
            "nsenter", "-t", str(leader), "-a", *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise DriverError(f"vm {vm_id}: {list(argv)} timed out after {timeout} s") from None
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    async def wait_booted(self, vm_id: str, timeout: float = 60.0) -> str:  # noqa: ASYNC109
        """Waits until the VM's systemd finished booting; returns its state
        (``running``, or ``degraded`` if a unit failed)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                _, out, _ = await self.exec_in(
                    vm_id, ["systemctl", "is-system-running", "--wait"],
                    timeout=max(1.0, deadline - time.monotonic()),
                )  # fmt: skip
            except DriverError:
                out = "not-running"
            last = out.strip()
            if last in ("running", "degraded"):
                return last
            await asyncio.sleep(0.1)
        raise DriverError(f"vm {vm_id}: not booted after {timeout} s (last state {last!r})")
