"""Admin API: API keys for back-end services and resource servers (``fwk_<id>.<secret>``,
docs/credentials.md "API keys").

Creating and rotating keys is the admin's: a key with ``tokens:introspect`` reads every
device's token claims. The key is in the one answer that creates or rotates it (with
``Cache-Control: no-store``); only its SHA-256 is stored.
"""

from __future__ import annotations

import datetime as dt

from aiohttp import web

from fleetward.admin.base import (
    AdminServices,
    Param,
    Reply,
    Route,
    actor,
    body_int,
    json_response,
)
from fleetward.admin.credentials import shown_once
from fleetward.admin.schemas import API_KEY_ID, NEW_API_KEY, items_of, obj, ref
from fleetward.errors import InvalidInput, NotFound
from fleetward.model import Operator, Role
from fleetward.tokens.api_keys import API_KEY_SCOPES, MAX_GRACE, MAX_NAME_CHARS, MAX_TTL
from fleetward.web.problem import read_json, reject_unknown_fields, require_str

# Whole hours, as for bootstrap tokens; the service allows 1 minute .. MAX_TTL.
MAX_TTL_HOURS = int(MAX_TTL.total_seconds()) // 3600
MAX_GRACE_SECONDS = int(MAX_GRACE.total_seconds())


async def create_api_key(request: web.Request, svc: AdminServices,
                         op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"name", "scopes", "ttl_hours"})
    name = require_str(body, "name")
    scopes = body.get("scopes")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise InvalidInput("scopes must be a list of scope names",
                           hint=f'e.g. "scopes": ["{API_KEY_SCOPES[0]}"]')
    ttl = None
    if "ttl_hours" in body:
        ttl = dt.timedelta(hours=body_int(body, "ttl_hours", None, 1, MAX_TTL_HOURS))
    created = await svc.run(svc.api_keys.create, name, scopes, actor(op), ttl)
    return shown_once(created.to_json(), 201)


async def list_api_keys(request: web.Request, svc: AdminServices,
                        op: Operator) -> web.Response:
    items = await svc.run(svc.api_keys.list)
    return json_response({"items": [k.to_json() for k in items]})


async def get_api_key(request: web.Request, svc: AdminServices,
                      op: Operator) -> web.Response:
    info = await svc.run(svc.api_keys.get, request.match_info["key_id"])
    if info.revoked_at is not None:
        # As for device credentials: DELETE took it away; the list keeps it for the record.
        raise NotFound(f"API key {info.key_id} was revoked at "
                       f"{info.revoked_at.isoformat()}",
                       hint="fleetward credential list --api-keys lists revoked keys too",
                       revoked_at=info.revoked_at.isoformat())
    return json_response(info.to_json())


async def rotate_api_key(request: web.Request, svc: AdminServices,
                         op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"grace_seconds"})
    grace = body_int(body, "grace_seconds", 0, 0, MAX_GRACE_SECONDS)
    rotated = await svc.run(svc.api_keys.rotate, request.match_info["key_id"], actor(op),
                            dt.timedelta(seconds=grace))
    return shown_once(rotated.to_json())


async def revoke_api_key(request: web.Request, svc: AdminServices,
                         op: Operator) -> web.Response:
    info = await svc.run(svc.api_keys.revoke, request.match_info["key_id"], actor(op))
    return json_response(info.to_json())


_KEY_ID = (Param("key_id", API_KEY_ID, "an API key id (not the key)"),)
# ApiKeyService: 1-128 characters, none of them a control character (names are shown in
# tables and logs).
_NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS,
         "pattern": f"^[^\\u0000-\\u001f\\u007f]{{1,{MAX_NAME_CHARS}}}$",
         "description": "what the key is for; printable characters"}

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/api-keys", Role.AUDITOR, list_api_keys,
          "List API keys (never the keys)",
          responses={200: Reply("every key, revoked and expired ones too, oldest first",
                                items_of(ref("ApiKey")))}),
    Route("POST", "/v1/api-keys", Role.ADMIN, create_api_key,
          "Create an API key (shown once)",
          {"type": "object", "required": ["name", "scopes"], "additionalProperties": False,
           "properties": {
               "name": _NAME,
               "scopes": {"type": "array", "minItems": 1,
                          "items": {"enum": list(API_KEY_SCOPES)}},
               "ttl_hours": {"type": "integer", "minimum": 1, "maximum": MAX_TTL_HOURS,
                             "description": "lifetime in hours; absent: until revoked"}}},
          responses={201: Reply("created", NEW_API_KEY)}),
    Route("GET", "/v1/api-keys/{key_id}", Role.AUDITOR, get_api_key,
          "Show a live API key (never the key)",
          responses={200: Reply("the key (expired ones too)", ref("ApiKey"))},
          errors={404: "no such API key, or it was revoked (the list keeps revoked ones; "
                       "`revoked_at` says when)"},
          path_params=_KEY_ID),
    Route("POST", "/v1/api-keys/{key_id}/rotate", Role.ADMIN, rotate_api_key,
          "Give an API key a new secret (shown once); the previous one works for "
          "grace_seconds more",
          obj({"grace_seconds": {
              "type": "integer", "minimum": 0, "maximum": MAX_GRACE_SECONDS,
              "description": "how long the previous secret keeps working (default 0: it "
                             "stops now, as for a leaked key)"}}, optional=("grace_seconds",)),
          responses={200: Reply("rotated", NEW_API_KEY)},
          errors={404: "no such API key", 409: "it is revoked or expired"},
          path_params=_KEY_ID),
    Route("DELETE", "/v1/api-keys/{key_id}", Role.ADMIN, revoke_api_key,
          "Revoke an API key (and a previous secret in its grace period) at once; the "
          "list keeps it, marked revoked",
          responses={200: Reply("revoked", ref("ApiKey"))},
          errors={404: "no such API key", 409: "it is already revoked"},
          path_params=_KEY_ID),
)
