"""startSystemVm, stopSystemVm, rebootSystemVm, destroySystemVm: async jobs over
:mod:`manager.hypervisor.lifecycle` whose ``jobresult`` is ``{"systemvm": {...}}`` in
listSystemVms' shape.

A console proxy is drained before a stop, reboot or destroy (no new session goes to it;
live ones get up to ``consoleproxy`` drain time to end, none with ``forced=true``) and the
sessions the operation cut are in the result as ``sessionscut``. Failures are failed jobs
(530, or 431 for a request that cannot apply) with the lifecycle's text; a driver failure
also leaves an alert and the VM in Error, and the manager keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from manager.api.commands.infra import names
from manager.api.commands.systemvms import systemvm_view
from manager.api.dispatch import Call, Param, PType, api_command
from manager.api.responses import INTERNAL_ERROR, ApiError, AsyncResult, param_error
from manager.store.base import Role, SystemVm, VmState

log = logging.getLogger("sysvm.api.sysvm")

_NOT_SYSTEM_VM = "is a virtual router: use {cmd} instead"
_ROUTER_CMD = {
    "startSystemVm": "startRouter",
    "stopSystemVm": "stopRouter",
    "rebootSystemVm": "rebootRouter",
    "destroySystemVm": "destroyRouter",
}


def check_request(command: str, vm: SystemVm | None, vm_id: str) -> None:
    """Pure: refuses (431) what CloudStack refuses before starting a job."""
    if vm is None or vm.state in (VmState.DESTROYED, VmState.EXPUNGING):
        raise param_error(f"Unable to find system vm by id {vm_id}")
    if vm.role is Role.ROUTER:
        raise param_error(
            f"{vm.name} " + _NOT_SYSTEM_VM.format(cmd=_ROUTER_CMD.get(command, "the router API"))
        )
    if vm.hypervisor == "External":
        raise param_error(f"{vm.name} runs on an External hypervisor: the manager cannot {command}")
    if command == "rebootSystemVm" and vm.state is not VmState.RUNNING:
        raise param_error(f"Unable to reboot {vm.name}: it is {vm.state.value}, not Running")
    if command == "startSystemVm" and vm.state in (VmState.STOPPING,):
        raise param_error(f"Unable to start {vm.name}: it is {vm.state.value}")


async def _view(call: Call, vm_id: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    vm = await call.ctx.store.get_system_vm(vm_id)
    if vm is None:  # pragma: no cover - records are never deleted
        raise ApiError(INTERNAL_ERROR, f"system vm {vm_id} disappeared")
    zones, pods, _ = await names(call)
    hosts = {h.id: h.name for h in await call.ctx.store.list_hosts()}
    view = systemvm_view(call, vm, zones, pods, hosts)
    if vm.template_id:
        from manager.templates import get_template

        t = await get_template(call.ctx.store, vm.template_id)
        if t is not None:
            view["templatename"] = t.name
    view.update(extra or {})
    return {"systemvm": view}


async def _drain(call: Call, vm: SystemVm, forced: bool) -> int:
    if vm.role is not Role.CONSOLE_PROXY or vm.state is not VmState.RUNNING:
        return 0
    from manager.consoleproxy.runtime import DRAIN_TIMEOUT, drain_for_stop

    return await drain_for_stop(call.ctx, vm.id, wait=0.0 if forced else DRAIN_TIMEOUT)


async def _proxy_stopped(call: Call, vm: SystemVm) -> None:
    if vm.role is not Role.CONSOLE_PROXY:
        return
    from manager.consoleproxy.runtime import get_runtime

    rt = get_runtime(call.ctx)
    if rt is not None:
        await rt.proxy_stopped(vm.id)


def _agent_wait(call: Call) -> float:
    from manager.hypervisor.lifecycle import AGENT_WAIT

    return AGENT_WAIT


async def _submit(
    call: Call, command: str, work: Callable[[SystemVm], Awaitable[Mapping[str, Any]]]
) -> AsyncResult:
    vm_id: str = call.args["id"]
    vm = await call.ctx.store.get_system_vm(vm_id)
    check_request(command, vm, vm_id)
    assert vm is not None
    if vm.hypervisor not in getattr(call.ctx, "hypervisors", {}):
        raise ApiError(
            INTERNAL_ERROR, f"{vm.name}: no driver for hypervisor {vm.hypervisor} on this manager"
        )

    async def job() -> Mapping[str, Any]:
        from manager.hypervisor.lifecycle import LifecycleError

        try:
            return await work(vm)
        except LifecycleError as e:
            log.warning("event=sysvm_action_failed command=%s vm=%s error=%s", command, vm.id, e)
            raise ApiError(INTERNAL_ERROR, f"{command} failed: {e}") from e

    job_id = await call.jobs.submit(call.ctx, command, call.user.account_id, job, "SystemVm", vm_id)
    return AsyncResult(job_id, id=vm_id)


_ID = Param("id", PType.UUID, required=True, description="The ID of the system virtual machine")


@api_command(
    "startSystemVm",
    "Starts a system virtual machine.",
    params=(_ID,),
    is_async=True,
    related="listSystemVms",
    admin=True,
)
async def start_system_vm(call: Call) -> AsyncResult:
    async def work(vm: SystemVm) -> Mapping[str, Any]:
        from manager.hypervisor import lifecycle

        if vm.state is VmState.RUNNING:
            return await _view(call, vm.id)  # CloudStack: starting a running VM is a no-op
        await lifecycle.start_system_vm(call.ctx, vm.id, wait_agent=_agent_wait(call))  # type: ignore[arg-type]
        return await _view(call, vm.id)

    return await _submit(call, "startSystemVm", work)


@api_command(
    "stopSystemVm",
    "Stops a system VM.",
    params=(
        _ID,
        Param(
            "forced",
            PType.BOOLEAN,
            description="Force stop the VM (no clean shutdown, console sessions cut at "
            "once). The caller knows the VM is stopped.",
        ),
    ),
    is_async=True,
    related="listSystemVms",
    admin=True,
)
async def stop_system_vm(call: Call) -> AsyncResult:
    forced = bool(call.args.get("forced", False))

    async def work(vm: SystemVm) -> Mapping[str, Any]:
        from manager.hypervisor import lifecycle

        if vm.state is VmState.STOPPED:
            return await _view(call, vm.id)
        cut = await _drain(call, vm, forced)
        await lifecycle.stop_system_vm(call.ctx, vm.id, forced=forced)  # type: ignore[arg-type]
        await _proxy_stopped(call, vm)
        extra = {"sessionscut": cut} if vm.role is Role.CONSOLE_PROXY else None
        return await _view(call, vm.id, extra)

    return await _submit(call, "stopSystemVm", work)


@api_command(
    "rebootSystemVm",
    "Reboots a system VM.",
    params=(_ID, Param("forced", PType.BOOLEAN, description="Force reboot the VM")),
    is_async=True,
    related="listSystemVms",
    admin=True,
)
async def reboot_system_vm(call: Call) -> AsyncResult:
    forced = bool(call.args.get("forced", False))

    async def work(vm: SystemVm) -> Mapping[str, Any]:
        from manager.hypervisor import lifecycle

        cut = await _drain(call, vm, forced)
        await lifecycle.reboot_system_vm(
            call.ctx,  # type: ignore[arg-type]
            vm.id,
            timeout=0.0 if forced else 30.0,
            wait_agent=_agent_wait(call),
        )
        await _proxy_stopped(call, vm)
        extra = {"sessionscut": cut} if vm.role is Role.CONSOLE_PROXY else None
        return await _view(call, vm.id, extra)

    return await _submit(call, "rebootSystemVm", work)


@api_command(
    "destroySystemVm",
    "Destroys a system virtual machine.",
    params=(_ID,),
    is_async=True,
    related="listSystemVms",
    admin=True,
)
async def destroy_system_vm(call: Call) -> AsyncResult:
    async def work(vm: SystemVm) -> Mapping[str, Any]:
        from manager.hypervisor import lifecycle

        cut = await _drain(call, vm, True)
        await lifecycle.destroy_system_vm(call.ctx, vm.id)  # type: ignore[arg-type]
        await _proxy_stopped(call, vm)
        extra = {"sessionscut": cut} if vm.role is Role.CONSOLE_PROXY else None
        return await _view(call, vm.id, extra)

    return await _submit(call, "destroySystemVm", work)
