"""Sizing changes by rolling replacement, against real routers (the real ``sysvm-agent``
with the router role in namespaces, as in test_router_agent.py): changeServiceForRouter
and updateNetwork ``networkofferingid=`` (an offering whose routers use a bigger system
offering) each bring a new router up, configured (its rules in its iptables), before the
old one is stopped and destroyed. A stopped router is resized in place, as in CloudStack."""

from __future__ import annotations

from typing import Any

import pytest

from manager.hypervisor.lifecycle import router_size
from manager.network.guests import add_guest_nic
from tests.integration.network.test_router_agent import (
    Env,
    agent_log,
    create_network,
    env,  # noqa: F401 - the fixture
    router_state,
    wait_until,
)

pytestmark = pytest.mark.integration

GUEST_VM = "77777777-7777-4777-8777-777777777777"


def check_rolling(e: Env, old: str, new: str) -> None:
    ops = [(op, who) for op, who, _ in e.events]
    assert ops == [("start", new), ("stop", old), ("destroy", old)], ops
    at_stop = e.events[1][2]  # every router's (state, applied version) when the old stopped
    assert at_stop[new][0] == "Running" and at_stop[new][1] >= 1, at_stop


async def test_resizes_replace_the_router_new_one_first(env: Env) -> None:  # noqa: F811
    e = env
    api = e.api
    net, router = await create_network(api)
    rid = router["id"]

    async def running() -> bool:
        return bool((await router_state(api, rid))["state"] == "Running")

    try:
        await wait_until(running, "the router to run", 60)
    except AssertionError:
        raise AssertionError("router never Running:\n" + agent_log(e.by_router.get(rid))) from None
    async with api.ctx.store.transaction() as tx:
        guest_ip = await add_guest_nic(tx, net["id"], GUEST_VM, "web")
    snat = (await api.call("listPublicIpAddresses", associatednetworkid=net["id"]))[
        "publicipaddress"
    ][0]
    pf = await api.job(
        "createPortForwardingRule", ipaddressid=snat["id"], protocol="tcp", publicport=2222,
        privateport=22, virtualmachineid=GUEST_VM, timeout=60,
    )  # fmt: skip
    assert pf["jobstatus"] == 1, (pf, agent_log(e.vm(rid)))

    async def offering(name: str, memory: int) -> dict[str, Any]:
        out = await api.call(
            "createServiceOffering", name=name, displaytext=name, cpunumber=1, memory=memory,
            issystem="true", systemvmtype="domainrouter",
        )  # fmt: skip
        so: dict[str, Any] = out["serviceoffering"]
        return so

    # changeServiceForRouter: the new router has the new sizing.
    big = await offering("router-1g", 1024)
    e.events.clear()
    res = await api.job("changeServiceForRouter", id=rid, serviceofferingid=big["id"], timeout=120)
    assert res["jobstatus"] == 1, (res, [agent_log(v) for v in e.slots])
    new = res["jobresult"]["router"]
    assert new["id"] != rid and new["serviceofferingid"] == big["id"]
    assert new["state"] == "Running" and new["publicip"] == router["publicip"]
    check_rolling(e, rid, new["id"])
    assert (await router_state(api, rid))["state"] == "Destroyed"
    nat = await e.vm(new["id"]).x("iptables-save", "-t", "nat")
    assert f"--to-destination {guest_ip}:22" in nat, nat

    # updateNetwork to an offering whose routers are sized by a bigger offering.
    bigger = await offering("router-2g", 2048)
    off = (
        await api.call(
            "createNetworkOffering", name="iso-2g", displaytext="iso-2g", guestiptype="Isolated",
            supportedservices="Dhcp,Dns,UserData,SourceNat,StaticNat,PortForwarding,Firewall,Lb",
            serviceofferingid=bigger["id"], enable="true",
        )
    )["networkoffering"]  # fmt: skip
    e.events.clear()
    res = await api.job("updateNetwork", id=net["id"], networkofferingid=off["id"], timeout=120)
    assert res["jobstatus"] == 1, (res, [agent_log(v) for v in e.slots])
    assert res["jobresult"]["network"]["networkofferingid"] == off["id"]
    (third,) = (await api.call("listRouters", networkid=net["id"]))["router"]
    assert third["serviceofferingid"] == bigger["id"] and third["agentstate"] == "Up"
    check_rolling(e, new["id"], third["id"])
    nat = await e.vm(third["id"]).x("iptables-save", "-t", "nat")
    assert f"--to-destination {guest_ip}:22" in nat, nat

    # A stopped router (CloudStack's case): the same router keeps its id and state and
    # gets the new sizing when it next starts; nothing is booted or destroyed.
    stopped = await api.job("stopRouter", id=third["id"], timeout=60)
    assert stopped["jobstatus"] == 1, stopped
    e.events.clear()
    res = await api.job("changeServiceForRouter", id=third["id"], serviceofferingid=big["id"])
    assert res["jobstatus"] == 1, res
    same = res["jobresult"]["router"]
    assert (same["id"], same["state"], same["serviceofferingid"]) == (
        third["id"], "Stopped", big["id"],
    )  # fmt: skip
    assert e.events == [], e.events
    vm = await api.ctx.store.get_system_vm(third["id"])
    assert vm is not None and await router_size(api.ctx, vm) == (1024, 1)
    started = await api.job("startRouter", id=third["id"], timeout=60)
    assert started["jobstatus"] == 1, (started, agent_log(e.vm(third["id"])))
    (after,) = (await api.call("listRouters", networkid=net["id"]))["router"]
    assert (after["id"], after["state"], after["serviceofferingid"]) == (
        third["id"], "Running", big["id"],
    )  # fmt: skip
    nat = await e.vm(third["id"]).x("iptables-save", "-t", "nat")
    assert f"--to-destination {guest_ip}:22" in nat, nat
