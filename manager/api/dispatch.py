"""The API command registry, parameter specs and validation.

How to add a command
--------------------
1. Pick the module for its area under ``manager/api/commands/`` (or add one and list it in
   ``manager/api/commands/__init__.py``).
2. Write an ``async def`` taking a :class:`Call` and decorate it::

       @api_command(
           "stopSystemVm",
           "Stops a system VM",
           params=(Param("id", PType.UUID, required=True, description="the system VM"),
                   Param("forced", PType.BOOLEAN)),
           is_async=True,
       )
       async def stop_system_vm(call: Call) -> AsyncResult:
           vm_id = call.args["id"]                 # already validated and typed
           ...
           job_id = await call.jobs.submit(call.ctx, "stopSystemVm", call.user.account_id,
                                           work, "SystemVm", vm_id)
           return AsyncResult(job_id, id=vm_id)

   Pass ``admin=True`` for commands only root admins may call; a command open to users
   must itself limit what it shows to ``call.user``'s account.
3. Return a ``dict`` (rendered as ``{"<cmd>response": dict}``), a
   :class:`~manager.api.responses.ListResult` (with ``listing=True``: ``keyword``, ``page``,
   ``pagesize``, ``listall`` are added to the spec and pagination is done for you) or an
   :class:`~manager.api.responses.AsyncResult`. Raise ``ApiError``/``param_error`` for
   errors the client should see; anything else becomes a 530 with a reference in the log.

The spec drives both validation (required, type, uuid, ranges, choices, length) and
``listApis``. Unknown parameters are ignored, as CloudStack does.
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from manager.api.responses import AsyncResult, ListResult, param_error
from manager.settings import Settings
from manager.store.base import Store, User

if TYPE_CHECKING:
    from manager.api.jobs import JobRunner


class ApiContext(Protocol):
    """What the API needs from ``manager.context.ManagerContext`` (read-only view). Optional
    parts (``links``, ``metrics``, ``hypervisors``) are looked up with ``getattr``."""

    @property
    def home(self) -> Path: ...
    @property
    def store(self) -> Store: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def clock(self) -> Callable[[], float]: ...


class PType(enum.StrEnum):
    """CloudStack's parameter types (as listApis shows them)."""

    STRING = "string"
    UUID = "uuid"
    INTEGER = "integer"
    LONG = "long"
    SHORT = "short"
    BOOLEAN = "boolean"
    DATE = "date"
    LIST = "list"
    MAP = "map"


_INT_BOUNDS = {
    PType.SHORT: (-(2**15), 2**15 - 1),
    PType.INTEGER: (-(2**31), 2**31 - 1),
    PType.LONG: (-(2**63), 2**63 - 1),
}
_MAP_KEY = re.compile(r"^([a-z0-9_]+)\[(\d{1,4})\]\.([a-z0-9_]+)$")
MAX_LIST_ITEMS = 1000
MAX_MAP_ENTRIES = 256


@dataclass(frozen=True, slots=True)
class Param:
    name: str  # lower-case, as CloudStack spells parameter names
    type: PType = PType.STRING
    required: bool = False
    description: str = ""
    min: int | None = None
    max: int | None = None
    choices: tuple[str, ...] = ()  # case-insensitive; the value is returned as declared
    length: int = 255
    item_type: PType = PType.STRING  # for LIST
    since: str = ""
    related: str = ""

    def convert(self, raw: str) -> Any:
        """Typed value of ``raw`` or a 431 :class:`ApiError` naming the parameter."""
        name = self.name
        if self.type is PType.LIST:
            items = [p.strip() for p in raw.split(",") if p.strip()]
            if len(items) > MAX_LIST_ITEMS:
                raise param_error(f"Parameter {name} has more than {MAX_LIST_ITEMS} items")
            item = Param(name, self.item_type, length=self.length)
            return [item.convert(i) for i in items]
        if self.type is PType.STRING:
            if len(raw) > self.length:
                raise param_error(
                    f"Parameter {name} is longer than {self.length} characters ({len(raw)} given)"
                )
            if self.choices:
                for c in self.choices:
                    if raw.lower() == c.lower():
                        return c
                raise param_error(
                    f"Invalid value for parameter {name}: expected one of "
                    f"{', '.join(self.choices)}, got {_clip(raw)!r}"
                )
            return raw
        if self.type is PType.UUID:
            try:
                return str(uuid.UUID(raw.strip())) if len(raw) <= 64 else _bad_uuid(name, raw)
            except ValueError:
                _bad_uuid(name, raw)
        if self.type is PType.BOOLEAN:
            low = raw.strip().lower()
            if low in ("true", "false"):
                return low == "true"
            raise param_error(f"Invalid value for parameter {name}: expected true or false")
        if self.type in _INT_BOUNDS:
            text = raw.strip()
            if len(text) > 24 or not re.fullmatch(r"[+-]?\d+", text):
                raise param_error(
                    f"Invalid value for parameter {name}: expected an integer, got {_clip(raw)!r}"
                )
            value = int(text)
            lo, hi = _INT_BOUNDS[self.type]
            if self.min is not None:
                lo = max(lo, self.min)
            if self.max is not None:
                hi = min(hi, self.max)
            if not lo <= value <= hi:
                raise param_error(
                    f"Invalid value for parameter {name}: {value} is not between {lo} and {hi}"
                )
            return value
        if self.type is PType.DATE:
            return parse_date(name, raw)
        raise param_error(f"Parameter {name} cannot be given as a plain value")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "type": self.type.value,
            "length": self.length,
            "required": self.required,
            "since": self.since,
            "related": self.related,
        }


def _bad_uuid(name: str, raw: str) -> Any:
    raise param_error(f"Invalid value for parameter {name}: {_clip(raw)!r} is not a UUID")


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


def parse_date(name: str, raw: str) -> float:
    """CloudStack's ``yyyy-MM-dd``, ``yyyy-MM-dd HH:mm:ss`` or ISO 8601; UTC if no zone."""
    text = raw.strip()
    if len(text) <= 40:
        for fmt in ("%Y-%m-%d", "%Y-%m-%d %H:%M:%S"):
            try:
                return datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp()
            except ValueError:
                pass
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return when.timestamp()
    raise param_error(
        f"Invalid value for parameter {name}: expected a date (yyyy-MM-dd or "
        f"yyyy-MM-dd HH:mm:ss), got {_clip(raw)!r}"
    )


LISTING_PARAMS = (
    Param("keyword", description="List by keyword", length=255),
    Param("page", PType.INTEGER, description="Page number, from 1", min=1),
    Param(
        "pagesize",
        PType.INTEGER,
        description="Items per page; -1 for all",
        min=-1,
        max=100_000,
    ),
    Param("listall", PType.BOOLEAN, description="List all resources the caller may see"),
)


@dataclass(frozen=True, slots=True)
class Call:
    """One validated API call, handed to a command handler."""

    ctx: ApiContext
    command: ApiCommand
    args: Mapping[str, Any]  # typed values of the parameters given, by lower-case name
    user: User
    jobs: JobRunner
    raw: Mapping[str, str] = field(default_factory=dict)  # lower-cased names, first values

    def get(self, name: str, default: Any = None) -> Any:
        return self.args.get(name, default)


Result = dict[str, Any] | ListResult | AsyncResult
Handler = Callable[[Call], Awaitable[Result]]


@dataclass(frozen=True, slots=True)
class ApiCommand:
    name: str  # CloudStack's camelCase name
    handler: Handler
    description: str
    params: tuple[Param, ...]
    is_async: bool = False
    listing: bool = False
    related: str = ""
    since: str = ""
    response_fields: tuple[str, ...] = ()
    admin: bool = False  # root admins only (CloudStack's admin APIs)

    @property
    def response_name(self) -> str:
        return f"{self.name.lower()}response"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "isasync": self.is_async,
            "related": self.related,
            "since": self.since,
            "type": "",
            "params": [p.describe() for p in self.params],
            "response": [{"name": f, "description": "", "type": ""} for f in self.response_fields],
        }


REGISTRY: dict[str, ApiCommand] = {}


def api_command(
    name: str,
    description: str,
    *,
    params: tuple[Param, ...] = (),
    is_async: bool = False,
    listing: bool = False,
    related: str = "",
    since: str = "",
    response_fields: tuple[str, ...] = (),
    admin: bool = False,
) -> Callable[[Handler], Handler]:
    """Registers a handler under ``name`` (lookup is case-insensitive). ``admin=True``: only
    root admins may call it (others get CloudStack's 401 "not available for user")."""

    def register(fn: Handler) -> Handler:
        key = name.lower()
        if key in REGISTRY:
            raise RuntimeError(f"API command {name} registered twice")
        all_params = params + (LISTING_PARAMS if listing else ())
        names = [p.name for p in all_params]
        if len(set(names)) != len(names) or any(n != n.lower() for n in names):
            raise RuntimeError(f"API command {name}: duplicate or non-lower-case parameter")
        REGISTRY[key] = ApiCommand(
            name=name,
            handler=fn,
            description=description,
            params=all_params,
            is_async=is_async,
            listing=listing,
            related=related,
            since=since,
            response_fields=response_fields,
            admin=admin,
        )
        return fn

    return register


def lookup(name: str) -> ApiCommand | None:
    return REGISTRY.get(name.lower())


ROOT_ADMIN = 1  # CloudStack's account type of root admins


def is_root_admin(user: User) -> bool:
    return user.account_type == ROOT_ADMIN


def allowed(command: ApiCommand, user: User) -> bool:
    return not command.admin or is_root_admin(user)


def validate(command: ApiCommand, raw: Mapping[str, str]) -> dict[str, Any]:
    """Typed arguments from lower-cased raw parameters, per the command's spec."""
    args: dict[str, Any] = {}
    for p in command.params:
        if p.type is PType.MAP:
            entries = collect_map(p.name, raw)
            if entries:
                args[p.name] = entries
            elif p.required:
                raise param_error(
                    f"Unable to execute API command {command.name.lower()} due to missing "
                    f"parameter {p.name}"
                )
            continue
        value = raw.get(p.name)
        if value is None or (value == "" and not p.required and p.type is not PType.STRING):
            if p.required:
                raise param_error(
                    f"Unable to execute API command {command.name.lower()} due to missing "
                    f"parameter {p.name}"
                )
            continue
        if value == "" and p.required and p.type is not PType.STRING:
            raise param_error(f"Parameter {p.name} must not be empty")
        args[p.name] = p.convert(value)
    if command.listing and "page" in args and "pagesize" not in args:
        raise param_error("Page size should be specified with page")
    if args.get("pagesize") == 0:
        raise param_error("Invalid value for parameter pagesize: 0 (use -1 for all)")
    return args


def collect_map(name: str, raw: Mapping[str, str]) -> list[dict[str, str]]:
    """``name[0].key=a&name[0].value=b`` -> ``[{"key": "a", "value": "b"}]`` (by index)."""
    by_index: dict[int, dict[str, str]] = {}
    for k, v in raw.items():
        m = _MAP_KEY.match(k)
        if not m or m.group(1) != name:
            continue
        by_index.setdefault(int(m.group(2)), {})[m.group(3)] = v
        if len(by_index) > MAX_MAP_ENTRIES:
            raise param_error(f"Parameter {name} has more than {MAX_MAP_ENTRIES} entries")
    return [by_index[i] for i in sorted(by_index)]


def paginate_args(
    command: ApiCommand, args: Mapping[str, Any], default_size: int
) -> tuple[int | None, int | None]:
    """(page, pagesize) to apply, ``(None, None)`` for everything."""
    if not command.listing:
        return None, None
    size = args.get("pagesize")
    page = args.get("page")
    if size == -1:
        return None, None
    if size is None:
        size = default_size
    return (page or 1), size


def keyword_match(keyword: str | None, *fields: Any) -> bool:
    """CloudStack's ``keyword``: case-insensitive substring of any of the fields."""
    if not keyword:
        return True
    k = keyword.lower()
    return any(f is not None and k in str(f).lower() for f in fields)
