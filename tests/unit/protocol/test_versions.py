"""protocol.versions: negotiation picks the highest common version, never downgrades below
the minimum."""

from __future__ import annotations

import pytest

from protocol.versions import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    VersionError,
    negotiate,
)


def test_supported_versions() -> None:
    assert SUPPORTED_VERSIONS[0] == MIN_PROTOCOL_VERSION
    assert SUPPORTED_VERSIONS[-1] == PROTOCOL_VERSION
    assert MIN_PROTOCOL_VERSION <= PROTOCOL_VERSION
    assert negotiate(SUPPORTED_VERSIONS) == PROTOCOL_VERSION


def test_picks_highest_common() -> None:
    assert negotiate([1, 2, 3, 4, 5], minimum=2, maximum=4) == 4
    assert negotiate([5, 3, 2], minimum=2, maximum=4) == 3
    assert negotiate([PROTOCOL_VERSION + 1, PROTOCOL_VERSION]) == PROTOCOL_VERSION
    assert negotiate(iter([2]), minimum=1, maximum=3) == 2


def test_refuses_downgrade_below_minimum() -> None:
    with pytest.raises(VersionError, match=r"offered 1,2, supported 3\.\.5"):
        negotiate([1, 2], minimum=3, maximum=5)
    with pytest.raises(VersionError):
        negotiate([MIN_PROTOCOL_VERSION - 1])


def test_refuses_only_newer() -> None:
    with pytest.raises(VersionError, match="offered 9"):
        negotiate([9], minimum=1, maximum=3)


def test_refuses_empty_and_non_int() -> None:
    with pytest.raises(VersionError, match="offered none"):
        negotiate([])
    with pytest.raises(VersionError):
        negotiate([True])  # a bool is not a version
    assert isinstance(VersionError("x"), ValueError)


def test_error_message_is_bounded() -> None:
    with pytest.raises(VersionError) as info:
        negotiate(range(1000, 100_000), minimum=1, maximum=3)
    assert len(str(info.value)) < 120
