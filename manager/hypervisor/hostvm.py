"""What the three host drivers share: the per-VM directory, process tracking, stop logic.

Per VM, ``<state_dir>/<vm_id>/`` holds ``spec.json``, ``bootdata.json`` (0600: it carries
the enrolment token), ``console.log``, ``run.json`` (pid and its start time, so a restarted
manager finds VMs it did not start) and ``stop-requested`` (a stop was asked for: an exit
is then "stopped", not "crashed"). Driver-specific files (overlay, disk) live beside them.

Processes are started in their own session (a Ctrl-C on the manager's terminal does not hit
them directly) as children of the manager: the driver waits on them (one tracked task per
VM) and :meth:`HostDriver.close` stops them cleanly. VMs left by a manager that died are
found through ``run.json`` by polling ``/proc`` (pid alive, not a zombie, same start time)
and can be stopped/destroyed; :func:`manager.hypervisor.cleanup.cleanup_all` removes them.

NICs: every boot (start, and the boot again after a reboot from inside the VM) gets a
*fresh* network namespace with freshly made veths, as a real VM's new kernel has a fresh
network stack: addresses beyond the boot data's, routes, iptables rules, conntrack entries
and sysctls of a previous boot are gone, and only what the VM puts back itself (the router
re-applying its last config) is there. A stopped VM holds no NIC on the host (its veths and
namespace are removed when it stops). Bridges are made when a NIC needs them; zone bridges
stay, a per-network guest bridge (``<prefix>g<net6>b``) is removed when a VM that used it is
destroyed and no VM port (``<prefix>v…``/``<prefix>t…``) is left on it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from manager import netplumb
from manager.hypervisor.base import (
    Driver,
    DriverError,
    NicSpec,
    PowerState,
    VmSpec,
    boot_data_for,
    check_prefix,
    is_guest_bridge,
    is_vm_port,
    mac_for,
    netns_name,
    short_id,
    validate_spec,
    veth_name,
)

log = logging.getLogger("sysvm.hypervisor")


# ---------------------------------------------------------------- /proc helpers


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie pid; None otherwise."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int, start: int | None) -> bool:
    st = proc_start_time(pid)
    return st is not None and (start is None or st == start)


def write_secret(path: Path, data: bytes) -> None:
    """Atomically writes a 0600 file (created 0600 before anything is written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.rename(path)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.rename(path)


def spec_to_json(spec: VmSpec) -> dict[str, Any]:
    d = asdict(spec)
    d.pop("boot_data")  # kept separately, 0600
    return d


def spec_from_json(d: Mapping[str, Any], boot_data: Mapping[str, Any]) -> VmSpec:
    return VmSpec(
        vm_id=d["vm_id"],
        name=d["name"],
        role=d["role"],
        boot_data=boot_data,
        nics=tuple(NicSpec(**n) for n in d.get("nics", ())),
        memory_mb=int(d.get("memory_mb", 512)),
        cpus=int(d.get("cpus", 1)),
        extra=d.get("extra", {}),
    )


def tail_file(path: Path, max_bytes: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


async def spawn(
    vm_id: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Starts a VM's process in its own session, output appended to ``log_path``."""
    out = log_path.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )
    except OSError as e:
        raise DriverError(f"vm {vm_id}: cannot run {argv}: {e.strerror or e}") from e
    finally:
        out.close()


async def wait_gone(pid: int, start: int | None, timeout: float) -> bool:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while alive(pid, start):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


class HostDriver(Driver):
    """Base of the nspawn, qemu and process drivers."""

    uses_netns = True

    def __init__(self, state_dir: Path, prefix: str = "sv") -> None:
        self.prefix = check_prefix(prefix)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._locks: dict[str, asyncio.Lock] = {}
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[str] = set()
        self._rebooting: set[str] = set()  # exited for a reboot from inside, booting again

    # ------------------------------------------------------------ driver hooks

    @abc.abstractmethod
    async def _prepare(self, spec: VmSpec, vmdir: Path) -> None:
        """Disk/overlay etc. before the launch (NICs are done by the base class)."""

    @abc.abstractmethod
    async def _launch(self, spec: VmSpec, vmdir: Path) -> asyncio.subprocess.Process: ...

    async def _after_launch(self, spec: VmSpec, vmdir: Path, pid: int) -> dict[str, Any]:
        """Extra fields for run.json (e.g. the container leader)."""
        return {}

    @abc.abstractmethod
    async def _request_shutdown(self, vm_id: str, run: Mapping[str, Any]) -> None:
        """Asks the VM to shut down cleanly (signal, QMP powerdown...)."""

    async def _force(self, vm_id: str, run: Mapping[str, Any]) -> None:
        for pid_key in ("leader", "pid"):
            pid = run.get(pid_key)
            if isinstance(pid, int) and alive(pid, run.get(f"{pid_key}_start")):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    async def _cleanup_stopped(self, vm_id: str, vmdir: Path) -> None:
        """Releases what a stopped VM holds besides its disk (mounts)."""

    async def _destroy_disk(self, vm_id: str, vmdir: Path) -> None:
        """Removes driver-specific persistent state (overlay upper dir, qcow2)."""

    def _exit_means_reboot(self, returncode: int) -> bool:
        return False

    # ------------------------------------------------------------ common

    def vmdir(self, vm_id: str) -> Path:
        if "/" in vm_id or vm_id in ("", ".", ".."):
            raise DriverError(f"bad vm id {vm_id!r}")
        return self.state_dir / vm_id

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def _read_run(self, vm_id: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.vmdir(vm_id) / "run.json").read_text())
            return data
        except (FileNotFoundError, ValueError):
            return {}

    def _running(self, vm_id: str) -> dict[str, Any] | None:
        run = self._read_run(vm_id)
        pid = run.get("pid")
        if isinstance(pid, int) and alive(pid, run.get("pid_start")):
            return run
        return None

    def _load_spec(self, vm_id: str) -> VmSpec:
        vmdir = self.vmdir(vm_id)
        try:
            d = json.loads((vmdir / "spec.json").read_text())
            boot = json.loads((vmdir / "bootdata.json").read_text())
        except FileNotFoundError:
            raise DriverError(f"vm {vm_id}: unknown to the {self.name} driver") from None
        return spec_from_json(d, boot)

    async def start(self, spec: VmSpec) -> None:
        validate_spec(spec)
        async with self._lock(spec.vm_id):
            if self._running(spec.vm_id):
                log.info("event=vm_start_noop driver=%s vm=%s", self.name, spec.vm_id)
                return
            vmdir = self.vmdir(spec.vm_id)
            vmdir.mkdir(mode=0o700, exist_ok=True)
            write_json(vmdir / "spec.json", spec_to_json(spec))
            write_secret(vmdir / "bootdata.json", json.dumps(boot_data_for(spec)).encode())
            (vmdir / "stop-requested").unlink(missing_ok=True)
            t0 = time.monotonic()
            try:
                await self._start_locked(spec, vmdir)
            except (netplumb.PlumbError, OSError, DriverError) as e:
                await self._undo_start(spec)
                if isinstance(e, DriverError):
                    raise
                raise DriverError(f"vm {spec.vm_id}: start failed: {e}") from e
            log.info(
                "event=vm_started driver=%s vm=%s name=%s seconds=%.2f",
                self.name, spec.vm_id, spec.name, time.monotonic() - t0,
            )  # fmt: skip

    async def _undo_start(self, spec: VmSpec) -> None:
        """A failed start leaves nothing running or plumbed (the VM's files stay)."""
        try:
            await self._stop_locked(spec.vm_id, 0, requested=False)
            await self._unplumb(spec.vm_id, len(spec.nics))
        except (netplumb.PlumbError, OSError, DriverError) as e:
            log.error(
                "event=vm_start_undo_failed driver=%s vm=%s error=%s", self.name, spec.vm_id, e
            )

    async def _kill_orphans(self, vm_id: str) -> None:
        """A VM whose hypervisor process died may leave its guest running (nspawn killed by
        SIGKILL leaves the container's PID 1 alive): killed before the VM is stopped or
        booted again, never two guests on one disk."""
        run = self._read_run(vm_id)
        for key in ("leader",):
            pid = run.get(key)
            if isinstance(pid, int) and alive(pid, run.get(f"{key}_start")):
                log.warning("event=vm_orphan_killed driver=%s vm=%s pid=%d", self.name, vm_id, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not await wait_gone(pid, run.get(f"{key}_start"), 10):
                    raise DriverError(f"vm {vm_id}: orphaned guest pid {pid} survived SIGKILL")

    async def _start_locked(self, spec: VmSpec, vmdir: Path) -> None:
        await self._kill_orphans(spec.vm_id)
        await self._plumb(spec)
        await self._prepare(spec, vmdir)
        proc = await self._launch(spec, vmdir)
        run: dict[str, Any] = {"pid": proc.pid, "pid_start": proc_start_time(proc.pid)}
        self._procs[spec.vm_id] = proc
        self._stopping.discard(spec.vm_id)
        old = self._watchers.pop(spec.vm_id, None)
        if old is not None and not old.done():
            old.cancel()
        self._watchers[spec.vm_id] = asyncio.create_task(
            self._watch(spec.vm_id, proc), name=f"{self.name}-watch-{spec.vm_id}"
        )
        write_json(vmdir / "run.json", run)
        run.update(await self._after_launch(spec, vmdir, proc.pid))
        write_json(vmdir / "run.json", run)

    async def _watch(self, vm_id: str, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        if self._procs.get(vm_id) is proc:
            del self._procs[vm_id]
        requested = vm_id in self._stopping
        log.info(
            "event=vm_exited driver=%s vm=%s rc=%s requested=%s", self.name, vm_id, rc, requested
        )
        if not requested and self._exit_means_reboot(rc):
            # the guest rebooted itself: boot it again, as a hypervisor would (state() says
            # running meanwhile: the VM is rebooting, not dead)
            self._rebooting.add(vm_id)
            try:
                async with self._lock(vm_id):
                    if (
                        self._procs.get(vm_id) is None
                        and vm_id not in self._stopping
                        and not (self.vmdir(vm_id) / "stop-requested").exists()
                    ):
                        await self._reboot_from_inside(vm_id)
            finally:
                self._rebooting.discard(vm_id)

    async def _reboot_from_inside(self, vm_id: str) -> None:
        try:
            spec = self._load_spec(vm_id)
            await self._cleanup_stopped(vm_id, self.vmdir(vm_id))
            await self._relaunch(spec)
        except (DriverError, netplumb.PlumbError, OSError) as e:
            log.error("event=vm_reboot_failed driver=%s vm=%s error=%s", self.name, vm_id, e)

    async def _relaunch(self, spec: VmSpec) -> None:
        vmdir = self.vmdir(spec.vm_id)
        # called from the watcher: a new watcher replaces this one, which then ends
        await self._plumb(spec)  # a new kernel: a fresh network stack, same NICs (MACs)
        await self._prepare(spec, vmdir)
        proc = await self._launch(spec, vmdir)
        run: dict[str, Any] = {"pid": proc.pid, "pid_start": proc_start_time(proc.pid)}
        self._procs[spec.vm_id] = proc
        self._watchers[spec.vm_id] = asyncio.create_task(
            self._watch(spec.vm_id, proc), name=f"{self.name}-watch-{spec.vm_id}"
        )
        run.update(await self._after_launch(spec, vmdir, proc.pid))
        write_json(vmdir / "run.json", run)
        log.info("event=vm_rebooted driver=%s vm=%s", self.name, spec.vm_id)

    async def _plumb(self, spec: VmSpec) -> None:
        """A fresh namespace (whatever a previous boot left in one is dropped) with one
        veth per NIC on its bridge, addresses and default route from the spec."""
        if not self.uses_netns:
            return
        ns = netns_name(self.prefix, spec.vm_id)
        await self._unplumb(spec.vm_id, len(spec.nics))
        await netplumb.create_netns(ns)
        for i, nic in enumerate(spec.nics):
            async with netplumb.bridge_lock(nic.bridge):  # not removed while we plug in
                await netplumb.ensure_bridge(nic.bridge, nic.bridge_address)
                await netplumb.add_veth_into_netns(
                    host_name=veth_name(self.prefix, spec.vm_id, i),
                    netns=ns,
                    inner_name=f"eth{i}",
                    bridge=nic.bridge,
                    mac=nic.mac or mac_for(spec.vm_id, i),
                    address=nic.address,
                )
            if nic.default_route and nic.gateway:
                await netplumb.add_default_route(ns, nic.gateway, f"eth{i}")

    async def _unplumb(self, vm_id: str, nics: int) -> None:
        """Removes the VM's veths (host side first: deleting a veth end removes the pair at
        once, while a namespace is torn down in the background) and its namespace."""
        if not self.uses_netns:
            return
        mine = f"{self.prefix}v{short_id(vm_id)}"
        for link in await netplumb.list_links(mine):
            await netplumb.delete_link(str(link["ifname"]))
        await netplumb.delete_netns(netns_name(self.prefix, vm_id))

    async def _release_bridges(self, spec: VmSpec | None) -> None:
        """After a destroy: the VM's guest bridges go when no VM port is left on them."""
        for nic in spec.nics if spec is not None else ():
            if is_guest_bridge(self.prefix, nic.bridge):
                await netplumb.delete_bridge_if_unused(
                    nic.bridge, lambda port: is_vm_port(self.prefix, port)
                )

    def _nic_count(self, vm_id: str) -> int:
        try:
            return len(self._load_spec(vm_id).nics)
        except (DriverError, ValueError, TypeError):
            return 10

    async def stop(self, vm_id: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        async with self._lock(vm_id):
            if not self.vmdir(vm_id).exists():
                raise DriverError(f"vm {vm_id}: unknown to the {self.name} driver")
            await self._stop_locked(vm_id, timeout, requested=True)

    async def _stop_locked(self, vm_id: str, timeout: float, *, requested: bool) -> None:  # noqa: ASYNC109
        vmdir = self.vmdir(vm_id)
        if requested:
            vmdir.mkdir(mode=0o700, exist_ok=True)
            (vmdir / "stop-requested").touch()
        self._stopping.add(vm_id)
        run = self._running(vm_id)
        t0 = time.monotonic()
        forced = False
        if run is None:
            await self._kill_orphans(vm_id)
        if run is not None:
            pid = int(run["pid"])
            if timeout > 0:
                try:
                    await self._request_shutdown(vm_id, run)
                except (DriverError, netplumb.PlumbError, OSError) as e:
                    log.warning(
                        "event=vm_clean_stop_failed driver=%s vm=%s error=%s", self.name, vm_id, e
                    )
            if not await self._wait_exit(vm_id, pid, run.get("pid_start"), timeout):
                forced = True
                await self._force(vm_id, run)
                if not await self._wait_exit(vm_id, pid, run.get("pid_start"), 10):
                    raise DriverError(f"vm {vm_id}: pid {pid} survived SIGKILL for 10 s")
        watcher = self._watchers.pop(vm_id, None)
        if watcher is not None:
            # the process is gone; a watcher still running may wait for our lock (reboot
            # path): cancel it, we clean up here
            if not watcher.done():
                watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self._cleanup_stopped(vm_id, vmdir)
        (vmdir / "run.json").unlink(missing_ok=True)
        await self._unplumb(vm_id, self._nic_count(vm_id))  # a stopped VM holds no NIC
        if run is not None:
            log.info(
                "event=vm_stopped driver=%s vm=%s forced=%s seconds=%.2f",
                self.name, vm_id, forced, time.monotonic() - t0,
            )  # fmt: skip

    async def _wait_exit(self, vm_id: str, pid: int, start: int | None, timeout: float) -> bool:  # noqa: ASYNC109
        proc = self._procs.get(vm_id)
        if proc is not None and proc.pid == pid:
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), timeout)
            except TimeoutError:
                return False
            return True
        return await wait_gone(pid, start, timeout)

    async def reboot(self, vm_id: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        spec = self._load_spec(vm_id)
        async with self._lock(vm_id):
            await self._stop_locked(vm_id, timeout, requested=True)
        await self.start(spec)

    async def destroy(self, vm_id: str) -> None:
        async with self._lock(vm_id):
            vmdir = self.vmdir(vm_id)
            if not vmdir.exists():
                return
            try:
                spec: VmSpec | None = self._load_spec(vm_id)
            except (DriverError, ValueError, TypeError):
                spec = None
            await self._stop_locked(vm_id, 0, requested=True)
            await self._unplumb(vm_id, len(spec.nics) if spec is not None else 10)
            await self._release_bridges(spec)
            await self._destroy_disk(vm_id, vmdir)
            shutil.rmtree(vmdir, ignore_errors=True)
            log.info("event=vm_destroyed driver=%s vm=%s", self.name, vm_id)
        self._locks.pop(vm_id, None)

    async def state(self, vm_id: str) -> PowerState:
        vmdir = self.vmdir(vm_id)
        if not (vmdir / "spec.json").exists():
            return PowerState.ABSENT
        if vm_id in self._rebooting:
            return PowerState.RUNNING  # rebooting itself: booted again by the watcher
        proc = self._procs.get(vm_id)
        if (
            proc is not None
            and vm_id not in self._stopping
            and proc.returncode is not None
            and self._exit_means_reboot(proc.returncode)
        ):
            return PowerState.RUNNING  # exited for a reboot; its watcher has not run yet
        if self._running(vm_id) is not None:
            return PowerState.RUNNING
        if (vmdir / "stop-requested").exists() or not (vmdir / "run.json").exists():
            return PowerState.STOPPED
        return PowerState.CRASHED

    async def console_log(self, vm_id: str, max_bytes: int = 64 * 1024) -> str:
        return tail_file(self.vmdir(vm_id) / "console.log", max_bytes)

    async def list_vms(self) -> list[str]:
        return sorted(p.name for p in self.state_dir.iterdir() if (p / "spec.json").exists())

    def run_info(self, vm_id: str) -> dict[str, Any]:
        """run.json of a running VM (pids), {} if it is not running."""
        return self._running(vm_id) or {}

    async def close(self, stop_timeout: float = 20.0) -> None:
        """Stops the VMs this driver started (cleanly, forced after ``stop_timeout``): they
        are children of the manager's event loop and cannot outlive it. Then the watchers."""
        running = [vm for vm, p in self._procs.items() if p.returncode is None]
        results = await asyncio.gather(
            *(self.stop(vm, stop_timeout) for vm in running), return_exceptions=True
        )
        for vm, res in zip(running, results, strict=True):
            if isinstance(res, BaseException):
                log.error(
                    "event=vm_stop_on_close_failed driver=%s vm=%s error=%s", self.name, vm, res
                )
        tasks = list(self._watchers.values())
        self._watchers.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
