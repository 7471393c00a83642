"""``manager.network.runtime.wait_applied``: acks wake it at once, failures carry the
agent's own reason, the store is read only every ``poll_interval`` (fakes for the store
and the agent link; the real pair is exercised by the integration and system tiers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from manager.api.responses import ApiError
from manager.network.runtime import RUNTIME, ApplyFailed, wait_applied
from manager.store.base import Role, SystemVm, VmState


def vm(vm_id: str, applied: int = 1, state: VmState = VmState.RUNNING) -> SystemVm:
    return SystemVm(
        id=vm_id, seq=1, name=f"r-{vm_id}-VM", role=Role.ROUTER, zone_id="z1", pod_id=None,
        host_id=None, state=state, template_id=None, hypervisor="External", public_ip=None,
        private_ip=None, linklocal_ip=None, desired_version=5, applied_version=applied,
        agent_version=None, image_version=None, last_seen=None, created=0.0,
    )  # fmt: skip


class Store:
    def __init__(self, *vms: SystemVm) -> None:
        self.vms = {v.id: v for v in vms}
        self.reads = 0

    async def get_system_vm(self, vm_id: str) -> SystemVm | None:
        self.reads += 1
        return self.vms.get(vm_id)


class Session:
    def __init__(self) -> None:
        self.acked = 1
        self.failed_version = 0
        self.failed_error = ""


class Links:
    """The agent link's surface wait_applied uses (manager.agentlink.AgentLinks)."""

    def __init__(self, *ids: str) -> None:
        self.sessions = {i: Session() for i in ids}
        self.waiters: set[asyncio.Future[None]] = set()
        self.status_requests = 0
        self.waited_for: list[list[str]] = []

    def is_connected(self, vm_id: str) -> bool:
        return vm_id in self.sessions

    def acked_version(self, vm_id: str) -> int:
        s = self.sessions.get(vm_id)
        return s.acked if s else 0

    def failed_version(self, vm_id: str) -> int:
        s = self.sessions.get(vm_id)
        return s.failed_version if s else 0

    async def wait_config_acks(self, vm_ids: list[str], timeout: float) -> None:
        self.waited_for.append(sorted(vm_ids))
        fut = asyncio.get_running_loop().create_future()
        self.waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            self.waiters.discard(fut)

    def ack(self, vm_id: str, version: int, error: str | None = None) -> None:
        s = self.sessions[vm_id]
        if error is None:
            s.acked = version
        else:
            s.failed_version, s.failed_error = version, error
        for fut in list(self.waiters):
            if not fut.done():
                fut.set_result(None)

    async def request(self, vm_id: str, method: str, params: Any, timeout: float) -> Any:
        self.status_requests += 1
        return {"status": {"role": {"error": "from status"}}}


@pytest.fixture
def links() -> Iterator[Links]:
    saved = (RUNTIME.links, RUNTIME.poll_interval)
    RUNTIME.links = Links("a", "b")
    RUNTIME.poll_interval = 30.0  # only acks may end these waits quickly
    try:
        yield RUNTIME.links
    finally:
        RUNTIME.links, RUNTIME.poll_interval = saved


async def test_acks_end_the_wait_at_once_without_polling_the_store(links: Links) -> None:
    store = Store(vm("a"), vm("b"))
    task = asyncio.create_task(wait_applied(store, {"a": 3, "b": 2}, timeout=10))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not task.done() and store.reads == 2  # one read each, at the start
    t0 = time.monotonic()
    links.ack("a", 3)
    for _ in range(50):  # let the task see the ack and wait again
        if len(links.waited_for) == 2:
            break
        await asyncio.sleep(0)
    assert not task.done()
    assert links.waited_for == [["a", "b"], ["b"]]  # only what is still pending
    links.ack("b", 2)
    await asyncio.wait_for(task, 1)
    assert time.monotonic() - t0 < 5.0  # far from the 30 s poll interval
    assert store.reads == 2


async def test_failed_apply_raises_with_the_agents_own_reason(links: Links) -> None:
    store = Store(vm("a"))
    task = asyncio.create_task(wait_applied(store, {"a": 4}, timeout=10))
    await asyncio.sleep(0)
    links.ack("a", 4, error="haproxy: cannot bind socket [10.1.1.1:80]")
    with pytest.raises(ApplyFailed, match=r"r-a-VM failed .*haproxy: cannot bind socket"):
        await asyncio.wait_for(task, 1)
    assert links.status_requests == 0


async def test_failed_apply_without_a_reason_asks_the_role_status(links: Links) -> None:
    store = Store(vm("a"))
    links.sessions["a"].failed_version = 4
    with pytest.raises(ApplyFailed, match="from status"):
        await wait_applied(store, {"a": 4}, timeout=10)
    assert links.status_requests == 1


async def test_already_applied_destroyed_and_disconnected_need_no_wait(links: Links) -> None:
    store = Store(vm("a", applied=7), vm("b", state=VmState.DESTROYED), vm("c"))
    await asyncio.wait_for(wait_applied(store, {"a": 7, "b": 9, "c": 9}, timeout=10), 1)


async def test_a_disconnected_router_is_waited_for_when_required(links: Links) -> None:
    store = Store(vm("c"))
    with pytest.raises(ApiError, match="r-c-VM did not acknowledge the configuration within"):
        await wait_applied(store, {"c": 2}, timeout=0.05, require_connected=True)


async def test_a_booting_router_needs_its_new_session_to_ack(links: Links) -> None:
    """A router started again: the store's applied version is its previous boot's. Only
    the agent's new session (its hello reports what it re-applied) ends the wait."""
    store = Store(vm("c", applied=5))
    with pytest.raises(ApiError, match="r-c-VM did not acknowledge the configuration within"):
        await wait_applied(store, {"c": 5}, timeout=0.05, require_connected=True)
    task = asyncio.create_task(wait_applied(store, {"c": 5}, timeout=10, require_connected=True))
    await asyncio.sleep(0)
    links.sessions["c"] = Session()  # connected; its hello said version 1
    links.ack("c", 4)
    await asyncio.sleep(0)
    assert not task.done()
    links.ack("c", 5)
    await asyncio.wait_for(task, 1)
