"""Admin API: device commands."""

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
    body_int,
    json_response,
    query_int,
)
from fleetward.admin.schemas import anchored, items_of, nullable, ref
from fleetward.model import Operator, Role
from fleetward.registry.device_commands import COMMAND_NAME_PATTERN, command_json
from fleetward.registry.device_commands import MAX_TTL_SECONDS as MAX_COMMAND_TTL_SECONDS
from fleetward.web.problem import read_json, reject_unknown_fields, require_str


async def queue_command(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request, data=("payload",))
    reject_unknown_fields(body, {"name", "payload", "ttl_seconds"})
    ttl = body.get("ttl_seconds")
    ttl_seconds = (None if ttl is None else
                   body_int(body, "ttl_seconds", None, 1, MAX_COMMAND_TTL_SECONDS))
    row = await svc.run(svc.commands.queue, request.match_info["device_id"],
                        require_str(body, "name"), body.get("payload", {}), ttl_seconds,
                        actor(op))
    return json_response(command_json(row), 201)


async def list_device_commands(request: web.Request, svc: AdminServices,
                               op: Operator) -> web.Response:
    items = await svc.run(svc.commands.list, request.match_info["device_id"],
                          query_int(request, "limit", 100, 1, MAX_PAGE))
    return json_response({"items": [command_json(r) for r in items]})


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/devices/{device_id}/commands", Role.OPERATOR, queue_command,
          "Queue a command for a device (delivered over MQTT or the HTTPS long-poll)",
          {"type": "object", "required": ["name"], "additionalProperties": False,
           "properties": {"name": {"type": "string", "pattern": anchored(COMMAND_NAME_PATTERN)},
                          "payload": {"type": "object",
                                      "description": "default {}; at most [device_api] "
                                                     "max_message_bytes as compact JSON"},
                          "ttl_seconds": nullable({
                              "type": "integer", "minimum": 1,
                              "maximum": MAX_COMMAND_TTL_SECONDS,
                              "description": "undelivered commands expire after this "
                                             "(default: [device_api] command_ttl_seconds)"})}},
          responses={201: Reply("queued (status pending)", ref("Command"))},
          errors={404: "no such device",
                  422: "the device is compromised or retired",
                  429: "the device has [device_api] max_pending_commands open commands"}),
    Route("GET", "/v1/devices/{device_id}/commands", Role.AUDITOR, list_device_commands,
          "List a device's commands, newest first", query=(Param("limit", LIMIT),),
          responses={200: Reply("the newest commands", items_of(ref("Command")))},
          errors={404: "no such device"}),
)
