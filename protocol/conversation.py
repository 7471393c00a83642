"""The conversation between an agent and the manager, as a sans-I/O state machine.

Both ends drive the same class: feed it the frames that arrive (:meth:`Conversation.receive`)
and the passing of time (:meth:`Conversation.tick`, woken at :meth:`next_deadline`); it
returns events to act on. It never raises on anything the peer sends, never does I/O and
never reads a clock — ``now`` is always an argument (any monotonic seconds).

States::

    manager:  HANDSHAKE --hello--> OPEN --(Close)--> CLOSED
                  \\--enrol--> ENROL
    agent:    IDLE --send(hello)--> HANDSHAKE --welcome--> OPEN --(Close)--> CLOSED
                \\--send(enrol)--> ENROL --enrolled--> (the manager closes)

Events:

- :class:`Received` — a message for the application (``hello``, ``welcome``, ``config``,
  ``command``, ``request``, ``event``, ``error`` not tied to a pending request, ...).
- :class:`Reply` — a frame to send back now (``heartbeat_ack``, ``error`` for a frame with
  an unknown type, a field of the wrong type, or a type this side does not accept).
- :class:`Close` — close the websocket with ``code`` and ``reason``; the conversation is
  over and further frames are ignored. Unparseable frames → 1008, oversized → 1009, no
  common version → 4002, ``going_away`` from the manager → 1001, frames out of order or
  too many consecutive bad frames → 1008.
- :class:`ResponseArrived` — the ``response`` (or an ``error`` whose ``ref`` is the
  request id, turned into a failed :class:`~protocol.messages.Response`) to one of our
  :meth:`Conversation.request` calls.
- :class:`RequestTimedOut` — no answer by the request's deadline (a late answer is dropped).
- :class:`PeerSilent` — nothing received for ``peer_timeout`` seconds (reported once per
  silence; the caller usually closes).

Pure module: no asyncio, no sockets, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from protocol.closecodes import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_VERSION,
)
from protocol.codec import (
    AGENT_TO_MANAGER,
    MANAGER_TO_AGENT,
    TOO_BIG,
    DecodeError,
    Limits,
    decode,
    encode,
)
from protocol.messages import (
    AGENT_TO_MANAGER_TYPES,
    MANAGER_TO_AGENT_TYPES,
    Enrol,
    Enrolled,
    Error,
    GoingAway,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Message,
    Request,
    Response,
    Welcome,
)
from protocol.versions import (
    MAX_ACK_EVERY,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    SPARSE_ACKS_VERSION,
    VersionError,
    negotiate,
    silence_timeout,
)

__all__ = [
    "UNEXPECTED_TYPE",
    "Close",
    "Conversation",
    "ConversationEvent",
    "PeerSilent",
    "Received",
    "Reply",
    "RequestTimedOut",
    "ResponseArrived",
    "Side",
    "State",
]

#: ``error.code`` sent back for a well-formed message this side never accepts.
UNEXPECTED_TYPE: Final = "unexpected_type"
#: Longest accepted ``welcome.heartbeat_interval`` (seconds).
MAX_HEARTBEAT_INTERVAL: Final = 3600.0


class Side(enum.Enum):
    AGENT = "agent"
    MANAGER = "manager"


class State(enum.Enum):
    IDLE = "idle"
    HANDSHAKE = "handshake"
    ENROL = "enrol"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Received:
    msg: Message


@dataclass(frozen=True, slots=True)
class Reply:
    frame: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ResponseArrived:
    request_id: int
    response: Response


@dataclass(frozen=True, slots=True)
class RequestTimedOut:
    request_id: int


@dataclass(frozen=True, slots=True)
class PeerSilent:
    pass


ConversationEvent = Received | Reply | Close | ResponseArrived | RequestTimedOut | PeerSilent


def _short(reason: str, limit: int = 120) -> str:
    """A close reason must fit in a control frame (123 bytes of UTF-8)."""
    raw = reason.encode("utf-8", "replace")
    if len(raw) <= limit:
        return reason
    return raw[:limit].decode("utf-8", "ignore")


class Conversation:
    """One websocket's worth of protocol state. See the module docstring.

    ``limits`` bounds the frames this side *receives* (default: ``AGENT_TO_MANAGER`` for
    the manager, ``MANAGER_TO_AGENT`` for an agent). ``peer_timeout`` defaults to three
    heartbeat intervals (on the agent side it follows the ``welcome``: ``ack_every`` + 2
    intervals, see :func:`protocol.versions.silence_timeout`). The manager acknowledges
    heartbeat 1 and every ``ack_every``-th after it, as its ``welcome`` announced (protocol
    2+; every heartbeat for a version-1 agent).
    After ``max_errors`` bad frames in a row the conversation closes with 1008.
    """

    def __init__(
        self,
        side: Side,
        *,
        now: float,
        heartbeat_interval: float = 10.0,
        peer_timeout: float | None = None,
        limits: Limits | None = None,
        max_errors: int = 32,
    ) -> None:
        self.side = side
        self.state = State.HANDSHAKE if side is Side.MANAGER else State.IDLE
        self.heartbeat_interval = heartbeat_interval
        self._derived_timeout = peer_timeout is None
        self.peer_timeout = 3.0 * heartbeat_interval if peer_timeout is None else peer_timeout
        if side is Side.MANAGER:
            self.limits = AGENT_TO_MANAGER if limits is None else limits
            self._accepts = AGENT_TO_MANAGER_TYPES
        else:
            self.limits = MANAGER_TO_AGENT if limits is None else limits
            self._accepts = MANAGER_TO_AGENT_TYPES
        self.max_errors = max_errors
        #: Negotiated protocol version, once the handshake is done.
        self.version: int | None = None
        #: The agent's ``hello`` (manager side) / the manager's ``welcome`` (agent side).
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        self._offered: tuple[int, ...] = ()
        self._last_rx = now
        self._silent_reported = False
        self._errors = 0
        self._next_id = 1
        self._pending: dict[int, float] = {}
        self._hb_seq = 0
        self._last_hb = now
        #: Heartbeats per ack (set by the ``welcome`` sent / received).
        self.ack_every = 1

    # -- queries -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    def next_deadline(self) -> float | None:
        """When :meth:`tick` (or an agent's heartbeat) next has something to do."""
        if self.state is State.CLOSED:
            return None
        candidates = list(self._pending.values())
        if not self._silent_reported:
            candidates.append(self._last_rx + self.peer_timeout)
        if self.side is Side.AGENT and self.state is State.OPEN:
            candidates.append(self._last_hb + self.heartbeat_interval)
        return min(candidates) if candidates else None

    def heartbeat_due(self, now: float) -> bool:
        """Agent side: is it time to send :meth:`heartbeat`?"""
        return (
            self.side is Side.AGENT
            and self.state is State.OPEN
            and now >= self._last_hb + self.heartbeat_interval
        )

    # -- sending -------------------------------------------------------------------------

    def send(self, msg: Message, now: float | None = None) -> bytes:
        """Encode ``msg``, noting what it means for the state (``hello``/``enrol`` start
        the agent's handshake). Raises :class:`protocol.codec.EncodeError` on a message the
        peer could not accept — a programming error, not a peer's fault."""
        frame = encode(msg)
        if self.side is Side.AGENT and self.state is State.IDLE:
            if isinstance(msg, Hello):
                self.state = State.HANDSHAKE
                self._offered = tuple(msg.versions)
            elif isinstance(msg, Enrol):
                self.state = State.ENROL
        if isinstance(msg, Heartbeat) and now is not None:
            self._last_hb = now
        elif isinstance(msg, Welcome) and self.side is Side.MANAGER:
            self.ack_every = _ack_every(msg, self.version)
        return frame

    def heartbeat(self, status: Mapping[str, Any], now: float) -> bytes:
        """Agent side: the next heartbeat frame (sequence numbers count from 1)."""
        self._hb_seq += 1
        self._last_hb = now
        return encode(Heartbeat(seq=self._hb_seq, status=dict(status)))

    def request(
        self, method: str, params: Mapping[str, Any], now: float, timeout: float
    ) -> tuple[int, bytes]:
        """A new request: its id and the frame to send. The answer arrives as
        :class:`ResponseArrived` or, after ``timeout`` seconds, :class:`RequestTimedOut`."""
        if self.state is State.CLOSED:
            raise RuntimeError("conversation is closed")
        request_id = self._next_id
        frame = encode(Request(id=request_id, method=method, params=dict(params)))
        self._next_id += 1
        self._pending[request_id] = now + timeout
        return request_id, frame

    def cancel(self, request_id: int) -> None:
        """Forget a pending request (its answer, if any, will be dropped)."""
        self._pending.pop(request_id, None)

    # -- receiving -----------------------------------------------------------------------

    def receive(self, frame: bytes | str, now: float) -> list[ConversationEvent]:
        """Handle one incoming websocket message. Never raises."""
        if self.state is State.CLOSED:
            return []
        self._last_rx = now
        self._silent_reported = False
        try:
            msg = decode(frame, self.limits)
        except DecodeError as exc:
            if exc.recoverable:
                return self._refuse(exc.code, exc.reason, exc.ref)
            return self._close(CLOSE_TOO_BIG if exc.code == TOO_BIG else CLOSE_POLICY, exc.reason)
        if msg.type not in self._accepts:
            ref = msg.id if isinstance(msg, Request | Response) else None
            return self._refuse(
                UNEXPECTED_TYPE, f"{self.side.value} does not accept {msg.type!r}", ref
            )
        self._errors = 0
        if self.side is Side.MANAGER:
            return self._manager_receive(msg)
        return self._agent_receive(msg, now)

    def tick(self, now: float) -> list[ConversationEvent]:
        """Report what time has made happen: request timeouts, a silent peer."""
        if self.state is State.CLOSED:
            return []
        events: list[ConversationEvent] = []
        if self._pending:
            expired = sorted(rid for rid, deadline in self._pending.items() if deadline <= now)
            for rid in expired:
                del self._pending[rid]
                events.append(RequestTimedOut(rid))
        if not self._silent_reported and now >= self._last_rx + self.peer_timeout:
            self._silent_reported = True
            events.append(PeerSilent())
        return events

    # -- internals -----------------------------------------------------------------------

    def _close(self, code: int, reason: str) -> list[ConversationEvent]:
        self.state = State.CLOSED
        self._pending.clear()
        return [Close(code, _short(reason))]

    def _refuse(self, code: str, reason: str, ref: int | None) -> list[ConversationEvent]:
        self._errors += 1
        if self._errors > self.max_errors:
            return self._close(CLOSE_POLICY, f"too many bad frames in a row ({code}: {reason})")
        return [Reply(encode(Error(code=code, reason=reason, ref=ref)))]

    def _answer(self, msg: Message) -> list[ConversationEvent] | None:
        """Responses (and errors that point at a pending request) to our requests."""
        if isinstance(msg, Response):
            if self._pending.pop(msg.id, None) is None:
                return []  # late (after RequestTimedOut) or unknown: dropped
            return [ResponseArrived(msg.id, msg)]
        if isinstance(msg, Error) and msg.ref is not None and msg.ref in self._pending:
            del self._pending[msg.ref]
            failed = Response(id=msg.ref, ok=False, error=f"{msg.code}: {msg.reason}")
            return [ResponseArrived(msg.ref, failed)]
        return None

    def _manager_receive(self, msg: Message) -> list[ConversationEvent]:
        if self.state is State.HANDSHAKE:
            if isinstance(msg, Hello):
                try:
                    self.version = negotiate(msg.versions)
                except VersionError as exc:
                    return self._close(CLOSE_UNSUPPORTED_VERSION, str(exc))
                self.hello = msg
                self.state = State.OPEN
                return [Received(msg)]
            if isinstance(msg, Enrol):
                self.state = State.ENROL
                return [Received(msg)]
            if isinstance(msg, Error):
                return [Received(msg)]
            return self._close(CLOSE_POLICY, f"expected hello or enrol, got {msg.type!r}")
        if self.state is State.ENROL:
            if isinstance(msg, Error):
                return [Received(msg)]
            return self._close(CLOSE_POLICY, f"unexpected {msg.type!r} after enrol")
        # OPEN
        if isinstance(msg, Hello | Enrol):
            return self._close(CLOSE_POLICY, f"unexpected {msg.type!r} after hello")
        if isinstance(msg, Heartbeat):
            every = self.ack_every
            if every == 1 or msg.seq % every == 0 or msg.seq == 1:
                return [Received(msg), Reply(encode(HeartbeatAck(seq=msg.seq)))]
            return [Received(msg)]
        answered = self._answer(msg)
        if answered is not None:
            return answered
        return [Received(msg)]

    def _agent_receive(self, msg: Message, now: float) -> list[ConversationEvent]:
        if isinstance(msg, GoingAway):
            self.state = State.CLOSED
            self._pending.clear()
            return [Received(msg), Close(CLOSE_GOING_AWAY, _short(msg.reason or "going away"))]
        if isinstance(msg, Error) and self.state is not State.OPEN:
            return [Received(msg)]
        if self.state is State.IDLE:
            return self._close(CLOSE_POLICY, f"unexpected {msg.type!r} before hello")
        if self.state is State.HANDSHAKE:
            if isinstance(msg, Welcome):
                return self._welcome(msg, now)
            return self._close(CLOSE_POLICY, f"expected welcome, got {msg.type!r}")
        if self.state is State.ENROL:
            if isinstance(msg, Enrolled):
                return [Received(msg)]
            return self._close(CLOSE_POLICY, f"expected enrolled, got {msg.type!r}")
        # OPEN
        if isinstance(msg, Welcome | Enrolled):
            return self._close(CLOSE_POLICY, f"unexpected {msg.type!r} after welcome")
        answered = self._answer(msg)
        if answered is not None:
            return answered
        return [Received(msg)]

    def _welcome(self, msg: Welcome, now: float) -> list[ConversationEvent]:
        offered = self._offered or tuple(range(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 1))
        if msg.version not in offered or not (
            MIN_PROTOCOL_VERSION <= msg.version <= PROTOCOL_VERSION
        ):
            return self._close(
                CLOSE_UNSUPPORTED_VERSION,
                f"manager chose protocol version {msg.version}, not one offered",
            )
        if not 0.0 < msg.heartbeat_interval <= MAX_HEARTBEAT_INTERVAL:
            return self._close(
                CLOSE_POLICY, f"heartbeat_interval {msg.heartbeat_interval} out of range"
            )
        if msg.version >= SPARSE_ACKS_VERSION and not 1 <= msg.ack_every <= MAX_ACK_EVERY:
            return self._close(CLOSE_POLICY, f"ack_every {msg.ack_every} out of range")
        self.version = msg.version
        self.welcome = msg
        self.heartbeat_interval = msg.heartbeat_interval
        self.ack_every = _ack_every(msg, msg.version)
        if self._derived_timeout:
            self.peer_timeout = silence_timeout(msg.heartbeat_interval, self.ack_every)
        self._last_hb = now
        self.state = State.OPEN
        return [Received(msg)]


def _ack_every(welcome: Welcome, version: int | None) -> int:
    """Heartbeats per ack a ``welcome`` sets: 1 below protocol 2, else its value clamped."""
    if version is None or version < SPARSE_ACKS_VERSION:
        return 1
    return max(1, min(welcome.ack_every, MAX_ACK_EVERY))
