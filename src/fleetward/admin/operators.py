"""Admin API: operator tokens."""

from __future__ import annotations

from aiohttp import web

from fleetward.admin.base import AdminServices, Reply, Route, actor, json_response
from fleetward.admin.schemas import ROLE, STRING, TEXT, items_of, obj, ref
from fleetward.errors import InvalidInput
from fleetward.model import Operator, Role
from fleetward.web.problem import read_json, reject_unknown_fields, require_str


async def list_operators(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    rows = await svc.run(svc.tokens.list)
    return json_response({"items": [{"token_id": r.token_id, "name": r.name, "role": r.role.value,
                                     "created_at": r.created_at.isoformat(),
                                     "revoked": r.revoked_at is not None} for r in rows]})


async def create_operator(request: web.Request, svc: AdminServices,
                          op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"name", "role"})
    role_name = require_str(body, "role")
    try:
        role = Role(role_name)
    except ValueError:
        raise InvalidInput(f"unknown role {role_name!r}",
                           hint=f"use one of: {', '.join(r.value for r in Role)}") from None
    token = await svc.run(svc.tokens.create, require_str(body, "name"), role, actor(op))
    return json_response({"name": body["name"], "role": role.value, "token": token,
                          "note": "store this token now; it cannot be shown again"}, 201)


async def revoke_operator(request: web.Request, svc: AdminServices,
                          op: Operator) -> web.Response:
    await svc.run(svc.tokens.revoke, request.match_info["token_id"], actor(op))
    return web.Response(status=204)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/operators", Role.ADMIN, list_operators, "List operator tokens",
          responses={200: Reply("every token, revoked ones included",
                                items_of(ref("Operator")))}),
    Route("POST", "/v1/operators", Role.ADMIN, create_operator,
          "Create an operator token (shown once)",
          {"type": "object", "required": ["name", "role"], "additionalProperties": False,
           "properties": {"name": {**TEXT, "minLength": 1, "maxLength": 128},
                          "role": ROLE}},
          responses={201: Reply("created", obj({
              "name": STRING, "role": ROLE,
              "token": {"type": "string", "pattern": "^fwa_[0-9a-f]{16}\\.[A-Za-z0-9_-]{43}$",
                        "description": "shown once; stored only as a SHA-256"},
              "note": STRING}))}),
    Route("DELETE", "/v1/operators/{token_id}", Role.ADMIN, revoke_operator,
          "Revoke an operator token", responses={204: Reply("revoked")},
          errors={404: "no active operator token with this id",
                  409: "it is the last active admin token"}),
)
