"""Seeded fuzzing of Conversation.receive: random bytes, mutated valid frames, random
msgpack structures and text frames, fed to both sides in every state. Nothing may raise,
and every event must make sense (a Close is last and has a known code and a short reason,
a Reply decodes on the peer's side, a Received message is one this side accepts)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from protocol import messages as m
from protocol.codec import AGENT_TO_MANAGER, MANAGER_TO_AGENT, decode, encode
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
from protocol.versions import PROTOCOL_VERSION

FRAMES_PER_SEED = 2500
CLOSE_CODES = {1001, 1008, 1009, 4002}

SAMPLES = [
    encode(msg)
    for msg in (
        m.Hello(versions=[PROTOCOL_VERSION], role="router", status={"a": [1, 2.5, None]}),
        m.Welcome(version=PROTOCOL_VERSION, vm_id="v", heartbeat_interval=5),
        m.Heartbeat(seq=3, status={"load": {"1m": 0.1}}),
        m.HeartbeatAck(seq=3),
        m.Config(version=2, config={"router": {"rules": [{"port": 22, "cidr": "10.0.0.0/8"}]}}),
        m.ConfigAck(version=2, ok=True),
        m.Command(id="c", name="n", args={"x": b"\x00\xff"}),
        m.CommandResult(id="c", ok=True, result={"r": "é"}),
        m.Request(id=1, method="m", params={"p": True}),
        m.Response(id=1, ok=True, result={}),
        m.Event(name="e", data={"d": -1}),
        m.Error(code="c", reason="r", ref=1),
        m.GoingAway(reason="r", retry_after=1.0),
        m.Enrol(vm_id="v", token="t", csr=b"csr"),
        m.Enrolled(certificate=b"c", ca=b"a"),
    )
]
TYPE_TAGS = [*m.MESSAGE_TYPES, "nope", "", "HELLO"]
FIELD_NAMES = sorted({f for cls in m.MESSAGE_TYPES.values() for f in cls.__dataclass_fields__})


def random_scalar(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            False,
            rng.randint(-(2**63), 2**64 - 1),
            rng.randint(-3, 3),
            rng.uniform(-1e9, 1e9),
            math.nan,
            math.inf,
            "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 8))),
            rng.randbytes(rng.randint(0, 8)),
            msgpack.ExtType(rng.randint(0, 127), rng.randbytes(rng.randint(0, 4))),
        ]
    )


def random_value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth <= 0 or roll < 0.6:
        return random_scalar(rng)
    if roll < 0.8:
        return [random_value(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    out: dict[Any, Any] = {}
    for _ in range(rng.randint(0, 4)):
        key = rng.choice(FIELD_NAMES) if rng.random() < 0.9 else rng.randint(0, 5)
        out[key] = random_value(rng, depth - 1)
    return out


def random_message_map(rng: random.Random) -> bytes:
    obj: dict[Any, Any] = {}
    if rng.random() < 0.9:
        obj["type"] = rng.choice(TYPE_TAGS) if rng.random() < 0.95 else random_scalar(rng)
    for _ in range(rng.randint(0, 5)):
        obj[rng.choice(FIELD_NAMES)] = random_value(rng, rng.randint(0, 20))
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            del data[pos:]
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 6))
        elif op == 3 and data:
            data[min(pos, len(data) - 1)] = rng.choice([0xC1, 0xDC, 0xDD, 0xDE, 0xDF, 0xDB, 0xC9])
        else:
            data[pos:pos] = data[pos : pos + rng.randint(1, 16)]
    return bytes(data)


def random_frame(rng: random.Random) -> bytes | str:
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 64))
    if kind in (1, 2):
        return mutate(rng, rng.choice(SAMPLES))
    if kind == 3:
        return random_message_map(rng)
    if kind == 4:
        return rng.choice(SAMPLES)
    if kind == 5:
        return "".join(chr(rng.randint(1, 0x10FF)) for _ in range(rng.randint(0, 30)))
    # A container/str header declaring a huge size, then a little junk.
    return bytes([rng.choice([0xDB, 0xC6, 0xDD, 0xDF, 0xC9])]) + rng.randbytes(rng.randint(0, 9))


def manager_fresh(now: float) -> Conversation:
    return Conversation(Side.MANAGER, now=now, heartbeat_interval=1.0)


def manager_open(now: float) -> Conversation:
    conv = manager_fresh(now)
    conv.receive(encode(m.Hello(versions=[PROTOCOL_VERSION])), now)
    conv.request("probe", {}, now=now, timeout=0.5)
    assert conv.state is State.OPEN
    return conv


def agent_handshake(now: float) -> Conversation:
    conv = Conversation(Side.AGENT, now=now)
    conv.send(m.Hello(versions=[PROTOCOL_VERSION]))
    return conv


def agent_open(now: float) -> Conversation:
    conv = agent_handshake(now)
    conv.receive(encode(m.Welcome(version=PROTOCOL_VERSION, heartbeat_interval=1.0)), now)
    conv.request("probe", {}, now=now, timeout=0.5)
    assert conv.state is State.OPEN
    return conv


FACTORIES: list[Callable[[float], Conversation]] = [
    manager_fresh,
    manager_open,
    agent_handshake,
    agent_open,
]


def check_events(conv: Conversation, events: list[ConversationEvent], seen: set[str]) -> None:
    assert isinstance(events, list)
    accepts = m.AGENT_TO_MANAGER_TYPES if conv.side is Side.MANAGER else m.MANAGER_TO_AGENT_TYPES
    peer_limits = MANAGER_TO_AGENT if conv.side is Side.MANAGER else AGENT_TO_MANAGER
    for i, ev in enumerate(events):
        seen.add(type(ev).__name__)
        if isinstance(ev, Close):
            assert i == len(events) - 1, events
            assert ev.code in CLOSE_CODES
            assert ev.reason and len(ev.reason.encode()) <= 123
            assert conv.closed
        elif isinstance(ev, Reply):
            reply = decode(ev.frame, peer_limits)
            assert isinstance(reply, m.Error | m.HeartbeatAck)
        elif isinstance(ev, Received):
            assert ev.msg.type in accepts
        elif isinstance(ev, ResponseArrived):
            assert isinstance(ev.response, m.Response) and ev.response.id == ev.request_id
        else:
            assert isinstance(ev, RequestTimedOut | PeerSilent)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_receive_never_raises(seed: int) -> None:
    rng = random.Random(seed)
    now = 0.0
    convs = [make(now) for make in FACTORIES]
    seen: set[str] = set()
    for _ in range(FRAMES_PER_SEED):
        frame = random_frame(rng)
        now += rng.choice([0.0, 0.01, 0.3, 2.0, 5.0])
        for idx, conv in enumerate(convs):
            check_events(conv, conv.tick(now), seen)
            if not conv.closed:
                check_events(conv, conv.receive(frame, now), seen)
            if conv.closed:
                assert conv.receive(frame, now) == [] and conv.next_deadline() is None
                convs[idx] = FACTORIES[idx](now)
    # The generator reaches every kind of outcome (else the fuzzing is toothless).
    assert {"Close", "Reply", "Received", "PeerSilent", "RequestTimedOut"} <= seen, seen
