"""Wires the manager together: store, settings, PKI, agent endpoint, HTTP API, metrics,
systemd notifications, and a graceful stop.

:func:`run` is the daemon (``sysvm-manager`` with no subcommand). Order on start: PKI, store,
settings, bootstrap (first start), agent endpoint, API listener, ``READY=1``. On SIGTERM /
SIGINT: ``STOPPING=1``, every agent gets ``going_away`` and a 1001 close, the API listener
and store close, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from manager.agentlink import AgentLinks
from manager.context import ManagerContext
from manager.demo import ensure_demo_guest
from manager.metrics import LoopLagMonitor, Metrics
from manager.pki import Pki
from manager.settings import Settings
from manager.store import open_store
from manager.systemd import Notifier

log = logging.getLogger("sysvm.manager")

CTX = web.AppKey("sysvm_ctx", ManagerContext)

DEFAULT_HOME = "/var/lib/sysvm"
DEFAULT_API_LISTEN = "127.0.0.1:8080"
DEFAULT_AGENT_LISTEN = "0.0.0.0:8250"


@dataclass(frozen=True)
class DaemonConfig:
    home: Path
    api_listen: tuple[str, int]
    agent_listen: tuple[str, int]
    agent_urls: tuple[str, ...]


class ConfigError(ValueError):
    pass


def parse_listen(text: str, what: str) -> tuple[str, int]:
    """Pure: ``host:port`` / ``[v6]:port`` -> (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected host:port, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def default_agent_urls(agent_listen: tuple[str, int]) -> tuple[str, ...]:
    """Pure: what VMs are told when ``SYSVM_AGENT_URLS`` is unset (a wildcard listener is
    advertised as loopback, which is only right for tests and single-host setups)."""
    host, port = agent_listen
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return (f"wss://{host}:{port}",)


def parse_agent_urls(text: str) -> tuple[str, ...]:
    urls = tuple(u.strip().rstrip("/") for u in text.split(",") if u.strip())
    for u in urls:
        parts = urlsplit(u)
        if parts.scheme != "wss" or not parts.hostname or parts.port is None:
            raise ConfigError(f"SYSVM_AGENT_URLS: {u!r} is not wss://host:port")
    return urls


def make_config(
    env: dict[str, str] | os._Environ[str],
    home: str | None = None,
    api_listen: str | None = None,
    agent_listen: str | None = None,
    agent_urls: str | None = None,
) -> DaemonConfig:
    """Pure: flags win over environment, environment over defaults."""
    agent = parse_listen(
        agent_listen or env.get("SYSVM_AGENT_LISTEN", DEFAULT_AGENT_LISTEN), "agent listen"
    )
    urls_text = agent_urls or env.get("SYSVM_AGENT_URLS", "")
    return DaemonConfig(
        home=Path(home or env.get("SYSVM_HOME", DEFAULT_HOME)),
        api_listen=parse_listen(
            api_listen or env.get("SYSVM_API_LISTEN", DEFAULT_API_LISTEN), "api listen"
        ),
        agent_listen=agent,
        agent_urls=parse_agent_urls(urls_text) if urls_text else default_agent_urls(agent),
    )


def api_url(listen: tuple[str, int]) -> str:
    host, port = listen
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/client/api"


def lifecycle_enabled(env: dict[str, str] | os._Environ[str]) -> bool:
    """Pure: the lifecycle loop (keep each zone's CPVM and SSVM running) is on when
    ``SYSVM_LIFECYCLE`` is ``on``/``1``/``true``. ``scripts/run`` turns it on; test managers
    leave it off so they do not boot system VMs nobody asked for."""
    return env.get("SYSVM_LIFECYCLE", "").strip().lower() in ("on", "1", "true", "yes")


def lifecycle_interval(env: dict[str, str] | os._Environ[str]) -> float:
    """Pure: seconds between lifecycle passes (``SYSVM_LIFECYCLE_INTERVAL``, default 10)."""
    try:
        return max(0.5, float(env.get("SYSVM_LIFECYCLE_INTERVAL", "") or 10.0))
    except ValueError:
        raise ConfigError(
            f"SYSVM_LIFECYCLE_INTERVAL: expected seconds, got {env['SYSVM_LIFECYCLE_INTERVAL']!r}"
        ) from None


def _optional(module: str) -> bool:
    """True if a part owned by someone else is present (the tree is built in parallel)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


async def open_context(cfg: DaemonConfig) -> ManagerContext:
    home = cfg.home
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    names = [urlsplit(u).hostname or "" for u in cfg.agent_urls] + [cfg.agent_listen[0]]
    pki = Pki.open(home, server_names=names)
    store = await open_store(home)
    settings = Settings(store)
    await settings.load()
    metrics = Metrics()
    links = AgentLinks(store=store, settings=settings, metrics=metrics, pki=pki)
    reconcile = os.environ.get("SYSVM_LINK_RECONCILE_SECONDS", "")
    if reconcile:
        links.config.reconcile_interval = max(0.1, float(reconcile))
    ctx = ManagerContext(
        home=home,
        store=store,
        settings=settings,
        metrics=metrics,
        links=links,
        pki=pki,
        agent_urls=list(cfg.agent_urls),
        api_url=api_url(cfg.api_listen),
    )
    ctx.hypervisors.update(await _load_hypervisors(ctx))
    return ctx


async def _load_hypervisors(ctx: ManagerContext) -> dict[str, Any]:
    """Drivers, if the hypervisor package provides ``load_drivers(ctx)``."""
    if not _optional("manager.hypervisor"):
        return {}
    mod = importlib.import_module("manager.hypervisor")
    loader = getattr(mod, "load_drivers", None)
    if loader is None:
        return {}
    drivers = loader(ctx)
    if asyncio.iscoroutine(drivers):
        drivers = await drivers
    return dict(drivers)


def build_app(ctx: ManagerContext) -> web.Application:
    app = web.Application(client_max_size=2 * 1024 * 1024)
    app[CTX] = ctx

    async def metrics_handler(_request: web.Request) -> web.Response:
        return web.Response(text=ctx.metrics.render(), content_type="text/plain", charset="utf-8")

    app.router.add_get("/metrics", metrics_handler)
    if _optional("manager.api"):
        from manager.api import setup_api  # the API engineer's part; wires desired_changed

        setup_api(app, ctx)
    else:  # pragma: no cover - only while the tree is being assembled
        log.warning("event=api_missing detail=manager.api.setup_api not present")
        ctx.settings.on_desired_changed(ctx.links.desired_changed)
    return app


async def run(cfg: DaemonConfig, stop: asyncio.Event | None = None) -> int:
    """The daemon. Returns the exit code."""
    notifier = Notifier()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ctx = await open_context(cfg)
    runner: web.AppRunner | None = None
    background: set[asyncio.Task[None]] = set()
    console: Any = None
    lifecycle: Any = None
    try:
        if _optional("manager.bootstrap"):
            from manager.bootstrap import ensure_initialized

            await ensure_initialized(ctx)
        from manager import network
        from manager.consoleproxy.runtime import setup as console_setup
        from manager.templates import setup as templates_setup

        await network.setup(ctx)
        await templates_setup(ctx)  # the built image becomes the default system template
        console = await console_setup(ctx)
        app = build_app(ctx)
        await ctx.links.start(*cfg.agent_listen)
        console.start()
        if lifecycle_enabled(os.environ):
            from manager.hypervisor.lifecycle import LifecycleLoop

            lifecycle = LifecycleLoop(ctx, interval=lifecycle_interval(os.environ))
            lifecycle.start()
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, cfg.api_listen[0], cfg.api_listen[1], backlog=512)
        await site.start()
        lag = LoopLagMonitor(ctx.metrics)
        jobs: list[Callable[[], Coroutine[Any, Any, None]]] = [lag.run, notifier.run_watchdog]
        jobs.append(lambda: ensure_demo_guest(ctx))  # only acts with SYSVM_DEMO_GUEST=on
        for fn in jobs:
            background.add(asyncio.create_task(fn()))
        notifier.ready(status="serving")
        log.info(
            "event=manager_ready api=%s:%d agent=%s:%d agent_urls=%s home=%s pid=%d",
            *cfg.api_listen,
            cfg.agent_listen[0],
            ctx.links.port,
            ",".join(cfg.agent_urls),
            cfg.home,
            os.getpid(),
        )
        await stop.wait()
        log.info("event=manager_stopping")
        notifier.stopping()
    finally:
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if lifecycle is not None:
            await lifecycle.close()
        if console is not None:
            await console.stop()
        with contextlib.suppress(Exception):
            await ctx.links.close("manager stopping")
        if runner is not None:
            await runner.cleanup()
        for driver in ctx.hypervisors.values():
            try:
                await driver.close()
            except Exception:  # one failing driver must not keep the others' VMs running
                log.exception("event=driver_close_failed driver=%s", type(driver).__name__)
        await ctx.store.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("event=manager_stopped")
    return 0
