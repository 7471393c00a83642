"""How many console proxy VMs a zone needs. Pure.

Evaluated every ``consoleproxy.capacityscan.interval`` seconds per zone:

- **Start**: free slots = Σ over Running, non-draining proxies of
  ``max(0, session.max - sessions)`` plus ``session.max`` for each proxy still Starting (so
  a scan does not launch again what the previous one launched). When free slots fall below
  ``consoleproxy.capacity.standby`` (CloudStack's rule), start as many proxies as it takes to
  get back to standby in one go (CloudStack starts one per scan), never more than
  ``consoleproxy.launch.max`` live proxies in the zone. A zone always has at least one.
- **Stop**: a Running proxy with no session for at least ``idle_grace`` seconds is stopped
  when, without it, free slots stay at or above standby (so the start rule will not fire
  right after: no flapping) and at least one proxy remains. Newest first.
- **Drain before restart**: a draining proxy takes no new session (see
  :mod:`manager.consoleproxy.assign`); :func:`drain_status` says when it may restart and how
  many sessions a restart cuts right now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from manager.consoleproxy.assign import ProxyLoad, ProxyState

LIVE_STATES = frozenset({ProxyState.STARTING, ProxyState.RUNNING})


@dataclass(frozen=True, slots=True)
class ScalePlan:
    start: int
    stop: tuple[str, ...]
    free_slots: int
    reason: str


def free_slots(proxies: Sequence[ProxyLoad], session_max: int) -> int:
    free = 0
    for p in proxies:
        if p.draining:
            continue
        if p.state == ProxyState.RUNNING:
            free += max(0, session_max - p.sessions)
        elif p.state == ProxyState.STARTING:
            free += session_max
    return free


def plan_capacity(
    proxies: Sequence[ProxyLoad],
    *,
    now: float,
    session_max: int,
    standby: int,
    launch_max: int,
    idle_grace: float = 60.0,
) -> ScalePlan:
    if session_max <= 0:
        raise ValueError("session_max must be positive")
    live = [p for p in proxies if p.state in LIVE_STATES]
    free = free_slots(live, session_max)
    room = max(0, launch_max - len(live))
    want_min = 1 if launch_max > 0 else 0
    if len(live) < want_min or free < standby:
        needed = max(want_min - len(live), -(-(standby - free) // session_max), 1)
        start = min(needed, room)
        if start == 0:
            return ScalePlan(0, (), free, f"launch.max={launch_max} reached")
        return ScalePlan(start, (), free, f"free={free} < standby={standby}")
    stop: list[str] = []
    idle = [
        p
        for p in live
        if p.running
        and p.sessions == 0
        and p.idle_since is not None
        and now - p.idle_since >= idle_grace
    ]
    remaining = len(live)
    for p in sorted(idle, key=lambda p: (-p.started, p.vm_id)):
        contribution = 0 if p.draining else session_max
        if remaining - 1 < want_min or free - contribution < standby:
            continue
        stop.append(p.vm_id)
        free -= contribution
        remaining -= 1
    if stop:
        return ScalePlan(0, tuple(stop), free, f"idle proxies beyond standby={standby}")
    return ScalePlan(0, (), free, "ok")


@dataclass(frozen=True, slots=True)
class DrainStatus:
    ready: bool  # the proxy may restart now
    sessions_cut: int  # sessions a restart now would cut
    reason: str


def drain_status(
    proxy: ProxyLoad, *, drain_started: float, now: float, drain_timeout: float
) -> DrainStatus:
    if proxy.sessions == 0:
        return DrainStatus(True, 0, "drained")
    if now - drain_started >= drain_timeout:
        return DrainStatus(
            True, proxy.sessions, f"drain timeout {drain_timeout:g}s: cuts {proxy.sessions}"
        )
    return DrainStatus(False, proxy.sessions, f"waiting for {proxy.sessions} session(s)")
