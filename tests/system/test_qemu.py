"""QEMU smoke test: the disk image boots under QEMU (TCG here: /dev/kvm does not work on
this machine), systemd comes up and starts the agent, which found its boot data on fw_cfg,
configured its control NIC and enrolled over mutual TLS with a real ``sysvm-manager`` on the
host (through the control bridge the driver wires), then connected on ``/agent`` and
reported the image version. One boot: the slowest test of the suite (software emulation)."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest

from manager.hypervisor.base import NicSpec, PowerState, VmSpec, bridge_name
from manager.hypervisor.qemu import QemuDriver
from tests.system.helpers import (
    external_bootdata,
    free_port_any,
    manager_argv,
    read,
    start_manager,
    wait_for,
)

pytestmark = pytest.mark.system
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def stored_image_version(home: Path, vm_id: str) -> str | None:
    """The image version the manager recorded from the agent's hello (read-only)."""
    db = sqlite3.connect(f"file:{home / 'sysvm.db'}?mode=ro", uri=True, timeout=10)
    try:
        row = db.execute("SELECT image_version FROM system_vms WHERE id = ?", (vm_id,)).fetchone()
    finally:
        db.close()
    return None if row is None else row[0]


@pytest.mark.parametrize("host_prefix", ["q"], indirect=True)
async def test_qemu_boots_image_and_agent_enrols(
    tmp_path: Path, host_prefix: str, sysvm_image: Path, free_port
) -> None:  # type: ignore[no-untyped-def]
    net = 200 + os.getpid() % 50
    host_ip = f"169.254.{net}.1"
    api_port, agent_port = free_port(), free_port_any()
    home = tmp_path / "home"
    env = {
        **os.environ,
        "SYSVM_AGENT_URLS": f"wss://{host_ip}:{agent_port}",
        "SYSVM_LOG_LEVEL": "INFO",
        "SYSVM_HOST_PREFIX": host_prefix,
    }
    mlog = tmp_path / "manager.log"
    argv = manager_argv(home, api_port, agent_port)
    mgr = await start_manager(argv, mlog, env)
    driver = QemuDriver(tmp_path / "vms", host_prefix, image_dir=sysvm_image)
    vm_id = ""
    try:
        await wait_for(lambda: "event=manager_ready" in read(mlog), 30, "manager ready")
        out = tmp_path / "boot.jsonl"
        boot = await external_bootdata(argv, "secondarystorage", out, env)
        vm_id = boot["vm_id"]
        assert boot["manager_urls"] == [f"wss://{host_ip}:{agent_port}"]

        spec = VmSpec(
            vm_id=vm_id,
            name=boot["name"],
            role=boot["role"],
            boot_data=boot,
            memory_mb=512,
            nics=(
                NicSpec(
                    kind="control",
                    bridge=bridge_name(host_prefix, boot["zone_id"], "control"),
                    address=f"169.254.{net}.10/24",
                    bridge_address=f"{host_ip}/24",
                ),
            ),
        )
        t0 = time.monotonic()
        await driver.start(spec)
        assert await driver.state(vm_id) is PowerState.RUNNING

        async def agent_started() -> bool:
            log = ANSI.sub("", await driver.console_log(vm_id, 1 << 20))
            assert "Kernel panic" not in log, log[-3000:]
            return "Started sysvm-agent.service" in log

        await wait_for(agent_started, 420, "the agent unit to start (serial console)", 0.5)
        t_agent = time.monotonic() - t0
        log = ANSI.sub("", await driver.console_log(vm_id, 1 << 20))
        assert "Reached target" in log
        assert "Failed to start sysvm-agent" not in log

        # the agent read its boot data from fw_cfg, configured its control NIC
        # (sysvm-netcfg) and enrolled with the manager over the control bridge
        await wait_for(
            lambda: f"event=enrolled vm={vm_id}" in read(mlog),
            240,
            "the VM's agent to enrol with the manager",
            0.5,
        )
        t_enrolled = time.monotonic() - t0
        await wait_for(
            lambda: f"event=agent_connected vm={vm_id}" in read(mlog),
            120,
            "the enrolled agent to connect on /agent (mTLS)",
            0.5,
        )
        t_connected = time.monotonic() - t0
        await wait_for(
            lambda: f"event=config_applied vm={vm_id} version=1" in read(mlog),
            60,
            "the VM to acknowledge its first config",
            0.5,
        )
        release = (sysvm_image / "rootfs" / "etc" / "sysvm-release").read_text().strip()
        await wait_for(
            lambda: stored_image_version(home, vm_id) == release,
            60,
            f"the manager to record image version {release}",
            0.5,
        )
        print(
            f"qemu boot-to-agent-unit: {t_agent:.1f} s, boot-to-enrolled: {t_enrolled:.1f} s, "
            f"boot-to-connected: {t_connected:.1f} s"
        )
        assert read(mlog).count("event=enrolled") == 1
        # the token is not in any log
        assert boot["token"] not in read(mlog)
        assert boot["token"] not in await driver.console_log(vm_id, 1 << 20)
        # the host reaches the VM over the tap on the control bridge
        ping = await asyncio.create_subprocess_exec(
            "ping", "-c1", "-W5", f"169.254.{net}.10", stdout=asyncio.subprocess.DEVNULL
        )
        assert await asyncio.wait_for(ping.wait(), 15) == 0, "VM unreachable on its control NIC"

        # clean power-off over ACPI, then destroy
        t1 = time.monotonic()
        await driver.stop(vm_id, timeout=60)
        print(f"qemu stop: {time.monotonic() - t1:.1f} s")
        assert await driver.state(vm_id) is PowerState.STOPPED
        # the guest powered itself off (ACPI button → systemd), it was not killed
        assert "reboot: Power down" in await driver.console_log(vm_id, 1 << 20)
    finally:
        if vm_id:
            await driver.destroy(vm_id)
        await driver.close()
        if mgr.returncode is None:
            mgr.terminate()
            await asyncio.wait_for(mgr.wait(), 30)
    if vm_id:
        assert await driver.state(vm_id) is PowerState.ABSENT
    assert mgr.returncode is not None
    print(read(mlog)[-1500:])
