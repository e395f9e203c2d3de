"""Credentials besides the certificate: OAuth 2.0 access tokens and SAS tokens, the
device side of docs/credentials.md.

Access tokens (``auth = "token"``) come from the token endpoint ``POST /oauth2/token``
(RFC 6749 §4.4 client credentials, form-encoded) and are bound to something the device
holds, so a stolen token is useless on its own:

- *certificate binding* (RFC 8705 §2, ``tls_client_auth``): the request goes over mutual
  TLS with the device certificate and ``client_id`` = the device id; the token carries
  ``cnf.x5t#S256`` and is sent as ``Bearer`` over connections presenting that
  certificate.
- *key binding* (RFC 9449 DPoP): the device authenticates with a client assertion
  signed ES256 by its key (``private_key_jwt``, RFC 7523 §2.2) and sends a DPoP proof
  by the same key; the token carries ``cnf.jkt`` and every use needs a fresh proof. No
  client certificate is involved, so this also serves a device that has none, and keys
  Python's TLS cannot use (PKCS#11: the keystore's key object signs on the token).

SAS tokens (``auth = "sas"``) are signed on the device with its symmetric key, in Azure
IoT Hub's format (``fleetward.crypto.sas.sign_sas``).

Refresh: a credential is replaced at two thirds of its lifetime, measured on the
device's clock from the moment the request was sent (so a device clock that is off
does not matter and the local deadline is never after the server's ``exp``). A refusal
that says the credential expired or was revoked makes the agent get a fresh one and try
once more before it treats the refusal as a refusal of the device (``note_refusal``).

Secrets (tokens, SAS tokens, proofs, the symmetric key) never appear in a repr, a log
line or an exception message.
"""

from __future__ import annotations

import abc
import base64
import binascii
import contextlib
import datetime as dt
import json
import re
import secrets
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.agent.connect import ChannelRefused
from fleetward.agent.errors import AgentStateError, ServerUnreachable
from fleetward.agent.keystore import Keystore, pinned_ca_pem
from fleetward.agent.state import AgentConfig, StateLayout, read_secret_file, write_atomic
from fleetward.agent.transport import HttpResponse, HttpxTransport, Transport, client_tls_context
from fleetward.clock import Clock
from fleetward.crypto.jose import ALGORITHM, b64url, decode_segment, public_jwk, token_hash
from fleetward.crypto.sas import sign_sas
from fleetward.errors import FleetwardError

log = structlog.get_logger("fleetward.agent")

TOKEN_PATH = "/oauth2/token"
FORM_TYPE = "application/x-www-form-urlencoded"
GRANT_TYPE = "client_credentials"  # RFC 6749 §4.4
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 §2.2
PROOF_TYPE = "dpop+jwt"  # RFC 9449 §4.2
MQTT_PROOF_METHOD = "CONNECT"  # a proof's htm on MQTT (docs/credentials.md)
# MQTT 5.0 §4.12 enhanced authentication method of access tokens (docs/credentials.md).
TOKEN_AUTH_METHOD = "FW-TOKEN"
JTI_BYTES = 16  # 128 random bits per assertion and proof jti (RFC 7519 §4.1.7: unique)
# An assertion is used at once: a minute is plenty and well inside the server's
# [tokens] max_assertion_lifetime_seconds (300).
ASSERTION_LIFETIME_SECONDS = 60
# A SAS token the agent signs is valid this long (the server accepts up to
# [tokens] max_sas_validity_seconds, 86400): a leaked SAS is worth an hour at most.
SAS_VALIDITY_SECONDS = 3600
MAX_SAS_VALIDITY_SECONDS = 86400  # the server's default [tokens] max_sas_validity_seconds
REFRESH_FRACTION = 2 / 3  # replace a credential after this much of its lifetime
# expires_in the agent accepts from a token endpoint (the server's maximum is 3600 s).
TOKEN_LIFETIME_BOUNDS_SECONDS = (1, 86400)
MIN_SYMMETRIC_KEY_BYTES = 16  # Fleetward issues 32; Azure-style keys are 32 or 64
MAX_TOKEN_CHARS = 8192  # an access token is ~1 KiB; anything far larger is not one
# A refusal whose reason says this is about the credential, not the device: get a
# fresh credential and try once more (expired, revoked by jti or generation, a rotated
# signing or symmetric key, a proof the server did not take).
CREDENTIAL_REFUSAL = re.compile(
    r"expired|revoked|rotated|access token|\bSAS\b|proof|signature", re.IGNORECASE)
# OAuth errors (RFC 6749 §5.2) that only an operator or a developer can fix: the device
# is refused. Others (invalid_dpop_proof: a clock off, a proof replayed) are retried.
_REFUSING_ERRORS = frozenset({"invalid_client", "unauthorized_client", "invalid_scope",
                              "invalid_request", "unsupported_grant_type", "invalid_grant"})
BINDING_OF_TYPE = {"DPoP": "jkt", "Bearer": "x5t#S256"}


class TokenEndpointRefused(ChannelRefused):
    """The token endpoint refused to issue a token (``invalid_client``: unknown,
    disabled or retired device, no registered key; ``unauthorized_client``: not active
    yet; ``invalid_scope``): a fresh credential cannot change that answer."""

    default_hint = ("the operator must register or enable the device, or register its "
                    "public key (fleetward credential add --device ID --kind public-key)")


def new_jti() -> str:
    return b64url(secrets.token_bytes(JTI_BYTES))


def htu_of(url: str) -> str:
    """The URI a proof names: ``url`` without query and fragment (RFC 9449 §4.2)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def make_assertion(key: ec.EllipticCurvePrivateKey, *, device_id: str, audience: str,
                   now: float, lifetime_seconds: int = ASSERTION_LIFETIME_SECONDS) -> str:
    """A ``private_key_jwt`` client assertion (RFC 7523 §3): ``iss`` = ``sub`` = the
    device id, ``aud`` = the token endpoint URL, a short ``exp`` and a random ``jti``.

    Args:
        key: the device key; a PKCS#11 key object signs on the token.
        audience: the token endpoint URL.
        now: seconds since the epoch.
        lifetime_seconds: how long the assertion is valid.

    Returns:
        The compact JWS, signed ES256.
    """
    issued = int(now)
    claims = {"iss": device_id, "sub": device_id, "aud": audience, "iat": issued,
              "exp": issued + lifetime_seconds, "jti": new_jti()}
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def make_proof(key: ec.EllipticCurvePrivateKey, *, method: str, url: str, now: float,
               access_token: str | None = None, nonce: bytes | None = None) -> str:
    """A DPoP proof (RFC 9449 §4.2), also the proof of an MQTT CONNECT.

    Args:
        key: the key the token is (or will be) bound to.
        method: ``htm``: the HTTP method, or ``CONNECT`` on MQTT.
        url: the request's URL (query and fragment are dropped) or ``mqtts://host:port``.
        now: seconds since the epoch (``iat``).
        access_token: the token the proof accompanies (``ath``); None at the token
            endpoint.
        nonce: a server challenge, carried as ``nonce`` = base64url(challenge) (§8).

    Returns:
        The compact JWS: header ``typ`` dpop+jwt, ES256, the public ``jwk``.
    """
    claims: dict[str, Any] = {"jti": new_jti(), "htm": method, "htu": htu_of(url),
                              "iat": int(now)}
    if access_token is not None:
        claims["ath"] = token_hash(access_token)
    if nonce is not None:
        claims["nonce"] = b64url(nonce)
    return jwt.encode(claims, key, algorithm=ALGORITHM,
                      headers={"typ": PROOF_TYPE, "jwk": public_jwk(key.public_key())})


def refresh_time(obtained_at: float, expires_at: float,
                 fraction: float = REFRESH_FRACTION) -> float:
    """When to replace a credential valid from ``obtained_at`` to ``expires_at``."""
    return obtained_at + (expires_at - obtained_at) * fraction


# --- access tokens ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessToken:
    """One token from the token endpoint. ``value`` (and the key that makes its proofs)
    never appear in the repr."""

    value: str = field(repr=False)
    token_type: str  # Bearer | DPoP
    binding: str  # x5t#S256 | jkt | none (from the token's fw_binding)
    scope: str
    jti: str
    obtained_at: float  # epoch seconds on the device's clock, when the request was sent
    expires_at: float  # obtained_at + expires_in: never after the server's exp
    refresh_at: float
    proof_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False,
                                                          compare=False)

    def status(self) -> dict[str, Any]:
        """What ``status`` may show (never the token)."""
        return {"token_type": self.token_type, "binding": self.binding, "scope": self.scope,
                "jti": self.jti, "obtained_at": int(self.obtained_at),
                "expires_at": int(self.expires_at), "refresh_at": int(self.refresh_at)}


def _error_field(body: Any, name: str) -> str:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str):
        return ""
    return "".join(c for c in value if c.isprintable())[:300]


def token_endpoint_error(response: HttpResponse) -> FleetwardError:
    """What a non-200 answer of the token endpoint means for the agent.

    Returns:
        ``TokenEndpointRefused`` for an RFC 6749 §5.2 error only an operator can fix (or
        any 401/403); ``ServerUnreachable`` for everything to retry later (5xx, 429,
        ``invalid_dpop_proof``, an answer that is not OAuth JSON).
    """
    try:
        body = json.loads(response.body)
    except (ValueError, UnicodeDecodeError):
        body = None
    error = _error_field(body, "error")
    description = _error_field(body, "error_description") or error or \
        f"HTTP {response.status}"
    if response.status in (401, 403) or (400 <= response.status < 500
                                         and error in _REFUSING_ERRORS):
        return TokenEndpointRefused(
            f"the token endpoint refused this device (HTTP {response.status} "
            f"{error or 'error'}): {description}", code=response.status, reason=description)
    return ServerUnreachable(f"the token endpoint answered HTTP {response.status}"
                             f"{' ' + error if error else ''}: {description}",
                             hint="the agent retries with backoff; if it persists, check "
                                  "the device's clock (proofs carry the time)")


def read_token_response(response: HttpResponse, *, obtained_at: float,
                        fraction: float = REFRESH_FRACTION) -> AccessToken:
    """The token of a 200 answer (RFC 6749 §5.1).

    Raises:
        ServerUnreachable: not a token response the agent can use.
    """
    try:
        body = json.loads(response.body)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise ServerUnreachable("the token endpoint's answer is not a JSON object")
    value, token_type, expires_in = (body.get(k) for k in ("access_token", "token_type",
                                                            "expires_in"))
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TOKEN_CHARS \
            or not value.isascii() or not value.isprintable() or " " in value:
        raise ServerUnreachable("the token endpoint's answer has no usable access_token")
    if token_type not in BINDING_OF_TYPE:
        raise ServerUnreachable(f"the token endpoint answered token_type "
                                f"{str(token_type)[:20]!r}; the agent uses Bearer and DPoP")
    low, high = TOKEN_LIFETIME_BOUNDS_SECONDS
    if not isinstance(expires_in, int) or isinstance(expires_in, bool) \
            or not low <= expires_in <= high:
        raise ServerUnreachable("the token endpoint's answer has no usable expires_in")
    scope = body.get("scope")
    # The payload is read unverified, for the jti and binding status shows: the
    # server verifies tokens, the device only carries them.
    try:
        claims = decode_segment(value.split(".")[1])
    except (IndexError, ValueError, UnicodeDecodeError):
        claims = {}
    binding = claims.get("fw_binding")
    jti = claims.get("jti")
    expires_at = obtained_at + expires_in
    return AccessToken(
        value=value, token_type=token_type,
        binding=binding if isinstance(binding, str) else BINDING_OF_TYPE[token_type],
        scope=scope if isinstance(scope, str) else "",
        jti=jti if isinstance(jti, str) else "", obtained_at=obtained_at,
        expires_at=expires_at, refresh_at=refresh_time(obtained_at, expires_at, fraction))


@dataclass(frozen=True, slots=True)
class MqttPassword:
    """CONNECT credentials for a listener without enhanced authentication."""

    username: str
    password: str = field(repr=False)
    refresh_at: float  # reconnect with a new password from then on
    expires_at: float


class Credentials(Protocol):
    """What a session asks of the credential it authenticates with (thread-safe)."""

    @property
    def mode(self) -> str:
        """``token`` or ``sas``."""
        ...

    def http_headers(self, method: str, path: str) -> dict[str, str]:
        """The headers that authenticate one request to the device listener.

        Raises:
            ServerUnreachable, TokenEndpointRefused: no credential can be had now.
        """
        ...

    def mqtt_password(self, mqtt_url: str) -> MqttPassword:
        """A user name and password for one CONNECT to ``mqtt_url``."""
        ...

    def invalidate(self) -> None:
        """Forget the current credential: the next use gets a new one."""
        ...

    def note_refusal(self, refusal: ChannelRefused) -> bool:
        """True: the refusal is about the credential and this is the first one since the
        last session opened; the credential is dropped, reconnect now with a new one.
        False: treat it as a refusal of the device."""
        ...

    def note_success(self) -> None:
        """A session opened with the current credential."""
        ...


class _RetryOnce(abc.ABC):
    """``note_refusal`` / ``note_success`` of every credential kind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._retried = False

    @abc.abstractmethod
    def invalidate(self) -> None:
        """Forget the current credential (each kind knows what it holds)."""

    def note_refusal(self, refusal: ChannelRefused) -> bool:
        if isinstance(refusal, TokenEndpointRefused):
            return False  # the issuer itself said no: a new request gets the same answer
        if not CREDENTIAL_REFUSAL.search(refusal.reason or ""):
            return False
        with self._lock:
            if self._retried:
                return False
            self._retried = True
        self.invalidate()
        return True

    def note_success(self) -> None:
        with self._lock:
            self._retried = False


KeySource = Callable[[], ec.EllipticCurvePrivateKey]
TransportSource = Callable[[], Transport]


class TokenProvider(_RetryOnce):
    """Access tokens for one device, obtained when first needed and replaced at
    ``fraction`` of their lifetime.

    Args:
        device_id: the client id.
        server_url: the device listener, ``https://host:port`` (the token endpoint and
            the proofs' ``htu`` are built from it).
        binding: ``certificate`` (tls_client_auth over the mTLS transport) or ``key``
            (private_key_jwt + DPoP; the transport needs no client certificate).
        key: loads the device key (key binding); called once per token.
        transport: a new transport to the server for one token request.
        clock: "now" for iat/exp and the refresh schedule.
        identity_lock: held while the key and transport are loaded (a certificate
            renewal swaps both under it).
        status_file: where what ``status`` shows is written after each new token.
        scope: the scopes to ask for; None: all the device's policy opens.
    """

    mode = "token"

    def __init__(self, *, device_id: str, server_url: str, binding: str, key: KeySource,
                 transport: TransportSource, clock: Clock,
                 identity_lock: threading.Lock | None = None,
                 status_file: Path | None = None, scope: str | None = None,
                 fraction: float = REFRESH_FRACTION) -> None:
        super().__init__()
        if binding not in ("certificate", "key"):
            raise ValueError(f"unknown binding {binding!r}")
        self.device_id = device_id
        self.server_url = server_url.rstrip("/")
        self.binding = binding
        self._key_source = key
        self._transport_source = transport
        self._clock = clock
        self._identity_lock = identity_lock
        self._status_file = status_file
        self._scope = scope
        self._fraction = fraction
        self._token: AccessToken | None = None
        self._fetch_lock = threading.Lock()  # one token request at a time
        self.fetches = 0  # tokens obtained (tests, logs)

    def __repr__(self) -> str:
        return f"TokenProvider(device_id={self.device_id!r}, binding={self.binding!r})"

    @property
    def endpoint(self) -> str:
        return self.server_url + TOKEN_PATH

    def _now(self) -> float:
        return self._clock.now().timestamp()

    def current(self) -> AccessToken | None:
        """The token held now, without asking for one."""
        return self._token

    def token(self) -> AccessToken:
        """A token that is not due for refresh (obtained now if needed).

        Raises:
            ServerUnreachable: the token endpoint cannot be reached or answered nonsense.
            TokenEndpointRefused: it refused to issue a token to this device.
            KeyUnavailable, AgentStateError: the device key or certificate cannot be used.
        """
        with self._fetch_lock:
            held = self._token
            if held is not None and self._now() < held.refresh_at:
                return held
            self._token = self._fetch()
            return self._token

    def invalidate(self) -> None:
        self._token = None

    def _fetch(self) -> AccessToken:
        lock = self._identity_lock or contextlib.nullcontext()
        with lock:
            key = self._key_source() if self.binding == "key" else None
            transport = self._transport_source()
        started = self._now()
        form = {"grant_type": GRANT_TYPE}
        headers = {"Content-Type": FORM_TYPE, "Accept": "application/json"}
        if key is None:
            form["client_id"] = self.device_id  # RFC 8705 §2: tls_client_auth
        else:
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = make_assertion(key, device_id=self.device_id,
                                                      audience=self.endpoint, now=started)
            headers["DPoP"] = make_proof(key, method="POST", url=self.endpoint, now=started)
        if self._scope:
            form["scope"] = self._scope
        try:
            response = transport.request("POST", TOKEN_PATH,
                                         body=urllib.parse.urlencode(form).encode(),
                                         headers=headers)
        finally:
            transport.close()
        if response.status != 200:
            raise token_endpoint_error(response)
        token = read_token_response(response, obtained_at=started, fraction=self._fraction)
        expected = "DPoP" if key is not None else "Bearer"
        if token.token_type != expected:
            raise ServerUnreachable(f"the token endpoint issued a {token.token_type} token; "
                                    f"this agent asked for a {expected} token")
        token = AccessToken(value=token.value, token_type=token.token_type,
                            binding=token.binding, scope=token.scope, jti=token.jti,
                            obtained_at=token.obtained_at, expires_at=token.expires_at,
                            refresh_at=token.refresh_at, proof_key=key)
        self.fetches += 1
        log.info("access token obtained", binding=token.binding, scope=token.scope,
                 jti=token.jti, expires_in_s=round(token.expires_at - started),
                 refresh_in_s=round(token.refresh_at - started))
        self._record(token)
        return token

    def _record(self, token: AccessToken) -> None:
        if self._status_file is None:
            return
        try:
            write_atomic(self._status_file, json.dumps(token.status(), indent=1).encode()
                         + b"\n", 0o600)
        except OSError as exc:  # status is a convenience: never fail a session for it
            log.warning("cannot record the token's status", error=exc.strerror)

    def proof(self, token: AccessToken, method: str, url: str,
              nonce: bytes | None = None) -> str:
        """A proof for one use of ``token`` (DPoP-bound tokens only).

        Raises:
            ValueError: ``token`` is not key-bound.
            KeyUnavailable: the key cannot sign (a token removed, a PIN changed).
        """
        if token.proof_key is None:
            raise ValueError("only a DPoP-bound token needs a proof")
        return make_proof(token.proof_key, method=method, url=url, now=self._now(),
                          access_token=token.value, nonce=nonce)

    def http_headers(self, method: str, path: str) -> dict[str, str]:
        token = self.token()
        if token.proof_key is None:
            return {"Authorization": f"Bearer {token.value}"}
        return {"Authorization": f"DPoP {token.value}",
                "DPoP": self.proof(token, method, self.server_url + path)}

    def mqtt_password(self, mqtt_url: str) -> MqttPassword:
        token = self.token()
        password = token.value
        if token.proof_key is not None:
            password += " " + self.proof(token, MQTT_PROOF_METHOD, mqtt_url)
        return MqttPassword(self.device_id, password, token.refresh_at, token.expires_at)


# --- SAS tokens ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SasToken:
    value: str = field(repr=False)
    expires_at: float  # se
    refresh_at: float


def parse_symmetric_key(text: bytes) -> bytes:
    """A symmetric key as ``fleetward credential add --kind symmetric`` shows it
    (standard base64, as Azure shows device keys).

    Raises:
        AgentStateError: not base64, or too short to be a device key (never says what
            the text was).
    """
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise AgentStateError("the symmetric key is not base64",
                              hint="paste the primary_key (or secondary_key) exactly as the "
                                   "server showed it, on one line") from None
    if len(key) < MIN_SYMMETRIC_KEY_BYTES:
        raise AgentStateError(f"the symmetric key is {len(key)} bytes; a device key has at "
                              f"least {MIN_SYMMETRIC_KEY_BYTES}",
                              hint="use the primary_key or secondary_key the server showed")
    return key


def load_symmetric_key(path: Path) -> bytes:
    """The key in ``path`` (first line, base64; the file must be 0600).

    Raises:
        AgentStateError: missing, readable by others, or not a key.
    """
    return parse_symmetric_key(read_secret_file(path, "symmetric key"))


class SasProvider(_RetryOnce):
    """SAS tokens for ``<host>/devices/<device id>``, each valid ``validity_seconds``
    and replaced at ``fraction`` of that.

    Args:
        host: the resource's host part (the server does not compare it).
        key: the device's symmetric key (raw bytes).
    """

    mode = "sas"

    def __init__(self, *, device_id: str, host: str, key: bytes, clock: Clock,
                 validity_seconds: int = SAS_VALIDITY_SECONDS,
                 fraction: float = REFRESH_FRACTION) -> None:
        super().__init__()
        if validity_seconds < 1:
            raise ValueError("a SAS token must be valid for at least a second")
        self.device_id = device_id
        self.resource = f"{host}/devices/{device_id}"
        self._key = key
        self._clock = clock
        self._validity = validity_seconds
        self._fraction = fraction
        self._sas: SasToken | None = None
        self._mutex = threading.Lock()

    def __repr__(self) -> str:
        return f"SasProvider(resource={self.resource!r})"

    def sas(self) -> SasToken:
        """A SAS token that is not due for refresh (signed now if needed)."""
        with self._mutex:
            now = self._clock.now().timestamp()
            held = self._sas
            if held is not None and now < held.refresh_at:
                return held
            expiry = int(now) + self._validity
            self._sas = SasToken(sign_sas(self.resource, self._key, expiry), float(expiry),
                                 refresh_time(now, float(expiry), self._fraction))
            log.info("SAS token signed", resource=self.resource, expires_in_s=self._validity)
            return self._sas

    def invalidate(self) -> None:
        self._sas = None

    def http_headers(self, method: str, path: str) -> dict[str, str]:
        return {"Authorization": self.sas().value}

    def mqtt_password(self, mqtt_url: str) -> MqttPassword:
        sas = self.sas()
        return MqttPassword(self.device_id, sas.value, sas.refresh_at, sas.expires_at)


# --- from agent.toml -------------------------------------------------------------------------


def resolve_binding(config: AgentConfig, keystore_kind: str, has_certificate: bool) -> str:
    """What a token of this device is bound to: ``certificate`` or ``key``.

    ``auto``: the certificate when the device has one and Python's TLS can present it
    (a key file), else the key (a PKCS#11 key signs assertions and proofs on the token;
    no client certificate is needed at all).

    Raises:
        AgentStateError: ``certificate`` asked for without a certificate, or no key pair.
    """
    if keystore_kind == "none":
        raise AgentStateError("access tokens need a key pair, and this device has none",
                              hint="fleetward-agent init --auth token generates one")
    if config.token_binding == "certificate":
        if not has_certificate:
            raise AgentStateError("token_binding = certificate, but this device has no "
                                  "certificate",
                                  hint="enroll first, or use --token-binding key")
        return "certificate"
    if config.token_binding == "key":
        return "key"
    return "certificate" if has_certificate and keystore_kind == "file" else "key"


def make_credentials(layout: StateLayout, config: AgentConfig, keystore: Keystore, *,
                     clock: Clock, identity_lock: threading.Lock | None = None,
                     sas_validity_seconds: int = SAS_VALIDITY_SECONDS
                     ) -> TokenProvider | SasProvider | None:
    """The credential ``config.auth`` asks for; None for ``mtls`` (the certificate).

    Args:
        layout: the state directory (the symmetric key, the token status file).
        config: agent.toml.
        keystore: the device key (tokens).
        clock: "now" for the credentials' times.
        identity_lock: held while the key and certificate are loaded.
        sas_validity_seconds: how long each SAS token is valid.

    Raises:
        AgentStateError: the state lacks what the mode needs (a key pair, a certificate,
            the symmetric key file).
    """
    if config.auth == "mtls":
        return None
    if config.auth == "sas":
        host = urllib.parse.urlsplit(config.server_url).hostname or ""
        return SasProvider(device_id=config.device_id, host=host,
                           key=load_symmetric_key(layout.symmetric_key), clock=clock,
                           validity_seconds=sas_validity_seconds)
    binding = resolve_binding(config, keystore.kind, layout.cert.exists())
    server_url = config.server_url
    if binding == "certificate":
        def transport() -> Transport:
            return keystore.mtls_transport(server_url)
    else:
        context = client_tls_context(cadata=pinned_ca_pem(layout))

        def transport() -> Transport:
            return HttpxTransport(server_url, context)
    return TokenProvider(device_id=config.device_id, server_url=server_url, binding=binding,
                         key=keystore.private_key, transport=transport, clock=clock,
                         identity_lock=identity_lock, status_file=layout.token_status)


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The SubjectPublicKeyInfo PEM an operator registers for the device (``fleetward
    credential add --kind public-key``); a PKCS#11 key gives its public half only."""
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def read_token_status(layout: StateLayout) -> dict[str, Any] | None:
    """What ``run`` recorded about its last token (``AccessToken.status``), or None when
    it has obtained none yet (or the file is unreadable: status is best effort)."""
    try:
        value = json.loads(layout.token_status.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def auth_summary(config: AgentConfig, keystore_kind: str, has_certificate: bool) -> str:
    """One line for ``status``: how this device authenticates."""
    if config.auth == "mtls":
        return "mtls (client certificate)"
    if config.auth == "sas":
        return "sas (SAS tokens from the symmetric key)"
    try:
        binding = resolve_binding(config, keystore_kind, has_certificate)
    except AgentStateError as exc:
        return f"token (unusable: {exc.message})"
    if binding == "certificate":
        return "token (certificate-bound, Bearer over mTLS)"
    return "token (key-bound, DPoP)"


def token_status_rows(layout: StateLayout, now: dt.datetime) -> list[tuple[str, str]]:
    """``status`` rows about the last access token: binding, expiry, scope, jti."""
    status = read_token_status(layout)
    if status is None:
        return [("access token", "none obtained yet (fleetward-agent run gets one)")]
    rows: list[tuple[str, str]] = []
    binding = status.get("binding")
    if isinstance(binding, str):
        rows.append(("token binding", {"jkt": "jkt (DPoP key)",
                                       "x5t#S256": "x5t#S256 (certificate)"}.get(binding,
                                                                                  binding)))
    expires = status.get("expires_at")
    if isinstance(expires, int):
        at = dt.datetime.fromtimestamp(expires, dt.UTC)
        left = "expired" if at <= now else "valid"
        rows.append(("token expires", f"{at:%Y-%m-%d %H:%M:%S} UTC ({left})"))
    for name, key in (("token scope", "scope"), ("token id (jti)", "jti")):
        value = status.get(key)
        if isinstance(value, str) and value:
            rows.append((name, value))
    return rows


__all__ = ["ASSERTION_TYPE", "MAX_SAS_VALIDITY_SECONDS", "SAS_VALIDITY_SECONDS",
           "TOKEN_AUTH_METHOD", "TOKEN_PATH", "AccessToken", "Credentials", "MqttPassword",
           "SasProvider", "SasToken", "TokenEndpointRefused", "TokenProvider", "auth_summary",
           "htu_of", "load_symmetric_key", "make_assertion", "make_credentials", "make_proof",
           "parse_symmetric_key", "public_key_pem", "read_token_response",
           "read_token_status", "refresh_time", "resolve_binding", "token_endpoint_error",
           "token_status_rows"]
