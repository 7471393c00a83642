"""Counters and gauges rendered as Prometheus text (``GET /metrics`` on the API listener).

Cheap on the hot path: ``inc`` is one dict update keyed by (name, sorted labels); per-frame
counters take their series' :class:`Cell` once (:meth:`Metrics.counter`) and add to it. Names are
registered with help text in :data:`HELP`; an unregistered name still renders (as untyped) so
a typo shows up instead of vanishing. Event-loop lag is sampled by :class:`LoopLagMonitor`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Iterable
from typing import Literal

Kind = Literal["counter", "gauge"]

HELP: dict[str, tuple[Kind, str]] = {
    "sysvm_agents_connected": ("gauge", "Agents with a live, authenticated channel"),
    "sysvm_enrolments_total": ("counter", "Enrolment attempts by result and reason"),
    "sysvm_agent_refused_total": ("counter", "Agent connections refused before the upgrade"),
    "sysvm_tls_handshake_failures_total": ("counter", "TLS handshakes refused on the agent port"),
    "sysvm_frames_in_total": ("counter", "Frames received from agents"),
    "sysvm_frames_out_total": ("counter", "Frames sent to agents"),
    "sysvm_decode_errors_total": ("counter", "Agent frames that could not be decoded"),
    "sysvm_heartbeats_total": ("counter", "Heartbeats received from agents"),
    "sysvm_config_pushes_total": ("counter", "Desired-config versions sent to agents"),
    "sysvm_config_acks_total": ("counter", "Desired-config acknowledgements by result"),
    "sysvm_commands_total": ("counter", "Commands sent to agents"),
    "sysvm_command_results_total": ("counter", "Command results received by result"),
    "sysvm_certificates_renewed_total": ("counter", "Agent certificates renewed"),
    "sysvm_sessions_closed_total": ("counter", "Agent sessions closed by reason"),
    "sysvm_loop_lag_seconds": ("gauge", "Event-loop lag quantiles over the last minute"),
}

LabelKey = tuple[tuple[str, str], ...]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


class Cell:
    """One series' value. Hot paths keep a cell (:meth:`Metrics.counter`) and add to
    ``value`` directly: no label sorting, no dict lookups per event."""

    __slots__ = ("value",)

    def __init__(self, value: float = 0.0) -> None:
        self.value = value


class Metrics:
    def __init__(self) -> None:
        self._values: dict[str, dict[LabelKey, Cell]] = {}

    def counter(self, name: str, **labels: str) -> Cell:
        """The cell of one series (created at 0): ``cell.value += 1`` is the cheapest
        increment there is. ``inc``/``set``/``get`` of the same series use the same cell."""
        series = self._values.setdefault(name, {})
        key = tuple(sorted(labels.items())) if labels else ()
        cell = series.get(key)
        if cell is None:
            cell = series[key] = Cell()
        return cell

    def inc(self, name: str, by: float = 1, **labels: str) -> None:
        series = self._values.get(name)
        if series is None:
            series = self._values[name] = {}
        key = tuple(sorted(labels.items())) if labels else ()
        cell = series.get(key)
        if cell is None:
            series[key] = Cell(float(by))
        else:
            cell.value += by

    def set(self, name: str, value: float, **labels: str) -> None:
        series = self._values.setdefault(name, {})
        key = tuple(sorted(labels.items())) if labels else ()
        cell = series.get(key)
        if cell is None:
            series[key] = Cell(float(value))
        else:
            cell.value = float(value)

    def get(self, name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items())) if labels else ()
        cell = self._values.get(name, {}).get(key)
        return 0.0 if cell is None else float(cell.value)

    def total(self, name: str) -> float:
        return float(sum(c.value for c in self._values.get(name, {}).values()))

    def render(self) -> str:
        return render(
            (name, {k: float(c.value) for k, c in series.items()})
            for name, series in self._values.items()
        )


def render(items: Iterable[tuple[str, dict[LabelKey, float]]]) -> str:
    """Pure: Prometheus text exposition format 0.0.4."""
    lines: list[str] = []
    for name, series in sorted(items):
        kind, help_text = HELP.get(name, ("untyped", ""))
        if help_text:
            lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for key, value in sorted(series.items()):
            if key:
                lbl = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                lines.append(f"{name}{{{lbl}}} {_fmt(value)}")
            else:
                lines.append(f"{name} {_fmt(value)}")
    return "\n".join(lines) + "\n"


def quantile(sorted_values: list[float], q: float) -> float:
    """Pure: nearest-rank quantile of an already sorted list (0.0 if empty)."""
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


class LoopLagMonitor:
    """Wakes every ``interval`` seconds and records how late it woke (the loop's lag)."""

    def __init__(self, metrics: Metrics, interval: float = 0.25, window: int = 240) -> None:
        self.metrics = metrics
        self.interval = interval
        self.samples: deque[float] = deque(maxlen=window)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while True:
            expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.samples.append(max(0.0, loop.time() - expected))
            n += 1
            if n % 4 == 0:
                self.publish()

    def publish(self) -> None:
        s = sorted(self.samples)
        for q in ("0.5", "0.99"):
            self.metrics.set("sysvm_loop_lag_seconds", quantile(s, float(q)), quantile=q)


def now() -> float:
    return time.time()
