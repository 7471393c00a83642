"""The ``qemu`` hypervisor: the image's disk booted by QEMU (KVM when it works, else TCG).

Per VM: a qcow2 overlay backed by the shared raw ``disk.img`` (the image is never written),
the image's kernel and initrd, tap NICs on the zone bridges, the serial console kept in
``console.log``, boot data over fw_cfg (``opt/sysvm/bootdata``, read by the agent at
``/sys/firmware/qemu_fw_cfg/by_name/opt/sysvm/bootdata/raw``) and a QMP socket.
Clean stop: Ctrl-Alt-Del over QMP (the image maps it to poweroff.target) plus
``system_powerdown`` (ACPI); forced: SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from manager import netplumb
from manager.hypervisor.base import DriverError, VmSpec, mac_for, machine_name, tap_name
from manager.hypervisor.hostvm import HostDriver, spawn
from manager.hypervisor.nspawn import default_image_dir

QMP_DIR = Path("/run/sysvm-qmp")  # unix socket paths must stay under 108 bytes


def qmp_path(prefix: str, vm_id: str) -> Path:
    return QMP_DIR / f"{machine_name(prefix, vm_id)}.sock"


KERNEL_CMDLINE = (
    "console=ttyS0 root=/dev/vda rw net.ifnames=0 panic=-1 quiet "
    "systemd.show_status=1 systemd.ssh_auto=0"
)


def qemu_argv(
    *,
    prefix: str,
    spec: VmSpec,
    vmdir: Path,
    image_dir: Path,
    accel: str,
) -> list[str]:
    name = machine_name(prefix, spec.vm_id)
    argv = [
        "qemu-system-x86_64",
        "-name", f"{name},process={name}",
        "-machine", f"pc,accel={accel}",
        "-cpu", "host" if accel == "kvm" else "max",
        "-m", str(spec.memory_mb),
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", str(image_dir / "vmlinuz"),
        "-initrd", str(image_dir / "initrd.img"),
        "-append", KERNEL_CMDLINE,
        "-drive", f"file={vmdir / 'disk.qcow2'},if=virtio,format=qcow2,cache=writeback",
        "-device", "virtio-rng-pci",
        "-chardev", f"file,id=serial0,path={vmdir / 'console.log'},append=on",
        "-serial", "chardev:serial0",
        "-fw_cfg", f"name=opt/sysvm/bootdata,file={vmdir / 'bootdata.json'}",
        "-qmp", f"unix:{qmp_path(prefix, spec.vm_id)},server=on,wait=off",
    ]  # fmt: skip
    for i, nic in enumerate(spec.nics):
        tap = tap_name(prefix, spec.vm_id, i)
        argv += [
            "-netdev", f"tap,id=n{i},ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n{i},mac={nic.mac or mac_for(spec.vm_id, i)}",
        ]  # fmt: skip
    return argv


async def qmp(sock: Path, command: str, args: Mapping[str, Any] | None = None,
              timeout: float = 5.0) -> dict[str, Any]:  # fmt: skip  # noqa: ASYNC109
    """One QMP command over the VM's socket; returns the ``return`` object."""

    async def talk() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        try:
            await reader.readline()  # greeting
            for cmd in (
                {"execute": "qmp_capabilities"},
                {"execute": command, "arguments": dict(args or {})},
            ):
                writer.write(json.dumps(cmd).encode() + b"\n")
                await writer.drain()
                while True:
                    msg = json.loads(await reader.readline() or b"{}")
                    if not msg:
                        raise DriverError(f"qmp {command}: connection closed")
                    if "error" in msg:
                        raise DriverError(f"qmp {command}: {msg['error'].get('desc')}")
                    if "return" in msg:
                        break
            result: dict[str, Any] = msg["return"] if isinstance(msg["return"], dict) else {}
            return result
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        return await asyncio.wait_for(talk(), timeout)
    except (OSError, ValueError, TimeoutError) as e:
        raise DriverError(f"qmp {command} via {sock}: {e.__class__.__name__}: {e}") from e


class QemuDriver(HostDriver):
    name = "qemu"
    uses_netns = False

    def __init__(
        self,
        state_dir: Path,
        prefix: str = "sv",
        image_dir: Path | None = None,
        accel: str | None = None,
    ) -> None:
        super().__init__(state_dir, prefix)
        self.image_dir = image_dir or default_image_dir()
        # /dev/kvm may exist and still not work (nested PVM here): TCG unless told otherwise
        self.accel = accel or os.environ.get("SYSVM_QEMU_ACCEL", "tcg")

    def _image(self, vmdir: Path) -> Path:
        pinned = vmdir / "image"
        if pinned.exists():
            p = Path(pinned.read_text().strip())
            if (p / "disk.img").exists():
                return p
        img = self.image_dir.resolve()
        for f in ("disk.img", "vmlinuz", "initrd.img"):
            if not (img / f).exists():
                raise DriverError(f"no {f} in system VM image {img} (run scripts/build-image)")
        pinned.write_text(f"{img}\n")
        return img

    async def _plumb(self, spec: VmSpec) -> None:
        for i, nic in enumerate(spec.nics):
            await netplumb.ensure_bridge(nic.bridge, nic.bridge_address)
            await netplumb.add_tap(tap_name(self.prefix, spec.vm_id, i), nic.bridge)

    async def _unplumb(self, vm_id: str, nics: int) -> None:
        for i in range(nics):
            await netplumb.delete_link(tap_name(self.prefix, vm_id, i))

    async def _prepare(self, spec: VmSpec, vmdir: Path) -> None:
        img = self._image(vmdir)
        disk = vmdir / "disk.qcow2"
        if not disk.exists():
            await netplumb.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                 "-b", str(img / "disk.img"), str(disk)],
                timeout=30,
            )  # fmt: skip
        QMP_DIR.mkdir(mode=0o700, exist_ok=True)  # noqa: ASYNC240
        qmp_path(self.prefix, spec.vm_id).unlink(missing_ok=True)

    async def _launch(self, spec: VmSpec, vmdir: Path) -> asyncio.subprocess.Process:
        argv = qemu_argv(
            prefix=self.prefix, spec=spec, vmdir=vmdir, image_dir=self._image(vmdir),
            accel=self.accel,
        )  # fmt: skip
        return await spawn(spec.vm_id, argv, vmdir / "qemu.log")

    async def _after_launch(self, spec: VmSpec, vmdir: Path, pid: int) -> dict[str, Any]:
        # QEMU fails fast on a bad argument; give it a moment to say so
        sock = qmp_path(self.prefix, spec.vm_id)
        for _ in range(40):
            if sock.exists():
                return {}
            proc = self._procs.get(spec.vm_id)
            if proc is not None and proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        if sock.exists():
            return {}
        tail = (vmdir / "qemu.log").read_bytes()[-600:].decode(errors="replace")
        raise DriverError(f"vm {spec.vm_id}: qemu did not start: {tail.strip()}")

    async def _request_shutdown(self, vm_id: str, run: Mapping[str, Any]) -> None:
        # The image maps Ctrl-Alt-Del to poweroff.target (no logind/dbus for the ACPI power
        # button); the ACPI request is sent too, for images that do handle it.
        sock = qmp_path(self.prefix, vm_id)
        keys = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
        await qmp(sock, "send-key", {"keys": keys})
        await qmp(sock, "system_powerdown")

    async def _cleanup_stopped(self, vm_id: str, vmdir: Path) -> None:
        qmp_path(self.prefix, vm_id).unlink(missing_ok=True)

    async def _destroy_disk(self, vm_id: str, vmdir: Path) -> None:
        (vmdir / "disk.qcow2").unlink(missing_ok=True)
