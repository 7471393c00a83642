"""End to end on the embedded hypervisor: a real ``sysvm-manager`` on the host, the image
booted by the nspawn driver, and the agent inside the VM enrolling over mutual TLS through
the VM's control NIC (link-local bridge), then receiving and acknowledging its config."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from manager.hypervisor.base import NicSpec, PowerState, VmSpec, bridge_name
from manager.hypervisor.nspawn import NspawnDriver
from tests.system.helpers import (
    external_bootdata,
    free_port_any,
    manager_argv,
    read,
    start_manager,
    wait_for,
)

pytestmark = pytest.mark.system


@pytest.mark.parametrize("host_prefix", ["e"], indirect=True)
async def test_agent_in_nspawn_vm_enrols_with_real_manager(
    tmp_path: Path, host_prefix: str, sysvm_image: Path, free_port
) -> None:  # type: ignore[no-untyped-def]
    net = 10 + os.getpid() % 80
    host_ip = f"169.254.{net}.1"
    api_port, agent_port = free_port(), free_port_any()
    home = tmp_path / "home"
    env = {
        **os.environ,
        "SYSVM_AGENT_URLS": f"wss://{host_ip}:{agent_port}",
        "SYSVM_LOG_LEVEL": "INFO",
    }
    mlog = tmp_path / "manager.log"
    argv = manager_argv(home, api_port, agent_port)
    mgr = await start_manager(argv, mlog, env)
    driver = NspawnDriver(tmp_path / "vms", host_prefix, image_dir=sysvm_image)
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
            nics=(
                NicSpec(
                    kind="control",
                    bridge=bridge_name(host_prefix, boot["zone_id"], "control"),
                    address=f"169.254.{net}.10/24",
                    bridge_address=f"{host_ip}/24",
                ),
            ),
        )
        await driver.start(spec)
        assert await driver.wait_booted(vm_id, 60) == "running"

        def enrolled() -> bool:
            text = read(mlog)
            return f"event=enrolled vm={vm_id}" in text or (
                "event=enrolled" in text and vm_id in text
            )

        await wait_for(enrolled, 60, "the VM's agent to enrol with the manager")
        await wait_for(
            lambda: f"event=config_applied vm={vm_id} version=1" in read(mlog),
            60,
            "the VM to acknowledge its first config",
        )
        # the key never left the VM; the certificate it got is in the VM's state dir
        _, out_ls, _ = await driver.exec_in(vm_id, ["ls", "/var/lib/sysvm-agent"])
        assert {"key.pem", "cert.pem", "ca.pem"} <= set(out_ls.split())
        _, mode, _ = await driver.exec_in(
            vm_id, ["stat", "-c", "%a", "/var/lib/sysvm-agent/key.pem"]
        )
        assert mode.strip() == "600"
        # and the token is not in any log
        assert boot["token"] not in read(mlog)
        assert boot["token"] not in await driver.console_log(vm_id)

        # reboot: the agent comes back with its certificate (no new enrolment)
        await driver.reboot(vm_id, timeout=20)
        await driver.wait_booted(vm_id, 60)
        await wait_for(
            lambda: (
                read(mlog).count("event=agent_connected") >= 2
                and vm_id in read(mlog).split("event=agent_connected")[-1]
            ),
            60,
            "the agent to reconnect after the reboot",
        )
        assert read(mlog).count("event=enrolled") == 1
    finally:
        if vm_id:
            await driver.destroy(vm_id)
            assert await driver.state(vm_id) is PowerState.ABSENT
        await driver.close()
        if mgr.returncode is None:
            mgr.terminate()
            await asyncio.wait_for(mgr.wait(), 30)
    print(read(mlog)[-1500:])
