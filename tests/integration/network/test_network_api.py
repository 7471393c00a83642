"""The network API through the unchanged `cs` client against a real in-process manager
(aiohttp + SQLite). No agent is connected here, so rule jobs complete once the change is
committed (the router gets it when it connects); what the router would receive is checked
in the rendered config, parsed by the router role's own parser. The agent-connected paths
(acknowledged and refused applies) are in test_router_agent.py."""

from __future__ import annotations

from typing import Any

import pytest
from cs import CloudStackApiException

from agent.roles.router.config import parse
from manager.network import RUNTIME, stats_handler
from manager.network import store as ns
from manager.network.guests import add_guest_nic, remove_guest_nic, remove_vm_nics, set_userdata
from manager.network.validate import NetError

Api = Any  # netapi.Api


async def api_error(api: Api, command: str, **params: Any) -> dict[str, Any]:
    with pytest.raises(CloudStackApiException) as e:
        await api.call(command, **params)
    err: dict[str, Any] = e.value.error
    return err


async def isolated(api: Api, name: str = "net1", **kw: Any) -> dict[str, Any]:
    offerings = await api.call(
        "listNetworkOfferings", name="DefaultIsolatedNetworkOfferingWithSourceNatService"
    )
    zone = (await api.call("listZones"))["zone"][0]
    net = await api.call(
        "createNetwork",
        name=name,
        displaytext=name,
        networkofferingid=offerings["networkoffering"][0]["id"],
        zoneid=zone["id"],
        **kw,
    )
    result: dict[str, Any] = net["network"]
    return result


async def router_config(api: Api, network_id: str) -> dict[str, Any]:
    """The rendered config of the network's newest router, as the agent would get it."""
    ids = await ns.router_ids(api.ctx.store, network_id)
    assert ids, f"no router for network {network_id}"
    cfg: dict[str, Any] = RUNTIME.configs[ids[-1]]
    return cfg


async def guest(api: Api, network_id: str, vm_id: str, name: str, **kw: Any) -> str:
    async with api.ctx.store.transaction() as tx:
        return await add_guest_nic(tx, network_id, vm_id, name, **kw)


async def test_offerings_and_system_offering(api: Api) -> None:
    out = await api.call("listNetworkOfferings")
    names = {o["name"]: o for o in out["networkoffering"]}
    iso = names["DefaultIsolatedNetworkOfferingWithSourceNatService"]
    assert iso["guestiptype"] == "Isolated" and iso["isdefault"] is True
    assert {s["name"] for s in iso["service"]} == {
        "Dhcp",
        "Dns",
        "UserData",
        "SourceNat",
        "StaticNat",
        "PortForwarding",
        "Firewall",
        "Lb",
    }
    assert names["DefaultSharedNetworkOffering"]["guestiptype"] == "Shared"
    only = await api.call("listNetworkOfferings", supportedservices="Lb,SourceNat")
    assert [o["name"] for o in only["networkoffering"]] == [iso["name"]]
    so = await api.call("listServiceOfferings", issystem="true")
    assert so["serviceoffering"][0]["systemvmtype"] == "domainrouter"
    assert so["serviceoffering"][0]["memory"] == 512 and so["serviceoffering"][0]["issystem"]
    # Defaults are created once: a second setup adds nothing.
    from manager.network import ensure_defaults

    assert await ensure_defaults(api.ctx.store) == 0


async def test_create_list_isolated_network_with_router_and_source_nat(api: Api) -> None:
    net = await isolated(api, networkdomain="Corp.Example")
    assert net["type"] == "Isolated" and net["state"] == "Implemented"
    assert net["cidr"] == "10.250.0.0/24" and net["gateway"] == "10.250.0.1"
    assert net["networkdomain"] == "corp.example" and net["netmask"] == "255.255.255.0"
    listed = await api.call("listNetworks", id=net["id"])
    assert listed["count"] == 1 and listed["network"][0]["receivedbytes"] == 0
    ips = await api.call("listPublicIpAddresses", associatednetworkid=net["id"])
    snat = ips["publicipaddress"][0]
    assert snat["issourcenat"] is True and snat["ipaddress"] == "198.18.0.2"
    routers = await api.call("listRouters", networkid=net["id"])
    r = routers["router"][0]
    assert r["guestnetworkid"] == net["id"] and r["publicip"] == "198.18.0.2"
    assert r["linklocalip"].startswith("169.254.") and r["role"] == "VIRTUAL_ROUTER"
    assert r["requiresupgrade"] is False and r["healthcheckresults"] == []
    assert r["agentstate"] == "Disconnected"
    cfg = await router_config(api, net["id"])
    parse(cfg)
    assert cfg["source_nat"] == "198.18.0.2" and cfg["domain"] == "corp.example"
    # The desired version was bumped with the change (1 = the router's first config).
    vm = await api.ctx.store.get_system_vm(r["id"])
    assert vm is not None and vm.desired_version == 1
    # A second network gets the next public address and its own router.
    net2 = await isolated(api, "net2")
    ips2 = await api.call("listPublicIpAddresses", associatednetworkid=net2["id"])
    assert ips2["publicipaddress"][0]["ipaddress"] == "198.18.0.3"


async def test_bad_networks_get_431_and_leave_nothing_behind(api: Api) -> None:
    zone = (await api.call("listZones"))["zone"][0]
    shared = (await api.call("listNetworkOfferings", guestiptype="Shared"))["networkoffering"][0]
    iso = (await api.call("listNetworkOfferings", guestiptype="Isolated"))["networkoffering"][0]
    base = {"name": "x", "displaytext": "x", "zoneid": zone["id"]}
    cases = [
        (
            {"networkofferingid": iso["id"], "gateway": "10.1.1.1", "netmask": "255.255.0.255"},
            "netmask",
        ),
        (
            {
                "networkofferingid": iso["id"],
                "gateway": "10.1.1.1",
                "netmask": "255.255.255.0",
                "startip": "10.1.2.1",
            },
            "outside",
        ),
        (
            {"networkofferingid": iso["id"], "gateway": "169.254.10.1", "netmask": "255.255.255.0"},
            "control (link-local)",
        ),
        (
            {
                "networkofferingid": iso["id"],
                "gateway": "100.64.0.65",
                "netmask": "255.255.255.192",
            },
            "management",
        ),
        ({"networkofferingid": shared["id"]}, "Shared network needs"),
        ({"networkofferingid": iso["id"], "dns1": "8.8.8"}, "dns1"),
    ]
    for extra, needle in cases:
        err = await api_error(api, "createNetwork", **base, **extra)
        assert err["errorcode"] == 431 and needle in err["errortext"], (extra, err)
    ok = await api.call(
        "createNetwork",
        **base,
        networkofferingid=shared["id"],
        gateway="10.60.0.1",
        netmask="255.255.255.0",
        startip="10.60.0.10",
        endip="10.60.0.20",
        vlan="100",
    )
    assert ok["network"]["type"] == "Shared" and ok["network"]["vlan"] == "100"
    err = await api_error(
        api,
        "createNetwork",
        **base,
        networkofferingid=shared["id"],
        gateway="10.60.0.129",
        netmask="255.255.255.128",
        startip="10.60.0.130",
    )
    assert err["errorcode"] == 431 and "overlaps the CIDR 10.60.0.0/24" in err["errortext"]
    listed = await api.call("listNetworks")
    assert listed["count"] == 1  # only the good shared network exists
    # ... with its one router (DHCP, DNS, userdata); the refused ones left none behind
    routers = (await api.call("listRouters"))["router"]
    assert [r["guestnetworkid"] for r in routers] == [ok["network"]["id"]]


async def test_rules_validated_committed_and_rendered(api: Api) -> None:
    net = await isolated(api)
    nid = net["id"]
    vm1, vm2 = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
    ip1 = await guest(api, nid, vm1, "Web 1", userdata="I2Nsb3VkLWNvbmZpZwo=")
    ip2 = await guest(api, nid, vm2, "db")
    assert (ip1, ip2) == ("10.250.0.2", "10.250.0.3")  # the gateway .1 is skipped

    assoc = await api.job("associateIpAddress", networkid=nid)
    assert assoc["jobstatus"] == 1, assoc
    pub = assoc["jobresult"]["ipaddress"]
    assert pub["issourcenat"] is False and pub["ipaddress"] == "198.18.0.3"

    fw = await api.job(
        "createFirewallRule",
        ipaddressid=pub["id"],
        protocol="tcp",
        startport=22,
        endport=22,
        cidrlist="10.0.0.0/8",
    )
    assert fw["jobstatus"] == 1, fw
    assert fw["jobresult"]["firewallrule"]["cidrlist"] == "10.0.0.0/8"
    # Duplicate / overlapping / out of range: 431 at once, nothing written.
    for params, needle in (
        ({"protocol": "tcp", "startport": 20, "endport": 30}, "conflicts with rule"),
        ({"protocol": "all"}, "conflicts with rule"),
        ({"protocol": "tcp", "startport": 70000}, "out of range 1-65535"),
        ({"protocol": "tcp", "startport": 0}, "out of range"),
        ({"protocol": "gre"}, "not one of"),
        ({"protocol": "icmp", "startport": 1}, "only apply to tcp and udp"),
    ):
        err = await api_error(api, "createFirewallRule", ipaddressid=pub["id"], **params)
        assert err["errorcode"] == 431 and needle in err["errortext"], (params, err)
    assert (await api.call("listFirewallRules", ipaddressid=pub["id"]))["count"] == 1

    pf = await api.job(
        "createPortForwardingRule",
        ipaddressid=pub["id"],
        protocol="tcp",
        publicport=8080,
        privateport=80,
        virtualmachineid=vm1,
    )
    assert pf["jobstatus"] == 1, pf
    assert pf["jobresult"]["portforwardingrule"]["vmguestip"] == ip1
    # openfirewall (default true) opened 8080.
    rules = (await api.call("listFirewallRules", ipaddressid=pub["id"]))["firewallrule"]
    assert {(r["startport"], r["endport"]) for r in rules} == {(22, 22), (8080, 8080)}
    for params, needle in (
        (
            {"publicport": 8080, "privateport": 81, "virtualmachineid": vm2},
            "conflicts with port forwarding",
        ),
        (
            {"publicport": 9000, "publicendport": 9001, "privateport": 80, "virtualmachineid": vm1},
            "same length",
        ),
        (
            {
                "publicport": 9000,
                "privateport": 80,
                "virtualmachineid": "33333333-3333-4333-8333-333333333333",
            },
            "has no NIC",
        ),
    ):
        err = await api_error(
            api, "createPortForwardingRule", ipaddressid=pub["id"], protocol="tcp", **params
        )
        assert err["errorcode"] == 431 and needle in err["errortext"], (params, err)

    lb = await api.job(
        "createLoadBalancerRule",
        publicipid=pub["id"],
        name="web lb",
        algorithm="roundrobin",
        publicport=80,
        privateport=8000,
    )
    assert lb["jobstatus"] == 1, lb
    lb_id = lb["jobresult"]["loadbalancer"]["id"]
    err = await api_error(
        api,
        "createLoadBalancerRule",
        publicipid=pub["id"],
        name="other",
        algorithm="roundrobin",
        publicport=8080,
        privateport=8000,
    )
    assert "conflicts with port forwarding" in err["errortext"]
    err = await api_error(
        api,
        "createLoadBalancerRule",
        publicipid=pub["id"],
        name="x",
        algorithm="random",
        publicport=81,
        privateport=8000,
    )
    assert "algorithm" in err["errortext"]
    done = await api.job("assignToLoadBalancerRule", id=lb_id, virtualmachineids=f"{vm1},{vm2}")
    assert done["jobstatus"] == 1, done
    inst = await api.call("listLoadBalancerRuleInstances", id=lb_id)
    assert {i["id"] for i in inst["loadbalancerruleinstance"]} == {vm1, vm2}
    err = await api_error(api, "assignToLoadBalancerRule", id=lb_id, virtualmachineids=vm1)
    assert "already assigned" in err["errortext"]

    eg = await api.job(
        "createEgressFirewallRule",
        networkid=nid,
        protocol="tcp",
        startport=25,
        destcidrlist="203.0.113.0/24",
    )
    assert eg["jobstatus"] == 1, eg
    assert eg["jobresult"]["firewallrule"]["destcidrlist"] == "203.0.113.0/24"
    err = await api_error(
        api,
        "createEgressFirewallRule",
        networkid=nid,
        protocol="tcp",
        startport=25,
        cidrlist="10.250.0.5/32",
    )
    assert "whole network" in err["errortext"]

    nat_ip = (await api.job("associateIpAddress", networkid=nid))["jobresult"]["ipaddress"]
    assert (await api.call("enableStaticNat", ipaddressid=nat_ip["id"], virtualmachineid=vm2))[
        "success"
    ]
    err = await api_error(api, "enableStaticNat", ipaddressid=pub["id"], virtualmachineid=vm1)
    assert "port forwarding or load balancer" in err["errortext"]
    err = await api_error(
        api,
        "enableStaticNat",
        ipaddressid=net
        and (await api.call("listPublicIpAddresses", issourcenat="true"))["publicipaddress"][0][
            "id"
        ],
        virtualmachineid=vm1,
    )
    assert "source NAT" in err["errortext"]

    # Everything above is in the router's config, which its own parser accepts.
    cfg = await router_config(api, nid)
    parsed = parse(cfg)
    assert [str(f.public_ip) for f in parsed.port_forwarding] == [pub["ipaddress"]]
    assert [str(m.ip) for m in parsed.load_balancers[0].members] == [ip1, ip2]
    assert [(str(s.public_ip), str(s.guest_ip)) for s in parsed.static_nat] == [
        (nat_ip["ipaddress"], ip2)
    ]
    assert parsed.egress.rules[0].ports is not None and parsed.egress.rules[0].ports.start == 25
    assert {d.hostname for d in parsed.dhcp} == {"web-1", "db"}
    assert parsed.vm_data[0].user_data == b"#cloud-config\n"
    router = (await api.call("listRouters", networkid=nid))["router"][0]
    assert router["desiredversion"] >= 10

    # A NIC still used by rules cannot be removed quietly.
    with pytest.raises(NetError, match="still used"):
        async with api.ctx.store.transaction() as tx:
            await remove_guest_nic(tx, nid, vm1)

    # Deleting the PF rule also removes the firewall rule it opened.
    pf_id = pf["jobresult"]["portforwardingrule"]["id"]
    assert (await api.job("deletePortForwardingRule", id=pf_id))["jobstatus"] == 1
    rules = (await api.call("listFirewallRules", ipaddressid=pub["id"]))["firewallrule"]
    assert [(r["startport"], r["endport"]) for r in rules] == [(22, 22), (80, 80)]  # 80: the LB's
    assert (
        "port_forwarding" in (await router_config(api, nid))
        and (await router_config(api, nid))["port_forwarding"] == []
    )

    done = await api.job("removeFromLoadBalancerRule", id=lb_id, virtualmachineids=vm2)
    assert done["jobstatus"] == 1, done
    inst = await api.call("listLoadBalancerRuleInstances", id=lb_id)
    assert [i["id"] for i in inst["loadbalancerruleinstance"]] == [vm1]
    err = await api_error(api, "removeFromLoadBalancerRule", id=lb_id, virtualmachineids=vm2)
    assert "not assigned" in err["errortext"]
    lbs = (await router_config(api, nid))["load_balancers"]
    assert [m["ip"] for m in lbs[0]["members"]] == [ip1]

    err = await api_error(api, "deleteNetwork", id=nid)
    assert "still has 2 virtual machine NIC" in err["errortext"]


async def test_destroy_only_router_is_refused_and_restart_cleanup_replaces(api: Api) -> None:
    net = await isolated(api)
    router = (await api.call("listRouters", networkid=net["id"]))["router"][0]
    err = await api_error(api, "destroyRouter", id=router["id"])
    assert err["errorcode"] == 431
    assert (
        "only router" in err["errortext"] and "restartNetwork with cleanup=true" in err["errortext"]
    )
    # Without an agent the new router never comes up: the job fails with the reason and
    # the old router stays (rolling replacement never leaves the network without one).
    res = await api.job("restartNetwork", id=net["id"], cleanup="true")
    assert res["jobstatus"] == 2
    assert "did not start" in res["jobresult"]["errortext"]
    routers = (await api.call("listRouters", networkid=net["id"]))["router"]
    assert [r["id"] for r in routers] == [router["id"]]
    assert (await api.call("listRouters", networkid=net["id"], requiresupgrade="true")) == {}


async def test_router_stats_are_counted_once_per_batch(api: Api) -> None:
    net = await isolated(api)
    router = (await api.call("listRouters", networkid=net["id"]))["router"][0]
    handle = stats_handler(api.ctx)
    batches: list[dict[str, Any]] = [
        {"id": "boot-a:1", "epoch": "boot-a:1", "bytes": {"198.18.0.2": [100, 50]}},
        {"id": "boot-a:2", "epoch": "boot-a:1", "bytes": {"198.18.0.2": [1, 2]}},
    ]
    params = {"boot_id": "boot-a", "batches": batches}
    assert await handle(router["id"], params) == {"acked": ["boot-a:1", "boot-a:2"]}
    # The answer was lost: the router re-sends both, plus a new one. Counted once.
    batches.append({"id": "boot-a:3", "epoch": "boot-a:1", "bytes": {"198.18.0.2": [10, 0]}})
    assert (await handle(router["id"], params))["acked"] == ["boot-a:1", "boot-a:2", "boot-a:3"]
    listed = (await api.call("listNetworks", id=net["id"]))["network"][0]
    assert (listed["receivedbytes"], listed["sentbytes"]) == (111, 52)
    ip = (await api.call("listPublicIpAddresses", associatednetworkid=net["id"]))[
        "publicipaddress"
    ][0]
    assert (ip["receivedbytes"], ip["sentbytes"]) == (111, 52)
    with pytest.raises(ValueError, match="batches must be a list"):
        await handle(router["id"], {"batches": "nope"})
    # A reboot starts a new boot id: its batch ids are new, counted.
    await handle(router["id"], {"batches": [{"id": "boot-b:1", "bytes": {"198.18.0.2": [1, 1]}}]})
    listed = (await api.call("listNetworks", id=net["id"]))["network"][0]
    assert (listed["receivedbytes"], listed["sentbytes"]) == (112, 53)


async def test_guest_nic_allocation_and_errors(api: Api) -> None:
    net = await isolated(api, gateway="10.70.0.1", netmask="255.255.255.248")  # 6 hosts
    nid = net["id"]
    ips = [
        await guest(api, nid, f"0000000{i}-0000-4000-8000-000000000000", f"vm{i}") for i in range(5)
    ]
    assert ips == [f"10.70.0.{i}" for i in range(2, 7)]
    with pytest.raises(NetError, match="no free IP address"):
        await guest(api, nid, "00000009-0000-4000-8000-000000000000", "vm9")
    with pytest.raises(NetError, match="already has a NIC"):
        await guest(api, nid, "00000001-0000-4000-8000-000000000000", "again")
    with pytest.raises(NetError, match="base64"):
        async with api.ctx.store.transaction() as tx:
            await remove_guest_nic(tx, nid, "00000004-0000-4000-8000-000000000000")
            await add_guest_nic(
                tx, nid, "0000000a-0000-4000-8000-000000000000", "u", userdata="%%%"
            )
    # That transaction rolled back: the NIC is still there.
    assert len((await router_config(api, nid))["dhcp"]) == 5


async def test_userdata_nic_removal_and_delete_network(api: Api) -> None:
    net = await isolated(api)
    nid = net["id"]
    vm = "55555555-5555-4555-8555-555555555555"
    await guest(api, nid, vm, "app")
    async with api.ctx.store.transaction() as tx:
        assert await set_userdata(tx, vm, "aGVsbG8=") == 1
    parsed = parse(await router_config(api, nid))
    assert parsed.vm_data[0].user_data == b"hello"
    pub = (await api.job("associateIpAddress", networkid=nid))["jobresult"]["ipaddress"]
    assert (await api.call("enableStaticNat", ipaddressid=pub["id"], virtualmachineid=vm))[
        "success"
    ]
    # destroyVirtualMachine: the VM leaves its networks and its static NAT goes with it.
    async with api.ctx.store.transaction() as tx:
        assert await remove_vm_nics(tx, vm) == 1
    cfg = await router_config(api, nid)
    assert cfg["dhcp"] == [] and cfg["static_nat"] == [] and cfg["vm_data"] == []
    router = (await api.call("listRouters", networkid=nid))["router"][0]
    done = await api.job("deleteNetwork", id=nid)
    assert done["jobstatus"] == 1, done
    assert await api.call("listNetworks") == {}
    assert await api.call("listPublicIpAddresses") == {}
    gone = (await api.call("listRouters", id=router["id"]))["router"][0]
    assert gone["state"] == "Destroyed"
    assert router["id"] not in RUNTIME.configs
    # The released addresses are free again: the next network gets the first one back.
    again = await isolated(api, "net-again")
    ips = await api.call("listPublicIpAddresses", associatednetworkid=again["id"])
    assert ips["publicipaddress"][0]["ipaddress"] == "198.18.0.2"


async def test_network_offering_change_refused_while_a_dropped_service_is_used(api: Api) -> None:
    net = await isolated(api, "sized")
    big = (
        await api.call(
            "createServiceOffering", name="router-big", displaytext="2 vCPU, 1 GiB",
            cpunumber=2, memory=1024, issystem="true", systemvmtype="domainrouter",
        )
    )["serviceoffering"]  # fmt: skip
    assert big["issystem"] is True and big["systemvmtype"] == "domainrouter"
    listed = await api.call("listServiceOfferings", issystem="true", name="router-big")
    assert listed["serviceoffering"][0]["memory"] == 1024
    err = await api_error(api, "createServiceOffering", name="user-offering", memory=512)
    assert err["errorcode"] == 431 and "domainrouter" in err["errortext"]
    no_pf = (
        await api.call(
            "createNetworkOffering", name="no-pf", displaytext="no port forwarding",
            guestiptype="Isolated", traffictype="Guest", enable="true",
            supportedservices="Dhcp,Dns,UserData,SourceNat,StaticNat,Firewall,Lb",
            serviceofferingid=big["id"],
        )
    )["networkoffering"]  # fmt: skip
    assert no_pf["state"] == "Enabled" and no_pf["serviceofferingid"] == big["id"]
    disabled = (
        await api.call(
            "createNetworkOffering", name="off", displaytext="off", guestiptype="Isolated",
            supportedservices="Dhcp,Dns,SourceNat",
        )
    )["networkoffering"]  # fmt: skip
    assert disabled["state"] == "Disabled"

    vm = "66666666-6666-4666-8666-666666666666"
    await guest(api, net["id"], vm, "web")
    snat = (await api.call("listPublicIpAddresses", associatednetworkid=net["id"]))[
        "publicipaddress"
    ][0]
    pf = await api.job(
        "createPortForwardingRule", ipaddressid=snat["id"], protocol="tcp", publicport=2222,
        privateport=22, virtualmachineid=vm,
    )  # fmt: skip
    assert pf["jobstatus"] == 1, pf
    before = await router_config(api, net["id"])
    err = await api_error(api, "updateNetwork", id=net["id"], networkofferingid=no_pf["id"])
    assert err["errorcode"] == 431
    assert "PortForwarding (1 port forwarding rule(s))" in err["errortext"], err
    err = await api_error(api, "updateNetwork", id=net["id"], networkofferingid=disabled["id"])
    assert err["errorcode"] == 431 and "not enabled" in err["errortext"]
    shared = (await api.call("listNetworkOfferings", guestiptype="Shared"))["networkoffering"][0]
    err = await api_error(api, "updateNetwork", id=net["id"], networkofferingid=shared["id"])
    assert err["errorcode"] == 431 and "Shared" in err["errortext"]
    # Nothing changed: same offering, same router config, same routers.
    listed_net = (await api.call("listNetworks", id=net["id"]))["network"][0]
    assert listed_net["networkofferingid"] != no_pf["id"]
    assert await router_config(api, net["id"]) == before
    # A rename is fine (no router change needed).
    res = await api.job("updateNetwork", id=net["id"], name="renamed")
    assert res["jobstatus"] == 1 and res["jobresult"]["network"]["name"] == "renamed"


async def shared_network(api: Api, name: str = "shared1", **kw: Any) -> dict[str, Any]:
    zone = (await api.call("listZones"))["zone"][0]
    offering = (await api.call("listNetworkOfferings", name="DefaultSharedNetworkOffering"))[
        "networkoffering"
    ][0]
    args = {"gateway": "10.61.0.1", "netmask": "255.255.255.0", "startip": "10.61.0.10",
            "endip": "10.61.0.20", "vlan": "61", **kw}  # fmt: skip
    net = await api.call(
        "createNetwork", name=name, displaytext=name, zoneid=zone["id"],
        networkofferingid=offering["id"], **args,
    )  # fmt: skip
    result: dict[str, Any] = net["network"]
    return result


async def test_shared_network_gets_a_router_that_is_not_its_gateway(api: Api) -> None:
    from manager.network.routers import nic_plan

    net = await shared_network(api)
    nid = net["id"]
    assert net["type"] == "Shared" and net["gateway"] == "10.61.0.1"
    routers = (await api.call("listRouters", networkid=nid))["router"]
    assert len(routers) == 1
    r = routers[0]
    # The router takes the first address of the range; the gateway is the provider's.
    assert r["guestipaddress"] == "10.61.0.10" and r["gateway"] == "10.61.0.1", r
    assert "publicip" not in r and "publicnetmask" not in r, r
    cfg = await router_config(api, nid)
    parsed = parse(cfg)  # the router role's own parser takes it
    assert "public" not in cfg["interfaces"] and "source_nat" not in cfg
    assert cfg["interfaces"]["guest"] == {
        "device": "eth1", "gateway": "10.61.0.1", "cidr": "10.61.0.0/24", "address": "10.61.0.10",
    }  # fmt: skip
    assert parsed.interfaces.control is not None
    assert cfg["firewall"] == cfg["port_forwarding"] == cfg["load_balancers"] == []
    # What the hypervisor plugs: control, then the guest NIC carrying the default route
    plan = await nic_plan(api.ctx.store, r["id"])
    assert [(n["kind"], n["address"], n["gateway"], n["default_route"]) for n in plan] == [
        ("control", f"{r['linklocalip']}/16", None, False),
        ("guest", "10.61.0.10/24", "10.61.0.1", True),
    ]
    # Guests get addresses around the router's, never its own.
    ip = await guest(api, nid, "61000001-0000-4000-8000-000000000000", "web1")
    assert ip == "10.61.0.11"
    with pytest.raises(NetError, match=r"10\.61\.0\.10 is already in use"):
        await guest(api, nid, "61000002-0000-4000-8000-000000000000", "web2", ip="10.61.0.10")
    cfg = await router_config(api, nid)
    assert cfg["dhcp"] == [{"mac": cfg["dhcp"][0]["mac"], "ip": "10.61.0.11", "hostname": "web1"}]
    assert cfg["vm_data"][0]["meta_data"]["local-ipv4"] == "10.61.0.11"
    assert "public-ipv4" not in cfg["vm_data"][0]["meta_data"]
    # Nothing that needs a public side: clear refusals, nothing stored
    err = await api_error(api, "associateIpAddress", networkid=nid)
    assert err["errorcode"] == 431 and "Shared" in err["errortext"], err
    err = await api_error(api, "createEgressFirewallRule", networkid=nid, protocol="tcp")
    assert err["errorcode"] == 431 and "Firewall" in err["errortext"], err
    assert await router_config(api, nid) == cfg
    # An offering change that would take the router away is refused
    plain = await api.call(
        "createNetworkOffering", name="shared-plain", displaytext="no services",
        guestiptype="Shared", supportedservices="", traffictype="GUEST", enable="true",
    )  # fmt: skip
    err = await api_error(
        api, "updateNetwork", id=nid, networkofferingid=plain["networkoffering"]["id"]
    )
    assert err["errorcode"] == 431 and "takes the virtual router away" in err["errortext"], err
    # A Shared network whose offering has none of the router's services gets no router
    bare = await api.call(
        "createNetwork", name="bare", displaytext="bare",
        zoneid=(await api.call("listZones"))["zone"][0]["id"],
        networkofferingid=plain["networkoffering"]["id"], gateway="10.62.0.1",
        netmask="255.255.255.0", startip="10.62.0.10",
    )  # fmt: skip
    assert "router" not in await api.call("listRouters", networkid=bare["network"]["id"])
    res = await api.job("restartNetwork", id=bare["network"]["id"], cleanup="true")
    assert res["jobstatus"] == 1, res
    assert "router" not in await api.call("listRouters", networkid=bare["network"]["id"])
    # deleteNetwork takes the router with it (after the guest left)
    async with api.ctx.store.transaction() as tx:
        await remove_vm_nics(tx, "61000001-0000-4000-8000-000000000000")
    done = await api.job("deleteNetwork", id=nid)
    assert done["jobstatus"] == 1, done
    assert (await api.call("listRouters", id=r["id"]))["router"][0]["state"] == "Destroyed"


async def test_shared_network_range_of_one_address_goes_to_its_router(api: Api) -> None:
    net = await shared_network(api, "tiny", startip="10.61.0.10", endip="10.61.0.10")
    router = (await api.call("listRouters", networkid=net["id"]))["router"][0]
    assert router["guestipaddress"] == "10.61.0.10"
    with pytest.raises(NetError, match="no free IP address"):
        await guest(api, net["id"], "63000001-0000-4000-8000-000000000000", "vm1")
