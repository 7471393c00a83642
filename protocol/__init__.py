"""sysvm protocol: the messages between agents and the manager, their MessagePack codec,
version negotiation, and the sans-I/O conversation both ends drive.

Pure package: no asyncio, no sockets, no clock (time is always an argument).

Exceptions: :class:`DecodeError` (a peer's frame was refused; only raised by
:func:`decode`, which :meth:`Conversation.receive` catches), :class:`EncodeError`
(ValueError: our own message cannot be carried), :class:`VersionError` (ValueError: no
common protocol version).
"""

from protocol.closecodes import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_REVOKED,
    CLOSE_TOO_BIG,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED_VERSION,
)
from protocol.codec import (
    AGENT_TO_MANAGER,
    MANAGER_TO_AGENT,
    DecodeError,
    EncodeError,
    Limits,
    decode,
    encode,
)
from protocol.conversation import (
    Close,
    Conversation,
    ConversationEvent,
    PeerSilent,
    Received,
    Reply,
    RequestTimedOut,
    ResponseArrived,
    Side,
    State,
)
from protocol.messages import (
    Command,
    CommandResult,
    Config,
    ConfigAck,
    Enrol,
    Enrolled,
    Error,
    Event,
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
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    VersionError,
    negotiate,
)

__all__ = [
    "AGENT_TO_MANAGER",
    "CLOSE_GOING_AWAY",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_REVOKED",
    "CLOSE_TOO_BIG",
    "CLOSE_UNAUTHORIZED",
    "CLOSE_UNSUPPORTED_VERSION",
    "MANAGER_TO_AGENT",
    "MIN_PROTOCOL_VERSION",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Close",
    "Command",
    "CommandResult",
    "Config",
    "ConfigAck",
    "Conversation",
    "ConversationEvent",
    "DecodeError",
    "EncodeError",
    "Enrol",
    "Enrolled",
    "Error",
    "Event",
    "GoingAway",
    "Heartbeat",
    "HeartbeatAck",
    "Hello",
    "Limits",
    "Message",
    "PeerSilent",
    "Received",
    "Reply",
    "Request",
    "RequestTimedOut",
    "Response",
    "ResponseArrived",
    "Side",
    "State",
    "VersionError",
    "Welcome",
    "decode",
    "encode",
    "negotiate",
]
