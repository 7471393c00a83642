#!/usr/bin/env python3
"""Config push to N routers at once: a real ``sysvm-manager`` process and N router agents
over real mutual TLS, against a bare ``websockets`` server pushing the same N configs to
the same agents (the baseline), in the same run.

    .venv/bin/python scripts/bench/router_push.py [-n 100] [--rounds 3]

(``scripts/bench/router.py`` runs it too, after the single-router figures.)

What is real and what is simulated:

- the manager is the real daemon (``manager.main``) in a temporary home, driven through
  its CloudStack API with ``cs``. Its routers are on the ``External`` hypervisor (set by
  this script's ``_manager`` wrapper through ``RUNTIME.hypervisor``, the same override
  the integration tests use): nothing here boots 100 VMs, so the routers' agents are
  played by this process. ``sysvm-manager external-bootdata`` gives them their boot data;
  they enrol over ``/enrol`` (CSR, CA pinned) and connect to ``/agent`` with their
  certificates, speaking the real protocol (``protocol.Conversation``).
- each simulated router runs every config it receives through the router role's own
  strict parser (``agent.roles.router.config.parse``) and acks it — ``ok=false`` with the
  parser's error if it refuses. It does not run iptables/dnsmasq/haproxy: what one router
  takes to apply a config is ``router.py``'s single-router figure (10,000 rules < 1 s).

Measured, each ``--rounds`` times (median reported):

1. **N changes at once** — one ``createFirewallRule`` per network (a new port each
   round), all N API calls sent together: time until every router acked a config holding
   its new rule, and until every async job reported success (``queryAsyncJobResult``).
2. **One change for all** — ``updateConfiguration router.stats.interval``: time until
   every router acked a config with the new interval.
3. **Baseline** — the agents reconnect to a bare ``websockets`` server (same TLS, same
   protocol, no API, no database, no rendering) that sends each of them the config it last
   got from the manager, all at once: time until every router acked.

Prints one line per measurement, then a table with the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from agents import WS_SERVER_OPTIONS, SimAgent, Worker, send
from common import (
    Child,
    answer,
    free_port,
    log,
    proc_sample,
    stdin_lines,
    table,
    terminate,
    tls_server_argv,
    tls_server_context,
)
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from protocol import messages as m
from protocol.codec import encode
from protocol.conversation import Close, Conversation, Received, Reply, Side

HERE = Path(__file__).resolve()
HEARTBEAT = 10.0  # the manager's default sysvm.agent.heartbeat.interval
Predicate = Callable[[Mapping[str, Any]], bool]


# =====================================================================================
# The simulated routers
# =====================================================================================


class RouterAgents(Worker):
    """Simulated router agents: every config goes through the router role's parser; the
    time each one acks a config that satisfies the current expectation is recorded."""

    def __init__(self, boots: list[dict[str, Any]], state_dir: Path) -> None:
        super().__init__(boots, state_dir, seed=1)
        self.last_config: dict[str, dict[str, Any]] = {}
        self.refused: dict[str, str] = {}
        self.waiting: dict[str, Predicate] = {}
        self.done_at: dict[str, float] = {}
        self.all_done = asyncio.Event()

    def check_config(self, a: SimAgent, msg: m.Config) -> str | None:
        from agent.roles.router.config import ConfigError, parse

        if "router" not in msg.config:
            return "the config has no router section"
        try:
            parse(msg.config["router"])
        except ConfigError as e:
            return str(e)
        return None

    def config_acked(self, a: SimAgent, msg: m.Config, error: str | None) -> None:
        now = time.monotonic()
        if error is not None:
            self.refused[a.vm_id] = error
            return
        self.last_config[a.vm_id] = msg.config
        want = self.waiting.get(a.vm_id)
        if want is not None and want(msg.config):
            del self.waiting[a.vm_id]
            self.done_at[a.vm_id] = now
            if not self.waiting:
                self.all_done.set()

    def expect(self, predicates: Mapping[str, Predicate]) -> None:
        """From now on, note when each router acks a config its predicate accepts."""
        self.waiting = dict(predicates)
        self.done_at = {}
        self.all_done.clear()

    async def wait_all(self, timeout: float) -> float:
        """Monotonic time of the last expected ack; raises if some never came."""
        try:
            await asyncio.wait_for(self.all_done.wait(), timeout)
        except TimeoutError:
            late = sorted(self.waiting)[:5]
            raise RuntimeError(
                f"{len(self.waiting)} router(s) did not ack the change in {timeout:g} s "
                f"(e.g. {late}); refused: {dict(list(self.refused.items())[:3])}"
            ) from None
        return max(self.done_at.values())


# =====================================================================================
# Baseline: a bare websockets server that pushes configs
# =====================================================================================


async def pushsrv_main(args: argparse.Namespace) -> int:
    """Same TLS and websocket settings as the manager's agent endpoint; hello → welcome,
    heartbeats acked, and on ``push`` every connected agent gets its config at once."""
    ctx = tls_server_context(args.cert, args.key, args.ca, ssl.CERT_REQUIRED)
    sessions: dict[str, ServerConnection] = {}
    acks: dict[str, int] = {}
    acked = asyncio.Event()
    want: dict[str, int] = {}

    async def handler(ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        conv = Conversation(Side.MANAGER, now=loop.time(), heartbeat_interval=HEARTBEAT)
        vm_id = ""
        try:
            async for frame in ws:
                for ev in conv.receive(frame, loop.time()):
                    if isinstance(ev, Reply):
                        await send(ws, ev.frame)
                    elif isinstance(ev, Close):
                        await ws.close(ev.code, ev.reason)
                        return
                    elif isinstance(ev, Received) and isinstance(ev.msg, m.Hello):
                        vm_id = ev.msg.boot_id
                        welcome = m.Welcome(
                            version=conv.version or 1,
                            vm_id=vm_id,
                            heartbeat_interval=HEARTBEAT,
                            desired_version=0,
                            ack_every=4,
                        )
                        await send(ws, conv.send(welcome))
                        sessions[vm_id] = ws
                    elif isinstance(ev, Received) and isinstance(ev.msg, m.ConfigAck):
                        if ev.msg.ok:
                            acks[vm_id] = max(acks.get(vm_id, 0), ev.msg.version)
                        if want and all(acks.get(k, 0) >= v for k, v in want.items()):
                            acked.set()
        except (ConnectionClosed, TimeoutError):
            pass
        finally:
            if sessions.get(vm_id) is ws:
                del sessions[vm_id]

    async def push(configs: dict[str, Any], version: int) -> dict[str, Any]:
        t0 = time.monotonic()
        want.clear()
        want.update({vm_id: version for vm_id in configs})
        acked.clear()

        async def one(vm_id: str, config: dict[str, Any]) -> None:
            await send(sessions[vm_id], encode(m.Config(version=version, config=config)))

        missing = sorted(set(configs) - set(sessions))
        if missing:
            return {"error": f"{len(missing)} agents not connected, e.g. {missing[:3]}"}
        await asyncio.gather(*(one(k, v) for k, v in configs.items()))
        sent = time.monotonic() - t0
        await asyncio.wait_for(acked.wait(), 60)
        return {"sent_s": sent, "acked_s": time.monotonic() - t0}

    async with serve(handler, "127.0.0.1", 0, ssl=ctx, **WS_SERVER_OPTIONS) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        reader = await stdin_lines()
        answer({"port": port})
        while line := await reader.readline():
            cmd = json.loads(line)
            try:
                if cmd.get("cmd") == "push":
                    configs = json.loads(Path(cmd["file"]).read_text())
                    answer(await push(configs, int(cmd["version"])))
                elif cmd.get("cmd") == "stats":
                    answer({"connected": len(sessions)})
                else:
                    answer({"error": "unknown command"})
            except Exception as e:
                answer({"error": f"{type(e).__name__}: {e}"})
    return 0


# =====================================================================================
# Orchestrator
# =====================================================================================


def manager_main(argv: list[str]) -> int:
    """The real manager, with new routers on the External hypervisor (nothing boots them:
    this script plays their agents)."""
    from manager.main import main
    from manager.network.runtime import RUNTIME

    RUNTIME.hypervisor = "External"
    return main(argv)


def has_port(port: int) -> Predicate:
    def ok(config: Mapping[str, Any]) -> bool:
        rules = config["router"].get("firewall") or []
        return any(r.get("ports") in (port, str(port)) for r in rules)

    return ok


def has_interval(value: int) -> Predicate:
    def ok(config: Mapping[str, Any]) -> bool:
        return bool(config["router"].get("stats", {}).get("interval") == value)

    return ok


def has_version(version: int) -> Predicate:
    def ok(config: Mapping[str, Any]) -> bool:
        return bool(config.get("bench_version") == version)

    return ok


class PushBench:
    def __init__(self, n: int, rounds: int, tmp: Path, log_level: str = "WARNING") -> None:
        self.log_level = log_level
        self.n = n
        self.rounds = rounds
        self.tmp = tmp
        self.home = tmp / "home"
        self.api_port = free_port()
        self.agent_port = free_port()
        self.manager: asyncio.subprocess.Process | None = None
        self.routers: RouterAgents | None = None
        self.api: Any = None
        self.networks: list[str] = []
        self.snat: dict[str, str] = {}  # network id -> source NAT public IP id
        self.router_of: dict[str, str] = {}  # network id -> router id
        self.results: dict[str, list[float]] = {}
        self.figures: dict[str, float] = {}

    def argv(self, *extra: str) -> list[str]:
        return [
            "--home",
            str(self.home),
            "--api-listen",
            f"127.0.0.1:{self.api_port}",
            "--agent-listen",
            f"127.0.0.1:{self.agent_port}",
            "--log-level",
            self.log_level,
            *extra,
        ]

    def note(self, key: str, value: float) -> None:
        self.results.setdefault(key, []).append(value)

    # -- manager -----------------------------------------------------------------------

    async def start_manager(self) -> None:
        self.home.mkdir(mode=0o700)
        argv = [sys.executable, str(HERE), "_manager", *self.argv()]
        err = open(self.tmp / "manager.log", "ab")  # noqa: SIM115 - the child keeps it
        self.manager = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err
        )
        err.close()
        deadline = time.monotonic() + 90
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline and self.manager.returncode is None:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    url = f"http://127.0.0.1:{self.api_port}/metrics"
                    async with http.get(url) as r:
                        if r.status == 200 and (self.home / "credentials.json").exists():
                            return
                await asyncio.sleep(0.2)
        tail = (self.tmp / "manager.log").read_text()[-2000:]
        raise RuntimeError(f"manager did not become ready (rc={self.manager.returncode}):\n{tail}")

    async def cli(self, *args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "manager.main",
            *self.argv(*args),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 120)
        if proc.returncode != 0:
            raise RuntimeError(f"sysvm-manager {args[0]} exited {proc.returncode}: {err!r:.1500}")

    async def call(self, command: str, **params: Any) -> Any:
        return await getattr(self.api, command)(**params)

    async def jobs_done(self, job_ids: list[str], timeout: float) -> float:
        """Polls until every job succeeded; returns the monotonic time the last was seen
        done (resolution: a pass over the pending jobs, 8 queries in flight, every 50 ms —
        a client polling flat out would slow the manager it measures)."""
        pending = set(job_ids)
        gate = asyncio.Semaphore(8)
        deadline = time.monotonic() + timeout
        last = time.monotonic()

        async def query(job: str) -> None:
            nonlocal last
            async with gate:
                res = await self.call("queryAsyncJobResult", jobid=job)
            status = res["jobstatus"]
            if status == 0:
                return
            if status != 1:
                raise RuntimeError(f"job {job} failed: {res.get('jobresult')}")
            pending.discard(job)
            last = time.monotonic()

        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} jobs still pending after {timeout:g} s")
            pass_started = time.monotonic()
            await asyncio.gather(*(query(j) for j in list(pending)))
            if pending:
                await asyncio.sleep(max(0.0, pass_started + 0.05 - time.monotonic()))
        return last

    # -- phases ------------------------------------------------------------------------

    async def create_networks(self) -> None:
        zone = (await self.call("listZones"))["zone"][0]
        offerings = (await self.call("listNetworkOfferings", guestiptype="Isolated"))[
            "networkoffering"
        ]
        offering = next(o for o in offerings if "Firewall" in {s["name"] for s in o["service"]})
        gate = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with gate:
                net = await self.call(
                    "createNetwork",
                    name=f"push-{i}",
                    displaytext=f"push {i}",
                    zoneid=zone["id"],
                    networkofferingid=offering["id"],
                )
            self.networks.append(net["network"]["id"])

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(self.n)))
        log("networks_created", count=len(self.networks), seconds=time.monotonic() - t0)
        for r in (await self.call("listRouters", listall=True))["router"]:
            self.router_of[r["guestnetworkid"]] = r["id"]
        for ip in (await self.call("listPublicIpAddresses", listall=True))["publicipaddress"]:
            if ip.get("issourcenat") and ip.get("associatednetworkid") in self.router_of:
                self.snat[ip["associatednetworkid"]] = ip["id"]
        if len(self.router_of) != self.n or len(self.snat) != self.n:
            raise RuntimeError(
                f"{self.n} networks but {len(self.router_of)} routers, {len(self.snat)} IPs"
            )

    async def connect_routers(self) -> None:
        boot = self.tmp / "routers.jsonl"
        await self.cli("external-bootdata", "--role", "router", "--out", str(boot))
        boots = [json.loads(line) for line in boot.read_text().splitlines()]
        state = self.tmp / "agents"
        state.mkdir(mode=0o700)
        self.routers = RouterAgents(boots, state)
        t0 = time.monotonic()
        enrolled = await self.routers.enrol(16)
        if enrolled["enrolled"] != self.n:
            raise RuntimeError(f"enrolment: {enrolled}")
        res = await self.routers.connect_all(None, "agent", HEARTBEAT, 64, 120)
        if res["live"] != self.n:
            raise RuntimeError(f"only {res['live']}/{self.n} routers connected: {res}")
        # Running = connected and acked its first config (the startRouter jobs end).
        while True:
            routers = (await self.call("listRouters", listall=True))["router"]
            running = sum(1 for r in routers if r["state"] == "Running")
            if running == self.n:
                break
            if time.monotonic() - t0 > 120:
                raise RuntimeError(f"only {running}/{self.n} routers Running after 120 s")
            await asyncio.sleep(0.1)
        self.figures["running_s"] = time.monotonic() - t0
        if self.routers.refused:
            raise RuntimeError(f"routers refused configs: {self.routers.refused}")
        log("routers_running", count=self.n, seconds=self.figures["running_s"])

    async def rule_round(self, r: int) -> None:
        """N createFirewallRule calls at once, one per network."""
        assert self.routers is not None
        port = 20000 + r
        self.routers.expect({self.router_of[nid]: has_port(port) for nid in self.networks})
        cpu0 = proc_sample(self.manager.pid) if self.manager else None
        t0 = time.monotonic()
        started = await asyncio.gather(
            *(
                self.call(
                    "createFirewallRule",
                    ipaddressid=self.snat[nid],
                    protocol="tcp",
                    startport=port,
                    endport=port,
                    cidrlist="203.0.113.0/24",
                )
                for nid in self.networks
            )
        )
        t_api = time.monotonic() - t0
        t_acked = await self.routers.wait_all(60) - t0
        t_jobs = await self.jobs_done([s["jobid"] for s in started], 60) - t0
        lat = sorted(t - t0 for t in self.routers.done_at.values())
        self.note("rules_api_s", t_api)
        self.note("rules_acked_s", t_acked)
        self.note("rules_jobs_s", t_jobs)
        self.note("rules_ack_p50_s", statistics.median(lat))
        if cpu0 is not None and self.manager is not None:
            self.note("rules_cpu_s", proc_sample(self.manager.pid).cpu - cpu0.cpu)
        log(
            "rules_round",
            round=r,
            api_s=t_api,
            all_acked_s=t_acked,
            all_jobs_s=t_jobs,
            ack_p50_s=statistics.median(lat),
        )

    async def setting_round(self, r: int) -> None:
        """One updateConfiguration that changes every router's config."""
        assert self.routers is not None
        value = 600 + r
        self.routers.expect({rid: has_interval(value) for rid in self.router_of.values()})
        t0 = time.monotonic()
        await self.call("updateConfiguration", name="router.stats.interval", value=str(value))
        t_api = time.monotonic() - t0
        t_acked = await self.routers.wait_all(60) - t0
        self.note("setting_api_s", t_api)
        self.note("setting_acked_s", t_acked)
        log("setting_round", round=r, api_s=t_api, all_acked_s=t_acked)

    async def baseline(self) -> None:
        assert self.routers is not None
        configs = dict(self.routers.last_config)
        await self.routers.disconnect_all()
        argv = tls_server_argv(HERE, "_pushsrv", self.home)
        srv = await Child.start("pushsrv", argv, self.tmp / "pushsrv.log")
        try:
            port = (await srv.read(60))["port"]
            url = f"wss://127.0.0.1:{port}/agent"
            res = await self.routers.connect_all(url, "agent", HEARTBEAT, 64, 120)
            if res["live"] != self.n:
                raise RuntimeError(f"baseline: only {res['live']}/{self.n} connected: {res}")
            for r in range(self.rounds):
                version = 1_000_000 + r
                marked = {k: {**v, "bench_version": version} for k, v in configs.items()}
                path = self.tmp / f"push-{r}.json"
                path.write_text(json.dumps(marked))
                self.routers.expect({k: has_version(version) for k in marked})
                t0 = time.monotonic()
                out = await srv.call(90, cmd="push", file=str(path), version=version)
                if "error" in out:
                    raise RuntimeError(f"baseline push: {out['error']}")
                t_acked = await self.routers.wait_all(60) - t0
                self.note("base_acked_s", t_acked)
                log("baseline_round", round=r, all_acked_s=t_acked, server_s=out["acked_s"])
        finally:
            await self.routers.disconnect_all()
            await srv.stop()

    # -- all of it ---------------------------------------------------------------------

    async def run(self) -> dict[str, float]:
        from cs import AIOCloudStack

        await self.start_manager()
        creds = json.loads((self.home / "credentials.json").read_text())
        try:
            async with AIOCloudStack(
                endpoint=creds["endpoint"], key=creds["apikey"], secret=creds["secretkey"]
            ) as api:
                self.api = api
                await self.create_networks()
                await self.connect_routers()
                for r in range(self.rounds):
                    await self.rule_round(r)
                for r in range(self.rounds):
                    await self.setting_round(r)
                await self.baseline()
        finally:
            if self.manager is not None:
                rc = await terminate(self.manager, 30)
                log("manager_stopped", rc=rc)
        out = {k: statistics.median(v) for k, v in self.results.items()}
        return {**self.figures, **out}


def report(n: int, rounds: int, f: Mapping[str, float]) -> str:
    base = f["base_acked_s"]

    def ms(x: float) -> str:
        return f"{x * 1000:.0f}"

    rows = [
        [
            f"{n} createFirewallRule at once -> all {n} routers acked",
            ms(f["rules_acked_s"]),
            ms(base),
            f"{f['rules_acked_s'] / base:.1f}x",
        ],
        [f"  ... -> all {n} async jobs succeeded", ms(f["rules_jobs_s"]), "", ""],
        [f"  ... the {n} API calls answered", ms(f["rules_api_s"]), "", ""],
        ["  ... median router acked", ms(f["rules_ack_p50_s"]), "", ""],
        [
            f"1 updateConfiguration -> all {n} routers acked",
            ms(f["setting_acked_s"]),
            ms(base),
            f"{f['setting_acked_s'] / base:.1f}x",
        ],
    ]
    text = table(rows, [f"median of {rounds} rounds (ms)", "sysvm-manager", "bare push", "ratio"])
    extra = f"routers Running after connect: {f['running_s']:.2f} s"
    if "rules_cpu_s" in f:
        extra += f"; manager CPU per {n}-rule round: {f['rules_cpu_s']:.2f} s"
    return f"{text}\n{extra}"


async def bench(n: int, rounds: int, keep: bool, log_level: str = "WARNING") -> int:
    tmp = Path(tempfile.mkdtemp(prefix="sysvm-push-"))
    try:
        figures = await PushBench(n, rounds, tmp, log_level).run()
    except Exception:
        log("push_failed", logs=str(tmp))
        raise
    print(report(n, rounds, figures), flush=True)
    if keep:
        log("kept", dir=str(tmp))
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--routers", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--keep", action="store_true", help="keep the temporary home and logs")
    p.add_argument("--log-level", default="WARNING", help="the manager's (INFO to debug)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_manager"]:
        return manager_main(argv[1:])
    if argv[:1] == ["_pushsrv"]:
        p = argparse.ArgumentParser()
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
        p.add_argument("--ca", required=True)
        import uvloop

        return uvloop.run(pushsrv_main(p.parse_args(argv[1:])))
    args = parse_args(argv)
    if not 1 <= args.routers <= 2000:
        raise SystemExit("--routers must be between 1 and 2000")
    import uvloop

    return uvloop.run(bench(args.routers, max(1, args.rounds), args.keep, args.log_level))


if __name__ == "__main__":
    sys.exit(main())
