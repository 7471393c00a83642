"""queryAsyncJobResult."""

from __future__ import annotations

from typing import Any

from manager.api.dispatch import Call, Param, PType, api_command, is_root_admin
from manager.api.responses import fmt_date, param_error
from manager.store.base import Job, JobStatus


def job_view(job: Job) -> dict[str, Any]:
    view: dict[str, Any] = {
        "jobid": job.id,
        "accountid": job.account_id,
        "cmd": job.command,
        "jobstatus": int(job.status),
        "jobprocstatus": 0,
        "jobresultcode": job.result_code,
        "jobresulttype": job.result_type,
        "created": fmt_date(job.created),
    }
    if job.status is not JobStatus.PENDING:
        view["jobresult"] = dict(job.result)
        view["completed"] = fmt_date(job.updated)
    if job.instance_type:
        view["jobinstancetype"] = job.instance_type
    if job.instance_id:
        view["jobinstanceid"] = job.instance_id
    return view


@api_command(
    "queryAsyncJobResult",
    "Retrieves the current status of asynchronous job.",
    params=(
        Param("jobid", PType.UUID, required=True, description="the ID of the asynchronous job"),
    ),
    response_fields=(
        "jobid",
        "jobstatus",
        "jobresultcode",
        "jobresulttype",
        "jobresult",
        "jobinstancetype",
        "jobinstanceid",
        "cmd",
        "created",
    ),
)
async def query_async_job_result(call: Call) -> dict[str, Any]:
    job = await call.ctx.store.get_job(call.args["jobid"])
    if job is not None and not is_root_admin(call.user) and job.account_id != call.user.account_id:
        job = None  # another account's job: as if it did not exist
    if job is None:
        raise param_error(f"Unable to find job by id {call.args['jobid']}")
    return job_view(job)
