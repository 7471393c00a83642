"""Persistence of the network model (tables of ``manager/sql/100_network.sql``).

Reads take any :class:`Reader` (the main store for committed data, or a transaction to see
its own writes); writes take a :class:`Writer` — the main store's ``Tx`` — so a rule change
and the routers' ``bump_desired`` commit together.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from manager.network.model import (
    FirewallRule,
    GuestNic,
    LbRule,
    Network,
    NetworkOffering,
    NetworkState,
    PortForwardingRule,
    PublicIp,
    RouterOffering,
)


class Reader(Protocol):
    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...


class Writer(Reader, Protocol):
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...


def new_id() -> str:
    return str(uuid.uuid4())


# --- rows → records ----------------------------------------------------------------


def _offering(r: Mapping[str, Any]) -> NetworkOffering:
    return NetworkOffering(
        id=r["id"],
        name=r["name"],
        display_text=r["display_text"],
        guest_ip_type=r["guest_ip_type"],
        services=tuple(json.loads(r["services"])),
        egress_default_allow=bool(r["egress_default_allow"]),
        specify_ip_ranges=bool(r["specify_ip_ranges"]),
        is_default=bool(r["is_default"]),
        state=r["state"],
        created=r["created"],
        service_offering_id=r.get("service_offering_id"),
    )


def _router_offering(r: Mapping[str, Any]) -> RouterOffering:
    return RouterOffering(
        id=r["id"],
        name=r["name"],
        display_text=r["display_text"],
        cpu_number=r["cpu_number"],
        cpu_speed=r["cpu_speed"],
        memory_mb=r["memory_mb"],
        is_default=bool(r["is_default"]),
        created=r["created"],
    )


def _network(r: Mapping[str, Any]) -> Network:
    return Network(**{k: r[k] for k in Network.__dataclass_fields__})


def _public_ip(r: Mapping[str, Any]) -> PublicIp:
    return PublicIp(
        id=r["id"],
        zone_id=r["zone_id"],
        address=r["address"],
        network_id=r["network_id"],
        is_source_nat=bool(r["is_source_nat"]),
        static_nat_vm_id=r["static_nat_vm_id"],
        static_nat_ip=r["static_nat_ip"],
        account_id=r["account_id"],
        allocated=r["allocated"],
    )


def _firewall(r: Mapping[str, Any]) -> FirewallRule:
    return FirewallRule(
        id=r["id"],
        network_id=r["network_id"],
        traffic_type=r["traffic_type"],
        public_ip_id=r["public_ip_id"],
        protocol=r["protocol"],
        start_port=r["start_port"],
        end_port=r["end_port"],
        icmp_type=r["icmp_type"],
        icmp_code=r["icmp_code"],
        cidrs=tuple(json.loads(r["cidrs"])),
        account_id=r["account_id"],
        created=r["created"],
        related_rule_id=r["related_rule_id"],
    )


def _forward(r: Mapping[str, Any]) -> PortForwardingRule:
    return PortForwardingRule(
        **{k: r[k] for k in PortForwardingRule.__dataclass_fields__ if k != "cidrs"},
        cidrs=tuple(json.loads(r["cidrs"])),
    )


def _nic(r: Mapping[str, Any]) -> GuestNic:
    return GuestNic(**{k: r[k] for k in GuestNic.__dataclass_fields__})


# --- offerings -----------------------------------------------------------------------


async def list_offerings(q: Reader) -> list[NetworkOffering]:
    rows = await q.fetchall("SELECT * FROM network_offerings ORDER BY created, name")
    return [_offering(r) for r in rows]


async def get_offering(q: Reader, offering_id: str) -> NetworkOffering | None:
    rows = await q.fetchall("SELECT * FROM network_offerings WHERE id = ?", (offering_id,))
    return _offering(rows[0]) if rows else None


async def add_offering(tx: Writer, o: NetworkOffering) -> None:
    await tx.execute(
        "INSERT INTO network_offerings (id, name, display_text, guest_ip_type, services, "
        "egress_default_allow, specify_ip_ranges, is_default, state, created, "
        "service_offering_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            o.id,
            o.name,
            o.display_text,
            o.guest_ip_type,
            json.dumps(list(o.services)),
            int(o.egress_default_allow),
            int(o.specify_ip_ranges),
            int(o.is_default),
            o.state,
            o.created,
            o.service_offering_id,
        ),
    )


async def services_in_use(q: Reader, network_id: str) -> dict[str, int]:
    """Service → how many rules, addresses or NICs of the network use it (what an offering
    change must not drop)."""
    counts = await q.fetchall(
        "SELECT 'Firewall' AS s, COUNT(*) AS n FROM firewall_rules WHERE network_id = ? "
        "UNION ALL SELECT 'PortForwarding', COUNT(*) FROM port_forwarding_rules "
        "WHERE network_id = ? "
        "UNION ALL SELECT 'Lb', COUNT(*) FROM lb_rules WHERE network_id = ? "
        "UNION ALL SELECT 'StaticNat', COUNT(*) FROM public_ips "
        "WHERE network_id = ? AND static_nat_vm_id IS NOT NULL "
        "UNION ALL SELECT 'SourceNat', COUNT(*) FROM public_ips "
        "WHERE network_id = ? AND is_source_nat = 1 "
        "UNION ALL SELECT 'Dhcp', COUNT(*) FROM guest_nics WHERE network_id = ? "
        "UNION ALL SELECT 'UserData', COUNT(*) FROM guest_nics "
        "WHERE network_id = ? AND userdata != ''",
        (network_id,) * 7,
    )
    return {r["s"]: int(r["n"]) for r in counts if r["n"]}


async def set_network_offering(
    tx: Writer, network_id: str, offering_id: str, service_offering_id: str | None
) -> None:
    await tx.execute(
        "UPDATE networks SET offering_id = ?, service_offering_id = ? WHERE id = ?",
        (offering_id, service_offering_id, network_id),
    )


async def list_router_offerings(q: Reader) -> list[RouterOffering]:
    rows = await q.fetchall("SELECT * FROM router_service_offerings ORDER BY created, name")
    return [_router_offering(r) for r in rows]


async def add_router_offering(tx: Writer, o: RouterOffering) -> None:
    await tx.execute(
        "INSERT INTO router_service_offerings (id, name, display_text, cpu_number, cpu_speed, "
        "memory_mb, is_default, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            o.id,
            o.name,
            o.display_text,
            o.cpu_number,
            o.cpu_speed,
            o.memory_mb,
            int(o.is_default),
            o.created,
        ),
    )


# --- networks ------------------------------------------------------------------------


async def list_networks(q: Reader, zone_id: str | None = None) -> list[Network]:
    sql = "SELECT * FROM networks WHERE state != 'Destroy'"
    params: list[Any] = []
    if zone_id is not None:
        sql += " AND zone_id = ?"
        params.append(zone_id)
    rows = await q.fetchall(sql + " ORDER BY created, id", params)
    return [_network(r) for r in rows]


async def get_network(q: Reader, network_id: str) -> Network | None:
    rows = await q.fetchall(
        "SELECT * FROM networks WHERE id = ? AND state != 'Destroy'", (network_id,)
    )
    return _network(rows[0]) if rows else None


async def add_network(tx: Writer, n: Network) -> None:
    fields = list(Network.__dataclass_fields__)
    await tx.execute(
        f"INSERT INTO networks ({', '.join(fields)}) VALUES ({', '.join('?' for _ in fields)})",  # noqa: S608 - field names are ours
        [getattr(n, f) for f in fields],
    )


async def set_network_state(tx: Writer, network_id: str, state: str) -> None:
    await tx.execute("UPDATE networks SET state = ? WHERE id = ?", (state, network_id))


# --- routers of a network --------------------------------------------------------------


async def router_ids(q: Reader, network_id: str) -> list[str]:
    """Routers of the network that are not destroyed, oldest first."""
    rows = await q.fetchall(
        "SELECT nr.router_id FROM network_routers nr JOIN system_vms v ON v.id = nr.router_id "
        "WHERE nr.network_id = ? AND v.state NOT IN ('Destroyed', 'Expunging') "
        "ORDER BY nr.created, v.seq",
        (network_id,),
    )
    return [r["router_id"] for r in rows]


async def network_of_router(q: Reader, router_id: str) -> str | None:
    rows = await q.fetchall(
        "SELECT network_id FROM network_routers WHERE router_id = ?", (router_id,)
    )
    return rows[0]["network_id"] if rows else None


async def router_networks(q: Reader) -> dict[str, str]:
    """router id → network id, for every router ever attached."""
    rows = await q.fetchall("SELECT router_id, network_id FROM network_routers")
    return {r["router_id"]: r["network_id"] for r in rows}


async def attach_router(tx: Writer, router_id: str, network_id: str, now: float) -> None:
    await tx.execute(
        "INSERT INTO network_routers (router_id, network_id, created) VALUES (?, ?, ?)",
        (router_id, network_id, now),
    )


# --- public IPs ---------------------------------------------------------------------


async def list_public_ips(
    q: Reader, *, zone_id: str | None = None, network_id: str | None = None
) -> list[PublicIp]:
    sql = "SELECT * FROM public_ips WHERE 1=1"
    params: list[Any] = []
    if zone_id is not None:
        sql += " AND zone_id = ?"
        params.append(zone_id)
    if network_id is not None:
        sql += " AND network_id = ?"
        params.append(network_id)
    rows = await q.fetchall(sql + " ORDER BY allocated, address", params)
    return [_public_ip(r) for r in rows]


async def get_public_ip(q: Reader, ip_id: str) -> PublicIp | None:
    rows = await q.fetchall("SELECT * FROM public_ips WHERE id = ?", (ip_id,))
    return _public_ip(rows[0]) if rows else None


async def used_public_addresses(q: Reader, zone_id: str) -> set[str]:
    """Addresses taken in the zone's public range: ours and system VMs' public IPs."""
    rows = await q.fetchall("SELECT address FROM public_ips WHERE zone_id = ?", (zone_id,))
    vms = await q.fetchall(
        "SELECT public_ip FROM system_vms WHERE zone_id = ? AND public_ip IS NOT NULL "
        "AND state NOT IN ('Destroyed', 'Expunging')",
        (zone_id,),
    )
    return {r["address"] for r in rows} | {r["public_ip"] for r in vms}


async def add_public_ip(tx: Writer, p: PublicIp) -> None:
    await tx.execute(
        "INSERT INTO public_ips (id, zone_id, address, network_id, is_source_nat, "
        "static_nat_vm_id, static_nat_ip, account_id, allocated) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            p.id,
            p.zone_id,
            p.address,
            p.network_id,
            int(p.is_source_nat),
            p.static_nat_vm_id,
            p.static_nat_ip,
            p.account_id,
            p.allocated,
        ),
    )


async def set_static_nat(tx: Writer, ip_id: str, vm_id: str | None, vm_ip: str | None) -> None:
    await tx.execute(
        "UPDATE public_ips SET static_nat_vm_id = ?, static_nat_ip = ? WHERE id = ?",
        (vm_id, vm_ip, ip_id),
    )


async def delete_public_ip(tx: Writer, ip_id: str) -> None:
    await tx.execute("DELETE FROM public_ips WHERE id = ?", (ip_id,))


# --- rules ---------------------------------------------------------------------------


async def list_firewall(
    q: Reader,
    *,
    network_id: str | None = None,
    traffic_type: str | None = None,
    rule_id: str | None = None,
) -> list[FirewallRule]:
    sql = "SELECT * FROM firewall_rules WHERE 1=1"
    params: list[Any] = []
    if rule_id is not None:
        sql += " AND id = ?"
        params.append(rule_id)
    if network_id is not None:
        sql += " AND network_id = ?"
        params.append(network_id)
    if traffic_type is not None:
        sql += " AND traffic_type = ?"
        params.append(traffic_type)
    rows = await q.fetchall(sql + " ORDER BY created, id", params)
    return [_firewall(r) for r in rows]


async def add_firewall(tx: Writer, r: FirewallRule) -> None:
    await tx.execute(
        "INSERT INTO firewall_rules (id, network_id, traffic_type, public_ip_id, protocol, "
        "start_port, end_port, icmp_type, icmp_code, cidrs, account_id, created, "
        "related_rule_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            r.id,
            r.network_id,
            r.traffic_type,
            r.public_ip_id,
            r.protocol,
            r.start_port,
            r.end_port,
            r.icmp_type,
            r.icmp_code,
            json.dumps(list(r.cidrs)),
            r.account_id,
            r.created,
            r.related_rule_id,
        ),
    )


async def list_forwards(
    q: Reader, *, network_id: str | None = None, public_ip_id: str | None = None
) -> list[PortForwardingRule]:
    sql = "SELECT * FROM port_forwarding_rules WHERE 1=1"
    params: list[Any] = []
    if network_id is not None:
        sql += " AND network_id = ?"
        params.append(network_id)
    if public_ip_id is not None:
        sql += " AND public_ip_id = ?"
        params.append(public_ip_id)
    rows = await q.fetchall(sql + " ORDER BY created, id", params)
    return [_forward(r) for r in rows]


async def add_forward(tx: Writer, f: PortForwardingRule) -> None:
    await tx.execute(
        "INSERT INTO port_forwarding_rules (id, network_id, public_ip_id, protocol, "
        "public_start, public_end, private_start, private_end, vm_id, vm_ip, cidrs, "
        "account_id, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            f.id,
            f.network_id,
            f.public_ip_id,
            f.protocol,
            f.public_start,
            f.public_end,
            f.private_start,
            f.private_end,
            f.vm_id,
            f.vm_ip,
            json.dumps(list(f.cidrs)),
            f.account_id,
            f.created,
        ),
    )


async def list_lbs(
    q: Reader,
    *,
    network_id: str | None = None,
    public_ip_id: str | None = None,
    rule_id: str | None = None,
) -> list[LbRule]:
    sql = "SELECT * FROM lb_rules WHERE 1=1"
    params: list[Any] = []
    if rule_id is not None:
        sql += " AND id = ?"
        params.append(rule_id)
    if network_id is not None:
        sql += " AND network_id = ?"
        params.append(network_id)
    if public_ip_id is not None:
        sql += " AND public_ip_id = ?"
        params.append(public_ip_id)
    rows = await q.fetchall(sql + " ORDER BY created, id", params)
    if not rows:
        return []
    ids = [r["id"] for r in rows]
    members: dict[str, list[tuple[str, str]]] = {}
    for chunk in range(0, len(ids), 500):
        part = ids[chunk : chunk + 500]
        for m in await q.fetchall(
            "SELECT rule_id, vm_id, vm_ip FROM lb_members "  # noqa: S608 - placeholders only
            f"WHERE rule_id IN ({', '.join('?' for _ in part)})",
            part,
        ):
            members.setdefault(m["rule_id"], []).append((m["vm_id"], m["vm_ip"]))
    return [
        LbRule(
            **{k: r[k] for k in LbRule.__dataclass_fields__ if k not in ("cidrs", "members")},
            cidrs=tuple(json.loads(r["cidrs"])),
            members=tuple(sorted(members.get(r["id"], []))),
        )
        for r in rows
    ]


async def add_lb(tx: Writer, lb: LbRule) -> None:
    await tx.execute(
        "INSERT INTO lb_rules (id, network_id, public_ip_id, name, description, algorithm, "
        "public_port, private_port, protocol, cidrs, account_id, created) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            lb.id,
            lb.network_id,
            lb.public_ip_id,
            lb.name,
            lb.description,
            lb.algorithm,
            lb.public_port,
            lb.private_port,
            lb.protocol,
            json.dumps(list(lb.cidrs)),
            lb.account_id,
            lb.created,
        ),
    )


async def add_lb_member(tx: Writer, rule_id: str, vm_id: str, vm_ip: str) -> None:
    await tx.execute(
        "INSERT OR IGNORE INTO lb_members (rule_id, vm_id, vm_ip) VALUES (?, ?, ?)",
        (rule_id, vm_id, vm_ip),
    )


async def remove_lb_member(tx: Writer, rule_id: str, vm_id: str) -> int:
    return await tx.execute(
        "DELETE FROM lb_members WHERE rule_id = ? AND vm_id = ?", (rule_id, vm_id)
    )


async def find_rule(q: Reader, rule_id: str) -> tuple[str, str] | None:
    """(table, network id) of a rule of any kind."""
    for table in ("firewall_rules", "port_forwarding_rules", "lb_rules"):
        rows = await q.fetchall(
            f"SELECT network_id FROM {table} WHERE id = ?",  # noqa: S608 - fixed table names
            (rule_id,),
        )
        if rows:
            return table, rows[0]["network_id"]
    return None


async def delete_rule(tx: Writer, table: str, rule_id: str) -> int:
    """Deletes a rule and the firewall rules it opened (openfirewall)."""
    if table not in ("firewall_rules", "port_forwarding_rules", "lb_rules"):
        raise ValueError(f"not a rule table: {table}")
    await tx.execute("DELETE FROM firewall_rules WHERE related_rule_id = ?", (rule_id,))
    return await tx.execute(f"DELETE FROM {table} WHERE id = ?", (rule_id,))  # noqa: S608


# --- guest NICs ----------------------------------------------------------------------


async def list_nics(
    q: Reader, *, network_id: str | None = None, vm_id: str | None = None
) -> list[GuestNic]:
    sql = "SELECT * FROM guest_nics WHERE 1=1"
    params: list[Any] = []
    if network_id is not None:
        sql += " AND network_id = ?"
        params.append(network_id)
    if vm_id is not None:
        sql += " AND vm_id = ?"
        params.append(vm_id)
    rows = await q.fetchall(sql + " ORDER BY created, id", params)
    return [_nic(r) for r in rows]


async def add_nic(tx: Writer, n: GuestNic) -> None:
    fields = list(GuestNic.__dataclass_fields__)
    await tx.execute(
        f"INSERT INTO guest_nics ({', '.join(fields)}) VALUES ({', '.join('?' for _ in fields)})",  # noqa: S608 - field names are ours
        [getattr(n, f) for f in fields],
    )


# --- the whole state of a network ------------------------------------------------------


async def load_state(q: Reader, network_id: str) -> NetworkState | None:
    from manager.network.ipam import public_gateway

    net = await get_network(q, network_id)
    if net is None:
        return None
    offering = await get_offering(q, net.offering_id)
    if offering is None:
        raise LookupError(f"network {network_id} has no offering {net.offering_id}")
    zone = await q.fetchall("SELECT public_cidr FROM zones WHERE id = ?", (net.zone_id,))
    public_cidr = zone[0]["public_cidr"] if zone else "0.0.0.0/32"
    return NetworkState(
        network=net,
        offering=offering,
        public_cidr=public_cidr,
        public_gateway=public_gateway(public_cidr) if zone else None,
        public_ips=tuple(await list_public_ips(q, network_id=network_id)),
        firewall=tuple(await list_firewall(q, network_id=network_id)),
        port_forwarding=tuple(await list_forwards(q, network_id=network_id)),
        load_balancers=tuple(await list_lbs(q, network_id=network_id)),
        nics=tuple(await list_nics(q, network_id=network_id)),
    )


async def traffic(q: Reader, network_id: str) -> dict[str, tuple[int, int]]:
    """public IP → (bytes received, bytes sent) counted for the network."""
    rows = await q.fetchall(
        "SELECT public_ip, bytes_received, bytes_sent FROM network_traffic WHERE network_id = ?",
        (network_id,),
    )
    return {r["public_ip"]: (r["bytes_received"], r["bytes_sent"]) for r in rows}


# --- system VMs' public IPs ----------------------------------------------------------


async def allocate_system_public_ip(tx: Any, zone: Any, vm_id: str) -> str:
    """A public address of ``zone``'s range for a system VM (CPVM/SSVM), from the pool
    routers and associateIpAddress take from (:func:`used_public_addresses`: the
    ``public_ips`` rows and live system VMs' ``public_ip``), recorded in this transaction as
    the VM's ``public_ip`` (the VM owns it). A VM that already holds an address of the range
    keeps it; destroying the VM releases it (Destroyed VMs' addresses are not counted)."""
    from manager.network.ipam import allocate_public, host_range

    rows = await tx.fetchall("SELECT public_ip FROM system_vms WHERE id = ?", (vm_id,))
    if not rows:
        raise LookupError(f"no system vm {vm_id}")
    current = rows[0]["public_ip"]
    start, end = host_range(zone.public_cidr, skip_first=1)
    if current and _ip_int(start) <= _ip_int(current) <= _ip_int(end):
        return str(current)
    addr = allocate_public(zone.public_cidr, await used_public_addresses(tx, zone.id))
    await tx.update_system_vm(vm_id, public_ip=addr)
    return addr


def _ip_int(addr: str) -> int:
    import ipaddress

    return int(ipaddress.IPv4Address(addr))
