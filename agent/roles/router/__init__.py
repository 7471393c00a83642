"""The virtual router role (``config["router"]``; schema in docs/router-config.md).

``create(ctx)`` returns the :class:`~agent.roles.router.role.RouterRole`. Modules:
``config`` (typed schema, strict parse), ``render`` (pure: config → full files and
iptables-restore texts), ``iptables`` (pure parsing of iptables-save output), ``plan``
(pure decisions), ``stats`` (pure counter deltas), ``probes`` (service checks), ``garp``
(gratuitous ARP frames and their sending), ``proc`` (commands and supervised daemons),
``role`` (the applier).
"""

from __future__ import annotations

from agent.roles.base import RoleContext
from agent.roles.router.role import RouterRole

__all__ = ["RouterRole", "create"]


def create(ctx: RoleContext) -> RouterRole:
    return RouterRole(ctx)
