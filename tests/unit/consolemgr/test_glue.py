"""Pure glue of the console proxy's manager side (no loop, no I/O)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from manager.api.commands.vms import vm_view
from manager.consoleproxy.assign import ProxyLoad, ProxyState, choose_proxy
from manager.consoleproxy.records import DRAIN_KEY, GuestRecord
from manager.consoleproxy.runtime import (
    drain_outlived,
    draining_section,
    endpoint_body,
    planner_state,
    proxy_endpoint,
    prune_pending,
    with_pending,
)
from manager.store.base import Role, SystemVm, User, VmState


def _vm(role: Role = Role.CONSOLE_PROXY, details: dict[str, Any] | None = None) -> SystemVm:
    return SystemVm(
        id="p1",
        seq=1,
        name="v-1-VM",
        role=role,
        zone_id="z",
        pod_id=None,
        host_id=None,
        state=VmState.RUNNING,
        template_id=None,
        hypervisor="External",
        public_ip=None,
        private_ip=None,
        linklocal_ip=None,
        desired_version=1,
        applied_version=1,
        agent_version=None,
        image_version=None,
        last_seen=None,
        created=0.0,
        details=details or {},
    )


@pytest.mark.parametrize(
    ("state", "connected", "want"),
    [
        ("Running", True, "Running"),
        ("Running", False, "Starting"),  # no link: cannot authorise, capacity on its way
        ("Starting", True, "Running"),  # External VM whose agent said hello
        ("Starting", False, "Starting"),
        ("Stopping", True, "Stopping"),
        ("Stopped", True, "Stopped"),
    ],
)
def test_planner_state(state: str, connected: bool, want: str) -> None:
    assert planner_state(state, connected) == want


@pytest.mark.parametrize(
    ("public_ip", "status", "want"),
    [
        ("198.18.0.5", None, ("198.18.0.5", None)),
        ("198.18.0.5", {"role": {"listening": "0.0.0.0:8080"}}, ("198.18.0.5", 8080)),
        (None, {"role": {"listening": "127.0.0.1:4321"}}, ("127.0.0.1", 4321)),
        (None, {"role": {"listening": "0.0.0.0:80"}}, (None, 80)),  # wildcard: no address
        (None, {"role": {"listening": "[::1]:81"}}, ("::1", 81)),
        (None, {"role": {"listening": None}}, (None, None)),
        (None, {"role": "garbage"}, (None, None)),
        (None, {"role": {"listening": "host:99999"}}, (None, None)),
    ],
)
def test_proxy_endpoint(
    public_ip: str | None, status: dict[str, Any] | None, want: tuple[str | None, int | None]
) -> None:
    assert proxy_endpoint(public_ip, status) == want


def test_pending_consoles_count_as_load_until_reported() -> None:
    busy = ProxyLoad("p1", ProxyState.RUNNING, sessions=1, session_vm_ids=frozenset({"a"}))
    idle = ProxyLoad("p2", ProxyState.RUNNING, idle_since=5.0)
    # Without pending counts, p2 (idle) gets the next VM; with two consoles just handed to
    # p2 (not reported yet) p1 is the least loaded.
    loads = [busy, with_pending(idle, ["b", "c"])]
    assert loads[1].sessions == 2 and loads[1].idle_since is None
    choice = choose_proxy(loads, "d", None, now=10.0, session_max=5, session_timeout=300)
    assert choice.proxy_vm_id == "p1"
    # A pending VM already in the report is not counted twice.
    assert with_pending(busy, ["a"]) is busy


def test_prune_pending_drops_expired_tokens() -> None:
    pending = {"p1": {"a": 10.0, "b": 30.0}, "p2": {"c": 5.0}}
    assert prune_pending(pending, 20.0) == {"p1": {"b": 30.0}}


def test_endpoint_body_shape() -> None:
    body = endpoint_body("http://h/console?vm=v&token=t", "t", "h", 8080)
    assert body == {
        "consoleendpoint": {
            "success": True,
            "url": "http://h/console?vm=v&token=t",
            "websocket": {
                "token": "t",
                "host": "h",
                "port": "8080",
                "path": "websockify",
                "extra": "",
            },
        }
    }


def test_draining_section_only_for_draining_console_proxies() -> None:
    assert draining_section(_vm(), None) is None
    assert draining_section(_vm(details={DRAIN_KEY: 12.0}), None) == {"draining": True}
    assert draining_section(_vm(Role.SECONDARY_STORAGE, {DRAIN_KEY: 1.0}), None) is None


def test_vm_view_never_carries_console_secrets() -> None:
    user = User("u", "acct", "admin", "admin", 1, "dom", "k", "s", "enabled")
    g = GuestRecord("id1", "web", "Web", "acct", "z", "Running", 64, 0.0, 0.0)
    view = vm_view(g, user, {"z": "zone1"})
    assert view["zonename"] == "zone1" and view["account"] == "admin"
    assert not {"vnc", "password", "vncport", "port"} & {k.lower() for k in view}
    other = vm_view(GuestRecord("id2", "x", "x", "other", None, "Stopped", 64, 0.0, 0.0), user, {})
    assert "account" not in other and "zoneid" not in other
    json.dumps(view)  # serialisable as is


def test_a_drain_ends_when_the_proxy_restarted_after_it() -> None:
    assert not drain_outlived({DRAIN_KEY: 10.0})  # no start since
    assert not drain_outlived({DRAIN_KEY: 10.0, "started_at": 5.0})  # started before
    assert drain_outlived({DRAIN_KEY: 10.0, "started_at": 20.0})  # restarted: over
    assert not drain_outlived({"started_at": 20.0})
    assert draining_section(_vm(details={DRAIN_KEY: 10.0, "started_at": 20.0}), None) is None
    assert draining_section(_vm(details={DRAIN_KEY: 10.0, "started_at": 5.0}), None) == {
        "draining": True
    }
