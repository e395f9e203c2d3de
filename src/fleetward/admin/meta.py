"""Admin API meta routes: liveness and the calling operator."""

from __future__ import annotations

from aiohttp import web

from fleetward import __version__
from fleetward.admin.base import AdminServices, Reply, Route, json_response
from fleetward.admin.schemas import ROLE, STRING, TOKEN_ID, obj
from fleetward.model import Operator, Role


async def health(request: web.Request, svc: AdminServices, op: Operator | None) -> web.Response:
    return json_response({"status": "ok", "version": __version__})


async def whoami(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    return json_response({"name": op.name, "role": op.role.value, "token_id": op.token_id})


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/health", None, health, "Liveness",
          responses={200: Reply("the server runs", obj({"status": {"const": "ok"},
                                                        "version": STRING}))}),
    Route("GET", "/v1/whoami", Role.AUDITOR, whoami, "The calling operator and role",
          responses={200: Reply("the token's operator", obj({
              "name": STRING, "role": ROLE, "token_id": TOKEN_ID}))}),
)
