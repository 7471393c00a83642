"""Router traffic stats: the ``router.stats`` agent request.

The router sends *deltas* in batches (``agent/roles/router/stats.py``)::

    {"boot_id": "...", "batches": [{"id": "<boot id>:<seq>", "epoch": "...",
                                    "bytes": {"198.18.0.5": [bytes_in, bytes_out]}}]}

and drops the batches the answer lists as ``acked``. A batch is counted once per router
(``router_stats_batches``), however often it is re-sent — a lost answer only causes a
re-send, never a double count. Totals are kept per network and public IP
(``network_traffic``) and shown by listNetworks / listPublicIpAddresses / listRouters
(``receivedbytes``, ``sentbytes``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from manager.network.store import Writer

MAX_BATCHES = 256
MAX_IPS = 1024
MAX_BYTES = 2**62  # one delta; beyond is a corrupted counter
KEEP_SECONDS = 30 * 86400  # batch ids remembered this long (the agent keeps <= 64 pending)


class StatsError(ValueError):
    """Malformed ``router.stats`` params; the agent gets an error answer."""


@dataclass(frozen=True, slots=True)
class Batch:
    id: str
    bytes: Mapping[str, tuple[int, int]]


def parse_batches(params: Mapping[str, Any]) -> list[Batch]:
    """Strict, bounded parse of the request params (pure)."""
    raw = params.get("batches")
    if not isinstance(raw, list):
        raise StatsError("batches must be a list")
    if len(raw) > MAX_BATCHES:
        raise StatsError(f"at most {MAX_BATCHES} batches per request")
    out: list[Batch] = []
    for i, b in enumerate(raw):
        if not isinstance(b, Mapping):
            raise StatsError(f"batches[{i}] must be an object")
        bid = b.get("id")
        if not isinstance(bid, str) or not 1 <= len(bid) <= 128:
            raise StatsError(f"batches[{i}].id must be a string of 1-128 characters")
        counters = b.get("bytes")
        if not isinstance(counters, Mapping) or len(counters) > MAX_IPS:
            raise StatsError(f"batches[{i}].bytes must be an object of at most {MAX_IPS} IPs")
        parsed: dict[str, tuple[int, int]] = {}
        for ip, pair in counters.items():
            try:
                addr = str(ipaddress.IPv4Address(ip))
            except (ValueError, TypeError):
                raise StatsError(f"batches[{i}].bytes: {ip!r} is not an IPv4 address") from None
            if (
                not isinstance(pair, list | tuple)
                or len(pair) != 2
                or not all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_BYTES
                    for v in pair
                )
            ):
                raise StatsError(f"batches[{i}].bytes[{addr}] must be [bytes_in, bytes_out] >= 0")
            parsed[addr] = (int(pair[0]), int(pair[1]))
        out.append(Batch(bid, parsed))
    return out


async def record(
    tx: Writer, router_id: str, network_id: str | None, batches: list[Batch], now: float
) -> tuple[list[str], int]:
    """Counts the batches not seen before; returns (ids to acknowledge, how many were new).
    Every id is acknowledged — also duplicates — so the router stops re-sending them."""
    new = 0
    for b in batches:
        inserted = await tx.execute(
            "INSERT OR IGNORE INTO router_stats_batches (router_id, batch_id, received) "
            "VALUES (?, ?, ?)",
            (router_id, b.id, now),
        )
        if not inserted:
            continue
        new += 1
        if network_id is None:
            continue
        for ip, (bytes_in, bytes_out) in b.bytes.items():
            await tx.execute(
                "INSERT INTO network_traffic (network_id, public_ip, bytes_received, bytes_sent, "
                "updated) VALUES (?, ?, ?, ?, ?) ON CONFLICT (network_id, public_ip) DO UPDATE "
                "SET bytes_received = bytes_received + excluded.bytes_received, "
                "bytes_sent = bytes_sent + excluded.bytes_sent, updated = excluded.updated",
                (network_id, ip, bytes_in, bytes_out, now),
            )
    await tx.execute("DELETE FROM router_stats_batches WHERE received < ?", (now - KEEP_SECONDS,))
    return [b.id for b in batches], new
