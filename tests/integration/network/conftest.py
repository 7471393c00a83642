"""Fixtures of the network integration tests (helpers in netapi.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.network.netapi import Api, reset_runtime, start


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    reset_runtime()
    server, runner = await start(tmp_path / "home")
    try:
        yield server
    finally:
        await runner.cleanup()
        await server.ctx.store.close()
        reset_runtime()
