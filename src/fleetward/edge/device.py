"""Device HTTPS listener (:8443). TLS 1.2+ with an optional client certificate at the TLS
layer (RFC 7030 §3.3.2 lets EST clients enroll without one); each route decides whether
it needs one. Enrollment (EST) and the device API mount here in later issues.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web

from fleetward.web.problem import problem_middleware

MAX_BODY_BYTES = 256 * 1024  # bytes; device requests are small


def peer_certificate(request: web.Request) -> dict[str, Any] | None:
    """The client certificate of this connection, if the device sent one.

    OpenSSL has verified its chain to our CA, nothing more: revocation and the device's
    lifecycle state are NOT checked here, so a route that grants anything must check
    both (the secure-channel issue adds the in-memory revoked/blocked set for that).
    """
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    cert = ssl_object.getpeercert()
    return dict(cert) if cert else None


async def health(request: web.Request) -> web.Response:
    cert = peer_certificate(request)
    subject = dict(x[0] for x in cert["subject"]) if cert else {}
    return web.json_response({"status": "ok", "client_certificate": bool(cert),
                              "client_cn": subject.get("commonName")})


def build_device_app() -> web.Application:
    app = web.Application(middlewares=[problem_middleware], client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/v1/health", health)
    return app
