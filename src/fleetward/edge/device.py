"""Device HTTPS listener (:8443). TLS 1.2+ with an optional client certificate at the TLS
layer (RFC 7030 §3.3.2 lets EST clients enroll without one); each route decides whether
it needs one. EST enrollment is mounted here; the device API arrives with the
secure-channel issue.
"""

from __future__ import annotations

from aiohttp import web
from cryptography import x509

from fleetward.edge.device_api import DeviceApi, add_device_routes
from fleetward.edge.est import EstEndpoints, add_est_routes, est_auth_challenge
from fleetward.edge.oauth import OAuthEndpoints, add_oauth_routes
from fleetward.web.problem import problem_middleware
from fleetward.web.tls import peer_certificate

MAX_BODY_BYTES = 256 * 1024  # bytes; device requests are small


async def health(request: web.Request) -> web.Response:
    cert = peer_certificate(request)
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME) if cert else []
    return web.json_response({"status": "ok", "client_certificate": cert is not None,
                              "client_cn": names[0].value if names else None})


def build_device_app(est: EstEndpoints | None = None, api: DeviceApi | None = None,
                     oauth: OAuthEndpoints | None = None) -> web.Application:
    app = web.Application(middlewares=[problem_middleware, est_auth_challenge],
                          client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/v1/health", health)
    if est is not None:
        add_est_routes(app, est)
    if api is not None:
        add_device_routes(app, api)
    if oauth is not None:
        add_oauth_routes(app, oauth)
    return app
