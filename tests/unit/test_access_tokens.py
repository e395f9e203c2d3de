"""Access tokens as an attacker would present them: forged with PyJWT, ``cryptography``
and hmac by hand (never with our own issuer), each named after the defect it carries,
each next to a control that the same tool, without the defect, is accepted
(docs/credentials.md "Access tokens"; RFC 9068, RFC 8725)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from fleetward.audit import AuditLog
from fleetward.clock import FrozenClock
from fleetward.config import TokensConfig
from fleetward.crypto.signer import FileSigner, Signer
from fleetward.store import Database
from fleetward.tokens.access import (
    AccessTokenIssuer,
    AccessTokenVerifier,
    TokenRefused,
)
from fleetward.tokens.keys import SigningKeys

ISSUER = "https://iot.example.com:8443"
PASSPHRASE = b"test-passphrase"
CONFIG = TokensConfig()
SKEW = CONFIG.clock_skew_seconds
MAX_LIFETIME = CONFIG.max_access_token_lifetime_seconds
UNBOUND_LIFETIME = CONFIG.unbound_token_lifetime_seconds
CERT_THUMBPRINT = base64.urlsafe_b64encode(hashlib.sha256(b"a device certificate").digest()
                                           ).rstrip(b"=").decode()
DROP = object()  # a claim or header parameter to leave out


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 §3 computed here, independently of fleetward.crypto.jose."""
    jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return b64url(hashlib.sha256(canonical).digest())


def open_signer_in(tmp_path: Path) -> tuple[Callable[[Any], Signer], Callable[[str], Signer]]:
    """The two callables SigningKeys takes, over encrypted key files in ``tmp_path``."""
    def open_signer(key_ref: Any) -> Signer:
        return FileSigner.load(Path(key_ref["path"]), PASSPHRASE)

    def new_signer(label: str) -> Signer:
        return FileSigner.create(tmp_path / f"token-{label}.key", PASSPHRASE)

    return open_signer, new_signer


def make_keys(db: Database, clock: FrozenClock, tmp_path: Path) -> SigningKeys:
    open_signer, new_signer = open_signer_in(tmp_path)
    keys = SigningKeys(db, AuditLog(secrets.token_bytes(32), clock), clock, CONFIG,
                       open_signer=open_signer, new_signer=new_signer)
    keys.load()
    return keys


@dataclass
class Tokens:
    """Our signing keys, issuer and verifier over a real SQLite database."""

    keys: SigningKeys
    issuer: AccessTokenIssuer
    verifier: AccessTokenVerifier
    clock: FrozenClock

    @property
    def now(self) -> int:
        return int(self.clock.now().timestamp())

    def our_private_key(self) -> ec.EllipticCurvePrivateKey:
        signer = self.keys.signing_key().signer
        assert signer is not None
        key = signer.private_key
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """A valid certificate-bound token's claims; ``DROP`` leaves one out."""
        now = self.now
        claims: dict[str, Any] = {
            "iss": ISSUER, "sub": "d1", "aud": ISSUER, "iat": now, "nbf": now,
            "exp": now + 900, "jti": secrets.token_urlsafe(16), "client_id": "d1",
            "scope": "telemetry:write", "cnf": {"x5t#S256": CERT_THUMBPRINT},
            "fw_binding": "x5t#S256", "fw_gen": 0}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not DROP}

    def forge(self, key: ec.EllipticCurvePrivateKey | None = None, *,
              header: dict[str, Any] | None = None, **overrides: Any) -> str:
        """Sign claims with PyJWT: with our own key unless ``key`` is given."""
        key = key or self.our_private_key()
        headers: dict[str, Any] = {"typ": "at+jwt", "kid": self.keys.signing_key().kid}
        headers.update(header or {})
        return jwt.encode(self.claims(**overrides), key, algorithm="ES256",
                          headers={k: v for k, v in headers.items() if v is not DROP})


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Database]:
    database = Database(sqlite_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def tokens(db: Database, clock: FrozenClock, tmp_path: Path) -> Tokens:
    keys = make_keys(db, clock, tmp_path)
    return Tokens(keys, AccessTokenIssuer(keys, ISSUER, ISSUER, CONFIG, clock),
                  AccessTokenVerifier(keys, ISSUER, ISSUER, CONFIG, clock), clock)


# --- forgeries --------------------------------------------------------------------------


def alg_none(t: Tokens) -> str:
    """RFC 8725 §2.1: an unsigned token, made by hand."""
    header = {"alg": "none", "typ": "at+jwt", "kid": t.keys.signing_key().kid}
    return f"{segment(header)}.{segment(t.claims())}."


def hs256_keyed_with_our_public_key(t: Tokens) -> str:
    """RFC 8725 §2.1 key confusion: HMAC with the public key's PEM (which anyone can read
    from the JWKS) as the secret, hoping the verifier passes "its key" to HS256. PyJWT
    refuses to sign like this, so it is built by hand."""
    pem = t.keys.signing_key().public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "typ": "at+jwt", "kid": t.keys.signing_key().kid}
    signing_input = f"{segment(header)}.{segment(t.claims())}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def tampered_payload(t: Tokens) -> str:
    """A genuine signature moved onto another payload (a scope escalation)."""
    header, _, signature = t.forge().split(".")
    escalated = segment(t.claims(scope="telemetry:write commands:read ota:download"))
    return f"{header}.{escalated}.{signature}"


def signed_by_a_foreign_key_under_our_kid(t: Tokens) -> str:
    return t.forge(ec.generate_private_key(ec.SECP256R1()))


def unknown_kid(t: Tokens) -> str:
    foreign = ec.generate_private_key(ec.SECP256R1())
    return t.forge(foreign, header={"kid": thumbprint(foreign.public_key())})


def missing_kid(t: Tokens) -> str:
    return t.forge(header={"kid": DROP})


def wrong_audience(t: Tokens) -> str:
    return t.forge(aud="https://other-resource.example.com")


def wrong_issuer(t: Tokens) -> str:
    return t.forge(iss="https://evil.example.com:8443")


def expired(t: Tokens) -> str:
    """exp is strict (no skew): a session ends at exp, so nothing is accepted at it."""
    return t.forge(iat=t.now - 900, nbf=t.now - 900, exp=t.now)


def not_yet_valid_beyond_the_skew(t: Tokens) -> str:
    nbf = t.now + SKEW + 1
    return t.forge(iat=nbf, nbf=nbf, exp=nbf + 900)


def lifetime_above_the_maximum(t: Tokens) -> str:
    """Signed correctly by our own key, but exp - iat exceeds the configured maximum:
    a stolen signing oracle (or a bug in issuance) must not mint week-long tokens."""
    return t.forge(exp=t.now + MAX_LIFETIME + 1)


def wrong_typ(t: Tokens) -> str:
    """An ID token or another JWT of ours must not pass as an access token (RFC 9068 §4)."""
    return t.forge(header={"typ": "JWT"})


def missing_typ(t: Tokens) -> str:
    return t.forge(header={"typ": DROP})


def missing_fw_gen(t: Tokens) -> str:
    """Without the generation, revocation of the device's tokens could not reach it."""
    return t.forge(fw_gen=DROP)


def cnf_inconsistent_with_fw_binding(t: Tokens) -> str:
    """Says key-bound (jkt) but carries a certificate thumbprint: a verifier checking
    the one against a proof and the other against the connection would check nothing."""
    return t.forge(fw_binding="jkt")


def bound_without_cnf(t: Tokens) -> str:
    return t.forge(cnf=DROP)


def unbound_with_cnf(t: Tokens) -> str:
    return t.forge(fw_binding="none")


def unbound_token_living_longer_than_the_unbound_lifetime(t: Tokens) -> str:
    """Bearer tokens are the stealable kind: they must be short (RFC 6750 §5.3)."""
    return t.forge(fw_binding="none", cnf=DROP, exp=t.now + UNBOUND_LIFETIME + 1)


def crit_header(t: Tokens) -> str:
    """RFC 7515 §4.1.11: an extension we do not understand must be refused."""
    return t.forge(header={"crit": ["fw_must_check"], "fw_must_check": True})


def client_id_other_than_sub(t: Tokens) -> str:
    return t.forge(client_id="d2")


def sub_not_a_device_id(t: Tokens) -> str:
    return t.forge(sub="../admin", client_id="../admin")


def float_times(t: Tokens) -> str:
    return t.forge(iat=float(t.now), nbf=float(t.now), exp=t.now + 900.5)


# (forgery, what the refusal must say): a refusal for another reason would hide a
# missing check behind an unrelated one.
FORGERIES: list[tuple[Callable[[Tokens], str], str]] = [
    (alg_none, "ES256 only"),
    (hs256_keyed_with_our_public_key, "ES256 only"),
    (tampered_payload, "signature does not verify"),
    (signed_by_a_foreign_key_under_our_kid, "signature does not verify"),
    (unknown_kid, "unknown or rotated-out signing key"),
    (missing_kid, "unknown or rotated-out signing key"),
    (wrong_audience, "another audience"),
    (wrong_issuer, "issued by someone else"),
    (expired, "expired"),
    (not_yet_valid_beyond_the_skew, "not valid yet"),
    (lifetime_above_the_maximum, f"longer than the {MAX_LIFETIME} s"),
    (wrong_typ, "typ must be at\\+jwt"),
    (missing_typ, "typ must be at\\+jwt"),
    (missing_fw_gen, "fw_gen"),
    (cnf_inconsistent_with_fw_binding, "needs cnf.jkt"),
    (bound_without_cnf, "needs cnf"),
    (unbound_with_cnf, "must not carry cnf"),
    (unbound_token_living_longer_than_the_unbound_lifetime,
     f"longer than the {UNBOUND_LIFETIME} s"),
    # PyJWT's header parser already refuses an unknown crit extension (before our own
    # check), with a reason that says "header".
    (crit_header, "header|critical"),
    (client_id_other_than_sub, "client_id is not its sub"),
    (sub_not_a_device_id, "not a device id"),
    (float_times, "whole seconds"),
]


@pytest.mark.parametrize(("forgery", "reason"), FORGERIES,
                         ids=[f.__name__ for f, _ in FORGERIES])
def test_forged_token_is_refused(tokens: Tokens, forgery: Callable[[Tokens], str],
                                 reason: str) -> None:
    # Negative control: the same forging tool without the defect makes a token we accept.
    tokens.verifier.verify_uncached(tokens.forge())
    token = forgery(tokens)
    with pytest.raises(TokenRefused, match=reason):
        tokens.verifier.verify_uncached(token)
    with pytest.raises(TokenRefused, match=reason):  # the cached path refuses it too
        tokens.verifier.verify(token)


@pytest.mark.parametrize("control", [
    pytest.param(lambda t: t.forge(exp=t.now + 1, iat=t.now - 900, nbf=t.now - 900),
                 id="one_second_before_exp"),
    pytest.param(lambda t: t.forge(iat=t.now + SKEW, nbf=t.now + SKEW,
                                   exp=t.now + SKEW + 900), id="future_within_the_skew"),
    pytest.param(lambda t: t.forge(exp=t.now + MAX_LIFETIME), id="exactly_max_lifetime"),
    pytest.param(lambda t: t.forge(fw_binding="none", cnf=DROP,
                                   exp=t.now + UNBOUND_LIFETIME),
                 id="unbound_exactly_unbound_lifetime"),
    pytest.param(lambda t: t.forge(header={"typ": "application/at+jwt"}),
                 id="typ_media_type_form"),
    pytest.param(lambda t: t.forge(fw_binding="jkt", cnf={"jkt": "x" * 43}),
                 id="key_bound"),
])
def test_boundaries_of_the_refusals_are_accepted(tokens: Tokens,
                                                 control: Callable[[Tokens], str]) -> None:
    """Controls for the table above: each limit is refused one second past it, not at it."""
    tokens.verifier.verify_uncached(control(tokens))


def test_issued_token_verifies_with_the_claims_it_was_issued_with(tokens: Tokens) -> None:
    issued = tokens.issuer.issue("d1", ("telemetry:write", "commands:read"), "x5t#S256",
                                 CERT_THUMBPRINT, 7, 900)
    header = jwt.get_unverified_header(issued.token)
    raw = jwt.decode(issued.token, options={"verify_signature": False})
    assert header == {"alg": "ES256", "typ": "at+jwt", "kid": tokens.keys.signing_key().kid}
    assert tokens.keys.signing_key().kid == thumbprint(tokens.keys.signing_key().public_key)
    assert (raw["sub"], raw["client_id"], raw["iss"], raw["aud"]) == ("d1", "d1", ISSUER,
                                                                      ISSUER)
    assert raw["scope"] == "telemetry:write commands:read"
    assert raw["cnf"] == {"x5t#S256": CERT_THUMBPRINT}
    assert (raw["fw_binding"], raw["fw_gen"]) == ("x5t#S256", 7)
    assert raw["iat"] == raw["nbf"] == tokens.now and raw["exp"] == tokens.now + 900
    assert len(base64.urlsafe_b64decode(raw["jti"] + "==")) == 16  # 128 random bits

    claims = tokens.verifier.verify(issued.token)
    assert claims == issued.claims
    assert (claims.device_id, claims.scopes, claims.binding, claims.thumbprint,
            claims.generation) == ("d1", ("telemetry:write", "commands:read"), "x5t#S256",
                                   CERT_THUMBPRINT, 7)
    assert claims.token_type == "Bearer"


def test_key_bound_and_unbound_tokens_say_so(tokens: Tokens) -> None:
    bound = tokens.verifier.verify(
        tokens.issuer.issue("d1", ("device:read",), "jkt", "k" * 43, 0, 900).token)
    assert (bound.binding, bound.thumbprint, bound.token_type) == ("jkt", "k" * 43, "DPoP")
    unbound_token = tokens.issuer.issue("d1", ("device:read",), "none", None, 0,
                                        UNBOUND_LIFETIME).token
    assert "cnf" not in jwt.decode(unbound_token, options={"verify_signature": False})
    unbound = tokens.verifier.verify(unbound_token)
    assert (unbound.binding, unbound.thumbprint, unbound.token_type) == ("none", None,
                                                                         "Bearer")


@pytest.mark.parametrize(("binding", "thumb"), [
    ("none", "k" * 43), ("jkt", None), ("x5t#S256", None), ("mtls", "k" * 43)])
def test_issuer_refuses_a_binding_without_its_thumbprint(tokens: Tokens, binding: str,
                                                          thumb: str | None) -> None:
    with pytest.raises(ValueError):
        tokens.issuer.issue("d1", ("device:read",), binding, thumb, 0, 300)


def test_pyjwt_alone_validates_an_issued_token_from_the_jwks(db: Database,
                                                             tmp_path: Path) -> None:
    """Interop on the cheap layer: a resource server with nothing but PyJWT and our
    JWKS checks signature, aud and iss (PyJWT reads the real clock, so this one runs
    at the real time)."""
    clock = FrozenClock(dt.datetime.now(dt.UTC))
    keys = make_keys(db, clock, tmp_path)
    token = AccessTokenIssuer(keys, ISSUER, ISSUER, CONFIG, clock).issue(
        "d1", ("telemetry:write",), "x5t#S256", CERT_THUMBPRINT, 0, 900).token
    jwks = jwt.PyJWKSet.from_dict(keys.jwks())
    kid = jwt.get_unverified_header(token)["kid"]
    claims = jwt.decode(token, jwks[kid], algorithms=["ES256"], audience=ISSUER,
                        issuer=ISSUER)
    assert claims["sub"] == "d1" and claims["cnf"] == {"x5t#S256": CERT_THUMBPRINT}
    # Negative controls: PyJWT with the same JWKS refuses another audience and issuer.
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, jwks[kid], algorithms=["ES256"], audience="https://other",
                   issuer=ISSUER)
    with pytest.raises(jwt.InvalidIssuerError):
        jwt.decode(token, jwks[kid], algorithms=["ES256"], audience=ISSUER,
                   issuer="https://other")
    # After a rotation the JWKS carries both keys, the new one first, and the old
    # token still validates from it.
    old_kid = kid
    clock.advance(dt.timedelta(seconds=1))  # "newest" is by creation time (seconds)
    keys.rotate("operator:test", "test")
    published = keys.jwks()["keys"]
    assert [k["kid"] for k in published][1:] == [old_kid] and len(published) == 2
    assert all(k["alg"] == "ES256" and k["use"] == "sig" and "d" not in k
               for k in published)
    jwt.decode(token, jwt.PyJWKSet.from_dict(keys.jwks())[old_kid], algorithms=["ES256"],
               audience=ISSUER, issuer=ISSUER)


def test_token_of_a_rotated_out_key_is_refused_after_the_overlap(tokens: Tokens) -> None:
    """A leaked retired key must stop minting accepted tokens once the overlap (max
    lifetime + skew) is over. The token here is time-valid throughout, so only the
    key's retirement can refuse it."""
    old_key = tokens.our_private_key()
    t0 = tokens.now
    # nbf within the skew, lifetime the maximum: accepted until t0 + 60 + 3600 + 60.
    token = tokens.forge(old_key, iat=t0 + SKEW, nbf=t0 + SKEW, exp=t0 + SKEW + MAX_LIFETIME)
    tokens.verifier.verify_uncached(token)
    tokens.keys.rotate("operator:test", "scheduled")
    assert tokens.keys.signing_key().kid != thumbprint(old_key.public_key())
    overlap = MAX_LIFETIME + SKEW
    tokens.clock.advance(dt.timedelta(seconds=overlap - 1))
    assert tokens.verifier.verify_uncached(token).kid == thumbprint(old_key.public_key())
    tokens.clock.advance(dt.timedelta(seconds=1))
    with pytest.raises(TokenRefused, match="rotated-out"):
        tokens.verifier.verify_uncached(token)
    assert thumbprint(old_key.public_key()) not in {k["kid"] for k in tokens.keys.jwks()["keys"]}
    # The new key's tokens are unaffected.
    tokens.verifier.verify_uncached(tokens.forge())


def test_key_rotated_out_on_another_node_is_refused_after_reload(
        tokens: Tokens, db: Database, tmp_path: Path) -> None:
    """Another node's SigningKeys reads the same rows: after the rotation reaches it
    (reload) and the overlap passes, it refuses the old key too."""
    other = make_keys(db, tokens.clock, tmp_path)
    verifier = AccessTokenVerifier(other, ISSUER, ISSUER, CONFIG, tokens.clock)
    old_key = tokens.our_private_key()
    t0 = tokens.now
    token = tokens.forge(old_key, iat=t0 + SKEW, nbf=t0 + SKEW, exp=t0 + SKEW + MAX_LIFETIME)
    verifier.verify_uncached(token)
    tokens.keys.rotate("operator:other-node", "on demand")
    other.reload()
    tokens.clock.advance(dt.timedelta(seconds=MAX_LIFETIME + SKEW))
    with pytest.raises(TokenRefused, match="rotated-out"):
        verifier.verify_uncached(token)


def test_verified_cache_rechecks_expiry(tokens: Tokens) -> None:
    issued = tokens.issuer.issue("d1", ("device:read",), "jkt", "k" * 43, 0, 900)
    tokens.verifier.verify(issued.token)
    tokens.clock.advance(dt.timedelta(seconds=900 - 1))
    tokens.verifier.verify(issued.token)  # control: from the cache, still valid
    tokens.clock.advance(dt.timedelta(seconds=1))
    with pytest.raises(TokenRefused, match="expired"):
        tokens.verifier.verify(issued.token)


def test_verified_cache_rechecks_the_rotated_out_key(tokens: Tokens) -> None:
    """A token whose signature this node already checked must not outlive its key."""
    t0 = tokens.now
    token = tokens.forge(iat=t0 + SKEW, nbf=t0 + SKEW, exp=t0 + SKEW + MAX_LIFETIME)
    tokens.verifier.verify(token)  # cached
    tokens.keys.rotate("operator:test", "scheduled")
    tokens.clock.advance(dt.timedelta(seconds=MAX_LIFETIME + SKEW - 1))
    tokens.verifier.verify(token)  # control: inside the overlap, from the cache
    tokens.clock.advance(dt.timedelta(seconds=1))
    with pytest.raises(TokenRefused, match="rotated out"):
        tokens.verifier.verify(token)


@pytest.mark.parametrize("garbage", [
    "", "a.b", "a.b.c.d", "not-base64!.e30.sig", "x" * 9000 + ".a.b", "e30.e30.",
])
def test_text_that_is_not_a_compact_jws_is_refused(tokens: Tokens, garbage: str) -> None:
    with pytest.raises(TokenRefused):
        tokens.verifier.verify(garbage)
