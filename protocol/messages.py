"""The messages agents and the manager exchange.

One frozen dataclass per ``type`` tag (the tag is the class attribute ``type``, not a
field). Every field has a default so that a newer peer may omit fields and an older peer
may ignore new ones: :func:`protocol.codec.decode` drops unknown fields and validates the
type of every known one. Field types are deliberately few: ``int``, ``float``, ``bool``,
``str``, ``bytes``, ``int | None``, ``list[int]`` and ``dict[str, Any]`` (plain data only:
None, bool, int, float, str, bytes, lists and str-keyed dicts).

Pure module: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "AGENT_TO_MANAGER_TYPES",
    "MANAGER_TO_AGENT_TYPES",
    "MESSAGE_TYPES",
    "Command",
    "CommandResult",
    "Config",
    "ConfigAck",
    "Enrol",
    "Enrolled",
    "Error",
    "Event",
    "GoingAway",
    "Heartbeat",
    "HeartbeatAck",
    "Hello",
    "Message",
    "Request",
    "Response",
    "Welcome",
]


@dataclass(frozen=True, slots=True)
class Hello:
    """agent→manager, first frame on ``/agent``: versions offered and what the VM runs."""

    type: ClassVar[str] = "hello"
    versions: list[int] = field(default_factory=list)
    agent_version: str = ""
    image_version: str = ""
    role: str = ""
    boot_id: str = ""
    applied_version: int = 0
    status: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Welcome:
    """manager→agent answer to ``hello``: the negotiated version and the pacing.

    ``ack_every`` (protocol 2+): the manager acknowledges every Nth heartbeat only (seq 1
    and multiples of N); a version-1 agent ignores the field and gets every ack."""

    type: ClassVar[str] = "welcome"
    version: int = 0
    vm_id: str = ""
    heartbeat_interval: float = 10.0
    desired_version: int = 0
    ack_every: int = 1


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """agent→manager, every ``heartbeat_interval`` seconds."""

    type: ClassVar[str] = "heartbeat"
    seq: int = 0
    status: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    """manager→agent, echoes the heartbeat ``seq``."""

    type: ClassVar[str] = "heartbeat_ack"
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Config:
    """manager→agent: the VM's whole desired config at ``version``."""

    type: ClassVar[str] = "config"
    version: int = 0
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConfigAck:
    """agent→manager: config ``version`` applied (``ok``) or rolled back (``error``)."""

    type: ClassVar[str] = "config_ack"
    version: int = 0
    ok: bool = False
    error: str = ""


@dataclass(frozen=True, slots=True)
class Command:
    """manager→agent: run ``name`` at most once per ``id``."""

    type: ClassVar[str] = "command"
    id: str = ""
    name: str = ""
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CommandResult:
    """agent→manager: outcome of command ``id``."""

    type: ClassVar[str] = "command_result"
    id: str = ""
    ok: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True, slots=True)
class Request:
    """Either direction: a call that expects a :class:`Response` with the same ``id``."""

    type: ClassVar[str] = "request"
    id: int = 0
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Response:
    """Either direction: the answer to :class:`Request` ``id``."""

    type: ClassVar[str] = "response"
    id: int = 0
    ok: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    """agent→manager fire-and-forget notification."""

    type: ClassVar[str] = "event"
    name: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Error:
    """Either direction: the peer's last frame was refused. ``ref`` is its request id, if any."""

    type: ClassVar[str] = "error"
    code: str = ""
    reason: str = ""
    ref: int | None = None


@dataclass(frozen=True, slots=True)
class GoingAway:
    """manager→agent: the manager is stopping; reconnect after ``retry_after`` seconds."""

    type: ClassVar[str] = "going_away"
    reason: str = ""
    retry_after: float = 0.0


@dataclass(frozen=True, slots=True)
class Enrol:
    """agent→manager on ``/enrol``: one-time token and a CSR (PEM)."""

    type: ClassVar[str] = "enrol"
    vm_id: str = ""
    token: str = ""
    csr: bytes = b""


@dataclass(frozen=True, slots=True)
class Enrolled:
    """manager→agent on ``/enrol``: the signed certificate chain and the CA (PEM)."""

    type: ClassVar[str] = "enrolled"
    certificate: bytes = b""
    ca: bytes = b""


Message = (
    Hello
    | Welcome
    | Heartbeat
    | HeartbeatAck
    | Config
    | ConfigAck
    | Command
    | CommandResult
    | Request
    | Response
    | Event
    | Error
    | GoingAway
    | Enrol
    | Enrolled
)

#: type tag → class, for every message.
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.type: cls
    for cls in (
        Hello,
        Welcome,
        Heartbeat,
        HeartbeatAck,
        Config,
        ConfigAck,
        Command,
        CommandResult,
        Request,
        Response,
        Event,
        Error,
        GoingAway,
        Enrol,
        Enrolled,
    )
}

#: Types the manager accepts from an agent.
AGENT_TO_MANAGER_TYPES: frozenset[str] = frozenset(
    {
        "hello",
        "heartbeat",
        "config_ack",
        "command_result",
        "request",
        "response",
        "event",
        "error",
        "enrol",
    }
)

#: Types an agent accepts from the manager.
MANAGER_TO_AGENT_TYPES: frozenset[str] = frozenset(
    {
        "welcome",
        "heartbeat_ack",
        "config",
        "command",
        "request",
        "response",
        "error",
        "going_away",
        "enrolled",
    }
)
