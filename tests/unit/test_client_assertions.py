"""Client assertions at the token endpoint (RFC 7523 §2.2, §3) as an attacker would send
them: made with PyJWT and hmac from the device's (or someone else's) keys, each refusal
next to the same assertion without its defect being accepted. The algorithm must never
choose the key type (RFC 8725 §2.1): a public key is not an HMAC secret."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.clock import FrozenClock
from fleetward.config import TokensConfig
from fleetward.tokens.access import TokenRefused
from fleetward.tokens.assertion import (
    CLIENT_SECRET_JWT,
    PRIVATE_KEY_JWT,
    AssertionVerifier,
    AuthenticatedClient,
    DeviceKeys,
)
from fleetward.tokens.replay import ReplayCache

CONFIG = TokensConfig()
SKEW = CONFIG.clock_skew_seconds
MAX_ASSERTION = CONFIG.max_assertion_lifetime_seconds
ISSUER = "https://iot.example.com:8443"
TOKEN_URL = f"{ISSUER}/oauth2/token"
DROP = object()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def pem_of(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class Registry:
    """What the server knows of each device's keys (the credential service's answer)."""

    clock: FrozenClock
    device_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    symmetric_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    keys: dict[str, DeviceKeys] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keys = {
            # a device with a key pair, one with a symmetric key, and one with both
            "pk-dev": DeviceKeys(public_keys=(self.device_key.public_key(),)),
            "sk-dev": DeviceKeys(symmetric_keys=(self.symmetric_key,)),
            "both-dev": DeviceKeys(public_keys=(self.device_key.public_key(),),
                                   symmetric_keys=(self.symmetric_key,)),
        }

    def keys_for(self, device_id: str) -> DeviceKeys:
        return self.keys.get(device_id, DeviceKeys())

    @property
    def now(self) -> int:
        return int(self.clock.now().timestamp())

    def claims(self, device_id: str, **overrides: Any) -> dict[str, Any]:
        claims: dict[str, Any] = {"iss": device_id, "sub": device_id, "aud": TOKEN_URL,
                                  "iat": self.now, "exp": self.now + 120,
                                  "jti": secrets.token_urlsafe(16)}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not DROP}

    def es256(self, device_id: str = "pk-dev", *, key: ec.EllipticCurvePrivateKey | None = None,
              header: dict[str, Any] | None = None, **overrides: Any) -> str:
        """private_key_jwt: signed by the device's key (or ``key``)."""
        return jwt.encode(self.claims(device_id, **overrides), key or self.device_key,
                          algorithm="ES256", headers=header)

    def hs256(self, device_id: str = "sk-dev", *, secret: bytes | None = None,
              **overrides: Any) -> str:
        """client_secret_jwt: HMAC by hand (PyJWT refuses PEM-looking secrets)."""
        header = {"alg": "HS256", "typ": "JWT"}
        signing_input = f"{segment(header)}.{segment(self.claims(device_id, **overrides))}"
        mac = hmac.new(secret or self.symmetric_key, signing_input.encode(),
                       hashlib.sha256).digest()
        return f"{signing_input}.{b64url(mac)}"


@pytest.fixture
def registry(clock: FrozenClock) -> Registry:
    return Registry(clock)


@pytest.fixture
def verifier(clock: FrozenClock) -> AssertionVerifier:
    return AssertionVerifier(ReplayCache(1000), CONFIG, clock, frozenset({ISSUER, TOKEN_URL}))


def verify(verifier: AssertionVerifier, registry: Registry, assertion: str,
           client_id: str | None = None) -> AuthenticatedClient:
    return verifier.verify(assertion, client_id, registry.keys_for)


def test_private_key_jwt_with_a_registered_key_is_accepted(verifier: AssertionVerifier,
                                                          registry: Registry) -> None:
    client = verify(verifier, registry, registry.es256(), client_id="pk-dev")
    assert client == AuthenticatedClient("pk-dev", PRIVATE_KEY_JWT)


def test_client_secret_jwt_with_a_symmetric_key_is_accepted(verifier: AssertionVerifier,
                                                            registry: Registry) -> None:
    client = verify(verifier, registry, registry.hs256(), client_id="sk-dev")
    assert client == AuthenticatedClient("sk-dev", CLIENT_SECRET_JWT)
    # And with PyJWT as the device's library would make it.
    made_by_pyjwt = jwt.encode(registry.claims("sk-dev"), registry.symmetric_key,
                               algorithm="HS256")
    assert verify(verifier, registry, made_by_pyjwt).method == CLIENT_SECRET_JWT


@pytest.mark.parametrize("aud", [ISSUER, TOKEN_URL, TOKEN_URL + "/", ["x", TOKEN_URL]])
def test_audience_may_be_the_token_endpoint_or_the_issuer(verifier: AssertionVerifier,
                                                          registry: Registry,
                                                          aud: Any) -> None:
    """RFC 7523 §3 point 3 allows either; a list containing one of them is ours."""
    verify(verifier, registry, registry.es256(aud=aud))


def other_key(r: Registry) -> str:
    return r.es256(key=ec.generate_private_key(ec.SECP256R1()))


def hs256_with_public_key_pem(r: Registry) -> str:
    """Key confusion: the registered public key (not secret: it is in the device's
    certificate) used as the HMAC secret, for a device that has only public keys."""
    return r.hs256("pk-dev", secret=pem_of(r.device_key.public_key()))


def hs256_with_public_key_pem_beside_a_symmetric_key(r: Registry) -> str:
    """The same, for a device that has both kinds: the verifier must try HS256 only
    against the symmetric key, never against the public key's bytes."""
    return r.hs256("both-dev", secret=pem_of(r.device_key.public_key()))


def hs256_with_public_key_der(r: Registry) -> str:
    der = r.device_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return r.hs256("both-dev", secret=der)


def alg_none(r: Registry) -> str:
    return f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(r.claims('pk-dev'))}."


def es384(r: Registry) -> str:
    return jwt.encode(r.claims("pk-dev"), ec.generate_private_key(ec.SECP384R1()),
                      algorithm="ES384")


def tampered(r: Registry) -> str:
    """A genuine signature moved onto another device's claims (same registered key)."""
    header, _, signature = r.es256().split(".")
    return f"{header}.{segment(r.claims('both-dev'))}.{signature}"


# (name, the assertion, the client_id sent beside it, what the refusal must say)
REFUSED: list[tuple[str, Callable[[Registry], str], str | None, str]] = [
    ("aud_not_ours", lambda r: r.es256(aud="https://other.example.com/oauth2/token"), None,
     "aud"),
    ("aud_missing", lambda r: r.es256(aud=DROP), None, "aud"),
    ("exp_too_far", lambda r: r.es256(exp=r.now + MAX_ASSERTION + SKEW + 1), None,
     "more than"),
    ("expired", lambda r: r.es256(exp=r.now - SKEW), None, "expired"),
    ("exp_missing", lambda r: r.es256(exp=DROP), None, "exp"),
    ("nbf_in_the_future", lambda r: r.es256(nbf=r.now + SKEW + 1), None, "future"),
    ("iat_in_the_future", lambda r: r.es256(iat=r.now + SKEW + 1), None, "future"),
    ("jti_missing", lambda r: r.es256(jti=DROP), None, "jti"),
    ("iss_not_sub", lambda r: r.es256(iss="sk-dev"), None, "iss and sub"),
    ("sub_not_a_device_id", lambda r: r.es256(sub="../x", iss="../x"), None, "device id"),
    ("client_id_not_sub", lambda r: r.es256(), "sk-dev", "client_id"),
    ("signed_by_an_unregistered_key", other_key, None, "does not verify"),
    ("unknown_device", lambda r: r.es256("nobody"), None, "no registered public key"),
    ("tampered_payload", tampered, None, "does not verify"),
    ("hs256_where_only_public_keys_exist", lambda r: r.hs256("pk-dev"), None,
     "no symmetric key"),
    ("hs256_with_a_registered_public_key_pem_as_secret", hs256_with_public_key_pem, None,
     "no symmetric key"),
    ("hs256_with_the_public_key_pem_beside_a_symmetric_key",
     hs256_with_public_key_pem_beside_a_symmetric_key, None, "does not verify"),
    ("hs256_with_the_public_key_der_beside_a_symmetric_key", hs256_with_public_key_der, None,
     "does not verify"),
    ("es256_where_only_symmetric_keys_exist", lambda r: r.es256("sk-dev"), None,
     "no registered public key"),
    ("alg_none", alg_none, None, "signed with ES256"),
    ("alg_es384", es384, None, "signed with ES256"),
    ("crit_header", lambda r: r.es256(header={"crit": ["x"], "x": 1}), None, "critical"),
    ("not_a_jwt", lambda r: "not.a.jwt", None, "not a JWT"),
    ("two_parts", lambda r: "e30.e30", None, "three parts"),
]


@pytest.mark.parametrize(("make", "client_id", "reason"),
                         [(m, c, r) for _, m, c, r in REFUSED],
                         ids=[name for name, _, _, _ in REFUSED])
def test_defective_assertion_is_refused(verifier: AssertionVerifier, registry: Registry,
                                        make: Callable[[Registry], str],
                                        client_id: str | None, reason: str) -> None:
    # Negative controls: both methods work for the same registry and verifier.
    verify(verifier, registry, registry.es256())
    verify(verifier, registry, registry.hs256("both-dev"))
    with pytest.raises(TokenRefused, match=reason):
        verify(verifier, registry, make(registry), client_id=client_id)


def test_replayed_assertion_is_refused(verifier: AssertionVerifier,
                                       registry: Registry) -> None:
    """RFC 7523 §3 point 7: a jti is used once, for as long as the assertion could be
    accepted; another device's identical jti is not a replay."""
    assertion = registry.es256(jti="once")
    verify(verifier, registry, assertion)
    with pytest.raises(TokenRefused, match="used before"):
        verify(verifier, registry, assertion)
    with pytest.raises(TokenRefused, match="used before"):  # a new assertion, same jti
        verify(verifier, registry, registry.es256(jti="once"))
    verify(verifier, registry, registry.hs256("sk-dev", jti="once"))  # other device


def test_jti_is_remembered_until_the_assertion_expires(verifier: AssertionVerifier,
                                                       registry: Registry,
                                                       clock: FrozenClock) -> None:
    assertion = registry.es256(exp=registry.now + 120)
    verify(verifier, registry, assertion)
    clock.advance(dt.timedelta(seconds=120 + SKEW - 1))
    with pytest.raises(TokenRefused, match="used before"):
        verify(verifier, registry, assertion)
    clock.advance(dt.timedelta(seconds=1))
    with pytest.raises(TokenRefused, match="expired"):
        verify(verifier, registry, assertion)


@pytest.mark.parametrize("make", [
    pytest.param(lambda r: r.es256(exp=r.now + MAX_ASSERTION + SKEW), id="latest_exp"),
    pytest.param(lambda r: r.es256(exp=r.now - SKEW + 1), id="expired_within_skew"),
    pytest.param(lambda r: r.es256(iat=r.now + SKEW, nbf=r.now + SKEW),
                 id="future_within_skew"),
    pytest.param(lambda r: r.es256(iat=DROP), id="no_iat"),
    pytest.param(lambda r: r.es256("both-dev"), id="es256_for_a_device_with_both"),
])
def test_limits_of_the_refusals_are_accepted(verifier: AssertionVerifier,
                                             registry: Registry,
                                             make: Callable[[Registry], str]) -> None:
    verify(verifier, registry, make(registry))


def test_any_of_several_registered_keys_verifies(verifier: AssertionVerifier,
                                                 registry: Registry) -> None:
    """Key rollover: the old and the new key are both registered."""
    new_key = ec.generate_private_key(ec.SECP256R1())
    registry.keys["pk-dev"] = DeviceKeys(public_keys=(registry.device_key.public_key(),
                                                      new_key.public_key()))
    verify(verifier, registry, registry.es256(key=new_key))
    verify(verifier, registry, registry.es256())
