"""Pure checks of what the API is asked to build (no I/O). Each raises :class:`NetError`
with a message an operator can act on; the API turns it into a CloudStack 431.

What is refused here never reaches a router: bad addresses, ranges outside their network,
guest networks that overlap the zone's control, management or public networks (the router
would route its own control channel into the guest network), overlapping shared networks,
ports out of range, duplicate or overlapping rules.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from manager.network.model import FirewallRule, LbRule, PortForwardingRule, needs_router

PROTOCOLS = ("tcp", "udp", "icmp", "all")
MAX_CIDRS = 64
MIN_PREFIX = 16  # at most 65,536 addresses in one guest network
MAX_PREFIX = 29  # at least the router plus a few guests
_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)((?!-)[A-Za-z0-9-]{1,63}(?<!-)\.)*(?!-)[A-Za-z0-9-]{1,63}(?<!-)$"
)
_HOST_BAD = re.compile(r"[^a-z0-9-]+")
ALGORITHMS = ("roundrobin", "leastconn", "source")


class NetError(ValueError):
    """A request the network model refuses; ``str(e)`` is the client-facing reason."""


Ports = tuple[int, int] | None  # inclusive range; None = all ports


@dataclass(frozen=True, slots=True)
class Addressing:
    cidr: str
    gateway: str
    start_ip: str
    end_ip: str


def ip(value: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value.strip())
    except ValueError:
        raise NetError(f"{what} {value!r} is not a valid IPv4 address") from None


def netmask_prefix(netmask: str) -> int:
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{netmask.strip()}").prefixlen
    except ValueError:
        raise NetError(f"netmask {netmask!r} is not a valid IPv4 netmask") from None


def network_addressing(
    *,
    gateway: str | None,
    netmask: str | None,
    start_ip: str | None,
    end_ip: str | None,
    default_cidr: str,
    reserved: Sequence[tuple[str, str]] = (),
) -> Addressing:
    """The addressing of a new guest network. ``gateway``+``netmask`` (both or neither;
    neither: ``default_cidr`` with its first host as gateway). ``reserved`` is
    ``(what, cidr)`` of networks a guest network must not overlap."""
    if (gateway is None) != (netmask is None):
        raise NetError("gateway and netmask must be given together")
    if gateway is None or netmask is None:
        net = ipaddress.IPv4Network(default_cidr, strict=False)
        gw = next(net.hosts())
    else:
        gw = ip(gateway, "gateway")
        prefix = netmask_prefix(netmask)
        net = ipaddress.IPv4Network(f"{gw}/{prefix}", strict=False)
    if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
        raise NetError(
            f"guest network {net} must be between /{MIN_PREFIX} and /{MAX_PREFIX} "
            f"(netmask {net.netmask})"
        )
    if gw in (net.network_address, net.broadcast_address):
        raise NetError(f"gateway {gw} is the network or broadcast address of {net}")
    first, last = net.network_address + 1, net.broadcast_address - 1
    start = ip(start_ip, "startip") if start_ip else first
    end = ip(end_ip, "endip") if end_ip else last
    for what, addr in (("startip", start), ("endip", end)):
        if not first <= addr <= last:
            raise NetError(f"{what} {addr} is outside {net} (usable {first}-{last})")
    if start > end:
        raise NetError(f"startip {start} is after endip {end}")
    if (start_ip or end_ip) and start <= gw <= end:
        raise NetError(f"the gateway {gw} must not be inside the IP range {start}-{end}")
    for what, cidr in reserved:
        other = ipaddress.IPv4Network(cidr, strict=False)
        if net.overlaps(other):
            raise NetError(
                f"guest network {net} overlaps the zone's {what} network {other}; "
                "the router would lose its path to it"
            )
    return Addressing(str(net), str(gw), str(start), str(end))


def check_no_overlap(cidr: str, others: Iterable[tuple[str, str]]) -> None:
    """``others``: ``(name, cidr)`` of networks that share the same L2/L3 space."""
    net = ipaddress.IPv4Network(cidr)
    for name, other in others:
        if net.overlaps(ipaddress.IPv4Network(other)):
            raise NetError(f"{net} overlaps the CIDR {other} of network {name!r}")


def network_domain(value: str) -> str:
    text = value.strip().rstrip(".")
    if not _DOMAIN_RE.match(text):
        raise NetError(f"networkdomain {value!r} is not a valid DNS domain")
    return text.lower()


def dns_server(value: str, what: str) -> str:
    return str(ip(value, what))


def port(value: int, what: str) -> int:
    if not 1 <= value <= 65535:
        raise NetError(f"{what} {value} is out of range 1-65535")
    return value


def port_range(start: int | None, end: int | None, what: str = "port") -> Ports:
    """(start, end) inclusive; ``end`` defaults to ``start``; neither = all ports."""
    if start is None:
        if end is not None:
            raise NetError(f"end{what} given without start{what}")
        return None
    s = port(start, f"start{what}")
    e = port(end, f"end{what}") if end is not None else s
    if e < s:
        raise NetError(f"end{what} {e} is lower than start{what} {s}")
    return (s, e)


def protocol(value: str, allowed: Sequence[str] = PROTOCOLS) -> str:
    p = value.strip().lower()
    if p not in allowed:
        raise NetError(f"protocol {value!r} is not one of {', '.join(allowed)}")
    return p


def cidr_list(values: Iterable[str] | None, what: str = "cidrlist") -> tuple[str, ...]:
    """Normalised, de-duplicated CIDRs; ``0.0.0.0/0`` or nothing means anywhere (``()``)."""
    out: list[str] = []
    for raw in values or ():
        text = raw.strip()
        if not text:
            continue
        try:
            net = ipaddress.IPv4Network(text if "/" in text else f"{text}/32", strict=False)
        except ValueError:
            raise NetError(f"{what}: {raw!r} is not an IPv4 CIDR") from None
        if net.prefixlen == 0:
            return ()
        if str(net) not in out:
            out.append(str(net))
    if len(out) > MAX_CIDRS:
        raise NetError(f"{what}: at most {MAX_CIDRS} CIDRs")
    return tuple(out)


def icmp(icmp_type: int | None, icmp_code: int | None) -> tuple[int | None, int | None]:
    """CloudStack's ICMP type/code: -1 (or absent) = any."""
    t = -1 if icmp_type is None else icmp_type
    c = -1 if icmp_code is None else icmp_code
    if not -1 <= t <= 255 or not -1 <= c <= 255:
        raise NetError("icmptype and icmpcode must be between -1 and 255")
    if t == -1 and c != -1:
        raise NetError("icmpcode needs an icmptype")
    return (None if t == -1 else t, None if c == -1 else c)


def filter_rule_ports(
    proto: str,
    start: int | None,
    end: int | None,
    icmp_type: int | None,
    icmp_code: int | None,
) -> tuple[Ports, int | None, int | None]:
    if proto in ("tcp", "udp"):
        if icmp_type is not None or icmp_code is not None:
            raise NetError(f"icmptype/icmpcode only apply to icmp, not {proto}")
        return port_range(start, end), None, None
    if start is not None or end is not None:
        raise NetError(f"ports only apply to tcp and udp, not {proto}")
    if proto == "icmp":
        t, c = icmp(icmp_type, icmp_code)
        return None, t, c
    if icmp_type is not None or icmp_code is not None:
        raise NetError(f"icmptype/icmpcode only apply to icmp, not {proto}")
    return None, None, None


# --- overlap and conflicts -------------------------------------------------------------


def ports_overlap(a: Ports, b: Ports) -> bool:
    if a is None or b is None:
        return True
    return a[0] <= b[1] and b[0] <= a[1]


def cidrs_overlap(a: Sequence[str], b: Sequence[str]) -> bool:
    """Empty = anywhere, which overlaps everything."""
    if not a or not b:
        return True
    return any(ipaddress.IPv4Network(x).overlaps(ipaddress.IPv4Network(y)) for x in a for y in b)


def protocols_overlap(a: str, b: str) -> bool:
    return a == b or "all" in (a, b)


def _fw_ports(r: FirewallRule) -> Ports:
    return None if r.start_port is None or r.end_port is None else (r.start_port, r.end_port)


def _describe(ports: Ports) -> str:
    return "all ports" if ports is None else f"{ports[0]}-{ports[1]}"


def firewall_conflict(
    *,
    traffic_type: str,
    public_ip_id: str | None,
    proto: str,
    ports: Ports,
    icmp_type: int | None,
    cidrs: Sequence[str],
    existing: Iterable[FirewallRule],
) -> None:
    """A new filter rule may not repeat or overlap one on the same IP (ingress) or network
    (egress) for the same protocol, ports and addresses."""
    for r in existing:
        if r.traffic_type != traffic_type or r.public_ip_id != public_ip_id:
            continue
        if not protocols_overlap(proto, r.protocol):
            continue
        if proto == "icmp" and r.protocol == "icmp":
            if icmp_type is not None and r.icmp_type is not None and icmp_type != r.icmp_type:
                continue
        elif not ports_overlap(ports, _fw_ports(r)):
            continue
        if not cidrs_overlap(cidrs, r.cidrs):
            continue
        raise NetError(
            f"The range specified, {_describe(ports)} ({proto}), conflicts with rule "
            f"{r.id} which has {_describe(_fw_ports(r))} ({r.protocol})"
        )


def forward_conflict(
    *,
    public_ip_id: str,
    proto: str,
    ports: tuple[int, int],
    forwards: Iterable[PortForwardingRule],
    balancers: Iterable[LbRule],
    skip_lb: str | None = None,
) -> None:
    """A public IP's port (per protocol) goes to one place only: one port forwarding rule
    or one load balancer."""
    for f in forwards:
        if (
            f.public_ip_id == public_ip_id
            and f.protocol == proto
            and ports_overlap(ports, (f.public_start, f.public_end))
        ):
            raise NetError(
                f"The range specified, {ports[0]}-{ports[1]} ({proto}), conflicts with port "
                f"forwarding rule {f.id} ({f.public_start}-{f.public_end})"
            )
    for lb in balancers:
        if (
            lb.id != skip_lb
            and lb.public_ip_id == public_ip_id
            and lb.protocol == proto
            and ports_overlap(ports, (lb.public_port, lb.public_port))
        ):
            raise NetError(
                f"The range specified, {ports[0]}-{ports[1]} ({proto}), conflicts with load "
                f"balancer rule {lb.id} (port {lb.public_port})"
            )


def forward_lengths(public: tuple[int, int], private: tuple[int, int]) -> None:
    if public[1] - public[0] != private[1] - private[0]:
        raise NetError(
            f"public port range {public[0]}-{public[1]} and private port range "
            f"{private[0]}-{private[1]} must have the same length"
        )


def lb_name(value: str) -> str:
    text = value.strip()
    if not 1 <= len(text) <= 255:
        raise NetError("name must be 1-255 characters")
    return text


def algorithm(value: str) -> str:
    a = value.strip().lower()
    if a not in ALGORITHMS:
        raise NetError(f"algorithm {value!r} is not one of {', '.join(ALGORITHMS)}")
    return a


def hostname(name: str, fallback: str) -> str:
    """A DHCP/DNS-safe host name from a VM name (``Web 1`` → ``web-1``)."""
    text = _HOST_BAD.sub("-", name.lower()).strip("-")[:63].strip("-")
    return text or fallback


def guest_ip_in(network_cidr: str, value: str, what: str = "vmguestip") -> str:
    addr = ip(value, what)
    if addr not in ipaddress.IPv4Network(network_cidr):
        raise NetError(f"{what} {addr} is not in the network {network_cidr}")
    return str(addr)


RULE_WORDS = {
    "Firewall": "firewall rule(s)",
    "PortForwarding": "port forwarding rule(s)",
    "Lb": "load balancer rule(s)",
    "StaticNat": "static NAT address(es)",
    "SourceNat": "source NAT address(es)",
    "Dhcp": "guest VM NIC(s)",
    "UserData": "guest VM(s) with user data",
}


def offering_change(
    network_name: str,
    guest_type: str,
    old_services: Sequence[str],
    new_name: str,
    new_guest_type: str,
    new_state: str,
    new_services: Sequence[str],
    in_use: Mapping[str, int],
) -> None:
    """updateNetwork networkofferingid=: refused (NetError, a 431) when the new offering is
    disabled, of another guest type, or drops a service something still uses."""
    if new_state != "Enabled":
        raise NetError(f"network offering {new_name} is not enabled")
    if new_guest_type != guest_type:
        raise NetError(
            f"network {network_name} is {guest_type}: offering {new_name} is for "
            f"{new_guest_type} networks"
        )
    had, has = (
        needs_router(guest_type, tuple(old_services)),
        needs_router(guest_type, tuple(new_services)),
    )
    if had != has:
        what = "adds a virtual router to" if has else "takes the virtual router away from"
        raise NetError(
            f"network offering {new_name} {what} network {network_name} "
            "(Dhcp, Dns and UserData come from it); create a new network instead"
        )
    dropped = [s for s in old_services if s not in new_services and in_use.get(s)]
    if dropped:
        used = ", ".join(f"{s} ({in_use[s]} {RULE_WORDS.get(s, 'use(s)')})" for s in dropped)
        raise NetError(
            f"network offering {new_name} lacks service(s) still in use on network "
            f"{network_name}: {used}; remove them first"
        )
