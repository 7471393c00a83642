"""Every manager setting, declared once.

:data:`SETTINGS` is the single table: ``listConfigurations`` renders it, :class:`Settings`
resolves values from it, and a default appears nowhere else. To add a setting, append one
:class:`Setting` here (CloudStack's name when CloudStack has one) and read it with
``ctx.settings.get("name", zone_id)``.

Resolution: zone value (for zone-scoped settings) > global value > default.

Dynamic settings take effect as soon as the transaction that changed them commits
(``on_change`` callbacks run then). Non-dynamic ones are stored at once and shown by
``listConfigurations``, but :meth:`Settings.get` keeps returning the value loaded at start
until the manager restarts (``restart_required`` says so).

``agent=True`` settings are part of every agent's desired config (``settings`` section, see
:meth:`Settings.agent_settings`); changing one bumps ``desired_version`` of the affected VMs in
the same transaction, and ``on_desired_changed`` callbacks get their ids after commit.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from manager.store.base import Store, Tx

log = logging.getLogger("sysvm.settings")

Value = int | float | bool | str


class Kind(enum.StrEnum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STR = "str"
    ENUM = "enum"


class Scope(enum.StrEnum):
    GLOBAL = "global"
    ZONE = "zone"


# CloudStack's listConfigurations "type" values.
CLOUDSTACK_TYPE = {
    Kind.INT: "Number",
    Kind.FLOAT: "Decimal",
    Kind.BOOL: "Boolean",
    Kind.STR: "String",
    Kind.ENUM: "Select",
}

MAX_STR_LEN = 4096


class SettingError(ValueError):
    """A setting name or value was refused; the message names the setting and what it
    expects, and is safe to show to an API client."""


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    kind: Kind
    default: Value
    description: str
    category: str = "Advanced"
    scope: Scope = Scope.GLOBAL
    dynamic: bool = True
    agent: bool = False
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    unit: str = ""
    secret: bool = False  # value masked in listConfigurations, events and logs

    def parse(self, raw: str) -> Value:
        """Typed value of ``raw``, or :class:`SettingError` naming the setting and what is
        expected."""
        if not isinstance(raw, str):
            raise SettingError(f"{self.name}: value must be a string, got {type(raw).__name__}")
        text = raw.strip()
        value: Value
        if self.kind is Kind.BOOL:
            low = text.lower()
            if low not in ("true", "false"):
                raise SettingError(f"{self.name}: expected a boolean (true or false), got {raw!r}")
            return low == "true"
        if self.kind is Kind.INT:
            try:
                value = int(text, 10)
            except ValueError:
                raise SettingError(
                    f"{self.name}: expected an integer{self._range_text()}, got {_clip(raw)!r}"
                ) from None
        elif self.kind is Kind.FLOAT:
            try:
                value = float(text)
            except ValueError:
                raise SettingError(
                    f"{self.name}: expected a number{self._range_text()}, got {_clip(raw)!r}"
                ) from None
            if not math.isfinite(value):
                raise SettingError(f"{self.name}: expected a finite number, got {raw!r}")
        elif self.kind is Kind.ENUM:
            if text not in self.choices:
                raise SettingError(
                    f"{self.name}: expected one of {', '.join(self.choices)}, got {_clip(raw)!r}"
                )
            return text
        else:
            if len(raw) > MAX_STR_LEN:
                raise SettingError(f"{self.name}: value longer than {MAX_STR_LEN} characters")
            if any(ord(c) < 32 or ord(c) == 127 for c in raw):
                raise SettingError(f"{self.name}: control characters are not allowed")
            return raw
        if (self.min is not None and value < self.min) or (
            self.max is not None and value > self.max
        ):
            raise SettingError(f"{self.name}: {value} is out of range{self._range_text()}")
        return value

    def render(self, value: Value) -> str:
        """The canonical string form stored in the database and shown by the API."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float) and value.is_integer() and self.kind is Kind.FLOAT:
            return repr(value)
        return str(value)

    def _range_text(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else str(x)

        if self.min is not None and self.max is not None:
            return f" between {num(self.min)} and {num(self.max)}"
        if self.min is not None:
            return f" >= {num(self.min)}"
        if self.max is not None:
            return f" <= {num(self.max)}"
        return ""


def _clip(text: str, n: int = 64) -> str:
    return text if len(text) <= n else text[:n] + "..."


_CP = "Console Proxy"
_SS = "Secondary Storage"
_NET = "Network"
_ADV = "Advanced"
_SYS = "Sysvm"

SETTINGS: tuple[Setting, ...] = (
    # Console proxy (CloudStack names and defaults).
    Setting("consoleproxy.session.max", Kind.INT, 50, "Sessions one console proxy VM takes",
            _CP, Scope.ZONE, min=1, max=100_000),
    Setting("consoleproxy.capacity.standby", Kind.INT, 10,
            "Free session slots kept ready; below it another console proxy VM starts",
            _CP, Scope.ZONE, min=0, max=100_000),
    Setting("consoleproxy.capacityscan.interval", Kind.FLOAT, 30.0,
            "Seconds between evaluations of the console proxy standby rule", _CP,
            min=1, max=86_400, unit="s"),
    Setting("consoleproxy.launch.max", Kind.INT, 10, "Most console proxy VMs per zone",
            _CP, Scope.ZONE, min=0, max=1000),
    Setting("consoleproxy.session.timeout", Kind.INT, 300,
            "Seconds a VM recently assigned to a proxy stays sticky to it", _CP,
            min=0, max=86_400, unit="s"),
    Setting("consoleproxy.url.domain", Kind.STR, "",
            "'*.example.com' -> proxy 1.2.3.4 is reached at 1-2-3-4.example.com; a plain FQDN "
            "-> that name (load balancer); empty -> the proxy's IP", _CP, Scope.ZONE),
    Setting("consoleproxy.sslEnabled", Kind.BOOL, False, "HTTPS/WSS for consoles", _CP,
            Scope.ZONE, agent=True),
    Setting("consoleproxy.loadscan.interval", Kind.FLOAT, 5.0,
            "Seconds between console proxy load reports (also sent on every session change)",
            _CP, agent=True, min=1, max=3600, unit="s"),
    # Secondary storage.
    Setting("secstorage.session.max", Kind.INT, 50, "Commands one secondary storage VM takes",
            _SS, Scope.ZONE, min=1, max=100_000),
    Setting("secstorage.capacity.standby", Kind.INT, 10,
            "Spare command slots before another secondary storage VM starts", _SS, Scope.ZONE,
            min=0, max=100_000),
    Setting("secstorage.cmd.execution.time.max", Kind.INT, 30,
            "Minutes a command counts as load on its secondary storage VM", _SS,
            min=1, max=10_080, unit="min"),
    Setting("secstorage.capacityscan.interval", Kind.FLOAT, 30.0,
            "Seconds between secondary storage scale checks", _SS, min=1, max=86_400, unit="s"),
    # Virtual router.
    Setting("network.router.EnableServiceMonitoring", Kind.BOOL, False,
            "Virtual router service monitoring", _NET, Scope.ZONE, agent=True),
    Setting("router.stats.interval", Kind.INT, 300,
            "Seconds between router network usage reports; 0 disables", _NET,
            agent=True, min=0, max=86_400, unit="s"),
    Setting("router.version.check", Kind.BOOL, True,
            "Refuse operations on routers older than the required template version", _NET),
    Setting("router.template.kvm", Kind.STR, "SystemVM Template (KVM)",
            "Template new KVM routers use", _NET, Scope.ZONE),
    Setting("router.template.xenserver", Kind.STR, "SystemVM Template (XenServer)",
            "Template new XenServer routers use", _NET, Scope.ZONE),
    Setting("router.template.vmware", Kind.STR, "SystemVM Template (vSphere)",
            "Template new VMware routers use", _NET, Scope.ZONE),
    Setting("router.template.embedded", Kind.STR, "SystemVM Template (Embedded)",
            "Template new routers on the embedded hypervisor use", _NET, Scope.ZONE),
    Setting("router.health.checks.enabled", Kind.BOOL, True, "Router health checks", _NET,
            agent=True),
    Setting("router.health.checks.basic.interval", Kind.INT, 3,
            "Minutes between basic router health checks", _NET, agent=True,
            min=1, max=1440, unit="min"),
    Setting("router.health.checks.advanced.interval", Kind.INT, 10,
            "Minutes between advanced router health checks", _NET, agent=True,
            min=1, max=1440, unit="min"),
    # Agent liveness (CloudStack's), and the API.
    Setting("ping.interval", Kind.INT, 60, "Seconds between pings of CloudStack agents", _ADV,
            min=1, max=86_400, unit="s"),
    Setting("ping.timeout", Kind.FLOAT, 2.5,
            "Multiplier of the heartbeat interval after which a silent agent is suspected",
            _ADV, min=1.0, max=100.0),
    Setting("default.page.size", Kind.INT, 500, "Default page size of list API commands",
            _ADV, min=1, max=100_000),
    # sysvm's own.
    Setting("sysvm.enrolment.token.ttl", Kind.INT, 600,
            "Seconds an enrolment token in a new VM's boot data stays valid", _SYS,
            min=30, max=86_400, unit="s"),
    Setting("sysvm.agent.cert.validity", Kind.INT, 30,
            "Days an agent client certificate is valid (renewed at two thirds)", _SYS,
            min=1, max=3650, unit="d"),
    Setting("sysvm.agent.heartbeat.interval", Kind.FLOAT, 10.0,
            "Seconds between agent heartbeats", _SYS, agent=True, min=1, max=3600, unit="s"),
    Setting("sysvm.agent.heartbeat.ack.every", Kind.INT, 4,
            "The manager acknowledges every Nth heartbeat of an agent (protocol 2+); the "
            "agent calls the manager silent after N + 2 heartbeat intervals without a frame. "
            "1 acknowledges every heartbeat. Applies to connections made after a change",
            _SYS, min=1, max=60),
    Setting("sysvm.api.request.max.bytes", Kind.INT, 1_048_576,
            "Largest API request body accepted", _SYS, dynamic=False,
            min=1024, max=64 * 1_048_576),
    Setting("sysvm.api.signature.expires.max", Kind.INT, 0,
            "Most seconds ahead a signatureVersion=3 'expires' may lie; 0 = no limit", _SYS,
            min=0, max=31_536_000, unit="s"),
)  # fmt: skip

SETTINGS_BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}
if len(SETTINGS_BY_NAME) != len(SETTINGS):  # pragma: no cover - a typo in the table
    raise RuntimeError("duplicate setting name in SETTINGS")
for _s in SETTINGS:  # every default must pass its own validation
    _s.parse(_s.render(_s.default))

ChangeCallback = Callable[[str, "str | None"], None]
DesiredCallback = Callable[[list[str]], None]


class Settings:
    """Typed settings backed by the store. ``await load()`` before use."""

    def __init__(self, store: Store, table: Mapping[str, Setting] | None = None) -> None:
        self._store = store
        self._table: Mapping[str, Setting] = table if table is not None else SETTINGS_BY_NAME
        # (name, zone_id or None) -> typed value, as stored.
        self._stored: dict[tuple[str, str | None], Value] = {}
        # What get() returns; differs from _stored for non-dynamic settings changed since load.
        self._effective: dict[tuple[str, str | None], Value] = {}
        self._on_change: list[ChangeCallback] = []
        self._on_desired: list[DesiredCallback] = []

    @property
    def table(self) -> Mapping[str, Setting]:
        return self._table

    def setting(self, name: str) -> Setting:
        try:
            return self._table[name]
        except KeyError:
            raise SettingError(f"unknown setting {_clip(name)!r}") from None

    async def load(self) -> None:
        stored: dict[tuple[str, str | None], Value] = {}
        for sv in await self._store.list_setting_values():
            decl = self._table.get(sv.name)
            if decl is None:
                log.warning("event=setting_unknown_in_db name=%s", sv.name)
                continue
            try:
                stored[(sv.name, sv.scope_id)] = decl.parse(sv.value)
            except SettingError as e:
                log.warning("event=setting_invalid_in_db name=%s error=%s", sv.name, e)
        self._stored = stored
        self._effective = dict(stored)

    def get(self, name: str, zone_id: str | None = None) -> Any:
        """Effective typed value: zone > global > default."""
        decl = self.setting(name)
        return resolve(decl, self._effective, zone_id)

    def stored(self, name: str, zone_id: str | None = None) -> Value:
        """Value as stored (what listConfigurations shows), same resolution as :meth:`get`."""
        return resolve(self.setting(name), self._stored, zone_id)

    def is_set(self, name: str, zone_id: str | None = None) -> bool:
        return (name, zone_id) in self._stored

    def restart_required(self, name: str) -> bool:
        """True if a stored value of this non-dynamic setting is not in effect yet."""
        decl = self.setting(name)
        if decl.dynamic:
            return False
        keys = {k for k in (*self._stored, *self._effective) if k[0] == name}
        return any(self._stored.get(k) != self._effective.get(k) for k in keys)

    def agent_settings(self, zone_id: str | None) -> dict[str, Value]:
        """The ``settings`` section of an agent's desired config for a VM in ``zone_id``."""
        return {
            s.name: resolve(s, self._effective, zone_id) for s in self._table.values() if s.agent
        }

    def on_change(self, callback: ChangeCallback) -> None:
        """``callback(name, zone_id)`` after a dynamic setting's change commits."""
        self._on_change.append(callback)

    def on_desired_changed(self, callback: DesiredCallback) -> None:
        """``callback(vm_ids)`` after a change to an ``agent=True`` setting commits."""
        self._on_desired.append(callback)

    async def update(self, tx: Tx, name: str, raw: str, zone_id: str | None = None) -> Any:
        """Validates ``raw`` and writes it in ``tx``; returns the typed value."""
        decl = self.setting(name)
        await self._check_scope(decl, zone_id)
        value = decl.parse(raw)
        await tx.set_setting(name, decl.render(value), decl.scope.value, zone_id, _now())
        await self._after_write(tx, decl, zone_id, value)
        return value

    async def reset(self, tx: Tx, name: str, zone_id: str | None = None) -> Any:
        """Drops the explicit value at this scope; returns the value now resolved."""
        decl = self.setting(name)
        await self._check_scope(decl, zone_id)
        await tx.delete_setting(name, decl.scope.value, zone_id)
        await self._after_write(tx, decl, zone_id, None)
        remaining = {k: v for k, v in self._stored.items() if k != (name, zone_id)}
        return resolve(decl, remaining, zone_id)

    async def _check_scope(self, decl: Setting, zone_id: str | None) -> None:
        if zone_id is None:
            return
        if decl.scope is not Scope.ZONE:
            raise SettingError(f"{decl.name}: is a global setting, it cannot be set per zone")
        if zone_id not in {z.id for z in await self._store.list_zones()}:
            raise SettingError(f"{decl.name}: no zone with id {_clip(zone_id)!r}")

    async def _after_write(
        self, tx: Tx, decl: Setting, zone_id: str | None, value: Value | None
    ) -> None:
        bumped: list[str] = []
        if decl.agent:
            ids = await tx.live_system_vm_ids(zone_id)
            if ids:
                await tx.bump_desired(ids)
                bumped = ids
        key = (decl.name, zone_id)

        def committed() -> None:
            if value is None:
                self._stored.pop(key, None)
            else:
                self._stored[key] = value
            if not decl.dynamic:
                log.info("event=setting_stored name=%s restart_required=true", decl.name)
                return
            if value is None:
                self._effective.pop(key, None)
            else:
                self._effective[key] = value
            log.info("event=setting_changed name=%s zone=%s", decl.name, zone_id or "-")
            for cb in list(self._on_change):
                try:
                    cb(decl.name, zone_id)
                except Exception:
                    log.exception("event=setting_callback_failed name=%s", decl.name)
            if bumped:
                for dcb in list(self._on_desired):
                    try:
                        dcb(list(bumped))
                    except Exception:
                        log.exception("event=desired_callback_failed name=%s", decl.name)

        tx.on_commit(committed)


def resolve(
    decl: Setting, values: Mapping[tuple[str, str | None], Value], zone_id: str | None
) -> Value:
    """zone > global > default, pure."""
    if zone_id is not None and decl.scope is Scope.ZONE:
        v = values.get((decl.name, zone_id))
        if v is not None:
            return v
    v = values.get((decl.name, None))
    return decl.default if v is None else v


def _now() -> float:
    return time.time()
