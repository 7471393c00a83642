"""CloudStack response shapes and errors, pure.

Success: ``{"<lowercased command>response": {...}}``. Lists: ``{"count": N, "<key>": [...]}``,
and ``{}`` when empty (as CloudStack does). Errors, HTTP status = ``errorcode``::

    {"listzonesresponse": {"uuidList": [], "errorcode": 431, "cserrorcode": 4350,
                           "errortext": "..."}}

with ``errorresponse`` as the name when the command is unknown or missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

# CloudStack's ApiErrorCode numbers and CSExceptionErrorCode values.
UNAUTHORIZED = 401
PARAM_ERROR = 431
UNSUPPORTED_ACTION = 432
INTERNAL_ERROR = 530
RESOURCE_UNAVAILABLE = 533
TOO_LARGE = 413

CS_INVALID_PARAMETER = 4350
CS_SERVER_API = 9999
CS_CLOUD_RUNTIME = 4250

_REASONS = {
    401: "Unauthorized",
    413: "Request Entity Too Large",
    431: "Invalid Parameter",
    432: "Unsupported Action",
    530: "Internal Error",
    533: "Resource Unavailable",
}

AUTH_FAILED_TEXT = "unable to verify user credentials and/or request signature"

CLOUDSTACK_VERSION = "4.20.0.0-sysvm"


class ApiError(Exception):
    """An error answered in CloudStack's shape; ``text`` is shown to the client."""

    def __init__(self, errorcode: int, text: str, cserrorcode: int | None = None) -> None:
        super().__init__(text)
        self.errorcode = errorcode
        self.text = text
        if cserrorcode is None:
            cserrorcode = CS_INVALID_PARAMETER if errorcode == PARAM_ERROR else CS_SERVER_API
        self.cserrorcode = cserrorcode


def param_error(text: str) -> ApiError:
    return ApiError(PARAM_ERROR, text, CS_INVALID_PARAMETER)


@dataclass(frozen=True, slots=True)
class ListResult:
    """A list command's result before pagination: ``key`` is the plural key (``zone``)."""

    key: str
    items: Sequence[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class AsyncResult:
    """An async command's immediate answer."""

    job_id: str
    id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def response_name(command: str | None) -> str:
    return f"{command.lower()}response" if command else "errorresponse"


def error_body(name: str, err: ApiError) -> dict[str, Any]:
    inner: dict[str, Any] = {"uuidList": [], "errorcode": err.errorcode}
    if err.errorcode != UNAUTHORIZED:
        inner["cserrorcode"] = err.cserrorcode
    inner["errortext"] = err.text
    return {name: inner}


def list_body(result: ListResult, page: int | None, pagesize: int | None) -> dict[str, Any]:
    items = list(result.items)
    total = len(items)
    if page is not None and pagesize is not None and pagesize > 0:
        start = (page - 1) * pagesize
        items = items[start : start + pagesize]
    if total == 0:
        return {}
    return {"count": total, result.key: items}


def async_body(result: AsyncResult) -> dict[str, Any]:
    body: dict[str, Any] = dict(result.extra)
    if result.id is not None:
        body["id"] = result.id
    body["jobid"] = result.job_id
    return body


def fmt_date(ts: float | None) -> str | None:
    """CloudStack's date format: ``2024-05-01T10:00:00+0000``."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(ts))


def reason(status: int) -> str:
    return _REASONS.get(status, "Error")


def render(body: Mapping[str, Any], fmt: str) -> tuple[bytes, str]:
    """(bytes, content type) for ``response=json`` (default) or ``response=xml``."""
    if fmt == "xml":
        [(name, inner)] = body.items()
        parts = ['<?xml version="1.0" encoding="UTF-8"?>']
        parts.append(f'<{name} cloud-stack-version="{CLOUDSTACK_VERSION}">')
        _xml(inner, parts)
        parts.append(f"</{name}>")
        return "".join(parts).encode("utf-8"), "text/xml; charset=UTF-8"
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=str)
    return text.encode("utf-8"), "application/json; charset=UTF-8"


def _xml(value: Any, out: list[str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            items = v if isinstance(v, list) else [v]
            for item in items:
                if item is None:
                    continue
                out.append(f"<{k}>")
                _xml(item, out)
                out.append(f"</{k}>")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    elif value is not None:
        out.append(escape(str(value)))
