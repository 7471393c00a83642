"""System VMs: listSystemVms (console proxy and secondary storage VMs; routers are listed
by listRouters)."""

from __future__ import annotations

from typing import Any

from manager.api.commands.infra import names
from manager.api.dispatch import Call, Param, PType, api_command, keyword_match
from manager.api.responses import ListResult, fmt_date
from manager.store.base import Role, SystemVm, VmState
from manager.templates import list_templates

# CloudStack's systemvmtype values.
SYSTEMVM_TYPE = {
    Role.CONSOLE_PROXY: "consoleproxy",
    Role.SECONDARY_STORAGE: "secondarystoragevm",
    Role.ROUTER: "domainrouter",
}
_TYPE_FILTER = {
    "consoleproxy": Role.CONSOLE_PROXY,
    "secondarystoragevm": Role.SECONDARY_STORAGE,
    "secondarystorage": Role.SECONDARY_STORAGE,
}


def agent_state(call: Call, vm: SystemVm) -> str:
    """ "Up" while the VM's agent is connected, else "Disconnected" (CloudStack's words)."""
    links = getattr(call.ctx, "links", None)
    if links is not None:
        try:
            if links.is_connected(vm.id):
                return "Up"
        except Exception:  # a links object in a bad state must not break listing
            return "Disconnected"
    return "Disconnected"


def applied_version(call: Call, vm: SystemVm) -> int:
    """What the VM's agent applied: the store's record, or the connected agent's newer ack
    (acks reach the store by group commit, a few ms later; a job that waited for an ack
    must not be followed by a listing that does not show it yet)."""
    links = getattr(call.ctx, "links", None)
    fn = getattr(links, "acked_version", None)
    if callable(fn):
        try:
            return max(vm.applied_version, int(fn(vm.id)))
        except Exception:  # a links object in a bad state must not break listing
            return vm.applied_version
    return vm.applied_version


def systemvm_view(
    call: Call,
    vm: SystemVm,
    zones: dict[str, str],
    pods: dict[str, str],
    hosts: dict[str, str],
) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": vm.id,
        "name": vm.name,
        "systemvmtype": SYSTEMVM_TYPE[vm.role],
        "state": vm.state.value,
        "zoneid": vm.zone_id,
        "zonename": zones.get(vm.zone_id, ""),
        "podid": vm.pod_id,
        "hostid": vm.host_id,
        "hostname": hosts.get(vm.host_id) if vm.host_id else None,
        "publicip": vm.public_ip,
        "privateip": vm.private_ip,
        "linklocalip": vm.linklocal_ip,
        "templateid": vm.template_id,
        "hypervisor": vm.hypervisor,
        "created": fmt_date(vm.created),
        "agentstate": agent_state(call, vm),
        "version": vm.image_version,
        "agentversion": vm.agent_version,
        "desiredversion": vm.desired_version,
        "appliedversion": applied_version(call, vm),
        "lastseen": fmt_date(vm.last_seen),
    }
    if vm.role is Role.CONSOLE_PROXY:
        view["activeviewersessions"] = int(vm.details.get("activeviewersessions", 0) or 0)
    _ = pods
    return {k: v for k, v in view.items() if v is not None}


@api_command(
    "listSystemVms",
    "List system virtual machines",
    params=(
        Param("id", PType.UUID, description="the ID of the system VM"),
        Param("name", description="the name of the system VM"),
        Param("state", description="the state of the system VM"),
        Param(
            "systemvmtype",
            description="the system VM type: consoleproxy or secondarystoragevm",
            choices=("consoleproxy", "secondarystoragevm", "secondarystorage"),
        ),
        Param("zoneid", PType.UUID, description="the Zone ID of the system VM"),
        Param("podid", PType.UUID, description="the Pod ID of the system VM"),
        Param("hostid", PType.UUID, description="the host ID of the system VM"),
        Param("storageid", PType.UUID, description="accepted for compatibility, ignored"),
    ),
    listing=True,
    response_fields=(
        "id",
        "name",
        "systemvmtype",
        "state",
        "zoneid",
        "zonename",
        "podid",
        "hostid",
        "hostname",
        "publicip",
        "privateip",
        "linklocalip",
        "templateid",
        "templatename",
        "hypervisor",
        "created",
        "activeviewersessions",
        "agentstate",
        "version",
    ),
    admin=True,
)
async def list_system_vms(call: Call) -> ListResult:
    a = call.args
    role = _TYPE_FILTER.get(a["systemvmtype"]) if "systemvmtype" in a else None
    states = None
    if "state" in a:
        wanted = [s for s in VmState if s.value.lower() == a["state"].lower()]
        if not wanted:
            return ListResult("systemvm", [])
        states = wanted
    vms = await call.ctx.store.list_system_vms(zone_id=a.get("zoneid"), role=role, states=states)
    zones, pods, _ = await names(call)
    hosts = {h.id: h.name for h in await call.ctx.store.list_hosts()}
    template_names = {t.id: t.name for t in await list_templates(call.ctx.store)}
    out = [
        systemvm_view(call, vm, zones, pods, hosts)
        for vm in vms
        if vm.role is not Role.ROUTER
        and a.get("id") in (None, vm.id)
        and a.get("name") in (None, vm.name)
        and a.get("podid") in (None, vm.pod_id)
        and a.get("hostid") in (None, vm.host_id)
        and keyword_match(a.get("keyword"), vm.name)
    ]
    for view in out:
        if view.get("templateid") in template_names:
            view["templatename"] = template_names[view["templateid"]]
    return ListResult("systemvm", out)
