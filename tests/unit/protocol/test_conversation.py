"""protocol.conversation: handshake, negotiation, heartbeats, request/response correlation,
timeouts and silence driven by explicit ``now`` values, and bad frames mapped to error
replies or close codes."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from protocol import messages as m
from protocol.closecodes import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_VERSION,
)
from protocol.codec import AGENT_TO_MANAGER, MANAGER_TO_AGENT, Limits, decode, encode
from protocol.conversation import (
    UNEXPECTED_TYPE,
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
from protocol.versions import (
    MAX_ACK_EVERY,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    silence_timeout,
)


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def reply_error(events: list[ConversationEvent], limits: Limits = MANAGER_TO_AGENT) -> m.Error:
    assert len(events) == 1 and isinstance(events[0], Reply), events
    msg = decode(events[0].frame, limits)
    assert isinstance(msg, m.Error)
    return msg


def only_close(events: list[ConversationEvent]) -> Close:
    assert len(events) == 1 and isinstance(events[0], Close), events
    return events[0]


def state_of(conv: Conversation) -> State:
    """(A function, so that mypy does not narrow ``conv.state`` across calls.)"""
    return conv.state


def open_pair(now: float = 0.0, interval: float = 5.0) -> tuple[Conversation, Conversation]:
    """A manager and an agent conversation after a successful handshake."""
    mgr = Conversation(Side.MANAGER, now=now, heartbeat_interval=interval)
    agent = Conversation(Side.AGENT, now=now)
    hello = agent.send(m.Hello(versions=list(SUPPORTED_VERSIONS), role="router"))
    assert state_of(agent) is State.HANDSHAKE
    [ev] = mgr.receive(hello, now)
    assert isinstance(ev, Received) and isinstance(ev.msg, m.Hello)
    assert mgr.state is State.OPEN and mgr.version == PROTOCOL_VERSION
    assert mgr.hello == ev.msg
    welcome = mgr.send(m.Welcome(version=mgr.version, vm_id="vm-1", heartbeat_interval=interval))
    [ev] = agent.receive(welcome, now)
    assert isinstance(ev, Received) and isinstance(ev.msg, m.Welcome)
    assert state_of(agent) is State.OPEN and agent.version == PROTOCOL_VERSION
    assert agent.welcome is not None and agent.welcome.vm_id == "vm-1"
    return mgr, agent


# -- handshake ---------------------------------------------------------------------------


def test_handshake_sets_interval_and_derived_timeout() -> None:
    mgr, agent = open_pair(interval=4.0)
    assert agent.heartbeat_interval == 4.0
    assert agent.peer_timeout == 12.0
    assert mgr.peer_timeout == 12.0


def test_explicit_peer_timeout_is_kept_by_welcome() -> None:
    agent = Conversation(Side.AGENT, now=0.0, peer_timeout=7.0)
    agent.send(m.Hello(versions=[PROTOCOL_VERSION]))
    agent.receive(encode(m.Welcome(version=PROTOCOL_VERSION, heartbeat_interval=1.0)), 0.0)
    assert agent.state is State.OPEN
    assert agent.heartbeat_interval == 1.0 and agent.peer_timeout == 7.0


@pytest.mark.parametrize("versions", [[], [0], [PROTOCOL_VERSION + 1], [-5, 99]])
def test_manager_refuses_hello_without_common_version(versions: list[int]) -> None:
    mgr = Conversation(Side.MANAGER, now=0.0)
    close = only_close(mgr.receive(encode(m.Hello(versions=versions)), 1.0))
    assert close.code == CLOSE_UNSUPPORTED_VERSION
    assert "no common protocol version" in close.reason
    assert mgr.closed and mgr.version is None
    assert mgr.receive(encode(m.Hello(versions=[1])), 2.0) == []


@pytest.mark.parametrize(
    ("welcome", "code"),
    [
        (m.Welcome(version=PROTOCOL_VERSION + 1, heartbeat_interval=5), CLOSE_UNSUPPORTED_VERSION),
        (m.Welcome(version=0, heartbeat_interval=5), CLOSE_UNSUPPORTED_VERSION),
        (m.Welcome(version=PROTOCOL_VERSION, heartbeat_interval=0), CLOSE_POLICY),
        (m.Welcome(version=PROTOCOL_VERSION, heartbeat_interval=-1), CLOSE_POLICY),
        (m.Welcome(version=PROTOCOL_VERSION, heartbeat_interval=1e6), CLOSE_POLICY),
    ],
)
def test_agent_refuses_bad_welcome(welcome: m.Welcome, code: int) -> None:
    agent = Conversation(Side.AGENT, now=0.0)
    agent.send(m.Hello(versions=list(SUPPORTED_VERSIONS)))
    assert only_close(agent.receive(encode(welcome), 0.0)).code == code
    assert agent.closed


def test_agent_refuses_version_it_did_not_offer() -> None:
    # Offering nothing valid: even a supported version is refused if it was not offered.
    agent = Conversation(Side.AGENT, now=0.0)
    agent.send(m.Hello(versions=[PROTOCOL_VERSION + 5]))
    close = only_close(
        agent.receive(encode(m.Welcome(version=PROTOCOL_VERSION, heartbeat_interval=5)), 0.0)
    )
    assert close.code == CLOSE_UNSUPPORTED_VERSION


def test_agent_with_empty_offer_accepts_supported_version() -> None:
    agent = Conversation(Side.AGENT, now=0.0)
    agent.send(m.Hello())
    [ev] = agent.receive(encode(m.Welcome(version=PROTOCOL_VERSION, heartbeat_interval=5)), 0)
    assert isinstance(ev, Received) and agent.state is State.OPEN


def test_manager_requires_hello_first() -> None:
    mgr = Conversation(Side.MANAGER, now=0.0)
    close = only_close(mgr.receive(encode(m.Heartbeat(seq=1)), 0.0))
    assert close.code == CLOSE_POLICY and "expected hello" in close.reason


def test_manager_passes_error_during_handshake() -> None:
    mgr = Conversation(Side.MANAGER, now=0.0)
    [ev] = mgr.receive(encode(m.Error(code="x", reason="y")), 0.0)
    assert isinstance(ev, Received) and mgr.state is State.HANDSHAKE


@pytest.mark.parametrize("second", [m.Hello(versions=[1]), m.Enrol(vm_id="v")])
def test_manager_refuses_second_hello_or_enrol(second: m.Message) -> None:
    mgr, _ = open_pair()
    close = only_close(mgr.receive(encode(second), 1.0))
    assert close.code == CLOSE_POLICY and "after hello" in close.reason


def test_enrol_exchange() -> None:
    mgr = Conversation(Side.MANAGER, now=0.0)
    agent = Conversation(Side.AGENT, now=0.0)
    frame = agent.send(m.Enrol(vm_id="vm-1", token="t", csr=b"csr"))
    assert agent.state is State.ENROL
    [ev] = mgr.receive(frame, 0.0)
    assert isinstance(ev, Received) and ev.msg == m.Enrol(vm_id="vm-1", token="t", csr=b"csr")
    assert mgr.state is State.ENROL
    [ev] = agent.receive(mgr.send(m.Enrolled(certificate=b"c", ca=b"a")), 0.0)
    assert isinstance(ev, Received) and ev.msg == m.Enrolled(certificate=b"c", ca=b"a")
    # The manager may refuse with an error instead; the agent hears it.
    [ev] = agent.receive(encode(m.Error(code="denied", reason="bad token")), 0.0)
    assert isinstance(ev, Received) and isinstance(ev.msg, m.Error)


def test_enrol_state_refuses_anything_else() -> None:
    mgr = Conversation(Side.MANAGER, now=0.0)
    mgr.receive(encode(m.Enrol(vm_id="v")), 0.0)
    [ev] = mgr.receive(encode(m.Error(code="x")), 0.0)
    assert isinstance(ev, Received)
    assert only_close(mgr.receive(encode(m.Hello(versions=[1])), 0.0)).code == CLOSE_POLICY

    agent = Conversation(Side.AGENT, now=0.0)
    agent.send(m.Enrol())
    assert only_close(agent.receive(encode(m.Config()), 0.0)).code == CLOSE_POLICY


def test_agent_idle_refuses_messages_but_hears_errors_and_going_away() -> None:
    agent = Conversation(Side.AGENT, now=0.0)
    [ev] = agent.receive(encode(m.Error(code="x")), 0.0)
    assert isinstance(ev, Received) and agent.state is State.IDLE
    close = only_close(agent.receive(encode(m.Config(version=1)), 0.0))
    assert close.code == CLOSE_POLICY and "before hello" in close.reason

    agent = Conversation(Side.AGENT, now=0.0)
    events = agent.receive(encode(m.GoingAway(reason="bye", retry_after=2.0)), 0.0)
    assert events == [Received(m.GoingAway(reason="bye", retry_after=2.0)), Close(1001, "bye")]


def test_agent_handshake_requires_welcome() -> None:
    agent = Conversation(Side.AGENT, now=0.0)
    agent.send(m.Hello(versions=[1]))
    close = only_close(agent.receive(encode(m.Config()), 0.0))
    assert close.code == CLOSE_POLICY and "expected welcome" in close.reason


def test_agent_hears_error_during_handshake() -> None:
    agent = Conversation(Side.AGENT, now=0.0)
    agent.send(m.Hello(versions=[1]))
    [ev] = agent.receive(encode(m.Error(code="revoked")), 0.0)
    assert isinstance(ev, Received) and agent.state is State.HANDSHAKE


@pytest.mark.parametrize("again", [m.Welcome(version=1, heartbeat_interval=5), m.Enrolled()])
def test_agent_open_refuses_second_welcome_or_enrolled(again: m.Message) -> None:
    _, agent = open_pair()
    assert only_close(agent.receive(encode(again), 0.0)).code == CLOSE_POLICY


def test_send_after_idle_does_not_restart_handshake() -> None:
    _, agent = open_pair()
    agent.send(m.Hello(versions=[1]))
    assert agent.state is State.OPEN


# -- messages once open ------------------------------------------------------------------


def test_heartbeat_is_acked_by_manager() -> None:
    mgr, agent = open_pair(interval=5.0)
    assert not agent.heartbeat_due(4.9)
    assert agent.heartbeat_due(5.0)
    assert agent.next_deadline() == 5.0
    frame = agent.heartbeat({"load": 1}, now=5.0)
    assert not agent.heartbeat_due(9.9)
    events = mgr.receive(frame, 5.0)
    assert events[0] == Received(m.Heartbeat(seq=1, status={"load": 1}))
    assert isinstance(events[1], Reply)
    assert agent.receive(events[1].frame, 5.1) == [Received(m.HeartbeatAck(seq=1))]
    second = decode(agent.heartbeat({}, now=10.0), AGENT_TO_MANAGER)
    assert second == m.Heartbeat(seq=2)
    # A heartbeat sent through send() also counts.
    agent.send(m.Heartbeat(seq=99), now=20.0)
    assert not agent.heartbeat_due(24.0) and agent.heartbeat_due(25.0)


def test_manager_never_has_heartbeat_due() -> None:
    mgr, _ = open_pair()
    assert not mgr.heartbeat_due(1e9)


def test_application_messages_are_received() -> None:
    mgr, agent = open_pair()
    to_mgr: list[m.Message] = [m.ConfigAck(version=2, ok=True), m.CommandResult(id="c")]
    for msg in [*to_mgr, m.Event(name="e")]:
        assert mgr.receive(encode(msg), 1.0) == [Received(msg)]
    to_agent: list[m.Message] = [m.Config(version=2), m.Command(id="c", name="n")]
    for msg in [*to_agent, m.HeartbeatAck(seq=3)]:
        assert agent.receive(encode(msg), 1.0) == [Received(msg)]
    # An error not tied to a request.
    err = m.Error(code="x", reason="y", ref=None)
    assert mgr.receive(encode(err), 1.0) == [Received(err)]
    assert agent.receive(encode(err), 1.0) == [Received(err)]


def test_going_away_closes_the_agent_with_1001() -> None:
    _, agent = open_pair()
    agent.request("m", {}, now=0.0, timeout=5.0)
    events = agent.receive(encode(m.GoingAway()), 1.0)
    assert events == [Received(m.GoingAway()), Close(CLOSE_GOING_AWAY, "going away")]
    assert agent.closed and agent.pending_requests == 0
    assert agent.tick(100.0) == [] and agent.next_deadline() is None


def test_close_reason_fits_a_control_frame() -> None:
    _, agent = open_pair()
    events = agent.receive(encode(m.GoingAway(reason="é" * 200)), 1.0)
    close = events[-1]
    assert isinstance(close, Close)
    assert len(close.reason.encode()) <= 123
    assert close.reason == "é" * 60


@pytest.mark.parametrize(
    ("side", "msg"),
    [
        (Side.MANAGER, m.Welcome()),
        (Side.MANAGER, m.GoingAway()),
        (Side.MANAGER, m.Config()),
        (Side.MANAGER, m.Enrolled()),
        (Side.AGENT, m.Hello()),
        (Side.AGENT, m.Heartbeat()),
        (Side.AGENT, m.Enrol()),
        (Side.AGENT, m.Event()),
    ],
)
def test_wrong_direction_gets_unexpected_type(side: Side, msg: m.Message) -> None:
    mgr, agent = open_pair()
    conv = mgr if side is Side.MANAGER else agent
    err = reply_error(conv.receive(encode(msg), 1.0))
    assert err.code == UNEXPECTED_TYPE and msg.type in err.reason and err.ref is None
    assert conv.state is State.OPEN


# -- requests ----------------------------------------------------------------------------


def test_requests_are_correlated_by_id_in_any_order() -> None:
    mgr, agent = open_pair()
    id1, f1 = agent.request("a", {"x": 1}, now=0.0, timeout=10.0)
    id2, f2 = agent.request("b", {}, now=0.0, timeout=10.0)
    assert id1 != id2 and agent.pending_requests == 2
    [r1] = mgr.receive(f1, 0.0)
    [r2] = mgr.receive(f2, 0.0)
    assert r1 == Received(m.Request(id=id1, method="a", params={"x": 1}))
    assert isinstance(r2, Received) and isinstance(r2.msg, m.Request)
    resp2 = m.Response(id=id2, ok=True, result={"n": 2})
    resp1 = m.Response(id=id1, ok=True, result={"n": 1})
    assert agent.receive(mgr.send(resp2), 1.0) == [ResponseArrived(id2, resp2)]
    assert agent.receive(mgr.send(resp1), 1.0) == [ResponseArrived(id1, resp1)]
    assert agent.pending_requests == 0
    # A duplicate or unknown response is dropped.
    assert agent.receive(encode(resp1), 1.0) == []
    assert agent.receive(encode(m.Response(id=999)), 1.0) == []


def test_manager_requests_agent() -> None:
    mgr, agent = open_pair()
    rid, frame = mgr.request("router.stats", {}, now=0.0, timeout=3.0)
    [ev] = agent.receive(frame, 0.0)
    assert isinstance(ev, Received) and isinstance(ev.msg, m.Request) and ev.msg.id == rid
    resp = m.Response(id=rid, ok=False, error="nope")
    assert mgr.receive(agent.send(resp), 0.5) == [ResponseArrived(rid, resp)]


def test_request_timeout_and_late_response() -> None:
    _, agent = open_pair(interval=100.0)
    rid, _ = agent.request("slow", {}, now=10.0, timeout=2.0)
    rid2, _ = agent.request("slower", {}, now=10.0, timeout=5.0)
    assert agent.next_deadline() == 12.0
    assert agent.tick(11.99) == []
    assert agent.tick(12.0) == [RequestTimedOut(rid)]
    assert agent.tick(12.5) == []
    assert agent.next_deadline() == 15.0
    assert agent.receive(encode(m.Response(id=rid, ok=True)), 13.0) == []
    assert agent.tick(20.0) == [RequestTimedOut(rid2)]
    assert agent.pending_requests == 0


def test_several_timeouts_in_id_order() -> None:
    _, agent = open_pair(interval=100.0)
    ids = [agent.request("x", {}, now=0.0, timeout=1.0)[0] for _ in range(3)]
    assert agent.tick(1.0) == [RequestTimedOut(i) for i in sorted(ids)]


def test_error_with_ref_fails_the_request() -> None:
    mgr, agent = open_pair()
    rid, _ = agent.request("bad", {}, now=0.0, timeout=5.0)
    # The manager's answer to a request it cannot parse is an error with ref.
    bad = pack({"type": "request", "id": rid, "method": 5})
    err = reply_error(mgr.receive(bad, 0.0))
    assert err.ref == rid and err.code == "bad_field"
    [ev] = agent.receive(encode(err), 0.1)
    assert isinstance(ev, ResponseArrived) and ev.request_id == rid
    assert not ev.response.ok and ev.response.error.startswith("bad_field: ")
    # An error with a ref that is no longer pending is passed on as is.
    [ev] = agent.receive(encode(err), 0.2)
    assert ev == Received(err)


def test_cancel_forgets_a_request() -> None:
    _, agent = open_pair()
    rid, _ = agent.request("x", {}, now=0.0, timeout=1.0)
    agent.cancel(rid)
    agent.cancel(12345)
    assert agent.pending_requests == 0
    assert agent.receive(encode(m.Response(id=rid)), 0.5) == []
    assert agent.tick(5.0) == []  # no RequestTimedOut for a cancelled request


def test_request_on_closed_conversation_raises() -> None:
    mgr = Conversation(Side.MANAGER, now=0.0)
    mgr.receive(b"\xc1", 0.0)
    assert mgr.closed
    with pytest.raises(RuntimeError, match="closed"):
        mgr.request("x", {}, now=0.0, timeout=1.0)


# -- silence -----------------------------------------------------------------------------


def test_peer_silent_reported_once_per_silence() -> None:
    mgr, agent = open_pair(now=100.0, interval=5.0)
    assert mgr.next_deadline() == 115.0
    assert mgr.tick(114.9) == []
    assert mgr.tick(115.0) == [PeerSilent()]
    assert mgr.tick(200.0) == []
    assert mgr.next_deadline() is None
    mgr.receive(agent.heartbeat({}, 201.0), 201.0)
    assert mgr.next_deadline() == 216.0
    assert mgr.tick(216.0) == [PeerSilent()]


def test_silence_before_hello_is_reported() -> None:
    mgr = Conversation(Side.MANAGER, now=0.0, heartbeat_interval=10.0, peer_timeout=5.0)
    assert mgr.next_deadline() == 5.0
    assert mgr.tick(5.0) == [PeerSilent()]


def test_agent_deadline_is_earliest_of_heartbeat_silence_request() -> None:
    _, agent = open_pair(now=0.0, interval=5.0)
    assert agent.next_deadline() == 5.0  # heartbeat
    agent.heartbeat({}, 5.0)
    assert agent.next_deadline() == 10.0  # heartbeat again (silence at 15)
    agent.request("x", {}, now=5.0, timeout=1.0)
    assert agent.next_deadline() == 6.0


# -- bad frames --------------------------------------------------------------------------


def test_recoverable_errors_get_error_replies_and_the_conversation_goes_on() -> None:
    mgr, agent = open_pair()
    err = reply_error(mgr.receive(pack({"type": "from_the_future", "x": 1}), 1.0))
    assert err.code == "unknown_type"
    err = reply_error(mgr.receive(pack({"type": "heartbeat", "seq": "x"}), 1.0))
    assert err.code == "bad_field"
    assert mgr.state is State.OPEN
    events = mgr.receive(agent.heartbeat({}, 2.0), 2.0)
    assert isinstance(events[0], Received)


def test_text_and_unparseable_frames_close_with_policy() -> None:
    for frame in ("text", b"\xc1", b"", pack([1]), b"\x81\xa1s\xc7\x01\x05x"):
        mgr, _ = open_pair()
        close = only_close(mgr.receive(frame, 1.0))
        assert close.code == CLOSE_POLICY and mgr.closed
        assert mgr.receive(encode(m.Heartbeat()), 2.0) == []


def test_oversized_frame_closes_with_1009() -> None:
    mgr, _ = open_pair()
    close = only_close(mgr.receive(b"\x00" * (AGENT_TO_MANAGER.max_frame + 1), 1.0))
    assert close.code == CLOSE_TOO_BIG
    agent = Conversation(Side.AGENT, now=0.0, limits=Limits(100, 4, 10, 10))
    assert only_close(agent.receive(b"\x00" * 101, 0.0)).code == CLOSE_TOO_BIG


def test_too_many_bad_frames_in_a_row_close() -> None:
    mgr, agent = open_pair()
    mgr.max_errors = 3
    bad = pack({"type": "nope"})
    for _ in range(3):
        reply_error(mgr.receive(bad, 1.0))
    mgr.receive(agent.heartbeat({}, 1.0), 1.0)  # a good frame resets the count
    for _ in range(3):
        reply_error(mgr.receive(bad, 1.0))
    close = only_close(mgr.receive(bad, 1.0))
    assert close.code == CLOSE_POLICY and "too many bad frames" in close.reason


def test_bad_frames_still_count_as_signs_of_life() -> None:
    mgr, _ = open_pair(now=0.0, interval=5.0)
    mgr.receive(pack({"type": "nope"}), 14.0)
    assert mgr.tick(15.0) == []
    assert mgr.next_deadline() == 29.0


def test_default_limits_follow_the_side() -> None:
    assert Conversation(Side.MANAGER, now=0).limits == AGENT_TO_MANAGER
    assert Conversation(Side.AGENT, now=0).limits == MANAGER_TO_AGENT
    # The manager accepts less than the agent: a 2 MiB config is fine for an agent only.
    big = encode(m.Config(version=1, config={"blob": b"x" * (2 << 20)}))
    _, agent = open_pair()
    assert agent.receive(big, 1.0) == [Received(decode(big, MANAGER_TO_AGENT))]
    mgr, _ = open_pair()
    assert only_close(mgr.receive(big, 1.0)).code == CLOSE_TOO_BIG


def test_agent_sending_other_messages_while_idle_stays_idle() -> None:
    agent = Conversation(Side.AGENT, now=0.0)
    agent.send(m.Error(code="x"))
    assert agent.state is State.IDLE


# -- sparse heartbeat acks (protocol 2) ----------------------------------------------------


def sparse_pair(
    ack_every: int, agent_versions: list[int] | None = None, interval: float = 5.0
) -> tuple[Conversation, Conversation]:
    mgr = Conversation(Side.MANAGER, now=0.0, heartbeat_interval=interval)
    agent = Conversation(Side.AGENT, now=0.0)
    [_] = mgr.receive(agent.send(m.Hello(versions=agent_versions or list(SUPPORTED_VERSIONS))), 0)
    assert mgr.version is not None
    welcome = m.Welcome(version=mgr.version, heartbeat_interval=interval, ack_every=ack_every)
    [ev] = agent.receive(mgr.send(welcome), 0.0)
    assert isinstance(ev, Received)
    return mgr, agent


def acked_seqs(mgr: Conversation, agent: Conversation, beats: int) -> list[int]:
    acked = []
    for i in range(1, beats + 1):
        events = mgr.receive(agent.heartbeat({}, now=5.0 * i), 5.0 * i)
        assert isinstance(events[0], Received) and isinstance(events[0].msg, m.Heartbeat)
        for ev in events[1:]:
            assert isinstance(ev, Reply)
            [got] = agent.receive(ev.frame, 5.0 * i)
            assert isinstance(got, Received) and isinstance(got.msg, m.HeartbeatAck)
            acked.append(got.msg.seq)
    return acked


def test_manager_acks_first_and_every_nth_heartbeat() -> None:
    mgr, agent = sparse_pair(4)
    assert mgr.ack_every == agent.ack_every == 4
    assert acked_seqs(mgr, agent, 13) == [1, 4, 8, 12]
    # The agent waits the longest normal gap between acks plus two intervals.
    assert agent.peer_timeout == silence_timeout(5.0, 4) == 30.0


def test_agent_is_not_silent_between_sparse_acks_but_is_after_a_missed_one() -> None:
    mgr, agent = sparse_pair(4)
    acked_seqs(mgr, agent, 8)  # last ack at t=40
    assert agent.tick(40.0 + 29.9) == []
    assert agent.tick(40.0 + 30.0) == [PeerSilent()]


def test_version_1_agent_gets_every_ack() -> None:
    mgr, agent = sparse_pair(4, agent_versions=[1])
    assert mgr.version == 1 and agent.version == 1
    assert mgr.ack_every == agent.ack_every == 1
    assert acked_seqs(mgr, agent, 5) == [1, 2, 3, 4, 5]
    assert agent.peer_timeout == 15.0


@pytest.mark.parametrize("bad", [0, -1, MAX_ACK_EVERY + 1])
def test_agent_refuses_welcome_with_ack_every_out_of_range(bad: int) -> None:
    agent = Conversation(Side.AGENT, now=0.0)
    agent.send(m.Hello(versions=list(SUPPORTED_VERSIONS)))
    welcome = m.Welcome(version=PROTOCOL_VERSION, heartbeat_interval=5.0, ack_every=bad)
    close = only_close(agent.receive(encode(welcome), 0.0))
    assert close.code == CLOSE_POLICY and "ack_every" in close.reason
    assert agent.closed


def test_manager_clamps_ack_every_it_sends() -> None:
    mgr, _ = sparse_pair(1)
    mgr.send(m.Welcome(version=PROTOCOL_VERSION, ack_every=10_000))
    assert mgr.ack_every == MAX_ACK_EVERY
