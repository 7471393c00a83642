"""Load figures for the agent endpoint (not a test: no timing assertions; prints numbers).

    .venv/bin/python tests/integration/link/bench_link.py --agents 10000 --interval 5 \
        --procs 4 --measure 30

Starts a real ``sysvm-manager`` (temp home, free ports), creates N External VMs, mints their
client certificates with the manager's CA (enrolment is not what is measured here), then N
simulated agents (split over ``--procs`` client processes) open mutual-TLS websockets, say
hello and heartbeat every ``--interval`` seconds (N / interval heartbeats per second). It
prints the manager's RSS with every agent connected and its CPU use (share of one core) over
``--measure`` seconds, plus the loop-lag quantiles it reports on /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import resource
import signal
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
LAG50 = 'sysvm_loop_lag_seconds{quantile="0.5"}'
LAG99 = 'sysvm_loop_lag_seconds{quantile="0.99"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mint(home: Path, vm_ids: list[str], out: Path) -> None:
    """One shared key, one certificate per VM, signed with the manager's CA."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from manager import pki

    ca_key = serialization.load_pem_private_key((home / "pki/ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    from cryptography import x509

    ca = x509.load_pem_x509_certificate((home / "pki/ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    out.mkdir(exist_ok=True)
    (out / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    now = dt.datetime.now(dt.UTC)
    for vm_id in vm_ids:
        cert = pki.issue(
            ca_key,
            ca,
            public_key=key.public_key(),
            common_name=vm_id,
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
            not_before=now - dt.timedelta(hours=1),
            not_after=now + dt.timedelta(days=1),
            serial=pki.new_serial(),
        )
        (out / f"{vm_id}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


async def client_shard(url: str, certdir: Path, ca: Path, ids: list[str], hold: float) -> None:
    """Runs inside a client process: connects its share of agents and heartbeats."""
    from websockets.asyncio.client import connect

    from protocol import messages as m
    from protocol.codec import MANAGER_TO_AGENT, decode, encode

    connected = 0
    sem = asyncio.Semaphore(100)
    stop_at = time.monotonic() + hold

    async def one(vm_id: str) -> None:
        nonlocal connected
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(str(ca))
        ctx.load_cert_chain(str(certdir / f"{vm_id}.pem"), str(certdir / "key.pem"))
        async with sem:
            for _ in range(5):
                try:
                    ws = await connect(
                        url + "/agent", ssl=ctx, compression=None, ping_interval=None,
                        open_timeout=60, max_queue=4,
                    )  # fmt: skip
                    break
                except Exception:
                    await asyncio.sleep(random.uniform(0.5, 2))
            else:
                return
            await ws.send(encode(m.Hello(versions=[1], agent_version="bench")))
            welcome = decode(await ws.recv(), MANAGER_TO_AGENT)
            assert isinstance(welcome, m.Welcome)
        connected += 1
        interval = welcome.heartbeat_interval
        seq = 0
        await asyncio.sleep(random.uniform(0, interval))
        try:
            while time.monotonic() < stop_at:
                seq += 1
                await ws.send(encode(m.Heartbeat(seq=seq, status={"ok": True})))
                # Drain whatever came (acks, configs) without blocking the heartbeat pace.
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        await asyncio.wait_for(ws.recv(), left)
                    except TimeoutError:
                        break
        finally:
            await ws.close()

    tasks = [asyncio.create_task(one(i)) for i in ids]
    await asyncio.gather(*tasks, return_exceptions=True)


def client_main(args: list[str]) -> None:
    raise_nofile()
    url, certdir, ca, idfile, hold = args
    ids = json.loads(Path(idfile).read_text())
    import uvloop

    uvloop.run(client_shard(url, Path(certdir), Path(ca), ids, float(hold)))


async def bench(n: int, interval: float, procs: int, measure: float) -> None:
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="sysvm-bench-"))
    home = tmp / "home"
    api_port, agent_port = free_port(), free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", SYSVM_LOG_LEVEL="WARNING")
    log = (tmp / "manager.log").open("wb")
    mgr = await asyncio.create_subprocess_exec(
        str(BIN / "sysvm-manager"), "--home", str(home),
        "--api-listen", f"127.0.0.1:{api_port}", "--agent-listen", f"127.0.0.1:{agent_port}",
        stdout=log, stderr=log, env=env, preexec_fn=raise_nofile,
    )  # fmt: skip
    clients: list[asyncio.subprocess.Process] = []
    try:
        import aiohttp

        async def metrics() -> dict[str, float]:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://127.0.0.1:{api_port}/metrics") as r,
            ):
                text = await r.text()
            out = {}
            for line in text.splitlines():
                if line and not line.startswith("#"):
                    k, _, v = line.rpartition(" ")
                    out[k] = float(v)
            return out

        for _ in range(300):
            try:
                await metrics()
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        base_rss = rss_mib(mgr.pid)
        # Heartbeat interval for the fleet (agents learn it from welcome; here fixed).
        from cs import CloudStack

        creds = json.loads((home / "credentials.json").read_text())
        cs = CloudStack(endpoint=creds["endpoint"], key=creds["apikey"], secret=creds["secretkey"])
        cs.updateConfiguration(name="sysvm.agent.heartbeat.interval", value=str(interval))
        out = tmp / "boot.jsonl"
        p = await asyncio.create_subprocess_exec(
            str(BIN / "sysvm-manager"), "--home", str(home),
            "--agent-listen", f"127.0.0.1:{agent_port}",
            "create-external-vms", "--role", "ssvm", "--count", str(n), "--out", str(out),
            env=env,
        )  # fmt: skip
        assert await p.wait() == 0
        ids = [json.loads(line)["vm_id"] for line in out.read_text().splitlines()]
        t0 = time.monotonic()
        mint(home, ids, tmp / "certs")
        print(f"minted {n} certificates in {time.monotonic() - t0:.1f}s", flush=True)
        hold = 3600.0  # clients run until this script kills them
        for k in range(procs):
            shard = ids[k::procs]
            idfile = tmp / f"ids-{k}.json"
            idfile.write_text(json.dumps(shard))
            clients.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--client",
                    f"wss://127.0.0.1:{agent_port}",
                    str(tmp / "certs"),
                    str(home / "pki/ca.pem"),
                    str(idfile),
                    str(hold),
                    env=env,
                )
            )
        t0 = time.monotonic()
        while True:
            mt = await metrics()
            c = mt.get("sysvm_agents_connected", 0)
            if c >= n * 0.995 or time.monotonic() - t0 > 60 + n / 20:
                break
            await asyncio.sleep(1)
        print(f"connected={int(c)} in {time.monotonic() - t0:.1f}s", flush=True)
        await asyncio.sleep(interval * 2)  # let heartbeats reach steady state
        hb0 = (await metrics()).get("sysvm_heartbeats_total", 0)
        cpu0, w0 = cpu_seconds(mgr.pid), time.monotonic()
        prof = None
        if os.environ.get("BENCH_PROFILE"):
            prof = await asyncio.create_subprocess_exec(
                str(BIN / "py-spy"), "record", "--pid", str(mgr.pid), "-d", str(int(measure)),
                "-f", "raw", "-o", os.environ["BENCH_PROFILE"], "--nonblocking",
            )  # fmt: skip
        await asyncio.sleep(measure)
        if prof is not None:
            await prof.wait()
        mt = await metrics()
        hb1, cpu1, w1 = mt.get("sysvm_heartbeats_total", 0), cpu_seconds(mgr.pid), time.monotonic()
        rate = (hb1 - hb0) / (w1 - w0)
        cpu = (cpu1 - cpu0) / (w1 - w0)
        rss = rss_mib(mgr.pid)
        print(
            f"agents={int(mt.get('sysvm_agents_connected', 0))} rss_mib={rss:.0f} "
            f"(idle {base_rss:.0f}) rss_per_agent_kib={(rss - base_rss) * 1024 / max(1, c):.1f} "
            f"heartbeats_per_s={rate:.0f} cpu_share_of_one_core={cpu:.3f} "
            f"cpu_per_1000_hb={cpu / max(rate, 1) * 1000:.3f} "
            f"loop_lag_p50={mt.get(LAG50, 0):.4f} loop_lag_p99={mt.get(LAG99, 0):.4f}",
            flush=True,
        )
    finally:
        for cp in clients:
            if cp.returncode is None:
                cp.kill()
                await cp.wait()
        mgr.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(mgr.wait(), 60)
        except TimeoutError:
            mgr.kill()
            await mgr.wait()
        log.close()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser()
    p.add_argument("--agents", type=int, default=2000)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--measure", type=float, default=20.0)
    a = p.parse_args()
    import uvloop

    uvloop.run(bench(a.agents, a.interval, a.procs, a.measure))


if __name__ == "__main__":
    main()
