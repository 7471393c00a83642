"""Harness for the console proxy's manager side: a real manager (in this process: aiohttp
API on loopback, TLS agent endpoint, SQLite store, the console service with its loops), real
``sysvm-agent`` processes with role ``consoleproxy`` on the External hypervisor (boot data
from ``create-external-vms``), real QEMU guests deployed through the API with ``cs``.

The manager runs in-process (not as ``sysvm-manager``) so the test can set the service's
clock (token expiry) and hand it a lifecycle that boots External CPVM agents; everything on
the wire is real.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from manager.app import build_app, make_config, open_context
from manager.bootstrap import ensure_initialized
from manager.consoleproxy import runtime
from manager.context import ManagerContext
from manager.main import create_external_vms
from manager.store.base import Role, VmState

TIMING = float(os.environ.get("SYSVM_TEST_TIMING", "1"))
VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[3]
NOVNC_DIR = REPO / "node_modules" / "@novnc" / "novnc"


async def wait_for(
    cond: Callable[[], Any] | Callable[[], Awaitable[Any]], timeout: float, what: str
) -> Any:
    """Polls ``cond`` until truthy; fails naming ``what`` after ``timeout`` (scaled)."""
    deadline = time.monotonic() + timeout * TIMING
    last: Any = None
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        last = value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last={last!r})")
        await asyncio.sleep(0.05)


@dataclass
class Clock:
    """The console service's clock: wall time plus an offset a test may move forward."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class AgentProc:
    """One ``sysvm-agent`` process (role consoleproxy); stderr to a file; always killed."""

    def __init__(self, base: Path, boot: dict[str, Any], port: int, env: dict[str, str]) -> None:
        self.vm_id = str(boot["vm_id"])
        self.port = port
        boot = dict(boot)
        extra = {"listen_host": "127.0.0.1", "listen_port": port}
        if NOVNC_DIR.is_dir():
            extra["novnc_dir"] = str(NOVNC_DIR)
        boot["extra"] = {**(boot.get("extra") or {}), **extra}
        tag = self.vm_id[:8]
        self.boot_path = base / f"boot-{tag}.json"
        fd = os.open(self.boot_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(boot, f)
        self.state_dir = base / f"agent-{tag}"
        self.log_path = base / f"agent-{tag}.log"
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as f:
            self.proc = await asyncio.create_subprocess_exec(
                str(VENV_BIN / "sysvm-agent"),
                "--bootdata",
                str(self.boot_path),
                "--state-dir",
                str(self.state_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=f,
                stderr=f,
                env=self.env,
            )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)


@dataclass
class Manager:
    ctx: ManagerContext
    svc: runtime.ConsoleRuntime
    api_url: str
    apikey: str
    secretkey: str
    clock: Clock
    base: Path
    free_port: Callable[[], int]
    env: dict[str, str]
    runner: web.AppRunner
    agents: dict[str, AgentProc] = field(default_factory=dict)

    def cs(self) -> Any:
        from cs import CloudStack

        return CloudStack(endpoint=self.api_url, key=self.apikey, secret=self.secretkey, timeout=30)

    async def call(self, command: str, **params: Any) -> Any:
        """One API call through the ``cs`` client (blocking, so in a thread). Async commands
        are polled to their result."""
        client = self.cs()
        fn = getattr(client, command)
        return await asyncio.to_thread(fn, fetch_result=True, **params)

    async def set(self, name: str, value: str) -> None:
        async with self.ctx.store.transaction() as tx:
            await self.ctx.settings.update(tx, name, value)

    async def new_proxy(self) -> AgentProc:
        """Creates a CPVM record on the External hypervisor and boots its agent."""
        out = self.base / f"boot-{time.monotonic_ns()}.jsonl"
        cfg = make_config(
            {},
            home=str(self.ctx.home),
            agent_listen=f"127.0.0.1:{self.ctx.links.port}",
        )
        await create_external_vms(cfg, Role.CONSOLE_PROXY, 1, out, None)
        [boot] = [json.loads(line) for line in out.read_text().splitlines()]
        agent = AgentProc(self.base, boot, self.free_port(), self.env)
        self.agents[agent.vm_id] = agent
        await agent.start()
        await wait_for(
            lambda: self.ctx.links.is_connected(agent.vm_id) and self._listening(agent.vm_id),
            30,
            f"agent {agent.vm_id} connected and listening\n{agent.log()[-2000:]}",
        )
        return agent

    def _listening(self, vm_id: str) -> bool:
        status = self.ctx.links.status(vm_id) or {}
        role = status.get("role") or {}
        return bool(role.get("listening"))

    async def stop_proxy(self, vm_id: str) -> None:
        agent = self.agents.get(vm_id)
        if agent is not None:
            await agent.kill()
        async with self.ctx.store.transaction() as tx:
            await tx.update_system_vm(vm_id, state=VmState.STOPPED)


class ExternalLifecycle:
    """The scaler's :class:`~manager.consoleproxy.runtime.ProxyLifecycle` for this test: the
    External hypervisor means "someone else boots the VM" — here, the test harness boots a
    real agent process (the hypervisor engineer's lifecycle is not part of this test)."""

    def __init__(self) -> None:
        self.manager: Manager | None = None
        self.started: list[str] = []
        self.stopped: list[str] = []

    async def start_proxy(self, zone_id: str) -> str:
        assert self.manager is not None
        agent = await self.manager.new_proxy()
        self.started.append(agent.vm_id)
        return agent.vm_id

    async def stop_proxy(self, vm_id: str) -> None:
        assert self.manager is not None
        await self.manager.stop_proxy(vm_id)
        self.stopped.append(vm_id)


@pytest.fixture
def agent_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYSVM_", "NOTIFY_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["SYSVM_AGENT_BACKOFF_BASE"] = "0.1"
    env["SYSVM_AGENT_BACKOFF_CAP"] = "1.0"
    return env


@pytest.fixture
def lifecycle() -> ExternalLifecycle:
    return ExternalLifecycle()


@pytest.fixture
async def manager(
    tmp_path: Path,
    free_port: Callable[[], int],
    agent_env: dict[str, str],
    lifecycle: ExternalLifecycle,
) -> AsyncIterator[Manager]:
    cfg = make_config(
        {},
        home=str(tmp_path / "home"),
        api_listen=f"127.0.0.1:{free_port()}",
        agent_listen=f"127.0.0.1:{free_port()}",
    )
    ctx = await open_context(cfg)
    clock = Clock()
    runner: web.AppRunner | None = None
    svc: runtime.ConsoleRuntime | None = None
    m: Manager | None = None
    try:
        await ensure_initialized(ctx)
        app = build_app(ctx)
        svc = await runtime.setup(ctx, lifecycle=lifecycle, clock=clock)
        await ctx.links.start(*cfg.agent_listen)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, *cfg.api_listen).start()
        svc.start()
        creds = json.loads((cfg.home / "credentials.json").read_text())
        m = Manager(
            ctx=ctx,
            svc=svc,
            api_url=ctx.api_url,
            apikey=creds["apikey"],
            secretkey=creds["secretkey"],
            clock=clock,
            base=tmp_path,
            free_port=free_port,
            env=agent_env,
            runner=runner,
        )
        lifecycle.manager = m
        yield m
    finally:
        if m is not None:
            for agent in m.agents.values():
                await agent.kill()
            if os.environ.get("SYSVM_TEST_SHOW_LOGS"):
                for agent in m.agents.values():
                    sys.stderr.write(f"--- agent {agent.vm_id}\n{agent.log()[-4000:]}\n")
        if svc is not None:
            await svc.stop()
        await ctx.links.close("test over")
        if runner is not None:
            await runner.cleanup()
        await ctx.store.close()
