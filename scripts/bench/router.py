"""Router apply benchmark: N firewall + port-forwarding rules and 5,000 DHCP entries,
applied-and-verified by the router role, against CloudStack's way (one ``iptables`` call
per rule) measured in the same run, in a throwaway network namespace.

    sudo .venv/bin/python scripts/bench/router.py [--sizes 1000,10000] [--dhcp 5000] [--runs 3]
        [--push 100]

Prints one line per measurement and the ratio to the baseline. Needs root (netns,
iptables) and the router's daemons (dnsmasq, haproxy, apache2, openssh-server).

Then (``--push N``, default 100; 0 skips) ``router_push.py``: a change pushed to N routers
at once through a real manager, against a bare websockets push of the same configs.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def config(n_rules: int, n_dhcp: int) -> dict[str, Any]:
    half = n_rules // 2
    fw = [
        {
            "public_ip": "198.51.100.10",
            "protocol": "tcp",
            "ports": 1 + i % 60000,
            "source_cidrs": [f"10.{(i // 250) % 250}.{i % 250}.0/24"],
        }
        for i in range(half)
    ]
    pf = [
        {
            "public_ip": "198.51.100.11",
            "protocol": "tcp",
            "public_ports": 1 + i,
            "guest_ip": f"10.20.{(i // 250) % 250}.{2 + i % 250}",
            "guest_ports": 80,
        }
        for i in range(n_rules - half)
    ]
    dhcp = [
        {
            "mac": f"02:00:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}",
            "ip": f"10.20.{(i // 250) % 250}.{2 + i % 250}",
            "hostname": f"vm-{i}",
        }
        for i in range(n_dhcp)
    ]
    return {
        "router": {
            "interfaces": {
                "public": {"device": "pub0", "ips": ["198.51.100.10", "198.51.100.11"]},
                "guest": {"device": "gst0", "gateway": "10.20.0.1", "cidr": "10.20.0.0/16"},
            },
            "firewall": fw,
            "port_forwarding": pf,
            "source_nat": "198.51.100.10",
            "dhcp": dhcp,
            "stats": {"interval": 0},
        }
    }


def per_rule_argvs(n_rules: int) -> list[list[str]]:
    """The same rules as separate ``iptables`` calls (CloudStack's VR scripts' way)."""
    half = n_rules // 2
    out = [["iptables", "-t", "filter", "-N", "CS-FW"], ["iptables", "-t", "nat", "-N", "CS-PF"]]
    for i in range(half):
        out.append(
            [
                "iptables",
                "-t",
                "filter",
                "-A",
                "CS-FW",
                "-s",
                f"10.{(i // 250) % 250}.{i % 250}.0/24",
                "-p",
                "tcp",
                "-m",
                "conntrack",
                "--ctorigdst",
                "198.51.100.10",
                "--ctorigdstport",
                str(1 + i % 60000),
                "-j",
                "ACCEPT",
            ]
        )
    for i in range(n_rules - half):
        out.append(
            [
                "iptables",
                "-t",
                "nat",
                "-A",
                "CS-PF",
                "-d",
                "198.51.100.11/32",
                "-i",
                "pub0",
                "-p",
                "tcp",
                "-m",
                "tcp",
                "--dport",
                str(1 + i),
                "-j",
                "DNAT",
                "--to-destination",
                f"10.20.{(i // 250) % 250}.{2 + i % 250}:80",
            ]
        )
    return out


def phases(role: Any) -> str:
    marks = sorted(role.last_phases.items(), key=lambda kv: kv[1])
    return " ".join(f"{a}={b_t - a_t:.3f}" for (a, a_t), (_b, b_t) in itertools.pairwise(marks))


def t0_parse(role: Any, t0: float) -> float:
    return float(role.last_phases.get("prepare", t0) - t0)


CPU: list[float] = []  # CPU seconds (ours + children) of each timed call


def _cpu() -> float:
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


async def timed(coro: Any) -> float:
    """Wall seconds of ``coro``; its CPU seconds (a load-independent view on a busy
    machine) go to CPU."""
    c0, t0 = _cpu(), time.monotonic()
    await coro
    CPU.append(_cpu() - c0)
    return time.monotonic() - t0


async def inner(sizes: list[int], n_dhcp: int, runs: int, run_dir: Path) -> None:
    from agent.roles.base import RoleContext
    from agent.roles.router.proc import run
    from agent.roles.router.role import RouterRole

    ctx = RoleContext(
        vm_id="bench",
        name="r-bench",
        zone_id="z",
        role="domainrouter",
        state_dir=run_dir / "state",
        extra={"router_run_dir": str(run_dir / "run")},
    )
    role = RouterRole(ctx)
    await role.start(None)
    first = await timed(role.apply(config(0, 0)))
    print(f"first apply (daemons started, no rules): {first:.3f} s")
    print(f"load average: {os.getloadavg()[0]:.1f} (best of {runs} runs shown, median after /)")
    try:
        for n in sizes:
            times, cpu = [], []
            for _ in range(runs):
                await role.apply(config(0, 0))
                times.append(await timed(role.apply(config(n, 0))))
                cpu.append(CPU[-1])
            print(f"  phases of the last run: {phases(role)}; CPU s per apply: {min(cpu):.3f}")
            again = await timed(role.apply(config(n, 0)))
            # Baseline: one iptables call per rule, same rules, fresh chains.
            argvs = per_rule_argvs(n)
            t0 = time.monotonic()
            for argv in argvs:
                await run(argv, limit=30)
            base = time.monotonic() - t0
            for t, c in (("filter", "CS-FW"), ("nat", "CS-PF")):
                await run(["iptables", "-t", t, "-F", c], limit=60)
                await run(["iptables", "-t", t, "-X", c], limit=60)
            best, med = min(times), statistics.median(times)
            print(
                f"rules={n}: sysvm apply+verify {best:.3f} / {med:.3f} s; "
                f"same config again {again:.3f} s; per-rule iptables {base:.3f} s; "
                f"ratio {base / best:.1f}x (vs median {base / med:.1f}x)"
            )
            await role.apply(config(0, 0))
        times = []
        for _ in range(runs):
            await role.apply(config(0, 0))
            times.append(await timed(role.apply(config(0, n_dhcp))))
        cfg = config(0, n_dhcp)
        cfg["router"]["dhcp"].pop()
        change = await timed(role.apply(cfg))
        print(
            f"dhcp={n_dhcp}: sysvm apply+verify {min(times):.3f} / "
            f"{statistics.median(times):.3f} s (dnsmasq SIGHUP); one entry removed {change:.3f} s"
        )
    finally:
        await role.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--dhcp", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--push", type=int, default=100, help="then push a change to N routers at once (0: skip)"
    )
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x]
    if args.inner:
        asyncio.run(inner(sizes, args.dhcp, args.runs, Path(args.inner)))
        return
    ns = f"bench{os.getpid() % 100000}r"
    run_dir = Path(tempfile.mkdtemp(prefix=f"sysvm-{ns}-", dir="/run"))
    os.chmod(run_dir, 0o755)
    try:
        for argv in (
            ["ip", "netns", "add", ns],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "link", "add", "pub0", "type", "veth", "peer", "name", "pubp"],
            ["ip", "-n", ns, "link", "add", "gst0", "type", "veth", "peer", "name", "gstp"],
            ["ip", "-n", ns, "link", "set", "pubp", "up"],
            ["ip", "-n", ns, "link", "set", "gstp", "up"],
        ):
            subprocess.run(argv, check=True, timeout=30)
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                __file__,
                "--inner",
                str(run_dir),
                "--sizes",
                args.sizes,
                "--dhcp",
                str(args.dhcp),
                "--runs",
                str(args.runs),
            ],
            check=True,
            timeout=1800,
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)
        shutil.rmtree(run_dir, ignore_errors=True)
    if args.push:
        print(f"config push to {args.push} routers at once (router_push.py):", flush=True)
        here = Path(__file__).resolve().parent
        cmd = [sys.executable, str(here / "router_push.py"), "-n", str(args.push)]
        subprocess.run([*cmd, "--rounds", str(args.runs)], check=True, timeout=1800)


if __name__ == "__main__":
    main()
