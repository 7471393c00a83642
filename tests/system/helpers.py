"""Helpers shared by the system tests (polling with a timeout, boot data)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

TIMING_FACTOR = float(os.environ.get("SYSVM_TEST_TIMING", "1"))


async def wait_for(
    cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Polls ``cond`` (sync or async) until truthy; fails naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout * TIMING_FACTOR
    last: Any = None
    while True:
        value = cond()
        if isinstance(value, Awaitable):
            value = await value
        last = value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last={last!r})")
        await asyncio.sleep(interval)


def boot_data(vm_id: str, urls: list[str], role: str = "secondarystorage") -> dict[str, Any]:
    """Well-formed boot data (the fingerprint and token are not a real manager's)."""
    return {
        "vm_id": vm_id,
        "name": "s-1-VM",
        "role": role,
        "zone_id": str(uuid.uuid4()),
        "manager_urls": urls,
        "ca_fingerprint": "sha256:" + "ab" * 32,
        "token": "t" * 32,
        "extra": {},
    }
