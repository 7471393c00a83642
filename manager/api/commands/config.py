"""Settings: listConfigurations, updateConfiguration, resetConfiguration.

Everything shown comes from :data:`manager.settings.SETTINGS` plus the stored values."""

from __future__ import annotations

import uuid
from typing import Any

from manager.api.dispatch import Call, Param, PType, api_command, keyword_match
from manager.api.responses import ListResult, param_error
from manager.settings import CLOUDSTACK_TYPE, Scope, Setting, SettingError, Settings
from manager.store.base import Event

MASK = "*****"
EVENT_EDIT = "CONFIGURATION.VALUE.EDIT"


def config_view(settings: Settings, decl: Setting, zone_id: str | None) -> dict[str, Any]:
    value = decl.render(settings.stored(decl.name, zone_id))
    default = decl.render(decl.default)
    if decl.secret:
        value = MASK if value else ""
        default = MASK if default else ""
    view: dict[str, Any] = {
        "category": decl.category,
        "name": decl.name,
        "value": value,
        "defaultvalue": default,
        "description": decl.description,
        "scope": decl.scope.value,
        "isdynamic": decl.dynamic,
        "type": CLOUDSTACK_TYPE[decl.kind],
        "component": "sysvm",
        "displaytext": decl.name,
    }
    if decl.choices:
        view["options"] = ",".join(decl.choices)
    if decl.unit:
        view["unit"] = decl.unit
    if zone_id is not None:
        view["id"] = zone_id
    if not decl.dynamic:
        view["restartrequired"] = settings.restart_required(decl.name)
    return view


async def _zone_or_error(call: Call) -> str | None:
    zone_id: str | None = call.args.get("zoneid")
    if zone_id is not None and zone_id not in {z.id for z in await call.ctx.store.list_zones()}:
        raise param_error(f"Unable to find zone by id {zone_id}")
    return zone_id


@api_command(
    "listConfigurations",
    "Lists all configurations.",
    params=(
        Param("name", description="lists configuration by name (substring)"),
        Param("category", description="lists configurations by category"),
        Param("zoneid", PType.UUID, description="the ID of the Zone to list zone-scoped values"),
    ),
    listing=True,
    response_fields=(
        "name",
        "value",
        "defaultvalue",
        "category",
        "description",
        "scope",
        "isdynamic",
        "type",
    ),
    admin=True,
)
async def list_configurations(call: Call) -> ListResult:
    a = call.args
    zone_id = await _zone_or_error(call)
    settings = call.ctx.settings
    name = a.get("name")
    category = a.get("category")
    decls = [
        d
        for d in settings.table.values()
        if (name is None or name.lower() in d.name.lower())
        and (category is None or category.lower() == d.category.lower())
        and (zone_id is None or d.scope is Scope.ZONE)
        and keyword_match(a.get("keyword"), d.name, d.description)
    ]
    if name is not None:  # an exact name first, then the other matches
        decls.sort(key=lambda d: (d.name.lower() != name.lower(), d.name))
    return ListResult("configuration", [config_view(settings, d, zone_id) for d in decls])


async def _change(call: Call, value: str | None) -> dict[str, Any]:
    settings = call.ctx.settings
    name: str = call.args["name"]
    zone_id = await _zone_or_error(call)
    try:
        decl = settings.setting(name)
    except SettingError as e:
        raise param_error(str(e)) from None
    now = call.ctx.clock()
    try:
        async with call.ctx.store.transaction() as tx:
            if value is None:
                new = await settings.reset(tx, name, zone_id)
            else:
                new = await settings.update(tx, name, value, zone_id)
            shown = MASK if decl.secret else decl.render(new)
            where = f" Zone: {zone_id}" if zone_id else ""
            await tx.add_event(
                Event(
                    id=str(uuid.uuid4()),
                    type=EVENT_EDIT,
                    level="INFO",
                    description=(
                        f"Successfully edited configuration value. Name: {name} "
                        f"Value: {shown}{where}"
                    ),
                    account_id=call.user.account_id,
                    resource_id=zone_id,
                    created=now,
                )
            )
    except SettingError as e:
        raise param_error(str(e)) from None
    view = config_view(settings, decl, zone_id)
    if not decl.dynamic:
        view["restartrequired"] = True
        view["note"] = f"{name} is not dynamic: the new value takes effect after a restart"
    return {"configuration": view}


@api_command(
    "updateConfiguration",
    "Updates a configuration.",
    params=(
        Param("name", required=True, description="the name of the configuration"),
        Param(
            "value",
            description="the value of the configuration; omitted = back to the default",
            length=4096,
        ),
        Param("zoneid", PType.UUID, description="the ID of the Zone to update the value for"),
    ),
    related="listConfigurations",
    response_fields=("name", "value", "category", "description", "isdynamic"),
    admin=True,
)
async def update_configuration(call: Call) -> dict[str, Any]:
    return await _change(call, call.args.get("value"))


@api_command(
    "resetConfiguration",
    "Resets a configuration to its default (or, per zone, to the global value).",
    params=(
        Param("name", required=True, description="the name of the configuration"),
        Param("zoneid", PType.UUID, description="the ID of the Zone to reset the value for"),
    ),
    related="listConfigurations",
    response_fields=("name", "value", "category", "description", "isdynamic"),
    admin=True,
)
async def reset_configuration(call: Call) -> dict[str, Any]:
    return await _change(call, None)
