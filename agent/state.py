"""The agent's state directory, written atomically (temp file, fsync, rename).

``key.pem`` (0600, created before any byte is written; never leaves the VM), ``cert.pem``,
``ca.pem``, ``applied.json`` (``{"version": V, "config": {...}}``), ``commands.json``
(``{id: {"ok", "result", "error", "at"}}``, bounded to the most recent entries).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_COMMANDS = 1000


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # umask may have narrowed/widened nothing, but be explicit
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class Applied:
    version: int
    config: Mapping[str, Any]


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def ensure(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    # --- identity -------------------------------------------------------------------
    @property
    def key_path(self) -> Path:
        return self.path / "key.pem"

    @property
    def cert_path(self) -> Path:
        return self.path / "cert.pem"

    @property
    def ca_path(self) -> Path:
        return self.path / "ca.pem"

    def write_key(self, pem: bytes) -> None:
        atomic_write(self.key_path, pem, 0o600)

    def write_cert(self, pem: bytes) -> None:
        atomic_write(self.cert_path, pem)

    def write_ca(self, pem: bytes) -> None:
        atomic_write(self.ca_path, pem)

    def has_identity(self) -> bool:
        return self.key_path.exists() and self.cert_path.exists() and self.ca_path.exists()

    # --- applied config -------------------------------------------------------------
    def load_applied(self) -> Applied | None:
        p = self.path / "applied.json"
        try:
            obj = json.loads(p.read_bytes(), object_hook=_from_json)
        except FileNotFoundError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("version"), int):
            raise ValueError(f"{p}: not an applied-config record")
        config = obj.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"{p}: config is not an object")
        return Applied(obj["version"], config)

    def save_applied(self, version: int, config: Mapping[str, Any]) -> None:
        data = json.dumps({"version": version, "config": config}, default=_jsonable)
        atomic_write(self.path / "applied.json", data.encode(), 0o600)

    # --- commands -------------------------------------------------------------------
    def load_commands(self) -> dict[str, dict[str, Any]]:
        p = self.path / "commands.json"
        try:
            obj = json.loads(p.read_bytes())
        except FileNotFoundError:
            return {}
        if not isinstance(obj, dict):
            raise ValueError(f"{p}: not a command record")
        return {k: v for k, v in obj.items() if isinstance(v, dict)}

    def save_commands(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        items = sorted(records.items(), key=lambda kv: float(kv[1].get("at", 0)))
        kept = dict(items[-MAX_COMMANDS:])
        data = json.dumps(kept, default=_jsonable).encode()
        atomic_write(self.path / "commands.json", data, 0o600)


def command_record(ok: bool, result: Mapping[str, Any], error: str) -> dict[str, Any]:
    return {"ok": ok, "result": dict(result), "error": error, "at": time.time()}


def _from_json(d: dict[str, Any]) -> Any:
    if len(d) == 1 and isinstance(d.get("__bytes__"), str):
        return bytes.fromhex(d["__bytes__"])
    return d


def _jsonable(o: object) -> Any:
    if isinstance(o, bytes):
        return {"__bytes__": o.hex()}
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")
