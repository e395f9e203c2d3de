"""Admin API: device credentials besides certificates (docs/credentials.md): a device's
symmetric keys (``sk_…``, for SAS tokens and ``client_secret_jwt``) and its registered
public keys (``pk_…``, for ``private_key_jwt``).

Keys are in exactly one answer each, the one that creates them (``primary_key``,
``secondary_key``) or regenerates them (``key``), sent with ``Cache-Control: no-store``
(RFC 9111 §5.2.2.5); never in a URL, a log line or the audit log (the service audits
ids, kinds and versions only).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fleetward.admin.base import AdminServices, Param, Reply, Route, actor, json_response
from fleetward.admin.schemas import (
    CREDENTIAL_ID,
    NEW_SLOT_KEY,
    NEW_SYMMETRIC_CREDENTIAL,
    PUBLIC_KEY_PEM,
    SLOT,
    SYMMETRIC_CREDENTIAL_ID,
    items_of,
    obj,
    ref,
)
from fleetward.errors import InvalidInput, NotFound
from fleetward.model import Operator, Role
from fleetward.store.device_credentials import PUBLIC_KEY, SLOTS, SYMMETRIC_KEY
from fleetward.web.problem import read_json, reject_unknown_fields, require_str


def shown_once(data: Any, status: int = 200) -> web.Response:
    """An answer that carries a secret shown this once: no cache may keep it (RFC 9111
    §5.2.2.5; RFC 6749 §5.1 asks the same of token responses)."""
    response = json_response(data, status)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


async def add_credential(request: web.Request, svc: AdminServices,
                         op: Operator) -> web.Response:
    body = await read_json(request)
    kind = require_str(body, "kind")
    device_id = request.match_info["device_id"]
    if kind == SYMMETRIC_KEY:
        reject_unknown_fields(body, {"kind"})
        created = await svc.run(svc.credentials.add_symmetric, device_id, actor(op))
        return shown_once(created.to_json(), 201)
    if kind == PUBLIC_KEY:
        reject_unknown_fields(body, {"kind", "public_key"})
        info = await svc.run(svc.credentials.add_public_key, device_id,
                             require_str(body, "public_key"), actor(op))
        return json_response(info.to_json(), 201)
    raise InvalidInput(f"unknown credential kind {kind!r}",
                       hint=f'use {SYMMETRIC_KEY} or {PUBLIC_KEY}, e.g. {{"kind": '
                            f'"{SYMMETRIC_KEY}"}}')


async def list_device_credentials(request: web.Request, svc: AdminServices,
                                  op: Operator) -> web.Response:
    items = await svc.run(svc.credentials.list, request.match_info["device_id"])
    return json_response({"items": [c.to_json() for c in items]})


async def get_credential(request: web.Request, svc: AdminServices,
                         op: Operator) -> web.Response:
    info = await svc.run(svc.credentials.get, request.match_info["credential_id"])
    if info.revoked_at is not None:
        # DELETE took it away: reading it back is a 404 (RFC 9110 §9.3.5), while the
        # device's list keeps it, marked revoked, for the record.
        raise NotFound(f"credential {info.id} was revoked at {info.revoked_at.isoformat()}",
                       hint=f"fleetward credential list --device {info.device_id} lists "
                            "revoked credentials too",
                       device_id=info.device_id, revoked_at=info.revoked_at.isoformat())
    return json_response(info.to_json())


async def rotate_credential(request: web.Request, svc: AdminServices,
                            op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"slot"})
    slot = require_str(body, "slot")
    if slot not in SLOTS:
        raise InvalidInput(f"unknown slot {slot!r}",
                           hint='use primary or secondary, e.g. {"slot": "secondary"}')
    new_key = await svc.run(svc.credentials.rotate_symmetric,
                            request.match_info["credential_id"], slot, actor(op))
    return shown_once(new_key.to_json())


async def revoke_credential(request: web.Request, svc: AdminServices,
                            op: Operator) -> web.Response:
    info = await svc.run(svc.credentials.revoke, request.match_info["credential_id"],
                         actor(op))
    return json_response(info.to_json())


_CREDENTIAL_ID = Param("credential_id", CREDENTIAL_ID, "a credential id (not a key)")
_SYMMETRIC_ID = Param("credential_id", SYMMETRIC_CREDENTIAL_ID,
                      "a symmetric credential (sk_…): public keys have no slots to rotate")
_NOT_ADDABLE = ("the device is compromised or retired (it gets no new credentials), or "
                "already has its maximum of public keys")

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/devices/{device_id}/credentials", Role.AUDITOR,
          list_device_credentials,
          "List a device's symmetric keys and registered public keys (never the keys)",
          responses={200: Reply("every credential of the device, revoked ones too, oldest "
                                "first", items_of(ref("Credential")))},
          errors={404: "no such device"}),
    Route("POST", "/v1/devices/{device_id}/credentials", Role.OPERATOR, add_credential,
          "Give a device symmetric keys (shown once) or register a public key for its "
          "client assertions",
          {"oneOf": [obj({"kind": {"enum": [SYMMETRIC_KEY]}},
                         description="two random keys, primary and secondary"),
                     obj({"kind": {"enum": [PUBLIC_KEY]}, "public_key": PUBLIC_KEY_PEM},
                         description="an EC P-256 public key of the device")]},
          responses={201: Reply("added; a symmetric credential's keys are in this answer "
                                "only (a public key's answer has no keys)",
                                {"oneOf": [NEW_SYMMETRIC_CREDENTIAL, ref("Credential")]})},
          errors={404: "no such device",
                  409: "it already has a live symmetric credential (rotate a slot "
                       "instead), or the public key is registered already",
                  422: _NOT_ADDABLE}),
    Route("GET", "/v1/credentials/{credential_id}", Role.AUDITOR, get_credential,
          "Show a live credential (never its keys)",
          responses={200: Reply("the credential", ref("Credential"))},
          errors={404: "no such credential, or it was revoked (the device's list keeps "
                       "revoked ones; `revoked_at` says when)"},
          path_params=(_CREDENTIAL_ID,)),
    Route("POST", "/v1/credentials/{credential_id}/rotate", Role.OPERATOR, rotate_credential,
          "Regenerate one slot of a symmetric credential (the new key is shown once); "
          "sessions signed with the old key end",
          obj({"slot": SLOT}),
          responses={200: Reply("regenerated: the slot's new key and version",
                                NEW_SLOT_KEY)},
          errors={404: "no such credential", 409: "it is revoked",
                  422: "the device is compromised or retired"},
          path_params=(_SYMMETRIC_ID,)),
    Route("DELETE", "/v1/credentials/{credential_id}", Role.OPERATOR, revoke_credential,
          "Revoke a credential at once; the device's access tokens are refused from now "
          "on. It is no longer shown by id; the device's list keeps it, marked revoked",
          responses={200: Reply("revoked", ref("Credential"))},
          errors={404: "no such credential", 409: "it is already revoked"},
          path_params=(_CREDENTIAL_ID,)),
)
