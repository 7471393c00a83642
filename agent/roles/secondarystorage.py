"""Minimal secondary-storage role: keeps the ``settings`` and ``secondarystorage`` sections
it was given and reports them; the storage services themselves come later.

Apply is trivially atomic (it swaps one reference), and it validates the section shape so a
bad config is refused with a clear reason instead of half-applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.roles.base import ApplyError, RoleContext


def validate(config: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: the parts of the desired config this role uses, or ApplyError."""
    settings = config.get("settings", {})
    if not isinstance(settings, Mapping):
        raise ApplyError("settings section is not a map")
    section = config.get("secondarystorage", {})
    if not isinstance(section, Mapping):
        raise ApplyError("secondarystorage section is not a map")
    return {"settings": dict(settings), "secondarystorage": dict(section)}


class SecondaryStorageRole:
    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        self.current: dict[str, Any] | None = None
        self.applies = 0

    async def start(self, applied: Mapping[str, Any] | None) -> None:
        if applied is not None:
            self.current = validate(applied)

    async def apply(self, config: Mapping[str, Any]) -> None:
        self.current = validate(config)
        self.applies += 1

    def status(self) -> dict[str, Any]:
        return {"role": "secondarystorage", "configured": self.current is not None}

    async def stop(self) -> None:
        return None


def create(ctx: RoleContext) -> SecondaryStorageRole:
    return SecondaryStorageRole(ctx)
