"""Guest VMs whose consoles the console proxies serve: deployVirtualMachine,
startVirtualMachine, stopVirtualMachine, destroyVirtualMachine, listVirtualMachines.

A guest is a QEMU process on the manager's host (:mod:`manager.guests`) with a VNC console
behind a password the manager sets; the VNC host, port and password are never part of a
response. Records live in ``guest_vms`` (:mod:`manager.consoleproxy.records`).

Guest networks: ``deployVirtualMachine networkids= userdata=`` records the guest and its NICs
(:func:`manager.network.guests.add_guest_nic`) in one transaction, so the networks' routers
get the DHCP reservation, DNS name, user data and meta-data; ``destroyVirtualMachine``
removes the NICs, ``updateVirtualMachine userdata=`` replaces the user data, and VM views
carry CloudStack's ``nic`` list.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from typing import Any

from manager.api.dispatch import Call, Param, PType, api_command, keyword_match
from manager.api.responses import (
    RESOURCE_UNAVAILABLE,
    ApiError,
    AsyncResult,
    ListResult,
    fmt_date,
    param_error,
)
from manager.consoleproxy import records
from manager.consoleproxy.runtime import ConsoleError, ConsoleRuntime, get_runtime
from manager.guests import GuestState
from manager.network import store as ns
from manager.network.guests import add_guest_nic, remove_vm_nics, set_userdata
from manager.network.model import GuestNic, Network
from manager.network.validate import NetError
from manager.store.base import User

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
ROOT_ADMIN = 1
USERDATA_MAX_CHARS = 65536  # base64 of 32 KiB (the decoded limit is checked by the network part)


def service(call: Call) -> ConsoleRuntime:
    svc = get_runtime(call.ctx)
    if svc is None:
        raise ApiError(RESOURCE_UNAVAILABLE, "guest VMs are not available: console service off")
    return svc


def is_admin(user: User) -> bool:
    return user.account_type == ROOT_ADMIN


def nic_view(n: GuestNic, net: Network, is_default: bool) -> dict[str, Any]:
    """CloudStack's NicResponse subset (pure)."""
    return {
        "id": n.id,
        "networkid": n.network_id,
        "networkname": net.name,
        "ipaddress": n.ip,
        "macaddress": n.mac,
        "netmask": str(ipaddress.IPv4Network(net.cidr).netmask),
        "gateway": net.gateway,
        "isdefault": is_default,
        "type": net.guest_type,
        "traffictype": "Guest",
    }


async def nics_of(store: Any, vm_ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """vm id → its NIC views, in the order they were added (the first is the default)."""
    out: dict[str, list[dict[str, Any]]] = {}
    if not vm_ids:
        return out
    nets = {n.id: n for n in await ns.list_networks(store)}
    for nic in await ns.list_nics(store):
        if nic.vm_id in vm_ids and nic.network_id in nets:
            views = out.setdefault(nic.vm_id, [])
            views.append(nic_view(nic, nets[nic.network_id], is_default=not views))
    return out


def vm_view(
    g: records.GuestRecord,
    user: User,
    zones: dict[str, str],
    nics: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """CloudStack's UserVmResponse subset (pure). No console/VNC details, ever."""
    view: dict[str, Any] = {
        "id": g.id,
        "name": g.name,
        "displayname": g.display_name,
        "account": user.account_name if g.account_id == user.account_id else None,
        "domainid": user.domain_id if g.account_id == user.account_id else None,
        "state": g.state,
        "zoneid": g.zone_id,
        "zonename": zones.get(g.zone_id) if g.zone_id else None,
        "created": fmt_date(g.created),
        "memory": g.memory_mb,
        "cpunumber": 1,
        "hypervisor": "KVM",
        "haenable": False,
        "nic": list(nics or []),
    }
    return {k: v for k, v in view.items() if v is not None}


def api_error(e: ConsoleError) -> ApiError:
    return param_error(e.text) if e.code == 431 else ApiError(e.code, e.text)


async def _zones(call: Call) -> dict[str, str]:
    return {z.id: z.name for z in await call.ctx.store.list_zones()}


async def owned_guest(call: Call, vm_id: str) -> records.GuestRecord:
    """The caller's guest (any guest for the root admin), else a 431 that does not reveal
    whether someone else's VM exists."""
    g = await records.get_guest(call.ctx.store, vm_id)
    if (
        g is None
        or g.state == GuestState.DESTROYED
        or not (is_admin(call.user) or g.account_id == call.user.account_id)
    ):
        raise param_error(f"Unable to find virtual machine with id {vm_id}")
    return g


@api_command(
    "deployVirtualMachine",
    "Creates and automatically starts a virtual machine (a QEMU guest with a VNC console)",
    params=(
        Param("serviceofferingid", PType.UUID, description="accepted for compatibility"),
        Param("templateid", PType.UUID, description="accepted for compatibility"),
        Param("zoneid", PType.UUID, description="availability zone (default: the first)"),
        Param("name", description="host name for the virtual machine", length=63),
        Param("displayname", description="an optional user generated name", length=255),
        Param("memory", PType.INTEGER, description="memory in MiB (16-1024)", min=16, max=1024),
        Param(
            "networkids",
            PType.LIST,
            item_type=PType.UUID,
            description="guest networks the VM joins (the first is the default NIC)",
        ),
        Param(
            "userdata",
            description="base64 user data served by the network's router (at most 32 KiB decoded)",
            length=USERDATA_MAX_CHARS,
        ),
    ),
    is_async=True,
    response_fields=("id", "name", "displayname", "state", "zoneid", "created"),
)
async def deploy_virtual_machine(call: Call) -> AsyncResult:
    svc = service(call)
    a = call.args
    zones = await _zones(call)
    zone_id = a.get("zoneid")
    if zone_id is None:
        if not zones:
            raise param_error("no zone exists")
        zone_id = next(iter(zones))
    elif zone_id not in zones:
        raise param_error(f"Unable to find zone with id {zone_id}")
    name = a.get("name")
    if name is not None and not _NAME_RE.match(name):
        raise param_error(
            "Invalid value for parameter name: letters, digits and '-', at most 63 characters"
        )
    user = call.user
    network_ids = list(dict.fromkeys(a.get("networkids") or []))
    if a.get("userdata") and not network_ids:
        raise param_error("userdata needs a network with the UserData service (networkids)")
    for nid in network_ids:
        net = await ns.get_network(call.ctx.store, nid)
        if net is None or not (is_admin(user) or net.account_id == user.account_id):
            raise param_error(f"Unable to find network with the specified networkids {nid}")
        if net.zone_id != zone_id:
            raise param_error(f"Network {net.name} is not in zone {zone_id}")
    if network_ids:
        # The guest record and its NICs in one transaction: a refused NIC (range full,
        # bad userdata) leaves no guest behind. The routers get DHCP/DNS/userdata after
        # the commit.
        now = svc.clock()
        vm_id = str(uuid.uuid4())
        vm_name = name or f"VM-{vm_id}"
        rec = records.GuestRecord(
            id=vm_id,
            name=vm_name,
            display_name=a.get("displayname") or vm_name,
            account_id=user.account_id,
            zone_id=zone_id,
            state=GuestState.STARTING,
            memory_mb=int(a.get("memory") or 64),
            created=now,
            updated=now,
        )
        try:
            async with call.ctx.store.transaction() as tx:
                await records.add_guest(tx, rec)
                for nid in network_ids:
                    await add_guest_nic(tx, nid, vm_id, vm_name, userdata=a.get("userdata"))
        except NetError as e:
            raise param_error(str(e)) from None
    else:
        rec = await svc.deploy_guest(
            name=name,
            display_name=a.get("displayname") or "",
            account_id=user.account_id,
            zone_id=zone_id,
            memory_mb=int(a.get("memory") or 64),
        )

    async def work() -> dict[str, Any]:
        try:
            booted = await svc.boot_guest(rec)
        except ConsoleError as e:
            raise api_error(e) from e
        nics = await nics_of(call.ctx.store, {booted.id})
        return {"virtualmachine": vm_view(booted, user, zones, nics.get(booted.id))}

    job = await call.jobs.submit(
        call.ctx, "deployVirtualMachine", user.account_id, work, "VirtualMachine", rec.id
    )
    return AsyncResult(job, id=rec.id)


def _lifecycle_command(command: str, action: str) -> Any:
    async def handler(call: Call) -> AsyncResult:
        svc = service(call)
        g = await owned_guest(call, call.args["id"])
        zones = await _zones(call)
        user = call.user

        async def work() -> dict[str, Any]:
            try:
                if action == "start":
                    done = await svc.boot_guest(g)
                elif action == "stop":
                    done = await svc.stop_guest(g.id)
                else:
                    done = await svc.destroy_guest(g.id)
                    try:
                        async with call.ctx.store.transaction() as tx:
                            # Its DHCP/DNS entries, userdata and rules leave the routers.
                            await remove_vm_nics(tx, g.id)
                    except NetError as e:
                        raise param_error(str(e)) from None
            except ConsoleError as e:
                raise api_error(e) from e
            nics = await nics_of(call.ctx.store, {done.id})
            return {"virtualmachine": vm_view(done, user, zones, nics.get(done.id))}

        job = await call.jobs.submit(
            call.ctx, command, user.account_id, work, "VirtualMachine", g.id
        )
        return AsyncResult(job, id=g.id)

    return handler


_ID = Param("id", PType.UUID, required=True, description="the ID of the virtual machine")

api_command("startVirtualMachine", "Starts a virtual machine", params=(_ID,), is_async=True)(
    _lifecycle_command("startVirtualMachine", "start")
)
api_command(
    "stopVirtualMachine",
    "Stops a virtual machine",
    params=(_ID, Param("forced", PType.BOOLEAN, description="accepted; stops are forced")),
    is_async=True,
)(_lifecycle_command("stopVirtualMachine", "stop"))
api_command(
    "destroyVirtualMachine",
    "Destroys a virtual machine (its console tokens die with it)",
    params=(_ID, Param("expunge", PType.BOOLEAN, description="accepted; always expunged")),
    is_async=True,
)(_lifecycle_command("destroyVirtualMachine", "destroy"))


@api_command(
    "listVirtualMachines",
    "List the virtual machines owned by the account",
    params=(
        Param("id", PType.UUID, description="the ID of the virtual machine"),
        Param("ids", PType.LIST, item_type=PType.UUID, description="the IDs of the VMs"),
        Param("name", description="name of the virtual machine"),
        Param("state", description="state of the virtual machine"),
        Param("zoneid", PType.UUID, description="the availability zone ID"),
    ),
    listing=True,
    response_fields=("id", "name", "displayname", "state", "zoneid", "created"),
)
async def list_virtual_machines(call: Call) -> ListResult:
    svc = service(call)
    a = call.args
    user = call.user
    everyone = is_admin(user) and bool(a.get("listall", True))
    guests = await records.list_guests(
        svc.ctx.store, account_id=None if everyone else user.account_id
    )
    zones = await _zones(call)
    ids = set(a.get("ids") or [])
    nics = await nics_of(svc.ctx.store, {g.id for g in guests})
    out = [
        vm_view(g, user, zones, nics.get(g.id))
        for g in guests
        if g.state != GuestState.DESTROYED
        and a.get("id") in (None, g.id)
        and (not ids or g.id in ids)
        and a.get("name") in (None, g.name)
        and (a.get("state") is None or a["state"].lower() == g.state.lower())
        and a.get("zoneid") in (None, g.zone_id)
        and keyword_match(a.get("keyword"), g.name, g.display_name)
    ]
    return ListResult("virtualmachine", out)


@api_command(
    "updateVirtualMachine",
    "Updates properties of a virtual machine (display name, user data)",
    params=(
        _ID,
        Param("displayname", description="user generated name", length=255),
        Param(
            "userdata",
            description="base64 user data (at most 32 KiB decoded); the routers of the "
            "VM's networks serve it at once",
            length=USERDATA_MAX_CHARS,
        ),
    ),
    response_fields=("id", "name", "displayname", "state"),
)
async def update_virtual_machine(call: Call) -> dict[str, Any]:
    svc = service(call)
    g = await owned_guest(call, call.args["id"])
    a = call.args
    try:
        async with call.ctx.store.transaction() as tx:
            if a.get("displayname"):
                await tx.execute(
                    "UPDATE guest_vms SET display_name = ?, updated = ? WHERE id = ?",
                    (a["displayname"], svc.clock(), g.id),
                )
            if "userdata" in a:
                await set_userdata(tx, g.id, a.get("userdata") or "")
    except NetError as e:
        raise param_error(str(e)) from None
    done = await records.get_guest(call.ctx.store, g.id)
    assert done is not None
    nics = await nics_of(call.ctx.store, {g.id})
    return {"virtualmachine": vm_view(done, call.user, await _zones(call), nics.get(g.id))}
