"""The few JOSE pieces PyJWT leaves to its callers: base64url, EC P-256 public keys as
JWKs (RFC 7517/7518), JWK thumbprints (RFC 7638) and certificate thumbprints
(RFC 8705 §3.1).

Only P-256 / ES256 exists here: it is what the CA issues, what TPMs and secure
elements do, and an allow-list of one is the safest algorithm policy (RFC 8725 §3.1).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.errors import InvalidInput

ALGORITHM = "ES256"
CURVE = "P-256"
_COORDINATE_BYTES = 32  # P-256 field elements (RFC 7518 §6.2.1.2)


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding.

    Raises:
        ValueError: characters outside the base64url alphabet, padding, or a length
            no encoding produces.
    """
    if "=" in text or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """A P-256 public key as a JWK (RFC 7518 §6.2.1), members in RFC 7638 order."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise InvalidInput("only P-256 keys are supported", hint="use an EC P-256 key")
    numbers = key.public_numbers()
    return {"crv": CURVE, "kty": "EC",
            "x": b64url(numbers.x.to_bytes(_COORDINATE_BYTES, "big")),
            "y": b64url(numbers.y.to_bytes(_COORDINATE_BYTES, "big"))}


def public_key_from_jwk(jwk: Any) -> ec.EllipticCurvePublicKey:
    """The public key a JWK names: EC P-256 only, and never a private key.

    Raises:
        InvalidInput: not a JSON object, another key type or curve, a private key
            member (``d``), or coordinates that are not a point on the curve.
    """
    if not isinstance(jwk, dict):
        raise InvalidInput("the jwk must be a JSON object")
    if jwk.get("kty") != "EC" or jwk.get("crv") != CURVE:
        raise InvalidInput("the jwk must be an EC P-256 public key",
                           hint='kty "EC", crv "P-256" (ES256)')
    if "d" in jwk:
        # RFC 9449 §4.3 point 7: the header must not carry a private key.
        raise InvalidInput("the jwk contains a private key (member d)",
                           hint="send the public key only")
    x, y = jwk.get("x"), jwk.get("y")
    if not isinstance(x, str) or not isinstance(y, str):
        raise InvalidInput("the jwk needs x and y")
    try:
        xb, yb = b64url_decode(x), b64url_decode(y)
    except ValueError:
        raise InvalidInput("the jwk's x and y are not base64url") from None
    if len(xb) != _COORDINATE_BYTES or len(yb) != _COORDINATE_BYTES:
        raise InvalidInput("the jwk's x and y must be 32 bytes each (P-256)")
    try:
        return ec.EllipticCurvePublicNumbers(int.from_bytes(xb, "big"),
                                             int.from_bytes(yb, "big"),
                                             ec.SECP256R1()).public_key()
    except ValueError:
        raise InvalidInput("the jwk's coordinates are not a point on P-256") from None


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 §3: SHA-256 over the required members, sorted, without whitespace."""
    required = {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"], "y": jwk["y"]}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def key_thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """The RFC 7638 thumbprint of a P-256 public key (the ``cnf.jkt`` of RFC 9449)."""
    return jwk_thumbprint(public_jwk(key))


def certificate_thumbprint(der: bytes) -> str:
    """``x5t#S256`` (RFC 8705 §3.1): base64url SHA-256 of the DER certificate."""
    return b64url(hashlib.sha256(der).digest())


def token_hash(access_token: str) -> str:
    """``ath`` (RFC 9449 §4.2): base64url SHA-256 of the ASCII access token."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def decode_segment(segment: str) -> dict[str, Any]:
    """A JWS header or payload segment as a JSON object.

    Raises:
        ValueError: not base64url, not UTF-8 JSON, or not an object.
    """
    value = json.loads(b64url_decode(segment).decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value
