"""Admin API: manufacturer-certificate (IDevID) enrollments and their approval."""

from __future__ import annotations

from aiohttp import web

from fleetward.admin.base import AdminServices, Route, actor, json_response, query_int
from fleetward.model import Operator, Role


async def list_enrollments(request: web.Request, svc: AdminServices,
                           op: Operator) -> web.Response:
    bindings = await svc.run(svc.enrollment.list_bindings, request.query.get("approval"),
                             query_int(request, "limit", 100))
    return json_response({"items": [b.to_json() for b in bindings]})


async def approve_enrollment(request: web.Request, svc: AdminServices,
                             op: Operator) -> web.Response:
    binding = await svc.run(svc.enrollment.decide, request.match_info["device_id"], True,
                            actor(op))
    return json_response(binding.to_json())


async def reject_enrollment(request: web.Request, svc: AdminServices,
                            op: Operator) -> web.Response:
    binding = await svc.run(svc.enrollment.decide, request.match_info["device_id"], False,
                            actor(op))
    return json_response(binding.to_json())


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/enrollments", Role.AUDITOR, list_enrollments,
          "Manufacturer-certificate (IDevID) enrollments, e.g. ?approval=pending",
          query=("approval", "limit")),
    Route("POST", "/v1/enrollments/{device_id}/approve", Role.OPERATOR, approve_enrollment,
          "Approve a pending manufacturer-certificate enrollment"),
    Route("POST", "/v1/enrollments/{device_id}/reject", Role.OPERATOR, reject_enrollment,
          "Reject a pending manufacturer-certificate enrollment"),
)
