"""The manager's store: :func:`open_store` opens the embedded SQLite backend in ``home``."""

from __future__ import annotations

from pathlib import Path

from manager.store.base import Store
from manager.store.sqlite import DB_NAME, SqliteStore


async def open_store(home: Path) -> Store:
    """Opens (creating and migrating if needed) ``home/sysvm.db``; the file is 0600."""
    return await SqliteStore.open(Path(home) / DB_NAME)


__all__ = ["DB_NAME", "SqliteStore", "Store", "open_store"]
