"""DPoP proofs (RFC 9449 §4.3) and MQTT CONNECT proofs as an attacker would send them:
made with PyJWT, ``cryptography`` and hmac from fresh keys, each refusal next to the
same proof without its defect being accepted; and the single-use cache behind them."""

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
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.algorithms import ECAlgorithm

from fleetward.clock import FrozenClock
from fleetward.config import TokensConfig
from fleetward.tokens.access import TokenRefused
from fleetward.tokens.dpop import ProofVerifier, TargetUri
from fleetward.tokens.replay import ReplayCache

CONFIG = TokensConfig()
MAX_AGE = CONFIG.proof_max_age_seconds
SKEW = CONFIG.clock_skew_seconds
SERVER_NAMES = frozenset({"iot.example.com", "iot-alt.example.com"})
TOKEN_URL = "https://iot.example.com:8443/oauth2/token"
RESOURCE_URL = "https://iot.example.com:8443/v1/telemetry"
ACCESS_TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJkMSJ9.c2lnbmF0dXJl"  # opaque to proofs
MQTT_ANY_HOST = TargetUri("mqtts", "*", 8883, "/")
DROP = object()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def ath(token: str) -> str:
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return jwk


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 §3, computed here, independently of fleetward.crypto.jose."""
    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    return b64url(hashlib.sha256(json.dumps(members, separators=(",", ":"),
                                            sort_keys=True).encode()).digest())


@dataclass
class Device:
    """A device holding a fresh P-256 key, making proofs with PyJWT."""

    clock: FrozenClock
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    @property
    def now(self) -> int:
        return int(self.clock.now().timestamp())

    def claims(self, **overrides: Any) -> dict[str, Any]:
        claims: dict[str, Any] = {"jti": secrets.token_urlsafe(16), "htm": "POST",
                                  "htu": RESOURCE_URL, "iat": self.now,
                                  "ath": ath(ACCESS_TOKEN)}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not DROP}

    def proof(self, *, key: ec.EllipticCurvePrivateKey | None = None,
              header: dict[str, Any] | None = None, **overrides: Any) -> str:
        headers: dict[str, Any] = {"typ": "dpop+jwt", "jwk": public_jwk(self.key)}
        headers.update(header or {})
        return jwt.encode(self.claims(**overrides), key or self.key, algorithm="ES256",
                          headers={k: v for k, v in headers.items() if v is not DROP})


@pytest.fixture
def replay() -> ReplayCache:
    return ReplayCache(1000)


@pytest.fixture
def verifier(replay: ReplayCache, clock: FrozenClock) -> ProofVerifier:
    return ProofVerifier(replay, CONFIG, clock, SERVER_NAMES)


@pytest.fixture
def device(clock: FrozenClock) -> Device:
    return Device(clock)


def at_resource(verifier: ProofVerifier, proof: str, *, token: str | None = ACCESS_TOKEN,
                nonce: bytes | None = None) -> Any:
    return verifier.verify(proof, method="POST", target=TargetUri.parse(RESOURCE_URL),
                           access_token=token, nonce=nonce)


def test_valid_proof_is_accepted_and_names_its_key(verifier: ProofVerifier,
                                                   device: Device) -> None:
    proof = device.proof()
    accepted = at_resource(verifier, proof)
    assert accepted.jkt == thumbprint(public_jwk(device.key))
    assert accepted.issued_at == device.now
    assert accepted.public_key.public_numbers() == device.key.public_key().public_numbers()


def test_replayed_proof_is_refused(verifier: ProofVerifier, device: Device) -> None:
    """RFC 9449 §11.1: a captured proof must not be usable a second time."""
    proof = device.proof()
    at_resource(verifier, proof)
    with pytest.raises(TokenRefused, match="replay"):
        at_resource(verifier, proof)
    # The same jti from the same key, in a new proof, is a replay too.
    jti = jwt.decode(proof, options={"verify_signature": False})["jti"]
    with pytest.raises(TokenRefused, match="replay"):
        at_resource(verifier, device.proof(jti=jti, htu=RESOURCE_URL))
    at_resource(verifier, device.proof())  # control: a fresh proof


def test_replay_window_outlives_the_acceptance_window(verifier: ProofVerifier,
                                                      device: Device,
                                                      clock: FrozenClock) -> None:
    """The jti is forgotten only once the proof's iat is out of the window anyway."""
    proof = device.proof()
    at_resource(verifier, proof)
    clock.advance(dt.timedelta(seconds=MAX_AGE + SKEW))
    with pytest.raises(TokenRefused, match="replay"):  # still inside its window
        at_resource(verifier, proof)
    clock.advance(dt.timedelta(seconds=1))
    with pytest.raises(TokenRefused, match="outside"):  # now refused for its age
        at_resource(verifier, proof)


def other_curve_proof(device: Device) -> str:
    """A P-384 jwk under alg ES256, signed by hand (PyJWT will not mix them)."""
    key = ec.generate_private_key(ec.SECP384R1())
    header = {"typ": "dpop+jwt", "alg": "ES256",
              "jwk": ECAlgorithm.to_jwk(key.public_key(), as_dict=True)}
    signing_input = f"{segment(header)}.{segment(device.claims())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64url(r.to_bytes(48, 'big') + s.to_bytes(48, 'big'))}"


def hs256_proof(device: Device) -> str:
    """HS256 keyed with the jwk's JSON: the jwk is in the header, so anyone could."""
    jwk = public_jwk(device.key)
    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk}
    signing_input = f"{segment(header)}.{segment(device.claims())}"
    mac = hmac.new(json.dumps(jwk).encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def none_proof(device: Device) -> str:
    header = {"typ": "dpop+jwt", "alg": "none", "jwk": public_jwk(device.key)}
    return f"{segment(header)}.{segment(device.claims())}."


def private_jwk_proof(device: Device) -> str:
    """RFC 9449 §4.3 point 7: a jwk with ``d`` leaks the key; refuse, never use it."""
    return device.proof(header={"jwk": ECAlgorithm.to_jwk(device.key, as_dict=True)})


def signed_by_another_key(device: Device) -> str:
    """The header names the victim's public key, the attacker signs with their own."""
    return device.proof(key=ec.generate_private_key(ec.SECP256R1()))


def tampered_claims(device: Device) -> str:
    header, _, signature = device.proof(htu="https://iot.example.com:8443/v1/events"
                                        ).split(".")
    return f"{header}.{segment(device.claims())}.{signature}"


# (name, how to make the proof from a device, what the refusal must say)
REFUSED: list[tuple[str, Callable[[Device], str], str]] = [
    ("other_htm", lambda d: d.proof(htm="GET"), "not POST"),
    ("htm_lower_case", lambda d: d.proof(htm="post"), "not POST"),
    ("other_htu_path", lambda d: d.proof(htu="https://iot.example.com:8443/v1/events"),
     "htu"),
    ("htu_path_case", lambda d: d.proof(htu="https://iot.example.com:8443/V1/telemetry"),
     "htu"),
    ("other_htu_host", lambda d: d.proof(htu="https://iot-alt.example.com:8443/v1/telemetry"),
     "htu"),
    ("other_htu_port", lambda d: d.proof(htu="https://iot.example.com:443/v1/telemetry"),
     "htu"),
    ("other_htu_scheme", lambda d: d.proof(htu="http://iot.example.com:8443/v1/telemetry"),
     "htu"),
    ("htu_not_absolute", lambda d: d.proof(htu="/v1/telemetry"), "htu"),
    ("htu_not_a_string", lambda d: d.proof(htu=["https://iot.example.com:8443/v1/telemetry"]),
     "htu"),
    ("iat_too_old", lambda d: d.proof(iat=d.now - MAX_AGE - SKEW - 1), "outside"),
    ("iat_in_the_future", lambda d: d.proof(iat=d.now + SKEW + 1), "outside"),
    ("iat_not_whole_seconds", lambda d: d.proof(iat=d.now + 0.5), "whole seconds"),
    ("missing_iat", lambda d: d.proof(iat=DROP), "iat"),
    ("missing_jti", lambda d: d.proof(jti=DROP), "jti"),
    ("jti_too_long", lambda d: d.proof(jti="j" * 129), "jti"),
    ("missing_ath", lambda d: d.proof(ath=DROP), "ath"),
    ("ath_of_another_token", lambda d: d.proof(ath=ath(ACCESS_TOKEN + "x")), "ath"),
    ("wrong_typ", lambda d: d.proof(header={"typ": "JWT"}), "typ"),
    ("missing_typ", lambda d: d.proof(header={"typ": DROP}), "typ"),
    ("alg_hs256", hs256_proof, "ES256 only"),
    ("alg_none", none_proof, "ES256 only"),
    ("missing_jwk", lambda d: d.proof(header={"jwk": DROP}), "jwk"),
    ("jwk_with_private_d", private_jwk_proof, "private key"),
    ("jwk_of_another_curve", other_curve_proof, "P-256"),
    ("signed_by_another_key_than_the_jwk", signed_by_another_key, "signature"),
    ("tampered_claims", tampered_claims, "signature"),
]


@pytest.mark.parametrize(("make", "reason"), [(m, r) for _, m, r in REFUSED],
                         ids=[name for name, _, _ in REFUSED])
def test_defective_proof_is_refused(verifier: ProofVerifier, device: Device,
                                    make: Callable[[Device], str], reason: str) -> None:
    at_resource(verifier, device.proof())  # control: the same device, no defect
    with pytest.raises(TokenRefused, match=reason):
        at_resource(verifier, make(device))


@pytest.mark.parametrize("make", [
    pytest.param(lambda d: d.proof(iat=d.now - MAX_AGE - SKEW), id="oldest_iat"),
    pytest.param(lambda d: d.proof(iat=d.now + SKEW), id="newest_iat"),
    pytest.param(lambda d: d.proof(htu="HTTPS://IOT.Example.COM:8443/v1/telemetry"),
                 id="htu_scheme_and_host_case"),
    pytest.param(lambda d: d.proof(htu=RESOURCE_URL + "?q=1#f"), id="htu_query_ignored"),
])
def test_limits_of_the_refusals_are_accepted(verifier: ProofVerifier, device: Device,
                                             make: Callable[[Device], str]) -> None:
    at_resource(verifier, make(device))


def test_host_that_is_not_ours_is_refused(verifier: ProofVerifier, device: Device) -> None:
    """On HTTPS the target comes from the Host header, which the client chooses: a proof
    made for another server, sent to us with that Host, is not for us."""
    target = TargetUri.parse("https://evil.example.com:8443/v1/telemetry")
    proof = device.proof(htu=str(target))
    with pytest.raises(TokenRefused, match="not a name of this server"):
        verifier.verify(proof, method="POST", target=target, access_token=ACCESS_TOKEN)
    alt = TargetUri.parse("https://iot-alt.example.com:8443/v1/telemetry")
    verifier.verify(device.proof(htu=str(alt)), method="POST", target=alt,
                    access_token=ACCESS_TOKEN)  # control: another of our names


def test_token_endpoint_proof_carries_no_ath(verifier: ProofVerifier, device: Device) -> None:
    """At the token endpoint there is no token yet (RFC 9449 §4.3): an ath there means
    the proof was made for a resource request and is being replayed here."""
    endpoint = TargetUri.parse(TOKEN_URL)
    with pytest.raises(TokenRefused, match="no ath"):
        verifier.verify(device.proof(htu=TOKEN_URL), method="POST", target=endpoint,
                        access_token=None)
    verifier.verify(device.proof(htu=TOKEN_URL, ath=DROP), method="POST", target=endpoint,
                    access_token=None)


def test_nonce_is_required_when_the_server_sent_a_challenge(verifier: ProofVerifier,
                                                            device: Device) -> None:
    challenge = secrets.token_bytes(32)
    with pytest.raises(TokenRefused, match="nonce"):
        at_resource(verifier, device.proof(), nonce=challenge)
    with pytest.raises(TokenRefused, match="nonce"):
        at_resource(verifier, device.proof(nonce=b64url(secrets.token_bytes(32))),
                    nonce=challenge)
    with pytest.raises(TokenRefused, match="nonce"):  # padded base64 is not base64url
        at_resource(verifier, device.proof(
            nonce=base64.urlsafe_b64encode(challenge).decode()), nonce=challenge)
    at_resource(verifier, device.proof(nonce=b64url(challenge)), nonce=challenge)


def mqtt_proof(device: Device, htu: str) -> str:
    return device.proof(htm="CONNECT", htu=htu)


def test_mqtt_any_host_target_accepts_each_of_our_names(verifier: ProofVerifier,
                                                        device: Device) -> None:
    """MQTT has no Host header: the listener cannot know which of its names the device
    used, so any of them matches — and only those."""
    for name in sorted(SERVER_NAMES):
        verifier.verify(mqtt_proof(device, f"mqtts://{name}:8883"), method="CONNECT",
                        target=MQTT_ANY_HOST, access_token=ACCESS_TOKEN)
    verifier.verify(mqtt_proof(device, "MQTTS://IOT.EXAMPLE.COM"), method="CONNECT",
                    target=MQTT_ANY_HOST, access_token=ACCESS_TOKEN)  # default port 8883


@pytest.mark.parametrize(("htu", "reason"), [
    ("mqtts://evil.example.com:8883", "not a name of this server"),
    ("mqtts://iot.example.com:1883", "htu"),
    ("https://iot.example.com:8883", "htu"),
    ("mqtts://iot.example.com:8883/devices", "htu"),
])
def test_mqtt_any_host_target_refuses_anything_else(verifier: ProofVerifier, device: Device,
                                                    htu: str, reason: str) -> None:
    verifier.verify(mqtt_proof(device, "mqtts://iot.example.com:8883"), method="CONNECT",
                    target=MQTT_ANY_HOST, access_token=ACCESS_TOKEN)  # control
    with pytest.raises(TokenRefused, match=reason):
        verifier.verify(mqtt_proof(device, htu), method="CONNECT", target=MQTT_ANY_HOST,
                        access_token=ACCESS_TOKEN)


def test_https_proof_is_not_a_connect_proof(verifier: ProofVerifier, device: Device) -> None:
    with pytest.raises(TokenRefused, match="not CONNECT"):
        verifier.verify(device.proof(htu="mqtts://iot.example.com:8883"), method="CONNECT",
                        target=MQTT_ANY_HOST, access_token=ACCESS_TOKEN)


def test_full_replay_cache_refuses_valid_proofs(clock: FrozenClock, device: Device) -> None:
    """Fail closed: when the cache cannot remember another jti, a new proof is refused
    rather than an old jti forgotten early (which would re-open it to replay)."""
    verifier = ProofVerifier(ReplayCache(2), CONFIG, clock, SERVER_NAMES)
    at_resource(verifier, device.proof())
    at_resource(verifier, device.proof())
    with pytest.raises(TokenRefused, match="overloaded"):
        at_resource(verifier, device.proof())
    clock.advance(dt.timedelta(seconds=MAX_AGE + 2 * SKEW))
    at_resource(verifier, device.proof())  # the old entries aged out


@pytest.mark.parametrize(("uri", "expected"), [
    ("HTTPS://IoT.Example.COM/oauth2/token",
     TargetUri("https", "iot.example.com", 443, "/oauth2/token")),
    ("https://iot.example.com:443/oauth2/token",
     TargetUri("https", "iot.example.com", 443, "/oauth2/token")),
    ("https://iot.example.com", TargetUri("https", "iot.example.com", 443, "/")),
    ("https://iot.example.com:8443", TargetUri("https", "iot.example.com", 8443, "/")),
    ("mqtts://iot.example.com", TargetUri("mqtts", "iot.example.com", 8883, "/")),
    ("http://iot.example.com/x", TargetUri("http", "iot.example.com", 80, "/x")),
    ("https://iot.example.com/a?b=c#d", TargetUri("https", "iot.example.com", 443, "/a")),
    ("https://[2001:DB8::1]:8443/t", TargetUri("https", "2001:db8::1", 8443, "/t")),
    ("https://iot.example.com/Path/Case", TargetUri("https", "iot.example.com", 443,
                                                     "/Path/Case")),
])
def test_target_uri_normalisation(uri: str, expected: TargetUri) -> None:
    """RFC 3986 §6.2.2-6.2.3: scheme and host case, the default port and an empty path
    do not make two URIs differ; the path's case does."""
    assert TargetUri.parse(uri) == expected


def test_target_uri_text_form() -> None:
    assert str(TargetUri.parse("https://IoT.example.com/t")) == "https://iot.example.com:443/t"
    assert str(TargetUri.parse("https://[::1]/")) == "https://[::1]:443/"


@pytest.mark.parametrize("uri", ["/oauth2/token", "iot.example.com/x", "https://",
                                 "https://iot.example.com:99999/", "https://h:port/"])
def test_target_uri_refuses_what_is_not_an_absolute_uri(uri: str) -> None:
    with pytest.raises(ValueError):
        TargetUri.parse(uri)


# --- the replay cache -----------------------------------------------------------------


def test_replay_cache_accepts_a_key_once() -> None:
    cache = ReplayCache(10)
    assert cache.use("a", keep_until=100.0, now=0.0)
    assert not cache.use("a", keep_until=100.0, now=50.0)
    assert cache.use("b", keep_until=100.0, now=50.0)  # control: another key


def test_full_replay_cache_refuses_new_entries_until_entries_expire() -> None:
    cache = ReplayCache(2)
    assert cache.use("a", keep_until=100.0, now=0.0)
    assert cache.use("b", keep_until=200.0, now=0.0)
    assert not cache.use("c", keep_until=300.0, now=99.0)  # full of live entries
    assert len(cache) == 2
    assert cache.use("c", keep_until=300.0, now=100.0)  # "a" expired, room again
    assert not cache.use("d", keep_until=300.0, now=150.0)
    assert not cache.use("b", keep_until=300.0, now=150.0)  # and "b" is still a replay


def test_replay_cache_forgets_expired_entries() -> None:
    cache = ReplayCache(10)
    for i in range(5):
        assert cache.use(f"k{i}", keep_until=10.0 + i, now=0.0)
    assert len(cache) == 5
    assert cache.use("late", keep_until=100.0, now=12.0)  # k0, k1, k2 expired at <= 12
    assert len(cache) == 3
    assert cache.use("k0", keep_until=50.0, now=12.0)  # forgotten: its window is over
    assert not cache.use("k3", keep_until=50.0, now=12.0)  # k3 lives until 13


def test_one_holder_cannot_take_the_whole_replay_cache() -> None:
    """A device making proofs in a loop fills its own share, not everyone's room."""
    cache = ReplayCache(100, max_per_owner=10)
    now = 1_000.0
    assert all(cache.use(f"greedy-{n}", now + 60, now, owner="greedy") for n in range(10))
    assert not cache.use("greedy-10", now + 60, now, owner="greedy")
    assert cache.use("honest-0", now + 60, now, owner="honest")  # control: others still fit
    assert cache.use("greedy-11", now + 120, now + 61, owner="greedy")  # its entries aged out
