"""The admin API's OpenAPI 3 document, generated from a route table."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fleetward import __version__
from fleetward.admin.base import STRING, Route


def openapi_document(routes: Iterable[Route]) -> dict[str, Any]:
    problem_ref = {"$ref": "#/components/responses/Problem"}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "responses": {"200": {"description": "OK"}, "default": problem_ref},
        }
        if route.role is None:
            op["security"] = []
        else:
            op["x-fleetward-role"] = route.role.value
        params = [{"name": name, "in": "path", "required": True, "schema": STRING}
                  for name in _path_params(route.path)]
        params += [{"name": name, "in": "query", "required": False, "schema": STRING}
                   for name in route.query]
        if params:
            op["parameters"] = params
        if route.body is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": route.body}}}
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Fleetward admin API", "version": __version__},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Problem": {
                "description": "RFC 9457 problem details",
                "content": {"application/problem+json": {"schema": {"type": "object"}}}}},
        },
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]
