"""The store tests' shared fixture: a fresh SQLite store with a fixed clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from manager.store.sqlite import SqliteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "sysvm.db", clock=Clock())
    try:
        yield s
    finally:
        await s.close()
