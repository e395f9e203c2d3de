"""Proofs of possession: DPoP proofs on HTTPS (RFC 9449 §4.3) and the same proof shape
carried in an MQTT CONNECT password (``htm`` = ``CONNECT``, ``htu`` = the listener's
``mqtts://host:port``; docs/credentials.md has the wire format).

A proof is a JWT signed by the device's key with that public key in its header. It is
accepted only with ``typ`` ``dpop+jwt``, ES256, a public EC P-256 ``jwk``, the method
and target URI of this request, an ``iat`` inside the window, the hash of the access
token it accompanies (``ath``), and a ``jti`` never seen in that window (single use).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.clock import Clock
from fleetward.config import TokensConfig
from fleetward.crypto.jose import (
    ALGORITHM,
    b64url,
    decode_segment,
    jwk_thumbprint,
    public_key_from_jwk,
    token_hash,
)
from fleetward.errors import InvalidInput
from fleetward.tokens.access import TokenRefused
from fleetward.tokens.replay import ReplayCache

PROOF_TYPE = "dpop+jwt"  # RFC 9449 §4.2
MAX_PROOF_CHARS = 4096
MAX_JTI_CHARS = 128
DEFAULT_PORTS = {"https": 443, "mqtts": 8883, "http": 80}
ANY_HOST = "*"


@dataclass(frozen=True, slots=True)
class TargetUri:
    """Where a request went, as the proof's ``htu`` must name it (no query, no
    fragment: RFC 9449 §4.3 point 9)."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, uri: str) -> TargetUri:
        """Split and normalise (RFC 3986 §6.2.2-6.2.3: case of scheme and host, the
        default port, an empty path as '/').

        Raises:
            ValueError: not an absolute URI with a host.
        """
        parts = urllib.parse.urlsplit(uri)
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").lower()
        if not scheme or not host:
            raise ValueError("htu must be an absolute URI")
        port = parts.port or DEFAULT_PORTS.get(scheme, 0)  # raises ValueError if bad
        return cls(scheme, host, port, parts.path or "/")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


@dataclass(frozen=True, slots=True)
class Proof:
    jkt: str  # RFC 7638 thumbprint of the proof's key: what cnf.jkt must equal
    jti: str
    issued_at: int
    public_key: ec.EllipticCurvePublicKey


class ProofVerifier:
    """Checks proofs; the replay cache is shared by everything single-use on a node.

    Args:
        server_names: the host names and addresses this server answers to (its TLS
            certificate's names): a proof for another host is not for us.
    """

    def __init__(self, replay: ReplayCache, config: TokensConfig, clock: Clock,
                 server_names: frozenset[str]) -> None:
        self._replay = replay
        self._max_age = config.proof_max_age_seconds
        self._skew = config.clock_skew_seconds
        self._clock = clock
        self.server_names = frozenset(name.lower() for name in server_names)

    def verify(self, proof: str, *, method: str, target: TargetUri,
               access_token: str | None, nonce: bytes | None = None) -> Proof:
        """The key that signed ``proof`` for ``method`` on ``target``.

        Args:
            target: the URI the request went to. Its host may be ``*`` where the
                listener cannot know which of its names the client used (MQTT has no
                Host header): any of ``server_names`` then matches.
            access_token: the token the proof accompanies (its hash must be ``ath``);
                None at the token endpoint, where there is no token yet.
            nonce: a challenge the server sent; the proof must carry it as ``nonce``
                (RFC 9449 §8), base64url.

        Raises:
            TokenRefused: why the proof is not accepted (safe to send back).
        """
        if not isinstance(proof, str) or len(proof) > MAX_PROOF_CHARS or proof.count(".") != 2:
            raise TokenRefused("the proof is not a compact JWS of three parts")
        try:
            header = decode_segment(proof.split(".", 1)[0])
        except (ValueError, UnicodeDecodeError):
            raise TokenRefused("the proof's header is not valid JSON") from None
        if header.get("typ") != PROOF_TYPE:
            raise TokenRefused(f"the proof's typ must be {PROOF_TYPE} (RFC 9449 §4.2)")
        if header.get("alg") != ALGORITHM:
            raise TokenRefused(f"proofs are signed with {ALGORITHM} only")
        try:
            key = public_key_from_jwk(header.get("jwk"))
        except InvalidInput as exc:
            raise TokenRefused(f"the proof's jwk: {exc.message}") from None
        try:
            claims = jwt.decode(proof, key, algorithms=[ALGORITHM],
                                options={"verify_exp": False, "verify_nbf": False,
                                         "verify_iat": False, "verify_aud": False,
                                         "require": ["jti", "htm", "htu", "iat"]})
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRefused(f"the proof lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError:
            raise TokenRefused("the proof's signature does not verify with its jwk") from None
        jti, htm, htu, iat = (claims.get(k) for k in ("jti", "htm", "htu", "iat"))
        if not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI_CHARS:
            raise TokenRefused(f"the proof's jti must be 1-{MAX_JTI_CHARS} characters")
        if htm != method:
            raise TokenRefused(f"the proof is for {str(htm)[:16]!r}, not {method}")
        try:
            proof_target = TargetUri.parse(htu) if isinstance(htu, str) else None
        except ValueError:
            proof_target = None
        if proof_target is not None and target.host == ANY_HOST:
            target = TargetUri(target.scheme, proof_target.host, target.port, target.path)
        if proof_target is None or proof_target != target:
            raise TokenRefused(f"the proof's htu is not {target}")
        if target.host not in self.server_names:
            raise TokenRefused(f"{target.host!r} is not a name of this server")
        if not isinstance(iat, int) or isinstance(iat, bool):
            raise TokenRefused("the proof's iat must be whole seconds")
        now = self._clock.now().timestamp()
        if not now - self._max_age - self._skew <= iat <= now + self._skew:
            raise TokenRefused(f"the proof's iat is outside the {self._max_age} s window; "
                               "make a new proof for every request and check the clock")
        if access_token is not None:
            if claims.get("ath") != token_hash(access_token):
                raise TokenRefused("the proof's ath is not the hash of this access token")
        elif "ath" in claims:
            raise TokenRefused("a proof for the token endpoint carries no ath")
        if nonce is not None and claims.get("nonce") != b64url(nonce):
            raise TokenRefused("the proof does not carry the server's challenge as nonce")
        jkt = jwk_thumbprint(header["jwk"])
        # Single use within the window in which it could be accepted at all.
        keep_until = iat + self._max_age + 2 * self._skew
        if not self._replay.use(f"dpop:{jkt}:{jti}", keep_until, now, owner=jkt):
            raise TokenRefused("the proof was used before (replay) or the server is "
                               "overloaded with proofs; make a new one")
        return Proof(jkt, jti, iat, key)
