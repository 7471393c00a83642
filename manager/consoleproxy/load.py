"""Console proxy load reports. Pure.

A console proxy VM sends the event ``console.sessions`` on every session open/close and
every ``consoleproxy.loadscan.interval`` seconds::

    {"count": 2, "max": 50, "draining": false, "reason": "open" | "close" | "scan",
     "sessions": [{"vm_id": "...", "client": "203.0.113.7", "started": 1700000000.0,
                   "last_used": 1700000012.5}, ...]}

Times are the proxy's wall clock (``time.time()``). :func:`parse_report` validates one (bad
input raises :class:`ReportError`, never anything else) and :func:`to_load` turns it into the
planners' :class:`~manager.consoleproxy.assign.ProxyLoad`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from manager.consoleproxy.assign import ProxyLoad

MAX_SESSIONS_IN_REPORT = 100_000


class ReportError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SessionInfo:
    vm_id: str
    client: str
    started: float
    last_used: float


@dataclass(frozen=True, slots=True)
class LoadReport:
    count: int
    draining: bool
    sessions: tuple[SessionInfo, ...]


def _num(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ReportError(f"{what} must be a number")
    return float(v)


def parse_report(data: Mapping[str, Any]) -> LoadReport:
    raw = data.get("sessions", [])
    if not isinstance(raw, list) or len(raw) > MAX_SESSIONS_IN_REPORT:
        raise ReportError("sessions must be a list")
    sessions = []
    for item in raw:
        if not isinstance(item, Mapping):
            raise ReportError("each session must be a map")
        vm_id, client = item.get("vm_id"), item.get("client", "")
        if not isinstance(vm_id, str) or not isinstance(client, str):
            raise ReportError("session vm_id/client must be strings")
        sessions.append(
            SessionInfo(
                vm_id,
                client,
                _num(item.get("started"), "started"),
                _num(item.get("last_used"), "last_used"),
            )
        )
    count = data.get("count", len(sessions))
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ReportError("count must be a non-negative integer")
    draining = data.get("draining", False)
    if not isinstance(draining, bool):
        raise ReportError("draining must be a boolean")
    return LoadReport(count, draining, tuple(sessions))


def to_load(
    vm_id: str,
    state: str,
    report: LoadReport | None,
    *,
    now: float,
    previous: ProxyLoad | None = None,
    started: float = 0.0,
) -> ProxyLoad:
    """Planner view of a proxy; keeps ``idle_since`` from ``previous`` while still idle."""
    count = report.count if report else 0
    idle_since: float | None = None
    if count == 0:
        idle_since = (
            previous.idle_since if previous is not None and previous.idle_since is not None else now
        )
    return ProxyLoad(
        vm_id=vm_id,
        state=state,
        sessions=count,
        session_vm_ids=frozenset(s.vm_id for s in report.sessions) if report else frozenset(),
        draining=report.draining if report else False,
        idle_since=idle_since,
        started=started,
    )
