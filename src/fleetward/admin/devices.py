"""Admin API: devices and their lifecycle state."""

from __future__ import annotations

from aiohttp import web

from fleetward.admin.base import STRING, AdminServices, Route, actor, json_response, query_int
from fleetward.errors import InvalidInput
from fleetward.model import Operator, Role, parse_state
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
    limit = query_int(request, "limit", 100)
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


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/devices", Role.AUDITOR, list_devices, "List devices (keyset paging)",
          query=("state", "type", "owner", "after", "limit")),
    Route("POST", "/v1/devices", Role.OPERATOR, create_device, "Register a device",
          {"type": "object", "required": ["id", "type"], "additionalProperties": False,
           "properties": {"id": STRING, "type": STRING, "owner": STRING,
                          "labels": {"type": "object", "additionalProperties": STRING}}}),
    Route("GET", "/v1/devices/{device_id}", Role.AUDITOR, get_device, "Show a device"),
    Route("POST", "/v1/devices/{device_id}/state", Role.OPERATOR, change_state,
          "Change a device's lifecycle state",
          {"type": "object", "required": ["state"], "additionalProperties": False,
           "properties": {"state": {"enum": ["registered", "active", "disabled", "quarantined",
                                             "compromised", "retired"]},
                          "reason": STRING,
                          "from": {"type": "array", "items": STRING,
                                   "description": "apply only if the device is in one of these"}
                          }}),
)
