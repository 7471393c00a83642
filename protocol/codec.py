"""MessagePack encoding of :mod:`protocol.messages`, hardened against hostile frames.

A frame is one binary websocket message holding one msgpack map: ``{"type": tag, field:
value, ...}``. :func:`decode` turns every malformed frame into a :class:`DecodeError` and
bounds the work *before* building objects:

1. text frames and frames longer than ``Limits.max_frame`` are refused unread;
2. ``msgpack.unpackb`` runs with ``max_str_len``/``max_bin_len`` (``max_str``),
   ``max_array_len``/``max_map_len`` (``max_items``), extension types refused, UTF-8
   checked, only ``str``/``bytes`` map keys, and a list/map hook that aborts as soon as
   the frame holds more than ``max_items`` items in total (bounding the objects built,
   not just the bytes read);
3. one iterative (non-recursive) walk checks nesting depth, ``str`` map keys and
   plain-data values (msgpack timestamps are refused too);
4. the ``type`` tag picks the class; unknown fields are dropped; each known field's type
   is checked (``float`` fields accept ints and must be finite; ``int`` refuses ``bool``).

Error codes (``DecodeError.code``), and what :class:`protocol.conversation.Conversation`
does with them:

- ``too_big`` — frame over ``max_frame``: close 1009.
- ``malformed`` — text frame, not msgpack, truncated, trailing bytes, ext types, invalid
  UTF-8, over a limit, not a map, non-str keys: close 1008.
- ``unknown_type`` — a well-formed map with a missing or unknown ``type``: ``error`` reply.
- ``bad_field`` — a known ``type`` with a field of the wrong type: ``error`` reply.

:func:`encode` checks the same rules (minus the size limits) and raises
:class:`EncodeError` instead of producing a frame the peer would refuse.

Pure module: no I/O, no clock.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any, Final

import msgpack

from protocol.messages import MESSAGE_TYPES, Message

__all__ = [
    "AGENT_TO_MANAGER",
    "BAD_FIELD",
    "MALFORMED",
    "MANAGER_TO_AGENT",
    "TOO_BIG",
    "UNKNOWN_TYPE",
    "DecodeError",
    "EncodeError",
    "Limits",
    "decode",
    "encode",
    "starts_as",
]

TOO_BIG: Final = "too_big"
MALFORMED: Final = "malformed"
UNKNOWN_TYPE: Final = "unknown_type"
BAD_FIELD: Final = "bad_field"

_RECOVERABLE: Final = frozenset({UNKNOWN_TYPE, BAD_FIELD})


class DecodeError(Exception):
    """A frame was refused. ``code`` is one of the module's codes; ``reason`` is short,
    human-readable and quotes at most a type tag (repr, 40 chars) from the frame. ``ref``
    is the frame's integer ``id`` when the frame is a readable ``request`` (so the
    ``error`` reply fails that request on the peer's side, and nothing else)."""

    def __init__(self, code: str, reason: str, ref: int | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.ref = ref

    @property
    def recoverable(self) -> bool:
        """True when the connection can go on (answer with an ``error`` message)."""
        return self.code in _RECOVERABLE


class EncodeError(ValueError):
    """A message holds something the protocol cannot carry (a programming error)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-direction bounds on one frame.

    ``max_frame``: bytes; ``max_depth``: nesting of maps/arrays (the frame's top map is
    depth 1); ``max_items``: map entries plus array elements in the whole frame (also the
    cap on any one container); ``max_str``: bytes of one str or bin value.
    """

    max_frame: int
    max_depth: int
    max_items: int
    max_str: int


#: What the manager accepts from an agent (heartbeats, results, CSRs).
AGENT_TO_MANAGER: Final = Limits(
    max_frame=1 << 20, max_depth=16, max_items=10_000, max_str=256 << 10
)
#: What an agent accepts from the manager (whole desired configs can be large).
MANAGER_TO_AGENT: Final = Limits(
    max_frame=16 << 20, max_depth=32, max_items=500_000, max_str=4 << 20
)

_SCALARS: Final = frozenset({type(None), bool, int, float, str, bytes})


class _ExtRefused(Exception):
    pass


class _TooManyItems(Exception):
    pass


class _ItemBudget:
    """msgpack ``list_hook``/``object_hook``: counts items as each container is built and
    aborts the decode once the frame holds more than allowed, so a frame packed with small
    containers costs at most about twice ``max_items`` objects, not a megabyte's worth."""

    __slots__ = ("left",)

    def __init__(self, items: int) -> None:
        self.left = items

    def take(self, container: Any) -> Any:
        self.left -= len(container)
        if self.left < 0:
            raise _TooManyItems
        return container


def _refuse_ext(code: int, data: bytes) -> Any:
    raise _ExtRefused(code)


# -- field kinds -------------------------------------------------------------------------

_INT, _FLOAT, _BOOL, _STR, _BYTES, _OPT_INT, _INT_LIST, _DICT = range(8)

_KIND_BY_ANNOTATION: Final = {
    "int": _INT,
    "float": _FLOAT,
    "bool": _BOOL,
    "str": _STR,
    "bytes": _BYTES,
    "int | None": _OPT_INT,
    "list[int]": _INT_LIST,
    "dict[str, Any]": _DICT,
}

_KIND_NAMES: Final = {
    _INT: "an integer",
    _FLOAT: "a finite number",
    _BOOL: "a boolean",
    _STR: "a string",
    _BYTES: "bytes",
    _OPT_INT: "an integer or nil",
    _INT_LIST: "a list of integers",
    _DICT: "a map",
}


def _field_kinds(cls: type[Message]) -> tuple[tuple[str, int], ...]:
    out = []
    for f in fields(cls):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        out.append((f.name, _KIND_BY_ANNOTATION[annotation]))
    return tuple(out)


_FIELDS: Final = {cls: _field_kinds(cls) for cls in MESSAGE_TYPES.values()}


def _check_kind(kind: int, value: Any) -> tuple[bool, Any]:
    """(valid, value to store). Pure; ``value`` comes from msgpack so it is plain data."""
    t = type(value)
    if kind == _INT:
        return t is int, value
    if kind == _STR:
        return t is str, value
    if kind == _DICT:
        return t is dict, value
    if kind == _BOOL:
        return t is bool, value
    if kind == _FLOAT:
        if t is int:
            return True, float(value)
        return t is float and math.isfinite(value), value
    if kind == _BYTES:
        return t is bytes, value
    if kind == _OPT_INT:
        return value is None or t is int, value
    # _INT_LIST
    return t is list and all(type(v) is int for v in value), value


# -- plain-data walk ---------------------------------------------------------------------


def _walk(obj: dict[Any, Any], max_depth: int) -> str | None:
    """Iteratively check a decoded top-level map (depth, key and value types). Returns the
    problem, or None. (Item counts are enforced while decoding, by :class:`_ItemBudget`.)"""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            return f"nesting deeper than {max_depth}"
        if type(value) is dict:
            for k, v in value.items():
                if type(k) is not str:
                    return "map key is not a string"
                t = type(v)
                if t is dict or t is list:
                    stack.append((v, depth + 1))
                elif t not in _SCALARS:
                    return "value of an unsupported type"
        else:  # list: only dicts and lists are ever pushed
            for v in value:
                t = type(v)
                if t is dict or t is list:
                    stack.append((v, depth + 1))
                elif t not in _SCALARS:
                    return "value of an unsupported type"
    return None


def _unpack_failure(exc: Exception) -> str:
    if isinstance(exc, _ExtRefused):
        return "msgpack extension types are not accepted"
    if isinstance(exc, UnicodeDecodeError):
        return "invalid UTF-8 in a string"
    if isinstance(exc, msgpack.ExtraData):
        return "trailing bytes after the message"
    if isinstance(exc, msgpack.StackError):
        return "nesting too deep"
    if isinstance(exc, msgpack.FormatError):
        return "not msgpack"
    text = str(exc)
    if "map key" in text:
        return "map key is not a string"
    if "max_ext_len" in text:
        return "msgpack extension types are not accepted"
    if "exceeds max" in text:
        return "a string, bytes or container exceeds the limit"
    if "incomplete" in text.lower():
        return "truncated frame"
    return f"unparseable frame ({type(exc).__name__})"


# -- public API --------------------------------------------------------------------------


def decode(data: bytes | bytearray | memoryview | str, limits: Limits) -> Message:
    """Parse one frame. Raises only :class:`DecodeError`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(MALFORMED, "text frames are not accepted, only binary msgpack")
    size = len(data)
    if size > limits.max_frame:
        raise DecodeError(TOO_BIG, f"frame of {size} bytes exceeds {limits.max_frame}")
    budget = _ItemBudget(limits.max_items)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            list_hook=budget.take,
            object_hook=budget.take,
            max_str_len=limits.max_str,
            max_bin_len=limits.max_str,
            max_array_len=limits.max_items,
            max_map_len=limits.max_items,
            max_ext_len=0,
        )
    except _TooManyItems:
        raise DecodeError(MALFORMED, f"more than {limits.max_items} items") from None
    except Exception as exc:  # msgpack raises many types; all mean "unparseable"
        raise DecodeError(MALFORMED, _unpack_failure(exc)) from None
    if type(obj) is not dict:
        raise DecodeError(MALFORMED, "frame is not a map")
    problem = _walk(obj, limits.max_depth)
    if problem is not None:
        raise DecodeError(MALFORMED, problem)
    # Only a request's id may be echoed: an ``error`` with a ``ref`` fails that request.
    ref = obj.get("id") if obj.get("type") == "request" else None
    if type(ref) is not int:
        ref = None
    tag = obj.get("type")
    cls = MESSAGE_TYPES.get(tag) if type(tag) is str else None
    if cls is None:
        if type(tag) is str:
            raise DecodeError(UNKNOWN_TYPE, f"unknown message type {tag[:40]!r}", ref)
        raise DecodeError(UNKNOWN_TYPE, "missing or non-string 'type'", ref)
    kwargs: dict[str, Any] = {}
    for name, kind in _FIELDS[cls]:
        if name in obj:
            ok, value = _check_kind(kind, obj[name])
            if not ok:
                raise DecodeError(BAD_FIELD, f"{tag}.{name} must be {_KIND_NAMES[kind]}", ref)
            kwargs[name] = value
    return cls(**kwargs)


def encode(msg: Message) -> bytes:
    """Serialize one message. Raises :class:`EncodeError` for values the peer would refuse."""
    cls = type(msg)
    kinds = _FIELDS.get(cls)
    if kinds is None:
        raise EncodeError(f"not a protocol message: {cls.__name__}")
    out: dict[str, Any] = {"type": msg.type}
    for name, kind in kinds:
        value = getattr(msg, name)
        ok, _ = _check_kind(kind, value)
        if not ok:
            raise EncodeError(f"{msg.type}.{name} must be {_KIND_NAMES[kind]}")
        out[name] = value
    problem = _walk(out, 1 << 30)
    if problem is not None:
        raise EncodeError(f"{msg.type}: {problem}")
    try:
        data: bytes = msgpack.packb(out, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"{msg.type}: cannot pack ({exc})") from None
    return data


_TYPE_KEY: Final = msgpack.packb("type")


@functools.lru_cache(maxsize=64)
def _packed_tag(msg_type: str) -> bytes:
    packed: bytes = msgpack.packb(msg_type)
    return packed


def starts_as(frame: bytes | bytearray | memoryview, msg_type: str) -> bool:
    """A cheap hint, not a check: does ``frame`` begin like ``encode`` writes a
    ``msg_type`` message (a small map whose first key is ``type`` with that tag)? Lets a
    receiver route its most frequent message without decoding the rest; a frame written
    another way just takes the general path. Only :func:`decode` says a frame is valid."""
    if not frame or not 0x80 <= frame[0] <= 0x8F:  # fixmap
        return False
    tag = _packed_tag(msg_type)
    start = 1 + len(_TYPE_KEY)
    return bytes(frame[1:start]) == _TYPE_KEY and bytes(frame[start : start + len(tag)]) == tag
