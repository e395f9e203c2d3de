"""Access tokens: ES256 JWTs in the RFC 9068 profile, bound to the device's certificate
(``cnf.x5t#S256``, RFC 8705) or to a key it proved with DPoP (``cnf.jkt``, RFC 9449),
or — only for devices that hold no key pair — unbound and short-lived.

Claims: ``iss``, ``sub`` (device id), ``aud``, ``iat``, ``nbf``, ``exp``, ``jti``,
``client_id`` (the device id), ``scope``, ``cnf`` (bound tokens), and two private
claims (RFC 7519 §4.3): ``fw_binding`` (``x5t#S256``, ``jkt`` or ``none``: says in the
token whether it is bound) and ``fw_gen``, the device's credential generation when the
token was issued — the per-device not-before that revocation moves on.

Verification follows RFC 8725: one algorithm (ES256; ``none`` and HS256 keyed with our
public key are refused by the allow-list), ``typ`` must be ``at+jwt`` (RFC 9068 §4),
the ``kid`` must name a key that may still verify, ``iss``/``aud`` must be ours,
``nbf``/``iat`` are checked against the injected clock with a bounded skew and ``exp``
without one (a session ends at ``exp``, so nothing is accepted after it), and no token may
live longer than the configured maximum.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm

from fleetward.clock import Clock
from fleetward.config import TokensConfig
from fleetward.crypto.jose import ALGORITHM, b64url_decode, decode_segment
from fleetward.model import DEVICE_ID_PATTERN
from fleetward.tokens.keys import SigningKeys
from fleetward.tokens.scopes import parse_scope

TOKEN_TYPE_HEADER = "at+jwt"  # RFC 9068 §2.1
BINDINGS = ("x5t#S256", "jkt", "none")
MAX_TOKEN_CHARS = 8192  # ours are ~700; a longer one is not ours and is not parsed
VERIFIED_CACHE_ENTRIES = 4096  # tokens whose signature this node already checked
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "nbf", "jti")  # RFC 9068 §2.2
_ES256 = ECAlgorithm(ECAlgorithm.SHA256)


class TokenRefused(Exception):
    """An access token (or proof) is not accepted; ``reason`` is safe to send back."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AccessToken:
    """The verified claims of one access token."""

    jti: str
    device_id: str
    scopes: tuple[str, ...]
    issued_at: int
    not_before: int
    expires_at: int
    binding: str  # x5t#S256 | jkt | none
    thumbprint: str | None  # the cnf value of a bound token
    generation: int
    kid: str

    @property
    def token_type(self) -> str:
        """``DPoP`` for key-bound tokens (RFC 9449 §5), else ``Bearer``."""
        return "DPoP" if self.binding == "jkt" else "Bearer"

    @property
    def scope(self) -> str:
        return " ".join(self.scopes)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str = field(repr=False)  # a bearer credential: never in a repr or a log
    claims: AccessToken = field()


class AccessTokenIssuer:
    def __init__(self, keys: SigningKeys, issuer: str, audience: str, config: TokensConfig,
                 clock: Clock) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._config = config
        self._clock = clock

    def issue(self, device_id: str, scopes: tuple[str, ...], binding: str,
              thumbprint: str | None, generation: int, lifetime_seconds: int) -> IssuedToken:
        """Sign a token for ``device_id``.

        Raises:
            ValueError: a binding without its thumbprint, or an unknown binding.
            KeyUnavailable: no signing key.
        """
        if binding not in BINDINGS or (binding == "none") != (thumbprint is None):
            raise ValueError(f"binding {binding!r} with thumbprint {thumbprint!r}")
        key = self._keys.signing_key()
        now = int(self._clock.now().timestamp())
        claims = AccessToken(jti=secrets.token_urlsafe(16), device_id=device_id,
                             scopes=scopes, issued_at=now, not_before=now,
                             expires_at=now + lifetime_seconds, binding=binding,
                             thumbprint=thumbprint, generation=generation, kid=key.kid)
        payload: dict[str, Any] = {
            "iss": self._issuer, "sub": device_id, "aud": self._audience,
            "iat": now, "nbf": now, "exp": claims.expires_at, "jti": claims.jti,
            "client_id": device_id, "scope": claims.scope,
            "fw_binding": binding, "fw_gen": generation}
        if thumbprint is not None:
            payload["cnf"] = {binding: thumbprint}
        assert key.signer is not None  # signing_key() returns only keys with a signer
        token = jwt.encode(payload, key.signer.private_key, algorithm=ALGORITHM,  # type: ignore[arg-type]
                           headers={"kid": key.kid, "typ": TOKEN_TYPE_HEADER})
        return IssuedToken(token, claims)


class AccessTokenVerifier:
    """Verifies our access tokens; a token already verified on this node is answered
    from a bounded cache (signature and static claims), its times checked again."""

    def __init__(self, keys: SigningKeys, issuer: str, audience: str, config: TokensConfig,
                 clock: Clock) -> None:
        self._keys = keys
        self.issuer = self._issuer = issuer
        self.audience = self._audience = audience
        self._config = config
        self._clock = clock
        self._skew = config.clock_skew_seconds
        self._cache: OrderedDict[str, AccessToken] = OrderedDict()

    def verify(self, token: str) -> AccessToken:
        """The claims of ``token`` if it is ours and valid now.

        Raises:
            TokenRefused: with a reason a device developer can act on.
        """
        now = self._clock.now().timestamp()
        cached = self._cache.get(token)
        if cached is None:
            cached = self._verify_signed(token, now)
            self._cache[token] = cached
            if len(self._cache) > VERIFIED_CACHE_ENTRIES:
                self._cache.popitem(last=False)
        elif self._keys.verification_key(cached.kid, now) is None:
            raise TokenRefused("the key that signed the access token has been rotated out")
        self._check_times(cached, now)
        return cached

    def verify_uncached(self, token: str) -> AccessToken:
        """``verify`` without the cache (benchmarks, introspection of odd tokens)."""
        now = self._clock.now().timestamp()
        claims = self._verify_signed(token, now)
        self._check_times(claims, now)
        return claims

    def _check_times(self, claims: AccessToken, now: float) -> None:
        # exp without leeway: our nodes issued it on their own (synchronised) clocks, and a
        # session authenticated by it ends at exp, so a token must never be accepted after
        # it either. nbf/iat get the skew: a node whose clock is behind the issuing node's.
        if now >= claims.expires_at:
            raise TokenRefused("the access token has expired; get a new one")
        if now + self._skew < claims.not_before or now + self._skew < claims.issued_at:
            raise TokenRefused("the access token is not valid yet (nbf/iat in the future); "
                               "check the device clock")

    def _verify_signed(self, token: str, now: float) -> AccessToken:
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
            raise TokenRefused("not an access token (a compact JWS of three parts)")
        signing_input, _, signature_part = token.rpartition(".")
        header_part, _, payload_part = signing_input.partition(".")
        try:
            header = decode_segment(header_part)
        except (ValueError, UnicodeDecodeError):
            raise TokenRefused("the access token's header is not valid JSON") from None
        if header.get("alg") != ALGORITHM:
            # RFC 8725 §3.1: one algorithm, decided by us, never by the token ("none",
            # or HS256 keyed with our public key, are refused here).
            raise TokenRefused(f"access tokens are signed with {ALGORITHM} only")
        if header.get("typ") not in (TOKEN_TYPE_HEADER, "application/at+jwt"):
            raise TokenRefused("not an access token (typ must be at+jwt, RFC 9068 §4)")
        if "crit" in header:
            raise TokenRefused("critical header parameters are not understood (RFC 7515 "
                               "§4.1.11)")
        kid = header.get("kid")
        key = self._keys.verification_key(kid, now) if isinstance(kid, str) else None
        if key is None:
            raise TokenRefused("the access token names an unknown or rotated-out signing "
                               "key (kid)")
        # The signature, with PyJWT's ES256 (raw r||s, RFC 7518 §3.4) on the key object
        # cached with the kid; the header and payload are parsed once, by us, strictly
        # (PyJWT's decode would parse both again and re-check the header: the data plane
        # verifies every new connection's token, bench/tokens.py measures it).
        try:
            signature = b64url_decode(signature_part)
            valid = _ES256.verify(signing_input.encode("ascii"), key.public_key, signature)
        except (ValueError, UnicodeEncodeError):
            valid = False
        if not valid:
            raise TokenRefused("the access token's signature does not verify")
        try:
            payload = decode_segment(payload_part)
        except (ValueError, UnicodeDecodeError):
            raise TokenRefused("the access token's payload is not a JSON object") from None
        for claim in REQUIRED_CLAIMS:
            if claim not in payload:
                raise TokenRefused(f"the access token lacks the {claim!r} claim")
        if payload["iss"] != self._issuer:
            raise TokenRefused("the access token was issued by someone else")
        audience = payload["aud"]
        if audience != self._audience and not (
                isinstance(audience, list) and self._audience in audience):
            raise TokenRefused("the access token is for another audience")
        return self._claims(payload, str(kid))

    def _claims(self, payload: dict[str, Any], kid: str) -> AccessToken:
        sub, jti = payload.get("sub"), payload.get("jti")
        if not isinstance(sub, str) or not DEVICE_ID_PATTERN.fullmatch(sub):
            raise TokenRefused("the access token's sub is not a device id")
        if payload.get("client_id") != sub:
            raise TokenRefused("the access token's client_id is not its sub")
        if not isinstance(jti, str) or not 1 <= len(jti) <= 64:
            raise TokenRefused("the access token's jti is missing or too long")
        iat, nbf, exp = (_seconds(payload.get(name)) for name in ("iat", "nbf", "exp"))
        binding = payload.get("fw_binding")
        generation = payload.get("fw_gen")
        if binding not in BINDINGS or not isinstance(generation, int) or isinstance(
                generation, bool) or generation < 0:
            raise TokenRefused("the access token lacks fw_binding or fw_gen")
        cnf = payload.get("cnf")
        thumbprint: str | None = None
        if binding == "none":
            if cnf is not None:
                raise TokenRefused("an unbound token must not carry cnf")
            limit = self._config.unbound_token_lifetime_seconds
        else:
            if not isinstance(cnf, dict) or set(cnf) != {binding} or not isinstance(
                    cnf[binding], str):
                raise TokenRefused(f"a {binding}-bound token needs cnf.{binding}")
            thumbprint = cnf[binding]
            limit = self._config.max_access_token_lifetime_seconds
        if exp - iat > limit or nbf < iat or exp <= nbf:
            raise TokenRefused(f"the access token lives longer than the {limit} s allowed")
        scope = payload.get("scope", "")
        try:
            scopes = parse_scope(scope if isinstance(scope, str) else None)
        except ValueError as exc:
            raise TokenRefused(str(exc)) from None
        return AccessToken(jti=jti, device_id=sub, scopes=scopes, issued_at=iat,
                           not_before=nbf, expires_at=exp, binding=binding,
                           thumbprint=thumbprint, generation=generation, kid=kid)


def _seconds(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TokenRefused("iat, nbf and exp must be whole seconds")
    return value
