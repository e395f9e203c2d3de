"""Admin API: devices and their lifecycle state."""

from __future__ import annotations

from aiohttp import web

from fleetward.admin.base import (
    LIMIT,
    MAX_PAGE,
    AdminServices,
    Param,
    Reply,
    Route,
    actor,
    json_response,
    query_int,
)
from fleetward.admin.schemas import (
    DEVICE_ID,
    OWNER,
    SERIAL,
    STATE,
    STRING_OR_NULL,
    TEXT,
    TYPE_NAME,
    items_of,
    nullable,
    obj,
    ref,
)
from fleetward.errors import InvalidInput
from fleetward.model import Operator, Role, parse_state
from fleetward.registry.service import MAX_LABEL_LENGTH, MAX_LABELS
from fleetward.web.problem import read_json, reject_unknown_fields, require_str


async def create_device(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"id", "type", "owner", "labels"})
    labels = body.get("labels", {})
    if not isinstance(labels, dict):
        raise InvalidInput("labels must be a JSON object of strings", hint='{"site": "plant-3"}')
    device = await svc.run(svc.registry.create_device, require_str(body, "id"),
                           require_str(body, "type"),
                           require_str(body, "owner", optional=True, default="default"),
                           labels, actor(op))
    return json_response(device.to_json(), 201)


async def list_devices(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    q = request.query
    limit = query_int(request, "limit", 100, 1, MAX_PAGE)
    state = parse_state(q["state"]) if "state" in q else None
    devices = await svc.run(svc.registry.list_devices, state=state, type_name=q.get("type"),
                            owner=q.get("owner"), after=q.get("after"), limit=limit)
    return json_response({"items": [d.to_json() for d in devices],
                          "next": devices[-1].id if len(devices) == limit else None})


async def get_device(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    device = await svc.run(svc.registry.get_device, request.match_info["device_id"])
    return json_response(device.to_json())


async def change_state(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"state", "reason", "from"})
    target = parse_state(require_str(body, "state"))
    expected_from = None
    if "from" in body:
        sources = body["from"]
        if not isinstance(sources, list) or not sources or not all(
                isinstance(s, str) for s in sources):
            raise InvalidInput("'from' must be a non-empty list of states",
                               hint='e.g. {"state": "active", "from": ["quarantined"]}')
        expected_from = frozenset(parse_state(s) for s in sources)
    change = await svc.run(svc.registry.change_state, request.match_info["device_id"], target,
                           actor(op), require_str(body, "reason", optional=True),
                           expected_from)
    return json_response({"device": change.device.to_json(),
                          "previous_state": change.previous.value,
                          "revoked_certificates": [c.serial_hex for c in change.revoked]})


LABELS = {"type": "object", "maxProperties": MAX_LABELS,
          "propertyNames": {**TEXT, "minLength": 1, "maxLength": MAX_LABEL_LENGTH},
          "additionalProperties": {**TEXT, "maxLength": MAX_LABEL_LENGTH}}

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/devices", Role.AUDITOR, list_devices, "List devices (keyset paging)",
          query=(Param("state", STATE), Param("type", TEXT), Param("owner", TEXT),
                 Param("after", TEXT, "the last id of the previous page (its `next`)"),
                 Param("limit", LIMIT)),
          responses={200: Reply("a page of devices, by id", items_of(
              ref("Device"), next={**STRING_OR_NULL,
                                   "description": "?after= for the next page; null at "
                                                  "the end"}))}),
    Route("POST", "/v1/devices", Role.OPERATOR, create_device, "Register a device",
          {"type": "object", "required": ["id", "type"], "additionalProperties": False,
           "properties": {"id": DEVICE_ID, "type": TYPE_NAME,
                          "owner": nullable({**OWNER, "description": "default \"default\""}),
                          "labels": LABELS}},
          responses={201: Reply("registered (state registered)", ref("Device"))},
          errors={404: "no such device type", 409: "a device with this id exists"}),
    Route("GET", "/v1/devices/{device_id}", Role.AUDITOR, get_device, "Show a device",
          responses={200: Reply("the device", ref("Device"))},
          errors={404: "no such device"}),
    Route("POST", "/v1/devices/{device_id}/state", Role.OPERATOR, change_state,
          "Change a device's lifecycle state",
          {"type": "object", "required": ["state"], "additionalProperties": False,
           "properties": {"state": STATE,
                          "reason": nullable(TEXT),
                          "from": {"type": "array", "minItems": 1, "items": STATE,
                                   "description": "apply only if the device is in one of these"}
                          }},
          responses={200: Reply("changed", obj({
              "device": ref("Device"), "previous_state": STATE,
              "revoked_certificates": {"type": "array", "items": SERIAL,
                                       "description": "serials revoked by this change"}}))},
          errors={404: "no such device",
                  409: "the transitions table does not allow this move, or the device is "
                       "not in a state listed in `from` (`allowed` lists the moves)"}),
)
