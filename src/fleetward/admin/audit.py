"""Admin API: the audit log."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fleetward.admin.base import (
    LIMIT,
    MAX_PAGE,
    MAX_SQL_INT,
    AdminServices,
    Param,
    Reply,
    Route,
    json_response,
    query_int,
)
from fleetward.admin.schemas import AUDIT_VERIFICATION, TEXT, items_of, ref
from fleetward.audit import record_to_json
from fleetward.errors import InvalidInput
from fleetward.model import Operator, Role
from fleetward.store import audit as audit_rows

ORDERS = ("asc", "desc")


async def audit_query(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    limit = query_int(request, "limit", 100, 1, MAX_PAGE)
    after = query_int(request, "after", 0) if "after" in request.query else None
    order = request.query.get("order", "asc")
    if order not in ORDERS:
        raise InvalidInput(f"order must be asc or desc, not {order[:20]!r}",
                           hint="e.g. ?order=desc for the newest first")

    def query() -> list[dict[str, Any]]:
        with svc.db.read() as conn:
            rows = audit_rows.query_events(conn, after=after, action=request.query.get("action"),
                                           limit=limit,
                                           newest_first=order == "desc")
        return [record_to_json(r) for r in rows]
    return json_response({"items": await svc.run(query)})


async def audit_verify(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    def verify() -> dict[str, Any]:
        with svc.db.read() as conn:
            return svc.audit.verify(conn).to_json()
    return json_response(await svc.run(verify))


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/audit", Role.AUDITOR, audit_query, "Query the audit log",
          query=(Param("after", {"type": "integer", "minimum": 0, "maximum": MAX_SQL_INT},
                       "a sequence number: only later events"),
                 Param("action", TEXT, "only events with this action, e.g. device.created"),
                 Param("limit", LIMIT),
                 Param("order", {"enum": list(ORDERS), "default": "asc",
                                 "description": "desc: newest first"})),
          responses={200: Reply("events, by sequence number", items_of(ref("AuditRecord")))}),
    Route("GET", "/v1/audit/verify", Role.AUDITOR, audit_verify, "Verify the audit chain",
          responses={200: Reply("the verdict (ok false names the first bad row)",
                                AUDIT_VERIFICATION)}),
)
