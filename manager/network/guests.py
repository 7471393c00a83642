"""Guest VM NICs on guest networks — what deployVirtualMachine / destroyVirtualMachine
call, inside their own transaction::

    async with ctx.store.transaction() as tx:
        ip = await add_guest_nic(tx, network_id, vm.id, vm.name, userdata=b64)
    ...
    async with ctx.store.transaction() as tx:
        await remove_guest_nic(tx, network_id, vm.id)   # or remove_vm_nics(tx, vm.id)

Each call re-renders the network's routers (DHCP reservation, DNS name, userdata and
meta-data) and pushes after commit. Bad input raises :class:`NetError` (a 431 for the API).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from manager.network import ipam
from manager.network import store as ns
from manager.network.model import GuestNic
from manager.network.runtime import changed
from manager.network.validate import NetError, guest_ip_in, hostname

MAX_USERDATA = 32 * 1024  # decoded bytes (CloudStack's vm.userdata.max.length default)


def check_userdata(value: str | None) -> str:
    """Base64 text as CloudStack takes it; decoded size bounded. ``""`` = none."""
    if not value:
        return ""
    text = value.strip()
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise NetError("userdata must be base64-encoded") from None
    if len(data) > MAX_USERDATA:
        raise NetError(f"userdata is {len(data)} bytes decoded, at most {MAX_USERDATA}")
    return base64.b64encode(data).decode()


async def add_guest_nic(
    tx: Any,
    network_id: str,
    vm_id: str,
    name: str,
    mac: str | None = None,
    *,
    ip: str | None = None,
    userdata: str | None = None,
    now: float | None = None,
) -> str:
    """Gives guest VM ``vm_id`` a NIC on the network; returns its IP (``ip`` if asked for
    and free, else the first free address of the network's range)."""
    import time

    network = await ns.get_network(tx, network_id)
    if network is None:
        raise NetError(f"network {network_id} does not exist")
    existing = await ns.list_nics(tx, network_id=network_id)
    if any(n.vm_id == vm_id for n in existing):
        raise NetError(f"virtual machine {vm_id} already has a NIC on network {network.name}")
    mac_addr = ipam.normalise_mac(mac) if mac else ipam.stable_mac(network_id, vm_id)
    if any(n.mac == mac_addr for n in existing):
        raise NetError(f"MAC address {mac_addr} is already used on network {network.name}")
    used = {n.ip for n in existing} | {
        p.static_nat_ip
        for p in await ns.list_public_ips(tx, network_id=network_id)
        if p.static_nat_ip
    }
    if network.router_ip:  # a Shared network's router holds this one
        used.add(network.router_ip)
    if ip is not None:
        addr = guest_ip_in(network.cidr, ip, "ipaddress")
        if addr == network.gateway or addr in used:
            raise NetError(f"IP address {addr} is already in use on network {network.name}")
        if not (ipam_int(network.start_ip) <= ipam_int(addr) <= ipam_int(network.end_ip)):
            raise NetError(
                f"IP address {addr} is outside the range {network.start_ip}-{network.end_ip}"
            )
    else:
        addr = ipam.allocate_guest(network.start_ip, network.end_ip, network.gateway, used)
    nic = GuestNic(
        id=ns.new_id(),
        network_id=network_id,
        vm_id=vm_id,
        name=hostname(name, f"vm-{vm_id[:8]}"),
        mac=mac_addr,
        ip=addr,
        userdata=check_userdata(userdata),
        created=time.time() if now is None else now,
    )
    await ns.add_nic(tx, nic)
    await changed(tx, network_id)
    return addr


def ipam_int(addr: str) -> int:
    import ipaddress

    return int(ipaddress.IPv4Address(addr))


async def _in_use(tx: Any, network_id: str, vm_id: str) -> str | None:
    rules = await tx.fetchall(
        "SELECT id FROM port_forwarding_rules WHERE network_id = ? AND vm_id = ? "
        "UNION ALL SELECT rule_id FROM lb_members m JOIN lb_rules r ON r.id = m.rule_id "
        "WHERE r.network_id = ? AND m.vm_id = ? "
        "UNION ALL SELECT id FROM public_ips WHERE network_id = ? AND static_nat_vm_id = ?",
        (network_id, vm_id, network_id, vm_id, network_id, vm_id),
    )
    return rules[0]["id"] if rules else None


async def remove_guest_nic(tx: Any, network_id: str, vm_id: str, *, force: bool = False) -> bool:
    """Removes the VM's NIC from the network. Refused while a port forwarding rule, load
    balancer or static NAT points at the VM, unless ``force`` (then those go too)."""
    ref = await _in_use(tx, network_id, vm_id)
    if ref is not None and not force:
        raise NetError(
            f"virtual machine {vm_id} is still used by rule or IP {ref}; remove it first"
        )
    if force:
        await tx.execute(
            "DELETE FROM port_forwarding_rules WHERE network_id = ? AND vm_id = ?",
            (network_id, vm_id),
        )
        await tx.execute(
            "DELETE FROM lb_members WHERE vm_id = ? AND rule_id IN "
            "(SELECT id FROM lb_rules WHERE network_id = ?)",
            (vm_id, network_id),
        )
        await tx.execute(
            "UPDATE public_ips SET static_nat_vm_id = NULL, static_nat_ip = NULL "
            "WHERE network_id = ? AND static_nat_vm_id = ?",
            (network_id, vm_id),
        )
    n = await tx.execute(
        "DELETE FROM guest_nics WHERE network_id = ? AND vm_id = ?", (network_id, vm_id)
    )
    if n:
        await changed(tx, network_id)
    return bool(n)


async def remove_vm_nics(tx: Any, vm_id: str) -> int:
    """destroyVirtualMachine: the VM leaves every network, and its rules with it."""
    nics = await ns.list_nics(tx, vm_id=vm_id)
    for n in nics:
        await remove_guest_nic(tx, n.network_id, vm_id, force=True)
    return len(nics)


async def set_userdata(tx: Any, vm_id: str, userdata: str | None) -> int:
    """updateVirtualMachine userdata=...: stored on each of the VM's NICs."""
    data = check_userdata(userdata)
    nics = await ns.list_nics(tx, vm_id=vm_id)
    await tx.execute("UPDATE guest_nics SET userdata = ? WHERE vm_id = ?", (data, vm_id))
    for network_id in sorted({n.network_id for n in nics}):
        await changed(tx, network_id)
    return len(nics)
