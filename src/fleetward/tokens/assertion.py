"""Client authentication with a JWT assertion (RFC 7523 §2.2 and §3, RFC 7521 §4.2).

``private_key_jwt``: the assertion is signed (ES256) by a key registered for the
device — the key of one of its valid certificates, or a raw public key registered for
a device without TLS client authentication. ``client_secret_jwt``: signed (HS256) with
one of the device's two symmetric keys, for devices that hold no key pair.

The algorithm never chooses the key type: ES256 is checked only against public keys and
HS256 only against symmetric keys, so a public key can never serve as an HMAC secret
(RFC 8725 §2.1, §3.1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.clock import Clock
from fleetward.config import TokensConfig
from fleetward.crypto.jose import ALGORITHM, decode_segment
from fleetward.model import DEVICE_ID_PATTERN
from fleetward.tokens.access import TokenRefused
from fleetward.tokens.replay import ReplayCache

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PRIVATE_KEY_JWT = "private_key_jwt"
CLIENT_SECRET_JWT = "client_secret_jwt"
HMAC_ALGORITHM = "HS256"
MAX_ASSERTION_CHARS = 8192
MAX_CANDIDATE_KEYS = 16  # keys tried per assertion; a device has a handful


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    """What may sign a device's client assertions."""

    public_keys: Sequence[ec.EllipticCurvePublicKey] = field(default_factory=tuple)
    symmetric_keys: Sequence[bytes] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class AuthenticatedClient:
    device_id: str
    method: str  # private_key_jwt | client_secret_jwt


class AssertionVerifier:
    """Args:
        audiences: what ``aud`` may be: the token endpoint URL and the issuer
            (RFC 7523 §3 point 3 allows either).
    """

    def __init__(self, replay: ReplayCache, config: TokensConfig, clock: Clock,
                 audiences: frozenset[str]) -> None:
        self._replay = replay
        self._config = config
        self._clock = clock
        self._audiences = audiences

    def verify(self, assertion: str, client_id: str | None,
               keys_for: Callable[[str], DeviceKeys],
               may_spend: Callable[[str], bool] | None = None) -> AuthenticatedClient:
        """The device the assertion authenticates.

        Args:
            may_spend: whether the device may get tokens at all; only then is the
                assertion's jti recorded (a refused device cannot fill the replay
                cache; the caller refuses it with the reason).

        Raises:
            TokenRefused: the assertion does not authenticate anyone (``invalid_client``).
        """
        if len(assertion) > MAX_ASSERTION_CHARS or assertion.count(".") != 2:
            raise TokenRefused("client_assertion is not a compact JWS of three parts")
        try:
            header = decode_segment(assertion.split(".", 1)[0])
            unverified = decode_segment(assertion.split(".")[1])
        except (ValueError, UnicodeDecodeError):
            raise TokenRefused("client_assertion is not a JWT") from None
        alg = header.get("alg")
        if alg not in (ALGORITHM, HMAC_ALGORITHM):
            raise TokenRefused(f"client assertions are signed with {ALGORITHM} (a device "
                               f"key) or {HMAC_ALGORITHM} (a device's symmetric key)")
        if "crit" in header:
            raise TokenRefused("critical header parameters are not understood")
        subject = unverified.get("sub")
        if not isinstance(subject, str) or not DEVICE_ID_PATTERN.fullmatch(subject):
            raise TokenRefused("the assertion's sub must be the device id")
        if unverified.get("iss") != subject:
            raise TokenRefused("the assertion's iss and sub must both be the device id "
                               "(RFC 7523 §3)")
        if client_id is not None and client_id != subject:
            raise TokenRefused("client_id and the assertion's sub differ")
        keys = keys_for(subject)
        candidates: Sequence[object] = (keys.public_keys if alg == ALGORITHM
                                        else keys.symmetric_keys)
        if not candidates:
            raise TokenRefused(
                f"device {subject} has no {'registered public key or valid certificate' if alg == ALGORITHM else 'symmetric key'} "  # noqa: E501
                f"to check an {alg} assertion against")
        claims = None
        for key in list(candidates)[:MAX_CANDIDATE_KEYS]:
            try:
                claims = jwt.decode(
                    assertion, key, algorithms=[alg],  # type: ignore[arg-type]
                    options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                             "verify_aud": False,
                             "require": ["iss", "sub", "aud", "exp", "jti"]})
                break
            except jwt.MissingRequiredClaimError as exc:
                raise TokenRefused(f"the assertion lacks the {exc.claim!r} claim") from None
            except jwt.PyJWTError:
                continue
        if claims is None:
            raise TokenRefused("the assertion's signature does not verify with any key "
                               "registered for the device")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if not any(isinstance(a, str) and a.rstrip("/") in self._audiences for a in audiences):
            raise TokenRefused("the assertion's aud must be the token endpoint URL")
        now = self._clock.now().timestamp()
        skew = self._config.clock_skew_seconds
        exp, jti = claims.get("exp"), claims.get("jti")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise TokenRefused("the assertion's exp must be a number")
        if exp <= now - skew:
            raise TokenRefused("the assertion has expired")
        if exp > now + self._config.max_assertion_lifetime_seconds + skew:
            raise TokenRefused(f"the assertion's exp is more than "
                               f"{self._config.max_assertion_lifetime_seconds} s away; "
                               "make short-lived assertions")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is not None and (not isinstance(value, int | float)
                                      or value > now + skew):
                raise TokenRefused(f"the assertion's {name} is in the future")
        if not isinstance(jti, str) or not 1 <= len(jti) <= 128:
            raise TokenRefused("the assertion's jti must be 1-128 characters")
        # A device that may not act gets no token whatever the assertion says (the
        # caller refuses it with the reason), so its jti need not, and must not, take
        # room in the replay cache.
        if (may_spend is None or may_spend(subject)) and not self._replay.use(
                f"assertion:{subject}:{jti}", float(exp) + skew, now, owner=subject):
            raise TokenRefused("the assertion was used before (its jti is single-use)")
        method = PRIVATE_KEY_JWT if alg == ALGORITHM else CLIENT_SECRET_JWT
        return AuthenticatedClient(subject, method)
