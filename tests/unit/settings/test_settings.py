"""manager.settings: the table, parsing, resolution, updates with desired-version bumps."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from manager.settings import (
    SETTINGS,
    SETTINGS_BY_NAME,
    Kind,
    Scope,
    Setting,
    SettingError,
    Settings,
    resolve,
)
from manager.store.base import Role, VmState, Zone
from manager.store.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "sysvm.db")
    try:
        yield s
    finally:
        await s.close()


async def add_zone(store: SqliteStore, name: str) -> str:
    z = Zone(
        str(uuid.uuid4()),
        name,
        "Enabled",
        "Advanced",
        "198.18.0.1",
        "100.64.0.1",
        "198.18.0.0/24",
        "10.250.0.0/16",
        "169.254.0.0/16",
        1.0,
    )
    async with store.transaction() as tx:
        await tx.add_zone(z)
    return z.id


def test_table_has_cloudstack_names_and_defaults() -> None:
    d = {s.name: s.default for s in SETTINGS}
    assert d["consoleproxy.session.max"] == 50
    assert d["consoleproxy.capacity.standby"] == 10
    assert d["consoleproxy.capacityscan.interval"] == 30.0
    assert d["consoleproxy.session.timeout"] == 300
    assert d["secstorage.session.max"] == 50
    assert d["ping.interval"] == 60
    assert d["ping.timeout"] == 2.5
    assert d["router.stats.interval"] == 300
    assert d["network.router.EnableServiceMonitoring"] is False
    assert d["sysvm.enrolment.token.ttl"] == 600
    assert d["sysvm.agent.cert.validity"] == 30
    assert d["sysvm.agent.heartbeat.interval"] == 10.0
    assert SETTINGS_BY_NAME["sysvm.agent.heartbeat.interval"].agent
    assert SETTINGS_BY_NAME["network.router.EnableServiceMonitoring"].scope is Scope.ZONE
    assert len(SETTINGS_BY_NAME) == len(SETTINGS)


@pytest.mark.parametrize("decl", SETTINGS, ids=lambda s: s.name)
def test_every_default_round_trips(decl: Setting) -> None:
    assert decl.parse(decl.render(decl.default)) == decl.default


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("ping.interval", "abc", r"ping.interval: expected an integer between 1 and 86400"),
        ("ping.interval", "0", r"ping.interval: 0 is out of range between 1 and 86400"),
        ("ping.interval", "1.5", r"expected an integer"),
        ("ping.timeout", "nan", r"ping.timeout: expected a finite number"),
        ("ping.timeout", "0.5", r"out of range between 1 and 100"),
        ("router.version.check", "yes", r"router.version.check: expected a boolean"),
        ("consoleproxy.url.domain", "a\nb", r"control characters"),
        ("consoleproxy.url.domain", "x" * 5000, r"longer than 4096"),
    ],
)
def test_parse_errors_name_setting_and_expectation(name: str, raw: str, message: str) -> None:
    with pytest.raises(SettingError, match=message):
        SETTINGS_BY_NAME[name].parse(raw)


def test_parse_values() -> None:
    assert SETTINGS_BY_NAME["router.version.check"].parse(" FALSE ") is False
    assert SETTINGS_BY_NAME["ping.interval"].parse(" 30 ") == 30
    assert SETTINGS_BY_NAME["ping.timeout"].parse("3") == 3.0
    e = Setting("x.mode", Kind.ENUM, "a", "d", choices=("a", "b"))
    assert e.parse("b") == "b"
    with pytest.raises(SettingError, match="expected one of a, b"):
        e.parse("c")


def test_resolve_zone_global_default() -> None:
    decl = SETTINGS_BY_NAME["consoleproxy.session.max"]
    assert resolve(decl, {}, "z") == 50
    assert resolve(decl, {(decl.name, None): 70}, "z") == 70
    assert resolve(decl, {(decl.name, None): 70, (decl.name, "z"): 90}, "z") == 90
    assert resolve(decl, {(decl.name, None): 70, (decl.name, "z"): 90}, "other") == 70
    glob = SETTINGS_BY_NAME["ping.interval"]  # global scope ignores zone values
    assert resolve(glob, {(glob.name, "z"): 5}, "z") == 60


async def test_update_get_reset_and_persistence(store: SqliteStore) -> None:
    z = await add_zone(store, "z1")
    s = Settings(store)
    await s.load()
    changes: list[tuple[str, str | None]] = []
    s.on_change(lambda n, zone: changes.append((n, zone)))
    async with store.transaction() as tx:
        assert await s.update(tx, "consoleproxy.session.max", "70") == 70
        await s.update(tx, "consoleproxy.session.max", "90", z)
        assert changes == []  # only after commit
        assert s.get("consoleproxy.session.max") == 50
    assert changes == [("consoleproxy.session.max", None), ("consoleproxy.session.max", z)]
    assert s.get("consoleproxy.session.max") == 70
    assert s.get("consoleproxy.session.max", z) == 90
    s2 = Settings(store)  # a restart sees the same
    await s2.load()
    assert s2.get("consoleproxy.session.max", z) == 90
    async with store.transaction() as tx:
        assert await s.reset(tx, "consoleproxy.session.max", z) == 70
    assert s.get("consoleproxy.session.max", z) == 70


async def test_update_errors(store: SqliteStore) -> None:
    z = await add_zone(store, "z1")
    s = Settings(store)
    await s.load()
    async with store.transaction() as tx:
        with pytest.raises(SettingError, match=r"unknown setting 'no\.such'"):
            await s.update(tx, "no.such", "1")
        with pytest.raises(SettingError, match=r"ping\.interval: is a global setting"):
            await s.update(tx, "ping.interval", "5", z)
        with pytest.raises(SettingError, match="no zone with id"):
            await s.update(tx, "consoleproxy.session.max", "5", str(uuid.uuid4()))
        with pytest.raises(SettingError, match="expected an integer"):
            await s.update(tx, "consoleproxy.session.max", "many")
    assert await store.list_setting_values() == []


async def test_agent_setting_bumps_desired_in_same_transaction(store: SqliteStore) -> None:
    z1 = await add_zone(store, "z1")
    z2 = await add_zone(store, "z2")
    async with store.transaction() as tx:
        a = await tx.create_system_vm(role=Role.ROUTER, zone_id=z1, hypervisor="Embedded")
        b = await tx.create_system_vm(role=Role.CONSOLE_PROXY, zone_id=z2, hypervisor="Embedded")
        gone = await tx.create_system_vm(role=Role.ROUTER, zone_id=z1, hypervisor="Embedded")
        await tx.update_system_vm(gone.id, state=VmState.DESTROYED)
    s = Settings(store)
    await s.load()
    pushed: list[list[str]] = []
    s.on_desired_changed(pushed.append)

    # Rolled back: no bump, no cache change, no push.
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await s.update(tx, "sysvm.agent.heartbeat.interval", "20")
            raise RuntimeError("abort")
    assert s.get("sysvm.agent.heartbeat.interval") == 10.0
    assert pushed == []
    assert {v.desired_version for v in await store.list_system_vms()} == {0}

    async with store.transaction() as tx:
        await s.update(tx, "sysvm.agent.heartbeat.interval", "20")
    assert pushed == [[a.id, b.id]]
    versions = {v.id: v.desired_version for v in await store.list_system_vms()}
    assert versions == {a.id: 1, b.id: 1, gone.id: 0}
    assert s.agent_settings(z1)["sysvm.agent.heartbeat.interval"] == 20.0

    # Zone scope: only that zone's VMs.
    async with store.transaction() as tx:
        await s.update(tx, "network.router.EnableServiceMonitoring", "true", z1)
    assert pushed[-1] == [a.id]
    versions = {v.id: v.desired_version for v in await store.list_system_vms()}
    assert versions == {a.id: 2, b.id: 1, gone.id: 0}
    assert s.agent_settings(z1)["network.router.EnableServiceMonitoring"] is True
    assert s.agent_settings(z2)["network.router.EnableServiceMonitoring"] is False

    # A non-agent setting bumps nothing.
    async with store.transaction() as tx:
        await s.update(tx, "ping.interval", "30")
    assert len(pushed) == 2


async def test_non_dynamic_takes_effect_after_restart(store: SqliteStore) -> None:
    s = Settings(store)
    await s.load()
    name = "sysvm.api.request.max.bytes"
    assert not SETTINGS_BY_NAME[name].dynamic
    changes: list[str] = []
    s.on_change(lambda n, _z: changes.append(n))
    async with store.transaction() as tx:
        await s.update(tx, name, "2048")
    assert s.get(name) == 1_048_576  # still the value loaded at start
    assert s.stored(name) == 2048
    assert s.restart_required(name)
    assert changes == []
    s2 = Settings(store)
    await s2.load()
    assert s2.get(name) == 2048 and not s2.restart_required(name)


async def test_load_skips_unknown_and_invalid_rows(store: SqliteStore) -> None:
    async with store.transaction() as tx:
        await tx.set_setting("gone.setting", "1", "global", None, 1.0)
        await tx.set_setting("ping.interval", "not-a-number", "global", None, 1.0)
        await tx.set_setting("ping.timeout", "3.5", "global", None, 1.0)
    s = Settings(store)
    await s.load()
    assert s.get("ping.interval") == 60
    assert s.get("ping.timeout") == 3.5
