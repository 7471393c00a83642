"""The whole lifecycle through the API, on the embedded hypervisor: a real ``sysvm-manager``
with the lifecycle loop on, the real image booted by the nspawn driver, agents enrolling over
mutual TLS through the zone's control bridge, and the ``cs`` client driving
startSystemVm / stopSystemVm / rebootSystemVm / destroySystemVm, listTemplates and
registerTemplate. One manager is shared by every step (they build on each other)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cs import CloudStack, CloudStackApiException

from manager.hypervisor.cleanup import cleanup_all
from tests.system.helpers import TIMING_FACTOR, wait_for

pytestmark = pytest.mark.system
BIN = Path(sys.executable).parent
BOOT_TIMEOUT = 90.0  # an nspawn boot + enrolment takes seconds; this is the failure bound


def free_port_any() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


class Manager:
    """A ``sysvm-manager`` subprocess and a ``cs`` client for its API."""

    def __init__(self, home: Path, log: Path, argv: list[str], env: dict[str, str]) -> None:
        self.home, self.log, self.argv, self.env = home, log, argv, env
        self.proc: asyncio.subprocess.Process | None = None
        self.client: CloudStack | None = None

    async def start(self) -> None:
        start_at = len(read(self.log))
        with self.log.open("ab") as f:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=f, stderr=f, env=self.env
            )
        await wait_for(
            lambda: "event=manager_ready" in read(self.log)[start_at:] or self.exited(),
            30,
            "manager ready",
        )
        assert not self.exited(), read(self.log)[-3000:]
        creds = json.loads((self.home / "credentials.json").read_text())
        self.client = CloudStack(
            endpoint=creds["endpoint"], key=creds["apikey"], secret=creds["secretkey"], timeout=30
        )

    def exited(self) -> bool:
        return self.proc is not None and self.proc.returncode is not None

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), 60)

    async def call(self, command: str, **params: Any) -> Any:
        assert self.client is not None
        return await asyncio.to_thread(getattr(self.client, command), **params)

    async def job(self, command: str, timeout: float = 120, **params: Any) -> dict[str, Any]:
        """An async command, then queryAsyncJobResult until it is done (polled, bounded)."""
        started = await self.call(command, **params)
        deadline = time.monotonic() + timeout * TIMING_FACTOR
        while True:
            res: dict[str, Any] = await self.call("queryAsyncJobResult", jobid=started["jobid"])
            if res["jobstatus"] != 0:
                return res
            assert time.monotonic() < deadline, f"{command} still pending after {timeout} s"
            await asyncio.sleep(0.1)

    async def vms(self, **filters: str) -> list[dict[str, Any]]:
        res = await self.call("listSystemVms", **filters)
        return list(res.get("systemvm", []))

    async def running(self, vmtype: str) -> dict[str, Any] | None:
        vms = await self.vms(systemvmtype=vmtype)
        up = [v for v in vms if v["state"] == "Running" and v.get("agentstate") == "Up"]
        return up[0] if up else None


def leader_of(home: Path, vm_id: str) -> int:
    run = json.loads((home / "vms" / "nspawn" / vm_id / "run.json").read_text())
    return int(run["leader"])


async def in_vm(home: Path, vm_id: str, *argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "nsenter", "-t", str(leader_of(home, vm_id)), "-a", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return out.decode(errors="replace").strip()


def set_zone_networks(db: Path, control: str, public: str) -> None:
    """The default zone's link-local control network and public range, per run (parallel
    runs and other tests must not put one subnet on two bridges)."""
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE zones SET linklocal_cidr = ?, public_cidr = ?", (control, public))


def public_net() -> str:
    """This run's public /24: CGNAT space (never 192.0.2.0/24, the host's uplink), apart
    from the console system test's 100.96-127."""
    pid = os.getpid()
    return f"100.{64 + pid % 32}.{(pid // 32) % 250}.0/24"


def http_status(url: str) -> int | None:
    """Status of a GET straight to ``url`` (no proxy); None if nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError):
        return None


@pytest.mark.parametrize("host_prefix", ["l"], indirect=True)
async def test_system_vms_through_the_api(
    tmp_path: Path, host_prefix: str, sysvm_image: Path, free_port: Callable[[], int]
) -> None:
    net = 100 + os.getpid() % 100
    host_ip = f"169.254.{net}.1"
    api_port, agent_port = free_port(), free_port_any()
    home = tmp_path / "home"
    mlog = tmp_path / "manager.log"
    version = json.loads((sysvm_image / "manifest.json").read_text())["version"]
    env = {
        **os.environ,
        "SYSVM_HOME": str(home),
        "SYSVM_AGENT_URLS": f"wss://{host_ip}:{agent_port}",
        "SYSVM_HOST_PREFIX": host_prefix,
        "SYSVM_IMAGE": str(sysvm_image),
        "SYSVM_LOG_LEVEL": "INFO",
        "SYSVM_LIFECYCLE_INTERVAL": "1",
    }
    env.pop("SYSVM_LIFECYCLE", None)
    argv = [str(BIN / "sysvm-manager"), "--api-listen", f"127.0.0.1:{api_port}",
            "--agent-listen", f"0.0.0.0:{agent_port}"]  # fmt: skip
    # first start without the loop: bootstrap, then give the zone this run's control network
    mgr = Manager(home, mlog, argv, env)
    try:
        await mgr.start()
        await mgr.stop()
        set_zone_networks(home / "sysvm.db", f"169.254.{net}.0/24", public_net())
        mgr = Manager(home, mlog, argv, {**env, "SYSVM_LIFECYCLE": "on"})
        await mgr.start()
        await _steps(mgr, home, mlog, version, ipaddress.ip_network(public_net()))
    finally:
        await mgr.stop()
        log_text = read(mlog)
        print(log_text[-2500:])
    assert mgr.proc is not None and mgr.proc.returncode == 0
    assert "event=vm_stop_on_close_failed" not in log_text
    # the manager stopped its VMs (no process, no mount left); the stopped VMs' namespaces
    # and veths are what scripts/run's exit cleanup removes — as here. The host_prefix
    # fixture then asserts that nothing at all is left.
    rep = await cleanup_all(host_prefix)
    assert rep.processes == [] and rep.mounts == [] and rep.cgroups == [], rep


async def _steps(
    mgr: Manager, home: Path, mlog: Path, version: str, public: ipaddress.IPv4Network
) -> None:
    # ---- the default system template is the image built by scripts/build-image
    tpls = (await mgr.call("listTemplates", templatefilter="all", templatetype="SYSTEM"))[
        "template"
    ]
    builtin = {t["hypervisor"]: t for t in tpls if t["name"] == f"systemvm-{version}"}
    assert set(builtin) == {"Embedded", "KVM"}, tpls
    assert builtin["Embedded"]["format"] == "DIR" and builtin["Embedded"]["isready"] is True
    with pytest.raises(CloudStackApiException) as bad:
        await mgr.call("listTemplates")  # templatefilter is required, as in CloudStack
    assert bad.value.error["errorcode"] == 431

    # ---- the loop brings up the zone's CPVM and SSVM; their agents enrol over mTLS
    cp = await wait_for(lambda: mgr.running("consoleproxy"), BOOT_TIMEOUT, "CPVM Running")
    ss = await wait_for(lambda: mgr.running("secondarystoragevm"), BOOT_TIMEOUT, "SSVM Running")
    for v in (cp, ss):
        assert v["version"] == version
        assert v["templateid"] == builtin["Embedded"]["id"]
        assert v["templatename"] == builtin["Embedded"]["name"]
        assert v["hypervisor"] == "Embedded"
        assert v["linklocalip"].startswith("169.254.")
        assert await in_vm(home, v["id"], "systemctl", "is-active", "sysvm-agent") == "active"
        # eth1 on the zone's public bridge: an address of the zone's public range (not the
        # gateway, which the host holds), the default route through that gateway
        ip = ipaddress.ip_address(v["publicip"])
        assert ip in public and ip != public.network_address + 1, v
        addrs = await in_vm(home, v["id"], "ip", "-4", "-o", "addr", "show", "dev", "eth1")
        assert f"{ip}/{public.prefixlen}" in addrs, addrs
        route = await in_vm(home, v["id"], "ip", "-4", "route", "show", "default")
        assert f"via {public.network_address + 1} dev eth1" in route, route
    assert cp["publicip"] != ss["publicip"]
    assert "event=enrolled" in read(mlog)

    # ---- the CPVM's console server listens on its public IP, reachable from the host
    page = f"http://{cp['publicip']}/console"
    await wait_for(lambda: asyncio.to_thread(http_status, page), 30, f"an answer from {page}")
    assert await asyncio.to_thread(http_status, page) == 200

    # ---- kill the SSVM's container: the manager notices, alerts, and restarts it
    old_leader = leader_of(home, ss["id"])
    os.kill(old_leader, signal.SIGKILL)

    async def alerted() -> bool:
        res = await mgr.call("listAlerts", name="ALERT.SERVICE.SSVM")
        return any("crashed" in a["description"] for a in res.get("alert", []))

    await wait_for(alerted, 30, "an SSVM alert after the container was killed")
    events = (await mgr.call("listEvents", type="SSVM.RESTART"))["event"]
    assert events and events[0]["resourceid"] == ss["id"]

    async def back() -> bool:
        v = await mgr.running("secondarystoragevm")
        return v is not None and v["id"] == ss["id"] and leader_of(home, ss["id"]) != old_leader

    await wait_for(back, BOOT_TIMEOUT, "the killed SSVM Running again")
    assert await in_vm(home, ss["id"], "systemctl", "is-active", "sysvm-agent") == "active"

    # ---- stop / start / reboot the CPVM through the API
    res = await mgr.job("stopSystemVm", id=cp["id"])
    assert res["jobstatus"] == 1, res
    stopped = res["jobresult"]["systemvm"]
    assert stopped["state"] == "Stopped" and stopped["id"] == cp["id"]
    assert stopped["sessionscut"] == 0
    assert [v["state"] for v in await mgr.vms(id=cp["id"])] == ["Stopped"]
    stop_events = [
        e["description"]
        for e in (await mgr.call("listEvents", type="PROXY.STOP", resourceid=cp["id"]))["event"]
    ]
    assert {"stopping", "stopped"} <= set(stop_events)
    with pytest.raises(CloudStackApiException) as bad:
        await mgr.call("rebootSystemVm", id=cp["id"])  # only a Running VM reboots
    assert bad.value.error["errorcode"] == 431

    t0 = time.monotonic()
    res = await mgr.job("startSystemVm", id=cp["id"])
    boot_to_enrolled = time.monotonic() - t0
    assert res["jobstatus"] == 1, res
    started = res["jobresult"]["systemvm"]
    assert started["state"] == "Running" and started["agentstate"] == "Up"
    assert started["templatename"] == f"systemvm-{version}"
    print(f"nspawn startSystemVm -> agent connected: {boot_to_enrolled:.2f} s")

    leader = leader_of(home, cp["id"])
    res = await mgr.job("rebootSystemVm", id=cp["id"])
    assert res["jobstatus"] == 1, res
    assert res["jobresult"]["systemvm"]["state"] == "Running"
    assert leader_of(home, cp["id"]) != leader
    reboots = (await mgr.call("listEvents", type="PROXY.REBOOT", resourceid=cp["id"]))["event"]
    assert len(reboots) == 1

    # ---- a registered template named by router.template.embedded is used by new VMs only
    with pytest.raises(CloudStackApiException) as bad:
        await mgr.call(
            "registerTemplate", name="web", displaytext="web", format="DIR",
            hypervisor="Embedded", url="https://example.com/systemvm.qcow2",
        )  # fmt: skip
    assert bad.value.error["errorcode"] == 431
    reg = await mgr.call(
        "registerTemplate", name="sysvm-custom", displaytext="pinned image", format="DIR",
        hypervisor="Embedded", url=Path(mgr.env["SYSVM_IMAGE"]).name,  # the image id
        templatetype="SYSTEM",
    )  # fmt: skip
    custom = reg["template"][0]
    assert custom["templatetype"] == "SYSTEM" and custom["version"] == version
    await mgr.call("updateConfiguration", name="router.template.embedded", value="sysvm-custom")

    # ---- destroy the CPVM: Destroyed, then the loop creates a new one (on the new template)
    res = await mgr.job("destroySystemVm", id=cp["id"])
    assert res["jobstatus"] == 1, res
    assert res["jobresult"]["systemvm"]["state"] == "Destroyed"
    assert not (home / "vms" / "nspawn" / cp["id"]).exists()

    async def replaced() -> dict[str, Any] | None:
        v = await mgr.running("consoleproxy")
        return v if v is not None and v["id"] != cp["id"] else None

    new_cp = await wait_for(replaced, BOOT_TIMEOUT, "a new CPVM after destroySystemVm")
    assert new_cp["templateid"] == custom["id"]
    assert [v["templateid"] for v in await mgr.vms(id=ss["id"])] == [builtin["Embedded"]["id"]]
    assert [v["state"] for v in await mgr.vms(id=cp["id"])] == ["Destroyed"]
    # a destroyed VM gives its public IP back; the new one has one of the range
    assert [v.get("publicip") for v in await mgr.vms(id=cp["id"])] == [None]
    assert ipaddress.ip_address(new_cp["publicip"]) in public
    assert new_cp["publicip"] != ss["publicip"]
    with pytest.raises(CloudStackApiException) as bad:
        await mgr.call("startSystemVm", id=cp["id"])
    assert bad.value.error["errorcode"] == 431

    # ---- a driver failure: a template whose rootfs is no OS tree (nspawn refuses to boot it)
    broken = home.parent / "broken-image"
    (broken / "rootfs" / "etc").mkdir(parents=True)
    (broken / "rootfs" / "etc" / "sysvm-release").write_text("0.0.0+broken\n")
    (broken / "manifest.json").write_text(json.dumps({"version": "0.0.0+broken"}))
    await mgr.call(
        "registerTemplate", name="broken", displaytext="no OS", format="DIR",
        hypervisor="Embedded", url=f"file://{broken}",
    )  # fmt: skip
    await mgr.call("updateConfiguration", name="router.template.embedded", value="broken")
    res = await mgr.job("destroySystemVm", id=new_cp["id"])
    assert res["jobstatus"] == 1, res

    async def errored() -> dict[str, Any] | None:
        vms = await mgr.vms(systemvmtype="consoleproxy", state="Error")
        return vms[0] if vms else None

    bad_cp = await wait_for(errored, 30, "the CPVM on the broken template in Error")
    res = await mgr.job("startSystemVm", id=bad_cp["id"])
    assert res["jobstatus"] == 2 and res["jobresult"]["errorcode"] == 530, res
    assert "start failed" in res["jobresult"]["errortext"] or "no container" in str(res)
    alerts = (await mgr.call("listAlerts", name="ALERT.SERVICE.CONSOLEPROXY"))["alert"]
    assert any(bad_cp["name"] in a["subject"] and "start failed" in a["description"]
               for a in alerts), alerts  # fmt: skip
    # the manager keeps serving; back to the default template, the loop recovers the zone
    await mgr.call("resetConfiguration", name="router.template.embedded")
    res = await mgr.job("destroySystemVm", id=bad_cp["id"])
    assert res["jobstatus"] == 1, res

    async def recovered() -> dict[str, Any] | None:
        v = await mgr.running("consoleproxy")
        return v if v is not None and v["id"] not in (cp["id"], new_cp["id"]) else None

    final = await wait_for(recovered, BOOT_TIMEOUT, "a working CPVM again")
    assert final["templateid"] == builtin["Embedded"]["id"]
    assert not mgr.exited()
    _print_first_boot(read(mlog))


def _print_first_boot(log_text: str) -> None:
    """Boot-to-enrolled of the first CPVM (loop create -> enrolled -> agent connected)."""

    def ts(line: str) -> float:
        stamp = line.split("ts=", 1)[1].split()[0]
        return time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + float(stamp[19:-1])

    lines = log_text.splitlines()
    create = next(x for x in lines if "kind=create" in x and "role=consoleproxy" in x)
    enrolled = next(x for x in lines if "event=enrolled" in x and "name=v-" in x)
    connected = next(x for x in lines if "event=agent_connected" in x and "name=v-" in x)
    print(
        f"nspawn first boot: create -> enrolled {ts(enrolled) - ts(create):.2f} s, "
        f"-> agent connected {ts(connected) - ts(create):.2f} s"
    )
