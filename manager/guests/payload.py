"""The guests' boot payload: one 512-byte MBR boot sector, generated (no binary in the repo).

Real-mode x86: switch to VGA mode 13h (320x200, 256 colours), fill the framebuffer at
``A000:0000`` so that pixel ``i`` gets colour ``i >> 8`` (a rainbow gradient through the
default VGA palette, top to bottom), then ``hlt`` forever.
"""

from __future__ import annotations

from pathlib import Path

CODE = bytes.fromhex(
    "b81300"  # mov ax, 0x0013
    "cd10"  # int 0x10          ; 320x200x256
    "b800a0"  # mov ax, 0xa000
    "8ec0"  # mov es, ax
    "31ff"  # xor di, di
    "89f8"  # loop: mov ax, di
    "88e0"  # mov al, ah
    "aa"  # stosb
    "85ff"  # test di, di
    "75f7"  # jnz loop
    "f4"  # hang: hlt
    "ebfd"  # jmp hang
)
WIDTH, HEIGHT = 320, 200


def boot_sector() -> bytes:
    return CODE.ljust(510, b"\0") + b"\x55\xaa"


def write_image(path: Path) -> Path:
    """Writes the disk image (one sector) atomically; returns ``path``."""
    data = boot_sector()
    if path.exists() and path.read_bytes() == data:
        return path
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path
