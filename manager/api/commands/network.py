"""Guest networks and virtual routers: listNetworkOfferings, listServiceOfferings
(issystem=true: the router's offering), createNetwork, listNetworks, restartNetwork,
deleteNetwork, listRouters, startRouter, stopRouter, rebootRouter, destroyRouter.

Traffic counted by the routers (``router.stats``) is shown as ``receivedbytes`` /
``sentbytes`` on networks (and per address on listPublicIpAddresses).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
from importlib import metadata
from typing import Any

from manager.api.commands.net_common import (
    network_or_431,
    owner,
    service_view,
    zone_names,
)
from manager.api.commands.systemvms import applied_version
from manager.api.dispatch import Call, Param, PType, api_command, keyword_match
from manager.api.responses import ApiError, AsyncResult, ListResult, fmt_date, param_error
from manager.network import ipam
from manager.network import routers as rt
from manager.network import store as ns
from manager.network.model import (
    ISOLATED,
    SERVICES,
    SHARED,
    Network,
    NetworkOffering,
    PublicIp,
    RouterOffering,
    needs_router,
)
from manager.network.runtime import RUNTIME, changed, wait_applied
from manager.network.validate import (
    NetError,
    check_no_overlap,
    dns_server,
    network_addressing,
    offering_change,
)
from manager.network.validate import (
    network_domain as check_domain,
)
from manager.store.base import Role, SystemVm, VmState

log = logging.getLogger("sysvm.api.network")

DEFAULT_DOMAIN = "cloud.internal"
GONE = (VmState.DESTROYED, VmState.EXPUNGING)


# --- offerings -----------------------------------------------------------------------


def offering_view(o: NetworkOffering) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": o.id,
        "name": o.name,
        "displaytext": o.display_text,
        "traffictype": "Guest",
        "isdefault": o.is_default,
        "specifyvlan": o.guest_ip_type == SHARED,
        "conservemode": True,
        "specifyipranges": o.specify_ip_ranges,
        "availability": "Optional",
        "networkrate": -1,
        "state": o.state,
        "guestiptype": o.guest_ip_type,
        "egressdefaultpolicy": o.egress_default_allow,
        "ispersistent": False,
        "forvpc": False,
        "fordisplay": True,
        "supportsstrechedl2subnet": False,
        "supportspublicaccess": False,
        "created": fmt_date(o.created),
        "service": service_view(o),
    }
    if o.service_offering_id:
        view["serviceofferingid"] = o.service_offering_id
    return view


@api_command(
    "listNetworkOfferings",
    "Lists all available network offerings",
    params=(
        Param("id", PType.UUID, description="list network offerings by ID"),
        Param("name", description="list network offerings by name"),
        Param("guestiptype", description="Isolated or Shared", choices=(ISOLATED, SHARED)),
        Param("isdefault", PType.BOOLEAN, description="true: default offerings only"),
        Param("state", description="Enabled or Disabled"),
        Param("zoneid", PType.UUID, description="accepted; offerings apply to every zone"),
        Param("supportedservices", PType.LIST, description="offerings with all these services"),
        Param("traffictype", description="Guest"),
    ),
    listing=True,
    response_fields=("id", "name", "displaytext", "guestiptype", "service", "state"),
)
async def list_network_offerings(call: Call) -> ListResult:
    a = call.args
    wanted = {s.lower() for s in a.get("supportedservices", [])}
    out = [
        offering_view(o)
        for o in await ns.list_offerings(call.ctx.store)
        if a.get("id") in (None, o.id)
        and a.get("name") in (None, o.name)
        and a.get("guestiptype") in (None, o.guest_ip_type)
        and a.get("isdefault") in (None, o.is_default)
        and (a.get("state") is None or a["state"].lower() == o.state.lower())
        and (a.get("traffictype") is None or a["traffictype"].lower() == "guest")
        and wanted <= {s.lower() for s in o.services}
        and keyword_match(a.get("keyword"), o.name, o.display_text)
    ]
    return ListResult("networkoffering", out)


def service_offering_view(o: RouterOffering) -> dict[str, Any]:
    return {
        "id": o.id,
        "name": o.name,
        "displaytext": o.display_text,
        "cpunumber": o.cpu_number,
        "cpuspeed": o.cpu_speed,
        "memory": o.memory_mb,
        "created": fmt_date(o.created),
        "storagetype": "shared",
        "offerha": False,
        "limitcpuuse": False,
        "isvolatile": False,
        "issystem": True,
        "defaultuse": o.is_default,
        "systemvmtype": "domainrouter",
        "iscustomized": False,
    }


@api_command(
    "listServiceOfferings",
    "Lists service offerings (issystem=true: the system offerings, e.g. the router's)",
    params=(
        Param("id", PType.UUID, description="ID of the service offering"),
        Param("name", description="name of the service offering"),
        Param("issystem", PType.BOOLEAN, description="true: system VM offerings"),
        Param("systemvmtype", description="domainrouter", choices=("domainrouter",)),
        Param("zoneid", PType.UUID, description="accepted for compatibility"),
    ),
    listing=True,
    response_fields=("id", "name", "cpunumber", "cpuspeed", "memory", "issystem"),
)
async def list_service_offerings(call: Call) -> ListResult:
    a = call.args
    if not a.get("issystem", False) and "systemvmtype" not in a and "id" not in a:
        return ListResult("serviceoffering", [])  # user offerings: none here
    out = [
        service_offering_view(o)
        for o in await ns.list_router_offerings(call.ctx.store)
        if a.get("id") in (None, o.id)
        and a.get("name") in (None, o.name)
        and keyword_match(a.get("keyword"), o.name)
    ]
    return ListResult("serviceoffering", out)


# --- networks ------------------------------------------------------------------------


async def network_view(
    call: Call,
    net: Network,
    offerings: dict[str, NetworkOffering],
    zones: dict[str, str],
) -> dict[str, Any]:
    o = offerings.get(net.offering_id)
    cidr = ipaddress.IPv4Network(net.cidr)
    traffic = await ns.traffic(call.ctx.store, net.id)
    view: dict[str, Any] = {
        "id": net.id,
        "name": net.name,
        "displaytext": net.display_text,
        "broadcastdomaintype": "Vlan",
        "traffictype": "Guest",
        "gateway": net.gateway,
        "netmask": str(cidr.netmask),
        "cidr": net.cidr,
        "zoneid": net.zone_id,
        "zonename": zones.get(net.zone_id, ""),
        "networkofferingid": net.offering_id,
        "networkofferingname": o.name if o else None,
        "networkofferingdisplaytext": o.display_text if o else None,
        "networkofferingconservemode": True,
        "networkofferingavailability": "Optional",
        "issystem": False,
        "state": net.state,
        "related": net.id,
        "broadcasturi": f"vlan://{net.vlan}" if net.vlan else None,
        "vlan": net.vlan,
        "dns1": net.dns1,
        "dns2": net.dns2,
        "type": net.guest_type,
        "acltype": "Account",
        **owner(call),
        "service": service_view(o) if o else [],
        "networkdomain": net.network_domain,
        "restartrequired": False,
        "specifyipranges": net.guest_type == SHARED,
        "startip": net.start_ip,
        "endip": net.end_ip,
        "canusefordeploy": True,
        "ispersistent": False,
        "redundantrouter": False,
        "egressdefaultpolicy": o.egress_default_allow if o else True,
        "created": fmt_date(net.created),
        "receivedbytes": sum(v[0] for v in traffic.values()),
        "sentbytes": sum(v[1] for v in traffic.values()),
    }
    return {k: v for k, v in view.items() if v is not None}


def _default_isolated_cidr(zone_guest_cidr: str) -> str:
    net = ipaddress.IPv4Network(zone_guest_cidr, strict=False)
    return str(net if net.prefixlen >= 24 else next(net.subnets(new_prefix=24)))


async def _reserved(call: Call, zone: Any) -> list[tuple[str, str]]:
    out = [("control (link-local)", zone.linklocal_cidr), ("public", zone.public_cidr)]
    for p in await call.ctx.store.list_pods(zone.id):
        try:
            net = ipaddress.IPv4Network(f"{p.gateway}/{p.netmask}", strict=False)
        except ValueError:
            continue
        out.append((f"management (pod {p.name})", str(net)))
    return out


@api_command(
    "createNetwork",
    "Creates a network",
    params=(
        Param("name", required=True, description="the name of the network"),
        Param("displaytext", description="the display text of the network"),
        Param("networkofferingid", PType.UUID, required=True, description="network offering"),
        Param("zoneid", PType.UUID, required=True, description="the zone of the network"),
        Param("gateway", description="the gateway of the network"),
        Param("netmask", description="the netmask of the network"),
        Param("startip", description="the beginning IP address of the range"),
        Param("endip", description="the ending IP address of the range"),
        Param("networkdomain", description="network domain"),
        Param("vlan", description="the ID or VID of the network (shared networks)", length=64),
        Param("dns1", description="the first IPv4 DNS server"),
        Param("dns2", description="the second IPv4 DNS server"),
        Param("account", description="accepted; networks belong to the caller"),
        Param("domainid", PType.UUID, description="accepted; networks belong to the caller"),
        Param("acltype", description="Account or Domain", choices=("Account", "Domain")),
    ),
    response_fields=("id", "name", "state", "cidr", "gateway", "type"),
)
async def create_network(call: Call) -> dict[str, Any]:
    a = call.args
    store = call.ctx.store
    offering = await ns.get_offering(store, a["networkofferingid"])
    if offering is None:
        raise param_error(f"Unable to find network offering {a['networkofferingid']}")
    if offering.state != "Enabled":
        raise param_error(f"Network offering {offering.name} is not enabled")
    zone = next((z for z in await store.list_zones() if z.id == a["zoneid"]), None)
    if zone is None:
        raise param_error(f"Unable to find zone {a['zoneid']}")
    name = a["name"].strip()
    if not name:
        raise param_error("Parameter name must not be empty")
    now = call.ctx.clock()
    try:
        if offering.guest_ip_type == SHARED and not (
            a.get("gateway") and a.get("netmask") and a.get("startip")
        ):
            raise NetError("a Shared network needs gateway, netmask and startip")
        addressing = network_addressing(
            gateway=a.get("gateway"),
            netmask=a.get("netmask"),
            start_ip=a.get("startip"),
            end_ip=a.get("endip"),
            default_cidr=_default_isolated_cidr(zone.guest_cidr),
            reserved=await _reserved(call, zone),
        )
        domain = check_domain(a["networkdomain"]) if a.get("networkdomain") else DEFAULT_DOMAIN
        dns1 = dns_server(a["dns1"], "dns1") if a.get("dns1") else zone.dns1 or None
        dns2 = dns_server(a["dns2"], "dns2") if a.get("dns2") else None
    except NetError as e:
        raise param_error(str(e)) from None
    router_offering = next(
        (
            o
            for o in await ns.list_router_offerings(store)
            if o.id == offering.service_offering_id or offering.service_offering_id is None
        ),
        None,
    )
    network = Network(
        id=ns.new_id(),
        name=name,
        display_text=(a.get("displaytext") or name).strip() or name,
        zone_id=zone.id,
        offering_id=offering.id,
        service_offering_id=router_offering.id if router_offering else None,
        guest_type=offering.guest_ip_type,
        state="Setup" if offering.guest_ip_type == SHARED else "Implemented",
        cidr=addressing.cidr,
        gateway=addressing.gateway,
        start_ip=addressing.start_ip,
        end_ip=addressing.end_ip,
        network_domain=domain,
        dns1=dns1,
        dns2=dns2,
        vlan=a.get("vlan"),
        account_id=call.user.account_id,
        created=now,
    )
    shared_router = offering.guest_ip_type == SHARED and needs_router(SHARED, offering.services)
    if shared_router:
        # CloudStack's VR on a Shared network takes an address from the range; the
        # gateway is the provider's. Every replacement router keeps it.
        try:
            router_ip = ipam.allocate_guest(network.start_ip, network.end_ip, network.gateway, ())
        except NetError as e:
            raise param_error(f"no address left for the network's router: {e}") from None
        network = dataclasses.replace(network, router_ip=router_ip)
    router: SystemVm | None = None
    try:
        async with store.transaction() as tx:
            if offering.guest_ip_type == SHARED:
                # Shared networks share L2/L3 space in the zone: no overlaps.
                others = [
                    (n.name, n.cidr)
                    for n in await ns.list_networks(tx, zone.id)
                    if n.guest_type == SHARED
                ]
                check_no_overlap(network.cidr, others)
            await ns.add_network(tx, network)
            if shared_router:
                router = await rt.create_router(tx, network, None, now)
                await changed(tx, network.id)
            if offering.guest_ip_type == ISOLATED:
                used = await ns.used_public_addresses(tx, zone.id)
                snat = PublicIp(
                    id=ns.new_id(),
                    zone_id=zone.id,
                    address=ipam.allocate_public(zone.public_cidr, used),
                    network_id=network.id,
                    is_source_nat="SourceNat" in offering.services,
                    static_nat_vm_id=None,
                    static_nat_ip=None,
                    account_id=call.user.account_id,
                    allocated=now,
                )
                await ns.add_public_ip(tx, snat)
                router = await rt.create_router(tx, network, snat.address, now)
                await changed(tx, network.id)
    except NetError as e:
        raise param_error(str(e)) from None
    if router is not None:
        rid = router.id

        async def boot() -> dict[str, Any]:
            vm = await rt.boot(call.ctx, rid)
            return {"router": await router_view(call, vm)}

        job = await call.jobs.submit(
            call.ctx, "startRouter", call.user.account_id, boot, "DomainRouter", rid
        )
        log.info("event=network_created network=%s router=%s job=%s", network.id, rid, job)
    offerings = {o.id: o for o in await ns.list_offerings(store)}
    return {"network": await network_view(call, network, offerings, await zone_names(call))}


@api_command(
    "listNetworks",
    "Lists all available networks",
    params=(
        Param("id", PType.UUID, description="list networks by ID"),
        Param("zoneid", PType.UUID, description="the zone ID of the network"),
        Param("type", description="Isolated or Shared", choices=(ISOLATED, SHARED)),
        Param("guestiptype", description="Isolated or Shared", choices=(ISOLATED, SHARED)),
        Param("networkofferingid", PType.UUID, description="list networks by offering"),
        Param("traffictype", description="Guest"),
        Param("issystem", PType.BOOLEAN, description="false: guest networks (all here)"),
        Param("account", description="accepted for compatibility"),
        Param("domainid", PType.UUID, description="accepted for compatibility"),
    ),
    listing=True,
    response_fields=("id", "name", "state", "cidr", "gateway", "type", "receivedbytes"),
)
async def list_networks(call: Call) -> ListResult:
    a = call.args
    if a.get("issystem") is True:
        return ListResult("network", [])
    kind = a.get("type") or a.get("guestiptype")
    offerings = {o.id: o for o in await ns.list_offerings(call.ctx.store)}
    zones = await zone_names(call)
    out = [
        await network_view(call, n, offerings, zones)
        for n in await ns.list_networks(call.ctx.store, a.get("zoneid"))
        if a.get("id") in (None, n.id)
        and kind in (None, n.guest_type)
        and a.get("networkofferingid") in (None, n.offering_id)
        and keyword_match(a.get("keyword"), n.name, n.display_text)
    ]
    return ListResult("network", out)


@api_command(
    "restartNetwork",
    "Restarts the network: re-applies its configuration (cleanup=false) or replaces its "
    "router (cleanup=true: the new one is up and configured before the old one goes)",
    params=(
        Param("id", PType.UUID, required=True, description="the ID of the network"),
        Param("cleanup", PType.BOOLEAN, description="replace the router (default false)"),
        Param("makeredundant", PType.BOOLEAN, description="accepted; not supported"),
    ),
    is_async=True,
)
async def restart_network(call: Call) -> AsyncResult:
    net = await network_or_431(call, call.args["id"], "id")
    cleanup = bool(call.args.get("cleanup", False))
    ctx = call.ctx
    network_id = net.id

    offering = await ns.get_offering(ctx.store, net.offering_id)
    served = needs_router(net.guest_type, offering.services if offering else ())

    async def work() -> dict[str, Any]:
        if not served:  # nothing of ours runs on it: nothing to restart
            return {"success": True}
        routers = await ns.router_ids(ctx.store, network_id)
        if cleanup or not routers:
            # No router left (destroyed): a new one, unlike CloudStack, which then can't.
            await rt.replace(ctx, network_id)
            return {"success": True}
        async with ctx.store.transaction() as tx:
            versions = await changed(tx, network_id)
        for rid in routers:
            vm = await ctx.store.get_system_vm(rid)
            if vm is not None and vm.state in (VmState.STOPPED, VmState.STARTING, VmState.ERROR):
                await rt.boot(ctx, rid)
        from manager.network.runtime import wait_applied

        await wait_applied(ctx.store, versions)
        return {"success": True}

    job = await call.jobs.submit(
        ctx, "restartNetwork", call.user.account_id, work, "Network", net.id
    )
    return AsyncResult(job)


@api_command(
    "deleteNetwork",
    "Deletes a network: its routers, public IPs and rules go with it",
    params=(
        Param("id", PType.UUID, required=True, description="the ID of the network"),
        Param("forced", PType.BOOLEAN, description="accepted for compatibility"),
    ),
    is_async=True,
)
async def delete_network(call: Call) -> AsyncResult:
    net = await network_or_431(call, call.args["id"], "id")
    nics = await ns.list_nics(call.ctx.store, network_id=net.id)
    if nics:
        raise param_error(
            f"Network {net.name} still has {len(nics)} virtual machine NIC(s); "
            "destroy or move those VMs first"
        )
    ctx = call.ctx
    network_id = net.id

    async def work() -> dict[str, Any]:
        for rid in await ns.router_ids(ctx.store, network_id):
            await rt.destroy(ctx, rid)
        async with ctx.store.transaction() as tx:
            for table in ("lb_rules", "port_forwarding_rules", "firewall_rules", "guest_nics"):
                await tx.execute(
                    f"DELETE FROM {table} WHERE network_id = ?",  # noqa: S608 - fixed names
                    (network_id,),
                )
            await tx.execute("DELETE FROM public_ips WHERE network_id = ?", (network_id,))
            await ns.set_network_state(tx, network_id, "Destroy")
        log.info("event=network_deleted network=%s", network_id)
        return {"success": True}

    job = await call.jobs.submit(
        ctx, "deleteNetwork", call.user.account_id, work, "Network", net.id
    )
    return AsyncResult(job)


# --- routers -------------------------------------------------------------------------


def _version_tuple(v: str | None) -> tuple[int, ...]:
    out: list[int] = []
    for part in (v or "").split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def required_router_version() -> str:
    try:
        return metadata.version("sysvm")
    except metadata.PackageNotFoundError:  # pragma: no cover - always installed
        return "0"


def requires_upgrade(image_version: str | None, required: str) -> bool:
    """Pure: an image older than the manager's release needs upgradeRouterTemplate.
    Unknown (never connected) → False, as CloudStack shows for routers without a version."""
    if not image_version:
        return False
    return _version_tuple(image_version) < _version_tuple(required)


async def router_view(
    call: Call, vm: SystemVm, zones: dict[str, str] | None = None
) -> dict[str, Any]:
    store = call.ctx.store
    zones = zones if zones is not None else await zone_names(call)
    network_id = await ns.network_of_router(store, vm.id)
    net = await ns.get_network(store, network_id) if network_id else None
    zone = next((z for z in await store.list_zones() if z.id == vm.zone_id), None)
    public_net = ipaddress.IPv4Network(zone.public_cidr, strict=False) if zone else None
    shared = net is not None and net.guest_type == SHARED
    links = RUNTIME.links
    connected = links is not None and links.is_connected(vm.id)
    offering_id = vm.details.get("service_offering_id") if vm.details else None
    offering_name = next(
        (o.name for o in await ns.list_router_offerings(store) if o.id == offering_id), None
    )
    view: dict[str, Any] = {
        "id": vm.id,
        "name": vm.name,
        "state": vm.state.value,
        "role": "VIRTUAL_ROUTER",
        "zoneid": vm.zone_id,
        "zonename": zones.get(vm.zone_id, ""),
        "podid": vm.pod_id,
        "hostid": vm.host_id,
        "hypervisor": vm.hypervisor,
        "templateid": vm.template_id,
        "created": fmt_date(vm.created),
        **owner(call),
        "dns1": net.dns1 if net else None,
        "dns2": net.dns2 if net else None,
        "networkdomain": net.network_domain if net else None,
        # A Shared network's router has no public side; its gateway is the network's.
        "gateway": (
            net.gateway
            if net is not None and shared
            else ipam.public_gateway(zone.public_cidr)
            if zone
            else None
        ),
        "publicip": vm.public_ip,
        "publicnetmask": str(public_net.netmask) if public_net and not shared else None,
        "guestipaddress": (net.router_ip or net.gateway) if net else None,
        "guestnetmask": str(ipaddress.IPv4Network(net.cidr).netmask) if net else None,
        "guestnetworkid": net.id if net else network_id,
        "guestnetworkname": net.name if net else None,
        "linklocalip": vm.linklocal_ip,
        "linklocalnetmask": "255.255.0.0" if vm.linklocal_ip else None,
        "serviceofferingid": offering_id,
        "serviceofferingname": offering_name,
        "isredundantrouter": False,
        "redundantstate": "UNKNOWN",
        "version": vm.image_version,
        "softwareversion": vm.agent_version,
        "requiresupgrade": requires_upgrade(vm.image_version, required_router_version()),
        "healthcheckresults": [],
        "healthchecksfailed": False,
        "agentstate": "Up" if connected else "Disconnected",
        "desiredversion": vm.desired_version,
        "appliedversion": applied_version(call, vm),
    }
    return {k: v for k, v in view.items() if v is not None}


async def router_or_431(call: Call, router_id: str) -> SystemVm:
    vm = await call.ctx.store.get_system_vm(router_id)
    if vm is None or vm.role is not Role.ROUTER or vm.state in GONE:
        raise param_error(f"Unable to find router with id {router_id}")
    return vm


@api_command(
    "listRouters",
    "List routers",
    params=(
        Param("id", PType.UUID, description="the ID of the router"),
        Param("name", description="the name of the router"),
        Param("state", description="the state of the router"),
        Param("zoneid", PType.UUID, description="the Zone ID of the router"),
        Param("podid", PType.UUID, description="the Pod ID of the router"),
        Param("hostid", PType.UUID, description="the host ID of the router"),
        Param("networkid", PType.UUID, description="list by network id"),
        Param("version", description="routers with this template version"),
        Param("requiresupgrade", PType.BOOLEAN, description="routers needing an upgrade"),
        Param("fetchhealthcheckresults", PType.BOOLEAN, description="accepted (placeholder)"),
        Param("account", description="accepted for compatibility"),
        Param("domainid", PType.UUID, description="accepted for compatibility"),
    ),
    listing=True,
    response_fields=("id", "name", "state", "publicip", "version", "requiresupgrade"),
)
async def list_routers(call: Call) -> ListResult:
    a = call.args
    store = call.ctx.store
    vms = await store.list_system_vms(zone_id=a.get("zoneid"), role=Role.ROUTER)
    in_network: set[str] | None = None
    if "networkid" in a:
        in_network = {
            rid for rid, nid in (await ns.router_networks(store)).items() if nid == a["networkid"]
        }
    zones = await zone_names(call)
    out = []
    for vm in vms:
        if vm.state in GONE and a.get("id") != vm.id:
            continue
        if not (
            a.get("id") in (None, vm.id)
            and a.get("name") in (None, vm.name)
            and (a.get("state") is None or a["state"].lower() == vm.state.value.lower())
            and a.get("podid") in (None, vm.pod_id)
            and a.get("hostid") in (None, vm.host_id)
            and a.get("version") in (None, vm.image_version)
            and (in_network is None or vm.id in in_network)
            and keyword_match(a.get("keyword"), vm.name)
        ):
            continue
        view = await router_view(call, vm, zones)
        if a.get("requiresupgrade") not in (None, view["requiresupgrade"]):
            continue
        out.append(view)
    return ListResult("router", out)


def _router_job(call: Call, command: str, vm: SystemVm, body: Any) -> Any:
    async def work() -> dict[str, Any]:
        done = await body()
        return {"router": await router_view(call, done)}

    return call.jobs.submit(call.ctx, command, call.user.account_id, work, "DomainRouter", vm.id)


@api_command(
    "startRouter",
    "Starts a router",
    params=(Param("id", PType.UUID, required=True, description="the ID of the router"),),
    is_async=True,
)
async def start_router(call: Call) -> AsyncResult:
    vm = await router_or_431(call, call.args["id"])
    if vm.state is VmState.RUNNING:
        raise param_error(f"Router {vm.name} is already Running")
    job = await _router_job(call, "startRouter", vm, lambda: rt.boot(call.ctx, vm.id))
    return AsyncResult(job, id=vm.id)


@api_command(
    "stopRouter",
    "Stops a router (planned: it reports its last traffic counters first)",
    params=(
        Param("id", PType.UUID, required=True, description="the ID of the router"),
        Param("forced", PType.BOOLEAN, description="accepted for compatibility"),
    ),
    is_async=True,
)
async def stop_router(call: Call) -> AsyncResult:
    vm = await router_or_431(call, call.args["id"])
    if vm.state is VmState.STOPPED:
        raise param_error(f"Router {vm.name} is already Stopped")
    job = await _router_job(call, "stopRouter", vm, lambda: rt.stop(call.ctx, vm.id))
    return AsyncResult(job, id=vm.id)


@api_command(
    "rebootRouter",
    "Reboots a router; it re-applies its last configuration at boot",
    params=(
        Param("id", PType.UUID, required=True, description="the ID of the router"),
        Param("forced", PType.BOOLEAN, description="accepted for compatibility"),
    ),
    is_async=True,
)
async def reboot_router(call: Call) -> AsyncResult:
    vm = await router_or_431(call, call.args["id"])
    if vm.state is not VmState.RUNNING:
        raise param_error(f"Router {vm.name} is {vm.state.value}, not Running")
    job = await _router_job(call, "rebootRouter", vm, lambda: rt.reboot(call.ctx, vm.id))
    return AsyncResult(job, id=vm.id)


@api_command(
    "destroyRouter",
    "Destroys a router (not the only router of a network: use restartNetwork cleanup=true)",
    params=(Param("id", PType.UUID, required=True, description="the ID of the router"),),
    is_async=True,
)
async def destroy_router(call: Call) -> AsyncResult:
    vm = await router_or_431(call, call.args["id"])
    store = call.ctx.store
    network_id = await ns.network_of_router(store, vm.id)
    if network_id is not None:
        net = await ns.get_network(store, network_id)
        others = [r for r in await ns.router_ids(store, network_id) if r != vm.id]
        if net is not None and not others:
            raise param_error(
                f"Router {vm.name} is the only router of network {net.name} ({net.id}); "
                "destroying it would cut the network off. To replace it, use restartNetwork "
                "with cleanup=true (a new router is up and configured before this one goes)"
            )
    ctx = call.ctx

    async def work() -> dict[str, Any]:
        await rt.destroy(ctx, vm.id)
        done = await store.get_system_vm(vm.id)
        return {"router": await router_view(call, done if done is not None else vm)}

    job = await call.jobs.submit(
        ctx, "destroyRouter", call.user.account_id, work, "DomainRouter", vm.id
    )
    return AsyncResult(job, id=vm.id)


# --- sizing: offerings, updateNetwork, changeServiceForRouter -------------------------


@api_command(
    "createServiceOffering",
    "Creates a service offering; here only system offerings for virtual routers "
    "(issystem=true, systemvmtype=domainrouter)",
    params=(
        Param("name", required=True, description="the name of the service offering"),
        Param("displaytext", description="the display text of the service offering"),
        Param("cpunumber", PType.INTEGER, description="vCPUs (default 1)", min=1, max=64),
        Param("cpuspeed", PType.INTEGER, description="MHz (default 500)", min=100, max=100_000),
        Param("memory", PType.INTEGER, description="MiB (default 512)", min=64, max=1_048_576),
        Param("issystem", PType.BOOLEAN, description="must be true"),
        Param("systemvmtype", description="must be domainrouter"),
    ),
    admin=True,
    response_fields=("id", "name", "cpunumber", "memory", "issystem", "systemvmtype"),
)
async def create_service_offering(call: Call) -> dict[str, Any]:
    a = call.args
    if not a.get("issystem") or a.get("systemvmtype") != "domainrouter":
        raise param_error(
            "only system offerings for virtual routers can be created here "
            "(issystem=true, systemvmtype=domainrouter)"
        )
    name = a["name"].strip()
    if not name:
        raise param_error("Parameter name must not be empty")
    store = call.ctx.store
    if any(o.name == name for o in await ns.list_router_offerings(store)):
        raise param_error(f"A service offering named {name} already exists")
    o = RouterOffering(
        id=ns.new_id(),
        name=name,
        display_text=(a.get("displaytext") or name).strip() or name,
        cpu_number=int(a.get("cpunumber") or 1),
        cpu_speed=int(a.get("cpuspeed") or 500),
        memory_mb=int(a.get("memory") or 512),
        is_default=False,
        created=call.ctx.clock(),
    )
    async with store.transaction() as tx:
        await ns.add_router_offering(tx, o)
    log.info("event=router_offering_created offering=%s memory=%d", o.id, o.memory_mb)
    return {"serviceoffering": service_offering_view(o)}


@api_command(
    "createNetworkOffering",
    "Creates a network offering (its routers sized by serviceofferingid)",
    params=(
        Param("name", required=True, description="the name of the network offering"),
        Param("displaytext", description="the display text of the network offering"),
        Param("guestiptype", required=True, description="Isolated or Shared",
              choices=(ISOLATED, SHARED)),
        Param("traffictype", description="Guest", choices=("Guest", "GUEST", "guest")),
        Param("supportedservices", PType.LIST, description="services the offering provides"),
        Param("serviceofferingid", PType.UUID, description="system offering of its routers"),
        Param("egressdefaultpolicy", PType.BOOLEAN, description="true: egress allowed"),
        Param("specifyipranges", PType.BOOLEAN, description="IP ranges given at creation"),
        Param("enable", PType.BOOLEAN, description="create it Enabled (default Disabled)"),
        Param("serviceproviderlist", PType.MAP, description="accepted; VirtualRouter only"),
        Param("specifyvlan", PType.BOOLEAN, description="accepted for compatibility"),
        Param("conservemode", PType.BOOLEAN, description="accepted for compatibility"),
    ),
    admin=True,
    response_fields=("id", "name", "guestiptype", "state", "service"),
)  # fmt: skip
async def create_network_offering(call: Call) -> dict[str, Any]:
    a = call.args
    store = call.ctx.store
    by_lower = {s.lower(): s for s in SERVICES}
    services: list[str] = []
    for raw in a.get("supportedservices") or []:
        svc = by_lower.get(str(raw).strip().lower())
        if svc is None:
            raise param_error(
                f"Unsupported service {raw}: the virtual router provides {', '.join(SERVICES)}"
            )
        if svc not in services:
            services.append(svc)
    name = a["name"].strip()
    if not name:
        raise param_error("Parameter name must not be empty")
    if any(o.name == name for o in await ns.list_offerings(store)):
        raise param_error(f"A network offering named {name} already exists")
    so = a.get("serviceofferingid")
    if so is not None and not any(o.id == so for o in await ns.list_router_offerings(store)):
        raise param_error(f"Unable to find system service offering {so} for domain routers")
    o = NetworkOffering(
        id=ns.new_id(),
        name=name,
        display_text=(a.get("displaytext") or name).strip() or name,
        guest_ip_type=a["guestiptype"],
        services=tuple(s for s in SERVICES if s in services),
        egress_default_allow=bool(a.get("egressdefaultpolicy", True)),
        specify_ip_ranges=bool(a.get("specifyipranges", a["guestiptype"] == SHARED)),
        is_default=False,
        state="Enabled" if a.get("enable") else "Disabled",
        created=call.ctx.clock(),
        service_offering_id=so,
    )
    async with store.transaction() as tx:
        await ns.add_offering(tx, o)
    return {"networkoffering": offering_view(o)}


async def _resize(call: Call, network_id: str) -> SystemVm:
    """The rolling replacement restartNetwork cleanup=true does: the new router (with the
    network's current sizing) is up and configured before the old one goes."""
    return await rt.replace(call.ctx, network_id)


@api_command(
    "updateNetwork",
    "Updates a network: name, display text, or its network offering (a new router sizing "
    "is applied by a rolling router replacement; services still in use cannot be dropped)",
    params=(
        Param("id", PType.UUID, required=True, description="the ID of the network"),
        Param("name", description="the new name for the network"),
        Param("displaytext", description="the new display text for the network"),
        Param("networkofferingid", PType.UUID, description="the new network offering"),
        Param("changecidr", PType.BOOLEAN, description="accepted for compatibility"),
        Param("forced", PType.BOOLEAN, description="accepted for compatibility"),
    ),
    is_async=True,
)
async def update_network(call: Call) -> AsyncResult:
    a = call.args
    net = await network_or_431(call, a["id"], "id")
    store = call.ctx.store
    new_offering: NetworkOffering | None = None
    if a.get("networkofferingid") and a["networkofferingid"] != net.offering_id:
        new_offering = await ns.get_offering(store, a["networkofferingid"])
        if new_offering is None:
            raise param_error(f"Unable to find network offering {a['networkofferingid']}")
    resize = False
    versions: dict[str, int] = {}
    try:
        async with store.transaction() as tx:
            cur = await ns.get_network(tx, net.id)
            if cur is None:
                raise param_error(f"Unable to find network with the specified id {net.id}")
            if a.get("name") or a.get("displaytext"):
                await tx.execute(
                    "UPDATE networks SET name = ?, display_text = ? WHERE id = ?",
                    (
                        (a.get("name") or cur.name).strip() or cur.name,
                        (a.get("displaytext") or cur.display_text).strip() or cur.display_text,
                        cur.id,
                    ),
                )
            if new_offering is not None:
                old = await ns.get_offering(tx, cur.offering_id)
                offering_change(
                    cur.name,
                    cur.guest_type,
                    old.services if old is not None else (),
                    new_offering.name,
                    new_offering.guest_ip_type,
                    new_offering.state,
                    new_offering.services,
                    await ns.services_in_use(tx, cur.id),
                )
                sizing = new_offering.service_offering_id or cur.service_offering_id
                resize = sizing != cur.service_offering_id
                await ns.set_network_offering(tx, cur.id, new_offering.id, sizing)
                # In place for the services (same router) unless it is to be replaced.
                versions = {} if resize else await changed(tx, cur.id)
    except NetError as e:
        raise param_error(str(e)) from None
    network_id = net.id

    async def work() -> dict[str, Any]:
        if resize and await ns.router_ids(store, network_id):
            try:
                await _resize(call, network_id)
            except ApiError as e:  # the old router stays: so does the old offering
                async with store.transaction() as tx:
                    await ns.set_network_offering(
                        tx, network_id, net.offering_id, net.service_offering_id
                    )
                raise ApiError(e.errorcode, f"{e.text} (the offering was not changed)") from None
        elif versions:
            await wait_applied(store, versions)
        done = await ns.get_network(store, network_id)
        assert done is not None
        offerings = {o.id: o for o in await ns.list_offerings(store)}
        return {"network": await network_view(call, done, offerings, await zone_names(call))}

    job = await call.jobs.submit(
        call.ctx, "updateNetwork", call.user.account_id, work, "Network", network_id
    )
    if new_offering is not None:
        log.info(
            "event=network_offering_changed network=%s offering=%s resize=%s",
            network_id,
            new_offering.id,
            resize,
        )
    return AsyncResult(job, id=network_id)


@api_command(
    "changeServiceForRouter",
    "Changes the service offering (sizing) of a router's network. A running router is "
    "replaced: a new router with the new sizing is up and configured before this one goes "
    "(the returned router is the new one). A stopped router keeps its id and gets the new "
    "sizing when it next starts",
    params=(
        Param("id", PType.UUID, required=True, description="the ID of the router"),
        Param("serviceofferingid", PType.UUID, required=True,
              description="a system offering for domain routers"),
    ),
    is_async=True,
    admin=True,
)  # fmt: skip
async def change_service_for_router(call: Call) -> AsyncResult:
    vm = await router_or_431(call, call.args["id"])
    store = call.ctx.store
    so = call.args["serviceofferingid"]
    offering = next((o for o in await ns.list_router_offerings(store) if o.id == so), None)
    if offering is None:
        raise param_error(f"Unable to find system service offering {so} for domain routers")
    network_id = await ns.network_of_router(store, vm.id)
    if network_id is None:
        raise param_error(f"Router {vm.name} belongs to no network")
    current = vm.details.get("service_offering_id") if vm.details else None
    if current == so:
        raise param_error(f"Router {vm.name} already uses service offering {offering.name}")

    async def resized_in_place() -> dict[str, Any]:
        same = await store.get_system_vm(vm.id)
        if same is None:
            raise param_error(f"Unable to find router with id {vm.id}")
        return {"router": await router_view(call, same)}

    async with store.transaction() as tx:
        await tx.execute(
            "UPDATE networks SET service_offering_id = ? WHERE id = ?", (so, network_id)
        )
        # Read in the transaction: a start that began meanwhile gets a rolling replacement.
        rows = await tx.fetchall("SELECT state, details FROM system_vms WHERE id = ?", (vm.id,))
        if (
            rows
            and rows[0]["state"] == VmState.STOPPED
            and await ns.router_ids(tx, network_id) == [vm.id]
        ):  # CloudStack's way: the same router, sized anew when it next starts
            raw = rows[0]["details"]
            details = json.loads(raw or "{}") if isinstance(raw, str) else dict(raw or {})
            await tx.update_system_vm(vm.id, details={**details, "service_offering_id": so})
            job = await call.jobs.submit(
                call.ctx, "changeServiceForRouter", call.user.account_id, resized_in_place,
                "DomainRouter", vm.id, tx=tx,
            )  # fmt: skip
            log.info("event=router_resize router=%s offering=%s in_place=1", vm.name, so)
            return AsyncResult(job, id=vm.id)

    async def work() -> dict[str, Any]:
        try:
            new = await _resize(call, network_id)
        except ApiError as e:  # the old router stays, with its sizing
            async with store.transaction() as tx:
                await tx.execute(
                    "UPDATE networks SET service_offering_id = ? WHERE id = ?",
                    (current, network_id),
                )
            raise ApiError(e.errorcode, f"{e.text} (the sizing was not changed)") from None
        return {"router": await router_view(call, new)}

    job = await call.jobs.submit(
        call.ctx, "changeServiceForRouter", call.user.account_id, work, "DomainRouter", vm.id
    )
    log.info("event=router_resize router=%s offering=%s", vm.name, so)
    return AsyncResult(job, id=vm.id)


__all__ = ["network_view", "required_router_version", "requires_upgrade", "router_view"]
