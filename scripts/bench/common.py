"""Helpers shared by the benchmarks in scripts/bench/: process figures from /proc, a
Prometheus text parser, quantiles, free ports, RLIMIT_NOFILE, child processes driven by
JSON lines over stdin/stdout, the baseline servers' TLS, and a plain-text table."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(event: str, **kv: Any) -> None:
    """One line per event, key=value, to stderr."""
    parts = [f"event={event}"] + [f"{k}={_kv(v)}" for k, v in kv.items()]
    print(" ".join(parts), file=sys.stderr, flush=True)


def _kv(v: Any) -> str:
    s = f"{v:.3f}" if isinstance(v, float) else str(v)
    return json.dumps(s) if (not s or any(c in s for c in ' "=\n')) else s


def raise_nofile(want: int | None = None) -> int:
    """Raises the soft RLIMIT_NOFILE to ``want`` (default: the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else min(want, hard)
    if hard == resource.RLIM_INFINITY and want is None:
        target = 1 << 20
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (0.0 for no values)."""
    if not values:
        return 0.0
    s = sorted(values)
    idx = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return s[idx]


@dataclass(frozen=True)
class ProcSample:
    """CPU seconds (user + system) and resident memory of one process at one instant."""

    at: float
    cpu: float
    rss: int


def proc_sample(pid: int) -> ProcSample:
    """Reads /proc/PID/stat and /proc/PID/status (raises OSError if the process is gone)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
            break
    return ProcSample(time.monotonic(), cpu, rss)


def cpu_percent(a: ProcSample, b: ProcSample) -> float:
    """Share of one core used between two samples, in percent."""
    wall = b.at - a.at
    return 0.0 if wall <= 0 else 100.0 * (b.cpu - a.cpu) / wall


@dataclass(frozen=True)
class MachineSample:
    """Whole-machine CPU: busy and total jiffies (/proc/stat) and the CPU pressure stall
    total in microseconds (/proc/pressure/cpu "some"; 0 where PSI is absent)."""

    at: float
    busy: int
    total: int
    stall_us: int


def machine_sample() -> MachineSample:
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in first]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    total = sum(ticks[:8])
    stall = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                stall = int(line.rsplit("total=", 1)[1])
    return MachineSample(time.monotonic(), total - idle, total, stall)


def machine_load(a: MachineSample, b: MachineSample) -> tuple[float, float]:
    """(percent of all CPUs busy, percent of wall time some task waited for a CPU)."""
    total = b.total - a.total
    busy = 0.0 if total <= 0 else 100.0 * (b.busy - a.busy) / total
    wall = b.at - a.at
    stall = 0.0 if wall <= 0 else 100.0 * (b.stall_us - a.stall_us) / 1e6 / wall
    return busy, stall


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(name, sorted label pairs): value}`` from Prometheus text exposition."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        labels: list[tuple[str, str]] = []
        name = head
        if "{" in head and head.endswith("}"):
            name, _, body = head[:-1].partition("{")
            for item in _split_labels(body):
                k, _, v = item.partition("=")
                labels.append((k.strip(), v.strip().strip('"')))
        try:
            out[(name, tuple(sorted(labels)))] = float(value)
        except ValueError:
            continue
    return out


def _split_labels(body: str) -> list[str]:
    items, cur, quoted, escaped = [], [], False, False
    for ch in body:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == "," and not quoted:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        items.append("".join(cur))
    return [i for i in items if i.strip()]


def metric(
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    """One series' value, or the sum over all series of ``name`` when no labels are given."""
    if labels:
        return values.get((name, tuple(sorted(labels.items()))))
    found = [v for (n, _), v in values.items() if n == name]
    return sum(found) if found else None


class Child:
    """A child process (argv list, no shell) that answers one JSON line per JSON line sent.
    Its stderr goes to ``log_path``."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @classmethod
    async def start(cls, name: str, argv: list[str], log_path: Path) -> Child:
        with open(log_path, "ab") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                limit=1 << 20,
            )
        return cls(name, proc, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self, n: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        return ""

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise RuntimeError(f"{self.name}: no answer within {timeout:.0f}s") from None
        if not line:
            rc = await self.wait(5.0)
            raise RuntimeError(
                f"{self.name} (pid {self.pid}) exited with {rc}; stderr tail:\n"
                + self.stderr_tail()
            )
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.name}: {answer['error']}")
        return answer

    async def call(self, wait: float, **cmd: Any) -> dict[str, Any]:
        """Sends ``cmd`` as one JSON line; returns the answer (up to ``wait`` seconds)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await asyncio.wait_for(self.proc.stdin.drain(), wait)
        return await self.read(wait)

    async def wait(self, timeout: float) -> int | None:
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self.proc.wait(), timeout)
        return None

    async def stop(self, timeout: float = 10.0) -> int | None:
        """Closes stdin (the polite stop), then SIGTERM, then SIGKILL."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self.proc.stdin.close()
        rc = await self.wait(timeout)
        if rc is None:
            rc = await terminate(self.proc, timeout)
        return rc


async def terminate(proc: asyncio.subprocess.Process, timeout: float) -> int | None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
    if proc.returncode is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(proc.wait(), timeout)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    return await asyncio.wait_for(proc.wait(), timeout)


async def stdin_lines() -> asyncio.StreamReader:
    """An asyncio reader over this process's stdin (for child-side command loops)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def answer(obj: dict[str, Any]) -> None:
    """Child side: one JSON line on stdout."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    sep = "-+-".join("-" * w for w in widths)
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), sep]
    for row in rows:
        out.append(
            " | ".join(
                (c.ljust(w) if i == 0 else c.rjust(w))
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(out)


def tls_server_argv(script: Path, sub: str, home: Path) -> list[str]:
    """argv of a baseline server child (``script sub``) with the manager's server
    certificate and CA from its ``home``: the same TLS the agents verify."""
    pki = home / "pki"
    return [
        sys.executable,
        str(script),
        sub,
        "--cert",
        str(pki / "server.pem"),
        "--key",
        str(pki / "server.key"),
        "--ca",
        str(pki / "ca.pem"),
    ]


def tls_server_context(cert: str, key: str, ca: str, verify: ssl.VerifyMode) -> ssl.SSLContext:
    """A baseline server's TLS: like the manager's agent endpoint (TLS 1.2+, its CA)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = verify
    return ctx
