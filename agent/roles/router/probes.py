"""Function checks of the router's services: a DNS query, the haproxy stats socket, an
HTTP GET, an SSH banner. Each returns a value or raises :class:`ProbeError`; every network
wait is under a timeout. The DNS wire format helpers are pure."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import struct
from pathlib import Path


class ProbeError(Exception):
    """A check failed. ``timed_out``: the service gave no answer within the limit (it may
    only be slow: the caller may try again with a longer one), as opposed to a refusal or
    a wrong answer."""

    def __init__(self, text: str, *, timed_out: bool = False) -> None:
        super().__init__(text)
        self.timed_out = timed_out


def _late(what: str, limit: float) -> ProbeError:
    return ProbeError(f"{what}: no answer within {limit:g} s", timed_out=True)


# --- DNS (pure) ----------------------------------------------------------------------


def dns_query(name: str, qid: int) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD set, one question
    q = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split("."))
    return header + q + b"\0" + struct.pack("!HH", 1, 1)  # A, IN


def _skip_name(data: bytes, off: int) -> int:
    while True:
        if off >= len(data):
            raise ProbeError("truncated DNS name")
        n = data[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2
        off += 1 + n


def dns_answers(data: bytes, qid: int) -> list[str]:
    """IPv4 addresses in the answer section of a reply to query ``qid``."""
    if len(data) < 12:
        raise ProbeError("short DNS reply")
    rid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", data[:12])
    if rid != qid:
        raise ProbeError("DNS reply id mismatch")
    rcode = flags & 0xF
    if rcode != 0:
        raise ProbeError(f"DNS rcode {rcode}")
    off = 12
    for _ in range(qd):
        off = _skip_name(data, off) + 4
    out = []
    for _ in range(an):
        off = _skip_name(data, off)
        if off + 10 > len(data):
            raise ProbeError("truncated DNS answer")
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", data[off : off + 10])
        off += 10
        if rtype == 1 and rdlen == 4:
            out.append(socket.inet_ntoa(data[off : off + 4]))
        off += rdlen
    return out


class _Dns(asyncio.DatagramProtocol):
    def __init__(self, fut: asyncio.Future[bytes]) -> None:
        self.fut = fut

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if not self.fut.done():
            self.fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


async def resolve(server: str, name: str, limit: float = 1.0) -> list[str]:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()
    qid = secrets.randbelow(65536)
    transport, _ = await loop.create_datagram_endpoint(lambda: _Dns(fut), remote_addr=(server, 53))
    try:
        transport.sendto(dns_query(name, qid))
        async with asyncio.timeout(limit):
            data = await fut
    except TimeoutError:
        raise _late(f"DNS query to {server} for {name}", limit) from None
    except OSError as e:
        raise ProbeError(f"DNS to {server}: {e}") from None
    finally:
        transport.close()
    return dns_answers(data, qid)


# --- TCP/unix probes -----------------------------------------------------------------


async def haproxy_info(sock: Path, limit: float = 1.0) -> dict[str, str]:
    """``show info`` on the stats socket → its key/value lines."""
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_unix_connection(str(sock))
            try:
                writer.write(b"show info\n")
                await writer.drain()
                data = await reader.read(65536 * 4)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise _late(f"haproxy stats socket {sock}", limit) from None
    except OSError as e:
        raise ProbeError(f"haproxy stats socket {sock}: {e}") from None
    info = {}
    for line in data.decode(errors="replace").splitlines():
        k, sep, v = line.partition(":")
        if sep:
            info[k.strip()] = v.strip()
    if "Pid" not in info:
        raise ProbeError("haproxy stats socket: no Pid in show info")
    return info


async def http_get(host: str, port: int, path: str, limit: float = 1.0) -> tuple[int, bytes]:
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                req = f"GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: sysvm-probe\r\n\r\n"
                writer.write(req.encode())
                await writer.drain()
                data = await reader.read(1 << 20)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise _late(f"http://{host}:{port}{path}", limit) from None
    except OSError as e:
        raise ProbeError(f"http://{host}:{port}{path}: {e}") from None
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ProbeError(f"http://{host}:{port}{path}: not an HTTP response")
    return int(parts[1]), body


async def ssh_banner(host: str, port: int, limit: float = 1.0) -> str:
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise _late(f"ssh {host}:{port}", limit) from None
    except OSError as e:
        raise ProbeError(f"ssh {host}:{port}: {e}") from None
    text = line.decode(errors="replace").strip()
    if not text.startswith("SSH-2.0-"):
        raise ProbeError(f"ssh {host}:{port}: bad banner {text[:40]!r}")
    return text
