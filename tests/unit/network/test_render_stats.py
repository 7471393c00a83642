"""Model → ``config["router"]``: what is rendered, and that the router role's own strict
parser accepts it; ``router.stats`` params parsing."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import pytest

from agent.roles.router.config import parse
from manager.network.model import (
    SERVICES,
    FirewallRule,
    GuestNic,
    LbRule,
    Network,
    NetworkOffering,
    NetworkState,
    PortForwardingRule,
    PublicIp,
    RouterNics,
)
from manager.network.render import lb_config_name, render_router
from manager.network.stats import StatsError, parse_batches


def offering(services: tuple[str, ...] = SERVICES, egress_allow: bool = True) -> NetworkOffering:
    return NetworkOffering(
        "o1", "iso", "iso", "Isolated", services, egress_allow, False, True, "Enabled", 0
    )


NET = Network(
    id="n1",
    name="web",
    display_text="web",
    zone_id="z1",
    offering_id="o1",
    service_offering_id=None,
    guest_type="Isolated",
    state="Implemented",
    cidr="10.1.1.0/24",
    gateway="10.1.1.1",
    start_ip="10.1.1.1",
    end_ip="10.1.1.254",
    network_domain="cloud.internal",
    dns1="198.18.0.1",
    dns2=None,
    vlan=None,
    account_id="a",
    created=0.0,
)


def ip(id: str, addr: str, t: float, snat: bool = False, nat: str | None = None) -> PublicIp:
    return PublicIp(id, "z1", addr, "n1", snat, "vm2" if nat else None, nat, "a", t)


def fw(id: str, kind: str, proto: str, ports: tuple[int, int] | None, **kw: Any) -> FirewallRule:
    base = FirewallRule(
        id=id,
        network_id="n1",
        traffic_type=kind,
        public_ip_id="ip2" if kind == "Ingress" else None,
        protocol=proto,
        start_port=ports[0] if ports else None,
        end_port=ports[1] if ports else None,
        icmp_type=None,
        icmp_code=None,
        cidrs=(),
        account_id="a",
        created=1.0,
    )
    return dataclasses.replace(base, **kw)


def state(services: tuple[str, ...] = SERVICES, egress_allow: bool = True) -> NetworkState:
    userdata = base64.b64encode(b"#cloud-config\n").decode()
    return NetworkState(
        network=NET,
        offering=offering(services, egress_allow),
        public_cidr="198.18.0.0/24",
        public_gateway="198.18.0.1",
        public_ips=(
            ip("ip3", "198.18.0.7", 3.0, nat="10.1.1.6"),
            ip("ip2", "198.18.0.5", 2.0),
            ip("ip1", "198.18.0.4", 1.0, snat=True),
        ),
        firewall=(
            fw("f2", "Ingress", "icmp", None, icmp_type=8, icmp_code=0, created=2.0),
            fw("f1", "Ingress", "tcp", (22, 22), cidrs=("10.0.0.0/8",)),
            fw("e1", "Egress", "tcp", (443, 443), cidrs=("203.0.113.0/24",)),
        ),
        port_forwarding=(
            PortForwardingRule(
                "p1", "n1", "ip2", "tcp", 2222, 2223, 22, 23, "vm1", "10.1.1.5", (), "a", 1.0
            ),
        ),
        load_balancers=(
            LbRule(
                "l1",
                "n1",
                "ip2",
                "web lb",
                "",
                "leastconn",
                80,
                8080,
                "tcp",
                (),
                "a",
                1.0,
                members=(("vm2", "10.1.1.6"), ("vm1", "10.1.1.5")),
            ),
            LbRule("l2", "n1", "ip2", "empty", "", "roundrobin", 81, 8080, "tcp", (), "a", 2.0),
        ),
        nics=(
            GuestNic("nic2", "n1", "vm2", "db", "02:00:00:00:00:02", "10.1.1.6", "", 2.0),
            GuestNic("nic1", "n1", "vm1", "web", "02:00:00:00:00:01", "10.1.1.5", userdata, 1.0),
        ),
    )


NICS = RouterNics("r1", "169.254.1.0")


def test_full_render_matches_the_model_and_parses() -> None:
    cfg = render_router(state(), NICS, 60)
    parsed = parse(cfg)  # the router role's own strict parser: unknown keys would fail
    assert cfg["interfaces"] == {
        "public": {
            "device": "eth1",
            "ips": ["198.18.0.4", "198.18.0.5", "198.18.0.7"],  # source NAT first
            "prefix": 24,
            "gateway": "198.18.0.1",
        },
        "guest": {"device": "eth2", "gateway": "10.1.1.1", "cidr": "10.1.1.0/24"},
        "control": {"device": "eth0", "ip": "169.254.1.0", "prefix": 16},
    }
    assert cfg["source_nat"] == "198.18.0.4"
    assert cfg["firewall"] == [
        {
            "protocol": "tcp",
            "public_ip": "198.18.0.5",
            "ports": "22",
            "source_cidrs": ["10.0.0.0/8"],
        },
        {"protocol": "icmp", "public_ip": "198.18.0.5", "icmp_type": "8/0", "source_cidrs": []},
    ]
    assert cfg["egress"] == {
        "default": "allow",
        "rules": [{"protocol": "tcp", "ports": "443", "destination_cidrs": ["203.0.113.0/24"]}],
    }
    assert cfg["port_forwarding"] == [
        {
            "public_ip": "198.18.0.5",
            "protocol": "tcp",
            "public_ports": "2222-2223",
            "guest_ip": "10.1.1.5",
            "guest_ports": "22-23",
        }
    ]
    assert cfg["static_nat"] == [{"public_ip": "198.18.0.7", "guest_ip": "10.1.1.6"}]
    # The empty load balancer is left out (nothing to balance to); members sorted.
    assert cfg["load_balancers"] == [
        {
            "name": lb_config_name("l1"),
            "public_ip": "198.18.0.5",
            "public_port": 80,
            "algorithm": "leastconn",
            "members": [{"ip": "10.1.1.5", "port": 8080}, {"ip": "10.1.1.6", "port": 8080}],
        }
    ]
    assert [d["hostname"] for d in cfg["dhcp"]] == ["web", "db"]
    assert parsed.vm_data[0].user_data == b"#cloud-config\n"
    assert dict(parsed.vm_data[1].meta_data)["public-ipv4"] == "198.18.0.7"
    assert cfg["stats"] == {"interval": 60.0}
    assert cfg["dns_servers"] == ["198.18.0.1"]


def test_render_is_deterministic() -> None:
    assert render_router(state(), NICS, 300) == render_router(state(), NICS, 300)


def test_services_the_offering_lacks_are_not_rendered() -> None:
    cfg = render_router(state(("Dhcp", "Dns"), egress_allow=False), RouterNics("r1", None), 0)
    parse(cfg)
    assert "control" not in cfg["interfaces"]
    assert "source_nat" not in cfg
    assert cfg["firewall"] == [] and cfg["port_forwarding"] == [] and cfg["static_nat"] == []
    assert cfg["load_balancers"] == [] and cfg["vm_data"] == []
    assert cfg["egress"] == {"default": "deny", "rules": []}
    assert len(cfg["dhcp"]) == 2


def test_stats_batches_parse_strictly() -> None:
    batches = parse_batches(
        {
            "boot_id": "b",
            "batches": [{"id": "b:1", "epoch": "b:1", "bytes": {"198.18.0.4": [10, 20]}}],
        }
    )
    assert batches[0].id == "b:1" and batches[0].bytes == {"198.18.0.4": (10, 20)}
    for bad, needle in (
        ({}, "batches must be a list"),
        ({"batches": ["x"]}, "must be an object"),
        ({"batches": [{"id": "", "bytes": {}}]}, "1-128 characters"),
        ({"batches": [{"id": "a", "bytes": {"nope": [1, 2]}}]}, "not an IPv4 address"),
        ({"batches": [{"id": "a", "bytes": {"10.0.0.1": [1, -2]}}]}, r"\[bytes_in, bytes_out\]"),
        ({"batches": [{"id": "a", "bytes": {"10.0.0.1": [True, 2]}}]}, r"\[bytes_in, bytes_out\]"),
        ({"batches": [{"id": "a", "bytes": {}}] * 300}, "at most 256"),
    ):
        with pytest.raises(StatsError, match=needle):
            parse_batches(bad)
