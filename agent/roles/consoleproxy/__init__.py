"""The console proxy role (CPVM): serves the console page and relays browser websockets to
the hypervisors' VNC ports, authenticating to VNC itself (the browser never sees the VNC
password). See :mod:`agent.roles.consoleproxy.server` for the data path.

Config (the VM's desired config, section ``consoleproxy``; all optional)::

    {"listen_host": "0.0.0.0", "listen_port": 80, "novnc_dir": "/usr/share/sysvm/novnc",
     "allowed_origins": ["https://cloud.example.com"], "allow_same_origin": true,
     "handshake_timeout": 10, "idle_timeout": 900, "max_session": 28800,
     "max_sessions": 500, "max_per_ip": 20, "draining": false,
     "tls": {"cert": "<PEM chain>", "key": "<PEM key>"}}

plus from ``settings``: ``consoleproxy.loadscan.interval``, ``consoleproxy.session.max``,
``consoleproxy.sslEnabled``. Boot data ``extra`` may set the same keys (defaults for this
VM). ``SYSVM_NOVNC_DIR`` overrides the noVNC location (tests point it at
``node_modules/@novnc/novnc``).

With ``tls`` the listener speaks HTTPS/WSS (``consoleproxy.sslEnabled`` true without a
certificate is refused). A new certificate on the same listener is loaded in place: new
connections get it, live sessions are not dropped (CloudStack recreates every CPVM).

Each browser connection's token is authorised by the manager request
``console.authorize`` ``{"token", "vm_id", "client", "origin", "proxy_vm_id"}`` → ``{"vm_id",
"host", "port", "password", "resume_token"}`` (refusal: ``RequestFailed``). Session reports
go out as the event ``console.sessions`` (see :mod:`manager.consoleproxy.load`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.roles.base import ApplyError, LinkDown, RequestFailed, Role, RoleContext
from agent.roles.consoleproxy import tls
from agent.roles.consoleproxy.server import (
    Authorizer,
    AuthRequest,
    ConfigError,
    ConsoleServer,
    ProxyConfig,
    Refused,
    Target,
    config_from,
    target_from_reply,
)

__all__ = [
    "AuthRequest",
    "Authorizer",
    "ConsoleProxyRole",
    "ProxyConfig",
    "Refused",
    "Target",
    "create",
    "manager_authorizer",
]

log = logging.getLogger("sysvm.consoleproxy")

# Refusal codes from manager.consoleproxy.tokens.ConsoleRefused -> HTTP status.
_REFUSAL_STATUS = {"bad_request": 400, "vm_gone": 404}


def manager_authorizer(ctx: RoleContext) -> Authorizer:
    async def authorize(req: AuthRequest) -> Target:
        params = {
            "token": req.token,
            "vm_id": req.vm_id,
            "client": req.client,
            "origin": req.origin,
            "proxy_vm_id": ctx.vm_id,
        }
        try:
            reply = await ctx.request("console.authorize", params)
        except RequestFailed as e:
            code = e.error.split(":", 1)[0].strip()
            reason = e.error.split(":", 1)[1].strip() if ":" in e.error else e.error
            raise Refused(_REFUSAL_STATUS.get(code, 403), reason) from e
        except LinkDown as e:
            raise Refused(503, "console proxy cannot reach the manager; try again") from e
        return target_from_reply(reply)

    return authorize


def base_config(ctx: RoleContext) -> ProxyConfig:
    cfg = ProxyConfig()
    env_dir = os.environ.get("SYSVM_NOVNC_DIR")
    if env_dir:
        cfg = replace(cfg, novnc_dir=Path(env_dir))
    try:
        return config_from({"consoleproxy": dict(ctx.extra)}, cfg)
    except ConfigError as e:
        log.error("event=bad_bootdata_extra error=%r", str(e))
        return cfg


class ConsoleProxyRole:
    def __init__(self, ctx: RoleContext, authorizer: Authorizer | None = None) -> None:
        self.ctx = ctx
        self.authorizer = authorizer or manager_authorizer(ctx)
        self.base = base_config(ctx)
        self.server: ConsoleServer | None = None

    async def start(self, applied: Mapping[str, Any] | None) -> None:
        await self.apply(applied or {})

    async def apply(self, config: Mapping[str, Any]) -> None:
        try:
            cfg = config_from(dict(config), self.base)
        except ConfigError as e:
            raise ApplyError(f"consoleproxy: {e}") from e
        old = self.server
        same_listener = old is not None and (old.cfg.host, old.cfg.port) == (cfg.host, cfg.port)
        if old is not None and same_listener and bool(old.cfg.tls_cert) == bool(cfg.tls_cert):
            if cfg.tls_cert and (cfg.tls_cert, cfg.tls_key) != (old.cfg.tls_cert, old.cfg.tls_key):
                assert old.ssl_context is not None
                # New certificate for new connections; live sessions keep going.
                await self._load_tls(old.ssl_context, cfg)
                log.info("event=tls_reloaded")
            old.cfg = cfg  # timeouts, caps, origins, draining: take effect at once
            return
        ssl_context = None
        if cfg.tls_cert:
            ssl_context = tls.server_context()
            await self._load_tls(ssl_context, cfg)
        if old is not None:
            await old.stop()
            self.server = None
        new = ConsoleServer(cfg, self.authorizer, self.ctx.notify, ssl_context)
        try:
            await new.start()
        except OSError as e:
            await new.stop()
            if old is not None:  # roll back to the previous listener
                back = ConsoleServer(old.cfg, self.authorizer, self.ctx.notify, old.ssl_context)
                await back.start()
                self.server = back
            raise ApplyError(f"consoleproxy: cannot listen on {cfg.host}:{cfg.port}: {e}") from e
        self.server = new

    async def _load_tls(self, context: ssl.SSLContext, cfg: ProxyConfig) -> None:
        try:
            await asyncio.to_thread(
                tls.load_chain, context, self.ctx.state_dir, cfg.tls_cert, cfg.tls_key
            )
        except tls.TlsError as e:
            raise ApplyError(f"consoleproxy: {e}") from e

    def status(self) -> dict[str, Any]:
        if self.server is None:
            return {"listening": None, "sessions": 0}
        return self.server.status()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None


def create(ctx: RoleContext) -> Role:
    return ConsoleProxyRole(ctx)
