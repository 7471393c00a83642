"""Infrastructure: listZones, listPods, listClusters, listHosts."""

from __future__ import annotations

from typing import Any

from manager.api.dispatch import Call, Param, PType, api_command, keyword_match
from manager.api.responses import ListResult, fmt_date
from manager.store.base import Cluster, Host, Pod, Zone


def zone_view(z: Zone) -> dict[str, Any]:
    return {
        "id": z.id,
        "name": z.name,
        "networktype": z.network_type,
        "allocationstate": z.allocation_state,
        "dns1": z.dns1,
        "internaldns1": z.internal_dns1,
        "guestcidraddress": z.guest_cidr,
        "securitygroupsenabled": False,
        "localstorageenabled": False,
        "type": "Core",
        "tags": [],
        "hasannotations": False,
    }


def pod_view(p: Pod, zone_names: dict[str, str]) -> dict[str, Any]:
    return {
        "id": p.id,
        "name": p.name,
        "zoneid": p.zone_id,
        "zonename": zone_names.get(p.zone_id, ""),
        "gateway": p.gateway,
        "netmask": p.netmask,
        "startip": [p.start_ip],
        "endip": [p.end_ip],
        "allocationstate": "Enabled",
        "hasannotations": False,
    }


def cluster_view(
    c: Cluster, zone_names: dict[str, str], pod_names: dict[str, str]
) -> dict[str, Any]:
    return {
        "id": c.id,
        "name": c.name,
        "podid": c.pod_id,
        "podname": pod_names.get(c.pod_id, ""),
        "zoneid": c.zone_id,
        "zonename": zone_names.get(c.zone_id, ""),
        "hypervisortype": c.hypervisor,
        "clustertype": "CloudManaged",
        "allocationstate": "Enabled",
        "managedstate": "Managed",
        "hasannotations": False,
    }


def host_view(
    h: Host, zone_names: dict[str, str], pod_names: dict[str, str], cluster_names: dict[str, str]
) -> dict[str, Any]:
    return {
        "id": h.id,
        "name": h.name,
        "state": h.state,
        "type": h.type,
        "ipaddress": h.ip_address,
        "zoneid": h.zone_id,
        "zonename": zone_names.get(h.zone_id, ""),
        "podid": h.pod_id,
        "podname": pod_names.get(h.pod_id, ""),
        "clusterid": h.cluster_id,
        "clustername": cluster_names.get(h.cluster_id, ""),
        "hypervisor": h.hypervisor,
        "resourcestate": "Enabled",
        "created": fmt_date(h.created),
        "hasannotations": False,
    }


async def names(call: Call) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    store = call.ctx.store
    zones = {z.id: z.name for z in await store.list_zones()}
    pods = {p.id: p.name for p in await store.list_pods()}
    clusters = {c.id: c.name for c in await store.list_clusters()}
    return zones, pods, clusters


@api_command(
    "listZones",
    "Lists zones",
    params=(
        Param("id", PType.UUID, description="the ID of the zone"),
        Param("name", description="the name of the zone"),
        Param("networktype", description="the network type of the zone"),
        Param("available", PType.BOOLEAN, description="true for zones the caller may use"),
        Param("showcapacities", PType.BOOLEAN, description="accepted, capacities not shown"),
    ),
    listing=True,
    response_fields=("id", "name", "networktype", "allocationstate", "dns1", "internaldns1"),
)
async def list_zones(call: Call) -> ListResult:
    a = call.args
    out = [
        zone_view(z)
        for z in await call.ctx.store.list_zones()
        if a.get("id") in (None, z.id)
        and a.get("name") in (None, z.name)
        and (a.get("networktype") is None or a["networktype"].lower() == z.network_type.lower())
        and keyword_match(a.get("keyword"), z.name)
    ]
    return ListResult("zone", out)


@api_command(
    "listPods",
    "Lists all pods",
    params=(
        Param("id", PType.UUID, description="the ID of the pod"),
        Param("name", description="the name of the pod"),
        Param("zoneid", PType.UUID, description="the zone ID"),
        Param("allocationstate", description="list pods by allocation state"),
    ),
    listing=True,
    response_fields=("id", "name", "zoneid", "zonename", "gateway", "netmask"),
    admin=True,
)
async def list_pods(call: Call) -> ListResult:
    a = call.args
    zones, _, _ = await names(call)
    out = [
        pod_view(p, zones)
        for p in await call.ctx.store.list_pods(a.get("zoneid"))
        if a.get("id") in (None, p.id)
        and a.get("name") in (None, p.name)
        and a.get("allocationstate", "Enabled").lower() == "enabled"
        and keyword_match(a.get("keyword"), p.name)
    ]
    return ListResult("pod", out)


@api_command(
    "listClusters",
    "Lists clusters",
    params=(
        Param("id", PType.UUID, description="the ID of the cluster"),
        Param("name", description="the name of the cluster"),
        Param("zoneid", PType.UUID, description="the zone ID"),
        Param("podid", PType.UUID, description="the pod ID"),
        Param("hypervisor", description="hypervisor type of the clusters"),
    ),
    listing=True,
    response_fields=("id", "name", "podid", "zoneid", "hypervisortype"),
    admin=True,
)
async def list_clusters(call: Call) -> ListResult:
    a = call.args
    zones, pods, _ = await names(call)
    out = [
        cluster_view(c, zones, pods)
        for c in await call.ctx.store.list_clusters(a.get("zoneid"))
        if a.get("id") in (None, c.id)
        and a.get("name") in (None, c.name)
        and a.get("podid") in (None, c.pod_id)
        and (a.get("hypervisor") is None or a["hypervisor"].lower() == c.hypervisor.lower())
        and keyword_match(a.get("keyword"), c.name)
    ]
    return ListResult("cluster", out)


@api_command(
    "listHosts",
    "Lists hosts",
    params=(
        Param("id", PType.UUID, description="the id of the host"),
        Param("name", description="the name of the host"),
        Param("zoneid", PType.UUID, description="the Zone ID for the host"),
        Param("podid", PType.UUID, description="the Pod ID for the host"),
        Param("clusterid", PType.UUID, description="lists hosts existing in particular cluster"),
        Param("type", description="the host type"),
        Param("state", description="the state of the host"),
        Param("hypervisor", description="hypervisor type of host"),
    ),
    listing=True,
    response_fields=("id", "name", "state", "type", "ipaddress", "zoneid", "hypervisor"),
    admin=True,
)
async def list_hosts(call: Call) -> ListResult:
    a = call.args
    zones, pods, clusters = await names(call)

    def same(key: str, value: str) -> bool:
        return a.get(key) is None or str(a[key]).lower() == value.lower()

    out = [
        host_view(h, zones, pods, clusters)
        for h in await call.ctx.store.list_hosts(a.get("zoneid"))
        if same("id", h.id)
        and same("name", h.name)
        and same("podid", h.pod_id)
        and same("clusterid", h.cluster_id)
        and same("type", h.type)
        and same("state", h.state)
        and same("hypervisor", h.hypervisor)
        and keyword_match(a.get("keyword"), h.name)
    ]
    return ListResult("host", out)
