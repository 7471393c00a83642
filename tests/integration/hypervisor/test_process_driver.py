"""The process driver with the real ``sysvm-agent``: its own network namespace and NICs on a
real bridge, clean stop, crash detection, reboot, destroy, cleanup of everything."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from manager import netplumb
from manager.hypervisor.base import (
    DriverError,
    NicSpec,
    PowerState,
    VmSpec,
    bridge_name,
    netns_name,
)
from manager.hypervisor.cleanup import cleanup_all, leftovers
from manager.hypervisor.process import ProcessDriver

TIMING_FACTOR = float(os.environ.get("SYSVM_TEST_TIMING", "1"))


async def until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout * TIMING_FACTOR
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def prefix(netns_prefix: str) -> AsyncIterator[str]:
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root (CI runs as root)")
    p = f"{netns_prefix}p"
    await cleanup_all(p)
    yield p
    rep = await cleanup_all(p)
    rep.links = [x for x in rep.links if x[len(p)] != "b"]  # zone bridges outlive VMs
    assert rep.empty(), f"left behind: {rep}"


def spec(prefix: str, vm_id: str) -> VmSpec:
    net = 50 + os.getpid() % 150
    zone = str(uuid.uuid4())
    boot = {
        "vm_id": vm_id, "name": "v-9-VM", "role": "consoleproxy", "zone_id": zone,
        "manager_urls": [f"wss://169.254.{net}.1:1"], "ca_fingerprint": "sha256:" + "0" * 64,
        "token": "x" * 32, "extra": {},
    }  # fmt: skip
    return VmSpec(
        vm_id=vm_id,
        name="v-9-VM",
        role="consoleproxy",
        boot_data=boot,
        nics=(
            NicSpec(
                "control",
                bridge_name(prefix, zone, "control"),
                f"169.254.{net}.9/24",
                bridge_address=f"169.254.{net}.1/24",
            ),
        ),
    )


async def test_process_vm_lifecycle(tmp_path: Path, prefix: str) -> None:
    drv = ProcessDriver(tmp_path / "vms", prefix)
    vm_id = str(uuid.uuid4())
    s = spec(prefix, vm_id)
    try:
        await drv.start(s)
        assert await drv.state(vm_id) is PowerState.RUNNING
        pid = drv.run_info(vm_id)["pid"]
        # the agent lives in the VM's namespace, with its NIC and address
        ns = netns_name(prefix, vm_id)
        await until(lambda: pid in netplumb.netns_pids(ns), 5, "the agent inside its netns")
        out = await netplumb.run(
            ["ip", "-n", netns_name(prefix, vm_id), "-j", "addr", "show", "eth0"]
        )
        assert json.loads(out)[0]["addr_info"][0]["local"] == s.nics[0].address.split("/")[0]  # type: ignore[union-attr]
        await until(lambda: "event=" in (drv.vmdir(vm_id) / "console.log").read_text(), 20,
                    "the agent's first log line")  # fmt: skip
        bd = json.loads((drv.vmdir(vm_id) / "bootdata.json").read_text())
        assert bd["extra"]["nics"][0]["name"] == "eth0"
        assert (drv.vmdir(vm_id) / "bootdata.json").stat().st_mode & 0o777 == 0o600
        log_text = await drv.console_log(vm_id)
        assert "x" * 32 not in log_text  # the token never reaches a log

        # starting a running VM is a no-op
        await drv.start(s)
        assert drv.run_info(vm_id)["pid"] == pid

        # clean stop (SIGTERM): the agent exits by itself well before the timeout
        t0 = time.monotonic()
        await drv.stop(vm_id, timeout=15)
        assert time.monotonic() - t0 < 10
        assert await drv.state(vm_id) is PowerState.STOPPED

        # reboot from stopped = start; then a crash is reported as such
        await drv.reboot(vm_id, timeout=5)
        assert await drv.state(vm_id) is PowerState.RUNNING
        os.kill(drv.run_info(vm_id)["pid"], signal.SIGKILL)

        async def crashed() -> bool:
            return await drv.state(vm_id) is PowerState.CRASHED

        await until(crashed, 10, "crash detection")

        # a driver that did not start it (manager restart) still sees and stops it
        await drv.start(s)
        other = ProcessDriver(tmp_path / "vms", prefix)
        assert await other.state(vm_id) is PowerState.RUNNING
        await other.stop(vm_id, timeout=10)
        assert await drv.state(vm_id) is PowerState.STOPPED
        await other.close()
    finally:
        await drv.destroy(vm_id)
        await drv.close()
    assert await drv.state(vm_id) is PowerState.ABSENT
    left = await leftovers(prefix)
    assert not left.processes and not left.netns, left


async def test_force_stop_after_timeout_and_clear_errors(tmp_path: Path, prefix: str) -> None:
    # an "agent" that ignores SIGTERM: the stop must be forced after the timeout
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    stubborn = ["python3", "-c", code]
    drv = ProcessDriver(tmp_path / "vms", prefix, agent=stubborn)
    vm_id = str(uuid.uuid4())
    try:
        await drv.start(spec(prefix, vm_id))
        await until(lambda: "up" in (drv.vmdir(vm_id) / "console.log").read_text(), 10, "stub up")
        t0 = time.monotonic()
        await drv.stop(vm_id, timeout=0.5)
        took = time.monotonic() - t0
        assert 0.5 <= took < 5, took
        assert await drv.state(vm_id) is PowerState.STOPPED
        with pytest.raises(DriverError, match="unknown to the process driver"):
            await drv.stop(str(uuid.uuid4()))
        with pytest.raises(DriverError, match="bad vm id"):
            drv.vmdir("../x")
        # a "bridge" that is not one makes start fail cleanly, nothing left behind
        bad = VmSpec(vm_id=str(uuid.uuid4()), name="x", role="consoleproxy", boot_data={},
                     nics=(NicSpec("control", "lo"),))  # fmt: skip
        with pytest.raises(DriverError, match=r"start failed.*master lo"):
            await drv.start(bad)
        assert not netplumb.list_netns(netns_name(prefix, bad.vm_id))
        await drv.destroy(bad.vm_id)
    finally:
        await drv.destroy(vm_id)
        await drv.close()
