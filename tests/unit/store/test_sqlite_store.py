"""SqliteStore against a real SQLite file in a temp dir (no sockets)."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from manager.store import open_store
from manager.store.base import (
    Alert,
    Cluster,
    Event,
    Host,
    Job,
    JobStatus,
    Pod,
    Role,
    TokenOutcome,
    User,
    VmState,
    Zone,
)
from manager.store.sqlite import (
    SqliteStore,
    StoreError,
    TransactionClosed,
    load_migrations,
    split_sql,
    token_outcome,
)


def zone(name: str = "z1") -> Zone:
    return Zone(
        id=str(uuid.uuid4()),
        name=name,
        allocation_state="Enabled",
        network_type="Advanced",
        dns1="198.18.0.1",
        internal_dns1="100.64.0.1",
        public_cidr="198.18.0.0/24",
        guest_cidr="10.250.0.0/16",
        linklocal_cidr="169.254.0.0/16",
        created=1.0,
    )


async def add_infra(store: SqliteStore, name: str = "z1") -> tuple[Zone, Pod, Cluster, Host]:
    z = zone(name)
    p = Pod(
        str(uuid.uuid4()),
        z.id,
        "p1",
        "100.64.0.1",
        "255.255.255.0",
        "100.64.0.10",
        "100.64.0.20",
        2.0,
    )
    c = Cluster(str(uuid.uuid4()), p.id, z.id, "c1", "Embedded", 3.0)
    h = Host(
        str(uuid.uuid4()), c.id, p.id, z.id, "h1", "Routing", "Embedded", "127.0.0.1", "Up", 4.0
    )
    async with store.transaction() as tx:
        await tx.add_zone(z)
        await tx.add_pod(p)
        await tx.add_cluster(c)
        await tx.add_host(h)
    return z, p, c, h


async def test_file_is_0600_and_migrations_recorded_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    s = await open_store(home)
    await s.close()
    db = home / "sysvm.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    s2 = await open_store(home)  # re-running migrations is a no-op
    await s2.close()
    con = sqlite3.connect(db)
    rows = con.execute("SELECT version, name FROM schema_version ORDER BY version").fetchall()
    assert rows == [(n, name) for n, name, _ in load_migrations()]
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


async def test_wal_and_shm_files_are_0600(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "sysvm.db")
    try:
        await add_infra(s)
        for suffix in ("-wal", "-shm"):
            f = tmp_path / f"sysvm.db{suffix}"
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        await s.close()


async def test_new_migration_applied_once_and_failed_one_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import manager.store.sqlite as mod

    db = tmp_path / "sysvm.db"
    await (await SqliteStore.open(db)).close()
    base = load_migrations()
    top = base[-1][0]
    extra = (
        top + 1,
        "extra",
        "CREATE TABLE extra (x INTEGER);\nINSERT INTO extra VALUES (1);",
    )
    monkeypatch.setattr(mod, "load_migrations", lambda: [*base, extra])
    for _ in range(2):  # the second open is a no-op (no duplicate insert, no error)
        await (await SqliteStore.open(db)).close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM extra").fetchone()[0] == 1
    con.close()

    broken = (top + 2, "broken", "CREATE TABLE half (x);\nINSERT INTO nowhere VALUES (1);")
    monkeypatch.setattr(mod, "load_migrations", lambda: [*base, extra, broken])
    with pytest.raises(sqlite3.OperationalError, match="nowhere"):
        await SqliteStore.open(db)
    con = sqlite3.connect(db)
    versions = [r[0] for r in con.execute("SELECT version FROM schema_version")]
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    con.close()
    assert versions == [n for n, _, _ in base] + [top + 1] and "half" not in tables


def test_migration_numbers_unique(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import manager.store.sqlite as mod

    numbers = [n for n, _, _ in load_migrations()]
    assert numbers == sorted(set(numbers)) and numbers[0] == 1

    class FakeDir:
        def __init__(self, names: list[str]) -> None:
            self.names = names

        def joinpath(self, _sub: str) -> FakeDir:
            return self

        def iterdir(self) -> list[Path]:
            out = []
            for n in self.names:
                (tmp_path / n).write_text("SELECT 1;")
                out.append(tmp_path / n)
            return out

    monkeypatch.setattr(mod.resources, "files", lambda _pkg: FakeDir(["001_a.sql", "001_b.sql"]))
    with pytest.raises(StoreError, match="two migrations numbered 001"):
        load_migrations()
    monkeypatch.setattr(
        mod.resources, "files", lambda _pkg: FakeDir(["001_a.sql", "120_c.sql", "README", "x.sql"])
    )
    assert [(n, name) for n, name, _ in load_migrations()] == [(1, "a"), (120, "c")]


async def test_existing_db_with_loose_mode_is_tightened(tmp_path: Path) -> None:
    db = tmp_path / "sysvm.db"
    db.touch(mode=0o644)
    s = await SqliteStore.open(db)
    await s.close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_split_sql_respects_quotes_and_rejects_tail() -> None:
    assert split_sql("CREATE TABLE a (x TEXT DEFAULT ';');\n-- c\nSELECT 1;\n") == [
        "CREATE TABLE a (x TEXT DEFAULT ';');",
        "-- c\nSELECT 1;",
    ]
    with pytest.raises(StoreError, match="incomplete"):
        split_sql("SELECT 1;\nSELECT 2")


async def test_infrastructure_roundtrip_and_filters(store: SqliteStore) -> None:
    z, p, c, h = await add_infra(store)
    await add_infra(store, "z2")
    assert [x.name for x in await store.list_zones()] == ["z1", "z2"]
    assert await store.list_pods(z.id) == [p]
    assert await store.list_clusters(z.id) == [c]
    assert await store.list_hosts(z.id) == [h]
    assert len(await store.list_hosts()) == 2
    assert await store.list_pods("no-such-zone") == []


async def test_foreign_keys_enforced(store: SqliteStore) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        async with store.transaction() as tx:
            await tx.add_pod(Pod("p", "no-zone", "p", "1.1.1.1", "255.0.0.0", "a", "b", 1.0))
    assert await store.list_pods() == []


async def test_system_vm_create_names_and_update(store: SqliteStore) -> None:
    z, p, _, h = await add_infra(store)
    async with store.transaction() as tx:
        v = await tx.create_system_vm(role=Role.CONSOLE_PROXY, zone_id=z.id, hypervisor="Embedded")
        s = await tx.create_system_vm(
            role=Role.SECONDARY_STORAGE, zone_id=z.id, hypervisor="Embedded", details={"a": 1}
        )
        r = await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
    assert (v.name, s.name, r.name) == ("v-1-VM", "s-2-VM", "r-3-VM")
    assert v.state is VmState.STARTING and v.desired_version == 0 == v.applied_version
    async with store.transaction() as tx:
        await tx.update_system_vm(
            v.id,
            state=VmState.RUNNING,
            host_id=h.id,
            pod_id=p.id,
            public_ip="198.18.0.5",
            details={"activeviewersessions": 2},
        )
    got = await store.get_system_vm(v.id)
    assert got is not None
    assert got.state is VmState.RUNNING and got.host_id == h.id
    assert got.details == {"activeviewersessions": 2}
    assert (await store.get_system_vm(s.id)).details == {"a": 1}  # type: ignore[union-attr]
    assert await store.get_system_vm("nope") is None
    with pytest.raises(ValueError, match="name"):
        async with store.transaction() as tx:
            await tx.update_system_vm(v.id, name="x")
    with pytest.raises(KeyError):
        async with store.transaction() as tx:
            await tx.update_system_vm("nope", state=VmState.STOPPED)
    # filters
    assert [x.id for x in await store.list_system_vms(role=Role.ROUTER)] == [r.id]
    assert [x.id for x in await store.list_system_vms(states=[VmState.RUNNING])] == [v.id]
    assert await store.list_system_vms(states=[]) == []
    assert len(await store.list_system_vms(zone_id=z.id)) == 3
    # a destroyed VM keeps its seq: the next one does not reuse it
    async with store.transaction() as tx:
        await tx.update_system_vm(r.id, state=VmState.DESTROYED)
        assert await tx.live_system_vm_ids() == [v.id, s.id]
        n = await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
        assert n.name == "r-4-VM"
        assert n.id in await tx.live_system_vm_ids(z.id)  # own uncommitted write seen


async def test_bump_desired_and_record_applied(store: SqliteStore) -> None:
    z, *_ = await add_infra(store)
    async with store.transaction() as tx:
        a = await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
        b = await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
    async with store.transaction() as tx:
        assert await tx.bump_desired([a.id, b.id, a.id]) == {a.id: 1, b.id: 1}
        assert await tx.bump_desired([a.id]) == {a.id: 2}
    async with store.transaction() as tx:
        await tx.record_applied(a.id, 2)
        await tx.record_applied(a.id, 1)  # never goes back
    got = await store.get_system_vm(a.id)
    assert got is not None and (got.desired_version, got.applied_version) == (2, 2)
    with pytest.raises(KeyError):
        async with store.transaction() as tx:
            await tx.bump_desired(["nope"])


async def test_concurrent_transactions_serialise(store: SqliteStore) -> None:
    z, *_ = await add_infra(store)
    async with store.transaction() as tx:
        vm = await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")

    async def bump() -> None:
        async with store.transaction() as tx:
            await tx.bump_desired([vm.id])

    await asyncio.gather(*(bump() for _ in range(50)))
    got = await store.get_system_vm(vm.id)
    assert got is not None and got.desired_version == 50


async def test_reads_after_commit_see_it_while_other_reads_overlap(store: SqliteStore) -> None:
    """Read-your-commit: a read started after a transaction committed sees its writes even
    while other reads are in flight on the reader connection. (A cursor left open between
    ``execute`` and ``fetchall`` kept the reader's snapshot open across commits; the
    agent link then read an old ``desired_version`` and skipped a push for ever.)"""
    z, *_ = await add_infra(store)
    async with store.transaction() as tx:
        vms = [
            await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
            for _ in range(20)
        ]
    stop = asyncio.Event()

    async def background_reader() -> None:
        while not stop.is_set():
            await store.list_system_vms()

    readers = [asyncio.create_task(background_reader()) for _ in range(8)]
    stale = 0
    try:
        for round_ in range(1, 31):
            async with store.transaction() as tx:
                await tx.bump_desired([vm.id for vm in vms])
            for vm in vms:
                got = await store.get_system_vm(vm.id)
                assert got is not None
                stale += got.desired_version != round_
    finally:
        stop.set()
        await asyncio.gather(*readers)
    assert stale == 0


def _explode() -> None:
    raise RuntimeError("callback failure")


async def test_rollback_discards_writes_and_callbacks(store: SqliteStore) -> None:
    z, *_ = await add_infra(store)
    fired: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        async with store.transaction() as tx:
            await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
            tx.on_commit(lambda: fired.append("rolled-back"))
            raise RuntimeError("boom")
    assert await store.list_system_vms() == []
    assert fired == []

    async with store.transaction() as tx:
        vm = await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
        tx.on_commit(lambda: fired.append("first"))
        tx.on_commit(_explode)  # logged, does not stop the others
        tx.on_commit(lambda: fired.append("second"))
        # the reader sees only committed data
        assert await store.get_system_vm(vm.id) is None
        assert fired == []
    assert fired == ["first", "second"]
    assert await store.get_system_vm(vm.id) is not None
    with pytest.raises(TransactionClosed):
        await tx.bump_desired([vm.id])


async def test_cancelled_transaction_rolls_back(store: SqliteStore) -> None:
    z, *_ = await add_infra(store)
    entered = asyncio.Event()

    async def slow() -> None:
        async with store.transaction() as tx:
            await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(slow())
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.list_system_vms() == []
    async with store.transaction() as tx:  # the writer is usable again
        await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
    assert len(await store.list_system_vms()) == 1


def test_token_outcome_pure() -> None:
    kw = {
        "owner": "a",
        "presented_for": "a",
        "expires_at": 10.0,
        "used": False,
        "superseded": False,
        "now": 5.0,
    }
    assert token_outcome(**kw) is TokenOutcome.OK  # type: ignore[arg-type]
    assert token_outcome(**{**kw, "presented_for": "b"}) is TokenOutcome.WRONG_VM  # type: ignore[arg-type]
    assert token_outcome(**{**kw, "used": True}) is TokenOutcome.USED  # type: ignore[arg-type]
    assert token_outcome(**{**kw, "now": 10.0}) is TokenOutcome.EXPIRED  # type: ignore[arg-type]
    assert token_outcome(**{**kw, "superseded": True}) is TokenOutcome.EXPIRED  # type: ignore[arg-type]


async def test_enrolment_token_outcomes(store: SqliteStore) -> None:
    z, *_ = await add_infra(store)
    async with store.transaction() as tx:
        a = await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
        b = await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
        await tx.add_enrolment_token(a.id, b"h-a", expires_at=100.0)
        await tx.add_enrolment_token(b.id, b"h-b", expires_at=100.0)
        await tx.add_enrolment_token(b.id, b"h-b2", expires_at=100.0)  # supersedes h-b

    async def consume(h: bytes, vm: str, now: float) -> TokenOutcome:
        async with store.transaction() as tx:
            return await tx.consume_enrolment_token(h, vm, now)

    assert await consume(b"forged", a.id, 1.0) is TokenOutcome.UNKNOWN
    assert await consume(b"h-a", b.id, 1.0) is TokenOutcome.WRONG_VM
    assert await consume(b"h-a", a.id, 100.0) is TokenOutcome.EXPIRED
    assert await consume(b"h-b", b.id, 1.0) is TokenOutcome.EXPIRED  # superseded
    assert await consume(b"h-a", a.id, 1.0) is TokenOutcome.OK
    assert await consume(b"h-a", a.id, 2.0) is TokenOutcome.USED
    assert await consume(b"h-b2", b.id, 1.0) is TokenOutcome.OK


async def test_certificates_and_revocation(store: SqliteStore) -> None:
    z, *_ = await add_infra(store)
    big = 2**159 + 12345  # X.509 serials are up to 20 bytes
    async with store.transaction() as tx:
        vm = await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
        await tx.record_certificate(vm.id, big, 2e9)
        await tx.record_certificate(vm.id, 7, 2e9)
    assert not await store.is_revoked(big)
    async with store.transaction() as tx:
        assert await tx.revoke_certificates(vm.id, "destroyed", 5.0) == [7, big]
    assert await store.is_revoked(big) and await store.is_revoked(7)
    assert not await store.is_revoked(8)
    assert await store.revoked_serials() == {7, big}


async def test_commands_idempotent_by_id(store: SqliteStore) -> None:
    z, *_ = await add_infra(store)
    async with store.transaction() as tx:
        vm = await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
        assert await tx.add_command(vm.id, "c1", "reboot", {"force": True}, 1.0) is True
        assert await tx.add_command(vm.id, "c1", "other", {}, 2.0) is False
        assert await tx.add_command(vm.id, "c2", "ping", {}, 3.0) is True
    pending = await store.pending_commands(vm.id)
    assert [(c.id, c.name, dict(c.args)) for c in pending] == [
        ("c1", "reboot", {"force": True}),
        ("c2", "ping", {}),
    ]
    async with store.transaction() as tx:
        await tx.complete_command("c1", True, {"took": 1}, "")
        await tx.complete_command("c1", False, {}, "late duplicate")  # ignored
        await tx.complete_command("c2", False, {"raw": b"\x00\xff", "ids": {3}}, "no route")
    c1, c2 = await store.get_command("c1"), await store.get_command("c2")
    assert c1 is not None and (c1.state, dict(c1.result)) == ("done", {"took": 1})
    assert c2 is not None and (c2.state, c2.error) == ("failed", "no route")
    assert dict(c2.result) == {"raw": "AP8=", "ids": [3]}  # agent bytes stored as base64
    assert await store.pending_commands(vm.id) == []
    with pytest.raises(KeyError):
        async with store.transaction() as tx:
            await tx.complete_command("nope", True, {}, "")


async def test_jobs(store: SqliteStore) -> None:
    job = Job(
        "j1",
        "stopSystemVm",
        "acct",
        JobStatus.PENDING,
        0,
        "object",
        {},
        "SystemVm",
        "vm1",
        1.0,
        1.0,
    )
    async with store.transaction() as tx:
        await tx.add_job(job)
    assert await store.get_job("j1") == job
    assert [j.id for j in await store.list_jobs(status=JobStatus.PENDING)] == ["j1"]
    async with store.transaction() as tx:
        await tx.update_job(
            "j1",
            status=JobStatus.SUCCEEDED,
            result_code=0,
            result={"systemvm": {"id": "vm1"}},
            now=2.0,
        )
    got = await store.get_job("j1")
    assert got is not None and got.status is JobStatus.SUCCEEDED and got.updated == 2.0
    assert dict(got.result) == {"systemvm": {"id": "vm1"}}
    assert await store.list_jobs(status=JobStatus.PENDING) == []
    assert len(await store.list_jobs()) == 1
    with pytest.raises(KeyError):
        async with store.transaction() as tx:
            await tx.update_job(
                "nope", status=JobStatus.FAILED, result_code=530, result={}, now=3.0
            )


async def test_events_alerts_newest_first_with_limit(store: SqliteStore) -> None:
    async with store.transaction() as tx:
        for i in range(5):
            await tx.add_event(Event(f"e{i}", "X.Y", "INFO", f"d{i}", None, None, float(i)))
            await tx.add_alert(Alert(f"a{i}", 19, "ALERT.SERVICE.SSVM", "s", "d", None, float(i)))
    assert [e.id for e in await store.list_events(limit=3)] == ["e4", "e3", "e2"]
    assert [a.id for a in await store.list_alerts()] == ["a4", "a3", "a2", "a1", "a0"]


async def test_setting_values(store: SqliteStore) -> None:
    async with store.transaction() as tx:
        await tx.set_setting("ping.interval", "30", "global", None, 1.0)
        await tx.set_setting("ping.interval", "40", "global", None, 2.0)  # upsert
        await tx.set_setting("x", "1", "zone", "z1", 3.0)
    vals = {(v.name, v.scope_id): (v.value, v.updated) for v in await store.list_setting_values()}
    assert vals == {("ping.interval", None): ("40", 2.0), ("x", "z1"): ("1", 3.0)}
    async with store.transaction() as tx:
        assert await tx.delete_setting("x", "zone", "z1") is True
        assert await tx.delete_setting("x", "zone", "z1") is False
    assert [v.name for v in await store.list_setting_values()] == ["ping.interval"]


async def test_users(store: SqliteStore) -> None:
    u = User("u1", "a1", "admin", "admin", 1, "d", "KEY", "SECRET", "enabled")
    assert await store.count_users() == 0
    async with store.transaction() as tx:
        await tx.add_user(u)
    assert await store.get_user_by_apikey("KEY") == u
    assert await store.get_user_by_apikey("key") is None
    assert await store.get_user_by_username("admin") == u
    assert await store.count_users() == 1
    with pytest.raises(sqlite3.IntegrityError):
        async with store.transaction() as tx:
            await tx.add_user(User("u2", "a2", "b", "b", 0, "d", "KEY", "S2", "enabled"))
    assert await store.count_users() == 1
    async with store.transaction() as tx:
        await tx.set_user_keys("u1", "KEY2", "SECRET2")
    assert await store.get_user_by_apikey("KEY") is None
    assert [(u.apikey, u.secretkey) for u in await store.list_users()] == [("KEY2", "SECRET2")]
    with pytest.raises(KeyError):
        async with store.transaction() as tx:
            await tx.set_user_keys("nope", "K", "S")


async def test_closed_store_refuses(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "x.db")
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(StoreError):
        await s.list_zones()
    with pytest.raises(StoreError):
        async with s.transaction():
            pass


async def test_non_durable_transaction_commits_and_restores_full(store: SqliteStore) -> None:
    z, *_ = await add_infra(store)
    async with store.transaction(durable=False) as tx:
        vm = await tx.create_system_vm(role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded")
        await tx.update_system_vm(vm.id, last_seen=5.0)
    got = await store.get_system_vm(vm.id)
    assert got is not None and got.last_seen == 5.0
    with pytest.raises(RuntimeError):
        async with store.transaction(durable=False) as tx:
            await tx.update_system_vm(vm.id, last_seen=6.0)
            raise RuntimeError("abort")
    got = await store.get_system_vm(vm.id)
    assert got is not None and got.last_seen == 5.0
    async with store._w.execute("PRAGMA synchronous") as cur:  # back to FULL (2)
        row = await cur.fetchone()
    assert row is not None and row[0] == 2


async def test_nested_transaction_fails_loudly_instead_of_hanging(store: SqliteStore) -> None:
    async with store.transaction():
        with pytest.raises(StoreError, match="nested transaction"):
            async with store.transaction():
                pass
    async with store.transaction() as tx:  # the writer was released
        assert await tx.live_system_vm_ids() == []


async def test_raw_hooks_for_parts_with_their_own_tables(store: SqliteStore) -> None:
    async with store.transaction() as tx:
        assert await tx.execute("CREATE TABLE IF NOT EXISTS t_hook (x INTEGER)") in (0, -1)
        assert await tx.execute("INSERT INTO t_hook VALUES (?), (?)", (1, 2)) == 2
        assert await tx.fetchall("SELECT x FROM t_hook ORDER BY x") == [{"x": 1}, {"x": 2}]
        assert await store.fetchall("SELECT name FROM sqlite_master WHERE name='t_hook'") == []
    assert await store.fetchall("SELECT SUM(x) AS s FROM t_hook") == [{"s": 3}]
    with pytest.raises(sqlite3.OperationalError):  # the reader is read-only
        await store.fetchall("DELETE FROM t_hook")


async def test_large_vm_lists_are_built_off_the_loop_and_equal_small_ones(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over OFF_LOOP_ROWS rows the records are built in a worker thread (10,000 of them
    held the loop ~300 ms); the result is the same list, in seq order."""
    import threading

    from manager.store import sqlite as sqlite_mod

    z, *_ = await add_infra(store)
    n = sqlite_mod.OFF_LOOP_ROWS + 5
    async with store.transaction() as tx:
        for i in range(n):
            await tx.create_system_vm(
                role=Role.ROUTER, zone_id=z.id, hypervisor="Embedded", details={"i": i}
            )
    threads: list[str] = []
    real = sqlite_mod._rows_vm

    def spy(rows: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(rows)

    monkeypatch.setattr(sqlite_mod, "_rows_vm", spy)
    big = await store.list_system_vms()
    assert [v.details["i"] for v in big] == list(range(n))
    assert threads and threads[-1] != threading.main_thread().name
    small = await store.list_system_vms(states=[VmState.RUNNING])  # none: on the loop
    assert small == [] and threads[-1] == threading.main_thread().name
    monkeypatch.setattr(sqlite_mod, "OFF_LOOP_ROWS", 10**9)
    assert await store.list_system_vms() == big
