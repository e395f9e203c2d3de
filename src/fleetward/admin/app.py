"""Admin HTTPS API (aiohttp): devices, certificates, CAs, audit, operators.

Every route is declared once in ``ROUTES`` with the role it needs; the OpenAPI document
is generated from the same table, so the two cannot drift. Deny by default: a route
without a role entry does not exist. The handlers and their routes live in one module
per resource (``fleetward.admin.devices``, ...); this module puts their tables together.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from fleetward.admin import (
    access_tokens,
    api_keys,
    audit,
    bootstrap_tokens,
    cas,
    certificates,
    commands,
    credentials,
    device_types,
    devices,
    enrollments,
    factory,
    messages,
    meta,
    operators,
    policies,
)
from fleetward.admin import openapi as openapi_spec
from fleetward.admin.auth import require_role
from fleetward.admin.base import (
    MAX_BODY_BYTES,
    SERVICES_KEY,
    AdminServices,
    Reply,
    Route,
    actor,
    json_response,
)
from fleetward.errors import Forbidden
from fleetward.model import AuditEvent, Operator
from fleetward.web.problem import problem_middleware, refuse_nul_in_target

__all__ = ["ROUTES", "AdminServices", "Route", "build_admin_app", "openapi_document"]


async def openapi(request: web.Request, svc: AdminServices, op: Operator | None) -> web.Response:
    return json_response(openapi_document())


ROUTES: tuple[Route, ...] = (
    Route("GET", "/openapi.json", None, openapi, "This OpenAPI 3.1 document",
          responses={200: Reply("the document", {"type": "object"})}),
    *meta.ROUTES,
    *device_types.ROUTES,
    *devices.ROUTES,
    *certificates.DEVICE_ROUTES,
    *commands.ROUTES,
    *messages.ROUTES,
    *certificates.SERIAL_ROUTES,
    *cas.ROUTES,
    *bootstrap_tokens.ROUTES,
    *credentials.ROUTES,
    *api_keys.ROUTES,
    *access_tokens.ROUTES,
    *enrollments.ROUTES,
    *factory.ROUTES,
    *policies.ROUTES,
    *audit.ROUTES,
    *operators.ROUTES,
)


def openapi_document() -> dict[str, Any]:
    return openapi_spec.openapi_document(ROUTES)


def build_admin_app(services: AdminServices) -> web.Application:
    app = web.Application(middlewares=[problem_middleware], client_max_size=MAX_BODY_BYTES)
    app[SERVICES_KEY] = services
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _guard(route, services))
    return app


def _guard(route: Route, svc: AdminServices) -> Callable[[web.Request],
                                                         Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        if route.role is None:
            return await route.handler(request, svc, None)
        source = request.remote or "unknown"
        operator = await svc.run(svc.tokens.authenticate,
                                 request.headers.get("Authorization"), source)
        try:
            require_role(operator, route.role)
        except Forbidden as exc:
            await svc.run(_audit_forbidden, svc, operator, route, request.path)
            raise exc
        refuse_nul_in_target(request, query=bool(route.query))
        return await route.handler(request, svc, operator)
    return handle


def _audit_forbidden(svc: AdminServices, operator: Operator, route: Route, path: str) -> None:
    with svc.db.transaction() as conn:
        svc.audit.append(conn, AuditEvent(
            action="admin.forbidden", actor=actor(operator), target=path, outcome="failure",
            details={"method": route.method, "role": operator.role.value,
                     "needed": route.role.value if route.role else None}))
