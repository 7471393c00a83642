"""Pure network checks and address allocation: what is refused, and why."""

from __future__ import annotations

import re

import pytest

from manager.network import ipam
from manager.network import validate as v
from manager.network.model import FirewallRule, LbRule, PortForwardingRule
from manager.network.validate import NetError

RESERVED = [
    ("control (link-local)", "169.254.0.0/16"),
    ("public", "198.18.0.0/24"),
    ("management (pod pod1)", "100.64.0.0/24"),
]


def addressing(**kw: str | None) -> v.Addressing:
    args: dict[str, str | None] = {
        "gateway": None,
        "netmask": None,
        "start_ip": None,
        "end_ip": None,
    }
    args.update(kw)
    return v.network_addressing(
        gateway=args["gateway"],
        netmask=args["netmask"],
        start_ip=args["start_ip"],
        end_ip=args["end_ip"],
        default_cidr="10.250.0.0/24",
        reserved=RESERVED,
    )


def test_default_addressing_is_the_zone_default_with_first_host_gateway() -> None:
    a = addressing()
    assert a == v.Addressing("10.250.0.0/24", "10.250.0.1", "10.250.0.1", "10.250.0.254")


def test_gateway_and_netmask_give_the_cidr_and_range() -> None:
    a = addressing(gateway="10.1.1.1", netmask="255.255.255.0", start_ip="10.1.1.10")
    assert (a.cidr, a.gateway, a.start_ip, a.end_ip) == (
        "10.1.1.0/24",
        "10.1.1.1",
        "10.1.1.10",
        "10.1.1.254",
    )


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"gateway": "10.1.1.1"}, "together"),
        ({"gateway": "10.1.1.300", "netmask": "255.255.255.0"}, "not a valid IPv4 address"),
        ({"gateway": "10.1.1.1", "netmask": "255.0.255.0"}, "not a valid IPv4 netmask"),
        ({"gateway": "10.1.1.0", "netmask": "255.255.255.0"}, "network or broadcast"),
        ({"gateway": "10.1.1.1", "netmask": "255.255.255.252"}, "between /16 and /29"),
        ({"gateway": "10.0.0.1", "netmask": "255.0.0.0"}, "between /16 and /29"),
        (
            {"gateway": "10.1.1.1", "netmask": "255.255.255.0", "start_ip": "10.1.2.5"},
            "outside 10.1.1.0/24",
        ),
        (
            {
                "gateway": "10.1.1.1",
                "netmask": "255.255.255.0",
                "start_ip": "10.1.1.50",
                "end_ip": "10.1.1.20",
            },
            "after endip",
        ),
        (
            {
                "gateway": "10.1.1.100",
                "netmask": "255.255.255.0",
                "start_ip": "10.1.1.50",
                "end_ip": "10.1.1.200",
            },
            "must not be inside the IP range",
        ),
        # A guest network over the control or management network cuts the router's
        # control channel: refused before anything is rendered.
        ({"gateway": "169.254.3.1", "netmask": "255.255.255.0"}, "control (link-local)"),
        ({"gateway": "100.64.0.129", "netmask": "255.255.255.128"}, "management (pod pod1)"),
        ({"gateway": "198.18.0.1", "netmask": "255.255.0.0"}, "zone's public network"),
    ],
)
def test_bad_addressing_is_refused_with_a_reason(kw: dict[str, str], needle: str) -> None:
    with pytest.raises(NetError, match=re.escape(needle)):
        addressing(**kw)


def test_shared_networks_may_not_overlap() -> None:
    v.check_no_overlap("10.9.0.0/24", [("a", "10.8.0.0/24")])
    with pytest.raises(NetError, match=r"overlaps the CIDR 10\.9\.0\.0/16 of network .b."):
        v.check_no_overlap("10.9.1.0/24", [("a", "10.8.0.0/24"), ("b", "10.9.0.0/16")])


def test_ports_protocols_cidrs_and_icmp() -> None:
    assert v.port_range(80, None) == (80, 80)
    assert v.port_range(None, None) is None
    assert v.port_range(1000, 2000) == (1000, 2000)
    for bad in ((0, None), (65536, None), (80, 70000)):
        with pytest.raises(NetError, match="out of range 1-65535"):
            v.port_range(*bad)
    with pytest.raises(NetError, match="lower than"):
        v.port_range(90, 80)
    with pytest.raises(NetError, match="without start"):
        v.port_range(None, 80)
    assert v.protocol("TCP") == "tcp"
    with pytest.raises(NetError, match="not one of tcp, udp"):
        v.protocol("icmp", ("tcp", "udp"))
    assert v.cidr_list(["10.0.0.5", "10.1.0.0/16", "10.1.0.0/16"]) == ("10.0.0.5/32", "10.1.0.0/16")
    assert v.cidr_list(["10.0.0.0/8", "0.0.0.0/0"]) == ()
    assert v.cidr_list(["10.1.2.3/16"]) == ("10.1.0.0/16",)
    with pytest.raises(NetError, match="not an IPv4 CIDR"):
        v.cidr_list(["10.0.0.0/33"])
    assert v.filter_rule_ports("icmp", None, None, 8, 0) == (None, 8, 0)
    assert v.filter_rule_ports("icmp", None, None, -1, -1) == (None, None, None)
    with pytest.raises(NetError, match="only apply to tcp and udp"):
        v.filter_rule_ports("icmp", 22, None, None, None)
    with pytest.raises(NetError, match="only apply to icmp"):
        v.filter_rule_ports("tcp", 22, None, 8, None)
    with pytest.raises(NetError, match="between -1 and 255"):
        v.filter_rule_ports("icmp", None, None, 256, None)
    with pytest.raises(NetError, match="needs an icmptype"):
        v.filter_rule_ports("icmp", None, None, -1, 3)


def fw(
    id: str, proto: str, ports: tuple[int, int] | None, cidrs: tuple[str, ...] = ()
) -> FirewallRule:
    return FirewallRule(
        id=id,
        network_id="n",
        traffic_type="Ingress",
        public_ip_id="ip1",
        protocol=proto,
        start_port=ports[0] if ports else None,
        end_port=ports[1] if ports else None,
        icmp_type=None,
        icmp_code=None,
        cidrs=cidrs,
        account_id="a",
        created=0.0,
    )


def conflict(proto: str, ports: tuple[int, int] | None, cidrs: tuple[str, ...] = ()) -> None:
    v.firewall_conflict(
        traffic_type="Ingress",
        public_ip_id="ip1",
        proto=proto,
        ports=ports,
        icmp_type=None,
        cidrs=cidrs,
        existing=[fw("r1", "tcp", (80, 90), ("10.0.0.0/8",)), fw("r2", "udp", (53, 53))],
    )


def test_firewall_duplicates_and_overlaps_are_refused() -> None:
    conflict("tcp", (91, 100))  # next to r1: fine
    conflict("tcp", (85, 85), ("192.168.0.0/16",))  # same ports, other sources: fine
    conflict("icmp", None)
    for proto, ports in (("tcp", (80, 90)), ("tcp", (70, 80)), ("all", None), ("tcp", None)):
        with pytest.raises(NetError, match="conflicts with rule r1"):
            conflict(proto, ports)
    with pytest.raises(NetError, match="conflicts with rule r2"):
        conflict("udp", (1, 100))


def test_forward_conflicts_with_forwards_and_load_balancers() -> None:
    pf = PortForwardingRule(
        "pf1", "n", "ip1", "tcp", 8000, 8010, 80, 90, "vm", "10.0.0.5", (), "a", 0
    )
    lb = LbRule("lb1", "n", "ip1", "web", "", "roundrobin", 443, 8443, "tcp", (), "a", 0)

    def check(ports: tuple[int, int], proto: str = "tcp", ip: str = "ip1") -> None:
        v.forward_conflict(public_ip_id=ip, proto=proto, ports=ports, forwards=[pf], balancers=[lb])

    check((8011, 8020))
    check((8005, 8005), "udp")
    check((443, 443), ip="ip2")
    with pytest.raises(NetError, match="port forwarding rule pf1"):
        check((8010, 8010))
    with pytest.raises(NetError, match="load balancer rule lb1"):
        check((440, 450))
    with pytest.raises(NetError, match="same length"):
        v.forward_lengths((80, 81), (8080, 8080))


def test_hostnames_and_domains() -> None:
    assert v.hostname("Web Server_1", "vm-x") == "web-server-1"
    assert v.hostname("---", "vm-x") == "vm-x"
    assert len(v.hostname("a" * 100, "x")) == 63
    assert v.network_domain("Example.COM.") == "example.com"
    with pytest.raises(NetError, match="not a valid DNS domain"):
        v.network_domain("bad_domain!")


def test_first_free_skips_used_and_excluded_and_reports_exhaustion() -> None:
    assert ipam.first_free("10.0.0.1", "10.0.0.5", {"10.0.0.1", "10.0.0.2"}) == "10.0.0.3"
    assert ipam.allocate_guest("10.0.0.1", "10.0.0.3", "10.0.0.1", {"10.0.0.2"}) == "10.0.0.3"
    with pytest.raises(NetError, match=r"no free IP address left in 10.0.0.1-10.0.0.2"):
        ipam.first_free("10.0.0.1", "10.0.0.2", {"10.0.0.1"}, exclude={"10.0.0.2"})


def test_public_and_control_allocation() -> None:
    assert ipam.public_gateway("198.18.0.0/24") == "198.18.0.1"
    assert ipam.allocate_public("198.18.0.0/24", set()) == "198.18.0.2"
    assert ipam.allocate_public("198.18.0.0/24", {"198.18.0.2"}) == "198.18.0.3"
    with pytest.raises(NetError, match="no free IP"):
        ipam.allocate_public("198.18.0.0/30", {"198.18.0.2"})
    assert ipam.allocate_linklocal("169.254.0.0/16", set()) == "169.254.1.0"


def test_macs() -> None:
    a = ipam.stable_mac("net", "vm")
    assert a == ipam.stable_mac("net", "vm") != ipam.stable_mac("net", "vm2")
    assert a.startswith("02:") and len(a) == 17
    assert ipam.normalise_mac("AA-BB-CC-DD-EE-FF") == "aa:bb:cc:dd:ee:ff"
    for bad in ("aa:bb:cc", "zz:bb:cc:dd:ee:ff", "01:00:5e:00:00:01"):
        with pytest.raises(NetError):
            ipam.normalise_mac(bad)


def test_requires_upgrade_compares_versions_numerically() -> None:
    from manager.api.commands.network import requires_upgrade

    assert requires_upgrade("0.9.0", "0.10.0")
    assert not requires_upgrade("0.10.0", "0.10.0")
    assert not requires_upgrade("1.0.0-rc1", "0.10.0")
    assert not requires_upgrade(None, "0.10.0")  # never connected: unknown, not flagged
