"""listEvents and listAlerts."""

from __future__ import annotations

from typing import Any

from manager.api.dispatch import Call, Param, PType, api_command, is_root_admin, keyword_match
from manager.api.responses import ListResult, fmt_date
from manager.store.base import Alert, Event

HISTORY_LIMIT = 10_000


def event_view(e: Event, account_name: str) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": e.id,
        "type": e.type,
        "level": e.level,
        "description": e.description,
        "account": account_name if e.account_id else "system",
        "username": account_name if e.account_id else "system",
        "domain": "ROOT",
        "created": fmt_date(e.created),
        "state": "Completed",
    }
    if e.resource_id:
        view["resourceid"] = e.resource_id
    return view


def alert_view(a: Alert) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": a.id,
        "type": a.type,
        "name": a.name,
        "subject": a.subject,
        "description": a.description,
        "sent": fmt_date(a.created),
    }
    if a.zone_id:
        view["zoneid"] = a.zone_id
    return view


@api_command(
    "listEvents",
    "A command to list events.",
    params=(
        Param("id", PType.UUID, description="the ID of the event"),
        Param("type", description="the event type (see event types)"),
        Param("level", description="the event level (INFO, WARN, ERROR)"),
        Param("startdate", PType.DATE, description="the start date range of the list"),
        Param("enddate", PType.DATE, description="the end date range of the list"),
        Param("resourceid", PType.UUID, description="the ID of the resource"),
    ),
    listing=True,
    response_fields=("id", "type", "level", "description", "account", "created", "state"),
)
async def list_events(call: Call) -> ListResult:
    a = call.args
    start, end = a.get("startdate"), a.get("enddate")
    if end is not None and len(call.raw.get("enddate", "").strip()) <= 10:
        end += 86_399  # a date alone includes the whole day, as in CloudStack
    name = call.user.account_name
    mine_only = not is_root_admin(call.user)
    out = [
        event_view(e, name)
        for e in await call.ctx.store.list_events(limit=HISTORY_LIMIT)
        if (not mine_only or e.account_id == call.user.account_id)
        and a.get("id") in (None, e.id)
        and (a.get("type") is None or a["type"].lower() == e.type.lower())
        and (a.get("level") is None or a["level"].lower() == e.level.lower())
        and a.get("resourceid") in (None, e.resource_id)
        and (start is None or e.created >= start)
        and (end is None or e.created <= end)
        and keyword_match(a.get("keyword"), e.type, e.description)
    ]
    return ListResult("event", out)


@api_command(
    "listAlerts",
    "Lists all alerts.",
    params=(
        Param("id", PType.UUID, description="the ID of the alert"),
        Param("type", PType.SHORT, description="list by alert type", min=0),
        Param("name", description="list by alert name"),
    ),
    listing=True,
    response_fields=("id", "type", "name", "subject", "description", "sent"),
    admin=True,
)
async def list_alerts(call: Call) -> ListResult:
    a = call.args
    out = [
        alert_view(al)
        for al in await call.ctx.store.list_alerts(limit=HISTORY_LIMIT)
        if a.get("id") in (None, al.id)
        and a.get("type") in (None, al.type)
        and a.get("name") in (None, al.name)
        and keyword_match(a.get("keyword"), al.name, al.subject, al.description)
    ]
    return ListResult("alert", out)
