"""Admin API: manufacturer-certificate (IDevID) enrollments and their approval."""

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
    json_response,
    query_int,
)
from fleetward.admin.schemas import APPROVALS, items_of, ref
from fleetward.model import Operator, Role


async def list_enrollments(request: web.Request, svc: AdminServices,
                           op: Operator) -> web.Response:
    bindings = await svc.run(svc.enrollment.list_bindings, request.query.get("approval"),
                             query_int(request, "limit", 100, 1, MAX_PAGE))
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


_DECIDE_ERRORS = {400: "not a device id", 404: "no manufacturer-certificate enrollment "
                                                "for this device",
                  409: "the enrollment is not pending (decisions are final)"}

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/enrollments", Role.AUDITOR, list_enrollments,
          "Manufacturer-certificate (IDevID) enrollments, e.g. ?approval=pending",
          query=(Param("approval", {"enum": APPROVALS}), Param("limit", LIMIT)),
          responses={200: Reply("enrollments", items_of(ref("OemBinding")))}),
    Route("POST", "/v1/enrollments/{device_id}/approve", Role.OPERATOR, approve_enrollment,
          "Approve a pending manufacturer-certificate enrollment",
          responses={200: Reply("approved", ref("OemBinding"))}, errors=_DECIDE_ERRORS),
    Route("POST", "/v1/enrollments/{device_id}/reject", Role.OPERATOR, reject_enrollment,
          "Reject a pending manufacturer-certificate enrollment",
          responses={200: Reply("rejected", ref("OemBinding"))}, errors=_DECIDE_ERRORS),
)
