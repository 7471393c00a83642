"""API commands, one module per area. Importing this package registers them all."""

from __future__ import annotations

from manager.api.commands import (
    accounts,
    asyncjobs,
    config,
    console,
    events,
    infra,
    meta,
    net_rules,
    network,
    systemvms,
    sysvm_actions,
    templates,
    vms,
)

__all__ = [
    "accounts",
    "asyncjobs",
    "config",
    "console",
    "events",
    "infra",
    "meta",
    "net_rules",
    "network",
    "systemvms",
    "sysvm_actions",
    "templates",
    "vms",
]
