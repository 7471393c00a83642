"""Guest VM lifecycle: QEMU processes with password-protected VNC consoles."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import errno
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import string
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from manager.consoleproxy.tokens import ConsoleTarget
from manager.guests import payload
from manager.guests.qmp import Qmp, QmpError

log = logging.getLogger("sysvm.guests")

# VNC passwords are at most 8 characters (the DES key of RFB's VNC authentication).
_PW_ALPHABET = string.ascii_letters + string.digits
VNC_PASSWORD_LEN = 8
ENV_VNC_HOST = "SYSVM_GUEST_VNC_HOST"
ENV_AGENT_URLS = "SYSVM_AGENT_URLS"
LOOPBACK = "127.0.0.1"


class GuestError(Exception):
    pass


class GuestState(enum.StrEnum):
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    DESTROYED = "Destroyed"
    ERROR = "Error"


@dataclass
class GuestVm:
    id: str
    name: str
    account_id: str
    state: GuestState
    created: float
    vnc_host: str = ""
    vnc_port: int = 0
    vnc_password: str = field(default="", repr=False)
    pid: int | None = None
    memory_mb: int = 64


def default_vnc_host(env: Mapping[str, str]) -> str:
    """Pure: the one address guests' VNC servers listen on.

    Console proxy VMs run in their own network namespaces and reach this host at the
    address system VMs are told to reach the manager on (the zone's control bridge address,
    ``SYSVM_AGENT_URLS``): guests listen there, so a CPVM can relay their consoles.
    ``SYSVM_GUEST_VNC_HOST`` overrides it; without either (or when the agent URL names a
    host by DNS name) it is loopback, which only a proxy on this host's own network
    reaches. Never a wildcard: VNC listens on one address, always behind a password."""
    explicit = env.get(ENV_VNC_HOST, "").strip()
    if explicit:
        return check_vnc_host(explicit)
    for url in env.get(ENV_AGENT_URLS, "").split(","):
        host = urlsplit(url.strip()).hostname if url.strip() else None
        if host is None:
            continue
        try:
            return check_vnc_host(host)
        except GuestError:
            return LOOPBACK
    return LOOPBACK


def check_vnc_host(host: str) -> str:
    """Pure: ``host`` if it is one concrete IP address (not a name, not a wildcard)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise GuestError(f"guest VNC host {host!r} is not an IP address") from None
    if ip.is_unspecified or ip.is_multicast:
        raise GuestError(f"guest VNC host {host!r} must be one address of this host")
    return str(ip)


def vnc_listen(host: str) -> str:
    """Pure: ``host`` as QEMU's ``-vnc`` wants it (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host


def address_is_local(host: str) -> bool:
    """True if this host can listen on ``host`` now (e.g. the control bridge exists)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


def new_vnc_password() -> str:
    return "".join(secrets.choice(_PW_ALPHABET) for _ in range(VNC_PASSWORD_LEN))


def qemu_argv(
    qemu: str, *, image: Path, qmp_path: Path, vnc_host: str, memory_mb: int, name: str
) -> list[str]:
    """Pure: the QEMU command line of a guest."""
    return [
        qemu,
        "-machine",
        "pc,accel=tcg",
        "-m",
        str(memory_mb),
        "-nodefaults",
        "-no-user-config",
        "-vga",
        "std",
        "-display",
        "none",
        "-name",
        name,
        "-vnc",
        f"{vnc_listen(vnc_host)}:0,to=2000,password=on",
        "-qmp",
        f"unix:{qmp_path},server=on,wait=off",
        "-drive",
        f"file={image},format=raw,if=ide,snapshot=on",
        "-boot",
        "c",
    ]


class _Proc:
    def __init__(self, proc: asyncio.subprocess.Process, qmp: Qmp, log_path: Path) -> None:
        self.proc = proc
        self.qmp = qmp
        self.log_path = log_path


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """A guest must not outlive the manager that owns it (SIGKILL when the parent dies)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


def _tail(path: Path, n: int = 800) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace").strip()


class GuestManager:
    def __init__(
        self,
        run_dir: Path,
        *,
        qemu: str = "qemu-system-x86_64",
        vnc_host: str | None = None,
        start_timeout: float = 15.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.run_dir = run_dir
        self.qemu = qemu
        # None: default_vnc_host(os.environ) (SYSVM_GUEST_VNC_HOST / SYSVM_AGENT_URLS)
        self.vnc_host = check_vnc_host(vnc_host) if vnc_host else default_vnc_host(os.environ)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._vms: dict[str, GuestVm] = {}
        self._procs: dict[str, _Proc] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._destroy_hooks: list[Callable[[str], Awaitable[None]]] = []
        self._socks: Path | None = None

    # -- queries
    def get(self, vm_id: str) -> GuestVm | None:
        return self._vms.get(vm_id)

    def list(self, account_id: str | None = None) -> list[GuestVm]:
        return [v for v in self._vms.values() if account_id in (None, v.account_id)]

    async def console_target(self, vm_id: str) -> ConsoleTarget | None:
        """:class:`manager.consoleproxy.tokens.ConsoleRecords`: the current VNC target of
        a Running guest, else ``None``."""
        vm = self._vms.get(vm_id)
        if vm is None or vm.state is not GuestState.RUNNING:
            return None
        return ConsoleTarget(vm.id, vm.account_id, vm.vnc_host, vm.vnc_port, vm.vnc_password)

    def on_destroy(self, hook: Callable[[str], Awaitable[None]]) -> None:
        self._destroy_hooks.append(hook)

    def vnc_host_ready(self) -> bool:
        """True once this host has the VNC address (a control bridge appears when the
        zone's first system VM starts)."""
        return address_is_local(self.vnc_host)

    # -- lifecycle
    async def deploy(
        self, name: str, *, account_id: str, memory_mb: int = 64, vm_id: str | None = None
    ) -> GuestVm:
        if not name or len(name) > 63 or not all(c.isalnum() or c in "-_." for c in name):
            raise GuestError("guest name must be 1-63 characters of [A-Za-z0-9._-]")
        if not 16 <= memory_mb <= 4096:
            raise GuestError("memory_mb must be in [16, 4096]")
        vm = GuestVm(
            id=vm_id or str(uuid.uuid4()),
            name=name,
            account_id=account_id,
            state=GuestState.STOPPED,
            created=time.time(),
            memory_mb=memory_mb,
        )
        if vm.id in self._vms:
            raise GuestError(f"guest {vm.id} exists")
        self._vms[vm.id] = vm
        await self.start(vm.id)
        return vm

    def _sock_dir(self) -> Path:
        """QMP sockets live in a private short directory (unix paths are limited to 107
        bytes; ``run_dir`` may be deep)."""
        if self._socks is None:
            self._socks = Path(tempfile.mkdtemp(prefix="sysvm-qmp-"))  # mode 0700
        return self._socks

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def _require(self, vm_id: str) -> GuestVm:
        vm = self._vms.get(vm_id)
        if vm is None or vm.state is GuestState.DESTROYED:
            raise GuestError(f"no such guest {vm_id}")
        return vm

    async def start(self, vm_id: str) -> GuestVm:
        async with self._lock(vm_id):
            vm = self._require(vm_id)
            if vm.state is GuestState.RUNNING:
                return vm
            vm.state = GuestState.STARTING
            try:
                await self._launch(vm)
            except BaseException:
                vm.state = GuestState.ERROR
                raise
            vm.state = GuestState.RUNNING
            log.info(
                "event=guest_started vm=%s name=%s pid=%s vnc=%s:%d",
                vm.id,
                vm.name,
                vm.pid,
                vm.vnc_host,
                vm.vnc_port,
            )
            return vm

    async def _launch(self, vm: GuestVm) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        image = payload.write_image(self.run_dir / "guest-boot.img")
        qmp_path = self._sock_dir() / f"{vm.id}.qmp"
        log_path = self.run_dir / f"{vm.id}.log"
        with contextlib.suppress(FileNotFoundError):
            qmp_path.unlink()
        argv = qemu_argv(
            self.qemu,
            image=image,
            qmp_path=qmp_path,
            vnc_host=self.vnc_host,
            memory_mb=vm.memory_mb,
            name=vm.name,
        )
        if shutil.which(argv[0]) is None:
            raise GuestError(f"{argv[0]} not found (apt install qemu-system-x86)")
        if not address_is_local(self.vnc_host):
            raise GuestError(
                f"guest VNC host {self.vnc_host} is not an address of this host (yet): it is "
                f"the address system VMs reach the manager on ({ENV_AGENT_URLS}), on the "
                f"zone's control bridge once a system VM runs; set {ENV_VNC_HOST} to override"
            )
        logfd = _open_log(log_path)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfd,
                stderr=logfd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            os.close(logfd)
        qmp: Qmp | None = None
        try:
            async with asyncio.timeout(self.start_timeout):
                while qmp is None:
                    if proc.returncode is not None:
                        raise GuestError(f"{argv} exited with {proc.returncode}: {_tail(log_path)}")
                    if qmp_path.exists():
                        try:
                            qmp = await Qmp.connect(qmp_path)
                            break
                        except (OSError, QmpError):
                            pass
                    await asyncio.sleep(0.02)  # poll: the socket appears, or QEMU exits
                password = new_vnc_password()
                await qmp.execute("set_password", {"protocol": "vnc", "password": password})
                info = await qmp.execute("query-vnc")
        except BaseException as e:
            if qmp is not None:
                await qmp.close()
            await self._kill(proc)
            if isinstance(e, TimeoutError):
                raise GuestError(
                    f"{argv} did not come up in {self.start_timeout:g}s: {_tail(log_path)}"
                ) from e
            if isinstance(e, QmpError):
                raise GuestError(f"QMP failed for {vm.name}: {e}") from e
            raise
        vm.vnc_host = str(info.get("host", self.vnc_host))
        vm.vnc_port = int(info["service"])
        vm.vnc_password = password
        vm.pid = proc.pid
        self._procs[vm.id] = _Proc(proc, qmp, log_path)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        try:
            async with asyncio.timeout(self.stop_timeout):
                await proc.wait()
        except TimeoutError:
            log.error("event=guest_kill_timeout pid=%d", proc.pid)

    async def stop(self, vm_id: str) -> GuestVm:
        async with self._lock(vm_id):
            vm = self._require(vm_id)
            await self._stop(vm)
            return vm

    async def _stop(self, vm: GuestVm) -> None:
        p = self._procs.pop(vm.id, None)
        if p is None:
            vm.state = GuestState.STOPPED
            return
        vm.state = GuestState.STOPPING
        with contextlib.suppress(QmpError, OSError, TimeoutError):
            await p.qmp.execute("quit", within=2.0)
        await p.qmp.close()
        try:
            async with asyncio.timeout(self.stop_timeout / 2):
                await p.proc.wait()
        except TimeoutError:
            await self._kill(p.proc)
        vm.state = GuestState.STOPPED
        vm.pid = None
        vm.vnc_port = 0
        vm.vnc_password = ""
        log.info("event=guest_stopped vm=%s name=%s", vm.id, vm.name)

    async def destroy(self, vm_id: str) -> None:
        async with self._lock(vm_id):
            vm = self._require(vm_id)
            await self._stop(vm)
            vm.state = GuestState.DESTROYED
            for hook in self._destroy_hooks:
                try:
                    await hook(vm_id)
                except Exception as e:
                    log.error("event=destroy_hook_failed vm=%s error=%r", vm_id, e)
            log.info("event=guest_destroyed vm=%s name=%s", vm.id, vm.name)

    async def rotate_password(self, vm_id: str) -> str:
        """New VNC password (e.g. after a console session ends)."""
        async with self._lock(vm_id):
            vm = self._require(vm_id)
            p = self._procs.get(vm_id)
            if p is None:
                raise GuestError(f"guest {vm_id} is not running")
            password = new_vnc_password()
            await p.qmp.execute("set_password", {"protocol": "vnc", "password": password})
            vm.vnc_password = password
            return password

    async def screendump(self, vm_id: str, path: Path) -> tuple[int, int, bytes]:
        """Writes the guest's framebuffer as PPM via QMP; returns (width, height, RGB)."""
        p = self._procs.get(vm_id)
        if p is None:
            raise GuestError(f"guest {vm_id} is not running")
        await p.qmp.execute("screendump", {"filename": str(path)})
        return read_ppm(await asyncio.to_thread(path.read_bytes))

    async def close(self) -> None:
        for vm_id in list(self._procs):
            vm = self._vms[vm_id]
            async with self._lock(vm_id):
                await self._stop(vm)
        if self._socks is not None:
            shutil.rmtree(self._socks, ignore_errors=True)
            self._socks = None


def read_ppm(data: bytes) -> tuple[int, int, bytes]:
    """Pure: parses a binary PPM (P6, maxval 255)."""
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end : end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    if fields[0] != b"P6" or fields[3] != b"255":
        raise ValueError("not a P6/255 PPM")
    width, height = int(fields[1]), int(fields[2])
    pixels = data[pos + 1 : pos + 1 + width * height * 3]
    if len(pixels) != width * height * 3:
        raise ValueError("truncated PPM")
    return width, height, pixels
