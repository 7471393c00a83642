"""Server side of RFC 6455 framing for the console relay. Pure: bytes in, bytes out.

Only what the relay needs, fast: client frames must be masked (unmasked with the C
``apply_mask`` from ``websockets.speedups``); binary and continuation payloads are returned
joined (the relay forwards a byte stream, message boundaries do not matter to RFB); text
frames are refused (1003); control frames are returned separately. Errors raise
:class:`WsError` with the close code to send.
"""

from __future__ import annotations

import base64
import hashlib
import struct

from websockets.speedups import apply_mask

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_H16 = struct.Struct("!BBH")
_H64 = struct.Struct("!BBQ")


class WsError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324


def valid_client_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.encode(), validate=True)) == 16
    except ValueError:
        return False


def header(opcode: int, length: int) -> bytes:
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return _H16.pack(0x80 | opcode, 126, length)
    return _H64.pack(0x80 | opcode, 127, length)


def frame(opcode: int, payload: bytes) -> bytes:
    return header(opcode, len(payload)) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    return frame(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:120])


def parse_close(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2:
        return 1005, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")


class FrameParser:
    """Parses masked client frames as a stream: a data frame's payload is unmasked and
    returned as soon as its bytes arrive (a frame split across reads is never buffered
    whole; only an incomplete header of at most 14 bytes is kept). ``feed(data)`` returns
    ``(data_parts, controls)``: the unmasked payload pieces in order (write them with
    ``writelines``: joining would copy every byte once more)."""

    __slots__ = ("_ctl", "_head", "_in_message", "_mask", "_opcode", "_remaining", "max_payload")

    def __init__(self, max_payload: int) -> None:
        self._head = b""  # incomplete frame header
        self._remaining = 0  # payload bytes still to come for the frame in progress
        self._mask = b""  # its mask, rotated to the next byte's phase
        self._opcode = 0
        self._ctl = b""  # partial control frame payload
        self._in_message = False
        self.max_payload = max_payload

    @property
    def pending(self) -> int:
        return len(self._head) + self._remaining

    def feed(self, data: bytes) -> tuple[list[bytes], list[tuple[int, bytes]]]:
        if self._head:
            data = self._head + data
            self._head = b""
        n = len(data)
        pos = 0
        parts: list[bytes] = []
        controls: list[tuple[int, bytes]] = []
        view = memoryview(data)
        try:
            if self._remaining:
                take = min(self._remaining, n)
                chunk = apply_mask(view[:take], self._mask)
                pos = take
                self._remaining -= take
                if self._remaining:
                    k = take % 4
                    self._mask = self._mask[k:] + self._mask[:k]
                if self._opcode >= OP_CLOSE:
                    self._ctl += chunk
                    if not self._remaining:
                        controls.append((self._opcode, self._ctl))
                        self._ctl = b""
                elif chunk:
                    parts.append(chunk)
            while n - pos >= 2:
                b0 = data[pos]
                b1 = data[pos + 1]
                if b0 & 0x70:
                    raise WsError(1002, "reserved bits set")
                if not b1 & 0x80:
                    raise WsError(1002, "client frames must be masked")
                length = b1 & 0x7F
                hl = 6
                if length == 126:
                    hl = 8
                    if n - pos < hl:
                        break
                    length = (data[pos + 2] << 8) | data[pos + 3]
                elif length == 127:
                    hl = 14
                    if n - pos < hl:
                        break
                    length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                elif n - pos < hl:
                    break
                opcode = b0 & 0x0F
                fin = b0 & 0x80
                if opcode in (OP_BINARY, OP_CONT):
                    if length > self.max_payload:
                        raise WsError(1009, "frame too big")
                    if (opcode == OP_BINARY) == self._in_message:
                        raise WsError(1002, "bad continuation")
                    self._in_message = not fin
                elif opcode >= OP_CLOSE:
                    if not fin or length > 125 or opcode > OP_PONG:
                        raise WsError(1002, "bad control frame")
                elif opcode == OP_TEXT:
                    raise WsError(1003, "text frames are not supported; use binary")
                else:
                    raise WsError(1002, f"unknown opcode {opcode}")
                start = pos + hl
                mask = data[start - 4 : start]
                end = start + length
                if end <= n:
                    payload = apply_mask(view[start:end], mask)
                    pos = end
                    if opcode >= OP_CLOSE:
                        controls.append((opcode, payload))
                    elif payload:
                        parts.append(payload)
                    continue
                # The frame continues in later reads.
                chunk = apply_mask(view[start:n], mask)
                k = (n - start) % 4
                self._mask = mask[k:] + mask[:k]
                self._remaining = end - n
                self._opcode = opcode
                pos = n
                if opcode >= OP_CLOSE:
                    self._ctl = chunk
                elif chunk:
                    parts.append(chunk)
                break
        finally:
            view.release()
        if pos < n:
            self._head = data[pos:]
        return parts, controls
