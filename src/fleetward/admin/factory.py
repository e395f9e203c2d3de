"""Admin API: factory provisioning (batches of devices with tokens, factory CSR signing)."""

from __future__ import annotations

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
    BOOLEAN,
    DATE_TIME,
    DEVICE_ID,
    OWNER,
    SERIAL,
    STRING,
    TOKEN_ID,
    TTL_HOURS,
    TYPE_NAME,
    items_of,
    nullable,
    obj,
)
from fleetward.enroll.factory import ID_RANDOM_HEX, MAX_FACTORY_BATCH, FactoryService
from fleetward.model import Operator, Role
from fleetward.web.problem import read_json, reject_unknown_fields, require_str

DEFAULT_FACTORY_TTL_HOURS = 24 * 30  # factory units wait in stock before installation


def _factory(svc: AdminServices) -> FactoryService:
    return FactoryService(svc.db, svc.registry, svc.bootstrap, svc.audit, svc.clock)


async def factory_tokens(request: web.Request, svc: AdminServices,
                         op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"type", "count", "owner", "id_prefix", "ttl_hours"})
    created = await svc.run(_factory(svc).create_batch, require_str(body, "type"),
                            body_int(body, "count", None, 1, MAX_FACTORY_BATCH),
                            require_str(body, "owner", optional=True, default="default"),
                            require_str(body, "id_prefix", optional=True),
                            ttl(body, DEFAULT_FACTORY_TTL_HOURS), actor(op))
    return json_response({"items": [{"device_id": device_id, "token": t.token,
                                     "token_id": t.token_id, "expires_at": t.expires_at.isoformat()}
                                    for device_id, t in created]}, 201)


async def factory_sign(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"type", "device_id", "csr_pem", "owner"})
    record, reused = await svc.run(
        _factory(svc).sign, require_str(body, "type"), require_str(body, "device_id"),
        require_str(body, "csr_pem").encode(),
        require_str(body, "owner", optional=True, default="default"), actor(op))
    return json_response({"serial": record.serial_hex, "device_id": record.device_id,
                          "not_after": record.not_after.isoformat(), "pem": record.pem,
                          "reused": reused}, 200 if reused else 201)


_PREFIX_CHARS = 128 - ID_RANDOM_HEX  # the id is the prefix and 12 random hex digits
ID_PREFIX = {"type": "string",
             "pattern": f"^(?:[A-Za-z0-9][A-Za-z0-9._:-]{{0,{_PREFIX_CHARS - 1}}})?$",
             "description": "e.g. plant3-; each device id is this and 12 random hex digits"}
_SIGNED = obj({"serial": SERIAL, "device_id": STRING, "not_after": DATE_TIME, "pem": STRING,
               "reused": BOOLEAN})

ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/factory/tokens", Role.OPERATOR, factory_tokens,
          "Register N new devices with one single-use bootstrap token each (shown once)",
          {"type": "object", "required": ["type", "count"], "additionalProperties": False,
           "properties": {"type": TYPE_NAME,
                          "count": {"type": "integer", "minimum": 1,
                                    "maximum": MAX_FACTORY_BATCH},
                          "owner": nullable(OWNER), "id_prefix": nullable(ID_PREFIX),
                          "ttl_hours": {**TTL_HOURS, "description": "token lifetime in hours "
                                                                    "(default 720)"}}},
          responses={201: Reply("registered, with their tokens", items_of(obj({
              "device_id": STRING, "token": STRING, "token_id": TOKEN_ID,
              "expires_at": DATE_TIME})))},
          errors={404: "no such device type",
                  409: "no free device id could be drawn with this prefix"}),
    Route("POST", "/v1/factory/sign", Role.OPERATOR, factory_sign,
          "Sign a factory CSR for a device, registering it if new (idempotent per CSR: "
          "200 with reused=true if already signed)",
          {"type": "object", "required": ["type", "device_id", "csr_pem"],
           "additionalProperties": False,
           "properties": {"type": TYPE_NAME, "device_id": DEVICE_ID,
                          "csr_pem": {"type": "string", "description": "PKCS#10 request, PEM"},
                          "owner": nullable(OWNER)}},
          responses={200: Reply("already signed from this CSR: the same certificate",
                                _SIGNED),
                     201: Reply("signed", _SIGNED)},
          errors={404: "no such device type",
                  409: "the device exists with another type, or this CSR was signed for "
                       "another device",
                  422: "the CSR is refused (key type, extensions, names another device) or "
                       "the device's state allows no certificate"}),
)
