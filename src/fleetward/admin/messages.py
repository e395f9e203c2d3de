"""Admin API: device messages (the SQL sink)."""

from __future__ import annotations

from aiohttp import web

from fleetward.admin.base import (
    LIMIT,
    MAX_SQL_INT,
    AdminServices,
    Param,
    Reply,
    Route,
    json_response,
    query_int,
)
from fleetward.admin.schemas import items_of, ref
from fleetward.model import Operator, Role
from fleetward.store import messages as message_rows

MAX_MESSAGES_PAGE = 1000  # messages per admin read


async def list_device_messages(request: web.Request, svc: AdminServices,
                               op: Operator) -> web.Response:
    device_id = request.match_info["device_id"]
    limit = query_int(request, "limit", 100, 1, MAX_MESSAGES_PAGE)
    after = query_int(request, "after", 0) if "after" in request.query else None

    def load() -> list[message_rows.StoredMessage]:
        svc.registry.get_device(device_id)  # NotFound for an unknown device
        with svc.db.read() as conn:
            return message_rows.list_for_device(conn, device_id, limit, after)
    items = await svc.run(load)
    # "next" continues after the newest message shown: poll with ?after=<next> to follow.
    return json_response({"items": [m.to_json() for m in items],
                          "next": items[-1].id if items else after})


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/devices/{device_id}/messages", Role.AUDITOR, list_device_messages,
          "A device's stored telemetry and events (SQL sink), oldest first: the newest "
          "`limit`, or the first `limit` after id `after`",
          query=(Param("limit", {**LIMIT, "maximum": MAX_MESSAGES_PAGE}),
                 Param("after", {"type": "integer", "minimum": 0, "maximum": MAX_SQL_INT},
                       "a message id: only newer messages")),
          responses={200: Reply("messages, oldest first", items_of(
              ref("Message"), next={"type": ["integer", "null"],
                                    "description": "?after= to follow: the newest id shown "
                                                   "(or the given after)"}))},
          errors={404: "no such device"}),
)
