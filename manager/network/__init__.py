"""Guest networks and their virtual routers, manager side (issue 5).

Modules: ``model`` (records), ``validate`` (pure checks → 431), ``ipam`` (pure address
allocation), ``render`` (pure: model → ``config["router"]``), ``store`` (tables of
``sql/100_network.sql``, inside the main store's transactions), ``runtime`` (render in the
change's transaction, push after commit, wait for the router's ack), ``routers`` (router
lifecycle), ``guests`` (guest VM NICs: ``add_guest_nic`` / ``remove_guest_nic``),
``stats`` (``router.stats`` deltas, counted once). API commands are in
``manager/api/commands/net_*.py``.

:func:`setup` is what ``manager.app`` calls once the store is open: default offerings on
first start, the ``router`` section of desired configs, the ``router.stats`` agent method,
and the cache of every live router's config. It starts no task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from manager.network import store as ns
from manager.network.model import (
    DEFAULT_ISOLATED_OFFERING,
    DEFAULT_ROUTER_OFFERING,
    DEFAULT_SHARED_OFFERING,
    ISOLATED,
    SERVICES,
    SHARED,
    NetworkOffering,
    RouterOffering,
)
from manager.network.runtime import RUNTIME, load_all, section
from manager.network.stats import parse_batches, record

log = logging.getLogger("sysvm.network")

STATS_METHOD = "router.stats"

__all__ = ["RUNTIME", "STATS_METHOD", "ensure_defaults", "setup", "stats_handler"]


async def ensure_defaults(store: Any, now: float | None = None) -> int:
    """CloudStack's default offerings, created once (idempotent). Returns how many new."""
    t = time.time() if now is None else now
    async with store.transaction() as tx:
        have = {o.name for o in await ns.list_offerings(tx)}
        created = 0
        defaults = (
            NetworkOffering(
                id=ns.new_id(),
                name=DEFAULT_ISOLATED_OFFERING,
                display_text="Offering for Isolated networks with Source Nat service enabled",
                guest_ip_type=ISOLATED,
                services=SERVICES,
                egress_default_allow=True,
                specify_ip_ranges=False,
                is_default=True,
                state="Enabled",
                created=t,
            ),
            NetworkOffering(
                id=ns.new_id(),
                name=DEFAULT_SHARED_OFFERING,
                display_text="Offering for Shared networks",
                guest_ip_type=SHARED,
                services=("Dhcp", "Dns", "UserData"),
                egress_default_allow=True,
                specify_ip_ranges=True,
                is_default=True,
                state="Enabled",
                created=t + 1e-3,
            ),
        )
        for o in defaults:
            if o.name not in have:
                await ns.add_offering(tx, o)
                created += 1
        if not await ns.list_router_offerings(tx):
            await ns.add_router_offering(
                tx,
                RouterOffering(
                    id=ns.new_id(),
                    name=DEFAULT_ROUTER_OFFERING,
                    display_text="Offering for the virtual router: 1 vCPU, 512 MB",
                    cpu_number=1,
                    cpu_speed=500,
                    memory_mb=512,
                    is_default=True,
                    created=t,
                ),
            )
            created += 1
    if created:
        log.info("event=network_defaults_created count=%d", created)
    return created


def stats_handler(ctx: Any) -> Any:
    async def handle(vm_id: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
        batches = parse_batches(params)
        async with ctx.store.transaction() as tx:
            network_id = await ns.network_of_router(tx, vm_id)
            acked, new = await record(tx, vm_id, network_id, batches, ctx.clock())
        if new:
            log.info(
                "event=router_stats router=%s network=%s batches=%d new=%d",
                vm_id,
                network_id,
                len(batches),
                new,
            )
        return {"acked": acked}

    return handle


async def setup(ctx: Any) -> None:
    """Wires the network part into a running manager (see the module docstring)."""
    from manager.desired import register_section

    await ensure_defaults(ctx.store, ctx.clock())
    RUNTIME.links = getattr(ctx, "links", None)
    n = await load_all(ctx.store)
    register_section("router", section)
    if RUNTIME.links is not None:
        RUNTIME.links.register_method(STATS_METHOD, stats_handler(ctx))
    log.info("event=network_ready routers=%d", n)
