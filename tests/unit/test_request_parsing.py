"""Request bodies, query parameters and problem documents at the HTTP edge (issue 10).

Each vector is an input that once got a 500 or an answer the OpenAPI document does not
describe; the fix lives in ``web/problem.py`` (every listener) or ``admin/base.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request

from fleetward.admin.base import MAX_SQL_INT, body_int, query_int
from fleetward.edge.device import build_device_app
from fleetward.errors import ClientError, InvalidInput, NotFound
from fleetward.web.problem import (
    parse_json,
    problem_middleware,
    read_json,
    refuse_nul_in_target,
)

# --- JSON bodies ---------------------------------------------------------------------------

BAD_JSON: list[tuple[str, bytes, str]] = [
    ("nan-is-not-json", b'{"ttl_seconds": NaN}', "NaN is not a JSON number"),
    ("infinity-is-not-json", b'{"v": -Infinity}', "-Infinity is not a JSON number"),
    # json.loads raised RecursionError: a 500 on every JSON route.
    ("nested-too-deep-was-a-500", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "nested too deeply"),
    # "\udc00" has no UTF-8 encoding: the database driver raised on insert (a 500).
    ("unpaired-surrogate-was-a-500", b'{"description": "\\udc00"}', "unpaired surrogate"),
    ("unpaired-surrogate-in-a-key", b'{"labels": {"\\ud800": "x"}}', "unpaired surrogate"),
    ("unpaired-surrogate-in-a-list", b'{"m": ["ok", ["\\udfff"]]}', "unpaired surrogate"),
    ("reversed-pair", b'{"a": "\\ude0d\\ud83d"}', "unpaired surrogate"),
]


@pytest.mark.parametrize(("raw", "detail"),
                         [pytest.param(r, d, id=case) for case, r, d in BAD_JSON])
def test_bad_json_is_a_client_error(raw: bytes, detail: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_json(raw)
    assert detail in caught.value.message
    assert caught.value.hint != ClientError.default_hint


def test_paired_surrogate_escapes_are_one_character() -> None:
    # Negative control: an escaped emoji (RFC 8259 §7) is fine.
    assert parse_json(b'{"a": "\\ud83d\\ude0d", "b": [1.5, "x"]}') == {"a": "\U0001F60D",
                                                                      "b": [1.5, "x"]}


# --- integer fields and query parameters ----------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [(30, 30), (30.0, 30), (1e3, 1000)])
def test_an_integral_json_number_is_an_integer(value: Any, expected: int) -> None:
    # JSON Schema 2020-12: "integer" is any number with a zero fractional part, so the
    # document's {"type": "integer"} allows 30.0; it was refused with 400.
    assert body_int({"n": value}, "n", None, 1, 10_000) == expected


@pytest.mark.parametrize("value", [30.5, True, "30", float("inf"), [30]])
def test_other_values_are_not_integers(value: Any) -> None:
    with pytest.raises(InvalidInput, match="must be an integer"):
        body_int({"n": value}, "n", None, 1, 100)


def _query(raw: str) -> web.Request:
    return make_mocked_request("GET", f"/v1/audit?{raw}")


@pytest.mark.parametrize(("raw", "detail"), [
    ("after=1_000", "must be an integer"),  # int() takes these; the document does not
    ("after=%205", "must be an integer"),
    ("after=%D9%A3", "must be an integer"),  # ARABIC-INDIC DIGIT THREE
    ("after=%2B5", "must be an integer"),
    ("after=", "must be an integer"),
    # Beyond a 64-bit SQL integer: SQLite's driver raised OverflowError (a 500).
    (f"after={10**20}", "must be between"),
    (f"after={MAX_SQL_INT + 1}", "must be between"),
    ("after=-1", "must be between"),
])
def test_query_integers_are_decimal_and_in_range(raw: str, detail: str) -> None:
    with pytest.raises(InvalidInput, match=detail):
        query_int(_query(raw), "after", 0)


def test_query_integer_bounds_are_inclusive() -> None:
    assert query_int(_query(f"after={MAX_SQL_INT}"), "after", 0) == MAX_SQL_INT
    assert query_int(_query("limit=1000"), "limit", 100, 1, 1000) == 1000
    assert query_int(_query(""), "limit", 100, 1, 1000) == 100


# --- problem documents ----------------------------------------------------------------------

async def _missing(request: web.Request) -> web.Response:
    raise NotFound(f"no device {request.match_info['device_id']!r}")


async def _create(request: web.Request) -> web.Response:
    body = await read_json(request, data=("payload",))
    return web.json_response(body, status=201)


@pytest.fixture
def app() -> web.Application:
    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/v1/devices/{device_id}", _missing)
    app.router.add_post("/v1/devices", _create)
    return app


async def _call(app: web.Application, method: str, path: str, body: bytes | None = None
                ) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with TestServer(app) as server, aiohttp.ClientSession() as session, \
            session.request(method, server.make_url(path).with_path(path, encoded=True),
                            data=body, headers={"Content-Type": "application/json"}
                            ) as response:
        return response.status, dict(response.headers), await response.json(content_type=None)


# PostgreSQL text cannot hold U+0000: storing or looking up such a value failed in the
# driver (a 500 on PostgreSQL; schemathesis found it with ?action=%00).
@pytest.mark.parametrize(("body", "status"), [
    (b'{"id": "a\\u0000b"}', 400),
    (b'{"labels": {"k\\u0000": "v"}}', 400),
    (b'{"ids": ["ok", "\\u0000"]}', 400),
    (b'{"payload": {"blob": "\\u0000"}}', 201),  # the caller's own JSON data, stored as JSON
])
async def test_nul_in_a_body_string_is_refused(app: web.Application, body: bytes,
                                               status: int) -> None:
    answered, _, problem = await _call(app, "POST", "/v1/devices", body)
    assert answered == status, problem
    if status == 400:
        assert "U+0000" in problem["detail"]


@pytest.mark.parametrize(("path", "match_info", "query"), [
    ("/v1/devices/a%00b", {"device_id": "a\x00b"}, False),
    ("/v1/audit?action=%00", {}, True),
    ("/v1/audit?%00=x", {}, True),
])
def test_nul_in_the_request_target_is_refused(path: str, match_info: dict[str, str],
                                              query: bool) -> None:
    request = make_mocked_request("GET", path, match_info=match_info)
    with pytest.raises(InvalidInput, match="U\\+0000"):
        refuse_nul_in_target(request, query=query)


def test_undeclared_query_parameters_are_not_read() -> None:
    # A route without query parameters never passes them to the database.
    refuse_nul_in_target(make_mocked_request("GET", "/v1/whoami?x=%00"), query=False)


@pytest.fixture
def apps(app: web.Application) -> Iterator[dict[str, web.Application]]:
    yield {"minimal": app, "device": build_device_app()}


@pytest.mark.parametrize(("which", "method", "path", "allow"), [
    ("minimal", "DELETE", "/v1/devices/d1", "GET,HEAD"),
    ("minimal", "PUT", "/v1/devices", "POST"),
    ("device", "POST", "/v1/health", "GET,HEAD"),
])
async def test_405_keeps_the_allow_header(apps: dict[str, web.Application], which: str,
                                          method: str, path: str, allow: str) -> None:
    # RFC 9110 §15.5.6: a 405 MUST carry Allow; rewriting aiohttp's error into
    # problem+json dropped it.
    status, headers, problem = await _call(apps[which], method, path)
    assert status == 405 and problem["status"] == 405
    assert headers["Content-Type"].startswith("application/problem+json")
    assert sorted(headers["Allow"].split(",")) == sorted(allow.split(","))


async def test_no_allow_header_on_other_errors(app: web.Application) -> None:
    status, headers, _ = await _call(app, "GET", "/v1/no-such-route")
    assert status == 404 and "Allow" not in headers


async def test_instance_is_a_uri_reference(app: web.Application) -> None:
    # RFC 9457 §3.1.5: the path as sent, percent-encoded; request.path is decoded, and put
    # control characters and non-ASCII into "instance".
    status, _, problem = await _call(app, "GET", "/v1/devices/%C3%A9%09x")
    assert status == 404
    assert problem["instance"] == "/v1/devices/%C3%A9%09x"
    assert problem["detail"] == "no device 'é\\tx'"
