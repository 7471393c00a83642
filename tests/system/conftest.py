"""System tier: the real image, booted by the real drivers. Needs root (CI runs as root).

``sysvm_image`` builds the image once per session (or reuses the cached one: only changed
inputs rebuild it). ``host_prefix`` gives each test's host objects a per-run prefix;
its teardown asserts that nothing is left (processes, mounts, links, namespaces)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from manager.hypervisor.cleanup import cleanup_all, leftovers
from systemvm_image.build import build_image


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/system" in str(item.fspath):
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="session")
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the system tier boots containers and VMs: run it as root")


@pytest.fixture(scope="session")
def sysvm_image(require_root: None) -> Path:
    """The image directory (rootfs/, disk.img, vmlinuz, initrd.img, manifest.json)."""
    return asyncio.run(build_image())


@pytest.fixture
async def host_prefix(netns_prefix: str, request: pytest.FixtureRequest) -> Any:
    """Per-test prefix (<= 7 chars); everything under it is removed even on failure, and
    the test fails if anything was left after the driver's own teardown."""
    tag = getattr(request, "param", None) or "s"
    prefix = f"{netns_prefix}{tag}"[:7]
    await cleanup_all(prefix)
    yield prefix
    rep = await cleanup_all(prefix)
    # zone bridges outlive VMs by design (shared by a zone's VMs); everything else must
    # have been removed by the drivers themselves
    rep.links = [x for x in rep.links if x[len(prefix)] != "b"]
    assert rep.empty(), f"the test left host objects behind: {rep}"
    after = await leftovers(prefix)
    assert after.empty(), f"cleanup_all could not remove: {after}"
