"""System VM lifecycle: a pure planner, the operations it and the API use, and the loop.

:func:`plan` looks at plain data (zones, VMs, what the drivers report, which agents are
connected) and returns :class:`Action` s:

- keep one console proxy VM and one secondary storage VM per *enabled* zone: start a
  stopped one if there is one, else create one (destroyed VMs no longer count, so they are
  replaced);
- restart a VM whose agent went silent past ``agent_timeout``, whose process died
  (driver: crashed / gone), which has been Starting longer than ``start_timeout``, or which
  is in Error;
- never act twice on the same VM within ``settle`` seconds (a restart takes time);
- mark a Starting VM Running once its agent is connected.

:class:`LifecycleLoop` runs the planner every ``interval`` seconds and executes each action
through the store and the VM's driver; each one raises an event, and failures and restarts
raise an alert too. The API calls :func:`start_system_vm`, :func:`stop_system_vm`,
:func:`reboot_system_vm` and :func:`destroy_system_vm` (each returns the updated record).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manager import vm_events
from manager.hypervisor.base import (
    NIC_KINDS,
    Driver,
    DriverError,
    NicSpec,
    PowerState,
    VmSpec,
    bridge_name,
    guest_bridge_name,
)
from manager.store.base import Role, SystemVm, VmState, Zone

if TYPE_CHECKING:
    from manager.context import ManagerContext

log = logging.getLogger("sysvm.lifecycle")

KEEP_ROLES = (Role.CONSOLE_PROXY, Role.SECONDARY_STORAGE)
LIVE_STATES = (VmState.STARTING, VmState.RUNNING, VmState.STOPPING, VmState.STOPPED, VmState.ERROR)


class Kind(enum.StrEnum):
    CREATE = "create"
    START = "start"
    RESTART = "restart"
    MARK_RUNNING = "mark_running"  # Starting and its agent said hello


@dataclass(frozen=True, slots=True)
class Action:
    kind: Kind
    zone_id: str
    role: Role
    vm_id: str | None = None  # None for CREATE
    reason: str = ""
    alert: bool = True  # RESTART: raise an alert (not for a VM stopped cleanly, e.g. by a
    # manager shutdown: the next manager just boots it again)


@dataclass(frozen=True, slots=True)
class PlanSettings:
    agent_timeout: float = 150.0  # CloudStack: ping.interval 60 s x ping.timeout 2.5
    start_timeout: float = 300.0  # Starting without a hello for this long -> restart
    settle: float = 120.0  # no second action on one VM within this time
    crash_settle: float = 10.0  # a dead process (crashed/absent) is restarted sooner
    # a VM stopped through the API is started again this long after (CloudStack: at the
    # next capacity scan); the manager uses *.capacityscan.interval
    restart_stopped_after: float = 0.0
    default_hypervisor: str = "Embedded"


@dataclass(frozen=True, slots=True)
class Observed:
    """What the loop saw outside the store at planning time."""

    power: Mapping[str, PowerState] = field(default_factory=dict)  # vm id -> driver state
    connected: frozenset[str] = frozenset()  # vm ids with a live agent session
    last_action: Mapping[str, float] = field(default_factory=dict)  # vm id -> time acted on
    last_create: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (zone, role)
    busy: frozenset[str] = frozenset()  # vm ids an API operation is working on
    api_ops: Mapping[str, float] = field(default_factory=dict)  # vm id -> last API op end


# ---------------------------------------------------------------- pure planner


def plan(
    zones: Sequence[Zone],
    vms: Sequence[SystemVm],
    now: float,
    settings: PlanSettings,
    observed: Observed | None = None,
) -> list[Action]:
    obs = observed or Observed()
    actions: list[Action] = []
    live = [v for v in vms if v.state in LIVE_STATES]
    for zone in zones:
        if zone.allocation_state != "Enabled":
            continue
        for role in KEEP_ROLES:
            mine = [v for v in live if v.zone_id == zone.id and v.role == role]
            active = [v for v in mine if v.state in (VmState.STARTING, VmState.RUNNING)]
            if active:
                continue
            recent = obs.last_create.get((zone.id, role.value))
            if recent is not None and now - recent < settings.settle:
                continue
            stopped = sorted((v for v in mine if v.state == VmState.STOPPED), key=lambda v: v.seq)
            ready = [
                v
                for v in stopped
                if v.id not in obs.busy
                and _may_act(v, now, settings, obs)
                and now - obs.api_ops.get(v.id, -math.inf) >= settings.restart_stopped_after
            ]
            if ready:
                actions.append(
                    Action(Kind.START, zone.id, role, ready[0].id, f"no running {role.value}")
                )
            elif not stopped and not any(
                v.state in (VmState.STOPPING, VmState.ERROR) or v.id in obs.busy for v in mine
            ):
                actions.append(Action(Kind.CREATE, zone.id, role, None, f"no {role.value} in zone"))
    for vm in live:
        if vm.id in obs.busy:
            continue
        if vm.state == VmState.STARTING and vm.id in obs.connected:
            actions.append(Action(Kind.MARK_RUNNING, vm.zone_id, vm.role, vm.id, "agent connected"))
            continue
        reason = restart_reason(vm, now, settings, obs)
        dead = obs.power.get(vm.id) in (PowerState.CRASHED, PowerState.ABSENT)
        gap = settings.crash_settle if dead else settings.settle
        if reason and _may_act(vm, now, settings, obs, gap):
            clean = obs.power.get(vm.id) is PowerState.STOPPED
            actions.append(Action(Kind.RESTART, vm.zone_id, vm.role, vm.id, reason, not clean))
    return actions


def _may_act(
    vm: SystemVm, now: float, settings: PlanSettings, obs: Observed, gap: float | None = None
) -> bool:
    last = obs.last_action.get(vm.id)
    return last is None or now - last >= (settings.settle if gap is None else gap)


def restart_reason(vm: SystemVm, now: float, settings: PlanSettings, obs: Observed) -> str:
    """Why a VM must be restarted, or "" (pure)."""
    power = obs.power.get(vm.id)
    if vm.state == VmState.ERROR and power is not None:
        return "vm in Error state"
    if vm.state not in (VmState.RUNNING, VmState.STARTING):
        return ""
    if power in (PowerState.CRASHED, PowerState.ABSENT, PowerState.STOPPED):
        return f"vm process {power.value}"
    if vm.id in obs.connected:
        return ""
    if vm.state == VmState.STARTING:
        if now - _since(vm) > settings.start_timeout:
            return f"no agent hello within {settings.start_timeout:.0f} s of start"
        return ""
    seen = vm.last_seen if vm.last_seen is not None else _since(vm)
    if now - seen > settings.agent_timeout:
        return f"agent silent for {now - seen:.0f} s"
    return ""


def _since(vm: SystemVm) -> float:
    started = vm.details.get("started_at") if vm.details else None
    return float(started) if isinstance(started, (int, float)) else vm.created


# ---------------------------------------------------------------- pure helpers for start


def control_address(linklocal_cidr: str, seq: int) -> tuple[str, str]:
    """(VM address with prefix, host bridge address with prefix) on the zone's link-local
    control network: the host takes the first address, VMs follow by seq."""
    net = ipaddress.ip_network(linklocal_cidr or "169.254.0.0/16", strict=False)
    hosts = net.num_addresses - 2
    if hosts < 3:
        raise DriverError(f"link-local network {net} is too small")
    host = net.network_address + 1
    vm = net.network_address + 2 + (seq % (hosts - 1))
    return f"{vm}/{net.prefixlen}", f"{host}/{net.prefixlen}"


PUBLIC_ROLES = (Role.CONSOLE_PROXY, Role.SECONDARY_STORAGE)  # eth1 on the public bridge
# (SSVM storage NIC: no storage network exists yet, so none is plugged)


def public_nic(vm: SystemVm, zone: Zone, prefix: str) -> NicSpec | None:
    """Pure: a CPVM's/SSVM's public NIC (eth1) on the zone's public bridge, with its
    ``public_ip`` in the zone's public range; the host holds the range's first address
    (bridge address and the VM's default gateway). None for other roles, or without an
    address or public range."""
    if vm.role not in PUBLIC_ROLES or not vm.public_ip or not zone.public_cidr:
        return None
    net = ipaddress.ip_network(zone.public_cidr, strict=False)
    if ipaddress.ip_address(vm.public_ip) not in net:
        return None
    gateway = str(net.network_address + 1)
    return NicSpec(
        kind="public",
        bridge=bridge_name(prefix, zone.id, "public"),
        address=f"{vm.public_ip}/{net.prefixlen}",
        gateway=gateway,
        bridge_address=f"{gateway}/{net.prefixlen}",
        default_route=True,
    )


DEFAULT_MEMORY_MB = 512
DEFAULT_CPUS = 1


def router_nics(plan: Sequence[Mapping[str, Any]], zone: Zone, prefix: str) -> tuple[NicSpec, ...]:
    """Pure: a router's NICs from its NIC plan (``manager.network.routers.nic_plan``: entry
    ``i`` is device ``eth{i}``, whatever its kind). Control and public NICs go on the zone's
    bridges, where the host holds the control network's first address and the public
    gateway (as for CPVMs/SSVMs); a guest NIC goes on its network's own bridge
    (:func:`~manager.hypervisor.base.guest_bridge_name`), where the host holds no address:
    guests plug into it and the router is their gateway. Raises DriverError for a plan the
    hypervisor cannot plug."""
    nics: list[NicSpec] = []
    for i, entry in enumerate(plan):
        kind = str(entry.get("kind") or "")
        where = f"router NIC eth{i} ({kind or '?'})"
        raw = entry.get("address")
        try:
            iface = ipaddress.ip_interface(str(raw)) if raw else None
        except ValueError:
            raise DriverError(f"{where}: address {raw!r} is not ADDR/PREFIX") from None
        gateway = str(entry["gateway"]) if entry.get("gateway") else None
        bridge_address: str | None = None
        if kind == "guest":
            network_id = entry.get("network_id")
            if not network_id:
                raise DriverError(f"{where}: no network_id for its bridge")
            bridge = guest_bridge_name(prefix, str(network_id))
        elif kind == "control":
            bridge = bridge_name(prefix, zone.id, "control")
            bridge_address = control_address(zone.linklocal_cidr, 0)[1]
        elif kind == "public":
            bridge = bridge_name(prefix, zone.id, "public")
            if gateway is not None and iface is not None:
                bridge_address = f"{gateway}/{iface.network.prefixlen}"
        elif kind in NIC_KINDS:
            bridge = bridge_name(prefix, zone.id, kind)
        else:
            raise DriverError(f"{where}: unknown NIC kind (one of {', '.join(NIC_KINDS)})")
        nics.append(
            NicSpec(
                kind=kind,
                bridge=bridge,
                address=str(iface) if iface is not None else None,
                gateway=gateway,
                bridge_address=bridge_address,
                default_route=bool(entry.get("default_route")),
            )
        )
    return tuple(nics)


def router_sizing(offerings: Sequence[Any], offering_id: str | None) -> tuple[int, int]:
    """Pure: (memory MiB, CPUs) of a router from its service offering (rows with ``id``,
    ``memory_mb``, ``cpu_number``); the defaults without one."""
    for o in offerings:
        if offering_id is not None and o.id == offering_id:
            return max(64, int(o.memory_mb)), max(1, int(o.cpu_number))
    return DEFAULT_MEMORY_MB, DEFAULT_CPUS


def vm_spec(
    vm: SystemVm,
    zone: Zone,
    boot: Mapping[str, Any],
    prefix: str,
    memory_mb: int = DEFAULT_MEMORY_MB,
    cpus: int = DEFAULT_CPUS,
    nic_plan: Sequence[Mapping[str, Any]] | None = None,
) -> VmSpec:
    """Pure: eth0 control (link-local), eth1 public for a CPVM/SSVM with a public IP; with a
    ``nic_plan`` (routers), exactly the NICs it lists (:func:`router_nics`)."""
    if nic_plan is not None:
        nics = list(router_nics(nic_plan, zone, prefix))
    else:
        addr, host = control_address(zone.linklocal_cidr, vm.seq)
        nics = [
            NicSpec(
                kind="control",
                bridge=bridge_name(prefix, zone.id, "control"),
                address=addr,
                bridge_address=host,
            )
        ]
        public = public_nic(vm, zone, prefix)
        if public is not None:
            nics.append(public)
    return VmSpec(
        vm_id=vm.id,
        name=vm.name,
        role=vm.role.value,
        boot_data=boot,
        nics=tuple(nics),
        memory_mb=memory_mb,
        cpus=cpus,
    )


def boot_extra(vm: SystemVm, zone: Zone, host_network: bool = False) -> dict[str, Any]:
    """Pure: role-specific boot data. A console proxy serves browsers on its public IP
    (the console URL names it); without one, on its control address (reachable from the
    manager's host). ``host_network``: the driver plugs no NICs (the VM shares the host's
    network, e.g. the process driver without namespaces): loopback, a free port (the
    console URL names the address the proxy reports)."""
    if vm.role is Role.CONSOLE_PROXY:
        if host_network:
            return {"listen_host": "127.0.0.1", "listen_port": 0}
        if public_nic(vm, zone, "sv") is not None:
            return {"listen_host": vm.public_ip}
        return {"listen_host": control_address(zone.linklocal_cidr, vm.seq)[0].split("/")[0]}
    return {}


async def _allocate_public(tx: Any, zone: Zone, vm: SystemVm) -> str:
    """The VM's public IP from the zone's pool (shared with routers' public IPs)."""
    from manager.network.store import allocate_system_public_ip
    from manager.network.validate import NetError

    try:
        return await allocate_system_public_ip(tx, zone, vm.id)
    except (NetError, ValueError) as e:
        raise LifecycleError(f"vm {vm.name}: no public IP: {e}") from e


async def _router_plan(ctx: ManagerContext, vm: SystemVm) -> list[dict[str, Any]]:
    """The router's NIC plan from the network part (what the router's config names)."""
    from manager.network.routers import nic_plan

    try:
        return await nic_plan(ctx.store, vm.id)
    except LookupError as e:
        raise LifecycleError(f"vm {vm.name}: no NIC plan: {e}") from e


async def router_size(ctx: ManagerContext, vm: SystemVm) -> tuple[int, int]:
    """(memory MiB, CPUs) from the router's network's service offering (else the one the
    router was created with, else the defaults)."""
    from manager.network import store as ns

    network_id = await ns.network_of_router(ctx.store, vm.id)
    net = await ns.get_network(ctx.store, network_id) if network_id else None
    offering_id = net.service_offering_id if net is not None else None
    if offering_id is None and vm.details:
        raw = vm.details.get("service_offering_id")
        offering_id = str(raw) if raw else None
    return router_sizing(await ns.list_router_offerings(ctx.store), offering_id)


# ---------------------------------------------------------------- operations (I/O)


class LifecycleError(RuntimeError):
    """An operation on a system VM failed; the message is fit for an API error text."""


AGENT_WAIT = 180.0  # API start/reboot: how long to wait for the agent's hello


class VmOps:
    """Who is working on which VM: one lock per VM (API operations and the loop take it),
    the VMs being worked on (the planner leaves them alone) and when each was last
    operated on (the planner waits ``settle`` after that). One per manager context."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}
        self.busy: set[str] = set()
        self.last_op: dict[str, float] = {}
        self.reset_create: set[tuple[str, str]] = set()  # (zone, role) destroyed by the API

    @contextlib.asynccontextmanager
    async def op(self, vm_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(vm_id, asyncio.Lock())
        self._users[vm_id] = self._users.get(vm_id, 0) + 1
        self.busy.add(vm_id)
        self.last_op[vm_id] = self.clock()
        try:
            async with lock:
                yield
        finally:
            self.last_op[vm_id] = self.clock()
            self._users[vm_id] -= 1
            if self._users[vm_id] == 0:  # the last user leaves
                del self._users[vm_id]
                self.busy.discard(vm_id)
                self._locks.pop(vm_id, None)


_OPS_ATTR = "vm_ops"


def vm_ops(ctx: ManagerContext) -> VmOps:
    """The context's :class:`VmOps` (made on first use; ManagerContext has no slot)."""
    ops = getattr(ctx, _OPS_ATTR, None)
    if not isinstance(ops, VmOps):
        ops = VmOps(ctx.clock)
        setattr(ctx, _OPS_ATTR, ops)
    return ops


def _driver(ctx: ManagerContext, vm: SystemVm) -> Driver:
    drv = ctx.hypervisors.get(vm.hypervisor)
    if drv is None:
        raise LifecycleError(f"vm {vm.name}: no driver for hypervisor {vm.hypervisor!r}")
    return drv  # type: ignore[no-any-return]


async def _get(ctx: ManagerContext, vm_id: str) -> SystemVm:
    vm = await ctx.store.get_system_vm(vm_id)
    if vm is None or vm.state in (VmState.DESTROYED, VmState.EXPUNGING):
        raise LifecycleError(f"no system vm with id {vm_id}")
    return vm


async def _record(
    ctx: ManagerContext,
    vm: SystemVm,
    what: str,
    level: str,
    description: str,
    alert: bool = False,
    **fields: Any,
) -> None:
    """State change + event (+ alert) in one transaction."""
    async with ctx.store.transaction() as tx:
        if fields:
            await tx.update_system_vm(vm.id, **fields)
        await vm_events.record(tx, vm, what, level, description, now=ctx.clock(), alert=alert)


def _host_prefix(ctx: ManagerContext, drv: Driver) -> str:
    return str(getattr(drv, "prefix", "sv"))


def image_pin(driver_name: str, image_dir: Path) -> Path:
    """Pure: what the host drivers' per-VM ``image`` file holds for an image directory
    (nspawn: the overlay's lower rootfs; qemu: the image directory)."""
    return image_dir / "rootfs" if driver_name == "nspawn" else image_dir


async def _pin_template(ctx: ManagerContext, vm: SystemVm, drv: Driver) -> None:
    """Before a VM's first boot, points its driver at its template's image. A VM keeps the
    image it first booted (the driver's pin file) until it is destroyed."""
    from manager.templates import get_template

    if vm.template_id is None or not hasattr(drv, "vmdir"):
        return
    vmdir = Path(drv.vmdir(vm.id))
    pin = vmdir / "image"
    if pin.exists():
        return
    t = await get_template(ctx.store, vm.template_id)
    if t is None:
        raise LifecycleError(f"vm {vm.name}: template {vm.template_id} is not registered")
    target = image_pin(drv.name, Path(t.image_dir))
    if not target.exists():
        raise LifecycleError(
            f"vm {vm.name}: template {t.name} image {t.image_dir} is gone "
            "(rebuild it with scripts/build-image or register another template)"
        )
    vmdir.mkdir(mode=0o700, parents=True, exist_ok=True)  # noqa: ASYNC240 - local, tiny
    pin.write_text(f"{target}\n")


async def start_system_vm(ctx: ManagerContext, vm_id: str, wait_agent: float = 0.0) -> SystemVm:
    """Issues a fresh enrolment token, boots the VM on its driver; Starting until its agent
    says hello. ``wait_agent`` > 0: waits that long for the agent and marks it Running (the
    API's startSystemVm). A driver failure leaves the VM in Error with an alert, and raises."""
    async with vm_ops(ctx).op(vm_id):
        return await _start(ctx, vm_id, wait_agent)


async def _start(ctx: ManagerContext, vm_id: str, wait_agent: float = 0.0) -> SystemVm:
    from manager.enrolment import issue_token, make_bootdata

    vm = await _get(ctx, vm_id)
    drv = _driver(ctx, vm)
    zone = next((z for z in await ctx.store.list_zones() if z.id == vm.zone_id), None)
    if zone is None:
        raise LifecycleError(f"vm {vm.name}: zone {vm.zone_id} not found")
    now = ctx.clock()
    ttl = float(ctx.settings.get("sysvm.enrolment.token.ttl"))
    host_network = not getattr(drv, "uses_netns", True)  # its NICs are not plugged
    async with ctx.store.transaction() as tx:
        token = await issue_token(tx, vm.id, ttl, now)
        details = {**dict(vm.details), "started_at": now}
        await tx.update_system_vm(vm.id, state=VmState.STARTING, details=details)
        if vm.role in PUBLIC_ROLES and zone.public_cidr and not host_network:
            vm = replace(vm, public_ip=await _allocate_public(tx, zone, vm))
    boot = make_bootdata(
        vm,
        manager_urls=ctx.agent_urls,
        ca_fingerprint=ctx.pki.ca_fingerprint,
        token=token,
        extra=boot_extra(vm, zone, host_network),
    )
    try:
        memory_mb, cpus, plan = DEFAULT_MEMORY_MB, DEFAULT_CPUS, None
        if vm.role is Role.ROUTER:
            memory_mb, cpus = await router_size(ctx, vm)
            if not host_network:  # eth0 control, eth1 public, eth2 guest (as planned)
                plan = await _router_plan(ctx, vm)
        spec = vm_spec(vm, zone, boot, _host_prefix(ctx, drv), memory_mb, cpus, plan)
        await _pin_template(ctx, vm, drv)
        await drv.start(spec)
    except (DriverError, LifecycleError, OSError) as e:
        log.error("event=vm_start_failed vm=%s error=%s", vm.id, e)
        await _record(ctx, vm, "START", "ERROR", f"start failed: {e}", alert=True,
                      state=VmState.ERROR)  # fmt: skip
        raise LifecycleError(f"vm {vm.name}: {e}") from e
    control = next((n.address for n in spec.nics if n.kind == "control"), None)
    await _record(
        ctx, vm, "START", "INFO", f"started on {drv.name}",
        linklocal_ip=control.split("/")[0] if control else None,
    )  # fmt: skip
    if wait_agent > 0:
        await _wait_agent(ctx, vm, wait_agent)
    return await _get(ctx, vm_id)


async def _wait_agent(ctx: ManagerContext, vm: SystemVm, timeout: float) -> None:  # noqa: ASYNC109
    """Polls the agent link until the VM's agent is connected, then marks it Running."""
    deadline = ctx.clock() + timeout
    while not ctx.links.is_connected(vm.id):
        if ctx.clock() > deadline:
            raise LifecycleError(
                f"vm {vm.name}: started, but its agent did not connect within {timeout:.0f} s"
            )
        await asyncio.sleep(0.1)
    cur = await _get(ctx, vm.id)
    if cur.state == VmState.STARTING:
        await _record(ctx, vm, "START", "INFO", "agent connected: running",
                      state=VmState.RUNNING)  # fmt: skip


async def stop_system_vm(ctx: ManagerContext, vm_id: str, forced: bool = False,
                         timeout: float = 30.0) -> SystemVm:  # fmt: skip  # noqa: ASYNC109
    async with vm_ops(ctx).op(vm_id):
        return await _stop(ctx, vm_id, forced, timeout)


async def _stop(ctx: ManagerContext, vm_id: str, forced: bool, timeout: float) -> SystemVm:  # noqa: ASYNC109
    vm = await _get(ctx, vm_id)
    drv = _driver(ctx, vm)
    await _record(ctx, vm, "STOP", "INFO", "stopping" + (" (forced)" if forced else ""),
                  state=VmState.STOPPING)  # fmt: skip
    ctx.links.disconnect(vm.id, "vm stopping")
    try:
        await drv.stop(vm.id, 0 if forced else timeout)
    except DriverError as e:
        await _record(ctx, vm, "STOP", "ERROR", f"stop failed: {e}", alert=True,
                      state=VmState.ERROR)  # fmt: skip
        raise LifecycleError(f"vm {vm.name}: {e}") from e
    await _record(ctx, vm, "STOP", "INFO", "stopped", state=VmState.STOPPED)
    return await _get(ctx, vm_id)


# the names docs/internals.md used first
async def start_vm(ctx: ManagerContext, vm_id: str) -> SystemVm:
    return await start_system_vm(ctx, vm_id)


async def stop_vm(ctx: ManagerContext, vm_id: str) -> SystemVm:
    return await stop_system_vm(ctx, vm_id)


async def reboot_system_vm(ctx: ManagerContext, vm_id: str, timeout: float = 30.0,  # noqa: ASYNC109
                           wait_agent: float = 0.0) -> SystemVm:  # fmt: skip
    """Clean stop, then start (fresh boot data; the agent keeps its certificate)."""
    async with vm_ops(ctx).op(vm_id):
        vm = await _get(ctx, vm_id)
        await _record(ctx, vm, "REBOOT", "INFO", "rebooting")
        await _stop(ctx, vm_id, False, timeout)
        return await _start(ctx, vm_id, wait_agent)


async def destroy_system_vm(ctx: ManagerContext, vm_id: str) -> SystemVm:
    """Forced stop, disk and NICs removed, Destroyed, certificates revoked (after the
    commit, through the agent link). The loop then replaces a zone's CPVM/SSVM."""
    ops = vm_ops(ctx)
    async with ops.op(vm_id):
        vm = await _get(ctx, vm_id)
        drv = ctx.hypervisors.get(vm.hypervisor)
        ctx.links.disconnect(vm.id, "vm destroyed")
        if drv is not None:
            try:
                await drv.destroy(vm.id)
            except DriverError as e:
                await _record(ctx, vm, "DESTROY", "ERROR", f"destroy failed: {e}", alert=True,
                              state=VmState.ERROR)  # fmt: skip
                raise LifecycleError(f"vm {vm.name}: {e}") from e
        released: dict[str, Any] = {"public_ip": None} if vm.role in PUBLIC_ROLES else {}
        await _record(ctx, vm, "DESTROY", "INFO", "destroyed", state=VmState.DESTROYED,
                      **released)  # fmt: skip
        await ctx.links.revoke(vm.id, "vm destroyed")
        ops.reset_create.add((vm.zone_id, vm.role.value))
        got = await ctx.store.get_system_vm(vm_id)
    assert got is not None
    return got


async def create_system_vm(ctx: ManagerContext, zone_id: str, role: Role,
                           hypervisor: str) -> SystemVm:  # fmt: skip
    """Creates the record (on the template ``router.template.<hypervisor>`` names, see
    :mod:`manager.templates`) and boots it."""
    from manager.templates import TemplateError, template_for_new_vm

    try:
        template = await template_for_new_vm(ctx, zone_id, hypervisor)
    except TemplateError as e:
        raise LifecycleError(str(e)) from e
    async with ctx.store.transaction() as tx:
        vm = await tx.create_system_vm(
            role=role, zone_id=zone_id, hypervisor=hypervisor,
            template_id=template.id if template else None,
        )  # fmt: skip
        await tx.bump_desired([vm.id])  # version 1: its first config, pushed at hello
    await _record(ctx, vm, "CREATE", "INFO", f"created on {hypervisor}" + (
        f" from template {template.name}" if template else ""))  # fmt: skip
    return await start_system_vm(ctx, vm.id)


# ---------------------------------------------------------------- the loop


class LifecycleLoop:
    """Runs :func:`plan` every ``interval`` seconds and executes its actions.

    Owned by the app (``cleanup_ctx``): ``start()`` creates its one task, ``close()``
    cancels and awaits it. Errors of one action are logged and alerted, never fatal."""

    def __init__(
        self,
        ctx: ManagerContext,
        interval: float = 10.0,
        settings: Callable[[], PlanSettings] | None = None,
    ) -> None:
        self.ctx = ctx
        self.interval = interval
        self.settings = settings or (lambda: plan_settings(ctx))
        self.last_action: dict[str, float] = {}
        self.last_create: dict[tuple[str, str], float] = {}
        self._task: asyncio.Task[None] | None = None
        self.passes = 0
        self.starting = False  # some VM was Starting at the last pass

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sysvm-lifecycle")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        """The loop itself (for a caller that owns the task, e.g. the app's job list)."""
        await self._run()

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("event=lifecycle_pass_failed")
            # a VM waiting for its agent is marked Running within a second of its hello
            await asyncio.sleep(min(self.interval, 1.0) if self.starting else self.interval)

    async def observe(self, vms: Sequence[SystemVm]) -> Observed:
        power: dict[str, PowerState] = {}
        for vm in vms:
            drv = self.ctx.hypervisors.get(vm.hypervisor)
            if drv is not None:
                try:
                    power[vm.id] = await drv.state(vm.id)
                except DriverError as e:
                    log.warning("event=vm_state_failed vm=%s error=%s", vm.id, e)
        connected = frozenset(v.id for v in vms if self.ctx.links.is_connected(v.id))
        ops = vm_ops(self.ctx)
        for key in ops.reset_create:  # the API destroyed one: replace it without waiting
            self.last_create.pop(key, None)
        ops.reset_create.clear()
        return Observed(
            power,
            connected,
            dict(self.last_action),
            dict(self.last_create),
            frozenset(ops.busy),
            dict(ops.last_op),
        )

    async def run_once(self) -> list[Action]:
        ctx = self.ctx
        zones = await ctx.store.list_zones()
        vms = await ctx.store.list_system_vms(states=list(LIVE_STATES))
        settings = self.settings()
        now = ctx.clock()
        actions = plan(zones, vms, now, settings, await self.observe(vms))
        by_id = {v.id: v for v in vms}
        self.starting = any(v.state == VmState.STARTING for v in vms) or any(
            a.kind in (Kind.CREATE, Kind.START, Kind.RESTART) for a in actions
        )
        for a in actions:
            log.info("event=lifecycle_action kind=%s zone=%s role=%s vm=%s reason=%s",
                     a.kind.value, a.zone_id, a.role.value, a.vm_id or "-",
                     a.reason.replace(" ", "_"))  # fmt: skip
            try:
                await self.execute(a, by_id, settings)
            except (LifecycleError, DriverError) as e:
                log.error("event=lifecycle_action_failed kind=%s vm=%s error=%s",
                          a.kind.value, a.vm_id or "-", e)  # fmt: skip
        self.passes += 1
        return actions

    async def execute(
        self, a: Action, by_id: Mapping[str, SystemVm], settings: PlanSettings
    ) -> None:
        ctx = self.ctx
        now = ctx.clock()
        if a.kind is Kind.CREATE:
            self.last_create[(a.zone_id, a.role.value)] = now
            # like the console scaler: the zone's first cluster's hypervisor
            clusters = await ctx.store.list_clusters(a.zone_id)
            hv = clusters[0].hypervisor if clusters else settings.default_hypervisor
            if hv not in ctx.hypervisors:
                raise LifecycleError(f"zone {a.zone_id}: no driver for hypervisor {hv!r}")
            vm = await create_system_vm(ctx, a.zone_id, a.role, hv)
            self.last_action[vm.id] = now
            return
        assert a.vm_id is not None
        vm_id = a.vm_id
        async with vm_ops(ctx).op(vm_id):
            cur = await ctx.store.get_system_vm(vm_id)
            if cur is None or cur.state != by_id[vm_id].state:
                return  # changed since planning (an API operation): plan again next pass
            vm = cur
            if a.kind is Kind.MARK_RUNNING:
                await _record(ctx, vm, "START", "INFO", "agent connected: running",
                              state=VmState.RUNNING)  # fmt: skip
                return
            self.last_action[vm_id] = now
            if a.kind is Kind.RESTART:
                await _record(ctx, vm, "RESTART", "WARN", f"restarting: {a.reason}",
                              alert=a.alert)  # fmt: skip
                drv = _driver(ctx, vm)
                with contextlib.suppress(DriverError):
                    await drv.stop(vm.id, 0)  # dead or silent: no clean shutdown to wait for
                ctx.links.disconnect(vm.id, "vm restarting")
            await _start(ctx, vm.id)


def plan_settings(ctx: ManagerContext) -> PlanSettings:
    """Planner settings from the manager's settings (agent heartbeat x ping.timeout)."""
    hb = float(ctx.settings.get("sysvm.agent.heartbeat.interval"))
    factor = float(ctx.settings.get("ping.timeout"))
    scan = max(
        float(ctx.settings.get("consoleproxy.capacityscan.interval")),
        float(ctx.settings.get("secstorage.capacityscan.interval")),
    )
    return PlanSettings(agent_timeout=max(30.0, hb * factor * 3), restart_stopped_after=scan)
