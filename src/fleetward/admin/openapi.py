"""The admin API's OpenAPI 3.1 document, generated from a route table.

Every operation lists the statuses it really answers with: its own success statuses and
problem statuses (``Route.responses``, ``Route.errors``), plus those every route of its
kind has — 401 and 403 when it needs a role (``admin.app._guard``), 400 when it reads a
body, query or path parameters (``web.problem.read_json``, ``refuse_nul_in_target``),
413 with a body (``MAX_BODY_BYTES``), and 5XX (the database failed, or a bug). Errors
are RFC 9457 ``application/problem+json``. There is no ``default`` response: a status
the document does not name is a bug that ``tests/integration/test_openapi_schemathesis.py``
reports.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fleetward import __version__
from fleetward.admin import schemas
from fleetward.admin.base import MAX_BODY_BYTES, Param, Route

PROBLEM_TYPE = "application/problem+json"

# Path parameters by name, unless a route says otherwise (Route.path_params).
PATH_PARAMS: dict[str, Param] = {
    "device_id": Param("device_id", schemas.DEVICE_ID, "a device id"),
    "serial": Param("serial", schemas.SERIAL_INPUT, "certificate serial number"),
    "name": Param("name", schemas.POLICY_NAME, "policy name"),
    "token_id": Param("token_id", schemas.TOKEN_ID, "token id (not the secret)"),
}

# What each status means when a route does not say more.
GENERIC_ERRORS: dict[int, str] = {
    400: "malformed request: not a JSON object of the documented shape, a field or "
         "parameter out of range, U+0000 in a string (the problem's detail and hint name "
         "it)",
    401: "missing, malformed, unknown or revoked bearer token",
    403: "the token's role may not do this",
    404: "no such object",
    409: "conflicts with the current state",
    413: f"the body is larger than {MAX_BODY_BYTES} bytes",
    422: "well-formed but refused by a rule (the detail names it)",
    429: "a limit is reached; retry later",
}
SERVER_ERROR = "the server failed (a bug) or its database is unavailable (503)"


def openapi_document(routes: Iterable[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``.

    Raises:
        KeyError: a path parameter has no schema (add it to PATH_PARAMS or the route).
    """
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "responses": responses(route),
        }
        if route.role is None:
            op["security"] = []
        else:
            op["x-fleetward-role"] = route.role.value
        overrides = {p.name: p for p in route.path_params}
        params = [_parameter(overrides.get(name) or PATH_PARAMS[name], "path")
                  for name in _path_params(route.path)]
        params += [_parameter(p, "query") for p in route.query]
        if params:
            op["parameters"] = params
        if route.body is not None:
            op["requestBody"] = {"required": True, "content": {
                media_type: {"schema": route.body} for media_type in route.body_types}}
        paths.setdefault(route.path, {})[route.method.lower()] = op
    _document_shadowed_methods(paths)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Fleetward admin API", "version": __version__},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas.COMPONENTS,
        },
    }


def error_statuses(route: Route) -> dict[int, str]:
    """The problem statuses ``route`` can answer with, and what each means there."""
    out: dict[int, str] = {}
    if route.body is not None or route.query or "{" in route.path:
        out[400] = GENERIC_ERRORS[400]
    if route.role is not None:
        out[401] = GENERIC_ERRORS[401]
        out[403] = GENERIC_ERRORS[403]
    if route.body is not None:
        out[413] = GENERIC_ERRORS[413]
    for status, description in route.errors.items():
        out[status] = description or GENERIC_ERRORS[status]
    return dict(sorted(out.items()))


def responses(route: Route) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, reply in sorted(route.responses.items()):
        entry: dict[str, Any] = {"description": reply.description}
        if reply.schema is not None:
            entry["content"] = {"application/json": {"schema": reply.schema}}
        out[str(status)] = entry
    problem = {PROBLEM_TYPE: {"schema": schemas.ref("Problem")}}
    for status, description in error_statuses(route).items():
        out[str(status)] = {"description": description, "content": problem}
    out["5XX"] = {"description": SERVER_ERROR, "content": problem}
    return out


def _document_shadowed_methods(paths: dict[str, dict[str, Any]]) -> None:
    """Copy a templated path's operations onto a concrete path it also matches.

    OpenAPI matches a concrete path before a templated one (3.1 §4.8.8), so
    ``/v1/policies/{name}`` does not cover ``/v1/policies/test``. aiohttp, though, tries
    the next route when a path matches but the method does not: GET, PUT and DELETE
    ``/v1/policies/test`` address the policy named "test", and a 405 there allows the
    methods of both. The copies say so (``x-fleetward-same-as`` names the original).
    """
    order = list(paths)
    for index, concrete in enumerate(order):
        if "{" in concrete:
            continue
        for templated in order[index + 1:]:  # aiohttp tries routes in table order
            fixed = _fixed_params(concrete, templated)
            if not fixed:
                continue
            for method, op in paths[templated].items():
                if method in paths[concrete]:
                    continue
                copy = dict(op)
                copy["operationId"] = "_".join([op["operationId"], *fixed.values()])
                named = ", ".join(f"{k} {v}" for k, v in fixed.items())
                copy["summary"] = f"{op['summary']} ({named})"
                copy["x-fleetward-same-as"] = templated
                params = [p for p in op.get("parameters", [])
                          if not (p["in"] == "path" and p["name"] in fixed)]
                if params:
                    copy["parameters"] = params
                else:
                    copy.pop("parameters", None)
                paths[concrete][method] = copy


def _fixed_params(concrete: str, templated: str) -> dict[str, str] | None:
    """{param: value} if ``templated`` matches the path ``concrete``, else None."""
    have, want = concrete.split("/"), templated.split("/")
    if "{" not in templated or len(have) != len(want):
        return None
    fixed: dict[str, str] = {}
    for segment, pattern in zip(have, want, strict=True):
        if pattern.startswith("{"):
            fixed[pattern[1:-1]] = segment
        elif pattern != segment:
            return None
    return fixed


def _parameter(param: Param, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": param.name, "in": where,
                           "required": where == "path" or param.required,
                           "schema": param.schema}
    if param.description:
        out["description"] = param.description
    return out


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]
