"""Guest VMs on guest networks through the unchanged `cs` client: deployVirtualMachine
``networkids=`` / ``userdata=`` gives the (real, QEMU) guest a NIC on the network in the
deploy's transaction, so the network's router config gains its DHCP reservation, DNS name,
user data and meta-data; updateVirtualMachine ``userdata=`` changes what the router serves;
listVirtualMachines shows the ``nic`` entries; destroyVirtualMachine takes the NIC (and its
router entries) away. The router config checked is the one the agent would receive, parsed
by the router role's own parser."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.roles.router.config import parse
from manager.consoleproxy import runtime as console
from manager.network import store as ns
from tests.integration.network.test_network_api import api_error, isolated, router_config

pytestmark = pytest.mark.integration

Api = Any  # netapi.Api


@pytest.fixture
async def guests_api(api: Api) -> AsyncIterator[Api]:
    rt = await console.setup(api.ctx)
    try:
        yield api
    finally:
        await rt.stop()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_deploy_with_networks_update_userdata_destroy(guests_api: Api) -> None:
    api = guests_api
    net = await isolated(api, "gnet", networkdomain="guests.example")
    net2 = await isolated(api, "gnet2")
    data = b64("#cloud-config\nhostname: web-1\n")
    job = await api.job(
        "deployVirtualMachine", name="web-1", networkids=f"{net['id']},{net2['id']}", userdata=data
    )
    assert job["jobstatus"] == 1, job
    vm = job["jobresult"]["virtualmachine"]
    assert vm["state"] == "Running"
    nics = vm["nic"]
    assert [n["networkid"] for n in nics] == [net["id"], net2["id"]]
    assert [n["isdefault"] for n in nics] == [True, False]
    first = nics[0]
    assert first["ipaddress"] == "10.250.0.2" and first["gateway"] == "10.250.0.1"
    assert first["netmask"] == "255.255.255.0"

    cfg = await router_config(api, net["id"])
    parse(cfg)
    assert cfg["dhcp"] == [
        {"mac": first["macaddress"], "ip": first["ipaddress"], "hostname": "web-1"}
    ]
    (entry,) = cfg["vm_data"]
    assert entry["guest_ip"] == first["ipaddress"] and entry["user_data"] == data
    assert entry["meta_data"]["instance-id"] == vm["id"]
    assert entry["meta_data"]["local-hostname"] == "web-1"
    cfg2 = await router_config(api, net2["id"])
    assert [d["mac"] for d in cfg2["dhcp"]] == [nics[1]["macaddress"]]

    listed = (await api.call("listVirtualMachines", id=vm["id"]))["virtualmachine"][0]
    assert [(n["ipaddress"], n["macaddress"], n["networkid"], n["isdefault"]) for n in
            listed["nic"]] == [
        (n["ipaddress"], n["macaddress"], n["networkid"], n["isdefault"]) for n in nics
    ]  # fmt: skip

    # New userdata reaches both routers; version bumped.
    routers = await ns.router_ids(api.ctx.store, net["id"])
    before = (await api.ctx.store.get_system_vm(routers[-1])).desired_version
    new = b64("#!/bin/sh\necho two\n")
    out = await api.call("updateVirtualMachine", id=vm["id"], userdata=new)
    assert out["virtualmachine"]["id"] == vm["id"]
    assert (await router_config(api, net["id"]))["vm_data"][0]["user_data"] == new
    assert (await router_config(api, net2["id"]))["vm_data"][0]["user_data"] == new
    assert (await api.ctx.store.get_system_vm(routers[-1])).desired_version == before + 1
    renamed = await api.call("updateVirtualMachine", id=vm["id"], displayname="Web One")
    assert renamed["virtualmachine"]["displayname"] == "Web One"
    assert (await router_config(api, net["id"]))["vm_data"][0]["user_data"] == new  # kept
    err = await api_error(api, "updateVirtualMachine", id=vm["id"], userdata="not base64!")
    assert err["errorcode"] == 431 and "base64" in err["errortext"]
    assert (await router_config(api, net["id"]))["vm_data"][0]["user_data"] == new

    # A refused NIC leaves no guest behind (the record and NICs share one transaction).
    count = len((await api.call("listVirtualMachines")).get("virtualmachine", []))
    err = await api_error(
        api, "deployVirtualMachine", name="web-2", networkids=net["id"], userdata="@@@"
    )
    assert err["errorcode"] == 431
    assert len((await api.call("listVirtualMachines")).get("virtualmachine", [])) == count
    assert len((await router_config(api, net["id"]))["dhcp"]) == 1
    err = await api_error(api, "deployVirtualMachine", name="web-3", userdata=data)
    assert err["errorcode"] == 431 and "networkids" in err["errortext"]

    done = await api.job("destroyVirtualMachine", id=vm["id"])
    assert done["jobstatus"] == 1, done
    cfg = await router_config(api, net["id"])
    assert cfg["dhcp"] == [] and cfg["vm_data"] == []
    assert (await router_config(api, net2["id"]))["dhcp"] == []
    assert await ns.list_nics(api.ctx.store, vm_id=vm["id"]) == []
