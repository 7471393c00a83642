"""Public IPs and the rules on them, CloudStack's commands and shapes:
associateIpAddress, listPublicIpAddresses, disassociateIpAddress, enableStaticNat,
disableStaticNat, createFirewallRule / listFirewallRules / deleteFirewallRule,
createEgressFirewallRule / listEgressFirewallRules / deleteEgressFirewallRule,
createPortForwardingRule / listPortForwardingRules / deletePortForwardingRule,
createLoadBalancerRule / listLoadBalancerRules / deleteLoadBalancerRule,
assignToLoadBalancerRule, removeFromLoadBalancerRule, listLoadBalancerRuleInstances.

Every change is validated (431 on bad or conflicting input), written together with the
routers' new desired version in one transaction, and the async job then waits for the
routers to acknowledge it. A router that reports a failed apply fails the job with its
reason, and the change is undone (the rule never stays half-applied).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from manager.api.commands.net_common import (
    cidrlist,
    guest_names,
    network_or_431,
    owner,
    public_ip_or_431,
    submit_apply,
    zone_names,
)
from manager.api.dispatch import Call, Param, PType, api_command, keyword_match
from manager.api.responses import AsyncResult, ListResult, fmt_date, param_error
from manager.network import ipam
from manager.network import store as ns
from manager.network import validate as v
from manager.network.model import (
    ISOLATED,
    FirewallRule,
    LbRule,
    Network,
    PortForwardingRule,
    PublicIp,
)
from manager.network.runtime import changed, wait_applied
from manager.network.validate import NetError

FW_TABLE, PF_TABLE, LB_TABLE = "firewall_rules", "port_forwarding_rules", "lb_rules"


# --- common --------------------------------------------------------------------------


def _need_service(net: Network, services: tuple[str, ...], service: str) -> None:
    if net.guest_type != ISOLATED or service not in services:
        raise NetError(f"network {net.name} does not provide the {service} service")


async def _services(call: Call, net: Network) -> tuple[str, ...]:
    o = await ns.get_offering(call.ctx.store, net.offering_id)
    return o.services if o else ()


async def _ip_network(call: Call, ip: PublicIp, service: str) -> Network:
    if ip.network_id is None:
        raise param_error(f"IP address {ip.address} is not associated with a network")
    net = await network_or_431(call, ip.network_id)
    try:
        _need_service(net, await _services(call, net), service)
    except NetError as e:
        raise param_error(str(e)) from None
    return net


async def _vm_nic_ip(tx: Any, network_id: str, vm_id: str, vm_ip: str | None) -> str:
    nics = await ns.list_nics(tx, network_id=network_id, vm_id=vm_id)
    if not nics:
        raise NetError(f"virtual machine {vm_id} has no NIC on network {network_id}")
    if vm_ip is not None and vm_ip != nics[0].ip:
        raise NetError(f"vmguestip {vm_ip} is not the address of virtual machine {vm_id}")
    return nics[0].ip


async def _commit(
    call: Call,
    command: str,
    network_id: str,
    build: Callable[[Any], Awaitable[str]],
    result: Callable[[str], Awaitable[Mapping[str, Any]]],
    *,
    instance_type: str,
    undo_table: str | None,
) -> AsyncResult:
    """Validate + write + bump + the job that waits for the routers, in one transaction
    (431 on NetError)."""
    object_id = ""

    async def undo_fn() -> None:
        assert undo_table is not None
        async with call.ctx.store.transaction() as tx2:
            await ns.delete_rule(tx2, undo_table, object_id)
            await changed(tx2, network_id)

    async def res() -> Mapping[str, Any]:
        return await result(object_id)

    try:
        async with call.ctx.store.transaction() as tx:
            object_id = await build(tx)
            versions = await changed(tx, network_id)
            return await submit_apply(
                call,
                command,
                versions,
                res,
                instance_type=instance_type,
                instance_id=object_id,
                on_failure=undo_fn if undo_table is not None else None,
                tx=tx,
            )
    except NetError as e:
        raise param_error(str(e)) from None


async def _delete(
    call: Call, command: str, rule_id: str, tables: tuple[str, ...], instance_type: str
) -> AsyncResult:
    found = await ns.find_rule(call.ctx.store, rule_id)
    if found is None or found[0] not in tables:
        raise param_error(f"Unable to find rule with id {rule_id}")
    table, network_id = found

    async def ok() -> Mapping[str, Any]:
        return {"success": True}

    async with call.ctx.store.transaction() as tx:
        await ns.delete_rule(tx, table, rule_id)
        versions = await changed(tx, network_id)
        return await submit_apply(
            call, command, versions, ok, instance_type=instance_type, instance_id=rule_id, tx=tx
        )


# --- public IPs ----------------------------------------------------------------------


async def ip_view(call: Call, p: PublicIp, zones: dict[str, str]) -> dict[str, Any]:
    store = call.ctx.store
    net = await ns.get_network(store, p.network_id) if p.network_id else None
    traffic = await ns.traffic(store, p.network_id) if p.network_id else {}
    vm = (await guest_names(call)).get(p.static_nat_vm_id or "")
    view: dict[str, Any] = {
        "id": p.id,
        "ipaddress": p.address,
        "allocated": fmt_date(p.allocated),
        "zoneid": p.zone_id,
        "zonename": zones.get(p.zone_id, ""),
        "issourcenat": p.is_source_nat,
        **owner(call),
        "forvirtualnetwork": True,
        "isstaticnat": p.static_nat_vm_id is not None,
        "issystem": False,
        "virtualmachineid": p.static_nat_vm_id,
        "virtualmachinename": vm[0] if vm else None,
        "virtualmachinedisplayname": vm[1] if vm else None,
        "vmipaddress": p.static_nat_ip,
        "associatednetworkid": p.network_id,
        "associatednetworkname": net.name if net else None,
        "state": "Allocated",
        "isportable": False,
        "fordisplay": True,
        "receivedbytes": traffic.get(p.address, (0, 0))[0],
        "sentbytes": traffic.get(p.address, (0, 0))[1],
    }
    return {k: v for k, v in view.items() if v is not None}


@api_command(
    "associateIpAddress",
    "Acquires a public IP address from the zone's public range for a network",
    params=(
        Param("networkid", PType.UUID, required=True, description="the network"),
        Param("zoneid", PType.UUID, description="accepted; the network's zone is used"),
        Param("ipaddress", description="a specific address of the public range"),
    ),
    is_async=True,
)
async def associate_ip(call: Call) -> AsyncResult:
    net = await network_or_431(call, call.args["networkid"])
    zone = next(z for z in await call.ctx.store.list_zones() if z.id == net.zone_id)
    wanted = call.args.get("ipaddress")

    async def build(tx: Any) -> str:
        if net.guest_type != ISOLATED:
            raise NetError(f"network {net.name} is Shared: public IPs belong to isolated networks")
        used = await ns.used_public_addresses(tx, net.zone_id)
        if wanted:
            addr = str(v.ip(wanted, "ipaddress"))
            start, end = ipam.host_range(zone.public_cidr, skip_first=1)
            if not v.ip(start, "start") <= v.ip(addr, "ipaddress") <= v.ip(end, "end"):
                raise NetError(f"IP address {addr} is outside the public range {zone.public_cidr}")
            if addr in used:
                raise NetError(f"IP address {addr} is already in use")
        else:
            addr = ipam.allocate_public(zone.public_cidr, used)
        p = PublicIp(
            id=ns.new_id(),
            zone_id=net.zone_id,
            address=addr,
            network_id=net.id,
            is_source_nat=False,
            static_nat_vm_id=None,
            static_nat_ip=None,
            account_id=call.user.account_id,
            allocated=call.ctx.clock(),
        )
        await ns.add_public_ip(tx, p)
        return p.id

    async def result(ip_id: str) -> Mapping[str, Any]:
        p = await ns.get_public_ip(call.ctx.store, ip_id)
        return {"ipaddress": await ip_view(call, p, await zone_names(call))} if p else {}

    async def undo_ip(ip_id: str) -> None:
        async with call.ctx.store.transaction() as tx:
            await ns.delete_public_ip(tx, ip_id)
            await changed(tx, net.id)

    ip_id = ""

    async def res() -> Mapping[str, Any]:
        return await result(ip_id)

    async def undo() -> None:
        await undo_ip(ip_id)

    try:
        async with call.ctx.store.transaction() as tx:
            ip_id = await build(tx)
            versions = await changed(tx, net.id)
            return await submit_apply(
                call,
                "associateIpAddress",
                versions,
                res,
                instance_type="IpAddress",
                instance_id=ip_id,
                on_failure=undo,
                tx=tx,
            )
    except NetError as e:
        raise param_error(str(e)) from None


@api_command(
    "listPublicIpAddresses",
    "Lists public IP addresses (with the traffic counted on each)",
    params=(
        Param("id", PType.UUID, description="the ID of the address"),
        Param("ipaddress", description="the address"),
        Param("associatednetworkid", PType.UUID, description="the network"),
        Param("zoneid", PType.UUID, description="the zone"),
        Param("issourcenat", PType.BOOLEAN, description="source NAT addresses only"),
        Param("isstaticnat", PType.BOOLEAN, description="static NAT addresses only"),
        Param("allocatedonly", PType.BOOLEAN, description="accepted; all listed are allocated"),
        Param("forvirtualnetwork", PType.BOOLEAN, description="accepted for compatibility"),
        Param("account", description="accepted for compatibility"),
        Param("domainid", PType.UUID, description="accepted for compatibility"),
    ),
    listing=True,
    response_fields=("id", "ipaddress", "issourcenat", "isstaticnat", "associatednetworkid"),
)
async def list_public_ips(call: Call) -> ListResult:
    a = call.args
    zones = await zone_names(call)
    out = [
        await ip_view(call, p, zones)
        for p in await ns.list_public_ips(
            call.ctx.store, zone_id=a.get("zoneid"), network_id=a.get("associatednetworkid")
        )
        if a.get("id") in (None, p.id)
        and a.get("ipaddress") in (None, p.address)
        and a.get("issourcenat") in (None, p.is_source_nat)
        and a.get("isstaticnat") in (None, p.static_nat_vm_id is not None)
        and keyword_match(a.get("keyword"), p.address)
    ]
    return ListResult("publicipaddress", out)


@api_command(
    "disassociateIpAddress",
    "Releases a public IP address (and the rules on it)",
    params=(Param("id", PType.UUID, required=True, description="the ID of the address"),),
    is_async=True,
)
async def disassociate_ip(call: Call) -> AsyncResult:
    p = await public_ip_or_431(call, call.args["id"], "id")
    if p.is_source_nat:
        raise param_error(
            f"IP address {p.address} is the source NAT address of its network; it is "
            "released with the network (deleteNetwork)"
        )
    network_id = p.network_id

    async def ok() -> Mapping[str, Any]:
        return {"success": True}

    async with call.ctx.store.transaction() as tx:
        for table in (FW_TABLE, PF_TABLE, LB_TABLE):
            for r in await tx.fetchall(
                f"SELECT id FROM {table} WHERE public_ip_id = ?",  # noqa: S608 - fixed names
                (p.id,),
            ):
                await ns.delete_rule(tx, table, r["id"])
        await ns.delete_public_ip(tx, p.id)
        versions = await changed(tx, network_id) if network_id else {}
        return await submit_apply(
            call,
            "disassociateIpAddress",
            versions,
            ok,
            instance_type="IpAddress",
            instance_id=p.id,
            tx=tx,
        )


@api_command(
    "enableStaticNat",
    "Enables static NAT (one-to-one) from a public IP to a guest VM",
    params=(
        Param("ipaddressid", PType.UUID, required=True, description="the public IP"),
        Param("virtualmachineid", PType.UUID, required=True, description="the guest VM"),
        Param("networkid", PType.UUID, description="the guest network (default: the IP's)"),
        Param("vmguestip", description="the VM's address on the network"),
    ),
)
async def enable_static_nat(call: Call) -> dict[str, Any]:
    a = call.args
    p = await public_ip_or_431(call, a["ipaddressid"])
    net = await _ip_network(call, p, "StaticNat")
    if a.get("networkid") not in (None, net.id):
        raise param_error(
            f"IP address {p.address} belongs to network {net.id}, not {a['networkid']}"
        )
    vm_id = a["virtualmachineid"]
    try:
        async with call.ctx.store.transaction() as tx:
            if p.is_source_nat:
                raise NetError(f"IP address {p.address} is the source NAT address; use another")
            if p.static_nat_vm_id is not None:
                raise NetError(
                    f"IP address {p.address} already has static NAT to {p.static_nat_vm_id}"
                )
            if await ns.list_forwards(tx, public_ip_id=p.id) or await ns.list_lbs(
                tx, public_ip_id=p.id
            ):
                raise NetError(f"IP address {p.address} has port forwarding or load balancer rules")
            vm_ip = await _vm_nic_ip(tx, net.id, vm_id, a.get("vmguestip"))
            for other in await ns.list_public_ips(tx, network_id=net.id):
                if other.static_nat_vm_id == vm_id:
                    raise NetError(
                        f"virtual machine {vm_id} already has static NAT on {other.address}"
                    )
            await ns.set_static_nat(tx, p.id, vm_id, vm_ip)
            versions = await changed(tx, net.id)
    except NetError as e:
        raise param_error(str(e)) from None
    try:
        await wait_applied(call.ctx.store, versions)
    except Exception:
        async with call.ctx.store.transaction() as tx:
            await ns.set_static_nat(tx, p.id, None, None)
            await changed(tx, net.id)
        raise
    return {"success": True}


@api_command(
    "disableStaticNat",
    "Disables static NAT on a public IP",
    params=(Param("ipaddressid", PType.UUID, required=True, description="the public IP"),),
    is_async=True,
)
async def disable_static_nat(call: Call) -> AsyncResult:
    p = await public_ip_or_431(call, call.args["ipaddressid"])
    if p.static_nat_vm_id is None or p.network_id is None:
        raise param_error(f"Static NAT is not enabled on IP address {p.address}")
    network_id = p.network_id

    async def ok() -> Mapping[str, Any]:
        return {"success": True}

    async with call.ctx.store.transaction() as tx:
        await ns.set_static_nat(tx, p.id, None, None)
        versions = await changed(tx, network_id)
        return await submit_apply(
            call,
            "disableStaticNat",
            versions,
            ok,
            instance_type="IpAddress",
            instance_id=p.id,
            tx=tx,
        )


# --- firewall (ingress and egress) -----------------------------------------------------


def fw_view(r: FirewallRule, address: str | None, call: Call) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": r.id,
        "protocol": r.protocol,
        "startport": r.start_port,
        "endport": r.end_port,
        "ipaddressid": r.public_ip_id,
        "ipaddress": address,
        "networkid": r.network_id,
        "state": "Active",
        "icmptype": r.icmp_type if r.protocol == "icmp" else None,
        "icmpcode": r.icmp_code if r.protocol == "icmp" else None,
        "traffictype": r.traffic_type,
        "fordisplay": True,
        "tags": [],
    }
    if r.traffic_type == "Ingress":
        view["cidrlist"] = cidrlist(r.cidrs)
    else:
        view["destcidrlist"] = cidrlist(r.cidrs)
    _ = call
    return {k: v for k, v in view.items() if v is not None}


_FW_PARAMS = (
    Param("protocol", required=True, description="TCP, UDP, ICMP or ALL"),
    Param("startport", PType.INTEGER, description="the starting port"),
    Param("endport", PType.INTEGER, description="the ending port"),
    Param("icmptype", PType.INTEGER, description="ICMP type (-1: any)"),
    Param("icmpcode", PType.INTEGER, description="ICMP code (-1: any)"),
    Param("type", description="user or system", choices=("user", "system")),
    Param("fordisplay", PType.BOOLEAN, description="accepted for compatibility"),
)


async def _new_filter(
    tx: Any,
    *,
    network_id: str,
    traffic_type: str,
    public_ip_id: str | None,
    protocol: str,
    start: int | None,
    end: int | None,
    icmp_type: int | None,
    icmp_code: int | None,
    cidrs: tuple[str, ...],
    account_id: str,
    now: float,
    related: str | None = None,
) -> FirewallRule:
    proto = v.protocol(protocol)
    ports, t, c = v.filter_rule_ports(proto, start, end, icmp_type, icmp_code)
    v.firewall_conflict(
        traffic_type=traffic_type,
        public_ip_id=public_ip_id,
        proto=proto,
        ports=ports,
        icmp_type=t,
        cidrs=cidrs,
        existing=await ns.list_firewall(tx, network_id=network_id, traffic_type=traffic_type),
    )
    rule = FirewallRule(
        id=ns.new_id(),
        network_id=network_id,
        traffic_type=traffic_type,
        public_ip_id=public_ip_id,
        protocol=proto,
        start_port=ports[0] if ports else None,
        end_port=ports[1] if ports else None,
        icmp_type=t,
        icmp_code=c,
        cidrs=cidrs,
        account_id=account_id,
        created=now,
        related_rule_id=related,
    )
    await ns.add_firewall(tx, rule)
    return rule


async def _fw_result(call: Call, rule_id: str) -> Mapping[str, Any]:
    rules = await ns.list_firewall(call.ctx.store, rule_id=rule_id)
    if not rules:
        return {}
    r = rules[0]
    ip = await ns.get_public_ip(call.ctx.store, r.public_ip_id) if r.public_ip_id else None
    return {"firewallrule": fw_view(r, ip.address if ip else None, call)}


@api_command(
    "createFirewallRule",
    "Creates an ingress firewall rule for a public IP",
    params=(
        Param("ipaddressid", PType.UUID, required=True, description="the public IP"),
        *_FW_PARAMS,
        Param("cidrlist", PType.LIST, description="source CIDRs (default 0.0.0.0/0)"),
    ),
    is_async=True,
)
async def create_firewall_rule(call: Call) -> AsyncResult:
    a = call.args
    p = await public_ip_or_431(call, a["ipaddressid"])
    net = await _ip_network(call, p, "Firewall")

    async def build(tx: Any) -> str:
        rule = await _new_filter(
            tx,
            network_id=net.id,
            traffic_type="Ingress",
            public_ip_id=p.id,
            protocol=a["protocol"],
            start=a.get("startport"),
            end=a.get("endport"),
            icmp_type=a.get("icmptype"),
            icmp_code=a.get("icmpcode"),
            cidrs=v.cidr_list(a.get("cidrlist")),
            account_id=call.user.account_id,
            now=call.ctx.clock(),
        )
        return rule.id

    return await _commit(
        call,
        "createFirewallRule",
        net.id,
        build,
        lambda rid: _fw_result(call, rid),
        instance_type="FirewallRule",
        undo_table=FW_TABLE,
    )


async def _list_filters(call: Call, traffic_type: str) -> ListResult:
    a = call.args
    store = call.ctx.store
    ips = {p.id: p.address for p in await ns.list_public_ips(store)}
    out = [
        fw_view(r, ips.get(r.public_ip_id or ""), call)
        for r in await ns.list_firewall(
            store, network_id=a.get("networkid"), traffic_type=traffic_type
        )
        if a.get("id") in (None, r.id)
        and a.get("ipaddressid") in (None, r.public_ip_id)
        and keyword_match(a.get("keyword"), r.protocol, ips.get(r.public_ip_id or ""))
    ]
    return ListResult("firewallrule", out)


@api_command(
    "listFirewallRules",
    "Lists ingress firewall rules",
    params=(
        Param("id", PType.UUID, description="the rule"),
        Param("ipaddressid", PType.UUID, description="the public IP"),
        Param("networkid", PType.UUID, description="the network"),
    ),
    listing=True,
    response_fields=("id", "protocol", "startport", "endport", "ipaddress", "cidrlist"),
)
async def list_firewall_rules(call: Call) -> ListResult:
    return await _list_filters(call, "Ingress")


@api_command(
    "deleteFirewallRule",
    "Deletes an ingress firewall rule",
    params=(Param("id", PType.UUID, required=True, description="the rule"),),
    is_async=True,
)
async def delete_firewall_rule(call: Call) -> AsyncResult:
    if not await ns.list_firewall(call.ctx.store, traffic_type="Ingress", rule_id=call.args["id"]):
        raise param_error(f"Unable to find firewall rule with id {call.args['id']}")
    return await _delete(call, "deleteFirewallRule", call.args["id"], (FW_TABLE,), "FirewallRule")


@api_command(
    "createEgressFirewallRule",
    "Creates an egress firewall rule for a network (an exception to its egress default)",
    params=(
        Param("networkid", PType.UUID, required=True, description="the network"),
        *_FW_PARAMS,
        Param("cidrlist", PType.LIST, description="source CIDRs: the whole network only"),
        Param("destcidrlist", PType.LIST, description="destination CIDRs (default any)"),
    ),
    is_async=True,
)
async def create_egress_rule(call: Call) -> AsyncResult:
    a = call.args
    net = await network_or_431(call, a["networkid"])
    try:
        _need_service(net, await _services(call, net), "Firewall")
        source = v.cidr_list(a.get("cidrlist"))
        if source not in ((), (net.cidr,)):
            raise NetError(
                f"cidrlist {','.join(source)}: egress rules apply to the whole network "
                f"{net.cidr}; narrow them by destcidrlist"
            )
    except NetError as e:
        raise param_error(str(e)) from None

    async def build(tx: Any) -> str:
        rule = await _new_filter(
            tx,
            network_id=net.id,
            traffic_type="Egress",
            public_ip_id=None,
            protocol=a["protocol"],
            start=a.get("startport"),
            end=a.get("endport"),
            icmp_type=a.get("icmptype"),
            icmp_code=a.get("icmpcode"),
            cidrs=v.cidr_list(a.get("destcidrlist"), "destcidrlist"),
            account_id=call.user.account_id,
            now=call.ctx.clock(),
        )
        return rule.id

    return await _commit(
        call,
        "createEgressFirewallRule",
        net.id,
        build,
        lambda rid: _fw_result(call, rid),
        instance_type="FirewallRule",
        undo_table=FW_TABLE,
    )


@api_command(
    "listEgressFirewallRules",
    "Lists egress firewall rules",
    params=(
        Param("id", PType.UUID, description="the rule"),
        Param("networkid", PType.UUID, description="the network"),
        Param("ipaddressid", PType.UUID, description="accepted for compatibility"),
    ),
    listing=True,
    response_fields=("id", "protocol", "startport", "endport", "destcidrlist"),
)
async def list_egress_rules(call: Call) -> ListResult:
    return await _list_filters(call, "Egress")


@api_command(
    "deleteEgressFirewallRule",
    "Deletes an egress firewall rule",
    params=(Param("id", PType.UUID, required=True, description="the rule"),),
    is_async=True,
)
async def delete_egress_rule(call: Call) -> AsyncResult:
    if not await ns.list_firewall(call.ctx.store, traffic_type="Egress", rule_id=call.args["id"]):
        raise param_error(f"Unable to find egress firewall rule with id {call.args['id']}")
    return await _delete(
        call, "deleteEgressFirewallRule", call.args["id"], (FW_TABLE,), "FirewallRule"
    )


async def _open_firewall(
    tx: Any,
    network_id: str,
    ip_id: str,
    proto: str,
    ports: tuple[int, int],
    related: str,
    account_id: str,
    now: float,
    cidrs: tuple[str, ...],
) -> None:
    """openfirewall=true: an ingress rule for the public ports, unless one already covers
    them (an overlapping rule is the operator's; it is left alone)."""
    with contextlib.suppress(NetError):
        await _new_filter(
            tx,
            network_id=network_id,
            traffic_type="Ingress",
            public_ip_id=ip_id,
            protocol=proto,
            start=ports[0],
            end=ports[1],
            icmp_type=None,
            icmp_code=None,
            cidrs=cidrs,
            account_id=account_id,
            now=now,
            related=related,
        )


# --- port forwarding ----------------------------------------------------------------


def pf_view(
    f: PortForwardingRule, address: str, names: dict[str, tuple[str, str]]
) -> dict[str, Any]:
    vm = names.get(f.vm_id)
    view: dict[str, Any] = {
        "id": f.id,
        "privateport": str(f.private_start),
        "privateendport": str(f.private_end),
        "protocol": f.protocol,
        "publicport": str(f.public_start),
        "publicendport": str(f.public_end),
        "virtualmachineid": f.vm_id,
        "virtualmachinename": vm[0] if vm else None,
        "virtualmachinedisplayname": vm[1] if vm else None,
        "ipaddressid": f.public_ip_id,
        "ipaddress": address,
        "vmguestip": f.vm_ip,
        "state": "Active",
        "cidrlist": cidrlist(f.cidrs),
        "networkid": f.network_id,
        "fordisplay": True,
        "tags": [],
    }
    return {k: v for k, v in view.items() if v is not None}


@api_command(
    "createPortForwardingRule",
    "Creates a port forwarding rule from a public IP to a guest VM",
    params=(
        Param("ipaddressid", PType.UUID, required=True, description="the public IP"),
        Param("protocol", required=True, description="TCP or UDP"),
        Param("publicport", PType.INTEGER, required=True, description="first public port"),
        Param("publicendport", PType.INTEGER, description="last public port"),
        Param("privateport", PType.INTEGER, required=True, description="first private port"),
        Param("privateendport", PType.INTEGER, description="last private port"),
        Param("virtualmachineid", PType.UUID, required=True, description="the guest VM"),
        Param("vmguestip", description="the VM's address on the network"),
        Param("networkid", PType.UUID, description="the network (default: the IP's)"),
        Param("cidrlist", PType.LIST, description="source CIDRs for the opened firewall"),
        Param("openfirewall", PType.BOOLEAN, description="also open the firewall (default true)"),
        Param("fordisplay", PType.BOOLEAN, description="accepted for compatibility"),
    ),
    is_async=True,
)
async def create_port_forwarding_rule(call: Call) -> AsyncResult:
    a = call.args
    p = await public_ip_or_431(call, a["ipaddressid"])
    net = await _ip_network(call, p, "PortForwarding")

    async def build(tx: Any) -> str:
        proto = v.protocol(a["protocol"], ("tcp", "udp"))
        public = v.port_range(a["publicport"], a.get("publicendport"), "port")
        private = v.port_range(a["privateport"], a.get("privateendport"), "port")
        assert public is not None and private is not None
        v.forward_lengths(public, private)
        cur = await ns.get_public_ip(tx, p.id)
        if cur is None:
            raise NetError(f"IP address {p.address} was released")
        if cur.static_nat_vm_id is not None:
            raise NetError(f"IP address {p.address} has static NAT; disable it first")
        v.forward_conflict(
            public_ip_id=p.id,
            proto=proto,
            ports=public,
            forwards=await ns.list_forwards(tx, public_ip_id=p.id),
            balancers=await ns.list_lbs(tx, public_ip_id=p.id),
        )
        vm_ip = await _vm_nic_ip(tx, net.id, a["virtualmachineid"], a.get("vmguestip"))
        now = call.ctx.clock()
        cidrs = v.cidr_list(a.get("cidrlist"))
        rule = PortForwardingRule(
            id=ns.new_id(),
            network_id=net.id,
            public_ip_id=p.id,
            protocol=proto,
            public_start=public[0],
            public_end=public[1],
            private_start=private[0],
            private_end=private[1],
            vm_id=a["virtualmachineid"],
            vm_ip=vm_ip,
            cidrs=cidrs,
            account_id=call.user.account_id,
            created=now,
        )
        await ns.add_forward(tx, rule)
        if a.get("openfirewall", True):
            await _open_firewall(
                tx, net.id, p.id, proto, public, rule.id, call.user.account_id, now, cidrs
            )
        return rule.id

    async def result(rule_id: str) -> Mapping[str, Any]:
        rules = [
            f for f in await ns.list_forwards(call.ctx.store, public_ip_id=p.id) if f.id == rule_id
        ]
        if not rules:
            return {}
        return {"portforwardingrule": pf_view(rules[0], p.address, await guest_names(call))}

    return await _commit(
        call,
        "createPortForwardingRule",
        net.id,
        build,
        result,
        instance_type="PortForwardingRule",
        undo_table=PF_TABLE,
    )


@api_command(
    "listPortForwardingRules",
    "Lists port forwarding rules",
    params=(
        Param("id", PType.UUID, description="the rule"),
        Param("ipaddressid", PType.UUID, description="the public IP"),
        Param("networkid", PType.UUID, description="the network"),
    ),
    listing=True,
    response_fields=("id", "protocol", "publicport", "privateport", "virtualmachineid"),
)
async def list_port_forwarding_rules(call: Call) -> ListResult:
    a = call.args
    store = call.ctx.store
    ips = {p.id: p.address for p in await ns.list_public_ips(store)}
    names = await guest_names(call)
    out = [
        pf_view(f, ips.get(f.public_ip_id, ""), names)
        for f in await ns.list_forwards(
            store, network_id=a.get("networkid"), public_ip_id=a.get("ipaddressid")
        )
        if a.get("id") in (None, f.id) and keyword_match(a.get("keyword"), ips.get(f.public_ip_id))
    ]
    return ListResult("portforwardingrule", out)


@api_command(
    "deletePortForwardingRule",
    "Deletes a port forwarding rule (and the firewall rule it opened)",
    params=(Param("id", PType.UUID, required=True, description="the rule"),),
    is_async=True,
)
async def delete_port_forwarding_rule(call: Call) -> AsyncResult:
    return await _delete(
        call, "deletePortForwardingRule", call.args["id"], (PF_TABLE,), "PortForwardingRule"
    )


# --- load balancers ------------------------------------------------------------------


def lb_view(lb: LbRule, address: str, zone_id: str, call: Call) -> dict[str, Any]:
    return {
        "id": lb.id,
        "name": lb.name,
        "description": lb.description,
        "publicipid": lb.public_ip_id,
        "publicip": address,
        "publicport": str(lb.public_port),
        "privateport": str(lb.private_port),
        "algorithm": lb.algorithm,
        "networkid": lb.network_id,
        "cidrlist": cidrlist(lb.cidrs),
        "protocol": lb.protocol,
        "state": "Active",
        "zoneid": zone_id,
        "fordisplay": True,
        "tags": [],
        **owner(call),
    }


async def _lb_or_431(call: Call, rule_id: str) -> LbRule:
    found = await ns.list_lbs(call.ctx.store, rule_id=rule_id)
    if not found:
        raise param_error(f"Unable to find load balancer rule with id {rule_id}")
    return found[0]


@api_command(
    "createLoadBalancerRule",
    "Creates a load balancer rule on a public IP",
    params=(
        Param("name", required=True, description="the name of the rule"),
        Param("algorithm", required=True, description="source, roundrobin or leastconn"),
        Param("privateport", PType.INTEGER, required=True, description="the members' port"),
        Param("publicport", PType.INTEGER, required=True, description="the public port"),
        Param("publicipid", PType.UUID, required=True, description="the public IP"),
        Param("networkid", PType.UUID, description="the network (default: the IP's)"),
        Param("description", description="the description of the rule", length=4096),
        Param("cidrlist", PType.LIST, description="source CIDRs for the opened firewall"),
        Param("protocol", description="tcp", choices=("tcp", "TCP")),
        Param("openfirewall", PType.BOOLEAN, description="also open the firewall (default true)"),
        Param("zoneid", PType.UUID, description="accepted for compatibility"),
        Param("fordisplay", PType.BOOLEAN, description="accepted for compatibility"),
    ),
    is_async=True,
)
async def create_lb_rule(call: Call) -> AsyncResult:
    a = call.args
    p = await public_ip_or_431(call, a["publicipid"], "publicipid")
    net = await _ip_network(call, p, "Lb")

    async def build(tx: Any) -> str:
        name = v.lb_name(a["name"])
        algo = v.algorithm(a["algorithm"])
        public = v.port(a["publicport"], "publicport")
        private = v.port(a["privateport"], "privateport")
        cur = await ns.get_public_ip(tx, p.id)
        if cur is None:
            raise NetError(f"IP address {p.address} was released")
        if cur.static_nat_vm_id is not None:
            raise NetError(f"IP address {p.address} has static NAT; disable it first")
        lbs = await ns.list_lbs(tx, network_id=net.id)
        if any(lb.name == name for lb in lbs):
            raise NetError(f"a load balancer rule named {name!r} exists on network {net.name}")
        v.forward_conflict(
            public_ip_id=p.id,
            proto="tcp",
            ports=(public, public),
            forwards=await ns.list_forwards(tx, public_ip_id=p.id),
            balancers=[lb for lb in lbs if lb.public_ip_id == p.id],
        )
        now = call.ctx.clock()
        cidrs = v.cidr_list(a.get("cidrlist"))
        rule = LbRule(
            id=ns.new_id(),
            network_id=net.id,
            public_ip_id=p.id,
            name=name,
            description=a.get("description") or "",
            algorithm=algo,
            public_port=public,
            private_port=private,
            protocol="tcp",
            cidrs=cidrs,
            account_id=call.user.account_id,
            created=now,
        )
        await ns.add_lb(tx, rule)
        if a.get("openfirewall", True):
            await _open_firewall(
                tx, net.id, p.id, "tcp", (public, public), rule.id, call.user.account_id, now, cidrs
            )
        return rule.id

    async def result(rule_id: str) -> Mapping[str, Any]:
        lb = await _lb_or_431(call, rule_id)
        return {"loadbalancer": lb_view(lb, p.address, net.zone_id, call)}

    return await _commit(
        call,
        "createLoadBalancerRule",
        net.id,
        build,
        result,
        instance_type="LoadBalancerRule",
        undo_table=LB_TABLE,
    )


@api_command(
    "listLoadBalancerRules",
    "Lists load balancer rules",
    params=(
        Param("id", PType.UUID, description="the rule"),
        Param("name", description="the name of the rule"),
        Param("publicipid", PType.UUID, description="the public IP"),
        Param("networkid", PType.UUID, description="the network"),
        Param("virtualmachineid", PType.UUID, description="rules with this member"),
        Param("zoneid", PType.UUID, description="the zone"),
    ),
    listing=True,
    response_fields=("id", "name", "publicip", "publicport", "privateport", "algorithm"),
)
async def list_lb_rules(call: Call) -> ListResult:
    a = call.args
    store = call.ctx.store
    ips = {p.id: p for p in await ns.list_public_ips(store)}
    out = []
    for lb in await ns.list_lbs(
        store, network_id=a.get("networkid"), public_ip_id=a.get("publicipid")
    ):
        ip = ips.get(lb.public_ip_id)
        zone_id = ip.zone_id if ip else ""
        if not (
            a.get("id") in (None, lb.id)
            and a.get("name") in (None, lb.name)
            and a.get("zoneid") in (None, zone_id)
            and (
                a.get("virtualmachineid") is None
                or a["virtualmachineid"] in {m[0] for m in lb.members}
            )
            and keyword_match(a.get("keyword"), lb.name, lb.description)
        ):
            continue
        out.append(lb_view(lb, ip.address if ip else "", zone_id, call))
    return ListResult("loadbalancerrule", out)


@api_command(
    "deleteLoadBalancerRule",
    "Deletes a load balancer rule (and the firewall rule it opened)",
    params=(Param("id", PType.UUID, required=True, description="the rule"),),
    is_async=True,
)
async def delete_lb_rule(call: Call) -> AsyncResult:
    return await _delete(
        call, "deleteLoadBalancerRule", call.args["id"], (LB_TABLE,), "LoadBalancerRule"
    )


async def _members_change(call: Call, command: str, add: bool) -> AsyncResult:
    a = call.args
    lb = await _lb_or_431(call, a["id"])
    vm_ids: list[str] = list(a.get("virtualmachineids", []))
    for entry in a.get("vmidipmap", []):
        if "vmid" in entry:
            vm_ids.append(entry["vmid"])
    if not vm_ids:
        raise param_error("Give virtualmachineids (or vmidipmap) of the VMs")
    done: list[str] = []

    async def undo() -> None:
        if not add:
            return  # removing a member cannot make an apply fail in a way re-adding fixes
        async with call.ctx.store.transaction() as tx2:
            for vm_id in done:
                await ns.remove_lb_member(tx2, lb.id, vm_id)
            await changed(tx2, lb.network_id)

    async def ok() -> Mapping[str, Any]:
        return {"success": True}

    try:
        async with call.ctx.store.transaction() as tx:
            current = await ns.list_lbs(tx, rule_id=lb.id)
            if not current:  # deleted since the lookup above
                raise NetError(f"Unable to find load balancer rule with id {lb.id}")
            members = {m[0] for m in current[0].members}
            for vm_id in dict.fromkeys(vm_ids):
                if add:
                    if vm_id in members:
                        raise NetError(f"virtual machine {vm_id} is already assigned to {lb.name}")
                    vm_ip = await _vm_nic_ip(tx, lb.network_id, vm_id, None)
                    await ns.add_lb_member(tx, lb.id, vm_id, vm_ip)
                else:
                    if not await ns.remove_lb_member(tx, lb.id, vm_id):
                        raise NetError(f"virtual machine {vm_id} is not assigned to {lb.name}")
                done.append(vm_id)
            versions = await changed(tx, lb.network_id)
            return await submit_apply(
                call,
                command,
                versions,
                ok,
                instance_type="LoadBalancerRule",
                instance_id=lb.id,
                on_failure=undo if add else None,
                tx=tx,
            )
    except NetError as e:
        raise param_error(str(e)) from None


_MEMBER_PARAMS = (
    Param("id", PType.UUID, required=True, description="the load balancer rule"),
    Param("virtualmachineids", PType.LIST, item_type=PType.UUID, description="the guest VMs"),
    Param("vmidipmap", PType.MAP, description="vmid/vmip pairs"),
)


@api_command(
    "assignToLoadBalancerRule",
    "Assigns guest VMs to a load balancer rule",
    params=_MEMBER_PARAMS,
    is_async=True,
)
async def assign_to_lb(call: Call) -> AsyncResult:
    return await _members_change(call, "assignToLoadBalancerRule", add=True)


@api_command(
    "removeFromLoadBalancerRule",
    "Removes guest VMs from a load balancer rule",
    params=_MEMBER_PARAMS,
    is_async=True,
)
async def remove_from_lb(call: Call) -> AsyncResult:
    return await _members_change(call, "removeFromLoadBalancerRule", add=False)


@api_command(
    "listLoadBalancerRuleInstances",
    "Lists the guest VMs of a load balancer rule",
    params=(
        Param("id", PType.UUID, required=True, description="the load balancer rule"),
        Param("applied", PType.BOOLEAN, description="true: assigned VMs (the default)"),
        Param("lbvmips", PType.BOOLEAN, description="also list each VM's address"),
    ),
    listing=True,
    response_fields=("id", "name", "displayname", "nic"),
)
async def list_lb_instances(call: Call) -> ListResult:
    lb = await _lb_or_431(call, call.args["id"])
    names = await guest_names(call)
    if call.args.get("applied") is False:
        members = {m[0] for m in lb.members}
        nics = [
            n
            for n in await ns.list_nics(call.ctx.store, network_id=lb.network_id)
            if n.vm_id not in members
        ]
        pairs = [(n.vm_id, n.ip) for n in nics]
    else:
        pairs = list(lb.members)
    out: list[dict[str, Any]] = []
    for vm_id, vm_ip in pairs:
        name, display = names.get(vm_id, (vm_id, vm_id))
        vm: dict[str, Any] = {
            "id": vm_id,
            "name": name,
            "displayname": display,
            "nic": [{"networkid": lb.network_id, "ipaddress": vm_ip, "isdefault": True}],
        }
        if call.args.get("lbvmips"):
            out.append({"loadbalancerruleinstance": vm, "lbvmipaddresses": [vm_ip]})
        else:
            out.append(vm)
    key = "lbrulevmidip" if call.args.get("lbvmips") else "loadbalancerruleinstance"
    return ListResult(key, out)
