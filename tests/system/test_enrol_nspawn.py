"""End to end on the embedded hypervisor: a real ``sysvm-manager`` on the host, the image
booted by the nspawn driver, and the agent inside the VM enrolling over mutual TLS through
the VM's control NIC (link-local bridge), then receiving and acknowledging its config."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from manager.hypervisor.base import NicSpec, PowerState, VmSpec, bridge_name
from manager.hypervisor.nspawn import NspawnDriver
from tests.system.helpers import wait_for

pytestmark = pytest.mark.system
BIN = Path(sys.executable).parent


def free_port_any() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


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
    argv = [str(BIN / "sysvm-manager"), "--home", str(home), "--api-listen",
            f"127.0.0.1:{api_port}", "--agent-listen", f"0.0.0.0:{agent_port}"]  # fmt: skip
    with mlog.open("ab") as f:
        mgr = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=f, stderr=f, env=env
        )
    driver = NspawnDriver(tmp_path / "vms", host_prefix, image_dir=sysvm_image)
    vm_id = ""
    try:
        await wait_for(lambda: "event=manager_ready" in read(mlog), 30, "manager ready")
        out = tmp_path / "boot.jsonl"
        gen = await asyncio.create_subprocess_exec(
            *argv[:3], "--agent-listen", f"0.0.0.0:{agent_port}",
            "create-external-vms", "--role", "secondarystorage", "--count", "1", "--out", str(out),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        _, err = await asyncio.wait_for(gen.communicate(), 60)
        assert gen.returncode == 0, err.decode()[-2000:]
        boot = json.loads(out.read_text().splitlines()[0])
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
