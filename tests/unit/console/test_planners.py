"""Console proxy assignment, scaling and URLs (pure)."""

from __future__ import annotations

import pytest

from manager.consoleproxy.assign import PreviousAssignment, ProxyLoad, Reason, choose_proxy
from manager.consoleproxy.load import ReportError, parse_report, to_load
from manager.consoleproxy.scale import drain_status, free_slots, plan_capacity
from manager.consoleproxy.urls import UrlDomainError, console_url, proxy_host

R, S = "Running", "Starting"


def p(vm: str, sessions: int = 0, state: str = R, **kw: object) -> ProxyLoad:
    return ProxyLoad(vm_id=vm, state=state, sessions=sessions, **kw)  # type: ignore[arg-type]


def choose(proxies: list[ProxyLoad], prev: PreviousAssignment | None = None, now: float = 1000.0):  # type: ignore[no-untyped-def]
    return choose_proxy(proxies, "vm-x", prev, now=now, session_max=10, session_timeout=300)


def test_least_loaded_not_first() -> None:
    # CloudStack's allocator would return the first (a) with room; we take the least loaded.
    c = choose([p("a", 8), p("b", 3), p("c", 5)])
    assert (c.proxy_vm_id, c.reason) == ("b", Reason.LEAST_LOADED)
    # ties -> lowest id, stable
    assert choose([p("b", 2), p("a", 2)]).proxy_vm_id == "a"


def test_sticky_within_session_timeout() -> None:
    prev = PreviousAssignment("a", assigned_at=900.0)
    c = choose([p("a", 8), p("b", 0)], prev)
    assert (c.proxy_vm_id, c.reason) == ("a", Reason.STICKY)
    # too old -> least loaded
    old = PreviousAssignment("a", assigned_at=600.0)
    assert choose([p("a", 8), p("b", 0)], old).proxy_vm_id == "b"


def test_sticky_full_proxy_kept_only_if_it_holds_the_vm() -> None:
    prev = PreviousAssignment("a", assigned_at=990.0)
    full = p("a", 10)
    assert choose([full, p("b", 1)], prev).proxy_vm_id == "b"
    holding = p("a", 10, session_vm_ids=frozenset({"vm-x"}))
    assert choose([holding, p("b", 1)], prev).reason is Reason.STICKY


def test_sticky_not_to_stopped_or_draining() -> None:
    prev = PreviousAssignment("a", assigned_at=990.0)
    assert choose([p("a", 1, state="Stopped"), p("b", 5)], prev).proxy_vm_id == "b"
    assert choose([p("a", 1, draining=True), p("b", 5)], prev).proxy_vm_id == "b"


def test_none_available_when_all_full_or_down() -> None:
    c = choose([p("a", 10), p("b", 0, state=S), p("c", 0, draining=True)])
    assert (c.proxy_vm_id, c.reason) == (None, Reason.NONE_AVAILABLE)
    assert choose([]).reason is Reason.NONE_AVAILABLE


def plan(proxies: list[ProxyLoad], now: float = 1000.0, **kw: int):  # type: ignore[no-untyped-def]
    args = {"session_max": 50, "standby": 10, "launch_max": 4} | kw
    return plan_capacity(proxies, now=now, idle_grace=60, **args)  # type: ignore[arg-type]


def test_standby_rule_starts_enough_at_once() -> None:
    assert plan([]).start == 1  # a zone always has one
    assert plan([p("a", 35)]).start == 0  # 15 free >= 10
    assert plan([p("a", 41)]).start == 1  # 9 free < 10
    assert plan([p("a", 50)], standby=60).start == 2  # 0 free: two to get 60 back
    assert plan([p("a", 45), p("b", 0, state=S)]).start == 0  # starting counts
    assert plan([p("a", 50), p("b", 50), p("c", 50), p("d", 50)]).start == 0  # launch.max
    assert "launch.max" in plan([p(v, 50) for v in "abcd"]).reason
    assert plan([p("a", 50), p("b", 50), p("c", 50)], standby=200).start == 1  # capped by room
    assert free_slots([p("a", 60), p("b", 1, draining=True)], 50) == 0


def test_stop_idle_extra_without_flapping() -> None:
    idle_long = dict(idle_since=800.0)
    busy, spare1, spare2 = (
        p("a", 20),
        p("b", 0, started=1.0, **idle_long),
        p("c", 0, started=2.0, **idle_long),
    )
    r = plan([busy, spare1, spare2])
    # free = 30 + 50 + 50 = 130; stopping c (newest) leaves 80, b leaves 30 >= 10: both go.
    assert r.stop == ("c", "b") and r.start == 0
    # After stopping, the start rule does not fire (no flap).
    assert plan([busy]).start == 0
    # Recently idle -> kept (grace).
    assert plan([busy, p("b", 0, idle_since=990.0)]).stop == ()
    # Only one proxy -> never stopped.
    assert plan([p("a", 0, idle_since=0.0)]).stop == ()
    # Would drop free below standby -> kept.
    assert plan([p("a", 45), p("b", 0, idle_since=0.0)]).stop == ()


def test_drain() -> None:
    busy = p("a", 3, draining=True)
    d = drain_status(busy, drain_started=100, now=110, drain_timeout=60)
    assert (d.ready, d.sessions_cut) == (False, 3)
    d = drain_status(busy, drain_started=100, now=170, drain_timeout=60)
    assert (d.ready, d.sessions_cut) == (True, 3) and "cuts 3" in d.reason
    d = drain_status(p("a", 0, draining=True), drain_started=100, now=101, drain_timeout=60)
    assert (d.ready, d.sessions_cut) == (True, 0)
    with pytest.raises(ValueError):
        plan([], session_max=0)


def test_url_forms() -> None:
    assert proxy_host("1.2.3.4", "") == "1.2.3.4"
    assert proxy_host("1.2.3.4", "*.example.com") == "1-2-3-4.example.com"
    assert proxy_host("1.2.3.4", "console.example.com") == "console.example.com"
    assert proxy_host("2001:db8::1", "") == "[2001:db8::1]"
    for bad in ("*.", "a.*.com", "bad_label.com", "-x.com"):
        with pytest.raises(UrlDomainError):
            proxy_host("1.2.3.4", bad)
    with pytest.raises(ValueError):
        proxy_host("not-an-ip", "")
    url = console_url(
        public_ip="1.2.3.4", url_domain="*.cp.test", ssl=True, vm_id="v1", token="t/k"
    )
    assert url == "https://1-2-3-4.cp.test/console?vm=v1&token=t%2Fk"
    assert console_url(
        public_ip="1.2.3.4", url_domain="", ssl=False, vm_id="v", token="t", port=8080
    ) == ("http://1.2.3.4:8080/console?vm=v&token=t")


def test_load_reports() -> None:
    rep = parse_report(
        {
            "count": 1,
            "draining": False,
            "sessions": [{"vm_id": "v", "client": "203.0.113.9", "started": 1.0, "last_used": 2.5}],
        }
    )
    load = to_load("cp", R, rep, now=10.0)
    assert (load.sessions, load.session_vm_ids, load.idle_since) == (1, frozenset({"v"}), None)
    idle = to_load("cp", R, parse_report({"count": 0}), now=20.0)
    assert idle.idle_since == 20.0
    assert to_load("cp", R, parse_report({}), now=30.0, previous=idle).idle_since == 20.0
    for bad in (
        {"sessions": "x"},
        {"sessions": [{"vm_id": 1}]},
        {"count": -1},
        {"count": True},
        {"draining": "yes"},
        {"sessions": [{"vm_id": "v", "started": "x", "last_used": 1}]},
    ):
        with pytest.raises(ReportError):
            parse_report(bad)
