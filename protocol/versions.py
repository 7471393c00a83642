"""Protocol versions and their negotiation.

The agent offers every version it speaks in ``hello.versions``; the manager answers the
highest one both speak in ``welcome.version``. A peer that only offers versions below
:data:`MIN_PROTOCOL_VERSION` is refused (close 4002) — there is no silent downgrade.

History: 1 — first release; 2 — sparse heartbeat acks (``welcome.ack_every``: the
manager acknowledges heartbeat 1 and every Nth after it, and the agent waits N + 2
intervals before it calls the manager silent). A version-1 peer gets an ack per heartbeat.

Pure module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = [
    "MAX_ACK_EVERY",
    "MIN_PROTOCOL_VERSION",
    "PROTOCOL_VERSION",
    "SPARSE_ACKS_VERSION",
    "SUPPORTED_VERSIONS",
    "VersionError",
    "negotiate",
    "silence_timeout",
]

#: The newest version this code speaks.
PROTOCOL_VERSION: Final = 2
#: The oldest version this code still accepts.
MIN_PROTOCOL_VERSION: Final = 1
#: The first version whose ``welcome.ack_every`` may exceed 1.
SPARSE_ACKS_VERSION: Final = 2
#: Largest accepted ``welcome.ack_every``.
MAX_ACK_EVERY: Final = 60
#: What an agent offers in ``hello.versions`` (oldest first).
SUPPORTED_VERSIONS: Final = tuple(range(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 1))


class VersionError(ValueError):
    """No version is both offered by the peer and supported here."""


def negotiate(
    offered: Iterable[int],
    minimum: int = MIN_PROTOCOL_VERSION,
    maximum: int = PROTOCOL_VERSION,
) -> int:
    """Return the highest version in ``offered`` within ``[minimum, maximum]``.

    Raises :class:`VersionError` naming what was offered (at most a few values) when none
    qualifies.
    """
    best: int | None = None
    seen: list[int] = []
    for v in offered:
        if len(seen) < 8:
            seen.append(v)
        if type(v) is int and minimum <= v <= maximum and (best is None or v > best):
            best = v
    if best is None:
        shown = ",".join(str(v) for v in seen) or "none"
        raise VersionError(
            f"no common protocol version: offered {shown}, supported {minimum}..{maximum}"
        )
    return best


def silence_timeout(heartbeat_interval: float, ack_every: int = 1) -> float:
    """How long an agent hears nothing before it calls the manager silent: the longest
    normal gap between acks (``ack_every`` intervals) plus two intervals of slack."""
    return (max(1, ack_every) + 2) * heartbeat_interval
