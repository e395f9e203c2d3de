"""EST over HTTPS (RFC 7030 §3.2, §4) on the device listener: wire formats only.

Everything about who may enroll lives in ``fleetward.enroll.est``; this module decodes
the request (RFC 8951: bodies are base64, whatever Content-Transfer-Encoding says),
picks the authentication method, and encodes certs-only PKCS#7 responses.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from functools import partial
from typing import Any, TypeVar

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from fleetward.edge.channel import Action, Admission, DeviceGate
from fleetward.enroll import CSR_ATTRS_DER, Attempt, EnrollmentResult, EnrollmentService
from fleetward.errors import FleetwardError, Forbidden, InvalidInput, Unauthenticated
from fleetward.web.problem import problem_response
from fleetward.web.tls import peer_certificate

T = TypeVar("T")

EST_PREFIX = "/.well-known/est"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"  # RFC 7030 §4.1.3, §4.2.3
CSR_ATTRS = "application/csrattrs"  # RFC 7030 §4.5.2
PKCS10 = "application/pkcs10"  # RFC 7030 §4.2.1
MAX_CSR_BYTES = 16 * 1024  # bytes of base64; an RSA-8192 CSR is ~3 KiB of DER
# RFC 7030 §3.2.2: a label is an operator-chosen path segment; ours are profile names.
LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
REALM = 'Basic realm="fleetward-est", Bearer realm="fleetward-est"'
_BASE64 = re.compile(rb"^[A-Za-z0-9+/=\s]*$")


class EstEndpoints:
    def __init__(self, service: EnrollmentService, executor: Executor,
                 gate: DeviceGate | None = None) -> None:
        self.service = service
        self.executor = executor  # the SQL writer: enrollments are serialised with it
        # With a gate, re-enrollment over mTLS also asks the device's policy
        # (``est:reenroll`` on ``est/<label or default>``).
        self.gate = gate
        self._cacerts = base64.encodebytes(service.cacerts_der())

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, partial(fn, *args, **kwargs))

    # --- GET ----------------------------------------------------------------------------

    async def cacerts(self, request: web.Request) -> web.Response:
        _label(request)
        return _base64_response(self._cacerts, CERTS_ONLY)

    async def csrattrs(self, request: web.Request) -> web.Response:
        _label(request)
        return _base64_response(base64.encodebytes(CSR_ATTRS_DER), CSR_ATTRS)

    # --- POST ---------------------------------------------------------------------------

    async def _refused_early(self, request: web.Request, operation: str,
                             exc: FleetwardError | web.HTTPException) -> None:
        """Audit a request refused before it reached the enrollment service (bad media
        type, body, label or credentials): every attempt is audited (issue 3)."""
        reason = exc.message if isinstance(exc, FleetwardError) else (exc.text or exc.reason)
        method = "bootstrap-token" if "Authorization" in request.headers else "certificate"
        attempt = Attempt(method, request.remote or "unknown",
                          _route_name(request.match_info.get("label"), operation))
        await self._run(self.service.audit_refusal, attempt, None, reason)

    async def simpleenroll(self, request: web.Request) -> web.Response:
        try:
            label = _label(request)
            csr = await _read_csr(request)
            credentials = _credentials(request)
            peer = peer_certificate(request)
            if credentials is None and peer is None:
                raise Unauthenticated(
                    "enrollment needs a bootstrap token or a manufacturer certificate",
                    hint="send HTTP Basic device-id:token (curl -u ID:TOKEN), or connect with "
                         "the device's manufacturer (IDevID) certificate")
            if credentials is None and peer is not None and self.service.is_ours(peer):
                raise InvalidInput("this device already holds a certificate from this CA",
                                   hint="renew with /.well-known/est/simplereenroll")
        except (FleetwardError, web.HTTPException) as exc:
            await self._refused_early(request, "simpleenroll", exc)
            raise
        source = request.remote or "unknown"
        route = _route_name(label, "simpleenroll")
        if credentials is not None:
            device_id, token = credentials
            result = await self._run(
                self.service.enroll_with_token, token=token, device_id=device_id, csr_data=csr,
                label=label, attempt=Attempt("bootstrap-token", source, route))
            return _enrolled(result)
        if peer is None:  # unreachable: refused above; keeps the type checker informed
            raise Unauthenticated("no credentials")
        result = await self._run(self.service.enroll_with_idevid, idevid=peer, csr_data=csr,
                                 label=label, attempt=Attempt("idevid", source, route))
        return _enrolled(result)

    async def simplereenroll(self, request: web.Request) -> web.Response:
        try:
            label = _label(request)
            csr = await _read_csr(request)
        except (FleetwardError, web.HTTPException) as exc:
            await self._refused_early(request, "simplereenroll", exc)
            raise
        peer = peer_certificate(request)
        if peer is not None and self.gate is not None:
            await self._check_reenroll_policy(self.gate, request, peer, label)
        method = "reenroll" if peer is not None else "reenroll-expired"
        attempt = Attempt(method, request.remote or "unknown",
                          _route_name(label, "simplereenroll"))
        result = await self._run(self.service.reenroll, current=peer, csr_data=csr,
                                 label=label, attempt=attempt)
        return _enrolled(result)


    async def _check_reenroll_policy(self, gate: DeviceGate, request: web.Request,
                                     peer: x509.Certificate, label: str | None) -> None:
        """Refuse a re-enrollment the device's policy denies. A certificate the gate
        does not admit at all (revoked, retired device, not ours) is left to the
        enrollment service, whose own rules refuse it with the specific reason."""
        verdict = gate.admit(peer.public_bytes(serialization.Encoding.DER),
                                  channel="https", source=request.remote or "")
        if not isinstance(verdict, Admission):
            return
        decision = verdict.decide(Action.EST_REENROLL, f"est/{label or 'default'}")
        if not decision.allowed:
            exc = Forbidden(decision.reason,
                            hint="the device's policy does not allow re-enrollment here; "
                                 "ask the operator (fleetward policy test ID est:reenroll "
                                 f"est/{label or 'default'})")
            await self._refused_early(request, "simplereenroll", exc)
            raise exc


def _label(request: web.Request) -> str | None:
    label = request.match_info.get("label")
    if label is None:
        return None
    if not LABEL.fullmatch(label):
        raise InvalidInput(f"invalid EST label {label!r}",
                           hint="labels are certificate profile names such as 'device'")
    return label


def _route_name(label: str | None, operation: str) -> str:
    return f"{label}/{operation}" if label else operation


async def _read_csr(request: web.Request) -> bytes:
    """The DER (or PEM) CSR of an EST request (RFC 7030 §4.2.1; RFC 8951 §3.2)."""
    if request.content_type != PKCS10:
        raise web.HTTPUnsupportedMediaType(
            text=f"expected {PKCS10}, got {request.content_type or 'nothing'}")
    if request.content_length is not None and request.content_length > MAX_CSR_BYTES:
        raise InvalidInput(f"the CSR is larger than {MAX_CSR_BYTES} bytes",
                           hint="send one base64-encoded PKCS#10 request")
    body = await request.content.read(MAX_CSR_BYTES + 1)
    if len(body) > MAX_CSR_BYTES:
        raise InvalidInput(f"the CSR is larger than {MAX_CSR_BYTES} bytes",
                           hint="send one base64-encoded PKCS#10 request")
    if body.lstrip().startswith(b"-----BEGIN"):
        return body  # PEM is base64 with armour; accepted for convenience
    if not _BASE64.fullmatch(body):
        raise InvalidInput("the CSR body is not base64",
                           hint="base64-encode the DER CSR: openssl req -outform DER | base64")
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
    except binascii.Error as exc:
        raise InvalidInput(f"the CSR body is not valid base64: {exc}",
                           hint="base64-encode the DER CSR: openssl req -outform DER | base64"
                           ) from None
    if not der:
        raise InvalidInput("the request body is empty", hint="send a base64 PKCS#10 CSR")
    return der


def _credentials(request: web.Request) -> tuple[str | None, str] | None:
    """(device id or None, token) from HTTP Basic (RFC 7617) or Bearer (RFC 6750)."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return None, value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthenticated("malformed HTTP Basic credentials",
                                  hint="send base64(device-id:token), e.g. curl -u ID:TOKEN"
                                  ) from None
        user, sep, password = decoded.partition(":")
        if not sep or not password:
            raise Unauthenticated("HTTP Basic credentials need device-id:token",
                                  hint="e.g. curl -u ID:TOKEN")
        return (user or None), password
    raise Unauthenticated("unsupported Authorization scheme",
                          hint="use HTTP Basic (device-id:token) or Bearer (token)")


def _enrolled(result: EnrollmentResult) -> web.Response:
    if result.record is None:
        # RFC 7030 §4.2.3: accepted, waiting for manual authorisation; retry later.
        return web.Response(status=202, headers={
            "Retry-After": str(result.retry_after_seconds or 60)},
            text="enrollment is waiting for operator approval\n")
    cert = x509.load_pem_x509_certificate(result.record.pem.encode())
    der = pkcs7.serialize_certificates([cert], serialization.Encoding.DER)
    return _base64_response(base64.encodebytes(der), CERTS_ONLY)


def _base64_response(body: bytes, content_type: str) -> web.Response:
    response = web.Response(body=body, headers={"Content-Transfer-Encoding": "base64"})
    response.headers["Content-Type"] = content_type
    return response


@web.middleware
async def est_auth_challenge(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                             ) -> web.StreamResponse:
    """401 answers carry WWW-Authenticate (RFC 9110 §11.6.1) so curl and EST clients
    know which credentials to send."""
    try:
        return await handler(request)
    except Unauthenticated as exc:
        problem = exc.to_problem()
        problem["instance"] = request.path
        response = problem_response(401, problem)
        response.headers["WWW-Authenticate"] = REALM
        return response


def add_est_routes(app: web.Application, endpoints: EstEndpoints) -> None:
    for prefix in (EST_PREFIX, EST_PREFIX + "/{label}"):
        app.router.add_get(f"{prefix}/cacerts", endpoints.cacerts)
        app.router.add_get(f"{prefix}/csrattrs", endpoints.csrattrs)
        app.router.add_post(f"{prefix}/simpleenroll", endpoints.simpleenroll)
        app.router.add_post(f"{prefix}/simplereenroll", endpoints.simplereenroll)
