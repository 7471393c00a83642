"""Parameter specs, validation, pagination and response shapes (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

import manager.api.commands  # noqa: F401  (registers the commands)
from manager.api.dispatch import (
    REGISTRY,
    ApiCommand,
    Param,
    PType,
    collect_map,
    keyword_match,
    lookup,
    paginate_args,
    validate,
)
from manager.api.responses import (
    ApiError,
    AsyncResult,
    ListResult,
    async_body,
    error_body,
    fmt_date,
    list_body,
    render,
)

UUID = "3f1c1d3e-8a55-4c2e-9a43-0d9c7f1b2a10"


async def _noop(call: Any) -> dict[str, Any]:
    return {}


def cmd(*params: Param, listing: bool = False) -> ApiCommand:
    from manager.api.dispatch import LISTING_PARAMS

    return ApiCommand(
        name="testCmd",
        handler=_noop,
        description="t",
        params=params + (LISTING_PARAMS if listing else ()),
        listing=listing,
    )


def err(fn: Any, *a: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*a)
    return info.value


def test_required_and_missing() -> None:
    c = cmd(Param("name", required=True), Param("zoneid", PType.UUID))
    assert validate(c, {"name": "x"}) == {"name": "x"}
    e = err(validate, c, {})
    assert e.errorcode == 431 and e.cserrorcode == 4350
    assert "missing parameter name" in e.text
    # unknown parameters are ignored, as CloudStack does
    assert validate(c, {"name": "x", "bogus": "1"}) == {"name": "x"}


@pytest.mark.parametrize(
    ("param", "raw", "expected"),
    [
        (Param("id", PType.UUID), UUID.upper(), UUID),
        (Param("b", PType.BOOLEAN), "TRUE", True),
        (Param("b", PType.BOOLEAN), "false", False),
        (Param("n", PType.INTEGER), " 42 ", 42),
        (Param("n", PType.LONG), str(2**62), 2**62),
        (Param("d", PType.DATE), "2024-05-01", 1714521600.0),
        (Param("d", PType.DATE), "2024-05-01 00:00:01", 1714521601.0),
        (Param("l", PType.LIST), "a, b,,c", ["a", "b", "c"]),
        (
            Param("s", choices=("consoleproxy", "secondarystoragevm")),
            "ConsoleProxy",
            "consoleproxy",
        ),
    ],
)
def test_convert_ok(param: Param, raw: str, expected: Any) -> None:
    assert param.convert(raw) == expected


@pytest.mark.parametrize(
    ("param", "raw", "text"),
    [
        (Param("id", PType.UUID), "not-a-uuid", "id"),
        (Param("id", PType.UUID), "x" * 10_000, "not a UUID"),
        (Param("b", PType.BOOLEAN), "yes", "true or false"),
        (Param("n", PType.INTEGER), "1e3", "expected an integer"),
        (Param("n", PType.INTEGER), str(2**31), "not between"),
        (Param("n", PType.INTEGER, min=1, max=5), "6", "not between 1 and 5"),
        (Param("n", PType.SHORT), "9" * 100, "expected an integer"),
        (Param("d", PType.DATE), "yesterday", "expected a date"),
        (Param("s", length=5), "123456", "longer than 5"),
        (Param("s", choices=("a",)), "b", "expected one of a"),
        (Param("l", PType.LIST, item_type=PType.UUID), f"{UUID},zz", "not a UUID"),
        (Param("l", PType.LIST), ",".join(["a"] * 1001), "more than 1000"),
    ],
)
def test_convert_errors_are_431(param: Param, raw: str, text: str) -> None:
    e = err(param.convert, raw)
    assert e.errorcode == 431 and text in e.text


def test_map_parameters() -> None:
    c = cmd(Param("details", PType.MAP))
    raw = {"details[1].key": "b", "details[0].key": "a", "details[0].value": "1", "other": "x"}
    assert validate(c, raw) == {"details": [{"key": "a", "value": "1"}, {"key": "b"}]}
    assert collect_map("details", {"details[x].key": "a"}) == []
    too_many = {f"details[{i}].k": "v" for i in range(300)}
    assert err(collect_map, "details", too_many).errorcode == 431


def test_paging_rules() -> None:
    c = cmd(listing=True)
    assert "page size should be specified" in err(validate, c, {"page": "2"}).text.lower()
    assert err(validate, c, {"page": "0", "pagesize": "5"}).errorcode == 431
    assert err(validate, c, {"pagesize": "0"}).errorcode == 431
    args = validate(c, {"page": "2", "pagesize": "3"})
    assert paginate_args(c, args, 500) == (2, 3)
    assert paginate_args(c, validate(c, {"pagesize": "-1"}), 500) == (None, None)
    assert paginate_args(c, {}, 500) == (1, 500)
    assert paginate_args(cmd(), {}, 500) == (None, None)


def test_list_body_shapes() -> None:
    items = [{"id": str(i)} for i in range(7)]
    assert list_body(ListResult("zone", items), 2, 3) == {
        "count": 7,
        "zone": [{"id": "3"}, {"id": "4"}, {"id": "5"}],
    }
    assert list_body(ListResult("zone", items), 9, 3) == {"count": 7, "zone": []}
    assert list_body(ListResult("zone", []), 1, 500) == {}  # CloudStack's empty list


def test_error_and_async_shapes() -> None:
    assert error_body("listzonesresponse", ApiError(431, "bad")) == {
        "listzonesresponse": {
            "uuidList": [],
            "errorcode": 431,
            "cserrorcode": 4350,
            "errortext": "bad",
        }
    }
    assert error_body("x", ApiError(401, "no")) == {
        "x": {"uuidList": [], "errorcode": 401, "errortext": "no"}
    }
    assert async_body(AsyncResult("j", id="i")) == {"id": "i", "jobid": "j"}
    assert fmt_date(0) == "1970-01-01T00:00:00+0000"


def test_render_json_and_xml() -> None:
    body = {"listzonesresponse": {"count": 1, "zone": [{"id": "a<b", "ok": True}]}}
    data, ctype = render(body, "json")
    assert ctype.startswith("application/json") and json.loads(data) == body
    data, ctype = render(body, "xml")
    assert ctype.startswith("text/xml")
    assert b"<zone><id>a&lt;b</id><ok>true</ok></zone>" in data
    assert data.startswith(b"<?xml")


def test_registry_is_coherent() -> None:
    for name in (
        "listZones",
        "listPods",
        "listClusters",
        "listHosts",
        "listSystemVms",
        "listConfigurations",
        "updateConfiguration",
        "listAlerts",
        "listEvents",
        "queryAsyncJobResult",
        "listCapabilities",
        "listApis",
    ):
        c = lookup(name.upper())
        assert c is not None and c.name == name
    for c in REGISTRY.values():
        d = c.describe()
        assert d["name"] == c.name and isinstance(d["params"], list)
        assert all(p["name"] == p["name"].lower() for p in d["params"])
        if c.listing:
            assert {"page", "pagesize", "keyword", "listall"} <= {p.name for p in c.params}


def test_keyword_match() -> None:
    assert keyword_match(None, "x")
    assert keyword_match("ZON", "zone1")
    assert not keyword_match("q", "zone1", None)
