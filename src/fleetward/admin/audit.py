"""Admin API: the audit log."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fleetward.admin.base import AdminServices, Route, json_response, query_int
from fleetward.audit import record_to_json
from fleetward.errors import InvalidInput
from fleetward.model import Operator, Role
from fleetward.store import audit as audit_rows


async def audit_query(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    limit = query_int(request, "limit", 100)
    if not 1 <= limit <= 1000:
        raise InvalidInput("limit must be between 1 and 1000", hint="e.g. ?limit=100")
    after = query_int(request, "after", 0) if "after" in request.query else None

    def query() -> list[dict[str, Any]]:
        with svc.db.read() as conn:
            rows = audit_rows.query_events(conn, after=after, action=request.query.get("action"),
                                           limit=limit,
                                           newest_first=request.query.get("order") == "desc")
        return [record_to_json(r) for r in rows]
    return json_response({"items": await svc.run(query)})


async def audit_verify(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    def verify() -> dict[str, Any]:
        with svc.db.read() as conn:
            return svc.audit.verify(conn).to_json()
    return json_response(await svc.run(verify))


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/audit", Role.AUDITOR, audit_query, "Query the audit log",
          query=("after", "action", "limit", "order")),
    Route("GET", "/v1/audit/verify", Role.AUDITOR, audit_verify, "Verify the audit chain"),
)
