"""Shared test fixtures: the event loop (uvloop, as in production), free ports, and a
per-run prefix for network namespaces so parallel runs never collide."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

# Every wait in tests is multiplied by this (slow CI machine → raise it, never add sleeps).
TIMING_FACTOR = float(os.environ.get("SYSVM_TEST_TIMING", "1"))


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Returns a function that hands out a currently free TCP port on 127.0.0.1."""

    def _pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    return _pick


@pytest.fixture(scope="session")
def netns_prefix() -> str:
    """Short, per-run prefix for namespace / link names (<= 6 chars leaves room in IFNAMSIZ)."""
    return f"t{os.getpid() % 100000:05d}"
