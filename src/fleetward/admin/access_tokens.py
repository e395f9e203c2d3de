"""Admin API: device access tokens and the keys that sign them (docs/credentials.md).

Operators issue a token to test a resource server with, inspect one (is it valid now,
why not, what is it bound to), revoke one by its ``jti`` or every token of a device (its
credential generation moves on), and rotate the signing key. A token is never stored,
logged or audited: the audit log names its ``jti``; a token to inspect travels in the
body, never in the URL (access logs keep URLs).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from aiohttp import web

from fleetward.admin.base import AdminServices, Reply, Route, actor, json_response
from fleetward.admin.credentials import shown_once
from fleetward.admin.schemas import (
    ACCESS_TOKEN_GRANT,
    CERTIFICATE_PEM,
    DATE_TIME,
    DEVICE_ID,
    JTI,
    PRESENTED_CNF,
    PUBLIC_KEY_PEM,
    SCOPE,
    STRING,
    TEXT,
    TOKEN_INSPECTION,
    items_of,
    nullable,
    obj,
    ref,
)
from fleetward.errors import InvalidInput, KeyUnavailable
from fleetward.model import Operator, Role
from fleetward.tokens.credentials import parse_public_key
from fleetward.tokens.keys import SigningKey
from fleetward.web.problem import read_json, reject_unknown_fields, require_str

MAX_REASON_CHARS = 1024  # free text for the audit log, not a document
CNF_MEMBERS = ("x5t#S256", "jkt")  # RFC 8705 §3.1, RFC 9449 §6.1
ROTATE_REASON = "rotated by an operator"


def _optional_str(body: dict[str, Any], key: str, max_chars: int | None = None
                  ) -> str | None:
    """An optional string field: absent is None; present, it must be a string (null is
    refused: the document declares these fields as strings)."""
    if key not in body:
        return None
    value = body[key]
    if not isinstance(value, str):
        raise InvalidInput(f"field {key!r} must be a string",
                           hint=f"quote the value of {key!r}, or leave the field out")
    if max_chars is not None and len(value) > max_chars:
        raise InvalidInput(f"field {key!r} is longer than {max_chars} characters",
                           hint="shorten it")
    return value


def _reason(body: dict[str, Any]) -> str:
    reason = require_str(body, "reason", optional=True)
    if len(reason) > MAX_REASON_CHARS:
        raise InvalidInput(f"the reason is longer than {MAX_REASON_CHARS} characters",
                           hint="say it in fewer words; it goes into the audit log")
    return reason


async def issue_access_token(request: web.Request, svc: AdminServices,
                             op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"device_id", "scope", "certificate", "public_key"})
    device_id = require_str(body, "device_id")
    scope = _optional_str(body, "scope")
    certificate = _optional_str(body, "certificate")
    public_key = _optional_str(body, "public_key")
    if certificate is not None and public_key is not None:
        raise InvalidInput("give a certificate or a public key to bind the token to, not both",
                           hint="leave both out to bind it to the device's newest valid "
                                "certificate")
    if public_key is not None:
        parse_public_key(public_key)  # the same checks (and hints) as registering a key
    grant = await svc.run(svc.access_tokens.issue_for_operator, device_id, scope,
                          certificate_pem=certificate, public_key_pem=public_key,
                          actor=actor(op))
    return shown_once({**grant.response(), "jti": grant.issued.claims.jti}, 201)


async def inspect_access_token(request: web.Request, svc: AdminServices,
                               op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"token", "cnf"})
    token = require_str(body, "token")
    cnf = _presented_cnf(body)
    answer = await svc.run(svc.access_tokens.inspect, token, cnf)
    for part in ("header", "claims"):
        if not _plain_json(answer.get(part)):
            answer[part] = None
    return json_response(answer)


def _presented_cnf(body: dict[str, Any]) -> dict[str, str] | None:
    if "cnf" not in body:
        return None
    cnf = body["cnf"]
    example = 'e.g. "cnf": {"x5t#S256": "…"}, {"jkt": "…"} or {} (presented nothing)'
    if not isinstance(cnf, dict) or len(cnf) > 1 or not set(cnf) <= set(CNF_MEMBERS):
        raise InvalidInput("cnf must be an object with at most one of x5t#S256, jkt",
                           hint=example)
    if not all(isinstance(v, str) for v in cnf.values()):
        raise InvalidInput("cnf values must be strings (thumbprints)", hint=example)
    return dict(cnf)


def _plain_json(value: Any) -> bool:
    """Whether ``value`` is JSON as RFC 8259 has it: an unverified token's claims may hold
    NaN or Infinity (Python's parser reads them), which no JSON client can read back."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


async def revoke_access_token(request: web.Request, svc: AdminServices,
                              op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"jti"})
    jti = require_str(body, "jti")
    until = await svc.run(svc.access_tokens.revoke_token, jti, actor(op))
    return json_response({"jti": jti, "refused_until": until.isoformat()})


async def revoke_device_access_tokens(request: web.Request, svc: AdminServices,
                                      op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"reason"})
    device_id = request.match_info["device_id"]
    generation = await svc.run(svc.access_tokens.revoke_device_tokens, device_id,
                               actor(op), _reason(body))
    return json_response({"device_id": device_id, "credential_generation": generation})


def token_key_json(key: SigningKey, active_kid: str | None) -> dict[str, Any]:
    verify_until = (None if math.isinf(key.expires_at_epoch) else
                    dt.datetime.fromtimestamp(key.expires_at_epoch, dt.UTC).isoformat())
    return {"kid": key.kid, "active": key.kid == active_kid,
            "created_at": key.created_at.isoformat(),
            "retired_at": key.retired_at.isoformat() if key.retired_at else None,
            "verify_until": verify_until}


def _active_kid(svc: AdminServices) -> str | None:
    try:
        return svc.signing_keys.signing_key().kid
    except KeyUnavailable:  # listed anyway: the list is how an operator finds out
        return None


async def list_token_keys(request: web.Request, svc: AdminServices,
                          op: Operator) -> web.Response:
    active = _active_kid(svc)
    # The signing key first, then the retired ones, newest first (as the JWKS lists
    # them): times have whole seconds, so a key rotated out in the second it was made
    # would otherwise tie with its successor.
    keys = sorted(svc.signing_keys.keys(),
                  key=lambda k: (k.kid == active, k.created_at), reverse=True)
    return json_response({"items": [token_key_json(k, active) for k in keys]})


async def rotate_token_key(request: web.Request, svc: AdminServices,
                           op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"reason"})
    key = await svc.run(svc.signing_keys.rotate, actor(op), _reason(body) or ROTATE_REASON)
    return json_response(token_key_json(key, key.kid), 201)


_REASON = nullable({**TEXT, "maxLength": MAX_REASON_CHARS,
                    "description": "why; goes into the audit log"})

ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/access-tokens", Role.OPERATOR, issue_access_token,
          "Issue an access token for a device, to test a resource server with (bound to "
          "its newest valid certificate, or to the certificate or public key given)",
          {"type": "object", "required": ["device_id"], "additionalProperties": False,
           "properties": {"device_id": DEVICE_ID, "scope": SCOPE,
                          "certificate": CERTIFICATE_PEM, "public_key": PUBLIC_KEY_PEM},
           "not": {"required": ["certificate", "public_key"]},
           "description": "at most one of certificate, public_key"},
          responses={201: Reply("issued (the token is in this answer only; not stored)",
                                ACCESS_TOKEN_GRANT)},
          errors={404: "no such device",
                  422: "the device is not active or quarantined, has no valid certificate "
                       "(or the one given is not its own, valid one), or its policy opens "
                       "none of the scopes"}),
    Route("POST", "/v1/access-tokens/inspect", Role.AUDITOR, inspect_access_token,
          "Say whether an access token is valid now, why not, and what it is bound to "
          "(read-only; the token is never logged)",
          {"type": "object", "required": ["token"], "additionalProperties": False,
           "properties": {"token": TEXT, "cnf": PRESENTED_CNF}},
          responses={200: Reply("the verdict, whether the token is valid or not",
                                TOKEN_INSPECTION)}),
    Route("POST", "/v1/access-tokens/revoke", Role.OPERATOR, revoke_access_token,
          "Refuse one access token (by its jti) from now on, on every node",
          obj({"jti": JTI}),
          responses={200: Reply("revoked", obj({
              "jti": STRING,
              "refused_until": {**DATE_TIME, "description": "remembered until every "
                                                            "token it could name expired"}}))},
          errors={409: "it is already revoked",
                  429: "[tokens] max_revoked_tokens single revocations are live already: "
                       "revoke the device's tokens instead"}),
    Route("POST", "/v1/devices/{device_id}/access-tokens/revoke", Role.OPERATOR,
          revoke_device_access_tokens,
          "Refuse every access token a device holds (its credential generation moves on); "
          "live sessions using one end",
          obj({"reason": _REASON}, optional=("reason",)),
          responses={200: Reply("revoked", obj({
              "device_id": STRING,
              "credential_generation": {"type": "integer", "minimum": 0,
                                        "description": "tokens with an older fw_gen "
                                                       "are refused"}}))},
          errors={404: "no such device"}),
    Route("GET", "/v1/token-keys", Role.AUDITOR, list_token_keys,
          "List the keys that sign access tokens (the active one and retired ones that "
          "still verify)",
          responses={200: Reply("the signing key first, then the others, newest first",
                                items_of(ref("TokenKey")))}),
    Route("POST", "/v1/token-keys/rotate", Role.ADMIN, rotate_token_key,
          "Create a new signing key; the others retire and verify until every token they "
          "signed has expired",
          obj({"reason": _REASON}, optional=("reason",)),
          responses={201: Reply("the new signing key", ref("TokenKey"))}),
)
