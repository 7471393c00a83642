"""Shared helpers of the network commands (``network``, ``net_rules``): lookups that answer
CloudStack's 431 for unknown ids, views in CloudStack's response shapes, and the async job
that waits for the routers' acknowledgement."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from manager.api.dispatch import Call
from manager.api.responses import ApiError, AsyncResult, fmt_date, param_error
from manager.network import store as ns
from manager.network.model import Network, NetworkOffering, PublicIp
from manager.network.runtime import wait_applied
from manager.network.validate import NetError

ROOT_DOMAIN = "ROOT"


def net_error(e: NetError) -> Exception:
    return param_error(str(e))


async def network_or_431(call: Call, network_id: str, what: str = "networkid") -> Network:
    net = await ns.get_network(call.ctx.store, network_id)
    if net is None:
        raise param_error(f"Unable to find network with the specified {what} {network_id}")
    return net


async def public_ip_or_431(call: Call, ip_id: str, what: str = "ipaddressid") -> PublicIp:
    ip = await ns.get_public_ip(call.ctx.store, ip_id)
    if ip is None:
        raise param_error(f"Unable to find public IP address with the specified {what} {ip_id}")
    return ip


async def zone_names(call: Call) -> dict[str, str]:
    return {z.id: z.name for z in await call.ctx.store.list_zones()}


async def guest_names(call: Call) -> dict[str, tuple[str, str]]:
    """Guest VM id → (name, display name), from the guest VM table if it exists."""
    try:
        rows = await call.ctx.store.fetchall("SELECT id, name, display_name FROM guest_vms")
    except Exception:  # the guest VM part is optional
        return {}
    return {r["id"]: (r["name"], r["display_name"]) for r in rows}


def owner(call: Call) -> dict[str, Any]:
    u = call.user
    return {"account": u.account_name, "domainid": u.domain_id, "domain": ROOT_DOMAIN}


def service_view(o: NetworkOffering) -> list[dict[str, Any]]:
    return [
        {"name": s, "provider": [{"name": "VirtualRouter"}], "capability": []} for s in o.services
    ]


def cidrlist(cidrs: tuple[str, ...]) -> str:
    return ",".join(cidrs) if cidrs else "0.0.0.0/0"


def created(ts: float) -> str | None:
    return fmt_date(ts)


async def submit_apply(
    call: Call,
    command: str,
    versions: Mapping[str, int],
    result: Callable[[], Awaitable[Mapping[str, Any]]],
    *,
    instance_type: str,
    instance_id: str,
    on_failure: Callable[[], Awaitable[None]] | None = None,
    tx: Any = None,
) -> AsyncResult:
    """The async part of a rule change: wait for the routers to apply it; if one reports
    a failure, run ``on_failure`` (undo) and fail the job with the router's reason. Called
    inside the change's transaction (``tx``), the job commits with the change."""
    store = call.ctx.store

    async def work() -> Mapping[str, Any]:
        try:
            await wait_applied(store, versions)
        except ApiError as e:
            if on_failure is None:
                raise
            await on_failure()
            raise ApiError(e.errorcode, f"{e.text} (the change was undone)") from None
        return await result()

    job_id = await call.jobs.submit(
        call.ctx, command, call.user.account_id, work, instance_type, instance_id, tx=tx
    )
    return AsyncResult(job_id, id=instance_id)
