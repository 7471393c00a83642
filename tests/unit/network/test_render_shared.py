"""A Shared network's router (no public NIC, its own address, not the gateway) and the
announce generation: rendered, and accepted by the router role's own parser."""

from __future__ import annotations

import dataclasses

import pytest

from agent.roles.router.config import parse
from manager.network.model import (
    SERVICES,
    SHARED_ROUTER_DEVICES,
    NetworkState,
    RouterNics,
    needs_router,
    router_devices,
)
from manager.network.render import render_router
from manager.network.validate import NetError, offering_change
from tests.unit.network.test_render_stats import NET, NICS, state

SHARED_NET = dataclasses.replace(
    NET, guest_type="Shared", start_ip="10.1.1.10", end_ip="10.1.1.99", router_ip="10.1.1.10"
)
SHARED_NICS = RouterNics(router_id="r1", control_ip="169.254.3.4", devices=SHARED_ROUTER_DEVICES)


def shared_state() -> NetworkState:
    # the full state (public IPs, rules) on purpose: none of it may reach this router
    return dataclasses.replace(state(), network=SHARED_NET)


def test_shared_router_has_no_public_side_and_its_own_address() -> None:
    cfg = render_router(shared_state(), SHARED_NICS, 60)
    assert set(cfg["interfaces"]) == {"guest", "control"}
    assert cfg["interfaces"]["guest"] == {
        "device": "eth1", "gateway": "10.1.1.1", "cidr": "10.1.1.0/24", "address": "10.1.1.10",
    }  # fmt: skip
    assert cfg["firewall"] == cfg["port_forwarding"] == cfg["static_nat"] == []
    assert cfg["load_balancers"] == [] and cfg["egress"]["rules"] == []
    assert "source_nat" not in cfg
    assert cfg["dhcp"] and cfg["vm_data"]  # DHCP, DNS and userdata still served
    assert all("public-ipv4" not in v["meta_data"] for v in cfg["vm_data"])
    parsed = parse(cfg)
    assert parsed.interfaces.public is None
    assert str(parsed.interfaces.guest.address) == "10.1.1.10"


def test_isolated_router_output_is_unchanged_by_the_shared_fields() -> None:
    cfg = render_router(state(), NICS, 60)
    assert list(cfg["interfaces"])[:2] == ["public", "guest"]
    assert "address" not in cfg["interfaces"]["guest"] and "announce" not in cfg


def test_announce_generation_is_rendered_only_when_set() -> None:
    cfg = render_router(state(), dataclasses.replace(NICS, announce=3), 60)
    assert cfg["announce"] == 3 and parse(cfg).announce == 3


def test_which_networks_get_a_router() -> None:
    assert needs_router("Isolated", ())
    assert needs_router("Shared", ("Dhcp",)) and needs_router("Shared", ("UserData",))
    assert not needs_router("Shared", ()) and not needs_router("Shared", ("SourceNat",))
    assert "public" not in router_devices("Shared")
    assert router_devices("Isolated") == {"control": "eth0", "public": "eth1", "guest": "eth2"}


def test_an_offering_change_that_adds_or_removes_the_shared_router_is_refused() -> None:
    def change(old: tuple[str, ...], new: tuple[str, ...]) -> None:
        offering_change("lan", "Shared", old, "x", "Shared", "Enabled", new, {})

    change(("Dhcp", "Dns"), ("Dhcp", "Dns", "UserData"))  # still served by the router
    with pytest.raises(NetError, match="takes the virtual router away from network lan"):
        change(("Dhcp", "Dns", "UserData"), ())
    with pytest.raises(NetError, match="adds a virtual router to network lan"):
        change((), ("Dhcp",))
    offering_change("web", "Isolated", SERVICES, "x", "Isolated", "Enabled", (), {})
