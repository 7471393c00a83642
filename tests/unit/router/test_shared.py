"""Routers without a public NIC (a Shared network's DHCP/DNS/userdata router, which is not
the guests' gateway): parsing and rendering, pure."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from agent.roles.router import config as rc
from agent.roles.router import iptables as ipt
from agent.roles.router import render, stats
from tests.unit.router.test_config_render import ENV, PATHS, cfg


def shared() -> dict[str, Any]:
    """What the manager renders for a Shared network: control + guest, its own address."""
    c = cfg()
    del c["interfaces"]["public"]
    c["interfaces"]["guest"]["address"] = "10.1.1.10"
    for k in ("firewall", "port_forwarding", "static_nat", "load_balancers"):
        c[k] = []
    del c["source_nat"]
    c["egress"] = {"default": "deny", "rules": []}  # the default may stay as given
    return c


def test_parse_shared() -> None:
    c = rc.parse(shared())
    g = c.interfaces.guest
    assert c.interfaces.public is None
    assert str(g.address) == "10.1.1.10" and str(g.gateway) == "10.1.1.1"
    assert not g.is_gateway
    assert c.egress.default == "deny" and c.announce == 0


def test_address_defaults_to_the_gateway() -> None:
    g = rc.parse(cfg()).interfaces.guest
    assert g.address == g.gateway and g.is_gateway
    # Written out explicitly: the same config, the same bytes.
    c = cfg()
    c["interfaces"]["guest"]["address"] = "10.1.1.1"
    assert render.render(rc.parse(c), PATHS, ENV) == render.render(rc.parse(cfg()), PATHS, ENV)


NEEDS_PUBLIC = "needs interfaces.public (this router has no public NIC)"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c, full: c.update(firewall=full["firewall"]), "router.firewall[0]"),
        (
            lambda c, full: c["egress"].update(rules=full["egress"]["rules"]),
            "router.egress.rules[0]",
        ),
        (
            lambda c, full: c.update(port_forwarding=full["port_forwarding"]),
            "router.port_forwarding[0]",
        ),
        (lambda c, full: c.update(static_nat=full["static_nat"]), "router.static_nat[0]"),
        (
            lambda c, full: c.update(load_balancers=full["load_balancers"]),
            "router.load_balancers[0]",
        ),
        (lambda c, full: c.update(source_nat="203.0.113.10"), "router.source_nat"),
    ],
)
def test_public_side_features_need_a_public_nic(mutate: Any, field: str) -> None:
    c = shared()
    mutate(c, cfg())
    with pytest.raises(rc.ConfigError) as e:
        rc.parse(c)
    assert e.value.field == field
    assert e.value.problem == NEEDS_PUBLIC
    assert str(e.value) == f"{field}: {NEEDS_PUBLIC}"


@pytest.mark.parametrize(
    ("guest", "field", "problem"),
    [
        ({"address": "10.1.2.10"}, "router.interfaces.guest.address", "is not in 10.1.1.0/24"),
        ({"address": "10.1.1.0"}, "router.interfaces.guest.address", "network address"),
        ({"address": "10.1.1.255"}, "router.interfaces.guest.address", "broadcast address"),
        ({"address": "10.1.1"}, "router.interfaces.guest.address", "not an IPv4 address"),
        ({"address": 5}, "router.interfaces.guest.address", "expected a string"),
        ({"adress": "10.1.1.10"}, "router.interfaces.guest.adress", "unknown field"),
        ({"device": "eth0"}, "router.interfaces", "different devices"),  # = control, no public
    ],
)
def test_guest_address_errors(guest: dict[str, Any], field: str, problem: str) -> None:
    c = shared()
    c["interfaces"]["guest"].update(guest)
    with pytest.raises(rc.ConfigError) as e:
        rc.parse(c)
    assert e.value.field == field
    assert problem in e.value.problem


def test_point_to_point_guest_network_may_use_either_address() -> None:
    c = shared()
    c["interfaces"]["guest"].update(cidr="10.1.1.0/31", gateway="10.1.1.1", address="10.1.1.0")
    c["dhcp"] = c["vm_data"] = []
    assert str(rc.parse(c).interfaces.guest.address) == "10.1.1.0"


def test_a_router_that_is_not_the_gateway_has_no_public_side() -> None:
    c = cfg()
    c["interfaces"]["guest"]["address"] = "10.1.1.10"
    with pytest.raises(rc.ConfigError) as e:
        rc.parse(c)
    assert e.value.field == "router.interfaces.guest.address"
    assert "no interfaces.public" in e.value.problem


def test_render_shared_daemons_listen_on_the_router_address_and_hand_out_the_gateway() -> None:
    r = render.render(rc.parse(shared()), PATHS, ENV)
    dns = r.files["dnsmasq_conf"].decode().splitlines()
    assert "listen-address=10.1.1.10" in dns
    assert "dhcp-option=tag:guest,option:router,10.1.1.1" in dns  # the external gateway
    assert "dhcp-option=tag:guest,option:dns-server,10.1.1.10" in dns  # us
    assert "interface=eth1" in dns and "server=8.8.8.8" in dns
    assert not any("10.1.1.1," in x or x.endswith("=10.1.1.1") for x in dns if "router" not in x)
    assert r.files["hosts"].splitlines()[0] == b"10.1.1.10 r-1-VM"  # the probe's answer
    ap = r.files["apache_conf"].decode().splitlines()
    assert "Listen 10.1.1.10:80" in ap and not any(x.startswith("Listen 10.1.1.1:") for x in ap)
    assert b"bind " not in r.files["haproxy_cfg"]  # no load balancer frontends
    assert r.addresses == {"eth1": ("10.1.1.10/24",), "eth0": ("169.254.3.4/16",)}
    assert r.default_route == ("10.1.1.1", "eth1")  # upstream DNS goes via the gateway
    assert r.public_ips == ()
    assert not r.forwarding
    assert r.garp == {"eth1": ("10.1.1.10",)}  # never the control NIC
    assert r.vmdata["10.1.1.5/user-data"] == b"hello"


def test_render_shared_iptables_route_nothing_and_nat_nothing() -> None:
    r = render.render(rc.parse(shared()), PATHS, ENV)
    f = r.tables["filter"].by_chain()
    assert f["SVM-FORWARD"] == ["-A SVM-FORWARD -j DROP"]
    assert "SVM-EGRESS" not in f  # unreachable without a public side: left empty
    assert f["SVM-INPUT"] == [
        "-A SVM-INPUT -i lo -j ACCEPT",
        "-A SVM-INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A SVM-INPUT -d 169.254.3.4/32 -i eth0 -p tcp -m tcp --dport 3922 -j ACCEPT",
        "-A SVM-INPUT -i eth0 -p icmp -j ACCEPT",
        "-A SVM-INPUT -i eth0 -j DROP",
        "-A SVM-INPUT -i eth1 -p udp -m udp --dport 67 -j ACCEPT",
        "-A SVM-INPUT -d 10.1.1.10/32 -i eth1 -p udp -m udp --dport 53 -j ACCEPT",
        "-A SVM-INPUT -d 10.1.1.10/32 -i eth1 -p tcp -m tcp --dport 53 -j ACCEPT",
        "-A SVM-INPUT -d 10.1.1.10/32 -i eth1 -p tcp -m tcp --dport 80 -j ACCEPT",
        "-A SVM-INPUT -i eth1 -p icmp -j ACCEPT",
        "-A SVM-INPUT -i eth1 -j DROP",
    ]
    assert r.tables["nat"].lines == () and r.tables["mangle"].lines == ()
    # The owned chains still exist (declared, empty) and the jumps are put in place.
    text = render.restore_input(r.tables, None, {"nat": render.JUMPS["nat"]}).text
    for table, chains in render.CHAINS.items():
        for chain in chains:
            assert f":{chain} - [0:0]" in text, (table, chain)
    assert "-I POSTROUTING 1 -j SVM-POSTROUTING" in text


def test_no_public_nic_but_the_router_is_the_gateway() -> None:
    c = shared()
    del c["interfaces"]["guest"]["address"]
    r = render.render(rc.parse(c), PATHS, ENV)
    assert r.default_route is None  # nowhere to go beyond the guest network
    assert r.forwarding  # guests may still route between themselves through it
    assert r.tables["filter"].by_chain()["SVM-FORWARD"] == [
        "-A SVM-FORWARD -i eth1 -o eth1 -j ACCEPT",
        "-A SVM-FORWARD -j DROP",
    ]
    assert r.tables["nat"].lines == () and r.tables["mangle"].lines == ()
    dns = r.files["dnsmasq_conf"].decode().splitlines()
    assert "dhcp-option=tag:guest,option:router,10.1.1.1" in dns
    assert "dhcp-option=tag:guest,option:dns-server,10.1.1.1" in dns
    assert r.addresses["eth1"] == ("10.1.1.1/24",)


def test_stats_with_no_public_ips_count_nothing_and_send_nothing() -> None:
    r = render.render(rc.parse(shared()), PATHS, ENV)
    lines = [*(f":{c} - [0:0]" for c in render.CHAINS["mangle"]), *r.tables["mangle"].lines]
    state = ipt.parse_table("mangle", lines)
    assert ipt.stats_counters(state) == {}
    book = stats.new_generation(stats.Book(), "b1")
    book = stats.record(book, stats.Reading(stats.epoch(book), ipt.stats_counters(state)))
    assert book.pending == ()


def test_announce_generation() -> None:
    c = shared()
    c["announce"] = 7
    assert rc.parse(c).announce == 7
    for bad, problem in ((-1, "out of range"), (True, "expected an integer"), ("1", "integer")):
        c2 = copy.deepcopy(c)
        c2["announce"] = bad
        with pytest.raises(rc.ConfigError) as e:
            rc.parse(c2)
        assert e.value.field == "router.announce" and problem in e.value.problem
    # Only the generation differs: the rendered router is the same.
    assert render.render(rc.parse(c), PATHS, ENV) == render.render(rc.parse(shared()), PATHS, ENV)
