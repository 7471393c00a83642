"""Websocket close codes used between agents and the manager (RFC 6455 + private 4xxx)."""

from __future__ import annotations

from typing import Final

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_REVOKED",
    "CLOSE_TOO_BIG",
    "CLOSE_UNAUTHORIZED",
    "CLOSE_UNSUPPORTED_VERSION",
]

CLOSE_NORMAL: Final = 1000
#: The manager is shutting down (sent with a ``going_away`` message first).
CLOSE_GOING_AWAY: Final = 1001
#: Protocol violation: unparseable frame, text frame, message out of order, too many errors.
CLOSE_POLICY: Final = 1008
#: Frame over the direction's ``Limits.max_frame``.
CLOSE_TOO_BIG: Final = 1009
#: Authentication failed.
CLOSE_UNAUTHORIZED: Final = 4001
#: No common protocol version (``protocol.versions.negotiate`` failed).
CLOSE_UNSUPPORTED_VERSION: Final = 4002
#: The VM's certificate was revoked or the VM destroyed.
CLOSE_REVOKED: Final = 4003
