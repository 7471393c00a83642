"""The network model: plain frozen records, as read from the store (``manager.network.store``).

Names follow CloudStack's: a *network offering* lists the services a guest network gets; a
guest network is ``Isolated`` (its own virtual router does DHCP, DNS, userdata, source NAT,
static NAT, port forwarding, firewall, load balancing) or ``Shared`` (addresses handed out
from a range on a provider network). Rules hang off public IPs (ingress firewall, port
forwarding, static NAT, load balancer) or off the network (egress firewall).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# CloudStack's service names, in its order.
SERVICES = (
    "Dhcp",
    "Dns",
    "UserData",
    "SourceNat",
    "StaticNat",
    "PortForwarding",
    "Firewall",
    "Lb",
)
ISOLATED = "Isolated"
SHARED = "Shared"

DEFAULT_ISOLATED_OFFERING = "DefaultIsolatedNetworkOfferingWithSourceNatService"
DEFAULT_SHARED_OFFERING = "DefaultSharedNetworkOffering"
DEFAULT_ROUTER_OFFERING = "System Offering For Software Router"

# Where a router's NICs are, in boot order (the hypervisor names them eth0, eth1, ...).
ROUTER_DEVICES = {"control": "eth0", "public": "eth1", "guest": "eth2"}
# A Shared network's router has no public side: the network's gateway is someone else's.
SHARED_ROUTER_DEVICES = {"control": "eth0", "guest": "eth1"}
# The services a virtual router provides on a Shared network (CloudStack's VirtualRouter
# provider there): a Shared network whose offering has none of them gets no router.
SHARED_ROUTER_SERVICES = ("Dhcp", "Dns", "UserData")


def needs_router(guest_type: str, services: tuple[str, ...]) -> bool:
    """Whether a network of this type and offering is served by a virtual router."""
    if guest_type == ISOLATED:
        return True
    return any(s in services for s in SHARED_ROUTER_SERVICES)


def router_devices(guest_type: str) -> dict[str, str]:
    return dict(ROUTER_DEVICES if guest_type == ISOLATED else SHARED_ROUTER_DEVICES)


@dataclass(frozen=True, slots=True)
class NetworkOffering:
    id: str
    name: str
    display_text: str
    guest_ip_type: str  # Isolated | Shared
    services: tuple[str, ...]
    egress_default_allow: bool
    specify_ip_ranges: bool
    is_default: bool
    state: str
    created: float
    service_offering_id: str | None = None  # routers' sizing; None: the network's own


@dataclass(frozen=True, slots=True)
class RouterOffering:
    id: str
    name: str
    display_text: str
    cpu_number: int
    cpu_speed: int
    memory_mb: int
    is_default: bool
    created: float


@dataclass(frozen=True, slots=True)
class Network:
    id: str
    name: str
    display_text: str
    zone_id: str
    offering_id: str
    service_offering_id: str | None
    guest_type: str
    state: str
    cidr: str
    gateway: str
    start_ip: str
    end_ip: str
    network_domain: str
    dns1: str | None
    dns2: str | None
    vlan: str | None
    account_id: str
    created: float
    router_ip: str | None = None  # Shared: the router's address on it; None: the gateway


@dataclass(frozen=True, slots=True)
class PublicIp:
    id: str
    zone_id: str
    address: str
    network_id: str | None
    is_source_nat: bool
    static_nat_vm_id: str | None
    static_nat_ip: str | None
    account_id: str
    allocated: float


@dataclass(frozen=True, slots=True)
class FirewallRule:
    """Ingress (on ``public_ip_id``) or egress (network-wide) filter rule."""

    id: str
    network_id: str
    traffic_type: str  # Ingress | Egress
    public_ip_id: str | None
    protocol: str  # tcp | udp | icmp | all
    start_port: int | None
    end_port: int | None
    icmp_type: int | None
    icmp_code: int | None
    cidrs: tuple[str, ...]
    account_id: str
    created: float
    related_rule_id: str | None = None  # the PF / LB rule that opened it (openfirewall)


@dataclass(frozen=True, slots=True)
class PortForwardingRule:
    id: str
    network_id: str
    public_ip_id: str
    protocol: str
    public_start: int
    public_end: int
    private_start: int
    private_end: int
    vm_id: str
    vm_ip: str
    cidrs: tuple[str, ...]
    account_id: str
    created: float


@dataclass(frozen=True, slots=True)
class LbRule:
    id: str
    network_id: str
    public_ip_id: str
    name: str
    description: str
    algorithm: str
    public_port: int
    private_port: int
    protocol: str
    cidrs: tuple[str, ...]
    account_id: str
    created: float
    members: tuple[tuple[str, str], ...] = ()  # (vm id, guest ip)


@dataclass(frozen=True, slots=True)
class GuestNic:
    id: str
    network_id: str
    vm_id: str
    name: str
    mac: str
    ip: str
    userdata: str  # base64
    created: float


@dataclass(frozen=True, slots=True)
class RouterNics:
    """Addresses of one router (from its system_vms row and details)."""

    router_id: str
    control_ip: str | None
    control_prefix: int = 16
    devices: dict[str, str] = field(default_factory=lambda: dict(ROUTER_DEVICES))
    announce: int = 0  # bumped to make the router re-announce its addresses (GARP)


@dataclass(frozen=True, slots=True)
class NetworkState:
    """Everything a router's config is rendered from, read in one transaction."""

    network: Network
    offering: NetworkOffering
    public_cidr: str  # the zone's public range
    public_gateway: str | None
    public_ips: tuple[PublicIp, ...]
    firewall: tuple[FirewallRule, ...]
    port_forwarding: tuple[PortForwardingRule, ...]
    load_balancers: tuple[LbRule, ...]
    nics: tuple[GuestNic, ...]
