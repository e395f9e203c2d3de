"""Admin API: policies and their attachments."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fleetward.admin.base import AdminServices, Param, Reply, Route, actor, json_response
from fleetward.admin.schemas import (
    ACTION,
    DEVICE_ID,
    POLICY_NAME,
    SERIAL_INPUT,
    TEXT,
    TYPE_NAME,
    items_of,
    nullable,
    obj,
    ref,
)
from fleetward.errors import InvalidInput
from fleetward.model import Operator, Role
from fleetward.policy import BUILTIN_POLICIES, QUARANTINE_POLICY_NAME
from fleetward.registry.policies import MAX_POLICIES_PER_TARGET, MAX_TEST_RESOURCE_BYTES
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
    return json_response(await _attachment_result(svc, name, kind, target, created),
                         201 if created else 200)


async def detach_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    kind, target = _attachment_target(dict(request.query), "?type=sensor or ?device=dev-1")
    name = request.match_info["name"]
    await svc.run(svc.policies.detach, name, kind, target, actor(op))
    return json_response(await _attachment_result(svc, name, kind, target, True))


async def _attachment_result(svc: AdminServices, name: str, kind: str, target: str,
                             changed: bool) -> dict[str, Any]:
    """What an attach or detach answers: the change, the policies that now apply to the
    target (``PolicyService.effective``) and warnings, such as devices that lost
    mqtt:connect when a deny-only policy replaced the built-in default."""
    effective = await svc.run(svc.policies.effective, kind, target)
    return {"policy": name, "kind": kind, "target": target, "changed": changed,
            "effective": effective.to_json(),
            "warnings": [w.to_json() for w in effective.warnings]}


async def explain_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"device_id", "action", "resource", "cert_serial"})
    serial = body.get("cert_serial")
    if serial is not None and not isinstance(serial, str):
        raise InvalidInput("cert_serial must be a hex string", hint='e.g. "cert_serial": "1a2b"')
    result = await svc.run(svc.policies.test, require_str(body, "device_id"),
                           require_str(body, "action"), require_str(body, "resource"), serial)
    return json_response(result)




def _name_except(*excluded: str) -> Param:
    """The {name} parameter without ``excluded``: "test" on /v1/policies/{name} (the
    document lists /v1/policies/test as a path of its own, where POST explains and GET,
    PUT and DELETE address the policy named "test"), and the built-in names where PUT,
    DELETE and attach refuse them (422)."""
    names = sorted(excluded)
    return Param("name", {
        **POLICY_NAME,
        "pattern": "^(?!(?:" + "|".join(names) + ")$)" + POLICY_NAME["pattern"][1:],
        "description": f"policy name, not {', '.join(names)}"})


_NAME = _name_except("test")
_NOT_BUILTIN = _name_except("test", *BUILTIN_POLICIES)
_ATTACHMENT_TARGETS = [obj({"type": TYPE_NAME}, description="a device type"),
                       obj({"device": DEVICE_ID}, description="a device")]
# What _attachment_result answers: the change, the policies that now apply, warnings.
_ATTACHMENT_RESULT = ref("AttachmentChange")

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/policies", Role.AUDITOR, list_policies,
          "List policies (built-in ones included) and where they are attached",
          responses={200: Reply("every policy, by name", items_of(ref("PolicySummary")))}),
    Route("POST", "/v1/policies/test", Role.AUDITOR, explain_policy,
          "Explain a policy decision for a device (read-only: changes nothing)",
          {"type": "object", "required": ["device_id", "action", "resource"],
           "additionalProperties": False,
           "properties": {"device_id": DEVICE_ID,
                          "action": {**ACTION, "description": "e.g. mqtt:publish, http:GET"},
                          "resource": {**TEXT, "minLength": 1,
                                       "maxLength": MAX_TEST_RESOURCE_BYTES,
                                       "description": "topic, topic filter (subscribe), "
                                                      "client id (connect), request path "
                                                      "without '/' (http); at most "
                                                      f"{MAX_TEST_RESOURCE_BYTES} UTF-8 "
                                                      "bytes"},
                          "cert_serial": nullable({**SERIAL_INPUT,
                                                   "description": "hex, for ${cert.serial}"})}},
          responses={200: Reply("the decision and what matched", ref("PolicyExplanation"))},
          errors={404: "no such device"}),
    Route("GET", "/v1/policies/{name}", Role.AUDITOR, get_policy,
          "Show a policy: document, version, attachments",
          responses={200: Reply("the policy", ref("Policy"))},
          errors={400: "not a policy name", 404: "no such policy"}, path_params=(_NAME,)),
    Route("PUT", "/v1/policies/{name}", Role.ADMIN, put_policy,
          "Create or replace a policy (JSON body, or YAML with Content-Type "
          "application/yaml); 201 when created", ref("PolicyDocument"),
          responses={200: Reply("replaced (version + 1)", ref("Policy")),
                     201: Reply("created (version 1)", ref("Policy"))},
          errors={422: "a built-in policy cannot be replaced"},
          path_params=(_NOT_BUILTIN,),
          body_types=("application/json", *POLICY_YAML_TYPES)),
    Route("DELETE", "/v1/policies/{name}", Role.ADMIN, delete_policy,
          "Delete a policy that is not attached anywhere",
          responses={204: Reply("deleted")},
          errors={400: "not a policy name", 404: "no such policy",
                  409: "it is attached somewhere (`attachments` lists where)",
                  422: "a built-in policy cannot be deleted"},
          path_params=(_NOT_BUILTIN,)),
    Route("POST", "/v1/policies/{name}/attachments", Role.ADMIN, attach_policy,
          "Attach a policy to a device type or a device (idempotent; 201 when new)",
          {"oneOf": _ATTACHMENT_TARGETS, "description": "exactly one of type, device"},
          responses={200: Reply("it already was attached there", _ATTACHMENT_RESULT),
                     201: Reply("attached", _ATTACHMENT_RESULT)},
          errors={404: "no such policy, device type or device",
                  422: f"the quarantine policy (it applies by itself), or the target has "
                       f"{MAX_POLICIES_PER_TARGET} policies already"},
          path_params=(_name_except(QUARANTINE_POLICY_NAME),)),
    Route("DELETE", "/v1/policies/{name}/attachments", Role.ADMIN, detach_policy,
          "Detach a policy from ?type=T or ?device=D; answers with the policies that now "
          "apply there and warnings",
          query=(Param("target", {"oneOf": _ATTACHMENT_TARGETS},
                       "exactly one of ?type=T or ?device=D (no other parameter)",
                       required=True),),
          responses={200: Reply("detached", _ATTACHMENT_RESULT)},
          errors={404: "the policy is not attached there"}),
)
