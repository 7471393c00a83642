"""Gratuitous ARP: tell a segment that our addresses are now at our MAC.

When a replacement router takes over a gateway or public IP, the guests and the upstream
router still have the old router's MAC in their ARP caches and would send it traffic
until those entries expire. An unsolicited ARP for the address (RFC 5227 section 2.3
"ARP Announcement"; RFC 2002 section 4.6) updates every existing entry at once.

:func:`frame` builds the frames (pure); :func:`send` puts them on a device through a raw
``AF_PACKET`` socket (stdlib only, no ``arping`` needed). Frame layout (RFC 826)::

    Ethernet: dst ff:ff:ff:ff:ff:ff | src <our MAC> | type 0x0806
    ARP:      htype 1 | ptype 0x0800 | hlen 6 | plen 4 | oper 1 (request) or 2 (reply)
              sha <our MAC> | spa <ip> | tha 00:..:00 (request) or <our MAC> (reply) | tpa <ip>
    zero padding to the 60-byte Ethernet minimum (without FCS)

Linux overrides an existing neighbour entry on either form, even within its ``locktime``,
when sender and target IP are equal (and, for a reply, sender and target MAC are equal).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
MIN_FRAME = 60  # Ethernet minimum frame size without the FCS
# When to send, in seconds after the first round: at once, then twice more in case the
# first was lost or a peer's link was still coming up.
SCHEDULE = (0.0, 0.2, 1.0)

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_ETH_ARP = struct.Struct("!6s6sHHHBBH6s4s6s4s")


def mac_bytes(text: str) -> bytes:
    """``"02:00:0a:0b:00:01"`` → 6 bytes."""
    t = text.strip().lower()
    if not _MAC_RE.match(t):
        raise ValueError(f"{text!r} is not a MAC address")
    return bytes.fromhex(t.replace(":", ""))


def frame(mac: bytes, ip: str, *, reply: bool = False) -> bytes:
    """One gratuitous ARP frame announcing ``ip`` at ``mac`` (Ethernet broadcast):
    the request form (``arping -U``) or, with ``reply``, the reply form (``arping -A``)."""
    if len(mac) != 6:
        raise ValueError("a MAC address is 6 bytes")
    addr = ipaddress.IPv4Address(ip).packed
    data = _ETH_ARP.pack(
        BROADCAST,
        mac,
        ETH_P_ARP,
        1,  # hardware type: Ethernet
        ETH_P_IP,
        6,
        4,
        ARP_REPLY if reply else ARP_REQUEST,
        mac,
        addr,
        mac if reply else ZERO_MAC,
        addr,
    )
    return data.ljust(MIN_FRAME, b"\x00")


def frames(mac: bytes, ips: Iterable[str]) -> list[bytes]:
    """Both forms for each IP: some peers only honour one of them."""
    return [frame(mac, ip, reply=r) for ip in ips for r in (False, True)]


def device_mac(dev: str, sys_class_net: Path = Path("/sys/class/net")) -> bytes:
    if "/" in dev or dev in (".", ".."):
        raise ValueError(f"bad device name {dev!r}")
    return mac_bytes((sys_class_net / dev / "address").read_text())


def send(dev: str, ips: Iterable[str]) -> int:
    """Send the frames for ``ips`` on ``dev``; returns how many were sent. Raises
    ``OSError`` (no such device, no permission) or ``ValueError`` (no MAC)."""
    out = frames(device_mac(dev), ips)
    # Protocol 0: a sending-only socket, never handed received packets.
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
        s.bind((dev, 0))
        for f in out:
            s.send(f)
    return len(out)
