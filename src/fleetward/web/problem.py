"""RFC 9457 problem details for every HTTP listener."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from fleetward.errors import FleetwardError, InvalidInput

log = structlog.get_logger("fleetward.http")

PROBLEM_CONTENT_TYPE = "application/problem+json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem_response(status: int, problem: dict[str, Any]) -> web.Response:
    return web.Response(status=status, text=json.dumps(problem),
                        content_type=PROBLEM_CONTENT_TYPE)


# Headers of aiohttp's HTTP errors that carry meaning and must survive the rewrite into
# problem+json: a 405 MUST list the allowed methods (RFC 9110 §15.5.6).
KEPT_ERROR_HEADERS = ("Allow",)


def instance_of(request: web.Request) -> str:
    """The problem's ``instance``: a URI reference (RFC 9457 §3.1.5), so the path as sent,
    percent-encoded; ``request.path`` is decoded and may hold any character."""
    return request.rel_url.raw_path


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into problem+json; never leak a traceback to the client."""
    try:
        return await handler(request)
    except FleetwardError as exc:
        problem = exc.to_problem()
        problem["instance"] = instance_of(request)
        return problem_response(exc.status, problem)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        hint = {404: "check the path; GET /openapi.json lists the routes",
                405: "check the HTTP method for this path",
                413: "the request body is too large"}.get(exc.status, "check the request")
        response = problem_response(exc.status, {
            "type": "about:blank", "title": exc.reason, "status": exc.status,
            "detail": exc.text or exc.reason, "hint": hint, "instance": instance_of(request)})
        for name in KEPT_ERROR_HEADERS:
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except (web.RequestPayloadError, HttpProcessingError):
        # The body broke its framing or its Content-Encoding: the client's fault. Not
        # logged here: the parser's message may quote the raw bytes; the listener's
        # request-error logger reports it in one line (web/request_errors.py).
        return problem_response(400, {
            "type": "about:blank", "title": "Bad Request", "status": 400,
            "detail": "the request body could not be read", "hint":
            "check Content-Length, Transfer-Encoding and Content-Encoding",
            "instance": instance_of(request)})
    except Exception:
        log.exception("unhandled error", path=request.path, method=request.method)
        return problem_response(500, {
            "type": "https://fleetward.dev/problems/internal-error", "title": "Internal error",
            "status": 500, "detail": "the server failed to handle this request",
            "hint": "retry later; the server log has the details",
            "instance": instance_of(request)})


def parse_json(raw: bytes) -> Any:
    """A request body as JSON (RFC 8259: UTF-8).

    Raises:
        InvalidInput: not UTF-8, not valid JSON (with line and column), NaN or Infinity,
            nested deeper than Python's parser recurses, or a string with an unpaired
            surrogate escape (``"\\udc00"``: no UTF-8 encoding exists, so the database
            driver would fail on it).
    """
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise InvalidInput("the body is not UTF-8",
                           hint="encode JSON as UTF-8 (RFC 8259 §8.1)") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc.msg} at line {exc.lineno} "
                           f"column {exc.colno}",
                           hint="check the JSON, e.g. with `python -m json.tool`") from None
    except RecursionError:
        raise InvalidInput("the body is nested too deeply",
                           hint="send a flatter JSON document") from None
    # A surrogate can only come from a \\uD800-\\uDFFF escape (UTF-8 has none): the
    # walk runs only when the raw text has one (≈ 6 µs saved on a typical telemetry body).
    if _SURROGATE_ESCAPE.search(raw) and _holds(value, _SURROGATE):
        raise InvalidInput("the body has a string with an unpaired surrogate escape",
                           hint="\\ud800-\\udfff escapes must come in pairs "
                                "(RFC 8259 §7, §8.2)")
    return value


# Paired escapes were joined into one code point by the parser, so any surrogate left
# is unpaired.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
NUL = "\x00"


def _holds(value: Any, pattern: re.Pattern[str]) -> bool:
    """Does a string (or key) anywhere in the JSON ``value`` match ``pattern``?
    Iterative: json.loads already bounded the depth, not the width."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if pattern.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _no_constant(name: str) -> Any:
    # Python's json reads NaN, Infinity and -Infinity; RFC 8259 §6 has no such numbers,
    # and one that got through would fail later, where it is stored or compared.
    raise InvalidInput(f"the body is not valid JSON: {name} is not a JSON number",
                       hint="send finite numbers only (RFC 8259 §6)")


async def read_json(request: web.Request, *, data: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object body of ``request`` (admin API).

    Args:
        data: top-level members that are the caller's own JSON data (a command payload),
            stored as JSON, where U+0000 is allowed.

    Raises:
        InvalidInput: wrong content type, invalid JSON, not an object, or a string holding
            U+0000 (PostgreSQL text cannot store it: the insert or lookup failed, a 500).
    """
    if request.content_type != "application/json":
        raise InvalidInput(f"expected application/json, got {request.content_type or 'nothing'}",
                           hint="send a JSON object with Content-Type: application/json")
    body = parse_json(await request.read())
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", hint='e.g. {"id": "dev-1"}')
    if _holds({k: v for k, v in body.items() if k not in data}, _NUL):
        raise InvalidInput("a string in the body holds U+0000", hint=_NUL_HINT)
    return body


_NUL = re.compile(NUL)
_NUL_HINT = "no name, id or text here may contain the null character (\\u0000)"


def refuse_nul_in_target(request: web.Request, *, query: bool) -> None:
    """Refuse U+0000 (%00) in the path's parameters and, with ``query``, in the query.

    Raises:
        InvalidInput: it is there; PostgreSQL text cannot hold it, so looking the value
            up would fail in the driver (a 500) instead.
    """
    values = [*request.match_info.values()]
    if query:
        values += [*request.query.keys(), *request.query.values()]
    if any(NUL in value for value in values):
        raise InvalidInput("the request path or query holds U+0000 (%00)", hint=_NUL_HINT)


def require_str(body: dict[str, Any], key: str, *, optional: bool = False,
                default: str = "") -> str:
    value = body.get(key)
    if value is None:
        if optional:
            return default
        raise InvalidInput(f"missing field {key!r}", hint=f"add {key!r} to the JSON body")
    if not isinstance(value, str):
        raise InvalidInput(f"field {key!r} must be a string", hint=f"quote the value of {key!r}")
    return value


def reject_unknown_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)}",
                           hint=f"allowed fields: {', '.join(sorted(allowed))}")
