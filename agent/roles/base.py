"""The interface every agent role implements (docs/internals.md, "agent/").

A role turns the VM's desired config (one dict; each role reads its own section) into
running services. The link calls, in order: ``start(applied)`` once at boot (re-apply the
last applied config first, ``None`` on a fresh VM), ``apply(config)`` for each newer config
version, ``status()`` for every heartbeat, ``stop()`` on shutdown.

``apply`` is atomic: on failure the role rolls back to the previous state and raises
:class:`ApplyError` with a short reason, which is reported to the manager in ``config_ack``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class ApplyError(Exception):
    """A config could not be applied (the role has rolled back). ``reason`` goes to the
    manager verbatim, so it must never contain a secret."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LinkDown(Exception):
    """Raised by :attr:`RoleContext.request` when the manager link is not up (or drops
    before the response arrives)."""


class RequestFailed(Exception):
    """Raised by :attr:`RoleContext.request` when the manager answered ``ok=False``."""

    def __init__(self, method: str, error: str) -> None:
        super().__init__(f"{method}: {error}")
        self.method = method
        self.error = error


@runtime_checkable
class Role(Protocol):
    async def start(self, applied: Mapping[str, Any] | None) -> None:
        """Boot: re-apply the last applied config (``None`` if nothing applied yet)."""
        ...

    async def apply(self, config: Mapping[str, Any]) -> None:
        """Apply the VM's whole desired config; atomic; raise ApplyError after rollback."""
        ...

    def status(self) -> dict[str, Any]:
        """Small dict carried in every heartbeat (cheap: called every few seconds)."""
        ...

    async def stop(self) -> None: ...


async def _no_request(method: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
    raise LinkDown(f"no manager link for request {method}")


def _no_notify(name: str, data: Mapping[str, Any]) -> None:
    return None


@dataclass
class RoleContext:
    vm_id: str
    name: str
    zone_id: str
    role: str
    state_dir: Path
    extra: Mapping[str, Any] = field(default_factory=dict)  # bootdata "extra"
    # RPC to the manager (a `request` frame); raises LinkDown / RequestFailed.
    request: Callable[[str, Mapping[str, Any]], Awaitable[Mapping[str, Any]]] = _no_request
    # Event to the manager (an `event` frame); silently dropped while the link is down.
    notify: Callable[[str, Mapping[str, Any]], None] = _no_notify
