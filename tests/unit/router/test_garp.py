"""Gratuitous ARP frames (byte for byte against RFC 826 / RFC 5227 layout) and which
addresses an apply announces (pure)."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

from agent.roles.base import RoleContext
from agent.roles.router import config as rc
from agent.roles.router import garp, plan, render
from agent.roles.router.role import RouterRole
from tests.unit.router.test_config_render import ENV, PATHS, cfg

MAC = bytes.fromhex("020a0b0c0d0e")


def test_request_frame_byte_for_byte() -> None:
    f = garp.frame(MAC, "10.1.1.1")
    assert f == bytes.fromhex(
        "ffffffffffff"  # Ethernet destination: broadcast
        "020a0b0c0d0e"  # Ethernet source: us
        "0806"  # EtherType ARP
        "0001"  # hardware type Ethernet
        "0800"  # protocol type IPv4
        "0604"  # hardware / protocol address lengths
        "0001"  # operation: request
        "020a0b0c0d0e"  # sender MAC: us
        "0a010101"  # sender IP
        "000000000000"  # target MAC: zero
        "0a010101"  # target IP = sender IP
    ) + bytes(18)  # padded to the 60-byte minimum
    assert len(f) == garp.MIN_FRAME == 60


def test_reply_frame_decodes() -> None:
    f = garp.frame(MAC, "203.0.113.11", reply=True)
    dst, src, etype = struct.unpack("!6s6sH", f[:14])
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", f[14:22])
    sha, spa, tha, tpa = struct.unpack("!6s4s6s4s", f[22:42])
    assert (dst, src, etype) == (b"\xff" * 6, MAC, 0x0806)
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 2)
    assert sha == tha == MAC  # a gratuitous reply names our MAC as the target too
    assert spa == tpa == bytes([203, 0, 113, 11])
    assert f[42:] == bytes(18)


def test_frames_sends_both_forms_per_address() -> None:
    fs = garp.frames(MAC, ["10.1.1.1", "10.1.1.2"])
    ops = [(struct.unpack("!H", f[20:22])[0], ".".join(map(str, f[28:32]))) for f in fs]
    assert ops == [(1, "10.1.1.1"), (2, "10.1.1.1"), (1, "10.1.1.2"), (2, "10.1.1.2")]


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        garp.frame(b"\x01\x02", "10.1.1.1")
    with pytest.raises(ValueError):
        garp.frame(MAC, "10.1.1")
    with pytest.raises(ValueError):
        garp.mac_bytes("02:0a:0b:0c:0d")
    assert garp.mac_bytes("02:0A:0b:0c:0d:0e\n") == MAC


def test_device_mac_reads_sysfs(tmp_path: Path) -> None:
    (tmp_path / "eth1").mkdir()
    (tmp_path / "eth1" / "address").write_text("02:0a:0b:0c:0d:0e\n")
    assert garp.device_mac("eth1", tmp_path) == MAC
    with pytest.raises(FileNotFoundError):
        garp.device_mac("eth9", tmp_path)
    with pytest.raises(ValueError):
        garp.device_mac("..", tmp_path)


def test_added_addresses() -> None:
    added = plan.added_addresses(
        {"eth2": ("203.0.113.10/24", "203.0.113.12/24"), "eth1": ("10.1.1.1/24",)},
        {"eth2": {"203.0.113.10/24", "203.0.113.11/24"}, "eth1": {"10.1.1.1/24"}},
    )
    assert added == {"eth2": {"203.0.113.12/24"}}


def test_garp_targets() -> None:
    r = render.render(rc.parse(cfg()), PATHS, ENV)
    assert r.garp == {"eth1": ("10.1.1.1",), "eth2": ("203.0.113.10", "203.0.113.11")}
    boot = {dev: set(a) for dev, a in r.addresses.items()}  # everything was just added
    # Boot (first apply): every guest and public address, never the control NIC's.
    assert plan.garp_targets(r.garp, boot, None, 0) == r.garp
    # A config change that added one public IP: only that one.
    one = {"eth2": {"203.0.113.11/24"}}
    assert plan.garp_targets(r.garp, one, 0, 0) == {"eth2": ("203.0.113.11",)}
    assert plan.garp_targets(r.garp, {"eth0": {"169.254.3.4/16"}}, 0, 0) == {}
    # The same config again: nothing added, same generation → nothing sent.
    assert plan.garp_targets(r.garp, {}, 3, 3) == {}
    # The manager bumped the generation: everything, added or not.
    assert plan.garp_targets(r.garp, {}, 3, 4) == r.garp
    # First apply of this agent run (old None): the generation alone announces nothing.
    assert plan.garp_targets(r.garp, {}, None, 4) == {}


def test_a_failed_announcement_is_logged_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = RoleContext(
        vm_id="v", name="r-1-VM", zone_id="z", role="domainrouter", state_dir=tmp_path
    )
    role = RouterRole(ctx, render.Paths(tmp_path / "run", tmp_path / "state"), ENV)
    with caplog.at_level(logging.WARNING, logger="sysvm.agent.router"):
        role._garp_round({"no-such-dev0": ("10.1.1.1",)})
    assert role.garp_sent == 0
    assert "event=router_garp_failed dev=no-such-dev0" in caplog.text
