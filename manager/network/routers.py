"""Router lifecycle glue: router VM records for networks, and start / stop / reboot /
destroy through a :class:`Launcher`.

The default launcher delegates to ``manager.hypervisor.lifecycle`` (``start_system_vm``,
``stop_system_vm``, ``reboot_system_vm``, ``destroy_system_vm``, each ``(ctx, vm_id)``);
for the ``External`` hypervisor (someone else boots the VM with its boot data) it does
nothing, and the router counts as started once its agent connects and applies its config.
A router's control address follows the lifecycle's rule
(``lifecycle.control_address(linklocal_cidr, seq)``) so both agree on it.

A router is ``Running`` only after its agent connected and acknowledged its config — not
when its process starts — so "restartNetwork cleanup=true" replaces the old router only
once the new one really serves.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import logging
from typing import Any, Protocol

from manager.api.responses import INTERNAL_ERROR, ApiError
from manager.network import ipam
from manager.network import store as ns
from manager.network.model import ISOLATED, Network, router_devices
from manager.network.runtime import RUNTIME, changed, wait_applied
from manager.store.base import Role, SystemVm, VmState

log = logging.getLogger("sysvm.network.routers")


class Launcher(Protocol):
    async def start(self, ctx: Any, vm: SystemVm) -> None: ...
    async def stop(self, ctx: Any, vm: SystemVm) -> None: ...
    async def reboot(self, ctx: Any, vm: SystemVm) -> None: ...
    async def destroy(self, ctx: Any, vm: SystemVm) -> None: ...


class HypervisorLauncher:
    """Delegates to ``manager.hypervisor.lifecycle`` if present; else nothing to do."""

    def _fn(self, name: str) -> Any:
        try:
            mod = importlib.import_module("manager.hypervisor.lifecycle")
        except ImportError:  # the hypervisor part is optional while the tree is assembled
            return None
        return getattr(mod, name, None)

    async def _call(self, name: str, ctx: Any, vm: SystemVm) -> None:
        fn = self._fn(name)
        if fn is None or vm.hypervisor == "External":
            log.info("event=router_external action=%s router=%s", name, vm.name)
            return
        try:
            await fn(ctx, vm.id)
        except ApiError:
            raise
        except Exception as e:  # LifecycleError, DriverError: the text is fit for the API
            log.warning("event=router_%s_failed router=%s error=%s", name, vm.name, e)
            raise ApiError(INTERNAL_ERROR, f"{name} of router {vm.name} failed: {e}") from e

    async def start(self, ctx: Any, vm: SystemVm) -> None:
        await self._call("start_system_vm", ctx, vm)

    async def stop(self, ctx: Any, vm: SystemVm) -> None:
        await self._call("stop_system_vm", ctx, vm)

    async def reboot(self, ctx: Any, vm: SystemVm) -> None:
        await self._call("reboot_system_vm", ctx, vm)

    async def destroy(self, ctx: Any, vm: SystemVm) -> None:
        await self._call("destroy_system_vm", ctx, vm)


LAUNCHER: list[Launcher] = [HypervisorLauncher()]  # tests may replace [0]


def control_address(linklocal_cidr: str, seq: int) -> str:
    """The router's control address: the lifecycle's rule when present (it re-records the
    address at every start), else the first free-by-seq address after the host's."""
    try:
        from manager.hypervisor.lifecycle import control_address as rule
    except ImportError:
        net = ipaddress.IPv4Network(linklocal_cidr, strict=False)
        return str(net.network_address + 2 + seq % (net.num_addresses - 3))
    return str(rule(linklocal_cidr, seq)[0].split("/")[0])


async def nic_plan(store: Any, router_id: str) -> list[dict[str, Any]]:
    """What a hypervisor must plug into a router, in device order (eth0, eth1, eth2):
    ``kind``, ``address`` (ADDR/PREFIX), ``gateway``, ``default_route``, ``network_id``.
    (The guest NIC belongs on a bridge of its own network, not a zone-wide one.)"""
    vm = await store.get_system_vm(router_id)
    if vm is None:
        raise LookupError(f"no router {router_id}")
    network_id = await ns.network_of_router(store, router_id)
    net = await ns.get_network(store, network_id) if network_id else None
    zone = next((z for z in await store.list_zones() if z.id == vm.zone_id), None)
    if net is None or zone is None:
        raise LookupError(f"router {vm.name} has no network or zone")
    public = ipaddress.IPv4Network(zone.public_cidr, strict=False)
    control = ipaddress.IPv4Network(zone.linklocal_cidr, strict=False)
    guest = ipaddress.IPv4Network(net.cidr)
    control_nic = {
        "kind": "control",
        "address": f"{vm.linklocal_ip}/{control.prefixlen}",
        "gateway": None,
        "default_route": False,
        "network_id": None,
    }
    if net.guest_type != ISOLATED:
        # Shared: no public NIC; the router holds its own address and the network's gateway
        # is upstream, carrying the router's default route (its DNS forwarding goes there).
        own = net.router_ip or net.gateway
        upstream = net.gateway if own != net.gateway else None
        return [
            control_nic,
            {
                "kind": "guest",
                "address": f"{own}/{guest.prefixlen}",
                "gateway": upstream,
                "default_route": upstream is not None,
                "network_id": net.id,
            },
        ]
    return [
        control_nic,
        {"kind": "public", "address": f"{vm.public_ip}/{public.prefixlen}",
         "gateway": ipam.public_gateway(zone.public_cidr), "default_route": True,
         "network_id": None},
        {"kind": "guest", "address": f"{net.gateway}/{guest.prefixlen}", "gateway": None,
         "default_route": False, "network_id": net.id},
    ]  # fmt: skip


def launcher() -> Launcher:
    return LAUNCHER[0]


async def _hypervisor(tx: Any, zone_id: str) -> tuple[str, str | None, str | None]:
    """(hypervisor, pod id, host id) for a new router in the zone."""
    hosts = await tx.fetchall(
        "SELECT id, pod_id, hypervisor FROM hosts WHERE zone_id = ? ORDER BY created", (zone_id,)
    )
    hv = RUNTIME.hypervisor or (hosts[0]["hypervisor"] if hosts else "Embedded")
    if hosts:
        return hv, hosts[0]["pod_id"], hosts[0]["id"]
    return hv, None, None


async def create_router(tx: Any, network: Network, source_nat: str | None, now: float) -> SystemVm:
    """A router record for ``network`` (state Starting), its control address, attached to
    the network. The caller then calls :func:`manager.network.runtime.changed`."""
    hv, pod_id, host_id = await _hypervisor(tx, network.zone_id)
    zone = await tx.fetchall("SELECT linklocal_cidr FROM zones WHERE id = ?", (network.zone_id,))
    if not zone:
        raise ApiError(INTERNAL_ERROR, f"zone {network.zone_id} is gone")
    vm: SystemVm = await tx.create_system_vm(
        role=Role.ROUTER,
        zone_id=network.zone_id,
        hypervisor=hv,
        pod_id=pod_id,
        host_id=host_id,
        details={
            "network_id": network.id,
            "nics": router_devices(network.guest_type),
            "service_offering_id": network.service_offering_id,
        },
    )
    control_ip = control_address(zone[0]["linklocal_cidr"], vm.seq)
    await tx.update_system_vm(
        vm.id,
        linklocal_ip=control_ip,
        public_ip=source_nat,
        private_ip=network.router_ip or network.gateway,
    )
    await ns.attach_router(tx, vm.id, network.id, now)
    log.info("event=router_created router=%s network=%s", vm.name, network.id)
    return vm


async def set_state(ctx: Any, vm_id: str, state: VmState) -> bool:
    """Sets the state unless the router was destroyed meanwhile (never resurrects one)."""
    async with ctx.store.transaction() as tx:
        rows = await tx.fetchall("SELECT state FROM system_vms WHERE id = ?", (vm_id,))
        if not rows or rows[0]["state"] in (VmState.DESTROYED.value, VmState.EXPUNGING.value):
            return False
        await tx.update_system_vm(vm_id, state=state)
    return True


async def _vm(ctx: Any, vm_id: str) -> SystemVm:
    vm: SystemVm | None = await ctx.store.get_system_vm(vm_id)
    if vm is None:
        raise ApiError(INTERNAL_ERROR, f"router {vm_id} is gone")
    return vm


async def boot(ctx: Any, vm_id: str) -> SystemVm:
    """Starts the router and waits until its agent connected and applied its config."""
    vm = await _vm(ctx, vm_id)
    await set_state(ctx, vm_id, VmState.STARTING)
    try:
        await _drop_old_session(vm)
        await launcher().start(ctx, vm)
        await wait_applied(
            ctx.store,
            {vm_id: max(vm.desired_version, 1)},
            timeout=RUNTIME.boot_timeout,
            require_connected=True,
        )
    except ApiError as e:
        # Left Starting, not Error: Error is not a live state, and the agent link would
        # revoke the router's certificate. restartNetwork retries; cleanup=true replaces.
        log.warning("event=router_start_failed router=%s error=%s", vm.name, e.text)
        raise ApiError(e.errorcode, f"router {vm.name} did not start: {e.text}") from None
    if not await set_state(ctx, vm_id, VmState.RUNNING):
        raise ApiError(INTERNAL_ERROR, f"router {vm.name} was destroyed while starting")
    log.info("event=router_running router=%s", vm.name)
    return await _vm(ctx, vm_id)


async def _drop_old_session(vm: SystemVm, within: float = 10.0) -> None:
    """A router being started must not be judged by a session left from its previous
    boot (its acks are of that boot): such a session is closed, and gone, first."""
    links = RUNTIME.links
    if links is None or not links.is_connected(vm.id):
        return
    if not await links.disconnect_and_wait(vm.id, "vm starting", within):
        raise ApiError(
            INTERNAL_ERROR, f"the agent session of {vm.name}'s previous boot did not close"
        )


async def stop(ctx: Any, vm_id: str) -> SystemVm:
    vm = await _vm(ctx, vm_id)
    await set_state(ctx, vm_id, VmState.STOPPING)
    try:
        await launcher().stop(ctx, vm)
    except ApiError:
        await set_state(ctx, vm_id, vm.state)
        raise
    links = RUNTIME.links
    if links is not None:
        links.disconnect(vm_id, "router stopped")
    await set_state(ctx, vm_id, VmState.STOPPED)
    log.info("event=router_stopped router=%s", vm.name)
    return await _vm(ctx, vm_id)


async def reboot(ctx: Any, vm_id: str) -> SystemVm:
    vm = await _vm(ctx, vm_id)
    await launcher().reboot(ctx, vm)
    # The agent re-applies its persisted config at boot and reconnects; wait for that (the
    # old session was closed by the stop half of the reboot).
    await wait_applied(
        ctx.store,
        {vm_id: vm.desired_version},
        timeout=RUNTIME.boot_timeout,
        require_connected=vm.hypervisor != "External",
    )
    await set_state(ctx, vm_id, VmState.RUNNING)
    return await _vm(ctx, vm_id)


async def destroy(ctx: Any, vm_id: str) -> None:
    vm = await _vm(ctx, vm_id)
    await launcher().destroy(ctx, vm)
    async with ctx.store.transaction() as tx:
        await tx.update_system_vm(vm_id, state=VmState.DESTROYED, public_ip=None)
        tx.on_commit(lambda: RUNTIME.configs.pop(vm_id, None))
    links = RUNTIME.links
    revoke = getattr(links, "revoke", None)
    if revoke is not None:
        await revoke(vm_id, "router destroyed")
    log.info("event=router_destroyed router=%s", vm.name)


async def replace(ctx: Any, network_id: str) -> SystemVm:
    """Rolling replacement: a new router is created, started and configured; only then
    are the old ones destroyed. If the new one fails, it goes and the old ones stay."""
    async with ctx.store.transaction() as tx:
        network = await ns.get_network(tx, network_id)
        if network is None:
            raise ApiError(INTERNAL_ERROR, f"network {network_id} is gone")
        old = await ns.router_ids(tx, network_id)
        snat = next(
            (
                p.address
                for p in await ns.list_public_ips(tx, network_id=network_id)
                if p.is_source_nat
            ),
            None,
        )
        new = await create_router(tx, network, snat, ctx.clock())
        await changed(tx, network_id, only=[new.id])
    try:
        await boot(ctx, new.id)
    except ApiError:
        await destroy(ctx, new.id)
        raise
    for rid in old:
        try:  # a planned stop lets the old router report its last traffic counters
            await stop(ctx, rid)
        except ApiError as e:
            log.warning("event=router_stop_failed router=%s error=%s", rid, e.text)
        await destroy(ctx, rid)
    if old:
        await announce(ctx, new.id, network_id)
    log.info(
        "event=network_routers_replaced network=%s new=%s old=%d", network_id, new.name, len(old)
    )
    return await _vm(ctx, new.id)


async def announce(ctx: Any, router_id: str, network_id: str) -> None:
    """Makes the router announce its guest and public addresses (gratuitous ARP), through
    its desired config: after a replacement the old router held the same addresses, and
    guests and the upstream would keep sending to its MAC until their ARP entries expire.
    Best effort: a router that does not acknowledge in time keeps serving all the same."""
    async with ctx.store.transaction() as tx:
        rows = await tx.fetchall("SELECT details FROM system_vms WHERE id = ?", (router_id,))
        if not rows:
            return
        raw = rows[0]["details"]
        loaded = json.loads(raw or "{}") if isinstance(raw, str) else raw
        details = dict(loaded) if isinstance(loaded, dict) else {}
        details["announce"] = int(details.get("announce") or 0) + 1
        await tx.update_system_vm(router_id, details=details)
        versions = await changed(tx, network_id, only=[router_id])
    try:
        await wait_applied(ctx.store, versions)
    except ApiError as e:
        log.warning("event=router_announce_failed router=%s error=%s", router_id, e.text)
