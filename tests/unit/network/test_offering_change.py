"""updateNetwork networkofferingid=: the pure refusal rules (431 texts)."""

from __future__ import annotations

import pytest

from manager.network.model import SERVICES
from manager.network.validate import NetError, offering_change


def change(new_services: tuple[str, ...], in_use: dict[str, int], **kw: str) -> None:
    args = {"new_guest_type": "Isolated", "new_state": "Enabled", **kw}
    offering_change(
        "web", "Isolated", SERVICES, "small", args["new_guest_type"], args["new_state"],
        new_services, in_use,
    )  # fmt: skip


def test_dropping_an_unused_service_is_allowed() -> None:
    change(tuple(s for s in SERVICES if s != "Lb"), {"PortForwarding": 2, "SourceNat": 1})


def test_dropping_a_service_in_use_is_refused_with_what_uses_it() -> None:
    without = tuple(s for s in SERVICES if s not in ("PortForwarding", "Lb"))
    with pytest.raises(NetError) as e:
        change(without, {"PortForwarding": 2, "Lb": 1, "Firewall": 3})
    text = str(e.value)
    assert "PortForwarding (2 port forwarding rule(s))" in text
    assert "Lb (1 load balancer rule(s))" in text and "Firewall" not in text
    assert "remove them first" in text


def test_other_guest_type_or_disabled_is_refused() -> None:
    with pytest.raises(NetError, match="is Isolated: offering small is for Shared"):
        change(SERVICES, {}, new_guest_type="Shared")
    with pytest.raises(NetError, match="not enabled"):
        change(SERVICES, {}, new_state="Disabled")
