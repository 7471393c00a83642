"""The router's desired config (``config["router"]``) from the network model — pure.

The schema is the router role's (``agent/roles/router/config.py``, strictly parsed there:
unknown keys are errors). Output is deterministic (rules in creation order) so that the
same state renders the same dict and the agent's "nothing changed → touch nothing" holds.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from manager.network.model import (
    FirewallRule,
    NetworkState,
    PublicIp,
    RouterNics,
)


def _ports(start: int | None, end: int | None) -> str | None:
    if start is None or end is None:
        return None
    return str(start) if start == end else f"{start}-{end}"


def _ordered_ips(ips: tuple[PublicIp, ...]) -> list[PublicIp]:
    """Source NAT first (the primary address), then by allocation time."""
    return sorted(ips, key=lambda p: (not p.is_source_nat, p.allocated, p.address))


def _icmp_type(r: FirewallRule) -> str | None:
    if r.icmp_type is None:
        return None
    return str(r.icmp_type) if r.icmp_code is None else f"{r.icmp_type}/{r.icmp_code}"


def _filter(r: FirewallRule, address: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"protocol": r.protocol}
    if address is not None:
        out["public_ip"] = address
    ports = _ports(r.start_port, r.end_port)
    if ports is not None:
        out["ports"] = ports
    if r.protocol == "icmp" and r.icmp_type is not None:
        out["icmp_type"] = _icmp_type(r)
    key = "source_cidrs" if r.traffic_type == "Ingress" else "destination_cidrs"
    out[key] = list(r.cidrs)
    return out


def lb_config_name(rule_id: str) -> str:
    """haproxy section name of a load balancer rule (the API name may hold any text)."""
    return f"lb-{rule_id}"


def render_router(state: NetworkState, nics: RouterNics, stats_interval: float) -> dict[str, Any]:
    net = state.network
    services = set(state.offering.services)
    ips = _ordered_ips(state.public_ips)
    by_id = {p.id: p.address for p in ips}
    cidr = ipaddress.IPv4Network(net.cidr)
    public_net = ipaddress.IPv4Network(state.public_cidr, strict=False)

    # A router without a public NIC (Shared networks) serves DHCP, DNS and userdata only:
    # nothing hangs off public IPs, and it holds its own address, not the gateway.
    has_public = "public" in nics.devices
    guest: dict[str, Any] = {
        "device": nics.devices["guest"],
        "gateway": net.gateway,
        "cidr": str(cidr),
    }
    if net.router_ip and net.router_ip != net.gateway:
        guest["address"] = net.router_ip
    interfaces: dict[str, Any] = {}
    if has_public:
        interfaces["public"] = {
            "device": nics.devices["public"],
            "ips": [p.address for p in ips],
            "prefix": public_net.prefixlen,
        }
        if state.public_gateway:
            interfaces["public"]["gateway"] = state.public_gateway
    else:
        ips, by_id = [], {}
        services -= {"Firewall", "PortForwarding", "StaticNat", "SourceNat", "Lb"}
    interfaces["guest"] = guest
    if nics.control_ip:
        interfaces["control"] = {
            "device": nics.devices["control"],
            "ip": nics.control_ip,
            "prefix": nics.control_prefix,
        }

    rules = sorted(state.firewall, key=lambda r: (r.created, r.id))
    firewall = [
        _filter(r, by_id[r.public_ip_id])
        for r in rules
        if r.traffic_type == "Ingress" and r.public_ip_id in by_id and "Firewall" in services
    ]
    egress_rules = [_filter(r, None) for r in rules if r.traffic_type == "Egress"]
    egress = {
        "default": "allow" if state.offering.egress_default_allow else "deny",
        "rules": egress_rules if "Firewall" in services else [],
    }

    forwards = [
        {
            "public_ip": by_id[f.public_ip_id],
            "protocol": f.protocol,
            "public_ports": _ports(f.public_start, f.public_end),
            "guest_ip": f.vm_ip,
            "guest_ports": _ports(f.private_start, f.private_end),
        }
        for f in sorted(state.port_forwarding, key=lambda f: (f.created, f.id))
        if f.public_ip_id in by_id and "PortForwarding" in services
    ]
    static_nat = [
        {"public_ip": p.address, "guest_ip": p.static_nat_ip}
        for p in ips
        if p.static_nat_ip and "StaticNat" in services
    ]
    source_nat = next((p.address for p in ips if p.is_source_nat), None)
    balancers = [
        {
            "name": lb_config_name(lb.id),
            "public_ip": by_id[lb.public_ip_id],
            "public_port": lb.public_port,
            "algorithm": lb.algorithm,
            "members": [
                {"ip": vm_ip, "port": lb.private_port} for _vm, vm_ip in sorted(lb.members)
            ],
        }
        for lb in sorted(state.load_balancers, key=lambda lb: (lb.created, lb.id))
        if lb.public_ip_id in by_id and lb.members and "Lb" in services
    ]

    nics_sorted = sorted(state.nics, key=lambda n: (n.created, n.id))
    dhcp = (
        [{"mac": n.mac, "ip": n.ip, "hostname": n.name} for n in nics_sorted]
        if "Dhcp" in services
        else []
    )
    public_of = {p.static_nat_ip: p.address for p in ips if p.static_nat_ip}
    vm_data = []
    if "UserData" in services:
        for n in nics_sorted:
            meta = {
                "instance-id": n.vm_id,
                "vm-id": n.vm_id,
                "local-hostname": n.name,
                "local-ipv4": n.ip,
                "availability-zone": net.zone_id,
            }
            if n.ip in public_of:
                meta["public-ipv4"] = public_of[n.ip]
            entry: dict[str, Any] = {"guest_ip": n.ip, "meta_data": meta}
            if n.userdata:
                entry["user_data"] = n.userdata
            vm_data.append(entry)

    out: dict[str, Any] = {
        "interfaces": interfaces,
        "dns_servers": [d for d in (net.dns1, net.dns2) if d],
        "firewall": firewall,
        "egress": egress,
        "port_forwarding": forwards,
        "static_nat": static_nat,
        "load_balancers": balancers,
        "dhcp": dhcp,
        "vm_data": vm_data,
        "stats": {"interval": float(stats_interval)},
    }
    if net.network_domain:
        # A network without a domain (legacy rows, future callers) leaves it out: the
        # router's default ("cloud.internal", the API's default too) applies. An empty
        # string would be refused by the router's parser.
        out["domain"] = net.network_domain
    if source_nat is not None and "SourceNat" in services:
        out["source_nat"] = source_nat
    if nics.announce:
        out["announce"] = nics.announce
    return out
