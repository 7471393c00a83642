"""IP address allocation (pure): the first free address of a range, stable MACs."""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Collection

from manager.network.validate import NetError


def first_free(start: str, end: str, used: Collection[str], exclude: Collection[str] = ()) -> str:
    """The lowest address in ``start..end`` (inclusive) that is neither used nor excluded.
    Raises :class:`NetError` when the range is exhausted. Cost: O(addresses skipped)."""
    lo = int(ipaddress.IPv4Address(start))
    hi = int(ipaddress.IPv4Address(end))
    taken = {int(ipaddress.IPv4Address(a)) for a in (*used, *exclude)}
    for n in range(lo, hi + 1):
        if n not in taken:
            return str(ipaddress.IPv4Address(n))
    raise NetError(f"no free IP address left in {start}-{end}")


def host_range(cidr: str, skip_first: int = 0) -> tuple[str, str]:
    """First and last usable host of ``cidr``, after skipping ``skip_first`` hosts."""
    net = ipaddress.IPv4Network(cidr, strict=False)
    first = int(net.network_address) + 1 + skip_first
    last = int(net.broadcast_address) - 1
    if first > last:
        raise NetError(f"{cidr} has no usable host addresses")
    return str(ipaddress.IPv4Address(first)), str(ipaddress.IPv4Address(last))


def public_gateway(public_cidr: str) -> str:
    """The zone's public gateway: its first host (the convention of manager.bootstrap)."""
    return host_range(public_cidr)[0]


def allocate_public(public_cidr: str, used: Collection[str]) -> str:
    """A free public address: any host of the zone's public range but its gateway."""
    start, end = host_range(public_cidr, skip_first=1)
    return first_free(start, end, used)


def allocate_guest(start: str, end: str, gateway: str, used: Collection[str]) -> str:
    return first_free(start, end, used, exclude=(gateway,))


def allocate_linklocal(cidr: str, used: Collection[str]) -> str:
    """A router's control address; the first 255 hosts are left to the host side."""
    start, end = host_range(cidr, skip_first=255)
    return first_free(start, end, used)


def stable_mac(*parts: str) -> str:
    """Locally administered unicast MAC derived from ``parts`` (same input, same MAC)."""
    h = hashlib.sha256("/".join(parts).encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in h[:5])


def normalise_mac(value: str) -> str:
    text = value.strip().lower().replace("-", ":")
    parts = text.split(":")
    if len(parts) != 6 or not all(
        len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts
    ):
        raise NetError(f"macaddress {value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    if int(parts[0], 16) & 1:
        raise NetError(f"macaddress {value!r} is a multicast address")
    return text
