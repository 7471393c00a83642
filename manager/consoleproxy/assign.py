"""Which console proxy VM a VM's console goes to. Pure.

CloudStack's rules, kept: a VM assigned to a proxy within the last
``consoleproxy.session.timeout`` seconds stays with that proxy ("sticky") as long as the
proxy is Running and either has a free slot under ``consoleproxy.session.max`` or already
holds a session of this VM. Otherwise CloudStack's "balance" allocator returns the *first*
proxy with room; here the choice is the truly least-loaded Running proxy with room (ties:
the one with the fewest sessions, then the lowest id, so the result is stable). A draining
proxy (about to restart) takes no new sessions, sticky or not.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class ProxyState(enum.StrEnum):
    # Same words as manager.store.base.VmState (only these matter here).
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    DESTROYED = "Destroyed"
    ERROR = "Error"


@dataclass(frozen=True, slots=True)
class ProxyLoad:
    """One console proxy VM as the planners see it (built from the store record and its
    last ``console.sessions`` report)."""

    vm_id: str
    state: str  # VmState value
    sessions: int = 0
    session_vm_ids: frozenset[str] = field(default_factory=frozenset)
    draining: bool = False
    idle_since: float | None = None  # when its session count last became 0 (None: busy)
    started: float = 0.0

    @property
    def running(self) -> bool:
        return self.state == ProxyState.RUNNING


@dataclass(frozen=True, slots=True)
class PreviousAssignment:
    proxy_vm_id: str
    assigned_at: float


class Reason(enum.StrEnum):
    STICKY = "sticky"
    LEAST_LOADED = "least_loaded"
    NONE_AVAILABLE = "none_available"


@dataclass(frozen=True, slots=True)
class Choice:
    proxy_vm_id: str | None
    reason: Reason


def assignable(proxy: ProxyLoad) -> bool:
    return proxy.running and not proxy.draining


def sticky_proxy(
    proxies: Sequence[ProxyLoad],
    vm_id: str,
    previous: PreviousAssignment | None,
    *,
    now: float,
    session_max: int,
    session_timeout: float,
) -> ProxyLoad | None:
    """The VM's previous proxy if the sticky rule keeps it, else ``None``."""
    if previous is None or now - previous.assigned_at >= session_timeout:
        return None
    for proxy in proxies:
        if proxy.vm_id != previous.proxy_vm_id:
            continue
        if not assignable(proxy):
            return None
        if proxy.sessions < session_max or vm_id in proxy.session_vm_ids:
            return proxy
        return None
    return None


def choose_proxy(
    proxies: Sequence[ProxyLoad],
    vm_id: str,
    previous: PreviousAssignment | None,
    *,
    now: float,
    session_max: int,
    session_timeout: float,
) -> Choice:
    sticky = sticky_proxy(
        proxies,
        vm_id,
        previous,
        now=now,
        session_max=session_max,
        session_timeout=session_timeout,
    )
    if sticky is not None:
        return Choice(sticky.vm_id, Reason.STICKY)
    candidates = [p for p in proxies if assignable(p) and p.sessions < session_max]
    if not candidates:
        return Choice(None, Reason.NONE_AVAILABLE)
    best = min(candidates, key=lambda p: (p.sessions, p.vm_id))
    return Choice(best.vm_id, Reason.LEAST_LOADED)
