"""Traffic stats bookkeeping: pure functions over counter readings (no I/O, no clock).

A :class:`Reading` is the per-public-IP byte counters at one moment plus the *epoch* the
counters belong to: ``"<boot id>:<generation>"``. The generation goes up every time the
router (re)creates its counting chains, which zeroes them. Within one epoch counters only
grow; a new epoch starts from zero. So the delta between two readings is

* same epoch: ``cur - prev`` (a lower value means someone zeroed it → ``cur``);
* new epoch: ``cur`` (everything counted since the chains were made is new).

Before the router replaces its counting chains it takes a reading, so the old epoch's
tail is accounted; after a crash or reboot the old epoch's unread tail is gone with the
kernel's counters (nothing we can read), but nothing is ever counted twice.

Deltas go into *pending* batches (``id`` unique per batch) which stay until the manager
acknowledges them, persisted together with the last reading in one atomic write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

MAX_PENDING = 64  # older batches are merged into one beyond this


@dataclass(frozen=True, slots=True)
class Reading:
    epoch: str
    counters: Mapping[str, tuple[int, int]]  # public IP -> (bytes in, bytes out)


@dataclass(frozen=True, slots=True)
class Batch:
    id: str
    epoch: str
    bytes: Mapping[str, tuple[int, int]]  # public IP -> (delta in, delta out)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "epoch": self.epoch,
            "bytes": {ip: [v[0], v[1]] for ip, v in sorted(self.bytes.items())},
        }


@dataclass(frozen=True, slots=True)
class Book:
    """What is persisted: last reading, unacknowledged batches, next batch number."""

    last: Reading | None = None
    pending: tuple[Batch, ...] = ()
    seq: int = 0
    generation: int = 0
    boot_id: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "last": None
            if self.last is None
            else {
                "epoch": self.last.epoch,
                "counters": {ip: [v[0], v[1]] for ip, v in sorted(self.last.counters.items())},
            },
            "pending": [b.to_json() for b in self.pending],
            "seq": self.seq,
            "generation": self.generation,
            "boot_id": self.boot_id,
        }


def _pair(v: Any) -> tuple[int, int]:
    if not isinstance(v, list | tuple) or len(v) != 2:
        raise ValueError(f"bad counter pair {v!r}")
    a, b = int(v[0]), int(v[1])
    if a < 0 or b < 0:
        raise ValueError(f"negative counter {v!r}")
    return a, b


def book_from_json(data: Mapping[str, Any]) -> Book:
    last = data.get("last")
    return Book(
        last=None
        if last is None
        else Reading(
            epoch=str(last["epoch"]),
            counters={str(ip): _pair(v) for ip, v in last["counters"].items()},
        ),
        pending=tuple(
            Batch(
                id=str(b["id"]),
                epoch=str(b["epoch"]),
                bytes={str(ip): _pair(v) for ip, v in b["bytes"].items()},
            )
            for b in data.get("pending", [])
        ),
        seq=int(data.get("seq", 0)),
        generation=int(data.get("generation", 0)),
        boot_id=str(data.get("boot_id", "")),
    )


def deltas(prev: Reading | None, cur: Reading) -> dict[str, tuple[int, int]]:
    """Bytes counted between two readings, per public IP (zero deltas left out)."""
    out: dict[str, tuple[int, int]] = {}
    same = prev is not None and prev.epoch == cur.epoch
    for ip, (i, o) in sorted(cur.counters.items()):
        pi, po = prev.counters.get(ip, (0, 0)) if (same and prev is not None) else (0, 0)
        di = i - pi if i >= pi else i
        do = o - po if o >= po else o
        if di or do:
            out[ip] = (di, do)
    return out


def merge(batches: Iterable[Batch], id: str, epoch: str) -> Batch:
    total: dict[str, list[int]] = {}
    for b in batches:
        for ip, (i, o) in b.bytes.items():
            t = total.setdefault(ip, [0, 0])
            t[0] += i
            t[1] += o
    return Batch(id=id, epoch=epoch, bytes={ip: (v[0], v[1]) for ip, v in total.items()})


def record(book: Book, cur: Reading) -> Book:
    """Fold a new reading into the book: a pending batch for its deltas (if any)."""
    d = deltas(book.last, cur)
    pending = book.pending
    seq = book.seq
    if d:
        seq += 1
        pending = (*pending, Batch(id=f"{book.boot_id}:{seq}", epoch=cur.epoch, bytes=d))
        if len(pending) > MAX_PENDING:
            # Keep the count bounded while the manager is unreachable: fold the oldest.
            # The merged batch gets a fresh id: the manager never saw it (unacked).
            seq += 1
            old = pending[: len(pending) - MAX_PENDING + 1]
            merged = merge(old, f"{book.boot_id}:{seq}", old[-1].epoch)
            pending = (merged, *pending[len(old) :])
    return replace(book, last=cur, pending=pending, seq=seq)


def acknowledge(book: Book, ids: Iterable[str]) -> Book:
    gone = set(ids)
    return replace(book, pending=tuple(b for b in book.pending if b.id not in gone))


def new_generation(book: Book, boot_id: str) -> Book:
    """The counting chains are being (re)made: counters restart at zero."""
    if book.boot_id != boot_id:
        # Batch ids must stay unique across boots: they carry the boot id.
        return replace(book, boot_id=boot_id, generation=1)
    return replace(book, generation=book.generation + 1)


def epoch(book: Book) -> str:
    return f"{book.boot_id}:{book.generation}"
