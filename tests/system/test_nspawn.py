"""The image booted by the embedded (nspawn) driver: real systemd, real NICs, real agent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from manager.hypervisor.base import NicSpec, PowerState, VmSpec, bridge_name, netns_name
from manager.hypervisor.cleanup import leftovers
from manager.hypervisor.nspawn import NspawnDriver
from tests.system.helpers import boot_data, wait_for

pytestmark = pytest.mark.system


def make_spec(prefix: str, vm_id: str, net: int, boot: dict[str, Any]) -> VmSpec:
    zone = str(boot["zone_id"])
    return VmSpec(
        vm_id=vm_id,
        name=str(boot["name"]),
        role=str(boot["role"]),
        boot_data=boot,
        nics=(
            NicSpec(
                kind="control",
                bridge=bridge_name(prefix, zone, "control"),
                address=f"169.254.{net}.10/24",
                bridge_address=f"169.254.{net}.1/24",
            ),
            NicSpec(
                kind="public",
                bridge=bridge_name(prefix, zone, "public"),
                address=f"10.231.{net}.10/24",
                gateway=f"10.231.{net}.1",
                bridge_address=f"10.231.{net}.1/24",
                default_route=True,
            ),
        ),
    )


@pytest.fixture
async def driver(
    tmp_path: Path, host_prefix: str, sysvm_image: Path
) -> AsyncIterator[NspawnDriver]:
    d = NspawnDriver(tmp_path / "vms", host_prefix, image_dir=sysvm_image)
    try:
        yield d
    finally:
        for vm in await d.list_vms():
            await d.destroy(vm)
        await d.close()


async def test_boot_inspect_stop_start_reboot_kill_destroy(
    driver: NspawnDriver, host_prefix: str, sysvm_image: Path
) -> None:
    vm_id = str(uuid.uuid4())
    net = 100 + os.getpid() % 100
    spec = make_spec(host_prefix, vm_id, net, boot_data(vm_id, [f"wss://169.254.{net}.1:1"]))
    assert await driver.state(vm_id) is PowerState.ABSENT

    t0 = time.monotonic()
    await driver.start(spec)
    assert await driver.state(vm_id) is PowerState.RUNNING
    booted = await driver.wait_booted(vm_id, timeout=60)
    boot_seconds = time.monotonic() - t0
    print(f"nspawn boot-to-{booted}: {boot_seconds:.2f} s")
    rc, failed, _ = await driver.exec_in(vm_id, ["systemctl", "--failed", "--no-legend"])
    assert booted == "running", f"systemd state {booted}; failed units:\n{failed}"

    # the agent unit runs (it cannot reach a manager here: that is the enrolment test)
    rc, out, _ = await driver.exec_in(vm_id, ["systemctl", "is-active", "sysvm-agent.service"])
    assert out.strip() == "active", await driver.console_log(vm_id)
    rc, out, _ = await driver.exec_in(vm_id, ["systemctl", "is-active", "sysvm-netcfg.service"])
    assert out.strip() == "active"
    rc, out, _ = await driver.exec_in(vm_id, ["cat", "/etc/sysvm-release"])
    assert out.strip() == json.loads((sysvm_image / "manifest.json").read_text())["version"]

    # NICs and addresses, as a real system VM has them
    rc, out, _ = await driver.exec_in(vm_id, ["ip", "-j", "addr", "show"])
    addrs = {
        i["ifname"]: [
            f"{a['local']}/{a['prefixlen']}" for a in i["addr_info"] if a["family"] == "inet"
        ]
        for i in json.loads(out)
    }
    assert addrs["eth0"] == [f"169.254.{net}.10/24"]
    assert addrs["eth1"] == [f"10.231.{net}.10/24"]
    rc, out, _ = await driver.exec_in(vm_id, ["ip", "-j", "route", "show", "default"])
    assert json.loads(out)[0]["gateway"] == f"10.231.{net}.1"
    # the host reaches the VM over the control bridge
    ping = await asyncio.create_subprocess_exec(
        "ping", "-c1", "-W3", f"169.254.{net}.10", stdout=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(ping.wait(), 10) == 0

    # boot data: visible, read-only, carries the NICs
    rc, out, _ = await driver.exec_in(vm_id, ["cat", "/etc/sysvm/bootdata.json"])
    bd = json.loads(out)
    assert bd["vm_id"] == vm_id and bd["extra"]["nics"][1]["address"] == f"10.231.{net}.10/24"
    rc, _, err = await driver.exec_in(vm_id, ["sh", "-c", "echo x > /etc/sysvm/bootdata.json"])
    assert rc != 0 and "Read-only" in err
    assert (driver.vmdir(vm_id) / "bootdata.json").stat().st_mode & 0o777 == 0o600

    # hardening: root locked, role daemons disabled and not running, nothing listens on TCP
    rc, out, _ = await driver.exec_in(vm_id, ["getent", "shadow", "root"])
    assert out.split(":")[1].startswith("!")
    for unit in ("dnsmasq", "haproxy", "apache2", "ssh"):
        rc, out, _ = await driver.exec_in(vm_id, ["systemctl", "is-enabled", f"{unit}.service"])
        assert out.strip() == "disabled", unit
    rc, out, _ = await driver.exec_in(vm_id, ["ss", "-Htlnu"])
    assert out.strip() == "", f"listening sockets in a fresh VM:\n{out}"
    assert not list((sysvm_image / "rootfs" / "etc" / "ssh").glob("ssh_host_*"))

    # the VM writes into its own overlay, never into the shared image
    rc, _, err = await driver.exec_in(vm_id, ["sh", "-c", "echo mine > /root/written-by-vm"])
    assert rc == 0, err
    assert not (sysvm_image / "rootfs" / "root" / "written-by-vm").exists()
    assert (driver.vmdir(vm_id) / "upper" / "root" / "written-by-vm").exists()

    # clean stop: systemd shuts down (runs ExecStop of its units), the overlay survives
    rc, _, err = await driver.exec_in(
        vm_id,
        ["systemd-run", "--unit=stop-marker", "-p", "RemainAfterExit=yes",
         "-p", "ExecStop=/bin/sh -c 'echo clean > /root/stopped-cleanly'", "/bin/true"],
    )  # fmt: skip
    assert rc == 0, err
    t1 = time.monotonic()
    await driver.stop(vm_id, timeout=20)
    stop_seconds = time.monotonic() - t1
    print(f"nspawn clean stop: {stop_seconds:.2f} s")
    assert await driver.state(vm_id) is PowerState.STOPPED
    assert (driver.vmdir(vm_id) / "upper" / "root" / "stopped-cleanly").read_text() == "clean\n"
    assert not os.path.ismount(driver.vmdir(vm_id) / "root")

    # start again: same disk
    await driver.start(spec)
    await driver.wait_booted(vm_id, timeout=60)
    rc, out, _ = await driver.exec_in(vm_id, ["cat", "/root/written-by-vm"])
    assert out.strip() == "mine"

    # reboot: a new container (new leader), same disk
    leader1 = driver.leader(vm_id)
    await driver.reboot(vm_id, timeout=20)
    await driver.wait_booted(vm_id, timeout=60)
    assert driver.leader(vm_id) != leader1
    rc, out, _ = await driver.exec_in(vm_id, ["cat", "/root/written-by-vm"])
    assert out.strip() == "mine"

    # a reboot from inside the VM: nspawn exits 133, the driver boots it again
    leader2 = driver.leader(vm_id)
    await driver.exec_in(vm_id, ["systemctl", "reboot"])

    def rebooted() -> bool:
        info = driver.run_info(vm_id)
        return bool(info.get("leader")) and info["leader"] != leader2

    await wait_for(rebooted, 30, "the VM to come back after an in-guest reboot")
    await driver.wait_booted(vm_id, timeout=60)

    # kill the container's PID 1: the driver reports the VM dead (crashed, not stopped)
    os.kill(driver.leader(vm_id), signal.SIGKILL)

    async def crashed() -> bool:
        return await driver.state(vm_id) is PowerState.CRASHED

    await wait_for(crashed, 15, "the driver to notice the dead container")

    # destroy: everything of the VM is gone
    await driver.destroy(vm_id)
    assert await driver.state(vm_id) is PowerState.ABSENT
    assert not driver.vmdir(vm_id).exists()
    left = await leftovers(host_prefix)
    # the zone bridges stay (shared by the zone's VMs); no namespace, veth or process is left
    assert not left.processes and not left.mounts and not left.netns and not left.cgroups, left
    assert sorted(left.links) == sorted(n.bridge for n in spec.nics), left
    assert netns_name(host_prefix, vm_id) not in left.netns


async def test_start_failure_is_a_clear_driver_error(tmp_path: Path, host_prefix: str) -> None:
    from manager.hypervisor.base import DriverError

    d = NspawnDriver(tmp_path / "vms", host_prefix, image_dir=tmp_path / "no-image")
    vm_id = str(uuid.uuid4())
    with pytest.raises(DriverError, match="no system VM image"):
        await d.start(make_spec(host_prefix, vm_id, 7, boot_data(vm_id, ["wss://169.254.7.1:1"])))
    assert await d.state(vm_id) is PowerState.STOPPED
    await d.destroy(vm_id)
    await d.close()
