"""Agent roles. ``load(name, ctx)`` returns the :class:`~agent.roles.base.Role` for a VM.

Each role lives in ``agent.roles.<package>`` and exposes ``create(ctx: RoleContext) -> Role``.
Packages are imported lazily so a VM only imports the role it runs (and its dependencies).
"""

from __future__ import annotations

import importlib

from agent.roles.base import ApplyError, LinkDown, RequestFailed, Role, RoleContext

__all__ = ["ROLE_MODULES", "ApplyError", "LinkDown", "RequestFailed", "Role", "RoleContext", "load"]

# Role name (boot data "role", and manager.store.base.Role values) -> module.
ROLE_MODULES: dict[str, str] = {
    "consoleproxy": "agent.roles.consoleproxy",
    "secondarystorage": "agent.roles.secondarystorage",
    "domainrouter": "agent.roles.router",
    "router": "agent.roles.router",
}


class UnknownRole(ValueError):
    pass


def load(name: str, ctx: RoleContext) -> Role:
    """Imports the role's module and calls its ``create(ctx)``."""
    module_name = ROLE_MODULES.get(name)
    if module_name is None:
        raise UnknownRole(f"unknown role {name!r} (known: {', '.join(sorted(ROLE_MODULES))})")
    module = importlib.import_module(module_name)
    create = getattr(module, "create", None)
    if create is None:
        raise UnknownRole(f"role module {module_name} has no create(ctx)")
    role = create(ctx)
    if not isinstance(role, Role):
        raise UnknownRole(f"{module_name}.create() returned {type(role).__name__}, not a Role")
    return role
