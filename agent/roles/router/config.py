"""The router's desired config (``config["router"]``), typed and strictly parsed.

:func:`parse` turns the untyped dict the manager sends into a :class:`RouterConfig` or
raises :class:`ConfigError` naming the bad field with a JSON-path-like location
(``router.firewall[2].ports``). Unknown keys are errors too: a typo must not silently
drop a firewall rule. The schema is documented in ``docs/router-config.md``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

Protocol_ = Literal["tcp", "udp", "icmp", "all"]
Algorithm = Literal["roundrobin", "leastconn", "source"]

_DEVICE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_HOSTNAME_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)((?!-)[A-Za-z0-9-]{1,63}(?<!-)\.)*(?!-)[A-Za-z0-9-]{1,63}(?<!-)$"
)
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_ICMP_TYPE_RE = re.compile(r"^([0-9]{1,3}(/[0-9]{1,3})?|[a-z][a-z-]{0,40})$")
_LB_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_META_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SSH_KEY_RE = re.compile(
    r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/=]+( [^\n\r]*)?$"
)

MAX_USERDATA = 32 * 1024  # CloudStack's default (vm.userdata.max.length) for GET; POST allows more


class ConfigError(ValueError):
    """A bad router config. ``field`` is where (``router.firewall[2].ports``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


# --- the schema ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlNic:
    device: str
    ip: ipaddress.IPv4Address
    prefix: int
    ssh_port: int = 3922


@dataclass(frozen=True, slots=True)
class PublicNic:
    device: str
    ips: tuple[ipaddress.IPv4Address, ...]  # first is the primary
    prefix: int
    gateway: ipaddress.IPv4Address | None


@dataclass(frozen=True, slots=True)
class GuestNic:
    device: str
    gateway: ipaddress.IPv4Address  # the guests' default gateway (DHCP option 3)
    cidr: ipaddress.IPv4Network
    address: ipaddress.IPv4Address  # the router's own address here (default: gateway)

    @property
    def is_gateway(self) -> bool:
        """Is the router the guests' gateway? (No: a Shared network's router, which
        serves DHCP, DNS and userdata from its own address in the range.)"""
        return self.address == self.gateway


@dataclass(frozen=True, slots=True)
class Interfaces:
    public: PublicNic | None  # None: no public NIC (a Shared network's router)
    guest: GuestNic
    control: ControlNic | None = None


@dataclass(frozen=True, slots=True)
class PortRange:
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start + 1

    def iptables(self) -> str:
        return str(self.start) if self.start == self.end else f"{self.start}:{self.end}"


@dataclass(frozen=True, slots=True)
class FirewallRule:
    public_ip: ipaddress.IPv4Address
    protocol: Protocol_
    ports: PortRange | None  # tcp/udp only; None = all ports
    source_cidrs: tuple[ipaddress.IPv4Network, ...]  # empty = anywhere
    icmp_type: str | None = None  # icmp only; name or number[/code]


@dataclass(frozen=True, slots=True)
class EgressRule:
    protocol: Protocol_
    ports: PortRange | None
    destination_cidrs: tuple[ipaddress.IPv4Network, ...]  # empty = anywhere
    icmp_type: str | None = None  # icmp only


@dataclass(frozen=True, slots=True)
class Egress:
    default: Literal["allow", "deny"] = "allow"
    rules: tuple[EgressRule, ...] = ()  # exceptions to the default


@dataclass(frozen=True, slots=True)
class PortForward:
    public_ip: ipaddress.IPv4Address
    protocol: Literal["tcp", "udp"]
    public_ports: PortRange
    guest_ip: ipaddress.IPv4Address
    guest_ports: PortRange


@dataclass(frozen=True, slots=True)
class StaticNat:
    public_ip: ipaddress.IPv4Address
    guest_ip: ipaddress.IPv4Address


@dataclass(frozen=True, slots=True)
class Member:
    ip: ipaddress.IPv4Address
    port: int


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    name: str
    public_ip: ipaddress.IPv4Address
    public_port: int
    algorithm: Algorithm
    members: tuple[Member, ...]
    check: bool = False  # haproxy TCP health checks on members


@dataclass(frozen=True, slots=True)
class DhcpEntry:
    mac: str  # lower case aa:bb:cc:dd:ee:ff
    ip: ipaddress.IPv4Address
    hostname: str


@dataclass(frozen=True, slots=True)
class DnsEntry:
    name: str
    ip: ipaddress.IPv4Address


@dataclass(frozen=True, slots=True)
class VmData:
    guest_ip: ipaddress.IPv4Address
    user_data: bytes  # decoded
    meta_data: tuple[tuple[str, str], ...]  # sorted (key, value)


@dataclass(frozen=True, slots=True)
class Stats:
    interval: float = 300.0  # seconds; 0 disables


@dataclass(frozen=True, slots=True)
class RouterConfig:
    interfaces: Interfaces
    domain: str = "cloud.internal"
    dns_servers: tuple[ipaddress.IPv4Address, ...] = ()
    firewall: tuple[FirewallRule, ...] = ()
    egress: Egress = field(default_factory=Egress)
    port_forwarding: tuple[PortForward, ...] = ()
    static_nat: tuple[StaticNat, ...] = ()
    source_nat: ipaddress.IPv4Address | None = None
    load_balancers: tuple[LoadBalancer, ...] = ()
    dhcp: tuple[DhcpEntry, ...] = ()
    dhcp_lease_time: int = 86400
    dns_entries: tuple[DnsEntry, ...] = ()
    vm_data: tuple[VmData, ...] = ()
    ssh_authorized_key: str | None = None
    stats: Stats = field(default_factory=Stats)
    announce: int = 0  # bumped by the manager: send gratuitous ARP for all addresses


# --- parsing helpers -----------------------------------------------------------------

T = TypeVar("T")


class _Obj:
    """A dict being parsed at ``path``; remembers which keys were read to reject unknown ones."""

    def __init__(self, value: Any, path: str) -> None:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected an object, got {type(value).__name__}")
        for k in value:
            if not isinstance(k, str):
                raise ConfigError(path, f"keys must be strings, got {k!r}")
        self.value: Mapping[str, Any] = value
        self.path = path
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def has(self, key: str) -> bool:
        return key in self.value and self.value[key] is not None

    def get(self, key: str, parse: Callable[[Any, str], T], default: T) -> T:
        self.seen.add(key)
        if not self.has(key):
            return default
        return parse(self.value[key], self.at(key))

    def need(self, key: str, parse: Callable[[Any, str], T]) -> T:
        self.seen.add(key)
        if not self.has(key):
            raise ConfigError(self.at(key), "required")
        return parse(self.value[key], self.at(key))

    def done(self) -> None:
        extra = sorted(set(self.value) - self.seen)
        if extra:
            raise ConfigError(self.at(extra[0]), "unknown field")


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {type(value).__name__}")
    return value


def _int(lo: int, hi: int) -> Callable[[Any, str], int]:
    def parse(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise ConfigError(path, f"{value} out of range {lo}..{hi}")
        return value

    return parse


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, f"expected a number, got {type(value).__name__}")
    if not 0 <= value <= 86400 * 7:
        raise ConfigError(path, f"{value} out of range 0..604800")
    return float(value)


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected true/false, got {type(value).__name__}")
    return value


_IPV4_RE = re.compile(
    r"^(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})$"
)


@functools.lru_cache(maxsize=1 << 16)
def _ip_int(text: str) -> int | None:
    """Dotted quad → int, or None. (``ipaddress`` parsing costs ~10 µs a string, which
    adds up to most of the apply time at 10,000 rules; this is ten times faster, and cached.)"""
    m = _IPV4_RE.match(text)
    if not m:
        return None
    a, b, c, d = (int(x) for x in m.groups())
    if a > 255 or b > 255 or c > 255 or d > 255:
        return None
    return (a << 24) | (b << 16) | (c << 8) | d


@functools.lru_cache(maxsize=1 << 16)
def _addr(n: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(n)


def _ip(value: Any, path: str) -> ipaddress.IPv4Address:
    text = _str(value, path)
    n = _ip_int(text)
    if n is None:
        raise ConfigError(path, f"{text!r} is not an IPv4 address")
    return _addr(n)


@functools.lru_cache(maxsize=1 << 16)
def _net_of(text: str) -> ipaddress.IPv4Network | str:
    addr, sep, plen = text.partition("/")
    n = _ip_int(addr)
    if n is None:
        return "bad address"
    if not sep:
        prefix = 32
    elif plen.isdigit() and len(plen) <= 2 and int(plen) <= 32:
        prefix = int(plen)
    else:
        return "bad prefix length"
    if n & ((1 << (32 - prefix)) - 1):
        return "host bits set"
    return ipaddress.IPv4Network((n, prefix))


def _cidr(value: Any, path: str) -> ipaddress.IPv4Network:
    text = _str(value, path)
    net = _net_of(text)
    if isinstance(net, str):
        raise ConfigError(path, f"{text!r} is not an IPv4 network ({net})")
    return net


def _regex(rx: re.Pattern[str], what: str) -> Callable[[Any, str], str]:
    def parse(value: Any, path: str) -> str:
        text = _str(value, path)
        if not rx.match(text):
            raise ConfigError(path, f"{text!r} is not a valid {what}")
        return text

    return parse


def _list(
    item: Callable[[Any, str], T], max_items: int = 100_000
) -> Callable[[Any, str], tuple[T, ...]]:
    def parse(value: Any, path: str) -> tuple[T, ...]:
        if not isinstance(value, Sequence) or isinstance(value, str | bytes):
            raise ConfigError(path, f"expected a list, got {type(value).__name__}")
        if len(value) > max_items:
            raise ConfigError(path, f"{len(value)} items, at most {max_items}")
        return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))

    return parse


def _choice(*choices: str) -> Callable[[Any, str], Any]:
    def parse(value: Any, path: str) -> Any:
        text = _str(value, path)
        if text not in choices:
            raise ConfigError(path, f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _ports(value: Any, path: str) -> PortRange:
    """``80``, ``"80"``, ``"80-90"`` or ``[80, 90]``."""
    port = _int(1, 65535)
    if isinstance(value, list):
        if len(value) != 2:
            raise ConfigError(path, "a port range is [start, end]")
        start, end = port(value[0], f"{path}[0]"), port(value[1], f"{path}[1]")
    elif isinstance(value, str):
        m = re.fullmatch(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", value)
        if not m:
            raise ConfigError(path, f"{value!r} is not a port or start-end range")
        start = port(int(m.group(1)), path)
        end = port(int(m.group(2)), path) if m.group(2) else start
    else:
        start = end = port(value, path)
    if end < start:
        raise ConfigError(path, f"range end {end} is before start {start}")
    return PortRange(start, end)


# --- sections ------------------------------------------------------------------------


def _control(value: Any, path: str) -> ControlNic:
    o = _Obj(value, path)
    nic = ControlNic(
        device=o.need("device", _regex(_DEVICE_RE, "device name")),
        ip=o.need("ip", _ip),
        prefix=o.get("prefix", _int(1, 32), 16),
        ssh_port=o.get("ssh_port", _int(1, 65535), 3922),
    )
    o.done()
    return nic


def _public(value: Any, path: str) -> PublicNic:
    o = _Obj(value, path)
    ips = o.need("ips", _list(_ip, 1024))
    if not ips:
        raise ConfigError(o.at("ips"), "at least one public IP")
    if len(set(ips)) != len(ips):
        raise ConfigError(o.at("ips"), "duplicate IP")
    nic = PublicNic(
        device=o.need("device", _regex(_DEVICE_RE, "device name")),
        ips=ips,
        prefix=o.get("prefix", _int(1, 32), 24),
        gateway=o.get("gateway", _ip, None),
    )
    o.done()
    return nic


def _guest(value: Any, path: str) -> GuestNic:
    o = _Obj(value, path)
    device = o.need("device", _regex(_DEVICE_RE, "device name"))
    gateway = o.need("gateway", _ip)
    cidr = o.need("cidr", _cidr)
    address = o.get("address", _ip, gateway)
    o.done()
    if gateway not in cidr:
        raise ConfigError(f"{path}.gateway", f"{gateway} is not in {cidr}")
    if address not in cidr:
        raise ConfigError(f"{path}.address", f"{address} is not in {cidr}")
    if cidr.prefixlen <= 30 and address in (cidr.network_address, cidr.broadcast_address):
        what = "network" if address == cidr.network_address else "broadcast"
        raise ConfigError(f"{path}.address", f"{address} is the {what} address of {cidr}")
    return GuestNic(device=device, gateway=gateway, cidr=cidr, address=address)


def _interfaces(value: Any, path: str) -> Interfaces:
    o = _Obj(value, path)
    ifs = Interfaces(
        public=o.get("public", _public, None),
        guest=o.need("guest", _guest),
        control=o.get("control", _control, None),
    )
    o.done()
    devices = [ifs.guest.device]
    devices += [ifs.public.device] if ifs.public else []
    devices += [ifs.control.device] if ifs.control else []
    if len(set(devices)) != len(devices):
        raise ConfigError(path, "public, guest and control must be different devices")
    if ifs.public is not None and not ifs.guest.is_gateway:
        # The guests route through the gateway, not us: a public side would carry nothing.
        raise ConfigError(
            o.at("guest.address"),
            "differs from gateway (the router is not the guests' gateway), "
            "so there can be no interfaces.public",
        )
    return ifs


def _protocol(value: Any, path: str) -> Protocol_:
    proto: Protocol_ = _choice("tcp", "udp", "icmp", "all")(value, path)
    return proto


def _firewall(value: Any, path: str) -> FirewallRule:
    o = _Obj(value, path)
    proto = o.need("protocol", _protocol)
    ports = o.get("ports", _ports, None)
    icmp_type = o.get("icmp_type", _regex(_ICMP_TYPE_RE, "ICMP type"), None)
    rule = FirewallRule(
        public_ip=o.need("public_ip", _ip),
        protocol=proto,
        ports=ports,
        source_cidrs=o.get("source_cidrs", _list(_cidr, 256), ()),
        icmp_type=icmp_type,
    )
    o.done()
    if ports is not None and proto not in ("tcp", "udp"):
        raise ConfigError(o.at("ports"), f"ports only apply to tcp/udp, not {proto}")
    if icmp_type is not None and proto != "icmp":
        raise ConfigError(o.at("icmp_type"), f"icmp_type only applies to icmp, not {proto}")
    return rule


def _egress_rule(value: Any, path: str) -> EgressRule:
    o = _Obj(value, path)
    proto = o.need("protocol", _protocol)
    ports = o.get("ports", _ports, None)
    icmp_type = o.get("icmp_type", _regex(_ICMP_TYPE_RE, "ICMP type"), None)
    rule = EgressRule(
        protocol=proto,
        ports=ports,
        destination_cidrs=o.get("destination_cidrs", _list(_cidr, 256), ()),
        icmp_type=icmp_type,
    )
    o.done()
    if ports is not None and proto not in ("tcp", "udp"):
        raise ConfigError(o.at("ports"), f"ports only apply to tcp/udp, not {proto}")
    if icmp_type is not None and proto != "icmp":
        raise ConfigError(o.at("icmp_type"), f"icmp_type only applies to icmp, not {proto}")
    return rule


def _egress(value: Any, path: str) -> Egress:
    o = _Obj(value, path)
    e = Egress(
        default=o.get("default", _choice("allow", "deny"), "allow"),
        rules=o.get("rules", _list(_egress_rule), ()),
    )
    o.done()
    return e


def _port_forward(value: Any, path: str) -> PortForward:
    o = _Obj(value, path)
    pf = PortForward(
        public_ip=o.need("public_ip", _ip),
        protocol=o.need("protocol", _choice("tcp", "udp")),
        public_ports=o.need("public_ports", _ports),
        guest_ip=o.need("guest_ip", _ip),
        guest_ports=o.need("guest_ports", _ports),
    )
    o.done()
    if len(pf.public_ports) != len(pf.guest_ports):
        raise ConfigError(o.at("guest_ports"), "must be as long as public_ports")
    return pf


def _static_nat(value: Any, path: str) -> StaticNat:
    o = _Obj(value, path)
    s = StaticNat(public_ip=o.need("public_ip", _ip), guest_ip=o.need("guest_ip", _ip))
    o.done()
    return s


def _member(value: Any, path: str) -> Member:
    o = _Obj(value, path)
    m = Member(ip=o.need("ip", _ip), port=o.need("port", _int(1, 65535)))
    o.done()
    return m


def _lb(value: Any, path: str) -> LoadBalancer:
    o = _Obj(value, path)
    lb = LoadBalancer(
        name=o.need("name", _regex(_LB_NAME_RE, "name ([A-Za-z0-9_.-], 1-64)")),
        public_ip=o.need("public_ip", _ip),
        public_port=o.need("public_port", _int(1, 65535)),
        algorithm=o.get("algorithm", _choice("roundrobin", "leastconn", "source"), "roundrobin"),
        members=o.need("members", _list(_member, 1000)),
        check=o.get("check", _bool, False),
    )
    o.done()
    return lb


def _dhcp(value: Any, path: str) -> DhcpEntry:
    o = _Obj(value, path)
    mac = o.need("mac", _str).lower()
    if not _MAC_RE.match(mac):
        raise ConfigError(o.at("mac"), f"{mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    e = DhcpEntry(
        mac=mac, ip=o.need("ip", _ip), hostname=o.need("hostname", _regex(_HOSTNAME_RE, "hostname"))
    )
    o.done()
    return e


def _dns_entry(value: Any, path: str) -> DnsEntry:
    o = _Obj(value, path)
    e = DnsEntry(name=o.need("name", _regex(_DOMAIN_RE, "DNS name")), ip=o.need("ip", _ip))
    o.done()
    return e


def _user_data(value: Any, path: str) -> bytes:
    text = _str(value, path)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(path, "not valid base64") from None
    if len(data) > MAX_USERDATA:
        raise ConfigError(path, f"{len(data)} bytes, at most {MAX_USERDATA}")
    return data


def _meta(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    o = _Obj(value, path)
    items = []
    for key in sorted(o.value):
        _regex(_META_KEY_RE, "meta-data key")(key, o.at(key))
        items.append((key, o.get(key, _str, "")))
    o.done()
    return tuple(items)


def _vm_data(value: Any, path: str) -> VmData:
    o = _Obj(value, path)
    d = VmData(
        guest_ip=o.need("guest_ip", _ip),
        user_data=o.get("user_data", _user_data, b""),
        meta_data=o.get("meta_data", _meta, ()),
    )
    o.done()
    return d


def _ssh_key(value: Any, path: str) -> str:
    text = _str(value, path).strip()
    if not _SSH_KEY_RE.match(text):
        raise ConfigError(path, "not an OpenSSH public key line (type base64 [comment])")
    return text


def _stats(value: Any, path: str) -> Stats:
    o = _Obj(value, path)
    s = Stats(interval=o.get("interval", _number, 300.0))
    o.done()
    return s


def _unique(items: Sequence[T], key: Callable[[T], object], path: str, what: str) -> None:
    seen: dict[object, int] = {}
    for i, item in enumerate(items):
        k = key(item)
        if k in seen:
            raise ConfigError(f"{path}[{i}]", f"duplicate {what} (same as [{seen[k]}])")
        seen[k] = i


def parse(value: Any, path: str = "router") -> RouterConfig:
    """Strictly parse ``config["router"]``; raise :class:`ConfigError` naming the field."""
    o = _Obj(value, path)
    cfg = RouterConfig(
        interfaces=o.need("interfaces", _interfaces),
        domain=o.get("domain", _regex(_DOMAIN_RE, "domain"), "cloud.internal"),
        dns_servers=o.get("dns_servers", _list(_ip, 8), ()),
        firewall=o.get("firewall", _list(_firewall), ()),
        egress=o.get("egress", _egress, Egress()),
        port_forwarding=o.get("port_forwarding", _list(_port_forward), ()),
        static_nat=o.get("static_nat", _list(_static_nat, 1024), ()),
        source_nat=o.get("source_nat", _ip, None),
        load_balancers=o.get("load_balancers", _list(_lb, 1000), ()),
        dhcp=o.get("dhcp", _list(_dhcp), ()),
        dhcp_lease_time=o.get("dhcp_lease_time", _int(120, 86400 * 365), 86400),
        dns_entries=o.get("dns_entries", _list(_dns_entry), ()),
        vm_data=o.get("vm_data", _list(_vm_data), ()),
        ssh_authorized_key=o.get("ssh_authorized_key", _ssh_key, None),
        stats=o.get("stats", _stats, Stats()),
        announce=o.get("announce", _int(0, 2**63 - 1), 0),
    )
    o.done()
    if cfg.interfaces.public is None:
        _check_no_public(cfg, path)
    _check_references(cfg, path)
    return cfg


def _check_no_public(cfg: RouterConfig, path: str) -> None:
    """Without a public NIC nothing may hang off the public side."""
    problem = "needs interfaces.public (this router has no public NIC)"
    lists: tuple[tuple[str, Sequence[object]], ...] = (
        ("firewall", cfg.firewall),
        ("egress.rules", cfg.egress.rules),
        ("port_forwarding", cfg.port_forwarding),
        ("static_nat", cfg.static_nat),
        ("load_balancers", cfg.load_balancers),
    )
    for name, items in lists:
        if items:
            raise ConfigError(f"{path}.{name}[0]", problem)
    if cfg.source_nat is not None:
        raise ConfigError(f"{path}.source_nat", problem)


def _check_references(cfg: RouterConfig, path: str) -> None:
    """Cross-field rules: public IPs used are ours, guest IPs are in the guest CIDR,
    nothing claimed twice."""
    pub = cfg.interfaces.public
    public = set(pub.ips) if pub is not None else set()
    guest = cfg.interfaces.guest.cidr

    def need_public(ip: ipaddress.IPv4Address, where: str) -> None:
        if ip not in public:
            raise ConfigError(where, f"{ip} is not one of interfaces.public.ips")

    def need_guest(ip: ipaddress.IPv4Address, where: str) -> None:
        if ip not in guest:
            raise ConfigError(where, f"{ip} is not in the guest network {guest}")

    for i, r in enumerate(cfg.firewall):
        need_public(r.public_ip, f"{path}.firewall[{i}].public_ip")
    for i, pf in enumerate(cfg.port_forwarding):
        need_public(pf.public_ip, f"{path}.port_forwarding[{i}].public_ip")
        need_guest(pf.guest_ip, f"{path}.port_forwarding[{i}].guest_ip")
    for i, s in enumerate(cfg.static_nat):
        need_public(s.public_ip, f"{path}.static_nat[{i}].public_ip")
        need_guest(s.guest_ip, f"{path}.static_nat[{i}].guest_ip")
    _unique(cfg.static_nat, lambda s: s.public_ip, f"{path}.static_nat", "public_ip")
    _unique(cfg.static_nat, lambda s: s.guest_ip, f"{path}.static_nat", "guest_ip")
    snat_ips = {s.public_ip for s in cfg.static_nat}
    for i, pf in enumerate(cfg.port_forwarding):
        if pf.public_ip in snat_ips:
            raise ConfigError(
                f"{path}.port_forwarding[{i}].public_ip", f"{pf.public_ip} is used for static NAT"
            )
    if cfg.source_nat is not None:
        need_public(cfg.source_nat, f"{path}.source_nat")
        if cfg.source_nat in snat_ips:
            raise ConfigError(f"{path}.source_nat", f"{cfg.source_nat} is used for static NAT")
    for i, lb in enumerate(cfg.load_balancers):
        need_public(lb.public_ip, f"{path}.load_balancers[{i}].public_ip")
        if lb.public_ip in snat_ips:
            raise ConfigError(
                f"{path}.load_balancers[{i}].public_ip", f"{lb.public_ip} is used for static NAT"
            )
    _unique(cfg.load_balancers, lambda lb: lb.name, f"{path}.load_balancers", "name")
    _unique(
        cfg.load_balancers,
        lambda lb: (lb.public_ip, lb.public_port),
        f"{path}.load_balancers",
        "public_ip:public_port",
    )
    for i, d in enumerate(cfg.dhcp):
        need_guest(d.ip, f"{path}.dhcp[{i}].ip")
    _unique(cfg.dhcp, lambda d: d.mac, f"{path}.dhcp", "mac")
    _unique(cfg.dhcp, lambda d: d.ip, f"{path}.dhcp", "ip")
    for i, v in enumerate(cfg.vm_data):
        need_guest(v.guest_ip, f"{path}.vm_data[{i}].guest_ip")
    _unique(cfg.vm_data, lambda v: v.guest_ip, f"{path}.vm_data", "guest_ip")
