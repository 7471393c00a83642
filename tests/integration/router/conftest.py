"""Fixtures for the router integration tests: a real topology of network namespaces and
the role running in the VR's namespace (``harness.py``) with its real daemons.

    public client (pc) 198.51.100.1 ── pub0 [VR] gst0 ── bridge (sw) ── g1, g2 (DHCP)
    management (mg) 169.254.0.1 ── ctl0 169.254.0.10 (the control NIC)

``shared_topo``: a Shared network's router (no public NIC, not the gateway)::

    [VR] gst0 10.12.0.10 ── bridge (sw) ── g1, g2 (DHCP)
                                      └─── gateway (gw) 10.12.0.1, and behind it on its
                                           loopback 100.64.12.1 (an "upstream" DNS + HTTP)
    management (mg) 169.254.0.1 ── ctl0 169.254.0.10

Everything is named with the per-run prefix + "r" ("rs" for the shared one) and removed
at teardown, even on failure.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.roles.router.proc import CommandError, run

HERE = Path(__file__).parent
PY = sys.executable
TIMING = float(os.environ.get("SYSVM_TEST_TIMING", "1"))

PUB_GW = "198.51.100.1"
SNAT_IP, STATIC_IP, LB_IP = "198.51.100.10", "198.51.100.11", "198.51.100.12"
GUEST_GW = "10.11.0.1"
G1 = ("02:00:0a:0b:00:05", "10.11.0.5", "g1")
G2 = ("02:00:0a:0b:00:06", "10.11.0.6", "g2")
CTL_IP = "169.254.0.10"
MGMT_IP = "169.254.0.1"
NAMESPACES = ("vr", "pc", "sw", "g1", "g2", "mg")
DOMAIN = "test.internal"

# The Shared network: the provider's gateway is not the router.
SH_GW = "10.12.0.1"
SH_ME = "10.12.0.10"  # the router's own address in the range
SH_CIDR = "10.12.0.0/24"
S1 = ("02:00:0a:0c:00:05", "10.12.0.5", "s1")
S2 = ("02:00:0a:0c:00:06", "10.12.0.6", "s2")
BEHIND = "100.64.12.1"  # an address reachable only through the gateway
SHARED_NAMESPACES = ("vr", "sw", "g1", "g2", "gw", "mg")


def shared_config() -> dict[str, Any]:
    """What the manager renders for a Shared network's router: no public side at all."""
    return {
        "router": {
            "interfaces": {
                "control": {"device": "ctl0", "ip": CTL_IP, "prefix": 16},
                "guest": {"device": "gst0", "gateway": SH_GW, "cidr": SH_CIDR, "address": SH_ME},
            },
            "domain": DOMAIN,
            "dns_servers": [BEHIND],
            "egress": {"default": "allow", "rules": []},
            "firewall": [],
            "port_forwarding": [],
            "static_nat": [],
            "load_balancers": [],
            "dhcp": [{"mac": m, "ip": ip, "hostname": h} for m, ip, h in (S1, S2)],
            "vm_data": [
                {
                    "guest_ip": S1[1],
                    "user_data": base64.b64encode(b"#cloud-config\nhostname: s1\n").decode(),
                    "meta_data": {"instance-id": "i-s1"},
                },
                {
                    "guest_ip": S2[1],
                    "user_data": base64.b64encode(b"s2 data").decode(),
                    "meta_data": {"instance-id": "i-s2"},
                },
            ],
            "stats": {"interval": 0},
        }
    }


def base_config() -> dict[str, Any]:
    return {
        "router": {
            "interfaces": {
                "control": {"device": "ctl0", "ip": CTL_IP, "prefix": 16},
                "public": {
                    "device": "pub0",
                    "ips": [SNAT_IP, STATIC_IP, LB_IP],
                    "prefix": 24,
                    "gateway": PUB_GW,
                },
                "guest": {"device": "gst0", "gateway": GUEST_GW, "cidr": "10.11.0.0/24"},
            },
            "domain": DOMAIN,
            "dns_servers": [],
            "firewall": [
                {"public_ip": STATIC_IP, "protocol": "tcp", "ports": "8000"},
                {"public_ip": LB_IP, "protocol": "tcp", "ports": [8080, 8080]},
                {"public_ip": LB_IP, "protocol": "tcp", "ports": 80},
                {"public_ip": LB_IP, "protocol": "icmp", "icmp_type": "echo-request"},
            ],
            "egress": {"default": "allow"},
            "port_forwarding": [
                {
                    "public_ip": LB_IP,
                    "protocol": "tcp",
                    "public_ports": 8080,
                    "guest_ip": G1[1],
                    "guest_ports": 8000,
                }
            ],
            "static_nat": [{"public_ip": STATIC_IP, "guest_ip": G2[1]}],
            "source_nat": SNAT_IP,
            "load_balancers": [
                {
                    "name": "web",
                    "public_ip": LB_IP,
                    "public_port": 80,
                    "algorithm": "roundrobin",
                    "members": [{"ip": G1[1], "port": 8000}, {"ip": G2[1], "port": 8000}],
                }
            ],
            "dhcp": [{"mac": m, "ip": ip, "hostname": h} for m, ip, h in (G1, G2)],
            "dns_entries": [{"name": "files.test.internal", "ip": "10.11.0.99"}],
            "vm_data": [
                {
                    "guest_ip": G1[1],
                    "user_data": base64.b64encode(b"#cloud-config\nhostname: g1\n").decode(),
                    "meta_data": {"instance-id": "i-g1", "local-hostname": "g1"},
                },
                {
                    "guest_ip": G2[1],
                    "user_data": base64.b64encode(b"g2 data").decode(),
                    "meta_data": {"instance-id": "i-g2"},
                },
            ],
            "stats": {"interval": 0},
        }
    }


async def sh(
    *argv: str, timeout: float = 20.0, check: bool = True, input: str | None = None
) -> str:
    data = input.encode() if input is not None else None
    res = await run(list(argv), input=data, limit=timeout * TIMING, check=check)
    return res.stdout.decode()


async def wait_for(cond: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout * TIMING
    while True:
        if await cond():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Topology:
    prefix: str
    tmp: Path
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    namespaces: tuple[str, ...] = NAMESPACES

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    async def x(self, ns: str, *argv: str, timeout: float = 20.0, check: bool = True) -> str:
        return await sh("ip", "netns", "exec", self.ns(ns), *argv, timeout=timeout, check=check)

    async def spawn(self, ns: str, *argv: str) -> asyncio.subprocess.Process:
        p = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            self.ns(ns),
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    async def curl(self, ns: str, url: str, *extra: str, timeout: float = 3.0) -> str:
        return await self.x(
            ns,
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            str(timeout * TIMING),
            *extra,
            url,
            timeout=timeout + 5,
        )

    async def reachable(self, ns: str, url: str, timeout: float = 1.0) -> bool:
        try:
            await self.curl(ns, url, timeout=timeout)
        except CommandError:
            return False
        return True


async def _wire(t: Topology, links: list[str], ports: tuple[str, ...]) -> None:
    """Namespaces, the veth ``links`` (``ip link add ...`` lines), the management side
    (``mg`` with MGMT_IP), the switch ``sw`` bridging ``ports``, and ``eth0``/``lo`` up in
    every other namespace that has an ``eth0``."""
    for n in t.namespaces:
        await sh("ip", "netns", "add", t.ns(n))
    for line in links:
        await sh("ip", *line.split())
    await t.x("mg", "ip", "addr", "add", f"{MGMT_IP}/16", "dev", "eth0")
    await t.x("mg", "ip", "link", "set", "eth0", "up")
    await t.x("vr", "ip", "link", "set", "lo", "up")
    await t.x("sw", "ip", "link", "add", "br0", "type", "bridge")
    await t.x("sw", "ip", "link", "set", "br0", "up")
    for dev in ports:
        await t.x("sw", "ip", "link", "set", dev, "master", "br0")
        await t.x("sw", "ip", "link", "set", dev, "up")
    for n in t.namespaces:
        if n not in ("vr", "sw", "mg"):
            await t.x(n, "ip", "link", "set", "eth0", "up")
            await t.x(n, "ip", "link", "set", "lo", "up")


async def _build(prefix: str, tmp: Path) -> Topology:
    t = Topology(prefix=prefix, tmp=tmp)
    links = [
        f"link add pub0 netns {t.ns('vr')} type veth peer name eth0 netns {t.ns('pc')}",
        f"link add gst0 netns {t.ns('vr')} type veth peer name p-vr netns {t.ns('sw')}",
        f"link add eth0 netns {t.ns('g1')} address {G1[0]} type veth"
        f" peer name p-g1 netns {t.ns('sw')}",
        f"link add eth0 netns {t.ns('g2')} address {G2[0]} type veth"
        f" peer name p-g2 netns {t.ns('sw')}",
        f"link add ctl0 netns {t.ns('vr')} type veth peer name eth0 netns {t.ns('mg')}",
    ]
    await _wire(t, links, ("p-vr", "p-g1", "p-g2"))
    await t.x("pc", "ip", "addr", "add", f"{PUB_GW}/24", "dev", "eth0")
    return t


async def _build_shared(prefix: str, tmp: Path) -> Topology:
    t = Topology(prefix=prefix, tmp=tmp, namespaces=SHARED_NAMESPACES)
    links = [
        f"link add gst0 netns {t.ns('vr')} type veth peer name p-vr netns {t.ns('sw')}",
        f"link add eth0 netns {t.ns('g1')} address {S1[0]} type veth"
        f" peer name p-g1 netns {t.ns('sw')}",
        f"link add eth0 netns {t.ns('g2')} address {S2[0]} type veth"
        f" peer name p-g2 netns {t.ns('sw')}",
        f"link add eth0 netns {t.ns('gw')} type veth peer name p-gw netns {t.ns('sw')}",
        f"link add ctl0 netns {t.ns('vr')} type veth peer name eth0 netns {t.ns('mg')}",
    ]
    await _wire(t, links, ("p-vr", "p-g1", "p-g2", "p-gw"))
    await t.x("gw", "ip", "addr", "add", f"{SH_GW}/24", "dev", "eth0")
    await t.x("gw", "ip", "addr", "add", f"{BEHIND}/32", "dev", "lo")
    return t


async def _teardown(t: Topology) -> None:
    for p in t.procs:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await p.wait()
    for n in t.namespaces:
        # Kill anything left in the namespace (daemons of a hard-killed harness).
        pids = await sh("ip", "netns", "pids", t.ns(n), check=False)
        for pid in pids.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        await sh("ip", "netns", "del", t.ns(n), check=False)


@contextlib.asynccontextmanager
async def _topology(
    prefix: str,
    build: Callable[[str, Path], Awaitable[Topology]],
    namespaces: tuple[str, ...],
) -> AsyncIterator[Topology]:
    for tool in ("busybox", "dnsmasq", "haproxy", "apache2", "dig", "curl", "ssh"):
        if shutil.which(tool) is None:  # fail loudly, never skip
            raise RuntimeError(
                f"{tool} missing: apt-get install busybox dnsmasq haproxy "
                "apache2 openssh-server openssh-client bind9-dnsutils curl"
            )
    tmp = Path(tempfile.mkdtemp(prefix=f"sysvm-{prefix}-", dir="/run"))
    os.chmod(tmp, 0o755)
    t: Topology | None = None
    try:
        t = await build(prefix, tmp)
        yield t
    finally:
        if t is not None:
            await _teardown(t)
        else:
            for n in namespaces:
                await sh("ip", "netns", "del", f"{prefix}-{n}", check=False)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
async def topo(netns_prefix: str) -> AsyncIterator[Topology]:
    async with _topology(f"{netns_prefix}r", _build, NAMESPACES) as t:
        yield t


@pytest.fixture
async def shared_topo(netns_prefix: str) -> AsyncIterator[Topology]:
    async with _topology(f"{netns_prefix}rs", _build_shared, SHARED_NAMESPACES) as t:
        yield t


class Harness:
    """The role running under ``ip netns exec <vr>``; see harness.py."""

    def __init__(self, topo: Topology, proc: asyncio.subprocess.Process) -> None:
        self.topo = topo
        self.proc = proc
        self.requests: list[dict[str, Any]] = []
        self.ack = True

    @classmethod
    async def spawn(cls, topo: Topology) -> Harness:
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            topo.ns("vr"),
            PY,
            str(HERE / "harness.py"),
            "--state-dir",
            str(topo.tmp / "state"),
            "--run-dir",
            str(topo.tmp / "run"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 24,
            start_new_session=True,
        )
        topo.procs.append(proc)
        return cls(topo, proc)

    async def call(self, op: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        async with asyncio.timeout(timeout * TIMING):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"harness exited (code {await self.proc.wait()})")
                msg: dict[str, Any] = json.loads(line)
                if "request" in msg:
                    self.requests.append(msg)
                    ids = [b["id"] for b in msg["params"].get("batches", [])]
                    reply = {"op": "reply", "ok": self.ack, "result": {"acked": ids}}
                    if not self.ack:
                        reply["error"] = "manager says no"
                    self.proc.stdin.write((json.dumps(reply) + "\n").encode())
                    await self.proc.stdin.drain()
                    continue
                return msg

    async def apply(self, config: dict[str, Any]) -> dict[str, Any]:
        return await self.call("apply", config=config)

    async def stop(self) -> None:
        res = await self.call("stop")
        assert res["ok"], res
        async with asyncio.timeout(10 * TIMING):
            assert await self.proc.wait() == 0


async def dhcp(topo: Topology, guest: str) -> dict[str, str]:
    """A real DHCP exchange (busybox udhcpc) from ``guest``; returns the lease it got."""
    out = topo.tmp / f"lease-{guest}"
    await sh(
        "ip",
        "netns",
        "exec",
        topo.ns(guest),
        "env",
        f"LEASE_OUT={out}",
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-f",
        "-q",
        "-n",
        "-t",
        "5",
        "-T",
        "1",
        "-s",
        str(HERE / "udhcpc_hook.py"),
        timeout=20,
    )
    lease = dict(line.split("=", 1) for line in out.read_text().splitlines())
    return lease
