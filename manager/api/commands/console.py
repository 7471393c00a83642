"""createConsoleEndpoint: a one-time console URL for a guest VM, on the console proxy the
sticky / least-loaded planner picks (:mod:`manager.consoleproxy.runtime`).

Response, as CloudStack 4.18+::

    {"createconsoleendpointresponse": {"consoleendpoint": {"success": true, "url": "...",
      "websocket": {"token": "...", "host": "...", "port": "80", "path": "websockify",
                    "extra": ""}}}}
"""

from __future__ import annotations

from typing import Any

from manager.api.commands.vms import api_error, is_admin, service
from manager.api.dispatch import Call, Param, PType, api_command
from manager.consoleproxy.runtime import ConsoleError


@api_command(
    "createConsoleEndpoint",
    "Create a console endpoint to connect to a VM console",
    params=(
        Param("virtualmachineid", PType.UUID, required=True, description="ID of the VM"),
        Param("token", description="accepted for compatibility (extra validation is off)"),
    ),
    since="4.18.0",
    response_fields=("success", "url", "websocket", "details"),
)
async def create_console_endpoint(call: Call) -> dict[str, Any]:
    svc = service(call)
    client = call.raw.get("client_inet_address", "")
    try:
        return await svc.create_endpoint(
            call.args["virtualmachineid"],
            account_id=call.user.account_id,
            is_admin=is_admin(call.user),
            client=client[:64],
        )
    except ConsoleError as e:
        raise api_error(e) from e
