"""The OAuth 2.0 endpoints on the device listener (and discovery on the public one):

* ``POST /oauth2/token`` — RFC 6749 §4.4 client credentials, form-encoded, answered as
  RFC 6749 §5.1/§5.2 JSON (never problem+json: OAuth clients parse ``error``);
* ``POST /oauth2/introspect`` — RFC 7662, for back-end services holding an API key
  with ``tokens:introspect``;
* ``GET /.well-known/oauth-authorization-server`` — RFC 8414 metadata;
* ``GET /.well-known/jwks.json`` — the token signing keys (RFC 7517 §5).

The token service itself (``fleetward.tokens.service``) runs on a worker thread: it
reads devices' keys from SQL.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import structlog
from aiohttp import web

from fleetward.edge.credentials import request_target
from fleetward.edge.hooks import Throttle
from fleetward.errors import FleetwardError, Forbidden
from fleetward.model import AuditEvent
from fleetward.tokens.api_keys import ApiKeyService
from fleetward.tokens.dpop import TargetUri
from fleetward.tokens.keys import SigningKeys
from fleetward.tokens.scopes import SCOPES
from fleetward.tokens.service import OAuthError, TokenRequest, TokenService
from fleetward.web.tls import peer_certificate_der
from fleetward.web.tls_gate import format_peer

log = structlog.get_logger("fleetward.oauth")

T = TypeVar("T")
TOKEN_PATH = "/oauth2/token"
INTROSPECT_PATH = "/oauth2/introspect"
METADATA_PATH = "/.well-known/oauth-authorization-server"
JWKS_PATH = "/.well-known/jwks.json"
FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 16 * 1024  # an assertion is ~1 KiB, a token to introspect ~1 KiB
MAX_FORM_FIELDS = 16
INTROSPECT_SCOPE = "tokens:introspect"
# RFC 6749 §5.1: token responses must not be cached.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def authorization_server_metadata(issuer: str) -> dict[str, Any]:
    """RFC 8414 §2 metadata of this authorization server."""
    return {
        "issuer": issuer,
        "token_endpoint": issuer + TOKEN_PATH,
        "jwks_uri": issuer + JWKS_PATH,
        "introspection_endpoint": issuer + INTROSPECT_PATH,
        "grant_types_supported": ["client_credentials"],
        # Devices use client credentials only; no authorization endpoint, so no
        # response types (RFC 8414 §2 asks for the member; the list is empty).
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["tls_client_auth", "private_key_jwt",
                                                  "client_secret_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES256", "HS256"],
        "dpop_signing_alg_values_supported": ["ES256"],  # RFC 9449 §5.1
        "tls_client_certificate_bound_access_tokens": True,  # RFC 8705 §3.3
        "scopes_supported": list(SCOPES),
        "introspection_endpoint_auth_methods_supported": ["bearer"],
        "service_documentation": "https://fleetward.dev/docs/credentials",
    }


@dataclass(frozen=True, slots=True)
class OAuthEndpoints:
    """Args:
        audit: appends an audit event off the loop (the node's ``AuditWriter``).
        refusals: throttles refusal audits (per client or address and error).
    """

    service: TokenService
    api_keys: ApiKeyService
    keys: SigningKeys
    issuer: str
    executor: Executor
    audit: Callable[[AuditEvent], None]
    refusals: Throttle

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor,
                                                                partial(fn, *args))

    async def metadata(self, request: web.Request) -> web.Response:
        return web.json_response(authorization_server_metadata(self.issuer),
                                 headers={"Cache-Control": "max-age=300"})

    async def jwks(self, request: web.Request) -> web.Response:
        # Short cache: a rotated key must reach verifiers well within the overlap.
        return web.json_response(self.keys.jwks(), content_type="application/jwk-set+json",
                                 headers={"Cache-Control": "max-age=60"})

    async def token(self, request: web.Request) -> web.Response:
        source = _source(request)
        try:
            form = await _form(request)
            dpop = request.headers.getall("DPoP", [])
            if len(dpop) > 1:
                raise OAuthError("invalid_dpop_proof", "send one DPoP header (RFC 9449 §4.3)")
            grant = await self._run(self.service.token, TokenRequest(
                form=form, endpoint=_target(request), peer_der=_peer_der(request),
                dpop=dpop[0] if dpop else None))
        except OAuthError as exc:
            self._refused("access_token.refused", exc, source)
            return web.json_response(exc.to_json(), status=exc.status, headers=NO_STORE)
        self.audit(grant.audit_event(source))
        return web.json_response(grant.response(), headers=NO_STORE)

    async def introspect(self, request: web.Request) -> web.Response:
        source = _source(request)
        authorization = request.headers.get("Authorization", "")
        scheme, _, presented = authorization.partition(" ")
        try:
            # RFC 7662 §2.3: the caller's own bearer credential (here an API key) is
            # judged as RFC 6750 §3.1 says: 401 invalid_token, 403 insufficient_scope.
            if scheme.lower() != "bearer" or not presented:
                raise OAuthError("invalid_token", "introspection needs Authorization: "
                                 "Bearer fwk_<id>.<secret> (an API key with "
                                 f"{INTROSPECT_SCOPE})", status=401)
            try:
                await self._run(self.api_keys.authenticate, presented, INTROSPECT_SCOPE)
            except Forbidden as exc:
                raise OAuthError("insufficient_scope", exc.message, status=403) from None
            except FleetwardError as exc:
                raise OAuthError("invalid_token", exc.message, status=401) from None
            form = await _form(request)
            token = form.get("token")
            if not token:
                raise OAuthError("invalid_request", "token is missing (RFC 7662 §2.1)")
            cnf = _presented_cnf(form.get("cnf"))
        except OAuthError as exc:
            self._refused("access_token.introspection_refused", exc, source)
            headers = dict(NO_STORE)
            if exc.status in (401, 403):
                headers["WWW-Authenticate"] = (
                    f'Bearer error="{exc.error}"' + (f', scope="{INTROSPECT_SCOPE}"'
                                                     if exc.status == 403 else ""))
            return web.json_response(exc.to_json(), status=exc.status, headers=headers)
        answer = await self._run(self.service.introspect, token, cnf)
        return web.json_response(answer, headers=NO_STORE)

    def _refused(self, action: str, exc: OAuthError, source: str) -> None:
        subject = exc.device_id or source.rsplit(":", 1)[0]
        log.info("oauth request refused", action=action, error=exc.error,
                 reason=exc.description, device_id=exc.device_id, source=source)
        if self.refusals.allow((subject, f"{action}:{exc.error}")):
            # The actor is the peer: a refused client is not known to be the device it
            # claims (anyone can send client_id=<victim>); the device is the target.
            self.audit(AuditEvent(
                action=action,
                actor=f"remote:{source}",
                target=f"device:{exc.device_id}" if exc.device_id else f"remote:{subject}",
                outcome="failure",
                details={"error": exc.error, "reason": exc.description, "source": source}))


def add_oauth_routes(app: web.Application, endpoints: OAuthEndpoints) -> None:
    """The token, introspection and discovery endpoints (device listener)."""
    app.router.add_post(TOKEN_PATH, endpoints.token)
    app.router.add_post(INTROSPECT_PATH, endpoints.introspect)
    add_discovery_routes(app, endpoints)


def add_discovery_routes(app: web.Application, endpoints: OAuthEndpoints) -> None:
    """Metadata and JWKS only (public listener too: relying parties that cannot reach
    the device listener still find the keys)."""
    app.router.add_get(METADATA_PATH, endpoints.metadata)
    app.router.add_get(JWKS_PATH, endpoints.jwks)


async def _form(request: web.Request) -> dict[str, str]:
    """The form body, each parameter once (RFC 6749 §3.2).

    Raises:
        OAuthError: not a form, too large, not UTF-8, or a repeated parameter.
    """
    if request.content_type != FORM_TYPE:
        raise OAuthError("invalid_request", f"send Content-Type: {FORM_TYPE} "
                                            "(RFC 6749 §4.4.2)")
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        raise OAuthError("invalid_request", f"the body is larger than {MAX_FORM_BYTES} bytes")
    raw = await request.content.read(MAX_FORM_BYTES + 1)
    if len(raw) > MAX_FORM_BYTES:
        raise OAuthError("invalid_request", f"the body is larger than {MAX_FORM_BYTES} bytes")
    try:
        pairs = urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True,
                                       strict_parsing=bool(raw),
                                       max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the body is not a UTF-8 form "
                                            "(application/x-www-form-urlencoded)") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise OAuthError("invalid_request", f"parameter {name[:40]!r} is repeated "
                                                "(RFC 6749 §3.2)")
        if "\x00" in value or "\x00" in name:
            raise OAuthError("invalid_request", "the form contains a NUL character")
        form[name] = value
    return form


def _presented_cnf(raw: str | None) -> dict[str, str] | None:
    """The extension parameter ``cnf``: what the client presented to the caller."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict) or len(value) > 1 or not all(
            k in ("x5t#S256", "jkt") and isinstance(v, str) for k, v in value.items()):
        raise OAuthError("invalid_request", 'cnf must be {}, {"x5t#S256": …} or {"jkt": …}')
    return value


def _target(request: web.Request) -> TargetUri:
    try:
        return request_target(request)
    except ValueError:
        raise OAuthError("invalid_request", "the request has no usable Host header") from None


def _peer_der(request: web.Request) -> bytes | None:
    return peer_certificate_der(request.transport)


def _source(request: web.Request) -> str:
    transport = request.transport
    return format_peer(transport.get_extra_info("peername") if transport else None)
