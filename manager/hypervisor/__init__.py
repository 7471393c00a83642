"""Hypervisor drivers behind one interface (:mod:`manager.hypervisor.base`).

:func:`load_drivers` is what :mod:`manager.app` calls: one driver per hypervisor name used
in the store's ``hypervisor`` columns. Host objects carry the prefix ``$SYSVM_HOST_PREFIX``
(default ``sv``); ``cleanup_all(prefix)`` removes them.
"""

from __future__ import annotations

import os
from typing import Any

from manager.hypervisor.base import Driver, DriverError, NicSpec, PowerState, VmSpec

__all__ = [
    "Driver",
    "DriverError",
    "NicSpec",
    "PowerState",
    "VmSpec",
    "cleanup_all",
    "host_prefix",
    "load_drivers",
]


async def cleanup_all(prefix: str) -> Any:
    """See :func:`manager.hypervisor.cleanup.cleanup_all` (imported lazily so that
    ``python -m manager.hypervisor.cleanup`` runs cleanly)."""
    from manager.hypervisor.cleanup import cleanup_all as _cleanup_all

    return await _cleanup_all(prefix)


def host_prefix() -> str:
    return os.environ.get("SYSVM_HOST_PREFIX", "sv")


def load_drivers(ctx: Any) -> dict[str, Driver]:
    """``Embedded`` → nspawn, ``KVM`` → qemu, ``Process`` → process, all keeping their
    per-VM state under ``<SYSVM_HOME>/vms/<driver>``. Nothing is started here."""
    from manager.hypervisor.nspawn import NspawnDriver
    from manager.hypervisor.process import ProcessDriver
    from manager.hypervisor.qemu import QemuDriver

    home = ctx.home / "vms"
    prefix = host_prefix()
    return {
        "Embedded": NspawnDriver(home / "nspawn", prefix),
        "KVM": QemuDriver(home / "qemu", prefix),
        "Process": ProcessDriver(home / "process", prefix),
    }
