"""Admin API: device types."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fleetward.admin.base import AdminServices, Reply, Route, actor, json_response, str_list
from fleetward.admin.schemas import DEVICE_PROFILES, TEXT, TYPE_NAME, items_of, nullable, ref
from fleetward.model import DeviceType, Operator, Role
from fleetward.web.problem import read_json, reject_unknown_fields, require_str


def _type_json(t: DeviceType) -> dict[str, Any]:
    return {"name": t.name, "description": t.description,
            "message_types": list(t.message_types),
            "enrollment_profiles": list(t.enrollment_profiles)}


async def list_types(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    types = await svc.run(svc.registry.list_types)
    return json_response({"items": [_type_json(t) for t in types]})


async def create_type(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"name", "description", "message_types", "enrollment_profiles"})
    message_types = str_list(body, "message_types", '["telemetry", "event"]') or []
    profiles = str_list(body, "enrollment_profiles", '["device", "gateway"]')
    t = await svc.run(svc.registry.create_type, require_str(body, "name"),
                      require_str(body, "description", optional=True), message_types,
                      actor(op), enrollment_profiles=profiles)
    return json_response(_type_json(t), 201)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/device-types", Role.AUDITOR, list_types, "List device types",
          responses={200: Reply("every device type", items_of(ref("DeviceType")))}),
    Route("POST", "/v1/device-types", Role.OPERATOR, create_type, "Create a device type",
          {"type": "object", "required": ["name"], "additionalProperties": False,
           "properties": {"name": TYPE_NAME, "description": nullable(TEXT),
                          "message_types": nullable({"type": "array", "items": TEXT}),
                          "enrollment_profiles": nullable({
                              "type": "array", "items": {"enum": list(DEVICE_PROFILES)},
                              "description": "profiles (EST labels) its devices may enroll "
                                             "for; default [\"device\"]"})}},
          responses={201: Reply("created", ref("DeviceType"))},
          errors={409: "a device type with this name exists"}),
)
