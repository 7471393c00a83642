"""``/client/api``: read parameters, authenticate, validate, dispatch, render.

Every request gets an answer in CloudStack's shape, whatever it carries: malformed encodings,
huge bodies, unknown commands and handler crashes all end as an error response with the
matching status, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from manager.api import signing
from manager.api.dispatch import (
    ApiCommand,
    ApiContext,
    Call,
    allowed,
    lookup,
    paginate_args,
    validate,
)
from manager.api.jobs import JobRunner
from manager.api.responses import (
    AUTH_FAILED_TEXT,
    INTERNAL_ERROR,
    TOO_LARGE,
    UNAUTHORIZED,
    UNSUPPORTED_ACTION,
    ApiError,
    AsyncResult,
    ListResult,
    async_body,
    error_body,
    list_body,
    param_error,
    reason,
    render,
    response_name,
)
from manager.store.base import User

log = logging.getLogger("sysvm.api")

MAX_FIELDS = 1000  # parameters per request
MAX_APIKEY_LEN = 256
BODY_TIMEOUT = 30.0  # seconds to receive a request body
_FORM_TYPES = ("", "application/x-www-form-urlencoded", "text/plain")
# CloudStack parameter names (incl. map entries like ``details[0].key``). Names are signed
# unencoded, so one holding "=" or "&" could make two different requests sign alike.
_NAME_RE = re.compile(r"[A-Za-z0-9_.\[\]-]{1,128}")


def parse_params(query: str, body: bytes) -> list[tuple[str, str]]:
    """Name/value pairs of the query string then the form body, strictly UTF-8."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise param_error("Malformed request: the body is not UTF-8") from None
    pairs: list[tuple[str, str]] = []
    for part in (query, text):
        if not part:
            continue
        try:
            pairs.extend(
                parse_qsl(
                    part,
                    keep_blank_values=True,
                    encoding="utf-8",
                    errors="strict",
                    max_num_fields=MAX_FIELDS,
                )
            )
        except UnicodeDecodeError:
            raise param_error("Malformed request: a parameter is not valid UTF-8") from None
        except ValueError:
            raise param_error(f"Malformed request: more than {MAX_FIELDS} parameters") from None
    if len(pairs) > MAX_FIELDS:
        raise param_error(f"Malformed request: more than {MAX_FIELDS} parameters")
    for name, _ in pairs:
        if not _NAME_RE.fullmatch(name):
            raise param_error(f"Malformed request: invalid parameter name {name[:40]!r}")
    return pairs


class ApiServer:
    def __init__(self, ctx: ApiContext, jobs: JobRunner, max_bytes: int) -> None:
        self.ctx = ctx
        self.jobs = jobs
        self.max_bytes = max_bytes

    async def _read_body(self, request: web.Request) -> bytes:
        if request.method != "POST":
            return b""
        ctype = request.content_type.lower() if request.content_type else ""
        if ctype == "application/octet-stream" and not request.body_exists:
            return b""  # aiohttp's default content type when none was sent
        if ctype not in _FORM_TYPES and ctype != "application/octet-stream":
            raise param_error(
                f"Unsupported Content-Type {ctype[:60]!r}: send application/x-www-form-urlencoded"
            )
        if request.content_length is not None and request.content_length > self.max_bytes:
            raise ApiError(TOO_LARGE, f"Request body larger than {self.max_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(BODY_TIMEOUT):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > self.max_bytes:
                    raise ApiError(TOO_LARGE, f"Request body larger than {self.max_bytes} bytes")
                chunks.append(chunk)
        return b"".join(chunks)

    async def _authenticate(self, params: Mapping[str, str], lower: Mapping[str, str]) -> User:
        apikey = lower.get("apikey")
        why = ""
        user: User | None = None
        if not apikey or not lower.get("signature"):
            why = "missing apikey or signature"
        elif len(apikey) > MAX_APIKEY_LEN:
            why = "apikey too long"
        else:
            user = await self.ctx.store.get_user_by_apikey(apikey)
            if user is None:
                why = "unknown apikey"
            elif user.state != "enabled":
                why = "user disabled"
            else:
                max_ahead = float(self.ctx.settings.get("sysvm.api.signature.expires.max"))
                try:
                    signing.check(params, user.secretkey, self.ctx.clock(), max_ahead=max_ahead)
                except signing.SignatureError as e:
                    why = str(e)
        if why or user is None:
            log.info("event=api_auth_failed reason=%s", why.replace(" ", "_"))
            raise ApiError(UNAUTHORIZED, AUTH_FAILED_TEXT)
        return user

    async def handle(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        command: ApiCommand | None = None
        cmd_name = ""
        fmt = "json"
        try:
            try:
                body = await self._read_body(request)
                pairs = parse_params(request.rel_url.raw_query_string, body)
            except TimeoutError:
                raise ApiError(408, "Timed out reading the request body") from None
            params = signing.first_values(pairs)
            lower = signing.lower_keys(params)
            fmt = "xml" if lower.get("response", "json").lower() == "xml" else "json"
            cmd_name = lower.get("command", "")
            command = lookup(cmd_name) if cmd_name else None
            user = await self._authenticate(params, lower)
            if not cmd_name:
                raise param_error("Missing parameter command")
            if command is None:
                raise ApiError(
                    UNSUPPORTED_ACTION,
                    f"The given command {cmd_name[:60]!r} does not exist or it is not "
                    "available for user",
                )
            if not allowed(command, user):
                log.info("event=api_denied command=%s user=%s", command.name, user.id)
                raise ApiError(
                    UNAUTHORIZED,
                    f"The given command '{command.name}' either does not exist, is not "
                    "available for user.",
                )
            args = validate(command, lower)
            call = Call(self.ctx, command, args, user, self.jobs, lower)
            result = await command.handler(call)
            inner = self._inner(command, args, result)
            status = 200
            out: dict[str, Any] = {command.response_name: inner}
        except ApiError as e:
            status = e.errorcode
            out = error_body(command.response_name if command else response_name(None), e)
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception(
                "event=api_internal_error command=%s ref=%s",
                command.name if command else "unknown",
                ref,
            )
            status = INTERNAL_ERROR
            err = ApiError(INTERNAL_ERROR, f"Internal error executing command, ref {ref}", 4250)
            out = error_body(command.response_name if command else response_name(None), err)
        data, ctype = render(out, fmt)
        self._account(command, status, time.monotonic() - started)
        return web.Response(
            body=data, status=status, reason=reason(status), headers={"Content-Type": ctype}
        )

    def _inner(self, command: ApiCommand, args: Mapping[str, Any], result: Any) -> dict[str, Any]:
        if isinstance(result, ListResult):
            page, size = paginate_args(
                command, args, int(self.ctx.settings.get("default.page.size"))
            )
            return list_body(result, page, size)
        if isinstance(result, AsyncResult):
            return async_body(result)
        if isinstance(result, dict):
            return result
        raise TypeError(f"{command.name} returned {type(result).__name__}")

    def _account(self, command: ApiCommand | None, status: int, seconds: float) -> None:
        name = command.name if command else "unknown"
        level = logging.DEBUG if status == 200 else logging.INFO
        log.log(
            level, "event=api_request command=%s status=%d ms=%.1f", name, status, seconds * 1000
        )
        metrics = getattr(self.ctx, "metrics", None)
        if metrics is not None:
            try:
                metrics.inc("sysvm_api_requests_total", command=name, status=str(status))
            except Exception:
                log.exception("event=metrics_failed")


JOB_RUNNER = web.AppKey("sysvm_api_jobs", JobRunner)
API_SERVER = web.AppKey("sysvm_api_server", ApiServer)


def setup_api(app: web.Application, ctx: ApiContext) -> None:
    """Mounts ``/client/api`` (GET and POST) and the job runner's lifecycle on ``app``.

    Also wires ``ctx.settings.on_desired_changed`` to ``ctx.links.desired_changed`` when the
    context has links, so settings changes reach connected agents after commit."""
    import manager.api.commands  # noqa: F401  (registers the commands)

    try:
        from manager.metrics import HELP

        HELP.setdefault(
            "sysvm_api_requests_total", ("counter", "API requests by command and HTTP status")
        )
    except ImportError:  # pragma: no cover - metrics are optional for the API
        pass

    jobs = JobRunner()
    server = ApiServer(ctx, jobs, int(ctx.settings.get("sysvm.api.request.max.bytes")))
    app[JOB_RUNNER] = jobs
    app[API_SERVER] = server
    app.router.add_route("GET", "/client/api", server.handle)
    app.router.add_route("POST", "/client/api", server.handle)
    links = getattr(ctx, "links", None)
    if links is not None and hasattr(links, "desired_changed"):
        ctx.settings.on_desired_changed(links.desired_changed)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await jobs.recover(ctx.store, ctx.clock())
        yield
        await jobs.close()

    app.cleanup_ctx.append(lifecycle)
