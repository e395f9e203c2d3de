"""Admin API: policies and their attachments."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fleetward.admin.base import STRING, AdminServices, Route, actor, json_response
from fleetward.errors import InvalidInput
from fleetward.model import Operator, Role
from fleetward.web.problem import read_json, reject_unknown_fields, require_str

POLICY_YAML_TYPES = ("application/yaml", "application/x-yaml")


async def list_policies(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    items = await svc.run(svc.policies.list)
    return json_response({"items": [p.to_json(with_document=False) for p in items]})


async def get_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    info = await svc.run(svc.policies.get, request.match_info["name"])
    return json_response(info.to_json())


async def put_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    """The body is the document itself: JSON, or YAML with a YAML content type."""
    if request.content_type == "application/json":
        fmt = "json"
    elif request.content_type in POLICY_YAML_TYPES:
        fmt = "yaml"
    else:
        raise InvalidInput(f"expected a JSON or YAML policy document, got "
                           f"{request.content_type or 'nothing'}",
                           hint="send Content-Type: application/json or application/yaml")
    # Read raw: the policy parser refuses duplicate keys, which request.json() would hide.
    text = await request.read()
    info = await svc.run(svc.policies.put, request.match_info["name"], text, actor(op),
                         fmt=fmt)
    return json_response(info.to_json(), 201 if info.version == 1 else 200)


async def delete_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    await svc.run(svc.policies.delete, request.match_info["name"], actor(op))
    return web.Response(status=204)


def _attachment_target(values: dict[str, Any], example: str) -> tuple[str, str]:
    """Exactly one of ``type`` / ``device``, a non-empty string."""
    given = [(k, v) for k, v in values.items() if k in ("type", "device")]
    unknown = sorted(set(values) - {"type", "device"})
    if unknown or len(given) != 1 or not isinstance(given[0][1], str) or not given[0][1]:
        raise InvalidInput("give exactly one of 'type' (a device type) or 'device' "
                           "(a device id)", hint=f"e.g. {example}")
    return given[0][0], given[0][1]


async def attach_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    kind, target = _attachment_target(body, '{"type": "sensor"} or {"device": "dev-1"}')
    name = request.match_info["name"]
    created = await svc.run(svc.policies.attach, name, kind, target, actor(op))
    return json_response({"policy": name, "kind": kind, "target": target, "changed": created},
                         201 if created else 200)


async def detach_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    kind, target = _attachment_target(dict(request.query), "?type=sensor or ?device=dev-1")
    await svc.run(svc.policies.detach, request.match_info["name"], kind, target, actor(op))
    return web.Response(status=204)


async def explain_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"device_id", "action", "resource", "cert_serial"})
    serial = body.get("cert_serial")
    if serial is not None and not isinstance(serial, str):
        raise InvalidInput("cert_serial must be a hex string", hint='e.g. "cert_serial": "1a2b"')
    result = await svc.run(svc.policies.test, require_str(body, "device_id"),
                           require_str(body, "action"), require_str(body, "resource"), serial)
    return json_response(result)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/policies", Role.AUDITOR, list_policies,
          "List policies (built-in ones included) and where they are attached"),
    Route("POST", "/v1/policies/test", Role.AUDITOR, explain_policy,
          "Explain a policy decision for a device (read-only: changes nothing)",
          {"type": "object", "required": ["device_id", "action", "resource"],
           "additionalProperties": False,
           "properties": {"device_id": STRING,
                          "action": {"type": "string",
                                     "description": "e.g. mqtt:publish, http:GET"},
                          "resource": {"type": "string",
                                       "description": "topic, topic filter (subscribe), "
                                                      "client id (connect), request path "
                                                      "without '/' (http)"},
                          "cert_serial": {"type": "string",
                                          "description": "hex, for ${cert.serial}"}}}),
    Route("GET", "/v1/policies/{name}", Role.AUDITOR, get_policy,
          "Show a policy: document, version, attachments"),
    Route("PUT", "/v1/policies/{name}", Role.ADMIN, put_policy,
          "Create or replace a policy (JSON body, or YAML with Content-Type "
          "application/yaml); 201 when created",
          {"type": "object", "required": ["statements"], "additionalProperties": False,
           "properties": {
               "version": {"enum": ["2026-11"]},
               "statements": {"type": "array", "minItems": 1, "maxItems": 100, "items": {
                   "type": "object", "required": ["effect", "actions", "resources"],
                   "additionalProperties": False,
                   "properties": {"sid": STRING, "effect": {"enum": ["allow", "deny"]},
                                  "actions": {"type": "array", "items": STRING},
                                  "resources": {"type": "array", "items": STRING,
                                                "maxItems": 100}}}}}}),
    Route("DELETE", "/v1/policies/{name}", Role.ADMIN, delete_policy,
          "Delete a policy that is not attached anywhere"),
    Route("POST", "/v1/policies/{name}/attachments", Role.ADMIN, attach_policy,
          "Attach a policy to a device type or a device (idempotent; 201 when new)",
          {"type": "object", "additionalProperties": False,
           "properties": {"type": STRING, "device": STRING},
           "description": "exactly one of type, device"}),
    Route("DELETE", "/v1/policies/{name}/attachments", Role.ADMIN, detach_policy,
          "Detach a policy from ?type=T or ?device=D", query=("type", "device")),
)
