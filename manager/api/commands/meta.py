"""listCapabilities and listApis (from the declarative parameter specs)."""

from __future__ import annotations

from typing import Any

from manager.api.dispatch import REGISTRY, Call, Param, allowed, api_command
from manager.api.responses import CLOUDSTACK_VERSION, ListResult, param_error


@api_command(
    "listCapabilities",
    "Lists capabilities",
    response_fields=("cloudstackversion", "apilimitinterval", "apilimitmax"),
)
async def list_capabilities(call: Call) -> dict[str, Any]:
    return {
        "capability": {
            "cloudstackversion": CLOUDSTACK_VERSION,
            "securitygroupsenabled": False,
            "userpublictemplateenabled": False,
            "supportELB": "false",
            "projectinviterequired": False,
            "allowusercreateprojects": False,
            "customdiskofferingminsize": 1,
            "customdiskofferingmaxsize": 1024,
            "kvmsnapshotenabled": False,
            "apilimitinterval": 1,
            "apilimitmax": 0,
            "allowuserviewdestroyedvm": False,
            "allowuserexpungerecovervm": False,
            "dynamicrolesenabled": False,
            "defaultuipagesize": call.ctx.settings.get("default.page.size"),
            "sysvm": True,
        }
    }


@api_command(
    "listApis",
    "lists all available apis on the server",
    params=(Param("name", description="API name"),),
    response_fields=("name", "description", "isasync", "params", "response"),
)
async def list_apis(call: Call) -> ListResult:
    name = call.args.get("name")
    cmds = sorted((c for c in REGISTRY.values() if allowed(c, call.user)), key=lambda c: c.name)
    if name is not None:
        cmds = [c for c in cmds if c.name.lower() == name.lower()]
        if not cmds:
            raise param_error(f"The API {name} does not exist or is not available")
    return ListResult("api", [c.describe() for c in cmds])
