"""Async API jobs: persisted, run as tracked tasks, polled with ``queryAsyncJobResult``.

A job row is written (pending) before its task starts, and updated when it ends. A job
still pending when the manager stops or dies is marked failed at the next start
(:meth:`JobRunner.recover`), as CloudStack does, with an error text that says why.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from manager.api.responses import INTERNAL_ERROR, ApiError
from manager.store.base import Job, JobStatus, Store

log = logging.getLogger("sysvm.api.jobs")

JobFn = Callable[[], Awaitable[Mapping[str, Any]]]

INTERRUPTED_TEXT = "job interrupted: the manager stopped before it finished"


class JobRunner:
    """Owns every running job task; :meth:`close` cancels and awaits them."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def recover(self, store: Store, now: float) -> int:
        """Marks jobs left pending by a previous run failed; returns how many."""
        stale = await store.list_jobs(status=JobStatus.PENDING, limit=1_000_000)
        if not stale:
            return 0
        async with store.transaction() as tx:
            for job in stale:
                await tx.update_job(
                    job.id,
                    status=JobStatus.FAILED,
                    result_code=INTERNAL_ERROR,
                    result={"errorcode": INTERNAL_ERROR, "errortext": INTERRUPTED_TEXT},
                    now=now,
                )
        log.warning("event=jobs_recovered failed=%d", len(stale))
        return len(stale)

    async def submit(
        self,
        ctx: Any,
        command: str,
        account_id: str,
        coro_fn: JobFn,
        instance_type: str | None = None,
        instance_id: str | None = None,
        *,
        tx: Any = None,
    ) -> str:
        """Persists a pending job, starts ``coro_fn()`` and returns the job id. The mapping
        ``coro_fn`` returns is the job result (``jobresult``); an :class:`ApiError` it raises
        becomes the failure's ``errorcode``/``errortext``.

        With ``tx`` (the change's own transaction) the job row commits together with the
        change and the task starts once it has committed: a change is never committed
        without the job that reports it, nor a job without its change."""
        if self._closed:
            raise ApiError(INTERNAL_ERROR, "manager is shutting down")
        store: Store = ctx.store
        clock: Callable[[], float] = ctx.clock
        now = clock()
        job = Job(
            id=str(uuid.uuid4()),
            command=command,
            account_id=account_id,
            status=JobStatus.PENDING,
            result_code=0,
            result_type="object",
            result={},
            instance_type=instance_type,
            instance_id=instance_id,
            created=now,
            updated=now,
        )
        if tx is None:
            async with store.transaction() as own:
                await own.add_job(job)
            self._start(store, clock, job, coro_fn)
        else:
            await tx.add_job(job)
            tx.on_commit(lambda: self._start(store, clock, job, coro_fn))
        return job.id

    def _start(self, store: Store, clock: Callable[[], float], job: Job, coro_fn: JobFn) -> None:
        if self._closed:
            # Committed while the manager stops: left pending, failed by recover() at the
            # next start like any job the manager did not finish.
            log.warning("event=job_not_started job=%s command=%s", job.id, job.command)
            return
        task = asyncio.create_task(self._run(store, clock, job, coro_fn), name=f"job-{job.id}")
        self._tasks[job.id] = task
        job_id = job.id

        def forget(_t: asyncio.Task[None]) -> None:
            self._tasks.pop(job_id, None)

        task.add_done_callback(forget)
        log.info("event=job_submitted job=%s command=%s", job.id, job.command)

    async def _run(
        self, store: Store, clock: Callable[[], float], job: Job, coro_fn: JobFn
    ) -> None:
        status = JobStatus.FAILED
        code = INTERNAL_ERROR
        result: Mapping[str, Any]
        try:
            result = dict(await coro_fn())
            status, code = JobStatus.SUCCEEDED, 0
        except ApiError as e:
            code = e.errorcode
            result = {"errorcode": e.errorcode, "cserrorcode": e.cserrorcode, "errortext": e.text}
        except asyncio.CancelledError:
            result = {"errorcode": INTERNAL_ERROR, "errortext": INTERRUPTED_TEXT}
            await self._finish(store, clock, job, status, code, result)
            raise
        except Exception:
            log.exception("event=job_crashed job=%s command=%s", job.id, job.command)
            result = {
                "errorcode": INTERNAL_ERROR,
                "errortext": f"internal error (see manager log, job {job.id})",
            }
        await self._finish(store, clock, job, status, code, result)

    async def _finish(
        self,
        store: Store,
        clock: Callable[[], float],
        job: Job,
        status: JobStatus,
        code: int,
        result: Mapping[str, Any],
    ) -> None:
        try:
            async with store.transaction() as tx:
                await tx.update_job(
                    job.id, status=status, result_code=code, result=result, now=clock()
                )
        except Exception:
            # Left pending: the next start's recover() marks it failed.
            log.exception("event=job_update_failed job=%s", job.id)
            return
        log.info("event=job_done job=%s command=%s status=%d", job.id, job.command, status)

    async def wait(self, job_id: str, *, within: float) -> None:
        """Waits (at most ``within`` s) for a running job's task; returns at once if none."""
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), within)

    async def close(self, *, within: float = 10.0) -> None:
        """Cancels running jobs and waits for them to record their failure."""
        self._closed = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=within)
            if pending:
                log.error("event=jobs_not_stopped count=%d", len(pending))
