"""SQLite backend of :mod:`manager.store.base` (aiosqlite, WAL).

Two connections: one writer that serialises transactions behind an ``asyncio.Lock``
(``BEGIN IMMEDIATE`` so another process sharing the file waits instead of failing at commit
time), and one read-only reader. In WAL mode the reader sees exactly what was committed.

``synchronous=FULL``: a commit is on disk before :meth:`SqliteStore.transaction` returns, so
anything acknowledged to a client or an agent survives a power cut. Measured on the 2-core
build machine with ``scripts/bench/store.py``-style loops (see the report / tests): a few
thousand single-row commits per second — keep per-heartbeat writes out of the store.

Migrations: ``manager/sql/NNN_name.sql`` applied in numeric order, each in its own
transaction together with its row in ``schema_version``; re-running is a no-op. Numbers are
unique, not necessarily contiguous (parts developed in parallel use their own ranges).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

from manager.store.base import (
    Alert,
    Cluster,
    Command,
    Event,
    Host,
    Job,
    JobStatus,
    Pod,
    Role,
    SettingValue,
    SystemVm,
    TokenOutcome,
    User,
    VmState,
    Zone,
)

log = logging.getLogger("sysvm.store")

DB_NAME = "sysvm.db"
_MIGRATION_RE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
_NAME_PREFIX = {Role.CONSOLE_PROXY: "v", Role.SECONDARY_STORAGE: "s", Role.ROUTER: "r"}
_GONE_STATES = (VmState.DESTROYED.value, VmState.EXPUNGING.value)
# Fields update_system_vm may set (id, seq, name, role are fixed at creation).
_VM_MUTABLE = frozenset(
    {
        "zone_id",
        "pod_id",
        "host_id",
        "state",
        "template_id",
        "hypervisor",
        "public_ip",
        "private_ip",
        "linklocal_ip",
        "desired_version",
        "applied_version",
        "agent_version",
        "image_version",
        "last_seen",
        "created",
        "details",
    }
)


class StoreError(Exception):
    """A store operation could not be carried out (bad migration file, closed store...)."""


class TransactionClosed(StoreError):
    """A :class:`Tx` was used outside its ``async with`` block."""


def load_migrations() -> list[tuple[int, str, str]]:
    """(number, name, sql) of every ``manager/sql/NNN_name.sql``, sorted by number. Numbers
    must be unique but need not be contiguous: parts developed in parallel take their own
    range (001-099 core, 100-109 network, 110-119 console proxy, ...). Any migration not yet
    recorded in ``schema_version`` is applied, in number order."""
    found: list[tuple[int, str, str]] = []
    for entry in resources.files("manager").joinpath("sql").iterdir():
        m = _MIGRATION_RE.match(entry.name)
        if not m:
            continue
        found.append((int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort()
    for (a, name_a, _), (b, name_b, _) in itertools.pairwise(found):
        if a == b:
            raise StoreError(f"two migrations numbered {a:03d}: {name_a} and {name_b}")
    return found


def split_sql(script: str) -> list[str]:
    """Splits a migration script into complete statements (quotes and comments respected)."""
    statements: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                statements.append(buf.strip())
            buf = ""
    if buf.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()
    ):
        raise StoreError(f"incomplete SQL statement at end of migration: {buf.strip()[:80]!r}")
    return statements


def _json_default(o: Any) -> Any:
    """JSON for what msgpack may hand us from an agent: bytes as base64 text, tuples/sets as
    lists, anything else as its ``str``; a stored result never makes a write fail."""
    if isinstance(o, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(o)).decode("ascii")
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    return str(o)


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), separators=(",", ":"), sort_keys=True, default=_json_default)


def _loads(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


def _scope_key(scope_id: str | None) -> str:
    return scope_id or ""


def _row_zone(r: sqlite3.Row) -> Zone:
    return Zone(
        id=r["id"],
        name=r["name"],
        allocation_state=r["allocation_state"],
        network_type=r["network_type"],
        dns1=r["dns1"],
        internal_dns1=r["internal_dns1"],
        public_cidr=r["public_cidr"],
        guest_cidr=r["guest_cidr"],
        linklocal_cidr=r["linklocal_cidr"],
        created=r["created"],
    )


def _row_pod(r: sqlite3.Row) -> Pod:
    return Pod(
        id=r["id"],
        zone_id=r["zone_id"],
        name=r["name"],
        gateway=r["gateway"],
        netmask=r["netmask"],
        start_ip=r["start_ip"],
        end_ip=r["end_ip"],
        created=r["created"],
    )


def _row_cluster(r: sqlite3.Row) -> Cluster:
    return Cluster(
        id=r["id"],
        pod_id=r["pod_id"],
        zone_id=r["zone_id"],
        name=r["name"],
        hypervisor=r["hypervisor"],
        created=r["created"],
    )


def _row_host(r: sqlite3.Row) -> Host:
    return Host(
        id=r["id"],
        cluster_id=r["cluster_id"],
        pod_id=r["pod_id"],
        zone_id=r["zone_id"],
        name=r["name"],
        type=r["type"],
        hypervisor=r["hypervisor"],
        ip_address=r["ip_address"],
        state=r["state"],
        created=r["created"],
    )


#: Result sets larger than this are turned into records off the event loop.
OFF_LOOP_ROWS = 256


def _rows_vm(rows: Sequence[sqlite3.Row]) -> list[SystemVm]:
    return [_row_vm(r) for r in rows]


def _row_vm(r: sqlite3.Row) -> SystemVm:
    return SystemVm(
        id=r["id"],
        seq=r["seq"],
        name=r["name"],
        role=Role(r["role"]),
        zone_id=r["zone_id"],
        pod_id=r["pod_id"],
        host_id=r["host_id"],
        state=VmState(r["state"]),
        template_id=r["template_id"],
        hypervisor=r["hypervisor"],
        public_ip=r["public_ip"],
        private_ip=r["private_ip"],
        linklocal_ip=r["linklocal_ip"],
        desired_version=r["desired_version"],
        applied_version=r["applied_version"],
        agent_version=r["agent_version"],
        image_version=r["image_version"],
        last_seen=r["last_seen"],
        created=r["created"],
        details=_loads(r["details"]),
    )


def _row_command(r: sqlite3.Row) -> Command:
    return Command(
        id=r["id"],
        vm_id=r["vm_id"],
        name=r["name"],
        args=_loads(r["args"]),
        state=r["state"],
        result=_loads(r["result"]),
        error=r["error"],
        created=r["created"],
    )


def _row_job(r: sqlite3.Row) -> Job:
    return Job(
        id=r["id"],
        command=r["command"],
        account_id=r["account_id"],
        status=JobStatus(r["status"]),
        result_code=r["result_code"],
        result_type=r["result_type"],
        result=_loads(r["result"]),
        instance_type=r["instance_type"],
        instance_id=r["instance_id"],
        created=r["created"],
        updated=r["updated"],
    )


def _row_event(r: sqlite3.Row) -> Event:
    return Event(
        id=r["id"],
        type=r["type"],
        level=r["level"],
        description=r["description"],
        account_id=r["account_id"],
        resource_id=r["resource_id"],
        created=r["created"],
    )


def _row_alert(r: sqlite3.Row) -> Alert:
    return Alert(
        id=r["id"],
        type=r["type"],
        name=r["name"],
        subject=r["subject"],
        description=r["description"],
        zone_id=r["zone_id"],
        created=r["created"],
    )


def _row_user(r: sqlite3.Row) -> User:
    return User(
        id=r["id"],
        account_id=r["account_id"],
        username=r["username"],
        account_name=r["account_name"],
        account_type=r["account_type"],
        domain_id=r["domain_id"],
        apikey=r["apikey"],
        secretkey=r["secretkey"],
        state=r["state"],
    )


class _SqliteTx:
    """The write side; one instance per transaction, dead once the block exits."""

    def __init__(self, conn: aiosqlite.Connection, clock: Callable[[], float]) -> None:
        self._conn = conn
        self._clock = clock
        self._open = True
        self._callbacks: list[Callable[[], None]] = []

    def _close(self) -> list[Callable[[], None]]:
        self._open = False
        callbacks, self._callbacks = self._callbacks, []
        return callbacks

    async def _exec(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Cursor:
        if not self._open:
            raise TransactionClosed("transaction already finished")
        return await self._conn.execute(sql, params)

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        if not self._open:
            raise TransactionClosed("transaction already finished")
        # One trip to the connection's thread, not three (execute, fetchall, close): a
        # change's transaction reads a dozen times while it holds the writer.
        return list(await self._conn.execute_fetchall(sql, params))

    # Public hooks for parts that keep their own tables (their own migration, e.g.
    # 110_console.sql) and write them inside the main store's transactions.
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Runs one statement with ``?`` parameters; returns the row count it changed."""
        cur = await self._exec(sql, params)
        count = cur.rowcount
        await cur.close()
        return count

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of one query as dicts, seeing this transaction's own writes."""
        return [dict(r) for r in await self._fetchall(sql, params)]

    def on_commit(self, fn: Callable[[], None]) -> None:
        if not self._open:
            raise TransactionClosed("transaction already finished")
        self._callbacks.append(fn)

    async def live_system_vm_ids(self, zone_id: str | None = None) -> list[str]:
        sql = "SELECT id FROM system_vms WHERE state NOT IN (?, ?)"
        params: list[Any] = list(_GONE_STATES)
        if zone_id is not None:
            sql += " AND zone_id = ?"
            params.append(zone_id)
        rows = await self._fetchall(sql + " ORDER BY seq", params)
        return [r["id"] for r in rows]

    # infrastructure -------------------------------------------------------------------

    async def add_zone(self, zone: Zone) -> None:
        await self._exec(
            "INSERT INTO zones (id, name, allocation_state, network_type, dns1, internal_dns1,"
            " public_cidr, guest_cidr, linklocal_cidr, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                zone.id,
                zone.name,
                zone.allocation_state,
                zone.network_type,
                zone.dns1,
                zone.internal_dns1,
                zone.public_cidr,
                zone.guest_cidr,
                zone.linklocal_cidr,
                zone.created,
            ),
        )

    async def add_pod(self, pod: Pod) -> None:
        await self._exec(
            "INSERT INTO pods (id, zone_id, name, gateway, netmask, start_ip, end_ip, created)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (
                pod.id,
                pod.zone_id,
                pod.name,
                pod.gateway,
                pod.netmask,
                pod.start_ip,
                pod.end_ip,
                pod.created,
            ),
        )

    async def add_cluster(self, cluster: Cluster) -> None:
        await self._exec(
            "INSERT INTO clusters (id, pod_id, zone_id, name, hypervisor, created)"
            " VALUES (?,?,?,?,?,?)",
            (
                cluster.id,
                cluster.pod_id,
                cluster.zone_id,
                cluster.name,
                cluster.hypervisor,
                cluster.created,
            ),
        )

    async def add_host(self, host: Host) -> None:
        await self._exec(
            "INSERT INTO hosts (id, cluster_id, pod_id, zone_id, name, type, hypervisor,"
            " ip_address, state, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                host.id,
                host.cluster_id,
                host.pod_id,
                host.zone_id,
                host.name,
                host.type,
                host.hypervisor,
                host.ip_address,
                host.state,
                host.created,
            ),
        )

    # system VMs -----------------------------------------------------------------------

    async def create_system_vm(
        self,
        *,
        role: Role,
        zone_id: str,
        hypervisor: str,
        template_id: str | None = None,
        pod_id: str | None = None,
        host_id: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> SystemVm:
        role = Role(role)
        rows = await self._fetchall("SELECT COALESCE(MAX(seq), 0) + 1 AS next FROM system_vms")
        seq = int(rows[0]["next"])
        vm = SystemVm(
            id=str(uuid.uuid4()),
            seq=seq,
            name=f"{_NAME_PREFIX[role]}-{seq}-VM",
            role=role,
            zone_id=zone_id,
            pod_id=pod_id,
            host_id=host_id,
            state=VmState.STARTING,
            template_id=template_id,
            hypervisor=hypervisor,
            public_ip=None,
            private_ip=None,
            linklocal_ip=None,
            desired_version=0,
            applied_version=0,
            agent_version=None,
            image_version=None,
            last_seen=None,
            created=self._clock(),
            details=dict(details or {}),
        )
        await self._exec(
            "INSERT INTO system_vms (id, seq, name, role, zone_id, pod_id, host_id, state,"
            " template_id, hypervisor, created, details) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                vm.id,
                vm.seq,
                vm.name,
                vm.role.value,
                vm.zone_id,
                vm.pod_id,
                vm.host_id,
                vm.state.value,
                vm.template_id,
                vm.hypervisor,
                vm.created,
                _dumps(vm.details),
            ),
        )
        return vm

    async def update_system_vm(self, vm_id: str, **fields: Any) -> None:
        unknown = set(fields) - _VM_MUTABLE
        if unknown:
            raise ValueError(f"update_system_vm: cannot set {sorted(unknown)}")
        if not fields:
            return
        cols: list[str] = []
        params: list[Any] = []
        for key, value in sorted(fields.items()):
            if key == "details":
                value = _dumps(value or {})
            elif key == "state":
                value = VmState(value).value
            cols.append(f"{key} = ?")  # key is from the fixed allow-list above
            params.append(value)
        params.append(vm_id)
        cur = await self._exec(
            f"UPDATE system_vms SET {', '.join(cols)} WHERE id = ?",  # noqa: S608
            params,
        )
        if cur.rowcount != 1:
            raise KeyError(f"no system VM {vm_id}")

    async def bump_desired(self, vm_ids: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for vm_id in dict.fromkeys(vm_ids):
            rows = await self._fetchall(
                "UPDATE system_vms SET desired_version = desired_version + 1 WHERE id = ?"
                " RETURNING desired_version",
                (vm_id,),
            )
            if not rows:
                raise KeyError(f"no system VM {vm_id}")
            out[vm_id] = int(rows[0]["desired_version"])
        return out

    async def record_applied(self, vm_id: str, version: int) -> None:
        cur = await self._exec(
            "UPDATE system_vms SET applied_version = MAX(applied_version, ?) WHERE id = ?",
            (version, vm_id),
        )
        if cur.rowcount != 1:
            raise KeyError(f"no system VM {vm_id}")

    # trust ----------------------------------------------------------------------------

    async def add_enrolment_token(self, vm_id: str, token_hash: bytes, expires_at: float) -> None:
        await self._exec(
            "UPDATE enrolment_tokens SET superseded = 1 WHERE vm_id = ? AND used_at IS NULL",
            (vm_id,),
        )
        await self._exec(
            "INSERT INTO enrolment_tokens (token_hash, vm_id, expires_at) VALUES (?,?,?)",
            (bytes(token_hash), vm_id, expires_at),
        )

    async def consume_enrolment_token(
        self, token_hash: bytes, vm_id: str, now: float
    ) -> TokenOutcome:
        rows = await self._fetchall(
            "SELECT vm_id, expires_at, used_at, superseded FROM enrolment_tokens"
            " WHERE token_hash = ?",
            (bytes(token_hash),),
        )
        if not rows:
            return TokenOutcome.UNKNOWN
        outcome = token_outcome(
            owner=rows[0]["vm_id"],
            presented_for=vm_id,
            expires_at=rows[0]["expires_at"],
            used=rows[0]["used_at"] is not None,
            superseded=bool(rows[0]["superseded"]),
            now=now,
        )
        if outcome is TokenOutcome.OK:
            await self._exec(
                "UPDATE enrolment_tokens SET used_at = ? WHERE token_hash = ?",
                (now, bytes(token_hash)),
            )
        return outcome

    async def record_certificate(self, vm_id: str, serial: int, not_after: float) -> None:
        await self._exec(
            "INSERT INTO certificates (serial, vm_id, not_after) VALUES (?,?,?)",
            (str(serial), vm_id, not_after),
        )

    async def revoke_certificates(self, vm_id: str, reason: str, now: float) -> list[int]:
        rows = await self._fetchall(
            "UPDATE certificates SET revoked_at = ?, revoke_reason = ?"
            " WHERE vm_id = ? AND revoked_at IS NULL RETURNING serial",
            (now, reason, vm_id),
        )
        already = await self._fetchall(
            "SELECT serial FROM certificates WHERE vm_id = ? AND revoked_at IS NOT NULL",
            (vm_id,),
        )
        return sorted({int(r["serial"]) for r in rows} | {int(r["serial"]) for r in already})

    # commands -------------------------------------------------------------------------

    async def add_command(
        self, vm_id: str, command_id: str, name: str, args: Mapping[str, Any], now: float
    ) -> bool:
        cur = await self._exec(
            "INSERT OR IGNORE INTO commands (id, vm_id, name, args, state, created)"
            " VALUES (?,?,?,?,'pending',?)",
            (command_id, vm_id, name, _dumps(args), now),
        )
        return cur.rowcount == 1

    async def complete_command(
        self, command_id: str, ok: bool, result: Mapping[str, Any], error: str
    ) -> None:
        cur = await self._exec(
            "UPDATE commands SET state = ?, result = ?, error = ?, completed = ?"
            " WHERE id = ? AND state = 'pending'",
            ("done" if ok else "failed", _dumps(result), error, self._clock(), command_id),
        )
        if cur.rowcount != 1:
            rows = await self._fetchall("SELECT state FROM commands WHERE id = ?", (command_id,))
            if not rows:
                raise KeyError(f"no command {command_id}")
            # Already completed: a duplicate result after a reconnect changes nothing.

    # jobs, events, alerts -------------------------------------------------------------

    async def add_job(self, job: Job) -> None:
        await self._exec(
            "INSERT INTO jobs (id, command, account_id, status, result_code, result_type,"
            " result, instance_type, instance_id, created, updated)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                job.id,
                job.command,
                job.account_id,
                int(job.status),
                job.result_code,
                job.result_type,
                _dumps(job.result),
                job.instance_type,
                job.instance_id,
                job.created,
                job.updated,
            ),
        )

    async def update_job(
        self,
        job_id: str,
        *,
        status: JobStatus,
        result_code: int,
        result: Mapping[str, Any],
        now: float,
    ) -> None:
        cur = await self._exec(
            "UPDATE jobs SET status = ?, result_code = ?, result = ?, updated = ? WHERE id = ?",
            (int(status), result_code, _dumps(result), now, job_id),
        )
        if cur.rowcount != 1:
            raise KeyError(f"no job {job_id}")

    async def add_event(self, event: Event) -> None:
        await self._exec(
            "INSERT INTO events (id, type, level, description, account_id, resource_id, created)"
            " VALUES (?,?,?,?,?,?,?)",
            (
                event.id,
                event.type,
                event.level,
                event.description,
                event.account_id,
                event.resource_id,
                event.created,
            ),
        )

    async def add_alert(self, alert: Alert) -> None:
        await self._exec(
            "INSERT INTO alerts (id, type, name, subject, description, zone_id, created)"
            " VALUES (?,?,?,?,?,?,?)",
            (
                alert.id,
                alert.type,
                alert.name,
                alert.subject,
                alert.description,
                alert.zone_id,
                alert.created,
            ),
        )

    # settings, users ------------------------------------------------------------------

    async def set_setting(
        self, name: str, value: str, scope: str, scope_id: str | None, now: float
    ) -> None:
        await self._exec(
            "INSERT INTO setting_values (name, scope, scope_id, value, updated)"
            " VALUES (?,?,?,?,?) ON CONFLICT (name, scope, scope_id)"
            " DO UPDATE SET value = excluded.value, updated = excluded.updated",
            (name, scope, _scope_key(scope_id), value, now),
        )

    async def delete_setting(self, name: str, scope: str, scope_id: str | None) -> bool:
        cur = await self._exec(
            "DELETE FROM setting_values WHERE name = ? AND scope = ? AND scope_id = ?",
            (name, scope, _scope_key(scope_id)),
        )
        return cur.rowcount == 1

    async def add_user(self, user: User) -> None:
        await self._exec(
            "INSERT INTO users (id, account_id, username, account_name, account_type,"
            " domain_id, apikey, secretkey, state) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                user.id,
                user.account_id,
                user.username,
                user.account_name,
                user.account_type,
                user.domain_id,
                user.apikey,
                user.secretkey,
                user.state,
            ),
        )

    async def set_user_keys(self, user_id: str, apikey: str, secretkey: str) -> None:
        cur = await self._exec(
            "UPDATE users SET apikey = ?, secretkey = ? WHERE id = ?",
            (apikey, secretkey, user_id),
        )
        if cur.rowcount != 1:
            raise KeyError(f"no user {user_id}")


def token_outcome(
    *, owner: str, presented_for: str, expires_at: float, used: bool, superseded: bool, now: float
) -> TokenOutcome:
    """The verdict on a known token, pure. A token for another VM is reported as such
    before anything else; a replaced (superseded) token counts as expired."""
    if owner != presented_for:
        return TokenOutcome.WRONG_VM
    if used:
        return TokenOutcome.USED
    if superseded or now >= expires_at:
        return TokenOutcome.EXPIRED
    return TokenOutcome.OK


class SqliteStore:
    """:class:`manager.store.base.Store` on one SQLite file. Use :meth:`open`."""

    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        clock: Callable[[], float],
        synchronous: str = "FULL",
    ) -> None:
        self.path = path
        self._w = writer
        self._r = reader
        self._clock = clock
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._synchronous = synchronous
        self._owner: asyncio.Task[Any] | None = None

    @classmethod
    async def open(
        cls, path: Path, *, clock: Callable[[], float] = time.time, synchronous: str = "FULL"
    ) -> SqliteStore:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Created 0600 before SQLite writes anything; its -wal/-shm copy these permissions.
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
        writer = await aiosqlite.connect(path, isolation_level=None)
        reader: aiosqlite.Connection | None = None
        try:
            writer.row_factory = sqlite3.Row
            for pragma in (
                "PRAGMA journal_mode=WAL",
                f"PRAGMA synchronous={synchronous}",
                "PRAGMA foreign_keys=ON",
                "PRAGMA busy_timeout=10000",
            ):
                await writer.execute(pragma)
            await _migrate(writer, clock)
            reader = await aiosqlite.connect(path, isolation_level=None)
            reader.row_factory = sqlite3.Row
            for pragma in ("PRAGMA query_only=ON", "PRAGMA busy_timeout=10000"):
                await reader.execute(pragma)
        except BaseException:
            await writer.close()
            if reader is not None:
                await reader.close()
            raise
        log.info("event=store_opened path=%s", path)
        return cls(path, writer, reader, clock, synchronous)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._write_lock:
            await self._r.close()
            await self._w.close()
        log.info("event=store_closed path=%s", self.path)

    @asynccontextmanager
    async def transaction(self, *, durable: bool = True) -> AsyncIterator[_SqliteTx]:
        """``durable=False`` commits with ``synchronous=NORMAL``: still atomic and consistent,
        but the last such commits may be lost on power failure. Only for data nobody was
        promised (e.g. ``last_seen``)."""
        if self._closed:
            raise StoreError("store is closed")
        me = asyncio.current_task()
        if me is not None and self._owner is me:
            # asyncio.Lock is not re-entrant: waiting here would hang forever.
            raise StoreError("nested transaction: this task already holds the writer")
        async with self._write_lock:
            self._owner = me
            try:
                async with self._durability(durable), self._tx() as tx:
                    yield tx
            finally:
                self._owner = None
        for fn in tx._close():
            try:
                fn()
            except Exception:
                log.exception("event=on_commit_failed callback=%r", fn)

    @asynccontextmanager
    async def _durability(self, durable: bool) -> AsyncIterator[None]:
        switch = not durable and self._synchronous != "NORMAL"
        if switch:
            await self._w.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            if switch:
                await self._w.execute(f"PRAGMA synchronous={self._synchronous}")

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[_SqliteTx]:
        await self._w.execute("BEGIN IMMEDIATE")
        tx = _SqliteTx(self._w, self._clock)
        try:
            yield tx
        except BaseException:
            tx._close()
            await self._w.execute("ROLLBACK")
            raise
        try:
            await self._w.execute("COMMIT")
        except BaseException:
            tx._close()
            if self._w.in_transaction:
                await self._w.execute("ROLLBACK")
            raise
        tx._open = False

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Public read hook (committed data only) for parts with their own tables."""
        return [dict(r) for r in await self._all(sql, params)]

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        if self._closed:
            raise StoreError("store is closed")
        # One call on the reader's thread: execute and fetch every row together. A cursor
        # left open between the two (while other reads queue behind it) keeps the
        # connection's read snapshot open, and a read that starts after a commit could
        # still see the state from before it.
        return list(await self._r.execute_fetchall(sql, params))

    # infrastructure -------------------------------------------------------------------

    async def list_zones(self) -> list[Zone]:
        return [
            _row_zone(r) for r in await self._all("SELECT * FROM zones ORDER BY created, name, id")
        ]

    async def list_pods(self, zone_id: str | None = None) -> list[Pod]:
        if zone_id is None:
            rows = await self._all("SELECT * FROM pods ORDER BY created, name, id")
        else:
            rows = await self._all(
                "SELECT * FROM pods WHERE zone_id = ? ORDER BY created, name, id", (zone_id,)
            )
        return [_row_pod(r) for r in rows]

    async def list_clusters(self, zone_id: str | None = None) -> list[Cluster]:
        if zone_id is None:
            rows = await self._all("SELECT * FROM clusters ORDER BY created, name, id")
        else:
            rows = await self._all(
                "SELECT * FROM clusters WHERE zone_id = ? ORDER BY created, name, id", (zone_id,)
            )
        return [_row_cluster(r) for r in rows]

    async def list_hosts(self, zone_id: str | None = None) -> list[Host]:
        if zone_id is None:
            rows = await self._all("SELECT * FROM hosts ORDER BY created, name, id")
        else:
            rows = await self._all(
                "SELECT * FROM hosts WHERE zone_id = ? ORDER BY created, name, id", (zone_id,)
            )
        return [_row_host(r) for r in rows]

    # system VMs -----------------------------------------------------------------------

    async def get_system_vm(self, vm_id: str) -> SystemVm | None:
        rows = await self._all("SELECT * FROM system_vms WHERE id = ?", (vm_id,))
        return _row_vm(rows[0]) if rows else None

    async def list_system_vms(
        self,
        *,
        zone_id: str | None = None,
        role: Role | None = None,
        states: Sequence[VmState] | None = None,
    ) -> list[SystemVm]:
        where: list[str] = []
        params: list[Any] = []
        if zone_id is not None:
            where.append("zone_id = ?")
            params.append(zone_id)
        if role is not None:
            where.append("role = ?")
            params.append(Role(role).value)
        if states is not None:
            if not states:
                return []
            where.append(f"state IN ({','.join('?' * len(states))})")
            params.extend(VmState(s).value for s in states)
        sql = "SELECT * FROM system_vms"
        if where:
            sql += " WHERE " + " AND ".join(where)  # only fixed fragments, values bound
        rows = await self._all(sql + " ORDER BY seq", params)
        if len(rows) > OFF_LOOP_ROWS:
            # ~30 us a record: 10,000 VMs held the loop for ~300 ms. In a worker thread the
            # loop still gets the interpreter every switch interval (5 ms).
            return await asyncio.to_thread(_rows_vm, rows)
        return _rows_vm(rows)

    # trust ----------------------------------------------------------------------------

    async def is_revoked(self, serial: int) -> bool:
        rows = await self._all(
            "SELECT 1 FROM certificates WHERE serial = ? AND revoked_at IS NOT NULL",
            (str(serial),),
        )
        return bool(rows)

    async def revoked_serials(self) -> set[int]:
        rows = await self._all("SELECT serial FROM certificates WHERE revoked_at IS NOT NULL")
        return {int(r["serial"]) for r in rows}

    # commands -------------------------------------------------------------------------

    async def pending_commands(self, vm_id: str) -> list[Command]:
        rows = await self._all(
            "SELECT * FROM commands WHERE vm_id = ? AND state = 'pending' ORDER BY created, rowid",
            (vm_id,),
        )
        return [_row_command(r) for r in rows]

    async def get_command(self, command_id: str) -> Command | None:
        rows = await self._all("SELECT * FROM commands WHERE id = ?", (command_id,))
        return _row_command(rows[0]) if rows else None

    # jobs, events, alerts -------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        rows = await self._all("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _row_job(rows[0]) if rows else None

    async def list_jobs(self, *, status: JobStatus | None = None, limit: int = 500) -> list[Job]:
        if status is None:
            rows = await self._all(
                "SELECT * FROM jobs ORDER BY created DESC, id LIMIT ?", (int(limit),)
            )
        else:
            rows = await self._all(
                "SELECT * FROM jobs WHERE status = ? ORDER BY created DESC, id LIMIT ?",
                (int(status), int(limit)),
            )
        return [_row_job(r) for r in rows]

    async def list_events(self, *, limit: int = 500) -> list[Event]:
        rows = await self._all(
            "SELECT * FROM events ORDER BY created DESC, rowid DESC LIMIT ?", (int(limit),)
        )
        return [_row_event(r) for r in rows]

    async def list_alerts(self, *, limit: int = 500) -> list[Alert]:
        rows = await self._all(
            "SELECT * FROM alerts ORDER BY created DESC, rowid DESC LIMIT ?", (int(limit),)
        )
        return [_row_alert(r) for r in rows]

    # settings -------------------------------------------------------------------------

    async def list_setting_values(self) -> list[SettingValue]:
        rows = await self._all("SELECT * FROM setting_values ORDER BY name, scope, scope_id")
        return [
            SettingValue(
                name=r["name"],
                value=r["value"],
                scope=r["scope"],
                scope_id=r["scope_id"] or None,
                updated=r["updated"],
            )
            for r in rows
        ]

    # accounts -------------------------------------------------------------------------

    async def get_user_by_apikey(self, apikey: str) -> User | None:
        rows = await self._all("SELECT * FROM users WHERE apikey = ?", (apikey,))
        return _row_user(rows[0]) if rows else None

    async def list_users(self) -> list[User]:
        return [_row_user(r) for r in await self._all("SELECT * FROM users ORDER BY username")]

    async def get_user_by_username(self, username: str) -> User | None:
        rows = await self._all("SELECT * FROM users WHERE username = ?", (username,))
        return _row_user(rows[0]) if rows else None

    async def count_users(self) -> int:
        rows = await self._all("SELECT COUNT(*) AS n FROM users")
        return int(rows[0]["n"])


async def _migrate(conn: aiosqlite.Connection, clock: Callable[[], float]) -> list[int]:
    """Applies the migrations not yet recorded; returns the numbers applied."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)"
    )
    applied: list[int] = []
    for number, name, sql in load_migrations():
        await conn.execute("BEGIN IMMEDIATE")
        try:
            async with conn.execute(
                "SELECT 1 FROM schema_version WHERE version = ?", (number,)
            ) as cur:
                done = await cur.fetchone() is not None
            if not done:
                for statement in split_sql(sql):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, name, applied) VALUES (?,?,?)",
                    (number, name, clock()),
                )
            await conn.execute("COMMIT")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        if not done:
            applied.append(number)
            log.info("event=migration_applied version=%03d name=%s", number, name)
    return applied
