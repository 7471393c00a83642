"""An in-process API server on a free loopback port: real aiohttp, real SQLite store,
real settings and bootstrap. The agent link is absent (no agents in these tests), which the
API handles (agentstate "Disconnected")."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from manager.api import JOB_RUNNER, setup_api
from manager.api.jobs import JobRunner
from manager.bootstrap import ensure_initialized
from manager.metrics import Metrics
from manager.settings import Settings
from manager.store.sqlite import SqliteStore


@dataclass
class Ctx:
    home: Path
    store: SqliteStore
    settings: Settings
    clock: Callable[[], float] = time.time
    api_url: str = ""
    metrics: Metrics = field(default_factory=Metrics)
    pushed: list[list[str]] = field(default_factory=list)


@dataclass
class Api:
    url: str
    apikey: str
    secretkey: str
    ctx: Ctx
    app: web.Application

    @property
    def jobs(self) -> JobRunner:
        return self.app[JOB_RUNNER]


async def start_api(home: Path) -> tuple[Api, web.AppRunner]:
    store = await SqliteStore.open(home / "sysvm.db")
    settings = Settings(store)
    await settings.load()
    ctx = Ctx(home=home, store=store, settings=settings)
    app = web.Application()
    setup_api(app, ctx)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    ctx.api_url = f"http://{host}:{port}/client/api"
    await ensure_initialized(ctx)
    creds = json.loads((home / "credentials.json").read_text())
    return Api(ctx.api_url, creds["apikey"], creds["secretkey"], ctx, app), runner


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    server, runner = await start_api(tmp_path / "home")
    try:
        yield server
    finally:
        await runner.cleanup()
        await server.ctx.store.close()


def _cs_client(api: Api, **kw: Any) -> Any:
    from cs import CloudStack

    return CloudStack(endpoint=api.url, key=api.apikey, secret=api.secretkey, **kw)


@pytest.fixture
def cs_client() -> Callable[..., Any]:
    """``cs_client(api, **kw)`` -> a `cs.CloudStack` client for that server."""
    return _cs_client


@pytest.fixture
def api_factory() -> Callable[[Path], Awaitable[tuple[Api, web.AppRunner]]]:
    """``await api_factory(home)`` -> (Api, runner); the caller cleans up."""
    return start_api
