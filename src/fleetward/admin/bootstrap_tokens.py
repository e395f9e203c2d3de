"""Admin API: bootstrap tokens (enrollment, RFC 7030)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fleetward.admin.base import (
    AdminServices,
    Reply,
    Route,
    actor,
    body_int,
    json_response,
    ttl,
)
from fleetward.admin.schemas import (
    DATE_TIME,
    OWNER,
    STRING,
    STRING_OR_NULL,
    TOKEN_ID,
    TTL_HOURS,
    TYPE_NAME,
    nullable,
    obj,
)
from fleetward.enroll import IssuedToken
from fleetward.enroll.bootstrap import MAX_BATCH as MAX_CLAIM_BATCH
from fleetward.errors import InvalidInput
from fleetward.model import Operator, Role
from fleetward.web.problem import read_json, reject_unknown_fields, require_str


def _token_json(issued: IssuedToken) -> dict[str, Any]:
    return {"token": issued.token, "token_id": issued.token_id,
            "expires_at": issued.expires_at.isoformat(), "max_uses": issued.max_uses}


async def create_device_token(request: web.Request, svc: AdminServices,
                              op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"ttl_hours"})
    device_id = request.match_info["device_id"]
    issued = await svc.run(svc.bootstrap.issue_for_device, device_id, ttl(body), actor(op))
    return json_response({**_token_json(issued), "device_id": device_id}, 201)


async def create_batch_token(request: web.Request, svc: AdminServices,
                             op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"type", "count", "ttl_hours", "owner"})
    device_type = require_str(body, "type")
    count = body_int(body, "count", None, 1, MAX_CLAIM_BATCH)
    owner = body.get("owner")
    if owner is not None and (not isinstance(owner, str) or not 1 <= len(owner) <= 128):
        raise InvalidInput("owner must be a string of 1-128 characters", hint='"owner": "acme"')
    issued = await svc.run(svc.bootstrap.issue_batch, device_type, count, ttl(body),
                           actor(op), owner=owner)
    return json_response({**_token_json(issued), "device_type": device_type, "owner": owner}, 201)


async def revoke_bootstrap_token(request: web.Request, svc: AdminServices,
                                 op: Operator) -> web.Response:
    await svc.run(svc.bootstrap.revoke, request.match_info["token_id"], actor(op))
    return web.Response(status=204)


_TOKEN_FIELDS = {
    "token": {"type": "string", "pattern": "^fwb_[0-9a-f]{16}\\.[A-Za-z0-9_-]{43}$",
              "description": "shown once; stored only as a SHA-256"},
    "token_id": TOKEN_ID, "expires_at": DATE_TIME,
    "max_uses": {"type": "integer", "minimum": 1}}

ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/devices/{device_id}/bootstrap-tokens", Role.OPERATOR,
          create_device_token, "Issue a single-use bootstrap token for a device (shown once)",
          {"type": "object", "additionalProperties": False,
           "properties": {"ttl_hours": TTL_HOURS}},
          responses={201: Reply("issued", obj({**_TOKEN_FIELDS, "device_id": STRING}))},
          errors={404: "no such device"}),
    Route("POST", "/v1/bootstrap-tokens", Role.OPERATOR, create_batch_token,
          "Issue a claim-batch bootstrap token for N new devices of a type (shown once)",
          {"type": "object", "required": ["type", "count"], "additionalProperties": False,
           "properties": {"type": TYPE_NAME,
                          "count": {"type": "integer", "minimum": 1,
                                    "maximum": MAX_CLAIM_BATCH},
                          "ttl_hours": TTL_HOURS, "owner": nullable(OWNER)}},
          responses={201: Reply("issued", obj({**_TOKEN_FIELDS, "device_type": STRING,
                                               "owner": STRING_OR_NULL}))},
          errors={404: "no such device type"}),
    Route("DELETE", "/v1/bootstrap-tokens/{token_id}", Role.OPERATOR, revoke_bootstrap_token,
          "Revoke a bootstrap token", responses={204: Reply("revoked")},
          errors={404: "no active bootstrap token with this id"}),
)
