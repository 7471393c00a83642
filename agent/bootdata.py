"""Boot data: what the hypervisor hands a new system VM (docs/internals.md, "Boot data").

Sources, in order: ``--bootdata PATH``, ``/etc/sysvm/bootdata.json``, QEMU fw_cfg
(``/sys/firmware/qemu_fw_cfg/by_name/opt/sysvm/bootdata/raw``), kernel cmdline
``sysvm.bootdata=<base64url(JSON)>``. :func:`parse` validates (pure); :func:`load` does I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ETC_PATH = Path("/etc/sysvm/bootdata.json")
FW_CFG_PATH = Path("/sys/firmware/qemu_fw_cfg/by_name/opt/sysvm/bootdata/raw")
CMDLINE_PATH = Path("/proc/cmdline")
MAX_SIZE = 64 * 1024

_FP_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{22,128}$")


class BootDataError(ValueError):
    """Boot data missing or invalid; the message never contains the token."""


@dataclass(frozen=True)
class BootData:
    vm_id: str
    name: str
    role: str
    zone_id: str
    manager_urls: tuple[str, ...]
    ca_fingerprint: str
    token: str = field(repr=False)
    extra: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


def parse(raw: bytes | str, source: str = "") -> BootData:
    """Pure: validates one boot data JSON document."""
    if len(raw) > MAX_SIZE:
        raise BootDataError(f"{source}: boot data larger than {MAX_SIZE} bytes")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BootDataError(f"{source}: boot data is not JSON ({e.__class__.__name__})") from e
    if not isinstance(obj, dict):
        raise BootDataError(f"{source}: boot data must be a JSON object")

    def text(key: str, pattern: re.Pattern[str] | None = None, required: bool = True) -> str:
        v = obj.get(key, "")
        if not isinstance(v, str) or (required and not v):
            raise BootDataError(f"{source}: {key} must be a non-empty string")
        if pattern is not None and not pattern.match(v):
            what = "token" if key == "token" else f"{key}={v[:80]!r}"
            raise BootDataError(f"{source}: malformed {what}")
        return v

    urls = obj.get("manager_urls")
    if not isinstance(urls, list) or not urls:
        raise BootDataError(f"{source}: manager_urls must be a non-empty list")
    checked: list[str] = []
    for u in urls:
        if not isinstance(u, str):
            raise BootDataError(f"{source}: manager_urls must hold strings")
        parts = urlsplit(u)
        if parts.scheme != "wss" or not parts.hostname:
            raise BootDataError(f"{source}: manager url {u[:100]!r} must be wss://host:port")
        checked.append(u.rstrip("/"))
    extra = obj.get("extra", {})
    if not isinstance(extra, dict):
        raise BootDataError(f"{source}: extra must be an object")
    fp = text("ca_fingerprint").lower()
    if not _FP_RE.match(fp):
        raise BootDataError(f"{source}: ca_fingerprint must be sha256:<64 hex>")
    return BootData(
        vm_id=text("vm_id", _ID_RE),
        name=text("name", required=False) or text("vm_id"),
        role=text("role"),
        zone_id=text("zone_id", required=False),
        manager_urls=tuple(checked),
        ca_fingerprint=fp,
        token=text("token", _TOKEN_RE),
        extra=extra,
        source=source,
    )


def from_cmdline(cmdline: str) -> bytes | None:
    """Pure: the decoded JSON of ``sysvm.bootdata=`` on a kernel command line, if present."""
    for word in cmdline.split():
        if word.startswith("sysvm.bootdata="):
            value = word.split("=", 1)[1]
            try:
                return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            except (binascii.Error, ValueError) as e:
                raise BootDataError("kernel cmdline: sysvm.bootdata is not base64url") from e
    return None


def load(
    explicit: Path | None = None,
    *,
    etc_path: Path = ETC_PATH,
    fw_cfg_path: Path = FW_CFG_PATH,
    cmdline_path: Path = CMDLINE_PATH,
) -> BootData:
    """Reads the first source that exists (see module doc)."""
    if explicit is not None:
        return parse(_read(explicit), str(explicit))
    for p in (etc_path, fw_cfg_path):
        if p.exists():
            return parse(_read(p), str(p))
    if cmdline_path.exists():
        raw = from_cmdline(cmdline_path.read_text(errors="replace"))
        if raw is not None:
            return parse(raw, "kernel cmdline")
    tried: Sequence[Path] = (etc_path, fw_cfg_path, cmdline_path)
    raise BootDataError("no boot data found (tried " + ", ".join(map(str, tried)) + ")")


def _read(p: Path) -> bytes:
    try:
        with p.open("rb") as f:
            return f.read(MAX_SIZE + 1)
    except OSError as e:
        raise BootDataError(f"{p}: {e.strerror}") from e
