"""QEMU smoke test: the disk image boots under QEMU (TCG here: /dev/kvm does not work on
this machine), systemd comes up and starts the agent, which found its boot data on fw_cfg.
The slowest test of the suite (software emulation)."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from pathlib import Path

import pytest

from manager.hypervisor.base import NicSpec, PowerState, VmSpec, bridge_name
from manager.hypervisor.qemu import QemuDriver
from tests.system.helpers import boot_data, wait_for

pytestmark = pytest.mark.system
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.parametrize("host_prefix", ["q"], indirect=True)
async def test_qemu_boots_image_and_starts_agent(
    tmp_path: Path, host_prefix: str, sysvm_image: Path
) -> None:
    driver = QemuDriver(tmp_path / "vms", host_prefix, image_dir=sysvm_image)
    vm_id = str(uuid.uuid4())
    net = 200 + os.getpid() % 50
    boot = boot_data(vm_id, [f"wss://169.254.{net}.1:1"])
    spec = VmSpec(
        vm_id=vm_id,
        name="s-2-VM",
        role="secondarystorage",
        boot_data=boot,
        memory_mb=512,
        nics=(
            NicSpec(
                kind="control",
                bridge=bridge_name(host_prefix, str(boot["zone_id"]), "control"),
                address=f"169.254.{net}.10/24",
                bridge_address=f"169.254.{net}.1/24",
            ),
        ),
    )
    try:
        t0 = time.monotonic()
        await driver.start(spec)
        assert await driver.state(vm_id) is PowerState.RUNNING

        async def agent_started() -> bool:
            log = ANSI.sub("", await driver.console_log(vm_id, 1 << 20))
            assert "Kernel panic" not in log, log[-3000:]
            return "Started sysvm-agent.service" in log

        await wait_for(agent_started, 420, "the agent unit to start (serial console)", 0.5)
        print(f"qemu boot-to-agent: {time.monotonic() - t0:.1f} s")
        log = ANSI.sub("", await driver.console_log(vm_id, 1 << 20))
        assert "Reached target" in log
        assert "Failed to start sysvm-agent" not in log
        # the VM configured its NIC from the boot data (sysvm-netcfg): the host reaches it
        # over the tap on the control bridge
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
        await driver.destroy(vm_id)
        await driver.close()
    assert await driver.state(vm_id) is PowerState.ABSENT
