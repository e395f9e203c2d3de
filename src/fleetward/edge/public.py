"""Public plain-HTTP listener: CRLs, OCSP and CA certificates (RFC 5280 §4.2.1.13,
RFC 6960 Appendix A). Plain HTTP on purpose: every answer is signed, and relying parties
must be able to fetch revocation data without first validating a TLS chain (RFC 5280
§8 notes the circularity).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial
from typing import TypeVar

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from fleetward.ca import Authority, OcspResponder
from fleetward.ca.ocsp import MAX_REQUEST_BYTES, unsuccessful
from fleetward.edge.oauth import OAuthEndpoints, add_discovery_routes
from fleetward.errors import NotFound
from fleetward.store import Database
from fleetward.web.problem import problem_middleware

T = TypeVar("T")
OCSP_RESPONSE_TYPE = "application/ocsp-response"


class PublicEndpoints:
    def __init__(self, db: Database, authority: Authority, executor: Executor) -> None:
        self.db = db
        self.authority = authority
        self.responder = OcspResponder(authority)
        self.executor = executor

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor,
                                                                partial(fn, *args))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def crl(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]

        def load() -> bytes:
            with self.db.read() as conn:
                return self.authority.crl_der(conn, name)
        der = await self._run(load)
        return web.Response(body=der, content_type="application/pkix-crl",
                            headers={"Cache-Control": "max-age=300"})

    async def ca_cert(self, request: web.Request) -> web.Response:
        name, ext = request.match_info["name"], request.match_info["ext"]
        handle = self.authority.handles.get(name)
        if handle is None:
            raise NotFound(f"no CA named {name!r}",
                           hint="try /ca/chain.pem, /ca/issuing.pem or /ca/root.pem")
        if ext == "der":
            return web.Response(body=handle.certificate.public_bytes(serialization.Encoding.DER),
                                content_type="application/pkix-cert")
        return web.Response(text=handle.pem, content_type="application/x-pem-file")

    async def chain(self, request: web.Request) -> web.Response:
        return web.Response(text=self.authority.chain_pem(), content_type="application/x-pem-file")

    async def ocsp_post(self, request: web.Request) -> web.Response:
        # RFC 6960 A.1: POST with Content-Type application/ocsp-request.
        body = await request.content.read(MAX_REQUEST_BYTES + 1)
        return await self._answer(body)

    async def ocsp_get(self, request: web.Request) -> web.Response:
        # RFC 6960 A.1: GET {url}/{url-encoding of base-64 encoding of the DER request}.
        # The raw path is used because base64 may contain '/', which routing would split.
        encoded = request.raw_path.split("/ocsp/", 1)[1]
        try:
            der = base64.b64decode(urllib.parse.unquote(encoded), validate=True)
        except (binascii.Error, ValueError):
            der = b""
        return await self._answer(der)

    async def _answer(self, der: bytes) -> web.Response:
        if not der:
            body = unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        else:
            def respond() -> bytes:
                with self.db.read() as conn:
                    return self.responder.respond(conn, der)
            body = await self._run(respond)
        return web.Response(body=body, content_type=OCSP_RESPONSE_TYPE)


def build_public_app(endpoints: PublicEndpoints,
                     oauth: OAuthEndpoints | None = None) -> web.Application:
    app = web.Application(middlewares=[problem_middleware],
                          client_max_size=MAX_REQUEST_BYTES + 1)
    app.router.add_get("/healthz", endpoints.health)
    app.router.add_get("/crl/{name}.crl", endpoints.crl)
    app.router.add_get("/ca/chain.pem", endpoints.chain)
    app.router.add_get(r"/ca/{name}.{ext:pem|der}", endpoints.ca_cert)
    app.router.add_post("/ocsp", endpoints.ocsp_post)
    app.router.add_get("/ocsp/{request:.+}", endpoints.ocsp_get)
    if oauth is not None:
        # Token metadata and signing keys for relying parties (the device listener
        # serves the same, under the issuer URL).
        add_discovery_routes(app, oauth)
    return app
