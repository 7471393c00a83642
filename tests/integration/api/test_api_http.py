"""The API over real HTTP on loopback: the `cs` client and Apache libcloud's CloudStack
driver, unchanged, against our server; error shapes; async jobs; restart recovery."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from manager.api import signing
from manager.api.dispatch import REGISTRY, Call, Param, PType, api_command
from manager.api.responses import ApiError, AsyncResult
from manager.store.base import Job, JobStatus, Role, VmState

TIMEOUT = aiohttp.ClientTimeout(total=30)
Api = Any  # tests/integration/api/conftest.py: Api


def signed(api: Api, params: dict[str, str], *, secret: str | None = None) -> dict[str, str]:
    p = {**params, "apiKey": api.apikey, "response": params.get("response", "json")}
    p["signature"] = signing.sign(p, secret or api.secretkey)
    return p


async def get(api: Api, params: dict[str, str]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
        s.get(api.url, params=params) as r,
    ):
        body = await r.read()
        if r.content_type == "application/json":
            return r.status, json.loads(body)
        return r.status, body


async def add_vms(api: Api) -> dict[str, Any]:
    store = api.ctx.store
    zone = (await store.list_zones())[0]
    host = (await store.list_hosts())[0]
    async with store.transaction() as tx:
        v = await tx.create_system_vm(
            role=Role.CONSOLE_PROXY, zone_id=zone.id, hypervisor="Embedded", host_id=host.id
        )
        s = await tx.create_system_vm(
            role=Role.SECONDARY_STORAGE, zone_id=zone.id, hypervisor="Embedded"
        )
        r = await tx.create_system_vm(role=Role.ROUTER, zone_id=zone.id, hypervisor="Embedded")
        await tx.update_system_vm(
            v.id,
            state=VmState.RUNNING,
            public_ip="198.18.0.10",
            image_version="0.1.0",
            details={"activeviewersessions": 3},
        )
    return {"zone": zone, "host": host, "cpvm": v, "ssvm": s, "router": r}


async def test_cs_client_lists_infrastructure_and_system_vms(api: Api, cs_client: Any) -> None:
    vms = await add_vms(api)
    cs = cs_client(api)
    zones = await asyncio.to_thread(cs.listZones)
    assert zones["count"] == 1 and zones["zone"][0]["name"] == "zone1"
    zone_id = zones["zone"][0]["id"]
    pods = await asyncio.to_thread(cs.listPods, zoneid=zone_id)
    assert pods["pod"][0]["zonename"] == "zone1" and pods["pod"][0]["gateway"] == "100.64.0.1"
    clusters = await asyncio.to_thread(cs.listClusters)
    assert clusters["cluster"][0]["hypervisortype"] == "Embedded"
    hosts = await asyncio.to_thread(cs.listHosts, type="Routing")
    assert hosts["host"][0]["id"] == vms["host"].id

    out = await asyncio.to_thread(cs.listSystemVms)
    assert out["count"] == 2  # routers are listed by listRouters
    by_type = {v["systemvmtype"]: v for v in out["systemvm"]}
    cp = by_type["consoleproxy"]
    assert cp["name"] == vms["cpvm"].name and cp["state"] == "Running"
    assert cp["zonename"] == "zone1" and cp["hostname"] == vms["host"].name
    assert cp["publicip"] == "198.18.0.10" and cp["activeviewersessions"] == 3
    assert cp["agentstate"] == "Disconnected" and cp["version"] == "0.1.0"
    assert cp["created"].endswith("+0000")
    assert by_type["secondarystoragevm"]["state"] == "Starting"
    only = await asyncio.to_thread(cs.listSystemVms, systemvmtype="secondarystoragevm")
    assert [v["id"] for v in only["systemvm"]] == [vms["ssvm"].id]
    none = await asyncio.to_thread(cs.listSystemVms, state="Stopped")
    assert none == {}
    by_id = await asyncio.to_thread(cs.listSystemVms, id=vms["cpvm"].id)
    assert by_id["count"] == 1


async def test_cs_signature_v1_and_v3(api: Api, cs_client: Any) -> None:
    v1 = cs_client(api, expiration=-1)  # cs then signs without signatureVersion/expires
    assert (await asyncio.to_thread(v1.listZones))["count"] == 1
    v3 = cs_client(api, expiration=300)
    assert (await asyncio.to_thread(v3.listZones))["count"] == 1
    from cs import CloudStackApiException

    with pytest.raises(CloudStackApiException) as info:
        await asyncio.to_thread(
            v3.listZones, signatureVersion="3", expires="2001-01-01T00:00:00+0000"
        )
    assert info.value.error["errorcode"] == 401


async def test_cs_pagination_fetch_list(api: Api, cs_client: Any) -> None:
    cs = cs_client(api)
    every = await asyncio.to_thread(cs.listConfigurations, fetch_list=True, pagesize=4)
    direct = await asyncio.to_thread(cs.listConfigurations, pagesize=-1)
    assert len(every) == direct["count"] == len(direct["configuration"]) > 4
    page2 = await asyncio.to_thread(cs.listConfigurations, page=2, pagesize=4)
    assert page2["count"] == direct["count"]
    assert page2["configuration"] == direct["configuration"][4:8]


async def test_configurations_list_update_event_and_agent_bump(api: Api, cs_client: Any) -> None:
    vms = await add_vms(api)
    pushed: list[list[str]] = []
    api.ctx.settings.on_desired_changed(pushed.append)
    cs = cs_client(api, method="post")
    got = await asyncio.to_thread(cs.listConfigurations, name="consoleproxy.session.max")
    item = got["configuration"][0]
    assert item == {
        **item,
        "name": "consoleproxy.session.max",
        "value": "50",
        "defaultvalue": "50",
        "category": "Console Proxy",
        "scope": "zone",
        "isdynamic": True,
        "type": "Number",
    }
    cat = await asyncio.to_thread(cs.listConfigurations, category="Console Proxy")
    assert all(c["category"] == "Console Proxy" for c in cat["configuration"])
    kw = await asyncio.to_thread(cs.listConfigurations, keyword="agent.heartbeat.int")
    assert [c["name"] for c in kw["configuration"]] == ["sysvm.agent.heartbeat.interval"]

    zone_id = vms["zone"].id
    up = await asyncio.to_thread(
        cs.updateConfiguration, name="sysvm.agent.heartbeat.interval", value="15"
    )
    assert up["configuration"]["value"] == "15.0"
    assert api.ctx.settings.get("sysvm.agent.heartbeat.interval") == 15.0
    assert sorted(pushed[-1]) == sorted(v.id for v in (vms["cpvm"], vms["ssvm"], vms["router"]))
    router = await api.ctx.store.get_system_vm(vms["router"].id)
    assert router is not None and router.desired_version == 1

    zup = await asyncio.to_thread(
        cs.updateConfiguration, name="consoleproxy.session.max", value="80", zoneid=zone_id
    )
    assert zup["configuration"]["value"] == "80" and zup["configuration"]["id"] == zone_id
    zl = await asyncio.to_thread(
        cs.listConfigurations, zoneid=zone_id, name="consoleproxy.session.max"
    )
    assert zl["configuration"][0]["value"] == "80"
    gl = await asyncio.to_thread(cs.listConfigurations, name="consoleproxy.session.max")
    assert gl["configuration"][0]["value"] == "50"
    assert all(
        c["scope"] == "zone"
        for c in (await asyncio.to_thread(cs.listConfigurations, zoneid=zone_id))["configuration"]
    )

    nd = await asyncio.to_thread(
        cs.updateConfiguration, name="sysvm.api.request.max.bytes", value="4096"
    )
    assert nd["configuration"]["isdynamic"] is False
    assert nd["configuration"]["restartrequired"] is True

    events = await asyncio.to_thread(cs.listEvents, type="CONFIGURATION.VALUE.EDIT")
    texts = [e["description"] for e in events["event"]]
    assert any("sysvm.agent.heartbeat.interval" in t and "15" in t for t in texts)
    assert events["count"] == 3

    reset = await asyncio.to_thread(
        cs.updateConfiguration, name="consoleproxy.session.max", zoneid=zone_id
    )
    assert reset["configuration"]["value"] == "50"

    from cs import CloudStackApiException

    with pytest.raises(CloudStackApiException) as info:
        await asyncio.to_thread(cs.updateConfiguration, name="ping.interval", value="-3")
    assert info.value.error["errorcode"] == 431
    assert "ping.interval" in info.value.error["errortext"]
    with pytest.raises(CloudStackApiException) as info:
        await asyncio.to_thread(
            cs.updateConfiguration, name="ping.interval", value="5", zoneid=zone_id
        )
    assert "global setting" in info.value.error["errortext"]
    with pytest.raises(CloudStackApiException) as info:
        await asyncio.to_thread(cs.updateConfiguration, name="no.such.thing", value="5")
    assert info.value.error["errorcode"] == 431


async def test_capabilities_apis_alerts(api: Api, cs_client: Any) -> None:
    cs = cs_client(api)
    caps = await asyncio.to_thread(cs.listCapabilities)
    assert caps["capability"]["cloudstackversion"].startswith("4.")
    apis = await asyncio.to_thread(cs.listApis)
    names = {a["name"] for a in apis["api"]}
    assert {"listSystemVms", "updateConfiguration", "queryAsyncJobResult"} <= names
    one = await asyncio.to_thread(cs.listApis, name="updateConfiguration")
    params = {p["name"]: p for p in one["api"][0]["params"]}
    assert params["name"]["required"] is True and params["zoneid"]["type"] == "uuid"
    assert await asyncio.to_thread(cs.listAlerts) == {}


@pytest.fixture
def echo_command() -> Iterator[None]:
    """An async command registered the documented way, for the job machinery."""

    @api_command(
        "sysvmTestEcho",
        "test-only: echoes after a delay, or fails",
        params=(
            Param("text", required=True),
            Param("fail", PType.BOOLEAN),
            Param("hang", PType.BOOLEAN),
            Param("crash", PType.BOOLEAN),
        ),
        is_async=True,
    )
    async def echo(call: Call) -> AsyncResult:
        async def work() -> dict[str, Any]:
            if call.get("hang"):
                await asyncio.Event().wait()
            if call.get("crash"):
                raise ZeroDivisionError("a bug")
            if call.get("fail"):
                raise ApiError(530, f"failed on purpose: {call.args['text']}")
            return {"echo": {"text": call.args["text"]}}

        job = await call.jobs.submit(
            call.ctx, "sysvmTestEcho", call.user.account_id, work, "None", None
        )
        return AsyncResult(job)

    try:
        yield
    finally:
        REGISTRY.pop("sysvmtestecho", None)


@pytest.mark.usefixtures("echo_command")
async def test_async_jobs_with_cs_and_libcloud(api: Api, cs_client: Any) -> None:
    cs = cs_client(api, poll_interval=0.05, job_timeout=30)
    res = await asyncio.to_thread(cs.sysvmTestEcho, text="hi", fetch_result=True)
    assert res == {"echo": {"text": "hi"}}

    raw = await asyncio.to_thread(cs.sysvmTestEcho, text="x")
    await api.jobs.wait(raw["jobid"], within=10)
    q = await asyncio.to_thread(cs.queryAsyncJobResult, jobid=raw["jobid"])
    assert q["jobstatus"] == 1 and q["jobresultcode"] == 0 and q["jobresulttype"] == "object"
    assert q["cmd"] == "sysvmTestEcho" and q["jobinstancetype"] == "None"
    assert q["created"].endswith("+0000") and q["jobresult"] == {"echo": {"text": "x"}}

    from cs import CloudStackApiException

    with pytest.raises(CloudStackApiException) as info:
        await asyncio.to_thread(cs.sysvmTestEcho, text="bad", fail=True, fetch_result=True)
    assert info.value.error["errortext"] == "failed on purpose: bad"
    with pytest.raises(CloudStackApiException) as info:
        await asyncio.to_thread(cs.sysvmTestEcho, text="c", crash=True, fetch_result=True)
    assert info.value.error["errorcode"] == 530
    assert "internal error" in info.value.error["errortext"]
    assert "a bug" not in info.value.error["errortext"]  # details stay in the log

    from libcloud.compute.drivers.cloudstack import CloudStackNodeDriver

    driver = CloudStackNodeDriver(key=api.apikey, secret=api.secretkey, url=api.url, secure=False)
    driver.connection.poll_interval = 0.05
    locs = await asyncio.to_thread(driver.list_locations)
    assert [loc.name for loc in locs] == ["zone1"]
    cfg = await asyncio.to_thread(
        driver._sync_request, "listConfigurations", params={"name": "ping.interval"}
    )
    assert cfg["configuration"][0]["value"] == "60"
    out = await asyncio.to_thread(
        driver._async_request, "sysvmTestEcho", params={"text": "libcloud [1] ~*"}
    )
    assert out == {"echo": {"text": "libcloud [1] ~*"}}


async def test_pending_job_marked_failed_at_restart(tmp_path: Path, api_factory: Any) -> None:
    home = tmp_path / "home"
    api, runner = await api_factory(home)
    try:
        now = time.time()
        async with api.ctx.store.transaction() as tx:
            await tx.add_job(
                Job(
                    "3b9f8f2e-0000-4000-8000-000000000001",
                    "stopSystemVm",
                    "acct",
                    JobStatus.PENDING,
                    0,
                    "object",
                    {},
                    None,
                    None,
                    now,
                    now,
                )
            )
    finally:
        await runner.cleanup()
        await api.ctx.store.close()
    api2, runner2 = await api_factory(home)
    try:
        status, body = await get(
            api2,
            signed(
                api2,
                {"command": "queryAsyncJobResult", "jobid": "3b9f8f2e-0000-4000-8000-000000000001"},
            ),
        )
        inner = body["queryasyncjobresultresponse"]
        assert status == 200 and inner["jobstatus"] == 2 and inner["jobresultcode"] == 530
        assert "manager stopped" in inner["jobresult"]["errortext"]
        assert api2.apikey == api.apikey  # same keys after restart
    finally:
        await runner2.cleanup()
        await api2.ctx.store.close()


@pytest.mark.usefixtures("echo_command")
async def test_job_running_at_shutdown_is_failed(tmp_path: Path, api_factory: Any) -> None:
    api, runner = await api_factory(tmp_path / "home")
    try:
        _status, body = await get(
            api, signed(api, {"command": "sysvmTestEcho", "text": "t", "hang": "true"})
        )
        job_id = body["sysvmtestechoresponse"]["jobid"]
    finally:
        await runner.cleanup()  # cancels the job, which records its failure
    job = await api.ctx.store.get_job(job_id)
    await api.ctx.store.close()
    assert job is not None and job.status is JobStatus.FAILED


async def test_auth_errors_v1_v3(api: Api) -> None:
    base = {"command": "listZones", "response": "json"}
    ok, body = await get(api, signed(api, base))
    assert ok == 200 and body["listzonesresponse"]["count"] == 1

    bad = signed(api, base, secret="wrong")
    status, body = await get(api, bad)
    assert status == 401
    assert body == {
        "listzonesresponse": {
            "uuidList": [],
            "errorcode": 401,
            "errortext": "unable to verify user credentials and/or request signature",
        }
    }

    replay = {**signed(api, base), "zoneid": str(uuid.uuid4())}
    assert (await get(api, replay))[0] == 401
    unknown = {**base, "apiKey": "nobody", "signature": "x"}
    assert (await get(api, unknown))[0] == 401
    assert (await get(api, base))[0] == 401  # no signature at all

    def v3(delta: float) -> dict[str, str]:
        exp = (datetime.now(UTC) + timedelta(seconds=delta)).strftime("%Y-%m-%dT%H:%M:%S%z")
        return signed(api, {**base, "signatureVersion": "3", "expires": exp})

    assert (await get(api, v3(120)))[0] == 200
    assert (await get(api, v3(-5)))[0] == 401
    # unknown command: 432 only once authenticated; before that 401
    s, b = await get(api, signed(api, {"command": "listNothing"}))
    assert s == 432 and b["errorresponse"]["errorcode"] == 432
    s, b = await get(api, {"command": "listNothing"})
    assert s == 401
    s, b = await get(api, signed(api, {}))
    assert s == 431 and "command" in b["errorresponse"]["errortext"]


async def test_bad_requests_get_clear_errors(api: Api) -> None:
    s, b = await get(api, signed(api, {"command": "listSystemVms", "id": "nope"}))
    assert s == 431 and b["listsystemvmsresponse"]["cserrorcode"] == 4350
    assert "id" in b["listsystemvmsresponse"]["errortext"]
    s, b = await get(
        api, signed(api, {"command": "queryAsyncJobResult", "jobid": str(uuid.uuid4())})
    )
    assert s == 431 and "Unable to find job" in b["queryasyncjobresultresponse"]["errortext"]
    s, b = await get(api, signed(api, {"command": "listZones", "response": "xml"}))
    assert s == 200 and b.startswith(b"<?xml") and b"<name>zone1</name>" in b

    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        big = "x" * (1_048_576 + 10)
        async with session.post(api.url, data={"command": "listZones", "k": big}) as r:
            assert r.status == 413
            assert (await r.json())["errorresponse"]["errorcode"] == 413
        async with session.put(api.url, data="a=b") as r:
            assert r.status == 405
        async with session.post(api.url, data=b"command=listZones&x=%FF%FE") as r:
            assert r.status == 431
            assert "UTF-8" in (await r.json())["errorresponse"]["errortext"]
        async with session.post(
            api.url, data=b"\xff\xfe", headers={"Content-Type": "application/x-www-form-urlencoded"}
        ) as r:
            assert r.status == 431
        async with session.post(api.url, data=b"command=listZones&a%3Db=1") as r:
            assert r.status == 431 and "invalid parameter name" in await r.text()
        async with session.post(api.url, json={"command": "listZones"}) as r:
            assert r.status == 431 and "Content-Type" in (await r.text())
        # POST form signed like cs does it still works after all that
        async with session.post(api.url, data=signed(api, {"command": "listZones"})) as r:
            assert r.status == 200


@pytest.fixture
async def two_apis(tmp_path: Path, api_factory: Any) -> AsyncIterator[tuple[Api, Api]]:
    a, ra = await api_factory(tmp_path / "a")
    b, rb = await api_factory(tmp_path / "b")
    try:
        yield a, b
    finally:
        for r, x in ((ra, a), (rb, b)):
            await r.cleanup()
            await x.ctx.store.close()


async def test_keys_are_per_manager(two_apis: tuple[Api, Api]) -> None:
    a, b = two_apis
    assert a.apikey != b.apikey and a.secretkey != b.secretkey
    assert (await get(b, signed(a, {"command": "listZones"})))[0] == 401


async def test_requests_are_counted(api: Api) -> None:
    await get(api, signed(api, {"command": "listZones"}))
    await get(api, signed(api, {"command": "listZones"}, secret="bad"))
    await get(api, signed(api, {"command": "noSuchThing"}))
    m = api.ctx.metrics
    assert m.get("sysvm_api_requests_total", command="listZones", status="200") == 1
    assert m.get("sysvm_api_requests_total", command="listZones", status="401") == 1
    assert m.get("sysvm_api_requests_total", command="unknown", status="432") == 1
    assert "sysvm_api_requests_total" in m.render()


async def test_accounts_and_key_rotation(api: Api, cs_client: Any) -> None:
    cs = cs_client(api)
    users = await asyncio.to_thread(cs.listUsers)
    [admin] = users["user"]
    assert admin["username"] == "admin" and admin["roletype"] == "Admin"
    assert "secretkey" not in admin and api.secretkey not in json.dumps(users)
    accounts = await asyncio.to_thread(cs.listAccounts)
    assert accounts["account"][0]["name"] == "admin"
    domains = await asyncio.to_thread(cs.listDomains)
    assert domains["domain"][0]["name"] == "ROOT"

    keys = (await asyncio.to_thread(cs.registerUserKeys, id=admin["id"]))["userkeys"]
    assert keys["apikey"] != api.apikey and keys["secretkey"] != api.secretkey
    from cs import CloudStackApiException

    with pytest.raises(CloudStackApiException) as info:  # the old pair is dead at once
        await asyncio.to_thread(cs.listZones)
    assert info.value.error["errorcode"] == 401
    creds = json.loads((api.ctx.home / "credentials.json").read_text())
    assert (creds["apikey"], creds["secretkey"]) == (keys["apikey"], keys["secretkey"])
    api.apikey, api.secretkey = keys["apikey"], keys["secretkey"]
    assert (await asyncio.to_thread(cs_client(api).listZones))["count"] == 1
    events = await asyncio.to_thread(cs_client(api).listEvents, type="REGISTER.USER.KEY")
    assert events["count"] == 1 and keys["secretkey"] not in json.dumps(events)


async def test_non_admin_user_is_confined(api: Api, cs_client: Any) -> None:
    from cs import CloudStackApiException

    from manager.store.base import User

    user = User(
        str(uuid.uuid4()),
        str(uuid.uuid4()),
        "alice",
        "alice",
        0,
        "00000000-0000-0000-0000-000000000001",
        "alice-key",
        "alice-secret",
        "enabled",
    )
    async with api.ctx.store.transaction() as tx:
        await tx.add_user(user)
    admin_cs = cs_client(api)
    await asyncio.to_thread(admin_cs.updateConfiguration, name="ping.interval", value="50")
    admin_id = (await asyncio.to_thread(admin_cs.listUsers, username="admin"))["user"][0]["id"]

    from cs import CloudStack

    alice = CloudStack(endpoint=api.url, key="alice-key", secret="alice-secret")
    assert (await asyncio.to_thread(alice.listZones))["count"] == 1
    for call, kw in (
        ("updateConfiguration", {"name": "ping.interval", "value": "5"}),
        ("listConfigurations", {}),
        ("listSystemVms", {}),
        ("listHosts", {}),
        ("listAlerts", {}),
    ):
        with pytest.raises(CloudStackApiException) as info:
            await asyncio.to_thread(getattr(alice, call), **kw)
        assert info.value.error["errorcode"] == 401, call
        assert "not available for user" in info.value.error["errortext"]
    assert api.ctx.settings.get("ping.interval") == 50
    apis = {a["name"] for a in (await asyncio.to_thread(alice.listApis))["api"]}
    assert "listZones" in apis and "updateConfiguration" not in apis
    assert await asyncio.to_thread(alice.listEvents) == {}  # the admin's events are not hers
    users = await asyncio.to_thread(alice.listUsers)
    assert [u["username"] for u in users["user"]] == ["alice"]
    with pytest.raises(CloudStackApiException):  # cannot rotate the admin's keys
        await asyncio.to_thread(alice.registerUserKeys, id=admin_id)
    assert (await asyncio.to_thread(admin_cs.listZones))["count"] == 1  # admin keys intact
    mine = await asyncio.to_thread(alice.registerUserKeys, id=user.id)
    assert mine["userkeys"]["apikey"] != "alice-key"
    creds = json.loads((api.ctx.home / "credentials.json").read_text())
    assert creds["apikey"] == api.apikey  # the admin's file is untouched
