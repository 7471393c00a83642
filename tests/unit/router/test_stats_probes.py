"""Traffic stats deltas (pure) and the DNS wire helpers used by the probes."""

from __future__ import annotations

import struct

import pytest

from agent.roles.router import probes, stats
from agent.roles.router.stats import Book, Reading

IP = "203.0.113.10"


def test_deltas_same_epoch_new_epoch_and_reset() -> None:
    a = Reading("b1:1", {IP: (100, 50)})
    assert stats.deltas(None, a) == {IP: (100, 50)}  # first reading: all of it is new
    assert stats.deltas(a, Reading("b1:1", {IP: (150, 50)})) == {IP: (50, 0)}
    assert stats.deltas(a, Reading("b1:1", {IP: (100, 50)})) == {}  # nothing new
    # chains re-made (new generation) or a reboot (new boot id): counters restarted at 0
    assert stats.deltas(a, Reading("b1:2", {IP: (7, 3)})) == {IP: (7, 3)}
    assert stats.deltas(a, Reading("b2:1", {IP: (7, 3)})) == {IP: (7, 3)}
    # lower in the same epoch: zeroed by someone else; count what is there, never negative
    assert stats.deltas(a, Reading("b1:1", {IP: (10, 60)})) == {IP: (10, 10)}
    # a new IP appears mid-epoch
    assert stats.deltas(a, Reading("b1:1", {IP: (100, 50), "x": (1, 2)})) == {"x": (1, 2)}


def test_record_acknowledge_round_trip_nothing_lost_nothing_doubled() -> None:
    book = stats.new_generation(Book(), "b1")
    assert stats.epoch(book) == "b1:1"
    sent_total = [0, 0]
    for total in (100, 250, 250, 400):
        book = stats.record(book, Reading(stats.epoch(book), {IP: (total, total // 2)}))
    assert [b.bytes[IP] for b in book.pending] == [(100, 50), (150, 75), (150, 75)]
    # persisted and reloaded: same book
    book2 = stats.book_from_json(book.to_json())
    assert book2.to_json() == book.to_json()
    # the manager acks the first two; the third stays and is resent
    book = stats.acknowledge(book, [book.pending[0].id, book.pending[1].id])
    assert [b.bytes[IP] for b in book.pending] == [(150, 75)]
    for b in (book2.pending[0], book2.pending[1], book.pending[0]):
        sent_total[0] += b.bytes[IP][0]
        sent_total[1] += b.bytes[IP][1]
    assert sent_total == [400, 200]
    # reboot: new boot id, chains re-made; ids stay unique
    book = stats.new_generation(book, "b2")
    book = stats.record(book, Reading(stats.epoch(book), {IP: (5, 5)}))
    ids = [b.id for b in book.pending]
    assert len(set(ids)) == len(ids) and ids[-1].startswith("b2:")


def test_pending_is_bounded_by_merging_oldest() -> None:
    book = stats.new_generation(Book(), "b")
    for i in range(1, stats.MAX_PENDING + 10):
        book = stats.record(book, Reading(stats.epoch(book), {IP: (i * 10, 0)}))
    assert len(book.pending) == stats.MAX_PENDING
    assert sum(b.bytes[IP][0] for b in book.pending) == (stats.MAX_PENDING + 9) * 10
    assert len({b.id for b in book.pending}) == len(book.pending)


def test_book_from_json_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        stats.book_from_json({"last": {"epoch": "x", "counters": {IP: [1]}}})
    with pytest.raises(ValueError):
        stats.book_from_json({"pending": [{"id": "a", "epoch": "x", "bytes": {IP: [-1, 0]}}]})


def _answer(qid: int, name: str, ip: str, rcode: int = 0) -> bytes:
    q = probes.dns_query(name, qid)
    hdr = struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, 1, 0, 0)
    ans = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes(map(int, ip.split(".")))
    return hdr + q[12:] + ans


def test_dns_wire() -> None:
    q = probes.dns_query("g1.test.internal", 0x1234)
    assert q[:2] == b"\x12\x34" and b"\x02g1\x04test\x08internal\x00" in q
    assert probes.dns_answers(_answer(7, "g1", "10.1.1.5"), 7) == ["10.1.1.5"]
    with pytest.raises(probes.ProbeError, match="id mismatch"):
        probes.dns_answers(_answer(7, "g1", "10.1.1.5"), 8)
    with pytest.raises(probes.ProbeError, match="rcode 3"):
        probes.dns_answers(_answer(7, "g1", "10.1.1.5", rcode=3), 7)
    with pytest.raises(probes.ProbeError, match="short"):
        probes.dns_answers(b"\x00", 7)
    with pytest.raises(probes.ProbeError, match="truncated"):
        probes.dns_answers(_answer(7, "g1", "10.1.1.5")[:-8], 7)
