"""A virtual router booted from the image serves a guest network, and keeps serving it
across every kind of reboot.

A real ``sysvm-manager`` (lifecycle loop on, embedded hypervisor: the image in
``systemd-nspawn``) is driven through its CloudStack API with signed requests (``cs``).
``createNetwork`` boots the network's router with its three NICs::

    host ── control bridge 169.254.N.1/24 ── eth0 169.254.N.x   [router: the image]
         ── public bridge  P.1/24 (gateway) ── eth1 P.s (source NAT), P.x (associated)
                            └── [pub] eth0 P.254: the "public client"
            guest bridge (no host address) ── eth2 10.x.y.1 (the guests' gateway)
                            └── [gst] eth0 with the MAC of the guest VM's NIC

The guest namespace plays the guest VM ``deployVirtualMachine`` recorded on the network: it
gets its lease from the router's dnsmasq (busybox udhcpc), resolves its own name through
the router's DNS and runs a tiny HTTP service, which the public client reaches through a
port forwarding rule on an associated public IP (the service sees the client's address);
the guest reaches the public client by source NAT (the client sees the source NAT IP).

Then the same traffic must work again after
(a) a reboot from inside the router (``systemctl reboot``: nspawn exits 133, the driver boots
    it again on a fresh network namespace) — checked while the host refuses the router's
    connections to the manager, so what serves is only what the router put back from its
    own disk, never a push;
(b) a hard reset (the container's PID 1 killed, then nspawn itself killed, which leaves its
    container running orphaned): the manager's lifecycle loop boots it again;
(c) ``rebootRouter`` through the API.
Finally ``deleteNetwork`` destroys the router and its guest bridge goes with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import json
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cs import CloudStack, CloudStackApiException

from manager.hypervisor.base import bridge_name, guest_bridge_name, netns_name, veth_name
from manager.hypervisor.cleanup import cleanup_all
from manager.hypervisor.hostvm import proc_start_time
from tests.system.helpers import (
    TIMING_FACTOR,
    delete_netns,
    free_port_any,
    manager_argv,
    netns_on_bridge,
    read,
    sh,
    spawn_in_netns,
    start_manager,
    wait_for,
)

pytestmark = pytest.mark.system
BOOT_TIMEOUT = 120.0  # failure bound; a router boots and applies in seconds
GUEST_PORT, PUBLIC_PORT, CLIENT_PORT = 8000, 8080, 9000

SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{sys.argv[1]} {self.client_address[0]}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer((sys.argv[2], int(sys.argv[3])), H).serve_forever()
"""

UDHCPC_HOOK = """#!/usr/bin/python3
import os, subprocess, sys
event = sys.argv[1] if len(sys.argv) > 1 else ""
dev = os.environ.get("interface", "eth0")
if event == "deconfig":
    subprocess.run(["ip", "addr", "flush", "dev", dev], check=True, timeout=10)
elif event in ("bound", "renew"):
    subprocess.run(["ip", "addr", "flush", "dev", dev], check=True, timeout=10)
    subprocess.run(["ip", "addr", "add", os.environ["ip"] + "/" + os.environ.get("mask", "24"),
                    "dev", dev], check=True, timeout=10)
    gw = os.environ.get("router", "").split()
    if gw:
        subprocess.run(["ip", "route", "replace", "default", "via", gw[0]], check=True, timeout=10)
    with open(os.environ["LEASE_OUT"], "w") as f:
        for k in ("ip", "mask", "router", "dns", "domain", "lease"):
            f.write(k + "=" + os.environ.get(k, "") + "\\n")
"""


def zone_networks() -> tuple[str, str]:
    """This run's control /24 and public /24 (never 192.0.2.0/24, the host's uplink): apart
    from the other system tests' (control 169.254.10-199, public 100.64-127.0-249)."""
    pid = os.getpid()
    return f"169.254.{200 + pid % 50}.0/24", f"100.{64 + pid % 32}.{250 + (pid // 32) % 5}.0/24"


class Api:
    """A ``cs`` client for the manager's API (signed requests), sync calls in a thread."""

    def __init__(self, home: Path) -> None:
        creds = json.loads((home / "credentials.json").read_text())
        self.client = CloudStack(
            endpoint=creds["endpoint"], key=creds["apikey"], secret=creds["secretkey"], timeout=30
        )

    async def call(self, command: str, **params: Any) -> Any:
        return await asyncio.to_thread(getattr(self.client, command), **params)

    async def job(self, command: str, timeout: float = 180, **params: Any) -> dict[str, Any]:
        """An async command, then queryAsyncJobResult until it is done; must succeed."""
        started = await self.call(command, **params)
        deadline = time.monotonic() + timeout * TIMING_FACTOR
        while True:
            res: dict[str, Any] = await self.call("queryAsyncJobResult", jobid=started["jobid"])
            if res["jobstatus"] != 0:
                assert res["jobstatus"] == 1, f"{command} failed: {res}"
                result: dict[str, Any] = res.get("jobresult", {})
                return result
            assert time.monotonic() < deadline, f"{command} still pending after {timeout} s"
            await asyncio.sleep(0.1)

    async def router(self, router_id: str) -> dict[str, Any]:
        r: dict[str, Any] = (await self.call("listRouters", id=router_id))["router"][0]
        return r

    async def running(self, router_id: str, mlog: Path) -> dict[str, Any] | None:
        """The router once Running, connected and on its desired config; fails at once if
        the manager logged that a router refused its config."""
        failed = [ln for ln in read(mlog).splitlines() if "event=router_apply_failed" in ln]
        assert not failed, f"the router refused its config: {failed[-1]}"
        r = await self.router(router_id)
        up = r["state"] == "Running" and r["agentstate"] == "Up"
        return r if up and r["appliedversion"] == r["desiredversion"] >= 1 else None


class Topology:
    """The namespaces around the router and the way to check its traffic."""

    def __init__(self, prefix: str, tmp: Path) -> None:
        self.guest_ns, self.public_ns = f"{prefix}-gst", f"{prefix}-pub"
        self.tmp = tmp
        self.procs: list[asyncio.subprocess.Process] = []
        self.hook = tmp / "udhcpc-hook"
        self.hook.write_text(UDHCPC_HOOK)
        self.hook.chmod(0o755)
        self.last_error = ""

    async def curl(self, ns: str, url: str) -> str:
        return await sh("ip", "netns", "exec", ns, "curl", "-sS", "--fail", "--noproxy", "*",
                        "--max-time", "3", url, timeout=10)  # fmt: skip

    async def dhcp(self) -> dict[str, str]:
        out = self.tmp / "lease"
        out.unlink(missing_ok=True)
        await sh("ip", "netns", "exec", self.guest_ns, "env", f"LEASE_OUT={out}",
                 "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1",
                 "-s", str(self.hook), timeout=20)  # fmt: skip
        return dict(line.split("=", 1) for line in out.read_text().splitlines())

    async def dig(self, server: str, name: str) -> str:
        out = await sh("ip", "netns", "exec", self.guest_ns, "dig", "+short", "+time=1",
                       "+tries=2", f"@{server}", name, timeout=10)  # fmt: skip
        return out.strip()

    async def serves(self, *, gateway: str, guest: tuple[str, str], forward_ip: str,
                     snat_ip: str, client_ip: str, domain: str) -> bool:  # fmt: skip
        """Port forwarding in, source NAT out, DNS and DHCP from the router; False (and
        ``last_error``) on the first thing that does not work yet."""
        name, ip = guest
        checks: list[tuple[str, Callable[[], Any], str]] = [
            ("port forward", lambda: self.curl(self.public_ns, f"http://{forward_ip}:{PUBLIC_PORT}/"),
             f"{name} {client_ip}\n"),
            ("source NAT", lambda: self.curl(self.guest_ns, f"http://{client_ip}:{CLIENT_PORT}/"),
             f"outside {snat_ip}\n"),
            ("dns", lambda: self.dig(gateway, f"{name}.{domain}"), ip),
            ("meta-data", lambda: self.curl(self.guest_ns,
                                            f"http://{gateway}/latest/meta-data/local-hostname"),
             name),
        ]  # fmt: skip
        return await self.check(checks)

    async def check(self, checks: list[tuple[str, Callable[[], Any], str]]) -> bool:
        """Each ``(what, fn, want)``: ``await fn() == want``; False (and ``last_error``) on
        the first that does not hold yet."""
        for what, fn, want in checks:
            try:
                got = await fn()
            except AssertionError as e:
                self.last_error = f"{what}: {e}"
                return False
            if got != want:
                self.last_error = f"{what}: {got!r} != {want!r}"
                return False
        return True

    async def close(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                await p.wait()
        for ns in (self.guest_ns, self.public_ns):
            await delete_netns(ns)


def run_json(home: Path, vm_id: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(
            (home / "vms" / "nspawn" / vm_id / "run.json").read_text()
        )
    except (FileNotFoundError, ValueError):
        return {}
    return data


async def in_vm(home: Path, vm_id: str, *argv: str, check: bool = True) -> str:
    leader = run_json(home, vm_id).get("leader")
    assert isinstance(leader, int), f"router {vm_id} has no running container"
    return await sh("nsenter", "-t", str(leader), "-a", *argv, timeout=30, check=check)


async def addresses(home: Path, vm_id: str) -> dict[str, list[str]]:
    out = json.loads(await in_vm(home, vm_id, "ip", "-j", "-4", "addr", "show"))
    return {
        i["ifname"]: sorted(f"{a['local']}/{a['prefixlen']}" for a in i["addr_info"]) for i in out
    }


async def macs(home: Path, vm_id: str) -> dict[str, str]:
    out = json.loads(await in_vm(home, vm_id, "ip", "-j", "link", "show"))
    return {i["ifname"]: i.get("address", "") for i in out}


async def neighbour(ns: str, ip: str, want: str | None = None) -> str | bool:
    """The MAC ``ns`` has for ``ip`` in its ARP cache ("" if none); with ``want``: whether
    it is that one."""
    out = json.loads(await sh("ip", "-n", ns, "-j", "neigh", "show", ip) or "[]")
    mac = str(out[0].get("lladdr", "")) if out else ""
    return mac == want if want is not None else mac


@dataclasses.dataclass
class Zone:
    """A running manager whose zone has this run's control and public networks."""

    api: Api
    home: Path
    mlog: Path
    public: ipaddress.IPv4Network
    agent_port: int


@contextlib.asynccontextmanager
async def zone_manager(
    tmp_path: Path,
    host_prefix: str,
    sysvm_image: Path,
    api_port: int,
    timings: dict[str, float],
    on_exit: list[Callable[[], Awaitable[Any]]],
) -> AsyncIterator[Zone]:
    """A real ``sysvm-manager`` (lifecycle loop on, the image in nspawn) with this run's
    zone networks; on exit (``on_exit`` first, e.g. the test's namespaces) it is stopped
    with SIGTERM, must exit 0 and leave no process, mount, namespace or VM port behind."""
    control_cidr, public_cidr = zone_networks()
    control = ipaddress.ip_network(control_cidr)
    host_ip = str(control.network_address + 1)
    agent_port = free_port_any()
    home = tmp_path / "home"
    mlog = tmp_path / "manager.log"
    env = {
        **os.environ,
        "SYSVM_AGENT_URLS": f"wss://{host_ip}:{agent_port}",
        "SYSVM_HOST_PREFIX": host_prefix,
        "SYSVM_IMAGE": str(sysvm_image),
        "SYSVM_LOG_LEVEL": "INFO",
        "SYSVM_LIFECYCLE_INTERVAL": "1",
    }
    env.pop("SYSVM_LIFECYCLE", None)
    argv = manager_argv(home, api_port, agent_port)
    mgr: asyncio.subprocess.Process | None = None
    try:
        # first start without the loop: bootstrap, then give the zone this run's networks
        mgr = await start_manager(argv, mlog, env)
        await wait_for(lambda: "event=manager_ready" in read(mlog), 30, "manager ready")
        mgr.terminate()
        assert await asyncio.wait_for(mgr.wait(), 60) == 0
        with sqlite3.connect(home / "sysvm.db") as db:
            db.execute("UPDATE zones SET linklocal_cidr = ?, public_cidr = ?",
                       (control_cidr, public_cidr))  # fmt: skip
        mark = len(read(mlog))
        mgr = await start_manager(argv, mlog, {**env, "SYSVM_LIFECYCLE": "on"})
        await wait_for(lambda: "event=manager_ready" in read(mlog)[mark:], 30, "manager ready")
        yield Zone(Api(home), home, mlog, ipaddress.ip_network(public_cidr), agent_port)
    finally:
        for fn in on_exit:
            await fn()
        if mgr is not None and mgr.returncode is None:
            mgr.terminate()
            await asyncio.wait_for(mgr.wait(), 90)
        print(read(mlog)[-3000:])
        print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    assert mgr.returncode == 0
    # the manager stopped its VMs: no process, mount, namespace or VM port is left; only the
    # zone bridges (by design), which the host_prefix fixture then removes
    rep = await cleanup_all(host_prefix)
    assert rep.processes == [] and rep.mounts == [] and rep.netns == [] and rep.cgroups == [], rep
    assert all(x[len(host_prefix)] == "b" for x in rep.links), rep


def container_limits(pid: int) -> tuple[int, int]:
    """(memory MiB, CPUs) the kernel enforces on the process, read from its own cgroups
    (v1 memory and cpu hierarchies, or v2), not from what the manager recorded."""
    own: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _h, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            own[c] = path.lstrip("/")
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        d = root / own[""]
        memory = int((d / "memory.max").read_text())
        quota, period = map(int, (d / "cpu.max").read_text().split())
    else:
        memory = int((root / "memory" / own["memory"] / "memory.limit_in_bytes").read_text())
        cpu = root / "cpu" / own["cpu"]
        quota = int((cpu / "cpu.cfs_quota_us").read_text())
        period = int((cpu / "cpu.cfs_period_us").read_text())
    return memory // (1024 * 1024), quota // period


@pytest.mark.parametrize("host_prefix", ["r"], indirect=True)
async def test_router_from_image_serves_and_survives_reboots(
    tmp_path: Path, host_prefix: str, sysvm_image: Path, free_port: Callable[[], int]
) -> None:
    topo = Topology(host_prefix, tmp_path)
    block: list[str] = []  # the host firewall rule of step (a), while it is in place
    timings: dict[str, float] = {}

    async def unblock() -> None:
        if block:
            await sh("iptables", "-w", "10", "-D", *block, check=False)

    async with zone_manager(tmp_path, host_prefix, sysvm_image, free_port(), timings,
                            [unblock, topo.close]) as z:  # fmt: skip
        await _scenario(z.api, z.home, z.mlog, host_prefix, topo, block, z.public,
                        z.agent_port, timings)  # fmt: skip


async def _scenario(
    api: Api,
    home: Path,
    mlog: Path,
    prefix: str,
    topo: Topology,
    block: list[str],
    public: ipaddress.IPv4Network,
    agent_port: int,
    timings: dict[str, float],
) -> None:
    t_all = time.monotonic()
    zone = (await api.call("listZones"))["zone"][0]
    offerings = (await api.call("listNetworkOfferings", guestiptype="Isolated"))["networkoffering"]
    offering = next(o for o in offerings if "SourceNat" in {s["name"] for s in o["service"]})
    domain = "r1.internal"

    # ---- createNetwork: its router boots from the image, with its NICs, and applies
    t0 = time.monotonic()
    net = (
        await api.call("createNetwork", name="rnet", displaytext="rnet", zoneid=zone["id"],
                       networkofferingid=offering["id"], networkdomain=domain)
    )["network"]  # fmt: skip
    routers = (await api.call("listRouters", networkid=net["id"]))["router"]
    assert len(routers) == 1
    rid = routers[0]["id"]

    def router_running() -> Awaitable[dict[str, Any] | None]:
        return api.running(rid, mlog)

    router = await wait_for(router_running, BOOT_TIMEOUT, "the network's router Running")
    timings["createNetwork -> router Running"] = time.monotonic() - t0
    gateway, snat_ip = net["gateway"], router["publicip"]
    guest_cidr = ipaddress.ip_network(net["cidr"])
    assert ipaddress.ip_address(snat_ip) in public
    assert ipaddress.ip_address(router["linklocalip"]) in ipaddress.ip_network(zone_networks()[0])

    guest_bridge = guest_bridge_name(prefix, net["id"])
    public_bridge = bridge_name(prefix, zone["id"], "public")
    control_bridge = bridge_name(prefix, zone["id"], "control")
    addrs = await addresses(home, rid)
    assert addrs["eth0"] == [f"{router['linklocalip']}/24"], addrs
    assert addrs["eth1"] == [f"{snat_ip}/{public.prefixlen}"], addrs
    assert addrs["eth2"] == [f"{gateway}/{guest_cidr.prefixlen}"], addrs
    route = await in_vm(home, rid, "ip", "-4", "route", "show", "default")
    assert f"via {public.network_address + 1} dev eth1" in route, route
    # the guest bridge: the router's eth2 is a port of it, the host has no address on it
    bridge_addrs = json.loads(await sh("ip", "-j", "addr", "show", "dev", guest_bridge))
    assert [a for a in bridge_addrs[0]["addr_info"] if a["family"] == "inet"] == [], bridge_addrs
    ports = json.loads(await sh("ip", "-j", "link", "show", "master", guest_bridge))
    assert [p["ifname"] for p in ports] == [veth_name(prefix, rid, 2)], ports
    # sized by its service offering
    so = await api.call("listServiceOfferings", issystem="true", id=router["serviceofferingid"])
    spec = json.loads((home / "vms" / "nspawn" / rid / "spec.json").read_text())
    offering_size = (
        int(so["serviceoffering"][0]["memory"]),
        int(so["serviceoffering"][0]["cpunumber"]),
    )
    assert (spec["memory_mb"], spec["cpus"]) == offering_size, spec
    # the boot data lists all three NICs (what sysvm-netcfg applies under QEMU)
    boot = json.loads(await in_vm(home, rid, "cat", "/etc/sysvm/bootdata.json"))
    assert [(n["name"], n["kind"]) for n in boot["extra"]["nics"]] == [
        ("eth0", "control"), ("eth1", "public"), ("eth2", "guest")]  # fmt: skip

    # ---- a guest VM on the network; the guest namespace carries its NIC's MAC
    vm = (await api.job("deployVirtualMachine", zoneid=zone["id"], networkids=net["id"],
                        name="web1"))["virtualmachine"]  # fmt: skip
    nic = vm["nic"][0]
    guest = ("web1", nic["ipaddress"])
    assert ipaddress.ip_address(guest[1]) in guest_cidr
    # a second public IP for the network, forwarded to the guest's service
    assoc = await api.job("associateIpAddress", networkid=net["id"])
    forward_ip = assoc["ipaddress"]["ipaddress"]
    await api.job("createPortForwardingRule", ipaddressid=assoc["ipaddress"]["id"],
                  protocol="tcp", publicport=PUBLIC_PORT, privateport=GUEST_PORT,
                  virtualmachineid=vm["id"])  # fmt: skip
    client_ip = str(public.broadcast_address - 1)  # the pool hands out from the bottom

    await netns_on_bridge(topo.guest_ns, f"{prefix}xg", guest_bridge, mac=nic["macaddress"])
    await netns_on_bridge(topo.public_ns, f"{prefix}xp", public_bridge,
                          address=f"{client_ip}/{public.prefixlen}")  # fmt: skip
    lease = await topo.dhcp()
    assert lease["ip"] == guest[1] and lease["router"] == gateway, lease
    assert lease["dns"] == gateway and lease["domain"] == domain, lease
    assert await topo.dig(gateway, "web1") == guest[1]
    topo.procs.append(await spawn_in_netns(topo.guest_ns, "python3", "-c", SERVER, "web1",
                                           "0.0.0.0", str(GUEST_PORT)))  # fmt: skip
    topo.procs.append(await spawn_in_netns(topo.public_ns, "python3", "-c", SERVER, "outside",
                                           client_ip, str(CLIENT_PORT)))  # fmt: skip
    want = {"gateway": gateway, "guest": guest, "forward_ip": forward_ip, "snat_ip": snat_ip,
            "client_ip": client_ip, "domain": domain}  # fmt: skip

    async def serves() -> bool:
        return await topo.serves(**want)

    async def serving(what: str, timeout: float = 60) -> None:
        try:
            await wait_for(serves, timeout, what, interval=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}: {topo.last_error}") from None

    await serving("the router to serve the guest network")
    addrs = await addresses(home, rid)
    assert addrs["eth1"] == sorted([f"{snat_ip}/24", f"{forward_ip}/24"]), addrs
    timings["first traffic"] = time.monotonic() - t0

    def connects() -> int:
        return read(mlog).count(f"event=agent_connected vm={rid}")

    netns_path = Path("/run/netns") / netns_name(prefix, rid)

    # ---- (a) reboot from inside, with the manager out of reach
    # new connections only (SYN): the old session still ends normally, as the VM goes down
    block[:] = ["INPUT", "-i", control_bridge, "-s", router["linklocalip"], "-p", "tcp",
                "--syn", "--dport", str(agent_port), "-j", "REJECT"]  # fmt: skip
    block += ["--reject-with", "tcp-reset"]
    await sh("iptables", "-w", "10", "-I", *block)
    desired = (await api.router(rid))["desiredversion"]
    # a mark of this boot's network stack that the router itself never makes
    marker = ["dev", "lo", "label", "lo:svmtest"]
    await sh("ip", "-n", netns_path.name, "addr", "add", "10.254.254.254/32", *marker)
    before = (run_json(home, rid)["leader"], connects())
    t0 = time.monotonic()
    await in_vm(home, rid, "systemctl", "reboot", check=False)

    def rebooted() -> bool:
        leader = run_json(home, rid).get("leader")
        return isinstance(leader, int) and leader != before[0]

    await wait_for(rebooted, 60, "the router's container to boot again after its reboot")
    await serving("the router to serve again after a reboot from inside")
    timings["(a) reboot from inside -> serving"] = time.monotonic() - t0
    # a new container on a new network namespace (no rule of the old boot survived), its
    # addresses beyond the boot data's put back by the router itself: it never reached the
    # manager, which therefore pushed nothing
    lo = await sh("ip", "-n", netns_path.name, "-4", "addr", "show", "dev", "lo")
    assert "10.254.254.254" not in lo, lo
    assert (await addresses(home, rid))["eth1"] == sorted([f"{snat_ip}/24", f"{forward_ip}/24"])

    async def reapplied() -> bool:
        journal = await in_vm(home, rid, "journalctl", "-b", "-u", "sysvm-agent", "--no-pager")
        return "event=router_boot_reapplied" in journal

    await wait_for(reapplied, 60, "the router's own re-apply at boot to complete", interval=0.2)
    assert connects() == before[1], "the router reached the manager during the block"
    assert (await api.router(rid))["agentstate"] == "Disconnected"
    lease = await topo.dhcp()
    assert lease["ip"] == guest[1] and lease["router"] == gateway, lease
    await sh("iptables", "-w", "10", "-D", *block)
    block.clear()
    r = await wait_for(router_running, BOOT_TIMEOUT, "the router to reconnect")
    assert r["desiredversion"] == desired and connects() == before[1] + 1
    timings["(a) -> reconnected"] = time.monotonic() - t0

    # the loop took the reboot for what it is (the driver said running throughout)
    assert (await api.call("listEvents", type="ROUTER.RESTART")).get("event", []) == []

    # ---- (b) hard reset: the container's PID 1 killed; the lifecycle loop boots it again
    leader = run_json(home, rid)["leader"]
    t0 = time.monotonic()
    os.kill(leader, signal.SIGKILL)

    async def restarted() -> bool:
        events = (await api.call("listEvents", type="ROUTER.RESTART")).get("event", [])
        return any(e["resourceid"] == rid for e in events)

    await wait_for(restarted, 30, "the lifecycle loop to restart the killed router")
    alerts = (await api.call("listAlerts", name="ALERT.SERVICE.DOMAINROUTER")).get("alert", [])
    assert any(router["name"] in a["subject"] for a in alerts), alerts
    await wait_for(lambda: run_json(home, rid).get("leader") not in (None, leader), 60,
                   "a new container for the killed router")  # fmt: skip
    await serving("the router to serve again after a hard reset")
    await wait_for(router_running, BOOT_TIMEOUT, "the router Running again after the reset")
    timings["(b) hard reset -> serving"] = time.monotonic() - t0

    # ---- (b') hard reset of the hypervisor side: nspawn itself killed (its container would
    # live on, orphaned): the loop kills the orphan and boots the router again
    run = run_json(home, rid)
    t0 = time.monotonic()
    os.kill(run["pid"], signal.SIGKILL)
    await wait_for(lambda: run_json(home, rid).get("leader") not in (None, run["leader"]), 60,
                   "a new container after nspawn was killed")  # fmt: skip
    # dead (at most a zombie until the host's PID 1 reaps it), killed by the driver
    assert proc_start_time(run["leader"]) is None, "the orphaned container lives on"
    assert f"event=vm_orphan_killed driver=nspawn vm={rid}" in read(mlog)
    await serving("the router to serve again after nspawn was killed")
    await wait_for(router_running, BOOT_TIMEOUT, "the router Running again after the kill")
    timings["(b') nspawn killed -> serving"] = time.monotonic() - t0

    # ---- (c) rebootRouter through the API
    leader = run_json(home, rid)["leader"]
    t0 = time.monotonic()
    res = await api.job("rebootRouter", id=rid)
    assert res["router"]["state"] == "Running", res
    assert run_json(home, rid)["leader"] != leader
    await serving("the router to serve again after rebootRouter")
    timings["(c) rebootRouter -> serving"] = time.monotonic() - t0
    lease = await topo.dhcp()
    assert lease["ip"] == guest[1], lease

    # ---- (d) restartNetwork cleanup=true: a new router takes over the same addresses and
    # announces them, so the guest and the public client switch to it at once instead of
    # black-holing traffic until their ARP entries for the old router expire
    old_macs = await macs(home, rid)
    await serving("the router to serve before its replacement")  # fills both ARP caches
    assert await neighbour(topo.guest_ns, gateway) == old_macs["eth2"]
    assert await neighbour(topo.public_ns, forward_ip) == old_macs["eth1"]
    t0 = time.monotonic()
    await api.job("restartNetwork", id=net["id"], cleanup="true")
    timings["(d) restartNetwork cleanup=true"] = time.monotonic() - t0
    routers = (await api.call("listRouters", networkid=net["id"]))["router"]
    live = [r for r in routers if r["state"] != "Destroyed"]
    assert len(live) == 1 and live[0]["id"] != rid, routers
    assert (await api.router(rid))["state"] == "Destroyed"
    rid = live[0]["id"]
    new_macs = await macs(home, rid)
    assert new_macs["eth2"] != old_macs["eth2"]
    t1 = time.monotonic()
    await wait_for(lambda: neighbour(topo.guest_ns, gateway, new_macs["eth2"]), 5,
                   "the guest's ARP entry for its gateway to name the new router")  # fmt: skip
    await wait_for(lambda: neighbour(topo.public_ns, forward_ip, new_macs["eth1"]), 5,
                   "the public client's ARP entry to name the new router")  # fmt: skip
    timings["(d) ARP entries on the new router"] = time.monotonic() - t1
    await serving("the new router to serve", timeout=10)
    timings["(d) job done -> serving"] = time.monotonic() - t1
    assert container_limits(run_json(home, rid)["leader"]) == (512, 1)  # default offering

    # ---- (e) the router's sizing, CloudStack's way: stop it, change its service offering,
    # start it. The same router comes back inside the new limits and serves again.
    bigger = (
        await api.call(
            "createServiceOffering", name="router-768", displaytext="router-768", cpunumber=2,
            memory=768, issystem="true", systemvmtype="domainrouter",
        )
    )["serviceoffering"]  # fmt: skip
    await api.job("stopRouter", id=rid)
    res = await api.job("changeServiceForRouter", id=rid, serviceofferingid=bigger["id"])
    assert (res["router"]["id"], res["router"]["state"]) == (rid, "Stopped"), res
    t0 = time.monotonic()
    res = await api.job("startRouter", id=rid)
    assert res["router"]["serviceofferingid"] == bigger["id"], res
    await serving("the resized router to serve", timeout=10)
    timings["(e) startRouter after resize -> serving"] = time.monotonic() - t0
    assert container_limits(run_json(home, rid)["leader"]) == (768, 2)
    netns_path = Path("/run/netns") / netns_name(prefix, rid)

    # ---- deleteNetwork: the router is destroyed, its guest bridge goes with it (the guest
    # namespace's port is no VM's port: it does not keep the bridge)
    await api.job("destroyVirtualMachine", id=vm["id"])
    await api.job("deleteNetwork", id=net["id"])
    assert (await api.router(rid))["state"] == "Destroyed"
    assert not Path(f"/sys/class/net/{guest_bridge}").exists()
    assert not netns_path.exists()
    timings["total"] = time.monotonic() - t_all


@pytest.mark.parametrize("host_prefix", ["h"], indirect=True)
async def test_shared_network_router_from_image(
    tmp_path: Path, host_prefix: str, sysvm_image: Path, free_port: Callable[[], int]
) -> None:
    """A Shared network (its gateway is the provider's router, played by a namespace) gets
    a router with no public NIC that serves DHCP, DNS and userdata from its own address,
    routes nothing, and keeps doing so across a reboot and a rolling replacement."""
    topo = Topology(host_prefix, tmp_path)
    upstream_ns = f"{host_prefix}-up"
    timings: dict[str, float] = {}

    async def close() -> None:
        await topo.close()
        await delete_netns(upstream_ns)

    async with zone_manager(tmp_path, host_prefix, sysvm_image, free_port(), timings,
                            [close]) as z:  # fmt: skip
        await _shared_scenario(z, host_prefix, topo, upstream_ns, timings)


async def _shared_scenario(
    z: Zone, prefix: str, topo: Topology, upstream_ns: str, timings: dict[str, float]
) -> None:
    api, home, mlog = z.api, z.home, z.mlog
    pid = os.getpid()
    cidr = ipaddress.ip_network(f"10.{100 + pid % 50}.{pid % 250}.0/24")
    gateway, router_ip = str(cidr.network_address + 1), str(cidr.network_address + 10)
    domain = "shared.internal"
    zone = (await api.call("listZones"))["zone"][0]
    offering = (await api.call("listNetworkOfferings", name="DefaultSharedNetworkOffering"))[
        "networkoffering"
    ][0]
    t0 = time.monotonic()
    net = (
        await api.call("createNetwork", name="lan", displaytext="lan", zoneid=zone["id"],
                       networkofferingid=offering["id"], gateway=gateway,
                       netmask=str(cidr.netmask), startip=router_ip,
                       endip=str(cidr.network_address + 50), vlan="300", networkdomain=domain)
    )["network"]  # fmt: skip
    rid = (await api.call("listRouters", networkid=net["id"]))["router"][0]["id"]

    def router_running() -> Awaitable[dict[str, Any] | None]:
        return api.running(rid, mlog)

    router = await wait_for(router_running, BOOT_TIMEOUT, "the shared network's router Running")
    timings["createNetwork -> router Running"] = time.monotonic() - t0
    assert router["guestipaddress"] == router_ip and "publicip" not in router, router
    # two NICs: control and guest (its own address, not the gateway); default route upstream
    addrs = await addresses(home, rid)
    assert addrs["eth0"] == [f"{router['linklocalip']}/24"], addrs
    assert addrs["eth1"] == [f"{router_ip}/{cidr.prefixlen}"] and "eth2" not in addrs, addrs
    route = await in_vm(home, rid, "ip", "-4", "route", "show", "default")
    assert f"via {gateway} dev eth1" in route, route
    boot = json.loads(await in_vm(home, rid, "cat", "/etc/sysvm/bootdata.json"))
    assert [(n["name"], n["kind"]) for n in boot["extra"]["nics"]] == [
        ("eth0", "control"), ("eth1", "guest")]  # fmt: skip
    # it routes and translates nothing
    nat = await in_vm(home, rid, "iptables-save", "-t", "nat")
    assert "DNAT" not in nat and "SNAT" not in nat and "MASQUERADE" not in nat, nat

    # a guest VM with userdata, and the provider's router holding the gateway address
    userdata = base64.b64encode(b"#cloud-config\nhostname: web1\n").decode()
    vm = (await api.job("deployVirtualMachine", zoneid=zone["id"], networkids=net["id"],
                        name="web1", userdata=userdata))["virtualmachine"]  # fmt: skip
    nic = vm["nic"][0]
    assert nic["ipaddress"] == str(cidr.network_address + 11), nic  # the router has .10
    guest_bridge = guest_bridge_name(prefix, net["id"])
    await netns_on_bridge(topo.guest_ns, f"{prefix}xg", guest_bridge, mac=nic["macaddress"])
    await netns_on_bridge(upstream_ns, f"{prefix}xu", guest_bridge,
                          address=f"{gateway}/{cidr.prefixlen}")  # fmt: skip
    topo.procs.append(await spawn_in_netns(upstream_ns, "python3", "-c", SERVER, "upstream",
                                           gateway, str(CLIENT_PORT)))  # fmt: skip

    async def serves() -> bool:
        checks: list[tuple[str, Callable[[], Any], str]] = [
            ("dns", lambda: topo.dig(router_ip, f"web1.{domain}"), nic["ipaddress"]),
            ("meta-data", lambda: topo.curl(
                topo.guest_ns, f"http://{router_ip}/latest/meta-data/local-hostname"), "web1"),
            ("user-data", lambda: topo.curl(topo.guest_ns, f"http://{router_ip}/latest/user-data"),
             "#cloud-config\nhostname: web1\n"),
        ]  # fmt: skip
        return await topo.check(checks)

    async def serving(what: str, timeout: float = 60) -> None:
        try:
            await wait_for(serves, timeout, what, interval=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}: {topo.last_error}") from None

    async def leased() -> None:
        lease = await topo.dhcp()
        # the guest's gateway is the provider's; its DNS server is the router
        assert lease["ip"] == nic["ipaddress"] and lease["router"] == gateway, lease
        assert lease["dns"] == router_ip and lease["domain"] == domain, lease

    await leased()
    await serving("the shared network's router to serve DNS and userdata")
    timings["first answers"] = time.monotonic() - t0
    # the guest's traffic goes straight to the provider's router, untouched by ours
    out = await topo.curl(topo.guest_ns, f"http://{gateway}:{CLIENT_PORT}/")
    assert out == f"upstream {nic['ipaddress']}\n", out
    # nothing that needs a public side is accepted
    with pytest.raises(CloudStackApiException) as e:
        await api.call("associateIpAddress", networkid=net["id"])
    assert e.value.error["errorcode"] == 431, e.value.error

    # ---- a reboot from inside: it serves again from its own disk
    leader = run_json(home, rid)["leader"]
    t0 = time.monotonic()
    await in_vm(home, rid, "systemctl", "reboot", check=False)
    await wait_for(lambda: run_json(home, rid).get("leader") not in (None, leader), 60,
                   "the router's container to boot again after its reboot")  # fmt: skip
    await serving("the router to serve again after a reboot from inside")
    timings["reboot from inside -> serving"] = time.monotonic() - t0
    await wait_for(router_running, BOOT_TIMEOUT, "the router to reconnect after its reboot")

    # ---- restartNetwork cleanup=true: the new router takes the same address and announces it
    old_mac = (await macs(home, rid))["eth1"]
    await serving("the router to serve before its replacement")  # fills the guest's ARP cache
    assert await neighbour(topo.guest_ns, router_ip) == old_mac
    t0 = time.monotonic()
    await api.job("restartNetwork", id=net["id"], cleanup="true")
    timings["restartNetwork cleanup=true"] = time.monotonic() - t0
    live = [r for r in (await api.call("listRouters", networkid=net["id"]))["router"]
            if r["state"] != "Destroyed"]  # fmt: skip
    assert len(live) == 1 and live[0]["id"] != rid and live[0]["guestipaddress"] == router_ip
    rid = live[0]["id"]
    new_mac = (await macs(home, rid))["eth1"]
    t1 = time.monotonic()
    await wait_for(lambda: neighbour(topo.guest_ns, router_ip, new_mac), 5,
                   "the guest's ARP entry for the router to name the new one")  # fmt: skip
    await serving("the new router to serve", timeout=10)
    timings["replacement job done -> serving"] = time.monotonic() - t1
    await leased()

    # ---- deleteNetwork: the router goes, and its guest bridge with it
    await api.job("destroyVirtualMachine", id=vm["id"])
    await api.job("deleteNetwork", id=net["id"])
    assert (await api.router(rid))["state"] == "Destroyed"
    await delete_netns(topo.guest_ns)
    await delete_netns(upstream_ns)
    await wait_for(lambda: not Path(f"/sys/class/net/{guest_bridge}").exists(), 10,
                   "the guest bridge to go")  # fmt: skip
