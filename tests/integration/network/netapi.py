"""Helpers of the network integration tests: an in-process manager API with the network
part wired in: real aiohttp on a free
loopback port, real SQLite store, settings, bootstrap and ``manager.network.setup``.

``RUNTIME`` (the network part's process-wide state) is reset around every test.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from manager import network
from manager.api import setup_api
from manager.bootstrap import ensure_initialized
from manager.desired import SECTION_RENDERERS
from manager.metrics import Metrics
from manager.network.runtime import RUNTIME
from manager.settings import Settings
from manager.store.sqlite import SqliteStore

TIMING = float(os.environ.get("SYSVM_TEST_TIMING", "1"))


@dataclass
class Ctx:
    home: Path
    store: SqliteStore
    settings: Settings
    clock: Callable[[], float] = time.time
    api_url: str = ""
    metrics: Metrics = field(default_factory=Metrics)
    links: Any = None
    agent_urls: list[str] = field(default_factory=list)
    pki: Any = None
    hypervisors: dict[str, Any] = field(default_factory=dict)


@dataclass
class Api:
    url: str
    apikey: str
    secretkey: str
    ctx: Ctx
    app: web.Application

    def cs(self) -> Any:
        from cs import CloudStack

        return CloudStack(endpoint=self.url, key=self.apikey, secret=self.secretkey)

    async def call(self, command: str, **params: Any) -> Any:
        """One API call through the `cs` client (in a thread: it is synchronous)."""
        return await asyncio.to_thread(getattr(self.cs(), command), **params)

    async def job(self, command: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        """An async command, then queryAsyncJobResult until it finishes."""
        started = await self.call(command, **params)
        job_id = started["jobid"]
        deadline = time.monotonic() + timeout * TIMING
        while True:
            res: dict[str, Any] = await self.call("queryAsyncJobResult", jobid=job_id)
            if res["jobstatus"] != 0:
                return res
            if time.monotonic() > deadline:
                raise AssertionError(f"job {command} {job_id} still pending after {timeout}s")
            await asyncio.sleep(0.05)


def reset_runtime() -> None:
    RUNTIME.configs.clear()
    RUNTIME.links = None
    RUNTIME.apply_timeout = 20.0 * TIMING
    RUNTIME.boot_timeout = 1.0
    RUNTIME.hypervisor = "External"  # nothing boots routers here; tests play their agents
    SECTION_RENDERERS.pop("router", None)


async def start(home: Path, links: Any = None) -> tuple[Api, web.AppRunner]:
    store = await SqliteStore.open(home / "sysvm.db")
    settings = Settings(store)
    await settings.load()
    ctx = Ctx(home=home, store=store, settings=settings, links=links)
    app = web.Application()
    setup_api(app, ctx)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    ctx.api_url = f"http://{host}:{port}/client/api"
    await ensure_initialized(ctx)
    await network.setup(ctx)
    RUNTIME.hypervisor = "External"
    creds = json.loads((home / "credentials.json").read_text())
    return Api(ctx.api_url, creds["apikey"], creds["secretkey"], ctx, app), runner
