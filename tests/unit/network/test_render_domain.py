"""A network without a DNS domain renders a config the router accepts (issue 5 gap):
the ``domain`` field is left out, so the router's default applies."""

from __future__ import annotations

import dataclasses

from agent.roles.router.config import parse
from manager.network.render import render_router
from tests.unit.network.test_render_stats import NET, NICS, state


def test_empty_domain_is_omitted_and_the_router_default_applies() -> None:
    s = state()
    no_domain = dataclasses.replace(s, network=dataclasses.replace(NET, network_domain=""))
    cfg = render_router(no_domain, NICS, 60)
    assert "domain" not in cfg
    assert parse(cfg).domain == "cloud.internal"


def test_a_domain_is_rendered_as_given() -> None:
    s = state()
    named = dataclasses.replace(s, network=dataclasses.replace(NET, network_domain="corp.example"))
    cfg = render_router(named, NICS, 60)
    assert cfg["domain"] == "corp.example" and parse(cfg).domain == "corp.example"
