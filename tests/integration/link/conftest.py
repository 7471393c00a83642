"""Harness for link tests: real ``sysvm-manager`` and ``sysvm-agent`` processes on loopback,
temp homes, free ports, logs captured to files and polled (never slept on)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

# Same knob as tests/conftest.py (scale every wait on a slow machine).
TIMING_FACTOR = float(os.environ.get("SYSVM_TEST_TIMING", "1"))

VENV_BIN = Path(sys.executable).parent


async def wait_for(
    cond: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> Any:
    """Polls ``cond`` until it returns something truthy; fails the test after ``timeout``
    (scaled by SYSVM_TEST_TIMING) naming ``what``."""
    deadline = time.monotonic() + timeout * TIMING_FACTOR
    last: Any = None
    while True:
        try:
            value = cond()
            if asyncio.iscoroutine(value):
                value = await value
            last = value
        except (TimeoutError, OSError, aiohttp.ClientError) as e:
            value, last = None, e
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last={last!r})")
        await asyncio.sleep(interval)


class Proc:
    """A child process with stderr in a file; always killed at teardown."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as f:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=f,
                stderr=f,
                env=self.env,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self, needle: str) -> list[str]:
        return [ln for ln in self.log().splitlines() if needle in ln]

    async def wait_log(self, needle: str, timeout: float = 20, count: int = 1) -> list[str]:
        async def found() -> list[str] | None:
            if self.proc is not None and self.proc.returncode is not None and count > 0:
                got = self.lines(needle)
                if len(got) >= count:
                    return got
                raise AssertionError(
                    f"{self.name} exited {self.proc.returncode} before logging {needle!r}:\n"
                    + self.log()[-3000:]
                )
            got = self.lines(needle)
            return got if len(got) >= count else None

        result: list[str] = await wait_for(found, timeout, f"{self.name} log {needle!r}")
        return result

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout * TIMING_FACTOR)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)


class Manager(Proc):
    def __init__(self, home: Path, api_port: int, agent_port: int, env: dict[str, str]) -> None:
        self.home = home
        self.api_port = api_port
        self.agent_port = agent_port
        super().__init__(
            "manager",
            [
                str(VENV_BIN / "sysvm-manager"),
                "--home",
                str(home),
                "--api-listen",
                f"127.0.0.1:{api_port}",
                "--agent-listen",
                f"127.0.0.1:{agent_port}",
            ],
            home.parent / f"{home.name}.log",
            env,
        )
        self.starts = 0

    async def start(self) -> None:
        before = len(self.lines("event=manager_ready"))
        await super().start()
        self.starts += 1
        await self.wait_log("event=manager_ready", timeout=30, count=before + 1)

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.agent_port}"

    async def metrics(self) -> dict[str, float]:
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"http://127.0.0.1:{self.api_port}/metrics",
                timeout=aiohttp.ClientTimeout(total=5),
            ) as r,
        ):
            assert r.status == 200
            text = await r.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    async def metric(self, key: str) -> float:
        return (await self.metrics()).get(key, 0.0)

    async def cli(self, *args: str) -> tuple[int, str]:
        """``sysvm-manager`` sub-command on this home; (exit code, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "sysvm-manager"),
            "--home",
            str(self.home),
            "--agent-listen",
            f"127.0.0.1:{self.agent_port}",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, err.decode()

    async def create_vms(self, count: int, role: str = "secondarystorage") -> list[dict[str, Any]]:
        out = self.home.parent / f"boot-{time.monotonic_ns()}.jsonl"
        rc, err = await self.cli(
            "create-external-vms", "--role", role, "--count", str(count), "--out", str(out)
        )
        assert rc == 0, err[-2000:]
        assert (out.stat().st_mode & 0o777) == 0o600
        return [json.loads(line) for line in out.read_text().splitlines()]


class Agent(Proc):
    def __init__(self, base: Path, boot: dict[str, Any], env: dict[str, str], tag: str) -> None:
        self.state_dir = base / f"agent-{tag}"
        self.boot_path = base / f"boot-{tag}.json"
        self.boot = boot
        self.boot_path.write_text(json.dumps(boot))
        super().__init__(
            f"agent-{tag}",
            [
                str(VENV_BIN / "sysvm-agent"),
                "--bootdata",
                str(self.boot_path),
                "--state-dir",
                str(self.state_dir),
            ],
            base / f"agent-{tag}.log",
            env,
        )

    def applied(self) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = json.loads((self.state_dir / "applied.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return obj


@pytest.fixture
def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYSVM_", "NOTIFY_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["SYSVM_AGENT_BACKOFF_BASE"] = "0.1"
    env["SYSVM_AGENT_BACKOFF_CAP"] = "1.0"
    env["SYSVM_LINK_RECONCILE_SECONDS"] = "0.5"
    return env


@pytest.fixture
async def cluster(
    tmp_path: Path, free_port: Callable[[], int], base_env: dict[str, str]
) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, free_port(), free_port(), base_env)
    try:
        yield c
    finally:
        await c.teardown()


class Cluster:
    """One manager (restartable) and any number of agents."""

    wait_for = staticmethod(wait_for)

    def __init__(self, base: Path, api_port: int, agent_port: int, env: dict[str, str]) -> None:
        self.base = base
        self.env = env
        self.manager = Manager(base / "home", api_port, agent_port, env)
        self.agents: list[Agent] = []

    def agent(self, boot: dict[str, Any], env: dict[str, str] | None = None) -> Agent:
        a = Agent(self.base, boot, env or self.env, str(len(self.agents)))
        self.agents.append(a)
        return a

    async def teardown(self) -> None:
        for p in [*self.agents, self.manager]:
            await p.kill()
        if os.environ.get("SYSVM_TEST_SHOW_LOGS"):
            for p in [self.manager, *self.agents]:
                sys.stderr.write(f"--- {p.name}\n{p.log()[-5000:]}\n")


def sigkill(p: Proc) -> None:
    p.signal(signal.SIGKILL)
