"""manager.bootstrap.ensure_initialized against a real store in a temp dir."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from manager.bootstrap import api_endpoint, ensure_initialized, write_secret_json
from manager.settings import Settings
from manager.store.sqlite import SqliteStore


@dataclass
class Ctx:
    home: Path
    store: SqliteStore
    settings: Settings
    clock: Callable[[], float] = time.time
    api_url: str = "http://127.0.0.1:18080/client/api"


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[Ctx]:
    home = tmp_path / "home"
    store = await SqliteStore.open(home / "sysvm.db")
    try:
        yield Ctx(home, store, Settings(store))
    finally:
        await store.close()


async def test_first_start_then_idempotent(ctx: Ctx) -> None:
    assert await ensure_initialized(ctx) == {"admin": True, "zone": True}
    creds_path = ctx.home / "credentials.json"
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
    creds = json.loads(creds_path.read_text())
    assert creds["endpoint"] == ctx.api_url
    assert len(creds["apikey"]) >= 64 and len(creds["secretkey"]) >= 64
    assert creds["apikey"] != creds["secretkey"]
    admin = await ctx.store.get_user_by_apikey(creds["apikey"])
    assert admin is not None and admin.account_type == 1 and admin.username == "admin"
    zones = await ctx.store.list_zones()
    assert len(zones) == 1 and not zones[0].public_cidr.startswith("192.0.2.")
    assert len(await ctx.store.list_pods()) == len(await ctx.store.list_hosts()) == 1
    assert {e.type for e in await ctx.store.list_events()} == {"USER.CREATE", "ZONE.CREATE"}

    creds_path.unlink()  # a lost file comes back with the same keys
    assert await ensure_initialized(ctx) == {"admin": False, "zone": False}
    assert json.loads(creds_path.read_text()) == creds
    assert await ctx.store.count_users() == 1 and len(await ctx.store.list_zones()) == 1
    assert sorted(p.name for p in ctx.home.iterdir() if p.name.startswith(".")) == []


def test_endpoint_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoUrl:
        pass

    monkeypatch.setenv("SYSVM_API_LISTEN", "0.0.0.0:9999")
    assert api_endpoint(NoUrl()) == "http://127.0.0.1:9999/client/api"
    monkeypatch.setenv("SYSVM_API_LISTEN", "[::1]:81")
    assert api_endpoint(NoUrl()) == "http://[::1]:81/client/api"


def test_write_secret_json_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "d" / "s.json"
    write_secret_json(target, {"a": 1})
    target.chmod(0o644)  # replaced by a fresh 0600 file, never widened
    write_secret_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["s.json"]
