"""The hypervisor driver interface and the pure naming rules every driver shares.

A :class:`Driver` boots system VMs from a :class:`VmSpec`. Drivers:

- ``nspawn`` (:mod:`manager.hypervisor.nspawn`, the embedded default): the image's rootfs
  (copy-on-write overlay per VM) booted by its own systemd in ``systemd-nspawn``, with its
  own network namespace wired to per-zone host bridges.
- ``qemu`` (:mod:`manager.hypervisor.qemu`): the disk image under QEMU, tap NICs on the
  same bridges, boot data over fw_cfg.
- ``process`` (:mod:`manager.hypervisor.process`): ``sysvm-agent`` as a host process in its
  own network namespace (fast tests, benchmarks; no image).

Every host object a driver creates carries the driver's *prefix* (<= 7 characters) so that
:func:`manager.hypervisor.cleanup.cleanup_all` can find and remove it:
network namespaces ``<prefix>-<vm6>``, veth ``<prefix>v<vm6><i>``, taps
``<prefix>t<vm6><i>``, zone bridges ``<prefix>b<zone4><kind>``, per-network guest bridges
``<prefix>g<net6>b``, nspawn machines and QEMU ``-name`` ``<prefix>-<vm6>``.

Errors: every failure a caller can act on is a :class:`DriverError` whose message names
the VM and what failed; the manager logs it, raises an alert and keeps serving.
"""

from __future__ import annotations

import abc
import enum
import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_PREFIX = 7
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,6}$")
NIC_KINDS = ("control", "public", "guest", "storage")


class DriverError(RuntimeError):
    """A driver operation failed; the message says which VM and what went wrong."""


class PowerState(enum.StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"  # stopped on request (or never started since the driver knew it)
    CRASHED = "crashed"  # the VM's process ended without a stop request
    ABSENT = "absent"  # the driver has no such VM (never started, or destroyed)


@dataclass(frozen=True, slots=True)
class NicSpec:
    """One NIC of a system VM, plugged into a host bridge.

    ``address`` is the VM-side address with prefix length (``169.254.3.7/16``);
    ``bridge_address`` the host's address on that bridge (set when the bridge is created,
    e.g. the control network's ``169.254.0.1/16`` through which VMs reach the manager).
    """

    kind: str  # "control" | "public" | "guest" | "storage"
    bridge: str
    address: str | None = None
    gateway: str | None = None
    mac: str | None = None
    bridge_address: str | None = None
    default_route: bool = False


@dataclass(frozen=True, slots=True)
class VmSpec:
    vm_id: str
    name: str  # v-1-VM
    role: str  # consoleproxy | secondarystorage | domainrouter
    boot_data: Mapping[str, Any]
    nics: tuple[NicSpec, ...] = ()
    memory_mb: int = 512
    cpus: int = 1
    extra: Mapping[str, Any] = field(default_factory=dict)


class Driver(abc.ABC):
    """One hypervisor. All methods are safe to call concurrently for different VMs."""

    name: str = "abstract"

    @abc.abstractmethod
    async def start(self, spec: VmSpec) -> None:
        """Boots the VM (creating its disk/overlay and NICs on first start). Returns once
        the VM's process runs; the agent's hello, not this call, says the VM is up."""

    @abc.abstractmethod
    async def stop(self, vm_id: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Clean shutdown; forced after ``timeout`` seconds. Stopping a stopped VM is a no-op.
        The VM's disk (overlay) is kept."""

    @abc.abstractmethod
    async def reboot(self, vm_id: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Clean stop (forced after ``timeout``), then start with the same spec."""

    @abc.abstractmethod
    async def destroy(self, vm_id: str) -> None:
        """Forced stop, then removes everything of the VM (disk, NICs, namespace)."""

    @abc.abstractmethod
    async def state(self, vm_id: str) -> PowerState: ...

    @abc.abstractmethod
    async def console_log(self, vm_id: str, max_bytes: int = 64 * 1024) -> str:
        """The tail of the VM's console (serial console / container console)."""

    @abc.abstractmethod
    async def list_vms(self) -> list[str]:
        """Ids of the VMs this driver knows (running or not)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Manager shutdown: stops the VMs this driver started (cleanly), then its tasks."""


# ---------------------------------------------------------------- pure naming rules


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise DriverError(
            f"bad host-object prefix {prefix!r}: 1-{MAX_PREFIX} chars, [a-z][a-z0-9]*"
        )
    return prefix


def short_id(value: str, n: int = 6) -> str:
    """Stable short hex id of a VM or zone id (for names limited to 15 characters)."""
    return hashlib.sha256(value.encode()).hexdigest()[:n]


def netns_name(prefix: str, vm_id: str) -> str:
    return f"{prefix}-{short_id(vm_id)}"


def machine_name(prefix: str, vm_id: str) -> str:
    return f"{prefix}-{short_id(vm_id)}"


def veth_name(prefix: str, vm_id: str, index: int) -> str:
    return _ifname(prefix, "v", short_id(vm_id), index)


def tap_name(prefix: str, vm_id: str, index: int) -> str:
    return _ifname(prefix, "t", short_id(vm_id), index)


def bridge_name(prefix: str, zone_id: str, kind: str) -> str:
    if kind not in NIC_KINDS:
        raise DriverError(f"unknown NIC kind {kind!r} (one of {', '.join(NIC_KINDS)})")
    return _ifname(prefix, "b", short_id(zone_id, 4), kind[0])


def guest_bridge_name(prefix: str, network_id: str) -> str:
    """The bridge of one guest network: its router's guest NIC and its guests plug into it;
    the host holds no address on it (the router is the guests' gateway)."""
    return _ifname(prefix, "g", short_id(network_id, 6), "b")


def is_guest_bridge(prefix: str, ifname: str) -> bool:
    return re.fullmatch(rf"{re.escape(prefix)}g[0-9a-f]{{6}}b", ifname) is not None


def is_vm_port(prefix: str, ifname: str) -> bool:
    """A VM's NIC on the host (veth of a namespace, QEMU tap) made under ``prefix``."""
    return re.fullmatch(rf"{re.escape(prefix)}[vt][0-9a-f]{{6}}\d", ifname) is not None


def _ifname(prefix: str, tag: str, ident: str, index: int | str) -> str:
    name = f"{check_prefix(prefix)}{tag}{ident}{index}"
    if len(name) > 15 or (isinstance(index, int) and not 0 <= index <= 9):
        raise DriverError(f"interface name {name!r} exceeds 15 characters / 10 NICs")
    return name


def mac_for(vm_id: str, index: int) -> str:
    """Stable locally administered unicast MAC for NIC ``index`` of ``vm_id``."""
    h = hashlib.sha256(f"{vm_id}/{index}".encode()).digest()
    return "1e:" + ":".join(f"{b:02x}" for b in h[:5])


def validate_spec(spec: VmSpec) -> None:
    """Raises DriverError with a clear message if the spec cannot be booted."""
    if not spec.vm_id or not re.match(r"^[A-Za-z0-9-]{1,64}$", spec.vm_id):
        raise DriverError(f"bad vm id {spec.vm_id!r}")
    if spec.memory_mb < 64 or spec.cpus < 1:
        raise DriverError(f"vm {spec.vm_id}: memory {spec.memory_mb} MiB / {spec.cpus} cpus")
    if len(spec.nics) > 10:
        raise DriverError(f"vm {spec.vm_id}: at most 10 NICs")
    defaults = [n for n in spec.nics if n.default_route]
    if len(defaults) > 1:
        raise DriverError(f"vm {spec.vm_id}: more than one NIC carries the default route")
    for i, nic in enumerate(spec.nics):
        if nic.kind not in NIC_KINDS:
            raise DriverError(f"vm {spec.vm_id}: nic {i} has unknown kind {nic.kind!r}")
        if not re.match(r"^[A-Za-z0-9_.-]{1,15}$", nic.bridge):
            raise DriverError(f"vm {spec.vm_id}: nic {i} bad bridge name {nic.bridge!r}")
        for what, value in (("address", nic.address), ("bridge_address", nic.bridge_address)):
            if value is not None:
                try:
                    ipaddress.ip_interface(value)
                except ValueError:
                    raise DriverError(
                        f"vm {spec.vm_id}: nic {i} {what} {value!r} is not ADDR/PREFIX"
                    ) from None
        if nic.gateway is not None:
            try:
                ipaddress.ip_address(nic.gateway)
            except ValueError:
                raise DriverError(f"vm {spec.vm_id}: nic {i} bad gateway {nic.gateway!r}") from None
        if nic.default_route and nic.gateway is None:
            raise DriverError(f"vm {spec.vm_id}: nic {i} default route without gateway")


def nic_boot_data(spec: VmSpec) -> list[dict[str, Any]]:
    """The NIC list a hypervisor hands the VM (``extra.nics`` of its boot data)."""
    return [
        {
            "name": f"eth{i}",
            "kind": nic.kind,
            "mac": nic.mac or mac_for(spec.vm_id, i),
            "address": nic.address,
            "gateway": nic.gateway,
            "default_route": nic.default_route,
        }
        for i, nic in enumerate(spec.nics)
    ]


def boot_data_for(spec: VmSpec) -> dict[str, Any]:
    """Boot data as delivered: the caller's dict with ``extra.nics`` filled in if absent."""
    data = dict(spec.boot_data)
    extra = dict(data.get("extra") or {})
    extra.setdefault("nics", nic_boot_data(spec))
    data["extra"] = extra
    return data
