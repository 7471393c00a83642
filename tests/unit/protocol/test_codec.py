"""protocol.codec: round trips, interoperability with plain msgpack, and every class of
malformed frame turned into a DecodeError with the right code."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest

from protocol import codec, messages
from protocol.codec import (
    AGENT_TO_MANAGER,
    BAD_FIELD,
    MALFORMED,
    MANAGER_TO_AGENT,
    TOO_BIG,
    UNKNOWN_TYPE,
    DecodeError,
    EncodeError,
    Limits,
    decode,
    encode,
)

A2M = AGENT_TO_MANAGER
SAMPLES: list[messages.Message] = [
    messages.Hello(
        versions=[1, 2],
        agent_version="0.1.0",
        image_version="2026.11",
        role="router",
        boot_id="b-1",
        applied_version=7,
        status={"load": 0.5, "ok": True, "none": None, "nested": {"l": [1, "x", b"\x00"]}},
    ),
    messages.Welcome(version=1, vm_id="vm-1", heartbeat_interval=2.5, desired_version=9),
    messages.Heartbeat(seq=42, status={"cpu": 3}),
    messages.HeartbeatAck(seq=42),
    messages.Config(version=3, config={"settings": {"a": 1}, "router": {"rules": [{"p": 22}]}}),
    messages.ConfigAck(version=3, ok=True, error=""),
    messages.Command(id="c-1", name="reboot", args={"force": True}),
    messages.CommandResult(id="c-1", ok=False, result={"x": -1}, error="boom"),
    messages.Request(id=7, method="console.token", params={"vm": "u"}),
    messages.Response(id=7, ok=True, result={"token": "t"}, error=""),
    messages.Event(name="vnc.session", data={"n": 1}),
    messages.Error(code="bad_field", reason="r", ref=7),
    messages.Error(code="x", reason="no ref", ref=None),
    messages.GoingAway(reason="restart", retry_after=1.5),
    messages.Enrol(vm_id="vm-1", token="tok", csr=b"-----BEGIN CERTIFICATE REQUEST-----\n"),
    messages.Enrolled(certificate=b"chain", ca=b"ca"),
]


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def refused(data: bytes | str, limits: Limits = A2M) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(data, limits)
    return info.value


def test_every_message_type_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(messages.MESSAGE_TYPES.values())
    both_ways = messages.AGENT_TO_MANAGER_TYPES | messages.MANAGER_TO_AGENT_TYPES
    assert set(messages.MESSAGE_TYPES) == both_ways


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: messages.Message) -> None:
    frame = encode(msg)
    assert decode(frame, MANAGER_TO_AGENT) == msg
    assert decode(frame, A2M) == msg


@pytest.mark.parametrize("cls", list(messages.MESSAGE_TYPES.values()), ids=lambda c: c.__name__)
def test_defaults_round_trip_and_empty_map_gives_defaults(cls: type[messages.Message]) -> None:
    assert decode(encode(cls()), A2M) == cls()
    assert decode(pack({"type": cls.type}), A2M) == cls()


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_plain_msgpack_reads_what_we_write(msg: messages.Message) -> None:
    obj = msgpack.unpackb(encode(msg))
    assert obj["type"] == msg.type
    for name in obj:
        if name != "type":
            assert obj[name] == getattr(msg, name)


def test_unknown_fields_are_ignored() -> None:
    frame = pack({"type": "heartbeat", "seq": 3, "new_field": {"x": [1]}, "other": None})
    assert decode(frame, A2M) == messages.Heartbeat(seq=3)


def test_float_field_accepts_int_and_gives_float() -> None:
    msg = decode(pack({"type": "welcome", "heartbeat_interval": 5}), A2M)
    assert isinstance(msg, messages.Welcome)
    assert msg.heartbeat_interval == 5.0
    assert type(msg.heartbeat_interval) is float


# -- malformed frames --------------------------------------------------------------------


def test_text_frame() -> None:
    err = refused('{"type": "hello"}')
    assert err.code == MALFORMED and "text" in err.reason and not err.recoverable


def test_oversized_frame_refused_unread() -> None:
    limits = Limits(max_frame=64, max_depth=4, max_items=10, max_str=32)
    err = refused(b"\xc1" * 65, limits)  # not even msgpack: size is checked first
    assert err.code == TOO_BIG and not err.recoverable
    assert decode(encode(messages.Heartbeat(seq=1)), limits) == messages.Heartbeat(seq=1)
    err = refused(b"\x00" * (A2M.max_frame + 1))
    assert err.code == TOO_BIG


@pytest.mark.parametrize(
    ("data", "reason_part"),
    [
        (b"", "truncated"),
        (encode(SAMPLES[0])[:-3], "truncated"),
        (encode(SAMPLES[0]) + b"\x00", "trailing"),
        (b"\xc1", "not msgpack"),
        (b"\x81\xa4type\xa2\xff\xfe", "UTF-8"),
        (pack({"type": "event", "data": {"s": msgpack.ExtType(5, b"x")}}), "extension"),
        (pack({"type": "event", "data": {"s": msgpack.ExtType(5, b"")}}), "extension"),
        (pack({"type": "event", "data": {"t": msgpack.Timestamp(1, 0)}}), "extension"),
        (pack(msgpack.ExtType(1, b"")), "extension"),
        (pack({1: "int key"}), "map key"),
        (pack({"type": "event", "data": {(1, 2): "x"}}), "map key"),
        (pack({b"type": b"hello"}), "map key"),
        (pack({"type": "event", "data": {b"k": 1}}), "map key"),
        (pack({"type": "event", "data": [{"a": 1}, {2.5: 1}]}), "map key"),
        (pack([1, 2]), "not a map"),
        (pack(5), "not a map"),
        (pack(None), "not a map"),
        (pack("hello"), "not a map"),
        # Declared sizes far beyond the frame are refused before allocation.
        (b"\xdf\xff\xff\xff\xff", ""),  # map32 with 4G entries
        (b"\x81\xa1s\xdd\xff\xff\xff\xff", ""),  # array32 with 4G items
        (b"\x81\xa1s\xdb\xff\xff\xff\xff", ""),  # str32 of 4 GiB
        (b"\x81\xa1s\xc6\xff\xff\xff\xff", ""),  # bin32 of 4 GiB
        (b"\x81\xa1s\xc9\xff\xff\xff\xff\x05", ""),  # ext32 of 4 GiB
        # Nesting far beyond the decoder's own stack.
        (b"\x81\xa1s" + b"\x91" * 100_000 + b"\xc0", "nesting"),
    ],
)
def test_malformed_frames(data: bytes, reason_part: str) -> None:
    err = refused(data)
    assert err.code == MALFORMED, err
    assert reason_part in err.reason
    assert not err.recoverable
    assert err.ref is None


def test_depth_limit() -> None:
    def nested(depth: int) -> dict[str, Any]:
        # The frame's top map is depth 1, so status at depth 2 holds depth - 2 more maps.
        inner: dict[str, Any] = {}
        for _ in range(depth - 2):
            inner = {"n": inner}
        return {"type": "heartbeat", "status": inner}

    assert decode(pack(nested(A2M.max_depth)), A2M) == messages.Heartbeat(
        status=nested(A2M.max_depth)["status"]
    )
    err = refused(pack(nested(A2M.max_depth + 1)))
    assert err.code == MALFORMED and "nesting deeper" in err.reason
    # Lists count too.
    deep_list: list[Any] = []
    for _ in range(A2M.max_depth):
        deep_list = [deep_list]
    assert "nesting deeper" in refused(pack({"type": "event", "data": {"l": deep_list}})).reason


def test_single_container_over_item_limit() -> None:
    limits = Limits(max_frame=1 << 20, max_depth=8, max_items=100, max_str=100)
    err = refused(pack({"type": "event", "data": {str(i): i for i in range(101)}}), limits)
    assert err.code == MALFORMED and "limit" in err.reason
    err = refused(pack({"type": "event", "data": {"l": list(range(101))}}), limits)
    assert err.code == MALFORMED


def test_total_items_over_limit_across_containers() -> None:
    limits = Limits(max_frame=1 << 20, max_depth=8, max_items=100, max_str=100)
    many_lists = {"type": "event", "data": {str(i): list(range(10)) for i in range(10)}}
    assert "more than 100 items" in refused(pack(many_lists), limits).reason
    many_maps = {"type": "event", "data": {"l": [{"a": 1, "b": 2}] * 40}}
    assert "more than 100 items" in refused(pack(many_maps), limits).reason
    # The real agent→manager limit: 30,000 small items in well under 1 MiB.
    big = {"type": "heartbeat", "status": {str(i): list(range(100)) for i in range(300)}}
    assert refused(pack(big)).code == MALFORMED


def test_huge_strings_and_bytes() -> None:
    limits = Limits(max_frame=1 << 20, max_depth=8, max_items=100, max_str=1000)
    assert refused(pack({"type": "event", "name": "x" * 1001}), limits).code == MALFORMED
    assert refused(pack({"type": "enrol", "csr": b"x" * 1001}), limits).code == MALFORMED
    ok = decode(pack({"type": "enrol", "csr": b"x" * 1000}), limits)
    assert ok == messages.Enrol(csr=b"x" * 1000)
    assert refused(pack({"type": "event", "name": "x" * (A2M.max_str + 1)})).code == MALFORMED


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"type": "heartbeat", "seq": "1"}, "heartbeat.seq"),
        ({"type": "heartbeat", "seq": True}, "heartbeat.seq"),
        ({"type": "heartbeat", "seq": 1.0}, "heartbeat.seq"),
        ({"type": "heartbeat", "status": [1]}, "heartbeat.status"),
        ({"type": "heartbeat", "status": None}, "heartbeat.status"),
        ({"type": "hello", "versions": 1}, "hello.versions"),
        ({"type": "hello", "versions": [1, "2"]}, "hello.versions"),
        ({"type": "hello", "versions": [True]}, "hello.versions"),
        ({"type": "hello", "role": b"router"}, "hello.role"),
        ({"type": "welcome", "heartbeat_interval": "5"}, "welcome.heartbeat_interval"),
        ({"type": "welcome", "heartbeat_interval": math.nan}, "welcome.heartbeat_interval"),
        ({"type": "welcome", "heartbeat_interval": math.inf}, "welcome.heartbeat_interval"),
        ({"type": "welcome", "heartbeat_interval": False}, "welcome.heartbeat_interval"),
        ({"type": "config_ack", "ok": 1}, "config_ack.ok"),
        ({"type": "error", "ref": "7"}, "error.ref"),
        ({"type": "enrol", "csr": "PEM as str"}, "enrol.csr"),
        ({"type": "command", "id": 5}, "command.id"),
    ],
)
def test_wrong_field_types_are_recoverable(obj: dict[str, Any], field: str) -> None:
    err = refused(pack(obj))
    assert err.code == BAD_FIELD and err.recoverable
    assert field in err.reason
    assert err.ref is None


def test_bad_field_carries_request_id() -> None:
    err = refused(pack({"type": "request", "id": 12, "method": 3}))
    assert err.code == BAD_FIELD and err.ref == 12 and "request.method" in err.reason
    # A non-integer id is not echoed.
    assert refused(pack({"type": "request", "id": "12"})).ref is None
    assert refused(pack({"type": "request", "id": True})).ref is None


@pytest.mark.parametrize(
    "obj",
    [{"type": "nope"}, {"type": ""}, {}, {"type": 5}, {"type": None}, {"type": ["hello"]}],
)
def test_unknown_or_missing_type(obj: dict[str, Any]) -> None:
    err = refused(pack(obj))
    assert err.code == UNKNOWN_TYPE and err.recoverable


def test_unknown_type_reason_is_bounded_and_has_no_ref() -> None:
    err = refused(pack({"type": "z" * 5000, "id": 3}))
    assert err.code == UNKNOWN_TYPE and err.ref is None and len(err.reason) < 100


def test_decode_accepts_bytearray_and_memoryview() -> None:
    frame = encode(messages.HeartbeatAck(seq=1))
    assert decode(bytearray(frame), A2M) == messages.HeartbeatAck(seq=1)
    assert decode(memoryview(frame), A2M) == messages.HeartbeatAck(seq=1)


# -- encode ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "part"),
    [
        (messages.Heartbeat(status={1: "x"}), "map key"),  # type: ignore[dict-item]
        (messages.Heartbeat(status={"s": {1, 2}}), "unsupported"),
        (messages.Heartbeat(status={"l": [object()]}), "unsupported"),
        (messages.Heartbeat(status={"l": [{"a": {b"k": 1}}]}), "map key"),
        (messages.Heartbeat(status={"big": 1 << 70}), "cannot pack"),
        (messages.Heartbeat(seq="1"), "heartbeat.seq"),  # type: ignore[arg-type]
        (messages.Welcome(heartbeat_interval=math.nan), "heartbeat_interval"),
        (messages.Hello(versions=(1,)), "hello.versions"),  # type: ignore[arg-type]
        (messages.Enrol(csr="pem"), "enrol.csr"),  # type: ignore[arg-type]
    ],
)
def test_encode_refuses_what_the_peer_would_refuse(msg: messages.Message, part: str) -> None:
    with pytest.raises(EncodeError) as info:
        encode(msg)
    assert part in str(info.value)
    assert isinstance(info.value, ValueError)


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(EncodeError, match="not a protocol message"):
        encode(object())  # type: ignore[arg-type]


def test_limits_defaults_are_sane() -> None:
    assert AGENT_TO_MANAGER.max_frame == 1 << 20
    assert MANAGER_TO_AGENT.max_frame == 16 << 20
    for limits in (AGENT_TO_MANAGER, MANAGER_TO_AGENT):
        assert limits.max_str <= limits.max_frame
        assert limits.max_depth >= 8


def test_unpack_failure_fallback_names_the_exception_class() -> None:
    # msgpack 1.x raises only the classes mapped above for the frames we could craft; a
    # future version's other exception still becomes a bounded reason.
    assert codec._unpack_failure(RuntimeError("x" * 500)) == "unparseable frame (RuntimeError)"


def test_starts_as_is_a_cheap_hint_for_what_encode_writes() -> None:
    from protocol.codec import starts_as

    hb = encode(messages.Heartbeat(seq=7, status={"x": [1, 2]}))
    assert starts_as(hb, "heartbeat") and starts_as(bytearray(hb), "heartbeat")
    assert starts_as(memoryview(hb), "heartbeat")
    assert not starts_as(hb, "hello")
    assert not starts_as(encode(messages.Hello()), "heartbeat")
    # Another writer's key order, an array, garbage, empty: not recognised (general path).
    other = msgpack.packb({"seq": 1, "type": "heartbeat"})
    assert decode(other, A2M) == messages.Heartbeat(seq=1)
    assert not starts_as(other, "heartbeat")
    for frame in (b"", b"\x93\x01\x02\x03", b"\x81", hb[:5]):
        assert not starts_as(frame, "heartbeat")
    # A hint only: a frame that starts right but is broken is still refused by decode.
    with pytest.raises(DecodeError):
        decode(hb[:-1], A2M)
    assert starts_as(hb[:-1], "heartbeat")
