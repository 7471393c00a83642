"""Certificate renewal over the channel, sd_notify (READY / WATCHDOG / STOPPING) of both
daemons over a real datagram socket, and clean stops."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from agent import identity

pytestmark = pytest.mark.integration


async def test_certificate_renewal_over_the_channel(cluster: Any) -> None:
    mgr = cluster.manager
    await mgr.start()
    (boot,) = await mgr.create_vms(1)
    env = dict(cluster.env, SYSVM_AGENT_RENEW_FRACTION="0")  # renew at once, every connect
    agent = cluster.agent(boot, env)
    await agent.start()
    (enrolled,) = await agent.wait_log("event=enrolled")
    (renewed,) = await agent.wait_log("event=certificate_renewed")
    first = int(enrolled.split("serial=")[1].split()[0], 16)
    second = int(renewed.split("serial=")[1].split()[0], 16)
    assert first != second
    cert = (agent.state_dir / "cert.pem").read_bytes()
    assert identity.cert_serial(cert) == second
    assert await mgr.metric("sysvm_certificates_renewed_total") == 1
    # The renewed certificate is the one the next connection uses, and it is accepted.
    agent.signal(signal.SIGTERM)
    assert await agent.wait(20) == 0
    assert agent.lines("event=agent_stopped")
    await agent.start()
    await agent.wait_log("event=connected", count=2)
    connected = mgr.lines(f"event=agent_connected vm={boot['vm_id']}")
    assert len(connected) == 2


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def count(self, needle: str) -> int:
        return sum(needle in msg for msg in self.poll())

    def close(self) -> None:
        self.sock.close()


async def test_sd_notify_ready_watchdog_stopping(cluster: Any, tmp_path: Path) -> None:
    ns = NotifySocket(tmp_path / "notify.sock")
    try:
        mgr = cluster.manager
        mgr.env = dict(cluster.env, NOTIFY_SOCKET=str(ns.path), WATCHDOG_USEC="200000")
        await mgr.start()
        await cluster.wait_for(lambda: ns.count("READY=1") == 1, 10, "READY=1")
        await cluster.wait_for(lambda: ns.count("WATCHDOG=1") >= 3, 10, "three WATCHDOG=1")
        mgr.signal(signal.SIGTERM)
        assert await mgr.wait(20) == 0
        assert ns.count("STOPPING=1") == 1
        # Order: READY before the first WATCHDOG... and STOPPING last.
        msgs = ns.poll()
        assert "READY=1" in msgs[0] and "STOPPING=1" in msgs[-1]

        # The agent: READY=1 once the role started, STOPPING=1 on SIGTERM.
        ns.messages.clear()
        mgr.env = cluster.env
        await mgr.start()
        (boot,) = await mgr.create_vms(1)
        agent = cluster.agent(boot, dict(cluster.env, NOTIFY_SOCKET=str(ns.path)))
        await agent.start()
        await cluster.wait_for(lambda: ns.count("READY=1") == 1, 10, "agent READY=1")
        agent.signal(signal.SIGTERM)
        assert await agent.wait(20) == 0
        assert ns.count("STOPPING=1") == 1
    finally:
        ns.close()


async def test_bad_boot_data_is_a_clear_error(cluster: Any, tmp_path: Path) -> None:
    boot = {"vm_id": "x", "role": "secondarystorage", "manager_urls": ["http://nope"],
            "ca_fingerprint": "sha256:" + "0" * 64, "token": "t" * 32}  # fmt: skip
    agent = cluster.agent(boot)
    await agent.start()
    assert await agent.wait(20) == 2
    (line,) = agent.lines("event=bootdata_invalid")
    assert "wss://" in line and "t" * 32 not in agent.log()


async def test_heartbeat_interval_change_reaches_a_live_agent(cluster: Any) -> None:
    import json

    from cs import CloudStack

    mgr = cluster.manager
    await mgr.start()
    (boot,) = await mgr.create_vms(1)
    agent = cluster.agent(boot)
    await agent.start()
    await agent.wait_log("event=config_applied version=1")
    creds = json.loads((mgr.home / "credentials.json").read_text())
    api = CloudStack(endpoint=creds["endpoint"], key=creds["apikey"], secret=creds["secretkey"])
    before = await mgr.metric("sysvm_heartbeats_total")
    await asyncio.to_thread(
        api.updateConfiguration, name="sysvm.agent.heartbeat.interval", value="1"
    )
    await agent.wait_log("event=heartbeat_interval seconds=1.0")
    await agent.wait_log("event=config_applied version=2")

    async def beating() -> bool:
        return await mgr.metric("sysvm_heartbeats_total") >= before + 3

    # At the default 10 s interval three heartbeats would take 30 s; at 1 s they take ~3.
    await cluster.wait_for(beating, 8, "heartbeats at the new interval")
    assert agent.lines("event=disconnected") == []


async def test_agent_fails_over_across_manager_urls(cluster: Any, free_port: Any) -> None:
    mgr = cluster.manager
    await mgr.start()
    (boot,) = await mgr.create_vms(1)
    dead = f"wss://127.0.0.1:{free_port()}"  # nothing listens there
    boot = dict(boot, manager_urls=[dead, mgr.url, dead])
    agent = cluster.agent(boot)
    await agent.start()
    await agent.wait_log("event=connected")
    (line,) = agent.lines("event=connected")
    assert f"url={mgr.url}" in line
    # Kill the manager: the agent keeps trying, rotating through every URL.
    mgr.signal(signal.SIGKILL)
    await mgr.wait()
    await agent.wait_log(f"event=link_failed url={dead}")
    await agent.wait_log(f"event=link_failed url={mgr.url}")
    waits = [float(ln.split("seconds=")[1].split()[0]) for ln in agent.lines("reconnect_wait")]
    assert all(0.0 <= w <= 1.0 for w in waits)  # full jitter under the test's 1 s cap
    await mgr.start()
    await agent.wait_log("event=connected", count=2, timeout=30)


async def test_manager_acks_every_nth_heartbeat_and_the_agent_stays_connected(
    cluster: Any,
) -> None:
    """Protocol 2: the manager answers heartbeat 1 and every 4th after it (the setting),
    so 2,000 heartbeats/s cost 500 acks/s; the agent, told so in its welcome, waits
    4 + 2 intervals before it calls the manager silent and does not drop the link."""
    import json

    from cs import CloudStack

    mgr = cluster.manager
    await mgr.start()
    creds = json.loads((mgr.home / "credentials.json").read_text())
    api = CloudStack(endpoint=creds["endpoint"], key=creds["apikey"], secret=creds["secretkey"])
    for name, value in (("sysvm.agent.heartbeat.interval", "1"),
                        ("sysvm.agent.heartbeat.ack.every", "4")):  # fmt: skip
        await asyncio.to_thread(api.updateConfiguration, name=name, value=value)
    (boot,) = await mgr.create_vms(1)
    agent = cluster.agent(boot)
    await agent.start()
    (line,) = await agent.wait_log("event=connected")
    assert "version=2 " in line and "heartbeat=1.0 " in line and "ack_every=4 " in line
    await agent.wait_log("event=config_applied version=1")
    beats0 = await mgr.metric("sysvm_heartbeats_total")
    out0 = await mgr.metric("sysvm_frames_out_total")

    async def twelve_more() -> bool:
        return await mgr.metric("sysvm_heartbeats_total") >= beats0 + 12

    # 12 heartbeats at 1 s: twice the agent's silence timeout (6 s) with sparse acks.
    await cluster.wait_for(twelve_more, 30, "twelve heartbeats")
    beats = await mgr.metric("sysvm_heartbeats_total") - beats0
    acks = await mgr.metric("sysvm_frames_out_total") - out0
    # Every 4th heartbeat is acknowledged (nothing else is sent to an idle agent).
    assert beats // 4 - 1 <= acks <= beats // 4 + 1, (beats, acks)
    assert agent.lines("event=manager_silent") == []
    assert agent.lines("event=disconnected") == []
