"""Thousands of hostile frames at /agent and /enrol, and garbage TLS / HTTP at the agent
port, while a real agent stays connected: the manager keeps serving it and others."""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cs import CloudStack
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agent import identity
from protocol import messages as m
from protocol.codec import MANAGER_TO_AGENT, decode, encode

pytestmark = pytest.mark.integration


def recoverable_frames(rng: random.Random) -> list[bytes]:
    """Well-formed msgpack maps the manager must refuse with an ``error`` reply and go on."""
    junk = rng.randbytes(rng.randrange(1, 40)).hex()
    return [
        msgpack.packb({"type": "no_such_type", "x": 1}),
        msgpack.packb({"type": junk}),
        msgpack.packb({"x": junk}),
        msgpack.packb({"type": "heartbeat", "seq": "not-an-int"}),
        msgpack.packb({"type": "heartbeat", "seq": True}),
        msgpack.packb({"type": "config_ack", "version": 1.5, "ok": "yes"}),
        msgpack.packb({"type": "command_result", "id": 5, "ok": None}),
        msgpack.packb({"type": "welcome", "version": 1}),  # wrong direction
        msgpack.packb({"type": "request", "id": "x", "method": 3}),
    ]


def fatal_frames(rng: random.Random) -> list[bytes | str]:
    """Frames after which the manager closes the connection (1008 / 1009)."""
    deep: Any = 0
    for _ in range(200):
        deep = [deep]
    return [
        rng.randbytes(rng.randrange(1, 300)),
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"type": "heartbeat", "status": deep}),
        msgpack.packb({"type": "event", "name": "x", "data": {str(i): i for i in range(30_000)}}),
        msgpack.packb({1: 2}),
        msgpack.packb({"type": "event", "data": msgpack.ExtType(5, b"xx")}),
        msgpack.packb({"type": "hello", "versions": [1]}),  # hello again: out of order
        encode(m.Heartbeat(seq=1))[:-1],  # truncated
        encode(m.Heartbeat(seq=1)) + b"\x00",  # trailing bytes
        "text frames are refused",
        b"\x00" * (2 << 20),  # over max_size: 1009
        bytes(b ^ rng.randrange(1, 256) if rng.random() < 0.3 else b
              for b in encode(m.Heartbeat(seq=3, status={"a": [1, 2]}))),
    ]  # fmt: skip


async def _drain(ws: Any) -> int:
    n = 0
    try:
        while True:
            await ws.recv()
            n += 1
    except ConnectionClosed:
        return n


async def fuzz_agent_path(
    url: str, ctx: ssl.SSLContext, rng: random.Random, rounds: int, per_round: int
) -> tuple[int, int]:
    """Each round: hello, ``per_round`` refusable frames (a valid heartbeat every 8 resets the
    bad-frame streak), then one fatal frame. Returns (frames sent, error replies read)."""
    sent = replies = 0
    for _ in range(rounds):
        try:
            async with connect(
                url + "/agent", ssl=ctx, open_timeout=10, compression=None, max_size=None
            ) as ws:
                reader = asyncio.create_task(_drain(ws))
                await ws.send(encode(m.Hello(versions=[1])))
                for i in range(per_round):
                    if i % 8 == 7:
                        await ws.send(encode(m.Heartbeat(seq=i, status={})))
                    else:
                        await ws.send(rng.choice(recoverable_frames(rng)))
                    sent += 1
                await ws.send(rng.choice(fatal_frames(rng)))
                sent += 1
                replies += await asyncio.wait_for(reader, 30)
        except ConnectionClosed:
            pass
    return sent, replies


async def fuzz_enrol_path(url: str, ca: bytes, rng: random.Random, rounds: int) -> int:
    ctx = identity.client_context(ca, None, None)
    sent = 0
    for _ in range(rounds):
        frames = recoverable_frames(rng) + fatal_frames(rng)
        try:
            async with connect(
                url + "/enrol", ssl=ctx, open_timeout=10, compression=None, max_size=None
            ) as ws:
                await ws.send(rng.choice(frames))
                sent += 1
                await asyncio.wait_for(_drain(ws), 10)
        except ConnectionClosed:
            pass
    return sent


async def fuzz_raw(port: int, rng: random.Random, rounds: int) -> None:
    payloads = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00" + rng.randbytes(600),  # a fake ClientHello
        b"\x16\x03\x03\x00\x05hello",
        rng.randbytes(2000),
        b"",
    ]
    sem = asyncio.Semaphore(20)

    async def one(i: int) -> None:
        async with sem:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return
            writer.write(payloads[i % len(payloads)])
            try:
                await writer.drain()
                await asyncio.wait_for(reader.read(1024), 0.5)
            except (OSError, TimeoutError):
                pass
            writer.close()

    async def tls_garbage() -> None:
        async with sem:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
                writer.write(rng.randbytes(300) + b"\r\n\r\n")
                await writer.drain()
                await asyncio.wait_for(reader.read(1024), 5)
                writer.close()
            except (OSError, TimeoutError, ssl.SSLError):
                pass

    await asyncio.gather(
        *(one(i) for i in range(rounds)), *(tls_garbage() for _ in range(rounds // 4))
    )


async def enrol_identity(url: str, ca: bytes, boot: dict[str, Any], tmp: Path) -> ssl.SSLContext:
    from agent.state import StateDir

    st = StateDir(tmp / "fuzzer")
    st.ensure()
    key = identity.ensure_key(st)
    csr = identity.make_csr(key, boot["vm_id"])
    async with connect(url + "/enrol", ssl=identity.client_context(ca, None, None)) as ws:
        await ws.send(encode(m.Enrol(vm_id=boot["vm_id"], token=boot["token"], csr=csr)))
        answer = decode(await asyncio.wait_for(ws.recv(), 10), MANAGER_TO_AGENT)
    assert isinstance(answer, m.Enrolled)
    st.write_cert(answer.certificate)
    return identity.client_context(ca, str(st.cert_path), str(st.key_path))


async def test_fuzz_manager_keeps_serving(cluster: Any, tmp_path: Path) -> None:
    mgr = cluster.manager
    await mgr.start()
    creds = json.loads((mgr.home / "credentials.json").read_text())
    api = CloudStack(endpoint=creds["endpoint"], key=creds["apikey"], secret=creds["secretkey"])
    await asyncio.to_thread(
        api.updateConfiguration, name="sysvm.agent.heartbeat.interval", value="1"
    )
    good_boot, fuzz_boot, late_boot = await mgr.create_vms(3)
    good = cluster.agent(good_boot)
    await good.start()
    await good.wait_log("event=connected")
    ca = (mgr.home / "pki" / "ca.pem").read_bytes()
    ctx = await enrol_identity(mgr.url, ca, fuzz_boot, tmp_path)

    hb_before = await mgr.metric("sysvm_heartbeats_total")
    t0 = time.monotonic()
    rng = random.Random(42)
    (sent_agent, replies), sent_enrol, _ = await asyncio.gather(
        fuzz_agent_path(mgr.url, ctx, random.Random(rng.random()), 12, 300),
        fuzz_enrol_path(mgr.url, ca, random.Random(rng.random()), 300),
        fuzz_raw(mgr.agent_port, random.Random(rng.random()), 200),
    )
    elapsed = time.monotonic() - t0
    print(
        f"fuzz: agent_frames={sent_agent} replies={replies} enrol_frames={sent_enrol} "
        f"seconds={elapsed:.1f}"
    )
    assert sent_agent + sent_enrol >= 3000, (sent_agent, sent_enrol)
    # The manager answered the refusable frames (error replies) and heartbeat acks.
    assert replies >= sent_agent * 0.9

    # The manager is alive and counted what it refused.
    assert mgr.running
    metrics = await mgr.metrics()
    decode_errors = sum(v for k, v in metrics.items() if k.startswith("sysvm_decode_errors_total"))
    assert decode_errors >= 2500, decode_errors
    refused_enrol = sum(
        v for k, v in metrics.items() if k.startswith("sysvm_enrolments_total") and "refused" in k
    )
    assert refused_enrol >= 300
    assert any(k.startswith("sysvm_tls_handshake_failures_total") for k in metrics)
    # The good agent never dropped and kept heartbeating throughout (interval 1 s).
    assert good.lines("event=disconnected") == []
    assert metrics["sysvm_heartbeats_total"] - hb_before >= max(1, int(elapsed) - 2)
    # Others are still served: a new VM enrols and connects.
    late = cluster.agent(late_boot)
    await late.start()
    await late.wait_log("event=connected")
    assert await mgr.metric("sysvm_agents_connected") >= 2
    # The fuzzer's log noise is rate-limited, not one line per frame.
    assert len(mgr.log().splitlines()) < 2000
    assert good.running and late.running
