"""Async jobs submitted inside a change's transaction (``JobRunner.submit(tx=...)``): the
job row commits with the change, its task starts only after the commit, and a rollback
leaves neither (real SQLite store)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import pytest

from manager.api.jobs import JobRunner
from manager.api.responses import ApiError
from manager.store.base import JobStatus
from manager.store.sqlite import SqliteStore


class Boom(Exception):
    pass


async def test_job_commits_with_the_change_and_runs_after_it(store: SqliteStore) -> None:
    runner = JobRunner()
    ctx = SimpleNamespace(store=store, clock=lambda: 1.0)
    started_in_tx: list[bool] = []
    committed = asyncio.Event()

    async def work() -> Mapping[str, Any]:
        started_in_tx.append(not committed.is_set())
        return {"done": True}

    async with store.transaction() as tx:
        job_id = await runner.submit(ctx, "createFirewallRule", "acc", work, tx=tx)
        assert runner.running == 0  # not before the commit
        assert await store.get_job(job_id) is None  # other readers do not see it yet
    committed.set()
    assert runner.running == 1

    async def finished() -> bool:
        job = await store.get_job(job_id)
        return job is not None and job.status is JobStatus.SUCCEEDED

    for _ in range(1000):  # up to 10 s on a loaded machine; usually a few ms
        if await finished():
            break
        await asyncio.sleep(0.01)
    job = await store.get_job(job_id)
    assert job is not None and job.status is JobStatus.SUCCEEDED and job.result == {"done": True}
    assert started_in_tx == [False]
    await runner.close()


async def test_a_rolled_back_change_leaves_no_job_and_starts_nothing(store: SqliteStore) -> None:
    runner = JobRunner()
    ctx = SimpleNamespace(store=store, clock=lambda: 1.0)
    ran: list[str] = []

    async def work() -> Mapping[str, Any]:
        ran.append("ran")
        return {}

    job_id = ""
    with pytest.raises(Boom):
        async with store.transaction() as tx:
            job_id = await runner.submit(ctx, "createFirewallRule", "acc", work, tx=tx)
            raise Boom
    await asyncio.sleep(0)
    assert job_id and await store.get_job(job_id) is None
    assert runner.running == 0 and ran == []
    await runner.close()


async def test_a_closed_runner_refuses_inside_the_transaction(store: SqliteStore) -> None:
    runner = JobRunner()
    await runner.close()
    ctx = SimpleNamespace(store=store, clock=lambda: 1.0)

    async def work() -> Mapping[str, Any]:
        return {}

    with pytest.raises(ApiError, match="shutting down"):
        async with store.transaction() as tx:
            await runner.submit(ctx, "createFirewallRule", "acc", work, tx=tx)
    assert await store.list_jobs() == []
