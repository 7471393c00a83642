"""Getting the model to the routers: render inside the change's transaction, push after
commit, wait for the router's acknowledgement.

Every change to a network (rule, IP, NIC) goes through :func:`changed` inside the same
``store.transaction()``: it renders the config of each of the network's routers from what
the transaction sees (its own writes included), refuses it if the router's own parser would
(:func:`gate`), bumps their ``desired_version`` and — only once the transaction commits —
installs the rendered configs in :data:`RUNTIME` and tells the agent link to push.

``manager.desired`` asks for a router's section synchronously (:func:`section`); it comes
from that cache, so pushes never read the database and a version V always carries every
change committed up to V (the cache is updated in commit order, before the pusher runs).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from manager.api.responses import INTERNAL_ERROR, ApiError
from manager.network import store as ns
from manager.network.model import ROUTER_DEVICES, RouterNics
from manager.network.render import render_router
from manager.network.validate import NetError
from manager.store.base import Role, SystemVm, VmState

log = logging.getLogger("sysvm.network")

DEFAULT_STATS_INTERVAL = 300.0


@dataclass
class Runtime:
    """Process-wide state of the network part (set up by :func:`manager.network.setup`)."""

    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # router id -> section
    links: Any = None  # manager.agentlink.AgentLinks (None: nothing to push to)
    apply_timeout: float = 120.0  # seconds a connected router has to acknowledge a config
    boot_timeout: float = 300.0  # seconds a started router has to connect and apply
    poll_interval: float = 0.5  # store reads while waiting for acks (acks wake at once)
    hypervisor: str | None = None  # override the zone's hypervisor for new routers


RUNTIME = Runtime()


# --- rendering -----------------------------------------------------------------------


def gate(config: Mapping[str, Any]) -> None:
    """The router role's own strict parser, run here too: a config it would refuse is a
    manager bug or a bad request, and must never be sent."""
    try:
        from agent.roles.router.config import ConfigError, parse
    except ImportError:  # pragma: no cover - the agent package ships with the manager
        return
    try:
        parse(config)
    except ConfigError as e:
        raise NetError(f"the router would refuse this configuration: {e}") from None


async def router_nics(q: ns.Reader, router_id: str) -> RouterNics:
    rows = await q.fetchall(
        "SELECT v.linklocal_ip, v.details, z.linklocal_cidr FROM system_vms v "
        "LEFT JOIN zones z ON z.id = v.zone_id WHERE v.id = ?",
        (router_id,),
    )
    if not rows:
        raise LookupError(f"no router {router_id}")
    details = rows[0]["details"]
    if isinstance(details, str):
        details = json.loads(details or "{}")
    if not isinstance(details, Mapping):
        details = {}
    nics = details.get("nics")
    # The router's record lists its devices (a Shared network's router has no public
    # one); records from before that list existed had all three.
    devices = (
        {str(k): str(v) for k, v in nics.items()}
        if isinstance(nics, Mapping) and nics
        else dict(ROUTER_DEVICES)
    )
    announce = details.get("announce")
    cidr = rows[0]["linklocal_cidr"] or "169.254.0.0/16"
    return RouterNics(
        router_id=router_id,
        control_ip=rows[0]["linklocal_ip"],
        control_prefix=ipaddress.IPv4Network(cidr, strict=False).prefixlen,
        devices=devices,
        announce=announce if isinstance(announce, int) and announce > 0 else 0,
    )


async def render_for(q: ns.Reader, router_id: str, network_id: str) -> dict[str, Any]:
    state = await ns.load_state(q, network_id)
    if state is None:
        raise LookupError(f"no network {network_id}")
    config = render_router(state, await router_nics(q, router_id), DEFAULT_STATS_INTERVAL)
    gate(config)
    return config


def stats_interval(settings: Any, zone_id: str | None) -> float:
    try:
        return float(settings.get("router.stats.interval", zone_id))
    except Exception:  # a settings object without the setting: the documented default
        return DEFAULT_STATS_INTERVAL


def section(vm: SystemVm, settings: Any) -> dict[str, Any] | None:
    """``manager.desired`` section renderer for ``router``."""
    if vm.role is not Role.ROUTER:
        return None
    config = RUNTIME.configs.get(vm.id)
    if config is None:
        return None
    return {**config, "stats": {"interval": stats_interval(settings, vm.zone_id)}}


async def changed(tx: Any, network_id: str, *, only: list[str] | None = None) -> dict[str, int]:
    """Inside the change's transaction: render, gate and bump the network's routers (or
    ``only`` these); after commit the configs are installed and pushed. Returns the new
    desired versions by router id. Raises :class:`NetError` if a router would refuse."""
    ids = only if only is not None else await ns.router_ids(tx, network_id)
    rendered = {rid: await render_for(tx, rid, network_id) for rid in ids}
    if not ids:
        return {}
    versions = await tx.bump_desired(ids)
    links = RUNTIME.links

    def install() -> None:
        RUNTIME.configs.update(rendered)
        if links is not None:
            links.desired_changed(list(ids))

    tx.on_commit(install)
    return dict(versions)


async def load_all(store: Any) -> int:
    """At start: render every live router's config from committed state."""
    routers = await ns.router_networks(store)
    live = {
        vm.id
        for vm in await store.list_system_vms(role=Role.ROUTER)
        if vm.state not in (VmState.DESTROYED, VmState.EXPUNGING)
    }
    n = 0
    for rid, nid in routers.items():
        if rid not in live:
            continue
        try:
            RUNTIME.configs[rid] = await render_for(store, rid, nid)
            n += 1
        except (LookupError, NetError) as e:
            log.error("event=router_config_unrenderable router=%s error=%s", rid, e)
    return n


# --- waiting for the router ----------------------------------------------------------


class ApplyFailed(ApiError):
    """The router refused or failed to apply its config (config_ack ok=false)."""

    def __init__(self, text: str) -> None:
        super().__init__(INTERNAL_ERROR, text)


def _failed_version(links: Any, router_id: str) -> int:
    fn = getattr(links, "failed_version", None)
    return int(fn(router_id)) if callable(fn) else 0


def _acked_version(links: Any, router_id: str) -> int:
    fn = getattr(links, "acked_version", None)
    return int(fn(router_id)) if callable(fn) else 0


async def _failure_reason(links: Any, router_id: str) -> str:
    """The agent's reason: from its config_ack, else from the role's status."""
    sessions = getattr(links, "sessions", None)
    sess = sessions.get(router_id) if isinstance(sessions, Mapping) else None
    acked_reason = getattr(sess, "failed_error", "")
    if isinstance(acked_reason, str) and acked_reason:
        return acked_reason
    try:
        res = await links.request(router_id, "status", {}, 10.0)
    except Exception as e:  # the reason is a courtesy; the failure itself is known
        return f"(reason unavailable: {type(e).__name__})"
    status = res.get("status")
    role = status.get("role") if isinstance(status, Mapping) else None
    error = role.get("error") if isinstance(role, Mapping) else None
    return str(error)[:500] if error else "(no reason reported)"


async def _raise_failed(links: Any, router_id: str, name: str, version: int) -> None:
    reason = await _failure_reason(links, router_id)
    log.warning(
        "event=router_apply_failed router=%s version=%d reason=%s",
        router_id,
        version,
        json.dumps(reason),
    )
    raise ApplyFailed(f"router {name} failed to apply the configuration: {reason}")


async def wait_applied(
    store: Any,
    versions: Mapping[str, int],
    *,
    timeout: float | None = None,  # noqa: ASYNC109 - a deadline over many polls
    require_connected: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Waits until each router acknowledged at least its version. A router that is not
    connected is skipped (its config is durable and pushed when it connects) unless
    ``require_connected``. Raises :class:`ApplyFailed` with the router's reason when it
    reports a failed apply, or an :class:`ApiError` on timeout.

    Acks wake it at once (the agent link's in-memory view, ahead of the store's group
    commit); the store is read at most every ``poll_interval`` for what only it knows (a
    router destroyed, disconnected, or acked before this call).

    ``require_connected`` (a router booting): it counts as applied only once its agent is
    connected and that session acknowledged the version (the agent's hello reports what
    it re-applied from its own disk)."""
    links = RUNTIME.links
    limit = RUNTIME.apply_timeout if timeout is None else timeout
    deadline = clock() + limit
    pending = dict(versions)
    names: dict[str, str] = {}
    next_read = clock()
    while pending:
        read_store = clock() >= next_read
        for rid, version in list(pending.items()):
            acked = _acked_version(links, rid)
            connected = links is not None and links.is_connected(rid)
            if read_store:
                vm = await store.get_system_vm(rid)
                if vm is None or vm.state in (VmState.DESTROYED, VmState.EXPUNGING):
                    pending.pop(rid)
                    continue
                names[rid] = vm.name
                if not require_connected:
                    # The stored version counts, except for a (re)boot: that version was
                    # applied by the VM's previous boot; only its new session's acks count.
                    acked = max(acked, vm.applied_version)
            if acked >= version and (connected or not require_connected):
                pending.pop(rid)
                continue
            if read_store and not connected and not require_connected:
                pending.pop(rid)
                log.info("event=router_apply_deferred router=%s version=%d", rid, version)
                continue
            if connected and _failed_version(links, rid) >= version:
                await _raise_failed(links, rid, names.get(rid, rid), version)
        if read_store:
            next_read = clock() + RUNTIME.poll_interval
        if not pending:
            return
        if clock() > deadline:
            late = ", ".join(sorted(names.get(r, r) for r in pending))
            raise ApiError(
                INTERNAL_ERROR,
                f"router(s) {late} did not acknowledge the configuration within {limit:g}s",
            )
        wait = max(0.0, min(next_read, deadline) - clock())
        waiter = getattr(links, "wait_config_acks", None)
        if callable(waiter):
            await waiter(list(pending), wait)
        else:
            await asyncio.sleep(wait)
