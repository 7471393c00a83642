"""The manager's storage interface.

Everything the manager must not forget lives behind :class:`Store`. The SQLite backend
(:mod:`manager.store.sqlite`) is the embedded default; a PostgreSQL backend can implement
the same interface later. Records are plain frozen dataclasses so callers never see rows.

Writes that must happen together go through :meth:`Store.transaction`, which yields a
:class:`Tx` carrying the write methods; the transaction commits when the block exits
normally and rolls back on any exception. Read methods on :class:`Store` see only
committed data.

Desired state: every system VM has ``desired_version`` (bumped by :meth:`Tx.bump_desired`
inside the transaction of the change that caused it) and ``applied_version`` (what its agent
acknowledged). The config body itself is rendered from current state when it is sent
(:mod:`manager.desired`), so a push of version V carries everything committed up to V.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol


class VmState(enum.StrEnum):
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    DESTROYED = "Destroyed"
    EXPUNGING = "Expunging"
    ERROR = "Error"


class Role(enum.StrEnum):
    CONSOLE_PROXY = "consoleproxy"
    SECONDARY_STORAGE = "secondarystorage"
    ROUTER = "domainrouter"


class TokenOutcome(enum.StrEnum):
    OK = "ok"
    UNKNOWN = "unknown"  # no such token (forged, or for another manager)
    EXPIRED = "expired"
    USED = "used"  # replayed
    WRONG_VM = "wrong_vm"  # valid token presented for another VM id


class JobStatus(enum.IntEnum):
    PENDING = 0
    SUCCEEDED = 1
    FAILED = 2


@dataclass(frozen=True, slots=True)
class Zone:
    id: str  # uuid
    name: str
    allocation_state: str  # "Enabled" | "Disabled"
    network_type: str  # "Advanced"
    dns1: str
    internal_dns1: str
    public_cidr: str
    guest_cidr: str
    linklocal_cidr: str
    created: float


@dataclass(frozen=True, slots=True)
class Pod:
    id: str
    zone_id: str
    name: str
    gateway: str
    netmask: str
    start_ip: str
    end_ip: str
    created: float


@dataclass(frozen=True, slots=True)
class Cluster:
    id: str
    pod_id: str
    zone_id: str
    name: str
    hypervisor: str  # "Embedded" | "KVM" | "External"
    created: float


@dataclass(frozen=True, slots=True)
class Host:
    id: str
    cluster_id: str
    pod_id: str
    zone_id: str
    name: str
    type: str  # "Routing" (hypervisor host)
    hypervisor: str
    ip_address: str
    state: str  # "Up" | "Down" | "Disconnected"
    created: float


@dataclass(frozen=True, slots=True)
class SystemVm:
    id: str  # uuid; also the CN of its client certificate
    seq: int  # small integer used in names: v-<seq>-VM
    name: str  # v-12-VM, s-3-VM, r-7-VM
    role: Role
    zone_id: str
    pod_id: str | None
    host_id: str | None
    state: VmState
    template_id: str | None
    hypervisor: str
    public_ip: str | None
    private_ip: str | None
    linklocal_ip: str | None
    desired_version: int
    applied_version: int
    agent_version: str | None  # reported in hello
    image_version: str | None  # /etc/sysvm-release, reported in hello
    last_seen: float | None  # last hello/heartbeat persisted (coarse, not every heartbeat)
    created: float
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Command:
    id: str  # uuid; the agent runs each id at most once
    vm_id: str
    name: str
    args: Mapping[str, Any]
    state: str  # "pending" | "done" | "failed"
    result: Mapping[str, Any]
    error: str
    created: float


@dataclass(frozen=True, slots=True)
class Job:
    id: str  # uuid
    command: str  # API command name, e.g. "stopSystemVm"
    account_id: str
    status: JobStatus
    result_code: int  # 0 ok, else CloudStack error code (530 ...)
    result_type: str  # "object"
    result: Mapping[str, Any]  # the response object (success) or {errorcode, errortext}
    instance_type: str | None  # "SystemVm" ...
    instance_id: str | None
    created: float
    updated: float


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str  # CloudStack-style event type, e.g. "SSVM.CREATE", "PROXY.STOP", "AGENT.ENROL"
    level: str  # "INFO" | "WARN" | "ERROR"
    description: str
    account_id: str | None
    resource_id: str | None
    created: float


@dataclass(frozen=True, slots=True)
class Alert:
    id: str
    type: int  # CloudStack alert type number
    name: str  # e.g. "ALERT.SERVICE.SSVM"
    subject: str
    description: str
    zone_id: str | None
    created: float


@dataclass(frozen=True, slots=True)
class User:
    id: str
    account_id: str
    username: str
    account_name: str
    account_type: int  # 1 root admin (CloudStack's numbering), 0 user
    domain_id: str
    apikey: str
    secretkey: str  # stored encrypted-at-rest is future work; the DB file is 0600
    state: str  # "enabled"


@dataclass(frozen=True, slots=True)
class SettingValue:
    name: str
    value: str
    scope: str  # "global" | "zone"
    scope_id: str | None  # zone id for zone scope
    updated: float


class Tx(Protocol):
    """Write methods, valid only inside ``async with store.transaction() as tx``."""

    def on_commit(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` after this transaction commits (never if it rolls back). Callbacks run
        in registration order; one that raises is logged and does not stop the others."""
        ...

    async def live_system_vm_ids(self, zone_id: str | None = None) -> list[str]:
        """Ids of VMs not Destroyed/Expunging (in ``zone_id`` if given), as this transaction
        sees them (its own uncommitted writes included)."""
        ...

    # Hooks for parts that own tables of their own (own migration ``manager/sql/NNN_*.sql``,
    # e.g. the console proxy's 110_console.sql) and write them in the same transaction.
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One SQL statement with ``?`` parameters; returns the number of rows changed."""
        ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of one query as dicts (this transaction's own writes included)."""
        ...

    async def add_zone(self, zone: Zone) -> None: ...
    async def add_pod(self, pod: Pod) -> None: ...
    async def add_cluster(self, cluster: Cluster) -> None: ...
    async def add_host(self, host: Host) -> None: ...

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
        """Allocates id, seq and name (v-/s-/r-<seq>-VM), state Starting, versions 0."""
        ...

    async def update_system_vm(self, vm_id: str, **fields: Any) -> None:
        """Sets any SystemVm fields except id/seq/name/role (unknown field -> ValueError)."""
        ...

    async def bump_desired(self, vm_ids: Sequence[str]) -> dict[str, int]:
        """Increments desired_version of each VM; returns the new versions."""
        ...

    async def record_applied(self, vm_id: str, version: int) -> None:
        """applied_version = max(applied_version, version)."""
        ...

    async def add_enrolment_token(self, vm_id: str, token_hash: bytes, expires_at: float) -> None:
        """Stores only the hash (sha256 of the token). A VM has at most one live token:
        adding a new one invalidates older unused ones."""
        ...

    async def consume_enrolment_token(
        self, token_hash: bytes, vm_id: str, now: float
    ) -> TokenOutcome:
        """Atomically checks and marks used. Used/expired tokens stay for reporting."""
        ...

    async def record_certificate(self, vm_id: str, serial: int, not_after: float) -> None: ...

    async def revoke_certificates(self, vm_id: str, reason: str, now: float) -> list[int]:
        """Revokes every certificate of the VM; returns their serials."""
        ...

    async def add_command(
        self, vm_id: str, command_id: str, name: str, args: Mapping[str, Any], now: float
    ) -> bool:
        """Idempotent by id: returns False (and changes nothing) if the id exists."""
        ...

    async def complete_command(
        self, command_id: str, ok: bool, result: Mapping[str, Any], error: str
    ) -> None: ...

    async def add_job(self, job: Job) -> None: ...
    async def update_job(
        self,
        job_id: str,
        *,
        status: JobStatus,
        result_code: int,
        result: Mapping[str, Any],
        now: float,
    ) -> None: ...

    async def add_event(self, event: Event) -> None: ...
    async def add_alert(self, alert: Alert) -> None: ...

    async def set_setting(
        self, name: str, value: str, scope: str, scope_id: str | None, now: float
    ) -> None: ...

    async def delete_setting(self, name: str, scope: str, scope_id: str | None) -> bool:
        """Removes an explicit value (back to the default / global); True if one existed."""
        ...

    async def add_user(self, user: User) -> None: ...

    async def set_user_keys(self, user_id: str, apikey: str, secretkey: str) -> None:
        """Replaces a user's API key pair (the old pair stops working at commit)."""
        ...


class Store(Protocol):
    async def close(self) -> None: ...

    def transaction(self, *, durable: bool = True) -> AbstractAsyncContextManager[Tx]:
        """``durable=True`` (default): on disk before the block returns. ``durable=False``:
        atomic, but may be lost on power failure — only for data nobody was promised."""
        ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Read hook for parts with their own tables: committed rows as dicts."""
        ...

    # infrastructure
    async def list_zones(self) -> list[Zone]: ...
    async def list_pods(self, zone_id: str | None = None) -> list[Pod]: ...
    async def list_clusters(self, zone_id: str | None = None) -> list[Cluster]: ...
    async def list_hosts(self, zone_id: str | None = None) -> list[Host]: ...

    # system VMs
    async def get_system_vm(self, vm_id: str) -> SystemVm | None: ...
    async def list_system_vms(
        self,
        *,
        zone_id: str | None = None,
        role: Role | None = None,
        states: Sequence[VmState] | None = None,
    ) -> list[SystemVm]: ...

    # trust
    async def is_revoked(self, serial: int) -> bool: ...
    async def revoked_serials(self) -> set[int]: ...

    # commands
    async def pending_commands(self, vm_id: str) -> list[Command]: ...
    async def get_command(self, command_id: str) -> Command | None: ...

    # jobs, events, alerts
    async def get_job(self, job_id: str) -> Job | None: ...
    async def list_jobs(
        self, *, status: JobStatus | None = None, limit: int = 500
    ) -> list[Job]: ...
    async def list_events(self, *, limit: int = 500) -> list[Event]: ...
    async def list_alerts(self, *, limit: int = 500) -> list[Alert]: ...

    # settings (only explicitly set values; defaults live in manager.settings)
    async def list_setting_values(self) -> list[SettingValue]: ...

    # accounts
    async def get_user_by_apikey(self, apikey: str) -> User | None: ...
    async def count_users(self) -> int: ...
    async def get_user_by_username(self, username: str) -> User | None: ...
    async def list_users(self) -> list[User]: ...
