"""Admin API: device messages (the SQL sink)."""

from __future__ import annotations

from aiohttp import web

from fleetward.admin.base import AdminServices, Route, json_response, query_int
from fleetward.errors import InvalidInput
from fleetward.model import Operator, Role
from fleetward.store import messages as message_rows

MAX_MESSAGES_PAGE = 1000  # messages per admin read


async def list_device_messages(request: web.Request, svc: AdminServices,
                               op: Operator) -> web.Response:
    device_id = request.match_info["device_id"]
    limit = query_int(request, "limit", 100)
    if not 1 <= limit <= MAX_MESSAGES_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_MESSAGES_PAGE}",
                           hint="e.g. ?limit=100")
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
          "`limit`, or the first `limit` after id `after`", query=("limit", "after")),
)
