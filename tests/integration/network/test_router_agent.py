"""End to end: the API drives a real router. An in-process manager (API, store, real agent
endpoint with mutual TLS) and a real ``sysvm-agent`` running the router role — real
iptables, dnsmasq, haproxy, apache, sshd — inside its own network namespace.

    manager (host netns) 10.199.N.1 ── veth ── 10.199.N.2 mg0 [router netns]
                                                eth0 control, eth1 public, eth2 guest (veths
                                                carrying the addresses the manager allocated)

Checked: the router comes up with its rendered config (source NAT in its nat table), a
port forwarding rule reaches its iptables through an acknowledged apply, and a change the
router fails to apply (haproxy cannot bind an address the VM does not have) fails the job
with the router's reason and is undone. Namespace and link names carry the per-run prefix
and tag "n"; they are removed even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from manager import network
from manager.api import setup_api
from manager.app import DaemonConfig, open_context
from manager.bootstrap import ensure_initialized
from manager.enrolment import issue_token, make_bootdata
from manager.network.guests import add_guest_nic
from manager.network.routers import LAUNCHER, nic_plan
from manager.network.runtime import RUNTIME
from tests.integration.network.netapi import TIMING, Api, reset_runtime

VENV_BIN = Path(sys.executable).parent


async def sh(*argv: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20 * TIMING):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{argv} timed out") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}: {err.decode()[-500:]}")
    return out.decode()


@dataclass
class RouterVm:
    """One router "VM": its namespace, the host side of its management veth, its agent."""

    ns: str
    host_if: str
    tmp: Path
    agent: asyncio.subprocess.Process | None = None
    log: Path | None = None

    async def x(self, *argv: str, check: bool = True) -> str:
        return await sh("ip", "netns", "exec", self.ns, *argv, check=check)


@dataclass
class Env:
    api: Api
    prefix: str
    base: str  # 10.199.N: slot k's management /31 is base.2k (namespace), base.2k+1 (host)
    tmp: Path
    slots: list[RouterVm] = field(default_factory=list)
    by_router: dict[str, RouterVm] = field(default_factory=dict)
    helpers: list[asyncio.subprocess.Process] = field(default_factory=list)
    # (op, router, {router id: (state, applied_version)} of every router at that moment)
    events: list[tuple[str, str, dict[str, tuple[str, int]]]] = field(default_factory=list)
    # NIC index → namespace that holds the far end of that NIC's veth (default: the
    # router's own namespace, i.e. nothing behind the NIC)
    peer_ns: dict[int, str] = field(default_factory=dict)
    slot_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def mgr_ip(self) -> str:
        return f"{self.base}.1"

    def vm(self, router_id: str) -> RouterVm:
        return self.by_router[router_id]


async def wait_until(cond: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout * TIMING
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


MAX_SLOTS = 128  # one /31 each in the run's /24


async def add_slot(prefix: str, base: str, tmp: Path, slot: int) -> RouterVm:
    """A namespace with a veth to the host (a /31: host base.2k+1, namespace base.2k);
    routes to the manager's address (base.1, the host side of slot 0)."""
    if slot >= MAX_SLOTS:
        raise AssertionError(f"at most {MAX_SLOTS - 1} router slots in one /24")
    vm = RouterVm(ns=f"{prefix}n-vr{slot}", host_if=f"{prefix}nh{slot}", tmp=tmp / f"vm{slot}")
    vm.tmp.mkdir(mode=0o755)
    await sh("ip", "netns", "add", vm.ns)
    await sh("ip", "link", "add", vm.host_if, "type", "veth", "peer", "name", "mg0", "netns", vm.ns)
    await sh("ip", "addr", "add", f"{base}.{2 * slot + 1}/31", "dev", vm.host_if)
    await sh("ip", "link", "set", vm.host_if, "up")
    await vm.x("ip", "addr", "add", f"{base}.{2 * slot}/31", "dev", "mg0")
    await vm.x("ip", "link", "set", "mg0", "up")
    await vm.x("ip", "link", "set", "lo", "up")
    if slot:
        await vm.x("ip", "route", "add", f"{base}.1/32", "via", f"{base}.{2 * slot + 1}")
    return vm


async def stop_agent(vm: RouterVm, sig: int = signal.SIGTERM) -> None:
    p = vm.agent
    if p is None or p.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)
    try:
        async with asyncio.timeout(15 * TIMING):
            await p.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        async with asyncio.timeout(15 * TIMING):
            await p.wait()


async def remove_slot(vm: RouterVm) -> None:
    await stop_agent(vm, signal.SIGKILL)
    pids = await sh("ip", "netns", "pids", vm.ns, check=False)
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    await sh("ip", "netns", "del", vm.ns, check=False)
    await sh("ip", "link", "del", vm.host_if, check=False)


async def boot_agent(e: Env, vm: RouterVm, router_id: str) -> None:
    """What a hypervisor does: NICs with the router's addresses, boot data, the agent."""
    ctx = e.api.ctx
    rec = await ctx.store.get_system_vm(router_id)
    assert rec is not None
    plan = await nic_plan(ctx.store, router_id)
    for i, nic in enumerate(plan):
        dev = f"eth{i}"
        far = e.peer_ns.get(i)
        if far is None:
            # No dummy module on this machine: a veth pair whose far end stays in the netns.
            await vm.x("ip", "link", "add", dev, "type", "veth", "peer", "name", f"{dev}p")
            await vm.x("ip", "link", "set", f"{dev}p", "up")
        else:  # the far end in another namespace (a public client, a guest)
            await vm.x(
                "ip", "link", "add", dev, "type", "veth", "peer", "name", f"{dev}p", "netns", far
            )
        await vm.x("ip", "addr", "add", nic["address"], "dev", dev)
        await vm.x("ip", "link", "set", dev, "up")
    await run_agent(e, vm, router_id)


async def run_agent(e: Env, vm: RouterVm, router_id: str) -> None:
    """Starts the agent of an already plugged router VM (again, after a reboot: it keeps
    its state directory, so it does not enrol twice)."""
    ctx = e.api.ctx
    rec = await ctx.store.get_system_vm(router_id)
    assert rec is not None
    path = vm.tmp / "bootdata.json"
    if path.exists():
        await start_agent_process(vm, path)
        e.by_router[router_id] = vm
        return
    async with ctx.store.transaction() as tx:
        token = await issue_token(tx, rec.id, 600, time.time())
    boot = make_bootdata(
        rec,
        manager_urls=[f"wss://{e.mgr_ip}:{ctx.links.port}"],
        ca_fingerprint=ctx.pki.ca_fingerprint,
        token=token,
        extra={"router_run_dir": str(vm.tmp / "run")},
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(boot, f)
    await start_agent_process(vm, path)
    e.by_router[router_id] = vm


async def start_agent_process(vm: RouterVm, path: Path) -> None:
    vm.log = vm.tmp / "agent.log"
    envv = {k: v for k, v in os.environ.items() if not k.startswith(("SYSVM_", "NOTIFY_"))}
    envv |= {"PYTHONUNBUFFERED": "1", "SYSVM_AGENT_BACKOFF_BASE": "0.1"}
    entry = [str(VENV_BIN / "sysvm-agent")]  # the production entry point (uvloop)
    with vm.log.open("ab") as logf:
        vm.agent = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", vm.ns, *entry,
            "--bootdata", str(path), "--state-dir", str(vm.tmp / "state"),
            stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf, env=envv,
            start_new_session=True,
        )  # fmt: skip


async def power_on(e: Env, slot: RouterVm, router_id: str) -> None:
    """A stopped router VM boots again: same NICs and state directory, but a new kernel
    starts with no rules (and no counters)."""
    for table in ("filter", "nat", "mangle"):
        await slot.x("iptables", "-t", table, "-F")
        await slot.x("iptables", "-t", table, "-X")
    await run_agent(e, slot, router_id)


class NetnsLauncher:
    """The test is the hypervisor: a router VM is a namespace running the real agent."""

    def __init__(self, e: Env) -> None:
        self.e = e

    async def _note(self, op: str, vm_id: str) -> None:
        store = self.e.api.ctx.store
        links = self.e.api.ctx.links
        # Applied = the store's record or a newer ack the link holds (acks reach the store
        # by group commit, after the waits that act on them).
        snap = {
            v.id: (v.state.value, max(v.applied_version, links.acked_version(v.id)))
            for v in await store.list_system_vms()
            if v.role.value == "domainrouter"
        }
        self.e.events.append((op, vm_id, snap))

    async def start(self, ctx: Any, vm: Any) -> None:
        await self._note("start", vm.id)
        e = self.e
        own = e.by_router.get(vm.id)
        if own is not None:  # a stopped VM boots again on its own disk and NICs
            await power_on(e, own, vm.id)
            return
        async with e.slot_lock:  # concurrent start jobs must not take the same slot
            # Slot 0 only carries the manager's address: never a router, so destroying a
            # router never takes the manager off the net.
            free = [s for s in e.slots[1:] if s not in e.by_router.values()]
            slot = free[0] if free else await add_slot(e.prefix, e.base, e.tmp, len(e.slots))
            if slot not in e.slots:
                e.slots.append(slot)
            await boot_agent(e, slot, vm.id)

    async def stop(self, ctx: Any, vm: Any) -> None:
        await self._note("stop", vm.id)
        if vm.id in self.e.by_router:
            await stop_agent(self.e.by_router[vm.id])  # planned: the agent stops its role

    async def reboot(self, ctx: Any, vm: Any) -> None:
        """A clean reboot: the agent stops (planned: it reports its last counters), the
        rules (and their counters) are gone as after a real reboot, then the agent boots
        again on the same NICs and state directory."""
        await self._note("reboot", vm.id)
        slot = self.e.by_router[vm.id]
        await stop_agent(slot)
        await power_on(self.e, slot, vm.id)

    async def destroy(self, ctx: Any, vm: Any) -> None:
        await self._note("destroy", vm.id)
        if vm.id in self.e.by_router:
            await remove_slot(self.e.by_router[vm.id])


@pytest.fixture
async def env(netns_prefix: str, tmp_path: Path) -> AsyncIterator[Env]:
    reset_runtime()
    RUNTIME.boot_timeout = 60.0 * TIMING
    RUNTIME.apply_timeout = 60.0 * TIMING  # a loaded 2-core machine; real applies take ~1 s
    base = f"10.199.{os.getpid() % 250}"
    tmp = Path(tempfile.mkdtemp(prefix=f"sysvm-{netns_prefix}n-", dir="/run"))
    os.chmod(tmp, 0o755)
    runner: web.AppRunner | None = None
    ctx: Any = None
    e: Env | None = None
    slots: list[RouterVm] = []
    saved = LAUNCHER[0]
    try:
        slots.append(await add_slot(netns_prefix, base, tmp, 0))  # carries the manager's IP
        mgr_ip = f"{base}.1"
        cfg = DaemonConfig(
            home=tmp_path / "home",
            api_listen=("127.0.0.1", 0),
            agent_listen=(mgr_ip, 0),
            agent_urls=(f"wss://{mgr_ip}:1",),
        )
        ctx = await open_context(cfg)
        app = web.Application()
        setup_api(app, ctx)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        ctx.api_url = f"http://{host}:{port}/client/api"
        await ensure_initialized(ctx)
        await network.setup(ctx)
        await ctx.links.start(mgr_ip, 0)
        creds = json.loads((cfg.home / "credentials.json").read_text())
        api = Api(ctx.api_url, creds["apikey"], creds["secretkey"], ctx, app)
        e = Env(api=api, prefix=netns_prefix, base=base, tmp=tmp, slots=slots)
        LAUNCHER[0] = NetnsLauncher(e)
        yield e
    finally:
        # The daemon's shutdown order (manager/app.py), each step bounded: a step that
        # hangs is reported as a teardown failure, and the steps after it still run, so
        # namespaces and processes never outlive the test.
        LAUNCHER[0] = saved
        stuck: list[str] = []

        async def step(what: str, aw: Awaitable[object], within: float = 30.0) -> None:
            try:
                async with asyncio.timeout(within * TIMING):
                    await aw
            except TimeoutError:
                stuck.append(what)
            except Exception as exc:  # keep tearing down; reported below
                stuck.append(f"{what}: {exc!r}")

        for h in e.helpers if e is not None else []:
            if h.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(h.pid, signal.SIGKILL)
                await step(f"helper {h.pid} exit", h.wait())
        if ctx is not None:  # first, while the agents can still answer the close
            await step("links.close", ctx.links.close("test over"))
        if runner is not None:  # cancels running jobs; they record their failure
            await step("runner.cleanup", runner.cleanup())
        for vm in e.slots if e is not None else slots:
            await step(f"stop {vm.ns}", stop_agent(vm))
            await step(f"remove {vm.ns}", remove_slot(vm))
        if ctx is not None:
            await step("store.close", ctx.store.close())
        shutil.rmtree(tmp, ignore_errors=True)
        reset_runtime()
        assert not stuck, f"teardown steps that failed or hung: {stuck}"


def agent_log(vm: RouterVm | None) -> str:
    """The agent's log (its daemons' errors included) for failure messages."""
    if vm is None or not vm.log or not vm.log.exists():
        return ""
    lines = vm.log.read_text(errors="replace").splitlines()
    daemon = [ln for ln in lines if "AH0" in ln or "dnsmasq:" in ln or "haproxy" in ln.lower()]
    return "\n".join([*daemon[-20:], "...", *lines[-25:]])


async def create_network(api: Api) -> tuple[dict[str, Any], dict[str, Any]]:
    """createNetwork; the router it makes is booted by the launcher (the start job)."""
    offerings = await api.call("listNetworkOfferings", guestiptype="Isolated")
    zone = (await api.call("listZones"))["zone"][0]
    net = (
        await api.call(
            "createNetwork", name="e2e", displaytext="e2e", zoneid=zone["id"],
            networkofferingid=offerings["networkoffering"][0]["id"],
        )
    )["network"]  # fmt: skip
    router = (await api.call("listRouters", networkid=net["id"]))["router"][0]
    return net, router


async def router_state(api: Api, router_id: str) -> dict[str, Any]:
    r: dict[str, Any] = (await api.call("listRouters", id=router_id))["router"][0]
    return r


async def test_api_to_real_router_applied_failed_and_replaced(env: Env) -> None:
    e = env
    api = e.api
    net, router = await create_network(api)
    assert router["state"] == "Starting"
    rid = router["id"]

    async def running() -> bool:
        return bool((await router_state(api, rid))["state"] == "Running")

    try:
        await wait_until(running, "the router to connect and apply its first config", 60)
    except AssertionError:
        raise AssertionError("router never Running:\n" + agent_log(e.by_router.get(rid))) from None
    vm = e.vm(rid)
    r = await router_state(api, rid)
    assert r["agentstate"] == "Up" and r["appliedversion"] == r["desiredversion"] >= 1
    nat = await vm.x("iptables-save", "-t", "nat")
    assert f"--to-source {router['publicip']}" in nat, nat

    # A guest NIC and a port forwarding rule: the job succeeds only once the router acked.
    guest_vm = "44444444-4444-4444-8444-444444444444"
    async with api.ctx.store.transaction() as tx:
        guest_ip = await add_guest_nic(tx, net["id"], guest_vm, "web")
    snat = (await api.call("listPublicIpAddresses", associatednetworkid=net["id"]))[
        "publicipaddress"
    ][0]
    pf = await api.job(
        "createPortForwardingRule", ipaddressid=snat["id"], protocol="tcp", publicport=2222,
        privateport=22, virtualmachineid=guest_vm, timeout=60,
    )  # fmt: skip
    assert pf["jobstatus"] == 1, (pf, agent_log(vm))
    nat = await vm.x("iptables-save", "-t", "nat")
    assert f"--to-destination {guest_ip}:22" in nat, nat
    before = (await router_state(api, rid))["appliedversion"]

    # Something on the router already holds the port (nothing the manager can know):
    # haproxy cannot bind it, the router rolls back and reports; the job fails with the
    # router's reason and the change is undone.
    holder = (
        "import socket, time\n"
        "s = socket.socket()\n"
        f"s.bind(({router['publicip']!r}, 8081))\n"
        "s.listen()\n"
        "time.sleep(600)\n"
    )
    holder_proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", vm.ns, sys.executable, "-c", holder,
        stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    e.helpers.append(holder_proc)

    async def port_held() -> bool:
        return ":8081 " in await vm.x("ss", "-Hltn")

    await wait_until(port_held, "the port holder to listen", 10)
    lb = await api.job(
        "createLoadBalancerRule", publicipid=snat["id"], name="web", algorithm="roundrobin",
        publicport=8081, privateport=8080, timeout=60,
    )  # fmt: skip
    assert lb["jobstatus"] == 1, lb  # no members yet: nothing for haproxy to bind
    lb_id = lb["jobresult"]["loadbalancer"]["id"]
    failed = await api.job(
        "assignToLoadBalancerRule", id=lb_id, virtualmachineids=guest_vm, timeout=90
    )
    assert failed["jobstatus"] == 2, (failed, agent_log(vm))
    text = failed["jobresult"]["errortext"]
    assert "failed to apply" in text and "haproxy" in text and "undone" in text, (
        text + "\n" + agent_log(vm)
    )
    assert await api.call("listLoadBalancerRuleInstances", id=lb_id) == {}  # member removed

    # The operator also sees it where a settings change (which has no job) would show it:
    # an ERROR event and a domain router alert with the router's reason.
    async def alerted() -> list[dict[str, Any]]:
        listed = (await api.call("listAlerts")).get("alert", [])
        return [
            a
            for a in listed
            if a["name"] == "ALERT.SERVICE.DOMAINROUTER" and a["type"] == 12
            and a["subject"].startswith(f"{router['name']}: could not apply config version")
        ]  # fmt: skip

    alert = (await wait_until(alerted, "a domain router alert for the failed apply", 10))[0]
    assert "haproxy" in alert["description"] and "keeps version" in alert["description"], alert
    events = (await api.call("listEvents", type="ROUTER.CONFIG.FAILED")).get("event", [])
    assert [ev["level"] for ev in events] == ["ERROR"], events

    # The router is healthy again on the undone config (acknowledged), PF rule still there.
    async def recovered() -> bool:
        r = await router_state(api, rid)
        return bool(r["appliedversion"] == r["desiredversion"] > before)

    await wait_until(recovered, "the router to apply the undone config", 60)
    assert f"--to-destination {guest_ip}:22" in await vm.x("iptables-save", "-t", "nat")
    holder_proc.kill()
    await holder_proc.wait()

    # restartNetwork cleanup=false: the same router re-applies (a new version, acked).
    applied = (await router_state(api, rid))["appliedversion"]
    res = await api.job("restartNetwork", id=net["id"], cleanup="false", timeout=60)
    assert res["jobstatus"] == 1, (res, agent_log(vm))
    assert (await router_state(api, rid))["appliedversion"] > applied

    # restartNetwork cleanup=true: a new router is up and configured before the old goes.
    e.events.clear()
    res = await api.job("restartNetwork", id=net["id"], cleanup="true", timeout=120)
    assert res["jobstatus"] == 1, (res, [agent_log(v) for v in e.slots])
    routers = (await api.call("listRouters", networkid=net["id"]))["router"]
    assert len(routers) == 1 and routers[0]["id"] != rid
    new = routers[0]
    assert new["state"] == "Running" and new["agentstate"] == "Up"
    assert new["publicip"] == router["publicip"] and new["appliedversion"] >= 1
    assert (await router_state(api, rid))["state"] == "Destroyed"
    ops = [(op, who) for op, who, _ in e.events]
    assert ops == [("start", new["id"]), ("stop", rid), ("destroy", rid)], ops
    # When the old router was stopped, the new one was Running on its applied config.
    at_stop = e.events[1][2]
    assert at_stop[new["id"]][0] == "Running" and at_stop[new["id"]][1] >= 1, at_stop
    nat = await e.vm(new["id"]).x("iptables-save", "-t", "nat")
    assert f"--to-destination {guest_ip}:22" in nat and f"--to-source {router['publicip']}" in nat
    assert vm.agent is not None and vm.agent.returncode is not None  # the old VM is gone


async def test_production_entry_point_applies_first_config(env: Env) -> None:
    """The real ``sysvm-agent`` entry point (uvloop) must apply a router's first config."""
    api = env.api
    _net, router = await create_network(api)

    async def settled() -> str | None:
        r = await router_state(api, router["id"])
        if r["state"] == "Running":
            return "Running"
        jobs = await api.ctx.store.list_jobs()
        failed = [j for j in jobs if j.instance_id == router["id"] and j.status == 2]
        return "failed: " + str(failed[0].result.get("errortext")) if failed else None

    outcome = await wait_until(settled, "the router to start or its start job to fail", 60)
    assert outcome == "Running", outcome + "\n" + agent_log(env.by_router.get(router["id"]))


async def test_a_live_session_is_closed_and_gone_before_a_boot_is_judged(env: Env) -> None:
    """``disconnect_and_wait`` (what a router start does with a session left from the
    VM's previous boot): the session is closed and gone, or replaced by a newer one, on
    return; the agent then connects again with a new session."""
    api = env.api
    _net, router = await create_network(api)
    rid = router["id"]
    links = api.ctx.links

    async def running() -> bool:
        return bool((await router_state(api, rid))["state"] == "Running")

    await wait_until(running, "the router to run", 60)
    old = links.sessions[rid]
    assert await links.disconnect_and_wait(rid, "test: vm starting", 10 * TIMING)
    assert links.sessions.get(rid) is not old

    async def reconnected() -> bool:
        new = links.sessions.get(rid)
        return new is not None and new is not old

    await wait_until(reconnected, "the agent's new session", 30)
    assert await links.disconnect_and_wait("no-such-vm", "test", 1.0)


async def firewall_rules_at_once(api: Api, rules: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """One createFirewallRule per (public IP id, port), all sent together; waits until
    every job has finished and returns their queryAsyncJobResult answers."""
    calls = [
        api.call(
            "createFirewallRule",
            ipaddressid=ip_id,
            protocol="tcp",
            startport=port,
            endport=port,
            cidrlist="203.0.113.0/24",
        )
        for ip_id, port in rules
    ]
    started = await asyncio.gather(*calls)

    async def all_done() -> list[dict[str, Any]] | None:
        res = [await api.call("queryAsyncJobResult", jobid=s["jobid"]) for s in started]
        return res if all(r["jobstatus"] != 0 for r in res) else None

    done: list[dict[str, Any]] = await wait_until(all_done, f"{len(rules)} rule jobs", 90)
    return done


async def test_a_burst_of_rule_changes_reaches_the_real_router(env: Env) -> None:
    """20 createFirewallRule calls at once on one network: every job succeeds, the real
    router ends up enforcing all 20 rules, and it applied fewer configs than it was sent
    (the agent keeps only the newest pending config; an ack of version V covers every
    job waiting for a version up to V)."""
    api = env.api
    net, router = await create_network(api)
    rid = router["id"]

    async def running() -> bool:
        return bool((await router_state(api, rid))["state"] == "Running")

    await wait_until(running, "the router to connect and apply its first config", 60)
    vm = env.vm(rid)
    snat = (await api.call("listPublicIpAddresses", associatednetworkid=net["id"]))[
        "publicipaddress"
    ][0]
    before = (await router_state(api, rid))["appliedversion"]
    ports = list(range(41000, 41020))
    results = await firewall_rules_at_once(api, [(snat["id"], p) for p in ports])
    assert all(r["jobstatus"] == 1 for r in results), ([r for r in results], agent_log(vm))
    state = await router_state(api, rid)
    assert state["appliedversion"] == state["desiredversion"] == before + len(ports), state
    # The ingress firewall is in mangle (SVM-FW-IN), as on CloudStack's VR.
    rules = await vm.x("iptables-save", "-t", "mangle")
    fw_in = [ln for ln in rules.splitlines() if ln.startswith("-A SVM-FW-IN ")]
    missing = [p for p in ports if not any(f"--dport {p} " in ln for ln in fw_in)]
    assert not missing, (missing, rules[-3000:])
    log = vm.log.read_text() if vm.log else ""
    applied = sum(
        1 for ln in log.splitlines()
        if "event=config_applied" in ln and int(ln.rsplit("version=", 1)[1].split()[0]) > before
    )  # fmt: skip
    assert 1 <= applied <= len(ports), applied


async def test_one_change_reaches_many_real_routers_at_once(env: Env) -> None:
    """Pushes to many real routers (the agent and its daemons, each in its namespace; 8
    here, ``SYSVM_TEST_REAL_ROUTERS`` for more, up to 127): one updateConfiguration changes
    every router's config, then one createFirewallRule per network, all at once. Each
    router must apply and enforce its own change; the times are printed (``-s``)."""
    api = env.api
    n = int(os.environ.get("SYSVM_TEST_REAL_ROUTERS", "8"))
    nets = [await create_network(api) for _ in range(n)]
    ids = {router["id"] for _net, router in nets}

    async def routers() -> dict[str, dict[str, Any]]:
        listed = (await api.call("listRouters", listall=True))["router"]
        return {r["id"]: r for r in listed if r["id"] in ids}

    async def all_running() -> bool:
        rs = await routers()
        return len(rs) == n and all(r["state"] == "Running" for r in rs.values())

    await wait_until(all_running, f"{n} routers Running", 120)
    before = {rid: r["desiredversion"] for rid, r in (await routers()).items()}

    t0 = time.monotonic()
    await api.call("updateConfiguration", name="router.stats.interval", value="777")

    async def all_applied() -> bool:
        rs = await routers()
        return all(
            r["desiredversion"] > before[rid] and r["appliedversion"] == r["desiredversion"]
            for rid, r in rs.items()
        )

    await wait_until(all_applied, f"the setting applied on all {n} routers", 60)
    setting_s = time.monotonic() - t0
    for rid in ids:
        applied = json.loads((env.vm(rid).tmp / "state" / "applied.json").read_text())
        assert applied["config"]["router"]["stats"]["interval"] == 777, (rid, applied)

    ports = {router["id"]: 42000 + i for i, (_net, router) in enumerate(nets)}
    snats = {
        router["id"]: (await api.call("listPublicIpAddresses", associatednetworkid=net["id"]))[
            "publicipaddress"
        ][0]["id"]
        for net, router in nets
    }
    t0 = time.monotonic()
    results = await firewall_rules_at_once(api, [(snats[rid], ports[rid]) for rid in ids])
    rules_s = time.monotonic() - t0
    assert all(r["jobstatus"] == 1 for r in results), results
    for rid, port in ports.items():
        mangle = await env.vm(rid).x("iptables-save", "-t", "mangle")
        mine = [ln for ln in mangle.splitlines() if ln.startswith("-A SVM-FW-IN ")]
        assert any(f"--dport {port} " in ln for ln in mine), (rid, port, mangle[-2000:])
        others = set(ports.values()) - {port}
        assert not any(f"--dport {p} " in ln for ln in mine for p in others), (rid, mangle)
    print(f"{n} real routers: one setting applied on all in {setting_s:.2f} s; "
          f"{n} rule changes at once, all jobs done in {rules_s:.2f} s")  # fmt: skip
