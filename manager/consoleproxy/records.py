"""Persistence of the console proxy's manager side (tables of ``manager/sql/110_console.sql``).

Everything runs inside the main store's transactions (``Tx.execute`` / ``Tx.fetchall``) or
reads committed data (``Store.fetchall``); no second connection, no second writer.

- guest VMs (:class:`GuestRecord`) — who owns which VM and its state; the VNC target itself
  stays in :class:`manager.guests.GuestManager`'s memory;
- console tokens — :class:`ProxyTokenStorage` is the
  :class:`manager.consoleproxy.tokens.TokenStorage` of one console proxy: tokens it adds are
  bound to that proxy, and ``take`` refuses (after consuming) a token issued for another one;
- proxy load reports and their sessions, sticky assignments;
- drains: ``system_vms.details["console_draining"]`` (time the drain started), written with
  the proxy's ``desired_version`` bump in one transaction (it is part of its desired config).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from manager.consoleproxy.assign import PreviousAssignment
from manager.consoleproxy.load import LoadReport, SessionInfo
from manager.consoleproxy.tokens import ConsoleRefused, ConsoleToken
from manager.store.base import Store, Tx

DRAIN_KEY = "console_draining"
SESSIONS_KEY = "activeviewersessions"


@dataclass(frozen=True, slots=True)
class GuestRecord:
    id: str
    name: str
    display_name: str
    account_id: str
    zone_id: str | None
    state: str  # manager.guests.GuestState value
    memory_mb: int
    created: float
    updated: float


@dataclass(frozen=True, slots=True)
class StoredLoad:
    proxy_vm_id: str
    sessions: int
    draining: bool
    reported_at: float
    session_list: tuple[SessionInfo, ...]


# ---------------------------------------------------------------- guests


async def add_guest(tx: Tx, g: GuestRecord) -> None:
    await tx.execute(
        "INSERT INTO guest_vms (id, name, display_name, account_id, zone_id, state, memory_mb,"
        " created, updated) VALUES (?,?,?,?,?,?,?,?,?)",
        (
            g.id,
            g.name,
            g.display_name,
            g.account_id,
            g.zone_id,
            g.state,
            g.memory_mb,
            g.created,
            g.updated,
        ),
    )


async def set_guest_state(tx: Tx, vm_id: str, state: str, now: float) -> None:
    await tx.execute(
        "UPDATE guest_vms SET state = ?, updated = ? WHERE id = ?", (state, now, vm_id)
    )


def _guest(r: dict[str, object]) -> GuestRecord:
    return GuestRecord(
        id=str(r["id"]),
        name=str(r["name"]),
        display_name=str(r["display_name"]),
        account_id=str(r["account_id"]),
        zone_id=None if r["zone_id"] is None else str(r["zone_id"]),
        state=str(r["state"]),
        memory_mb=int(r["memory_mb"]),  # type: ignore[call-overload]
        created=float(r["created"]),  # type: ignore[arg-type]
        updated=float(r["updated"]),  # type: ignore[arg-type]
    )


async def get_guest(store: Store, vm_id: str) -> GuestRecord | None:
    rows = await store.fetchall("SELECT * FROM guest_vms WHERE id = ?", (vm_id,))
    return _guest(rows[0]) if rows else None


async def list_guests(store: Store, *, account_id: str | None = None) -> list[GuestRecord]:
    if account_id is None:
        rows = await store.fetchall("SELECT * FROM guest_vms ORDER BY created, id")
    else:
        rows = await store.fetchall(
            "SELECT * FROM guest_vms WHERE account_id = ? ORDER BY created, id", (account_id,)
        )
    return [_guest(r) for r in rows]


# ---------------------------------------------------------------- tokens


async def add_token(tx: Tx, token: ConsoleToken, proxy_vm_id: str) -> None:
    await tx.execute(
        "INSERT INTO console_tokens (token_hash, vm_id, account_id, proxy_vm_id, created,"
        " expires_at, used_at) VALUES (?,?,?,?,?,?,?)",
        (
            token.token_hash,
            token.vm_id,
            token.account_id,
            proxy_vm_id,
            token.created,
            token.expires_at,
            token.used_at,
        ),
    )


async def take_token(tx: Tx, token_hash: bytes, now: float) -> tuple[ConsoleToken, str] | None:
    """Marks the token used (if not yet) and returns it as it was before, with the proxy it
    was issued for. Atomic: the store serialises write transactions."""
    rows = await tx.fetchall("SELECT * FROM console_tokens WHERE token_hash = ?", (token_hash,))
    if not rows:
        return None
    r = rows[0]
    if r["used_at"] is None:
        await tx.execute(
            "UPDATE console_tokens SET used_at = ? WHERE token_hash = ?", (now, token_hash)
        )
    before = ConsoleToken(
        token_hash=bytes(r["token_hash"]),
        vm_id=str(r["vm_id"]),
        account_id=str(r["account_id"]),
        created=float(r["created"]),
        expires_at=float(r["expires_at"]),
        used_at=None if r["used_at"] is None else float(r["used_at"]),
    )
    return before, str(r["proxy_vm_id"])


async def drop_tokens(tx: Tx, vm_id: str) -> int:
    return await tx.execute("DELETE FROM console_tokens WHERE vm_id = ?", (vm_id,))


async def purge_tokens(tx: Tx, now: float, keep: float) -> int:
    return await tx.execute("DELETE FROM console_tokens WHERE expires_at < ?", (now - keep,))


class ProxyTokenStorage:
    """:class:`~manager.consoleproxy.tokens.TokenStorage` seen from one console proxy."""

    def __init__(self, store: Store, proxy_vm_id: str) -> None:
        self.store = store
        self.proxy_vm_id = proxy_vm_id

    async def add(self, token: ConsoleToken) -> None:
        async with self.store.transaction() as tx:
            await add_token(tx, token, self.proxy_vm_id)

    async def take(self, token_hash: bytes, now: float) -> ConsoleToken | None:
        async with self.store.transaction() as tx:
            found = await take_token(tx, token_hash, now)
        if found is None:
            return None
        before, proxy = found
        if proxy != self.proxy_vm_id:
            # Consumed all the same: a token seen at the wrong proxy is burnt.
            raise ConsoleRefused("wrong_proxy", "console token was issued for another proxy")
        return before

    async def drop_vm(self, vm_id: str) -> int:
        async with self.store.transaction() as tx:
            return await drop_tokens(tx, vm_id)

    async def purge(self, now: float, keep: float = 3600.0) -> int:
        async with self.store.transaction() as tx:
            return await purge_tokens(tx, now, keep)


# ---------------------------------------------------------------- load reports


async def save_report(tx: Tx, proxy_vm_id: str, report: LoadReport, now: float) -> None:
    """Replaces the proxy's stored report and sessions, refreshes the sticky assignment of
    every VM it serves, and keeps ``details.activeviewersessions`` (listSystemVms) current."""
    await tx.execute(
        "INSERT INTO console_proxy_load (proxy_vm_id, sessions, draining, reported_at)"
        " VALUES (?,?,?,?) ON CONFLICT(proxy_vm_id) DO UPDATE SET"
        " sessions = excluded.sessions, draining = excluded.draining,"
        " reported_at = excluded.reported_at",
        (proxy_vm_id, report.count, int(report.draining), now),
    )
    await tx.execute("DELETE FROM console_sessions WHERE proxy_vm_id = ?", (proxy_vm_id,))
    for s in report.sessions:
        await tx.execute(
            "INSERT INTO console_sessions (proxy_vm_id, vm_id, client, started, last_used)"
            " VALUES (?,?,?,?,?)",
            (proxy_vm_id, s.vm_id[:64], s.client[:64], s.started, s.last_used),
        )
        await set_assignment(tx, s.vm_id[:64], proxy_vm_id, now)
    await tx.execute(
        "UPDATE system_vms SET details = json_set(details, ?, ?) WHERE id = ?",
        (f"$.{SESSIONS_KEY}", report.count, proxy_vm_id),
    )


async def forget_proxy(tx: Tx, proxy_vm_id: str) -> None:
    """A proxy stopped or went away: it holds no sessions any more."""
    await tx.execute("DELETE FROM console_proxy_load WHERE proxy_vm_id = ?", (proxy_vm_id,))
    await tx.execute("DELETE FROM console_sessions WHERE proxy_vm_id = ?", (proxy_vm_id,))
    await tx.execute(
        "UPDATE system_vms SET details = json_set(details, ?, 0) WHERE id = ?",
        (f"$.{SESSIONS_KEY}", proxy_vm_id),
    )


async def load_reports(store: Store) -> dict[str, StoredLoad]:
    loads = await store.fetchall("SELECT * FROM console_proxy_load")
    sessions = await store.fetchall("SELECT * FROM console_sessions ORDER BY started")
    by_proxy: dict[str, list[SessionInfo]] = {}
    for s in sessions:
        by_proxy.setdefault(str(s["proxy_vm_id"]), []).append(
            SessionInfo(
                str(s["vm_id"]),
                str(s["client"]),
                float(s["started"]),
                float(s["last_used"]),
            )
        )
    return {
        str(r["proxy_vm_id"]): StoredLoad(
            proxy_vm_id=str(r["proxy_vm_id"]),
            sessions=int(r["sessions"]),
            draining=bool(r["draining"]),
            reported_at=float(r["reported_at"]),
            session_list=tuple(by_proxy.get(str(r["proxy_vm_id"]), ())),
        )
        for r in loads
    }


# ---------------------------------------------------------------- assignments


async def set_assignment(tx: Tx, vm_id: str, proxy_vm_id: str, at: float) -> None:
    await tx.execute(
        "INSERT INTO console_assignments (vm_id, proxy_vm_id, assigned_at) VALUES (?,?,?)"
        " ON CONFLICT(vm_id) DO UPDATE SET proxy_vm_id = excluded.proxy_vm_id,"
        " assigned_at = excluded.assigned_at",
        (vm_id, proxy_vm_id, at),
    )


async def get_assignment(store: Store, vm_id: str) -> PreviousAssignment | None:
    rows = await store.fetchall(
        "SELECT proxy_vm_id, assigned_at FROM console_assignments WHERE vm_id = ?", (vm_id,)
    )
    if not rows:
        return None
    return PreviousAssignment(str(rows[0]["proxy_vm_id"]), float(rows[0]["assigned_at"]))


async def drop_assignment(tx: Tx, vm_id: str) -> None:
    await tx.execute("DELETE FROM console_assignments WHERE vm_id = ?", (vm_id,))


# ---------------------------------------------------------------- drains


async def set_draining(tx: Tx, proxy_vm_ids: Sequence[str], started: float | None) -> None:
    """``started=None`` ends the drain. The caller bumps ``desired_version`` in the same
    transaction (the flag is part of the proxy's desired config)."""
    for vm_id in proxy_vm_ids:
        if started is None:
            await tx.execute(
                "UPDATE system_vms SET details = json_remove(details, ?) WHERE id = ?",
                (f"$.{DRAIN_KEY}", vm_id),
            )
        else:
            await tx.execute(
                "UPDATE system_vms SET details = json_set(details, ?, ?) WHERE id = ?",
                (f"$.{DRAIN_KEY}", started, vm_id),
            )
