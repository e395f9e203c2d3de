"""The OAuth 2.0 authorization server of the device fleet, without HTTP: the token
endpoint's logic (RFC 6749 §4.4 client credentials), introspection (RFC 7662), and
what operators do with tokens (issue one for testing, inspect, revoke, rotate keys).

Client authentication (RFC 6749 §2.3): ``tls_client_auth`` (RFC 8705 §2),
``private_key_jwt`` and ``client_secret_jwt`` (RFC 7523 §2.2). Tokens are bound to
the certificate on the connection (``cnf.x5t#S256``) or to the key of a DPoP proof
(``cnf.jkt``, RFC 9449 §5); unbound bearer tokens go only to devices that authenticated
with a symmetric key and sent no proof. The device's state and credential generation
come from the data plane's own cache (the gate), so the token endpoint and the
listeners never disagree about a device.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.audit import AuditLog
from fleetward.clock import Clock
from fleetward.config import TokensConfig
from fleetward.crypto.jose import (
    b64url_decode,
    certificate_thumbprint,
    key_thumbprint,
    public_jwk,
)
from fleetward.errors import Conflict, InvalidInput, NotFound, PolicyViolation, TooManyRequests
from fleetward.model import AuditEvent, Device, LifecycleState, validate_device_id
from fleetward.store import Database
from fleetward.store import certificates as cert_rows
from fleetward.store import devices as device_rows
from fleetward.store import revoked_tokens as revoked_rows
from fleetward.tokens.access import (
    AccessToken,
    AccessTokenIssuer,
    AccessTokenVerifier,
    IssuedToken,
    TokenRefused,
)
from fleetward.tokens.assertion import (
    ASSERTION_TYPE,
    CLIENT_SECRET_JWT,
    AssertionVerifier,
    DeviceKeys,
)
from fleetward.tokens.dpop import ProofVerifier, TargetUri
from fleetward.tokens.scopes import RECOVERY_SCOPES, SCOPES, narrow, parse_scope

log = structlog.get_logger("fleetward.tokens")

TLS_CLIENT_AUTH = "tls_client_auth"
GRANT_TYPE = "client_credentials"
DEVICE_TOKENS_REVOKED = "access_token.device_revoked"  # target device:<id>
TOKEN_REVOKED = "access_token.revoked"  # target access_token:<jti>
TOKEN_ISSUED = "access_token.issued"
MAX_JTI_CHARS = 64


class OAuthError(Exception):
    """An RFC 6749 §5.2 error response (or RFC 9449 §7.1 ``invalid_dpop_proof``).

    ``description`` is safe to send: it never contains a credential. ``invalid_client``
    is a 400 like the others: §5.2 asks for 401 only when the client authenticated with
    the ``Authorization`` header, and these clients authenticate by TLS or assertion,
    for which no HTTP authentication scheme (hence no ``WWW-Authenticate``) exists.
    """

    def __init__(self, error: str, description: str, *, status: int = 400,
                 device_id: str | None = None) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.device_id = device_id

    def to_json(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


class DeviceCache(Protocol):
    """What the service reads from the data plane's cache (``edge.gate.TrustGate``)."""

    def device(self, device_id: str) -> Device | None: ...

    def symmetric_keys(self, device_id: str) -> tuple[bytes, ...]: ...

    def compile_policy(self, device: Device, serial: int = 0) -> Any: ...

    def verified_certificate(self, der: bytes) -> Any: ...

    def is_token_revoked(self, jti: str) -> bool: ...

    def may_act(self, device_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One token endpoint request, as the HTTP layer parsed it."""

    # Each parameter once (RFC 6749 §3.2); holds the client assertion: never in a repr.
    form: Mapping[str, str] = field(repr=False)
    endpoint: TargetUri = field()  # the URI this request was sent to (DPoP htu)
    peer_der: bytes | None = field(default=None, repr=False)  # the TLS client certificate
    dpop: str | None = field(default=None, repr=False)  # the one DPoP header, if any


@dataclass(frozen=True, slots=True)
class TokenGrant:
    issued: IssuedToken
    method: str  # how the client authenticated
    requested: tuple[str, ...]

    def response(self) -> dict[str, Any]:
        """The RFC 6749 §5.1 success response."""
        claims = self.issued.claims
        return {"access_token": self.issued.token, "token_type": claims.token_type,
                "expires_in": claims.expires_at - claims.issued_at, "scope": claims.scope}

    def audit_event(self, source: str) -> AuditEvent:
        claims = self.issued.claims
        return AuditEvent(
            action=TOKEN_ISSUED, actor=f"device:{claims.device_id}",
            target=f"device:{claims.device_id}",
            details={"jti": claims.jti, "method": self.method, "binding": claims.binding,
                     "scope": claims.scope, "requested": " ".join(self.requested),
                     "expires_at": claims.expires_at, "source": source})


class TokenService:
    """Args:
        cache: the data plane's view of devices, keys and revocations.
        public_keys_of: registered raw public keys of a device (credential service).
    """

    def __init__(self, db: Database, audit: AuditLog, clock: Clock, config: TokensConfig,
                 cache: DeviceCache, issuer: AccessTokenIssuer, verifier: AccessTokenVerifier,
                 proofs: ProofVerifier, assertions: AssertionVerifier,
                 public_keys_of: Callable[[str], list[ec.EllipticCurvePublicKey]]) -> None:
        self._db = db
        self._audit = audit
        self._clock = clock
        self._config = config
        self._cache = cache
        self._issuer = issuer
        self.verifier = verifier
        self._proofs = proofs
        self._assertions = assertions
        self._public_keys_of = public_keys_of

    # --- the token endpoint (a worker thread: key lookups read SQL) ----------------------

    def token(self, request: TokenRequest) -> TokenGrant:
        """Answer a token request.

        Raises:
            OAuthError: with the RFC 6749 §5.2 error and what to change.
        """
        form = request.form
        grant_type = form.get("grant_type")
        if grant_type is None:
            raise OAuthError("invalid_request", "grant_type is missing")
        if grant_type != GRANT_TYPE:
            raise OAuthError("unsupported_grant_type",
                             f"only grant_type={GRANT_TYPE} is supported (devices are "
                             "their own clients, RFC 6749 §4.4)")
        device_id, method = self._authenticate(request)
        device = self._cache.device(device_id)
        if device is None:
            raise OAuthError("invalid_client", "unknown client")
        self._check_state(device)
        try:
            requested = parse_scope(form.get("scope"))
        except ValueError as exc:
            raise OAuthError("invalid_scope", str(exc), device_id=device_id) from None
        binding, thumbprint, serial = self._binding(request, device_id, method)
        policy = self._cache.compile_policy(device, serial)
        quarantined = device.state is LifecycleState.QUARANTINED
        granted = narrow(requested, policy, quarantined=quarantined)
        if not granted:
            raise OAuthError("invalid_scope",
                             "the device's policy opens none of the requested scopes"
                             + (" (quarantined devices get device:read and ota:download "
                                "only)" if quarantined else ""), device_id=device_id)
        lifetime = (self._config.unbound_token_lifetime_seconds if binding == "none"
                    else self._config.access_token_lifetime_seconds)
        issued = self._issuer.issue(device_id, granted, binding, thumbprint,
                                    device.credential_generation, lifetime)
        return TokenGrant(issued, method, requested)

    def _authenticate(self, request: TokenRequest) -> tuple[str, str]:
        form = request.form
        assertion = form.get("client_assertion")
        assertion_type = form.get("client_assertion_type")
        if assertion is not None or assertion_type is not None:
            if assertion_type != ASSERTION_TYPE or not assertion:
                raise OAuthError("invalid_request",
                                 f"client_assertion_type must be {ASSERTION_TYPE} and "
                                 "client_assertion a JWT (RFC 7523 §2.2)")
            try:
                client = self._assertions.verify(assertion, form.get("client_id"),
                                                 self._keys_for, self._cache.may_act)
            except TokenRefused as exc:
                raise OAuthError("invalid_client", exc.reason,
                                 device_id=_claimed(form)) from None
            return client.device_id, client.method
        if request.peer_der:
            verified = self._cache.verified_certificate(request.peer_der)
            if verified is None:
                raise OAuthError("invalid_client",
                                 "the client certificate is not a valid, unrevoked device "
                                 "certificate of this server")
            client_id = form.get("client_id")
            if client_id is None:
                raise OAuthError("invalid_request",
                                 "tls_client_auth needs client_id=<device id> (RFC 8705 §2)",
                                 device_id=verified.device_id)
            if client_id != verified.device_id:
                raise OAuthError("invalid_client",
                                 "client_id is not the device the certificate names",
                                 device_id=verified.device_id)
            return verified.device_id, TLS_CLIENT_AUTH
        raise OAuthError("invalid_client",
                         "no client authentication: connect with the device certificate "
                         "(tls_client_auth) or send a client_assertion (private_key_jwt)")

    def _keys_for(self, device_id: str) -> DeviceKeys:
        """What may sign the device's assertions: the keys of its valid certificates and
        its registered public keys; its symmetric keys (HS256 only)."""
        now = self._clock.now()
        with self._db.read() as conn:
            records = cert_rows.list_certificates(conn, device_id=device_id, revoked=False,
                                                  limit=None)
        keys: list[ec.EllipticCurvePublicKey] = []
        for record in records:
            if not record.not_before <= now < record.not_after:
                continue
            key = x509.load_pem_x509_certificate(record.pem.encode()).public_key()
            if isinstance(key, ec.EllipticCurvePublicKey):
                keys.append(key)
        keys.extend(self._public_keys_of(device_id))
        return DeviceKeys(tuple(keys), self._cache.symmetric_keys(device_id))

    def _check_state(self, device: Device) -> None:
        state = device.state
        if state in (LifecycleState.ACTIVE, LifecycleState.QUARANTINED):
            return
        if state is LifecycleState.REGISTERED:
            raise OAuthError("unauthorized_client",
                             f"device {device.id} is registered but not active yet: an "
                             "operator must enable it (fleetward device enable ID)",
                             device_id=device.id)
        raise OAuthError("invalid_client", f"device {device.id} is {state.value}",
                         device_id=device.id)

    def _binding(self, request: TokenRequest, device_id: str,
                 method: str) -> tuple[str, str | None, int]:
        """(binding, thumbprint, certificate serial for policy variables)."""
        serial = 0
        verified = (self._cache.verified_certificate(request.peer_der)
                    if request.peer_der else None)
        if verified is not None and verified.device_id == device_id:
            serial = verified.serial
        if request.dpop is not None:
            try:
                proof = self._proofs.verify(request.dpop, method="POST",
                                            target=request.endpoint, access_token=None)
            except TokenRefused as exc:
                raise OAuthError("invalid_dpop_proof", exc.reason,
                                 device_id=device_id) from None
            return "jkt", proof.jkt, serial
        if serial and request.peer_der is not None:
            return "x5t#S256", certificate_thumbprint(request.peer_der), serial
        if method == CLIENT_SECRET_JWT:
            return "none", None, 0
        raise OAuthError("invalid_request",
                         "a device with a key pair gets bound tokens only: send a DPoP "
                         "proof (RFC 9449) or connect with the device certificate",
                         device_id=device_id)

    # --- introspection (RFC 7662) ------------------------------------------------------

    def introspect(self, token: str, presented_cnf: Mapping[str, str] | None) -> dict[str, Any]:
        """``{"active": true, claims…}`` for a token that is ours, unexpired, not revoked,
        of a device that may still use it — and, when the caller says what the client
        presented (``presented_cnf``: ``{}``, ``{"x5t#S256": …}`` or ``{"jkt": …}``),
        used with its binding. Otherwise ``{"active": false}`` (RFC 7662 §2.2: nothing
        about why). Reads SQL (the certificate of a certificate-bound token): call it on a
        worker thread."""
        verdict, claims = self._check(token, presented_cnf)
        if verdict is not None or claims is None:
            return {"active": False}
        answer: dict[str, Any] = {
            "active": True, "scope": claims.scope, "client_id": claims.device_id,
            "sub": claims.device_id, "token_type": claims.token_type, "exp": claims.expires_at,
            "iat": claims.issued_at, "nbf": claims.not_before, "jti": claims.jti,
            "iss": self._issuer_url(), "aud": self._audience()}
        if claims.thumbprint is not None:
            answer["cnf"] = {claims.binding: claims.thumbprint}
        return answer

    def inspect(self, token: str, presented_cnf: Mapping[str, str] | None = None
                ) -> dict[str, Any]:
        """For operators: is the token valid now, what is it bound to, and why not."""
        verdict, claims = self._check(token, presented_cnf)
        answer: dict[str, Any] = {"valid": verdict is None, "reason": verdict or "valid"}
        try:
            answer["header"] = jwt.get_unverified_header(token)
            answer["claims"] = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            answer["header"] = answer["claims"] = None
        if claims is not None:
            answer["binding"] = {"kind": claims.binding, "thumbprint": claims.thumbprint}
            answer["device_id"] = claims.device_id
        return answer

    def _check(self, token: str, presented_cnf: Mapping[str, str] | None
               ) -> tuple[str | None, AccessToken | None]:
        try:
            claims = self.verifier.verify_uncached(token)
        except TokenRefused as exc:
            return exc.reason, None
        if self._cache.is_token_revoked(claims.jti):
            return "the token was revoked (by its jti)", claims
        device = self._cache.device(claims.device_id)
        if device is None:
            return "the token's device no longer exists", claims
        if device.credential_generation != claims.generation:
            return ("the token was revoked: the device's credentials changed since it was "
                    "issued (state change or certificate revocation)"), claims
        if device.state not in (LifecycleState.ACTIVE, LifecycleState.QUARANTINED):
            return f"device {device.id} is {device.state.value}", claims
        if (device.state is LifecycleState.QUARANTINED
                and not set(claims.scopes) <= RECOVERY_SCOPES):
            return "the device is quarantined and the token has more than recovery scopes", \
                claims
        if claims.binding == "x5t#S256":
            problem = self._bound_certificate_problem(claims)
            if problem is not None:
                return problem, claims
        if presented_cnf is not None:
            expected = {} if claims.thumbprint is None else {claims.binding: claims.thumbprint}
            if dict(presented_cnf) != expected:
                return ("the token was presented without its binding (the proof of "
                        "possession does not match cnf)"), claims
        return None, claims

    def _bound_certificate_problem(self, claims: AccessToken) -> str | None:
        """A certificate-bound token is as good as its certificate: the gate refuses it
        over a revoked or expired certificate, so introspection must not call it active
        (the certificate is found by its SHA-256, which ``x5t#S256`` is)."""
        try:
            fingerprint = b64url_decode(claims.thumbprint or "").hex()
        except ValueError:
            return "the token's cnf is not a certificate thumbprint"
        with self._db.read() as conn:
            record = cert_rows.get_by_fingerprint(conn, fingerprint)
        if record is None or record.device_id != claims.device_id:
            return "the token's certificate is not a certificate of its device"
        if record.revoked_at is not None:
            return "the certificate the token is bound to is revoked"
        if not record.not_before <= self._clock.now() < record.not_after:
            return "the certificate the token is bound to has expired"
        return None

    def _issuer_url(self) -> str:
        return self.verifier.issuer

    def _audience(self) -> str:
        return self.verifier.audience

    # --- operators ------------------------------------------------------------------

    def issue_for_operator(self, device_id: str, scope: str | None, *,
                           certificate_pem: str | None, public_key_pem: str | None,
                           actor: str) -> TokenGrant:
        """A token for testing a resource server, bound to a certificate of the device
        (the newest valid one unless ``certificate_pem`` names one) or to a public key.
        The device's state and policy apply as at the token endpoint; audited.

        Raises:
            NotFound, InvalidInput, PolicyViolation: with what to change.
        """
        validate_device_id(device_id)
        device = self._cache.device(device_id)
        if device is None:
            raise NotFound(f"device {device_id!r} does not exist")
        try:
            self._check_state(device)
            requested = parse_scope(scope)
        except OAuthError as exc:
            raise PolicyViolation(exc.description, hint="check the device's state") from None
        except ValueError as exc:
            raise InvalidInput(str(exc), hint=f"known scopes: {' '.join(SCOPES)}") from None
        if certificate_pem is not None and public_key_pem is not None:
            raise InvalidInput("give a certificate or a public key, not both")
        serial = 0
        if public_key_pem is not None:
            key = _load_public_key(public_key_pem)
            binding, thumbprint = "jkt", key_thumbprint(key)
        else:
            der = self._device_certificate(device_id, certificate_pem)
            verified = self._cache.verified_certificate(der)
            if verified is None or verified.device_id != device_id:
                raise PolicyViolation("the certificate is not a valid, unrevoked "
                                      f"certificate of device {device_id}",
                                      hint="issue one: fleetward cert issue --device ID")
            binding, thumbprint, serial = "x5t#S256", certificate_thumbprint(der), \
                verified.serial
        granted = narrow(requested, self._cache.compile_policy(device, serial),
                         quarantined=device.state is LifecycleState.QUARANTINED)
        if not granted:
            raise PolicyViolation("the device's policy opens none of the requested scopes",
                                  hint="fleetward policy test --device ID …")
        issued = self._issuer.issue(device_id, granted, binding, thumbprint,
                                    device.credential_generation,
                                    self._config.access_token_lifetime_seconds)
        grant = TokenGrant(issued, "operator", requested)
        with self._db.transaction() as conn:
            event = grant.audit_event("admin-api")
            self._audit.append(conn, AuditEvent(event.action, actor, event.target,
                                                 details=event.details))
        return grant

    def _device_certificate(self, device_id: str, certificate_pem: str | None) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding

        if certificate_pem is not None:
            try:
                return x509.load_pem_x509_certificate(certificate_pem.encode()).public_bytes(
                    Encoding.DER)
            except ValueError:
                raise InvalidInput("the certificate is not PEM") from None
        now = self._clock.now()
        with self._db.read() as conn:
            records = cert_rows.list_certificates(conn, device_id=device_id, revoked=False,
                                                  limit=None)
        valid = [r for r in records if r.not_before <= now < r.not_after]
        if not valid:
            raise PolicyViolation(f"device {device_id} has no valid certificate to bind to",
                                  hint="pass --public-key FILE to bind to a key instead")
        return x509.load_pem_x509_certificate(valid[-1].pem.encode()).public_bytes(
            Encoding.DER)

    def revoke_token(self, jti: str, actor: str) -> dt.datetime:
        """Refuse one token from now on, on every node; returns until when its jti is
        remembered (the longest any token can live, plus the clock skew).

        Raises:
            InvalidInput: not a jti we could have issued.
            Conflict: already revoked.
        """
        if not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI_CHARS or not all(
                c.isascii() and (c.isalnum() or c in "-_") for c in jti):
            raise InvalidInput("invalid token id (jti)",
                               hint="the jti claim: fleetward access-token inspect TOKEN")
        now = self._clock.now()
        forget_after = now + dt.timedelta(
            seconds=self._config.max_access_token_lifetime_seconds
            + self._config.clock_skew_seconds)
        with self._db.transaction() as conn:
            revoked_rows.forget_expired(conn, now)
            # Every node holds these in memory until they are forgotten: bounded.
            if revoked_rows.count_live(conn, now) >= self._config.max_revoked_tokens:
                raise TooManyRequests(
                    f"{self._config.max_revoked_tokens} tokens are revoked one by one "
                    "already ([tokens] max_revoked_tokens)",
                    hint="revoke every token of the device instead: fleetward "
                         "access-token revoke --device ID; or wait until older entries "
                         "expire")
            if not revoked_rows.add(conn, jti, None, now, actor, forget_after):
                raise Conflict(f"token {jti} is already revoked", hint="nothing to do")
            self._audit.append(conn, AuditEvent(
                action=TOKEN_REVOKED, actor=actor, target=f"access_token:{jti}",
                details={"refused_until": forget_after.isoformat()}))
        return forget_after

    def revoke_device_tokens(self, device_id: str, actor: str, reason: str = "") -> int:
        """End every access token the device holds (its credential generation moves on);
        returns the new generation.

        Raises:
            NotFound: no such device.
        """
        validate_device_id(device_id)
        with self._db.transaction() as conn:
            if device_rows.get_device(conn, device_id, for_update=True) is None:
                raise NotFound(f"device {device_id!r} does not exist")
            device_rows.bump_credential_generation(conn, device_id)
            self._audit.append(conn, AuditEvent(
                action=DEVICE_TOKENS_REVOKED, actor=actor, target=f"device:{device_id}",
                details={"reason": reason}))
            device = device_rows.get_device(conn, device_id)
        return device.credential_generation if device is not None else 0


def _claimed(form: Mapping[str, str]) -> str | None:
    """The client_id a refused request claimed, for the audit row (if it looks like a
    device id; never anything else from the request)."""
    client_id = form.get("client_id")
    try:
        return validate_device_id(client_id) if client_id else None
    except InvalidInput:
        return None


def _load_public_key(pem: str) -> ec.EllipticCurvePublicKey:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        raise InvalidInput("the public key is not PEM (SubjectPublicKeyInfo)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidInput("only EC P-256 public keys can bind tokens")
    public_jwk(key)  # refuses other curves
    return key
