"""RFC 9457 problem details for every HTTP listener."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from fleetward.errors import FleetwardError, InvalidInput

log = structlog.get_logger("fleetward.http")

PROBLEM_CONTENT_TYPE = "application/problem+json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem_response(status: int, problem: dict[str, Any]) -> web.Response:
    return web.Response(status=status, text=json.dumps(problem),
                        content_type=PROBLEM_CONTENT_TYPE)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into problem+json; never leak a traceback to the client."""
    try:
        return await handler(request)
    except FleetwardError as exc:
        problem = exc.to_problem()
        problem["instance"] = request.path
        return problem_response(exc.status, problem)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        hint = {404: "check the path; GET /openapi.json lists the routes",
                405: "check the HTTP method for this path",
                413: "the request body is too large"}.get(exc.status, "check the request")
        return problem_response(exc.status, {
            "type": "about:blank", "title": exc.reason, "status": exc.status,
            "detail": exc.text or exc.reason, "hint": hint, "instance": request.path})
    except Exception:
        log.exception("unhandled error", path=request.path, method=request.method)
        return problem_response(500, {
            "type": "https://fleetward.dev/problems/internal-error", "title": "Internal error",
            "status": 500, "detail": "the server failed to handle this request",
            "hint": "retry later; the server log has the details", "instance": request.path})


def parse_json(raw: bytes) -> Any:
    """A request body as JSON (RFC 8259: UTF-8).

    Raises:
        InvalidInput: not UTF-8, or not valid JSON (with line and column).
    """
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidInput("the body is not UTF-8",
                           hint="encode JSON as UTF-8 (RFC 8259 §8.1)") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc.msg} at line {exc.lineno} "
                           f"column {exc.colno}",
                           hint="check the JSON, e.g. with `python -m json.tool`") from None


async def read_json(request: web.Request) -> dict[str, Any]:
    """The JSON object body of ``request``.

    Raises:
        InvalidInput: wrong content type, invalid JSON, or not an object.
    """
    if request.content_type != "application/json":
        raise InvalidInput(f"expected application/json, got {request.content_type or 'nothing'}",
                           hint="send a JSON object with Content-Type: application/json")
    body = parse_json(await request.read())
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", hint='e.g. {"id": "dev-1"}')
    return body


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
