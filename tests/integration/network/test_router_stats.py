"""Traffic stats end to end: bytes sent through a real router (the real ``sysvm-agent``
with the router role in a namespace, as in test_router_agent.py) to its public IP are read
back through the API (listNetworks / listPublicIpAddresses ``receivedbytes`` /
``sentbytes``) and match what an independent counter on the client measured, across a
``rebootRouter`` through the API (nothing lost, nothing counted twice).
``router.stats.interval`` is set through updateConfiguration: 1 s for the test, and 0 is
shown to stop the reports (the bytes are then reported once it is turned on again). The
reboot flushes the router's rules (zeroed counters, as after a real reboot), so only the
agent's reading at its planned stop and its persisted, re-sent batches carry the bytes
over. Also checked on the way: the guest's user data / meta-data are served by the router.

    [pub ns] client, 198.18.0.1 ── eth1 [router ns] eth2 ── 10.250.0.x [guest ns] server
             counts its own IP bytes      port forward 8080 → guest:8080

The client's iptables counters (``OUTPUT -d <public IP>``, ``INPUT -s <public IP>``) count
the same IP packets (headers included) that the router's per-IP counters see; the TCP/IP
overhead is checked too: every packet carries 40-60 header bytes on top of the payload.
"""

from __future__ import annotations

import asyncio
import base64
import re
import sys
import time
from typing import Any

import pytest

from manager.network.guests import add_guest_nic
from tests.integration.network.netapi import TIMING
from tests.integration.network.test_router_agent import (
    Env,
    agent_log,
    create_network,
    env,  # noqa: F401 - the fixture
    router_state,
    sh,
    wait_until,
)

pytestmark = pytest.mark.integration

GUEST_VM = "55555555-5555-4555-8555-555555555555"
USERDATA = base64.b64encode(b"#cloud-config\nhostname: srv").decode()
PORT = 8080
PAYLOAD = 300_000  # bytes per transfer (client → guest), the guest answers 1/10 of it

SERVER = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT}))
s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    n = 0
    while True:
        b = c.recv(65536)
        if not b:
            break
        n += len(b)
    c.sendall(b"r" * (n // 10))
    c.close()
"""

CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c.sendall(b"x" * int(sys.argv[3]))
c.shutdown(socket.SHUT_WR)
got = 0
while True:
    b = c.recv(65536)
    if not b:
        break
    got += len(b)
c.close()
print(got)
"""


def counters(save: str, chain: str, match: str) -> tuple[int, int]:
    """(packets, bytes) of the rule of ``chain`` containing ``match`` in iptables-save -c."""
    for line in save.splitlines():
        m = re.match(r"\[(\d+):(\d+)\] -A (\S+) (.*)", line)
        if m and m.group(3) == chain and match in m.group(4):
            return int(m.group(1)), int(m.group(2))
    raise AssertionError(f"no {chain} rule with {match!r} in:\n{save}")


async def test_traffic_counted_through_the_api_across_a_reboot(
    env: Env,  # noqa: F811 - the fixture
) -> None:
    e = env
    api = e.api
    pub_ns, guest_ns = f"{e.prefix}n-pub", f"{e.prefix}n-gst"
    made: list[str] = []
    try:
        for ns_name in (pub_ns, guest_ns):
            await sh("ip", "netns", "add", ns_name)
            made.append(ns_name)
            await sh("ip", "netns", "exec", ns_name, "ip", "link", "set", "lo", "up")
        e.peer_ns = {1: pub_ns, 2: guest_ns}  # eth1 public, eth2 guest
        await _run(e, api, pub_ns, guest_ns)
    finally:
        for ns_name in made:
            pids = await sh("ip", "netns", "pids", ns_name, check=False)
            for pid in pids.split():
                await sh("kill", "-9", pid, check=False)
            await sh("ip", "netns", "del", ns_name, check=False)
        left = await sh("ip", "netns", "list")
        assert not [n for n in made if n in left], left


async def _run(e: Env, api: Any, pub_ns: str, guest_ns: str) -> None:
    # Reports every second (an agent=True setting: pushed with the routers' config).
    await api.call("updateConfiguration", name="router.stats.interval", value="1")
    net, router = await create_network(api)
    rid = router["id"]
    public_ip = router["publicip"]

    async def running() -> bool:
        return bool((await router_state(api, rid))["state"] == "Running")

    try:
        await wait_until(running, "the router to run", 60)
    except AssertionError:
        raise AssertionError("router never Running:\n" + agent_log(e.by_router.get(rid))) from None
    plan_gw = public_ip.rsplit(".", 1)[0] + ".1"

    def pub(*argv: str) -> Any:
        return sh("ip", "netns", "exec", pub_ns, *argv)

    def gst(*argv: str) -> Any:
        return sh("ip", "netns", "exec", guest_ns, *argv)

    # The public side: the zone's gateway address, and a client counting its own bytes.
    prefix = (await e.vm(rid).x("ip", "-o", "-4", "addr", "show", "dev", "eth1")).split()[3]
    await pub("ip", "addr", "add", f"{plan_gw}/{prefix.split('/')[1]}", "dev", "eth1p")
    await pub("ip", "link", "set", "eth1p", "up")
    await pub("iptables", "-A", "OUTPUT", "-d", f"{public_ip}/32", "-j", "ACCEPT")
    await pub("iptables", "-A", "INPUT", "-s", f"{public_ip}/32", "-j", "ACCEPT")
    # The guest side: a NIC on the network, a server behind a port forward.
    async with api.ctx.store.transaction() as tx:
        guest_ip = await add_guest_nic(tx, net["id"], GUEST_VM, "srv", userdata=USERDATA)
    await gst("ip", "addr", "add", f"{guest_ip}/24", "dev", "eth2p")
    await gst("ip", "link", "set", "eth2p", "up")
    await gst("ip", "route", "add", "default", "via", net["gateway"])
    server = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", guest_ns, sys.executable, "-c", SERVER,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    e.helpers.append(server)
    assert server.stdout is not None
    async with asyncio.timeout(10 * TIMING):
        assert (await server.stdout.readline()).strip() == b"listening"
    # The guest's user data and meta-data reach the real router (served to its address).
    fetch = (
        "import sys, urllib.request\n"
        "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
    )

    async def served() -> bool:
        vm = await router_state(api, rid)
        return bool(vm["appliedversion"] == vm["desiredversion"])

    await wait_until(served, "the router to apply the guest's NIC", 30)
    base = f"http://{net['gateway']}/latest"
    got = await gst(sys.executable, "-c", fetch, f"{base}/user-data")
    assert got.rstrip("\n") == base64.b64decode(USERDATA).decode()
    assert (await gst(sys.executable, "-c", fetch, f"{base}/meta-data/local-hostname")).strip() == (
        "srv"
    )
    snat = (await api.call("listPublicIpAddresses", associatednetworkid=net["id"]))[
        "publicipaddress"
    ][0]
    pf = await api.job(
        "createPortForwardingRule", ipaddressid=snat["id"], protocol="tcp", publicport=PORT,
        privateport=PORT, virtualmachineid=GUEST_VM, timeout=60,
    )  # fmt: skip
    assert pf["jobstatus"] == 1, (pf, agent_log(e.vm(rid)))

    async def transfer() -> None:
        out = await pub(sys.executable, "-c", CLIENT, public_ip, str(PORT), str(PAYLOAD))
        assert int(out) == PAYLOAD // 10

    async def client_bytes() -> tuple[tuple[int, int], tuple[int, int]]:
        save = await pub("iptables-save", "-c", "-t", "filter")
        return counters(save, "OUTPUT", public_ip), counters(save, "INPUT", public_ip)

    async def api_bytes() -> tuple[int, int, int, int]:
        n = (await api.call("listNetworks", id=net["id"]))["network"][0]
        p = (await api.call("listPublicIpAddresses", id=snat["id"]))["publicipaddress"][0]
        return n["receivedbytes"], n["sentbytes"], p["receivedbytes"], p["sentbytes"]

    async def matching() -> tuple[tuple[int, int], tuple[int, int]] | None:
        sent, received = await client_bytes()
        got = await api_bytes()
        want = (sent[1], received[1], sent[1], received[1])
        return (sent, received) if got == want else None

    async def until_matching(what: str) -> tuple[tuple[int, int], tuple[int, int]]:
        try:
            res: tuple[tuple[int, int], tuple[int, int]] = await wait_until(matching, what, 30)
        except AssertionError:
            raise AssertionError(
                f"{what}: api {await api_bytes()} client {await client_bytes()}\n"
                + agent_log(e.vm(rid))
            ) from None
        return res

    async def retransmitted(ns_name: str) -> int:
        """TCP segments this namespace sent again (/proc/net/snmp is per namespace)."""
        snmp = await sh("ip", "netns", "exec", ns_name, "cat", "/proc/net/snmp")
        names, values = [ln.split()[1:] for ln in snmp.splitlines() if ln.startswith("Tcp:")]
        return int(values[names.index("RetransSegs")])

    async def check_overhead(
        sent: tuple[int, int], received: tuple[int, int], transfers: int
    ) -> None:
        # IPv4 (20) + TCP (20, plus up to 40 of options) headers on every packet, and a
        # full segment (<= 1500 bytes on these links) for each one TCP had to send again
        # (the counters rightly count those too). Counting a transfer twice would be
        # 100,000s of bytes over.
        for (pkts, nbytes), payload, ns_name in (
            (sent, PAYLOAD, pub_ns),
            (received, PAYLOAD // 10, guest_ns),
        ):
            overhead = nbytes - transfers * payload
            again = await retransmitted(ns_name)
            assert 40 * pkts <= overhead <= 60 * pkts + 1500 * again, (pkts, nbytes, again)

    await transfer()
    sent, received = await until_matching("the first transfer's bytes in the API")
    await check_overhead(sent, received, 1)

    # rebootRouter through the API: the planned stop reports the last counters; the
    # rebooted agent resends whatever was unacknowledged (counted once).
    applied = (await router_state(api, rid))["appliedversion"]
    old_agent = e.vm(rid).agent
    await transfer()  # the reboot comes right after it: part may still be unreported
    res = await api.job("rebootRouter", id=rid, timeout=90)
    assert res["jobstatus"] == 1, (res, agent_log(e.vm(rid)))
    assert [op for op, who, _ in e.events if who == rid][-1:] == ["reboot"]
    assert old_agent is not None and old_agent.returncode == 0  # a clean, planned stop
    assert e.vm(rid).agent is not old_agent

    async def up_again() -> bool:
        r = await router_state(api, rid)
        return bool(r["agentstate"] == "Up" and r["appliedversion"] >= applied)

    await wait_until(up_again, "the rebooted router to reconnect", 60)
    await transfer()
    sent, received = await until_matching("three transfers' bytes after the reboot")
    await check_overhead(sent, received, 3)

    # 0 disables the reports: a transfer is counted by the router but not reported within
    # three of the previous intervals; turned back on, it is (nothing lost meanwhile).
    before = await api_bytes()
    version = (await router_state(api, rid))["desiredversion"]
    await api.call("updateConfiguration", name="router.stats.interval", value="0")

    async def off_applied() -> bool:
        r = await router_state(api, rid)
        return bool(r["appliedversion"] > version)

    await wait_until(off_applied, "the router to apply interval 0", 30)
    await transfer()
    observed_until = time.monotonic() + 3.0 * TIMING
    while time.monotonic() < observed_until:  # an observation window, not a wait for a state
        assert await api_bytes() == before
        await asyncio.sleep(0.25)
    await api.call("updateConfiguration", name="router.stats.interval", value="1")
    sent, received = await until_matching("the fourth transfer once reports resume")
    await check_overhead(sent, received, 4)
    assert sent[1] > before[0]
