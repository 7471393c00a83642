"""Guest VM pure parts: the QEMU command line, the boot payload, PPM parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from manager.guests import payload
from manager.guests.vm import VNC_PASSWORD_LEN, new_vnc_password, qemu_argv, read_ppm


def test_qemu_argv_is_password_protected_loopback_vnc() -> None:
    argv = qemu_argv(
        "qemu-system-x86_64",
        image=Path("/r/boot.img"),
        qmp_path=Path("/s/q.qmp"),
        vnc_host="127.0.0.1",
        memory_mb=64,
        name="g1",
    )
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-vnc") + 1] == "127.0.0.1:0,to=2000,password=on"
    assert argv[argv.index("-machine") + 1] == "pc,accel=tcg"
    assert "-nodefaults" in argv and argv[argv.index("-display") + 1] == "none"
    assert argv[argv.index("-qmp") + 1] == "unix:/s/q.qmp,server=on,wait=off"
    assert "snapshot=on" in argv[argv.index("-drive") + 1]  # the shared image never changes


def test_passwords_fit_vnc_and_differ() -> None:
    pws = {new_vnc_password() for _ in range(50)}
    assert len(pws) == 50 and all(len(p) == VNC_PASSWORD_LEN and p.isalnum() for p in pws)


def test_boot_sector(tmp_path: Path) -> None:
    sector = payload.boot_sector()
    assert len(sector) == 512 and sector.endswith(b"\x55\xaa")
    assert sector.startswith(bytes.fromhex("b81300cd10"))  # int 10h, mode 13h
    img = payload.write_image(tmp_path / "boot.img")
    assert img.read_bytes() == sector
    assert payload.write_image(img) == img  # idempotent


def test_read_ppm() -> None:
    data = b"P6\n# QEMU\n2 1\n255\n" + bytes([1, 2, 3, 4, 5, 6])
    assert read_ppm(data) == (2, 1, bytes([1, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError):
        read_ppm(b"P5\n2 1\n255\n" + bytes(2))
    with pytest.raises(ValueError):
        read_ppm(b"P6\n2 2\n255\n" + bytes(3))
