"""Acceptance 1: standard OAuth clients and JWT libraries interoperate with the token
endpoint, and nothing but our signing key makes a token.

Threats: a server whose tokens only its own code can read (so resource servers
re-implement verification, or skip it); a ``cnf`` that names the wrong certificate or
key (a bound token that binds nothing); discovery that differs between listeners (a
relying party trusting keys the device listener does not use); and a resource server
that accepts a token it did not sign (``alg: none``, a stranger's key under our
``kid``, HS256 keyed with our public key, edited claims).

The clients are third-party: authlib's OAuth 2 client with ``private_key_jwt``
(RFC 7523), PyJWT's ``PyJWKClient`` given only the RFC 8414 ``jwks_uri``, and curl.
Thumbprints are computed here from the certificate and key we hold.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey

from tests.conftest import RunningServer, start_server, stop_server
from tests.integration.channel_helpers import DeviceIdentity, make_device
from tests.integration.token_helpers import (
    b64url,
    bearer_get,
    claims_of,
    dpop_get,
    dpop_proof,
    header_of,
    issuer,
    jkt,
    load_key,
    new_key,
    server_only_tls,
    x5t_s256,
)

with warnings.catch_warnings():
    # authlib 1.x warns that its httpx integration will move to httpx2; the API used
    # here is the same in both. authlib.deprecate installs an "always" filter for its
    # own warnings when imported: import it first, then silence it for this import.
    import authlib.deprecate  # noqa: F401
    warnings.simplefilter("ignore")
    from authlib.integrations.httpx_client import OAuth2Client
    from authlib.oauth2.rfc7523 import PrivateKeyJWT

METADATA_PATH = "/.well-known/oauth-authorization-server"
JWKS_PATH = "/.well-known/jwks.json"
DEFAULT_LIFETIME_SECONDS = 900  # [tokens] access_token_lifetime_seconds default
ALL_SCOPES = "telemetry:write commands:read commands:write device:read ota:download mqtt:connect"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("tokens-interop") / "data"
    s = start_server(data_dir)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def metadata(server: RunningServer) -> dict[str, Any]:
    """RFC 8414 metadata as a client finds it: from the device listener's well-known URL."""
    response = httpx.get(issuer(server) + METADATA_PATH, verify=server_only_tls(server),
                         timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def device(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> DeviceIdentity:
    return make_device(server, tmp_path_factory.mktemp("devices"), "interop-device")


def authlib_client(identity: DeviceIdentity, token_endpoint: str, *,
                   mtls: bool, assertion_lifetime: int | None = 60) -> OAuth2Client:
    """authlib's OAuth 2 client authenticating with ``private_key_jwt`` (ES256, the
    device's certificate key), over TLS with or without the client certificate.

    authlib signs assertions valid for an hour by default; Fleetward takes at most
    ``max_assertion_lifetime_seconds`` (300), so a deployment sets a shorter ``exp``
    (``assertion_lifetime``; None keeps authlib's default)."""
    claims = None
    if assertion_lifetime is not None:
        claims = {"exp": int(time.time()) + assertion_lifetime}
    auth = PrivateKeyJWT(token_endpoint, alg="ES256", claims=claims)
    # mTLS: the certificate in the SSL context (httpx's cert= is deprecated for this).
    verify = (identity.tls_context() if mtls
              else ssl.create_default_context(cafile=str(identity.cafile)))
    return OAuth2Client(identity.device_id, ECKey.import_key(identity.key.read_bytes()),
                        token_endpoint_auth_method=auth, verify=verify, timeout=10)


def verify_with_jwks(metadata: dict[str, Any], server: RunningServer,
                     token: str) -> dict[str, Any]:
    """What any resource server does with PyJWT: keys from ``jwks_uri`` only, ES256,
    our issuer as ``iss`` and ``aud``, every registered claim required."""
    keys = jwt.PyJWKClient(metadata["jwks_uri"], ssl_context=server_only_tls(server),
                           cache_jwk_set=False)
    signing_key = keys.get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token, signing_key, algorithms=["ES256"], audience=metadata["issuer"],
        issuer=metadata["issuer"],
        options={"require": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"]})
    return claims


def rfc7638(jwk: dict[str, Any]) -> str:
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")},
                           separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def check_rfc9068_claims(claims: dict[str, Any], identity: DeviceIdentity,
                         metadata: dict[str, Any], response: dict[str, Any]) -> None:
    assert claims["iss"] == claims["aud"] == metadata["issuer"]
    assert claims["sub"] == claims["client_id"] == identity.device_id
    assert claims["nbf"] == claims["iat"]
    assert claims["exp"] - claims["iat"] == response["expires_in"] == DEFAULT_LIFETIME_SECONDS
    assert claims["scope"] == response["scope"] == ALL_SCOPES
    # jti: 128 random bits, base64url (22 characters, no padding).
    assert len(claims["jti"]) == 22
    assert len(base64.urlsafe_b64decode(claims["jti"] + "==")) == 16
    assert isinstance(claims["fw_gen"], int)


def test_discovery_names_the_issuer_it_was_fetched_from(
        server: RunningServer, metadata: dict[str, Any]) -> None:
    """RFC 8414 §3.3: the metadata's issuer is the URL it was fetched under, and every
    endpoint lives there; otherwise a client would send assertions to one audience and
    verify tokens against another."""
    assert metadata["issuer"] == issuer(server)
    assert metadata["token_endpoint"] == issuer(server) + "/oauth2/token"
    assert metadata["jwks_uri"] == issuer(server) + JWKS_PATH
    assert "private_key_jwt" in metadata["token_endpoint_auth_methods_supported"]
    assert "tls_client_auth" in metadata["token_endpoint_auth_methods_supported"]
    assert metadata["dpop_signing_alg_values_supported"] == ["ES256"]
    assert metadata["tls_client_certificate_bound_access_tokens"] is True


def test_discovery_on_the_public_listener_equals_the_device_listener(
        server: RunningServer) -> None:
    """A relying party that can only reach the public listener (plain HTTP) must find
    the same issuer and the same keys as devices do on the device listener."""
    for path in (METADATA_PATH, JWKS_PATH):
        device_side = httpx.get(issuer(server) + path, verify=server_only_tls(server),
                                timeout=10)
        public_side = httpx.get(server.public_url + path, timeout=10)
        assert device_side.status_code == public_side.status_code == 200, path
        assert public_side.json() == device_side.json(), path
    jwks = httpx.get(server.public_url + JWKS_PATH, timeout=10).json()
    assert jwks["keys"], "no signing key published"
    for key in jwks["keys"]:
        assert "d" not in key, "a private key member in the JWKS"
        # The kid is the RFC 7638 thumbprint of the key (docs/credentials.md).
        assert key["kid"] == rfc7638(key), key


def test_authlib_private_key_jwt_over_mtls_gets_a_certificate_bound_token(
        server: RunningServer, metadata: dict[str, Any], device: DeviceIdentity) -> None:
    """authlib (private_key_jwt, ES256, token endpoint from the metadata) over mTLS:
    the token is bound to the certificate on the connection, and PyJWT, given only the
    jwks_uri, verifies it."""
    with authlib_client(device, metadata["token_endpoint"], mtls=True) as client:
        response = client.fetch_token(metadata["token_endpoint"],
                                      grant_type="client_credentials")
    token = response["access_token"]
    assert response["token_type"] == "Bearer"
    header = header_of(token)
    assert header["typ"] == "at+jwt" and header["alg"] == "ES256"
    claims = verify_with_jwks(metadata, server, token)
    check_rfc9068_claims(claims, device, metadata, response)
    assert claims["fw_binding"] == "x5t#S256"
    assert claims["cnf"] == {"x5t#S256": x5t_s256(device.cert)}
    # It works where it is bound: Bearer over a connection with that certificate.
    assert bearer_get(server, "/v1/devices/self", token, device).status_code == 200


def test_authlib_private_key_jwt_with_dpop_gets_a_key_bound_token(
        server: RunningServer, metadata: dict[str, Any], device: DeviceIdentity) -> None:
    """authlib with a DPoP header we add (RFC 9449 §5), no client certificate: the token
    is bound to the proof's key (cnf.jkt = the RFC 7638 thumbprint computed here), and
    works with a fresh proof by that key. The DPoP key is not the assertion key: the
    binding follows the proof, not the client authentication."""
    dpop_key = new_key()
    proof = dpop_proof(dpop_key, "POST", metadata["token_endpoint"])
    with authlib_client(device, metadata["token_endpoint"], mtls=False) as client:
        response = client.fetch_token(metadata["token_endpoint"],
                                      grant_type="client_credentials",
                                      headers={"DPoP": proof})
    token = response["access_token"]
    assert response["token_type"] == "DPoP"
    claims = verify_with_jwks(metadata, server, token)
    check_rfc9068_claims(claims, device, metadata, response)
    assert claims["fw_binding"] == "jkt"
    assert claims["cnf"] == {"jkt": jkt(dpop_key)}
    assert jkt(dpop_key) != jkt(load_key(device))
    assert dpop_get(server, "/v1/devices/self", token, dpop_key).status_code == 200


def test_authlib_default_assertion_lifetime_is_refused_with_the_limit_named(
        metadata: dict[str, Any], device: DeviceIdentity) -> None:
    """authlib's default assertion lives an hour; the server takes at most 300 s
    (``max_assertion_lifetime_seconds``) and says so, so a long-lived stolen assertion
    cannot be replayed for long. The same client with a short exp is the control
    above."""
    from authlib.integrations.base_client.errors import OAuthError

    with authlib_client(device, metadata["token_endpoint"], mtls=True,
                        assertion_lifetime=None) as client, pytest.raises(OAuthError) as err:
        client.fetch_token(metadata["token_endpoint"], grant_type="client_credentials")
    assert err.value.error == "invalid_client"
    assert "300 s" in (err.value.description or "")


def test_curl_gets_a_token_by_tls_client_auth(server: RunningServer,
                                               metadata: dict[str, Any],
                                               device: DeviceIdentity) -> None:
    """RFC 8705 §2 with curl: the certificate on the connection and client_id are the
    whole client authentication; the token is bound to that certificate. Without the
    certificate the same request is ``invalid_client``."""
    base = ["curl", "-sS", "--max-time", "10", "--cacert", str(server.chain),
            "-D", "-", "-d", "grant_type=client_credentials",
            "-d", f"client_id={device.device_id}"]
    result = subprocess.run([*base, "--cert", str(device.cert), "--key", str(device.key),
                             metadata["token_endpoint"]],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    # text=True turns the header block's CRLFs into newlines.
    head, _, body = result.stdout.partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), result.stdout
    assert "cache-control: no-store" in head.lower()  # RFC 6749 §5.1
    response = json.loads(body)
    assert response["token_type"] == "Bearer"
    claims = verify_with_jwks(metadata, server, response["access_token"])
    assert claims["sub"] == device.device_id
    assert claims["cnf"] == {"x5t#S256": x5t_s256(device.cert)}
    assert bearer_get(server, "/v1/devices/self", response["access_token"],
                      device).status_code == 200

    refused = subprocess.run([*base, metadata["token_endpoint"]], capture_output=True,
                             text=True, timeout=30)
    head, _, body = refused.stdout.partition("\n\n")
    # RFC 6749 §5.2: 400 (401 only for Authorization-header client authentication).
    assert head.startswith("HTTP/1.1 400"), refused.stdout
    assert json.loads(body)["error"] == "invalid_client"


# --- forged tokens ----------------------------------------------------------------------


def _segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def _alg_none(genuine: str, public_pem: bytes) -> str:
    header = {**header_of(genuine), "alg": "none"}
    return f"{_segment(header)}.{_segment(claims_of(genuine))}."


def _strangers_key_with_our_kid(genuine: str, public_pem: bytes) -> str:
    return jwt.encode(claims_of(genuine), new_key(), algorithm="ES256",
                      headers={"kid": header_of(genuine)["kid"], "typ": "at+jwt"})


def _hs256_keyed_with_our_public_key(genuine: str, public_pem: bytes) -> str:
    """RFC 8725 §2.1: the classic algorithm confusion (PyJWT itself refuses to build
    this, so it is built by hand)."""
    header = {**header_of(genuine), "alg": "HS256"}
    signing_input = f"{_segment(header)}.{_segment(claims_of(genuine))}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def _edited_claims(genuine: str, public_pem: bytes) -> str:
    """Our signature over other claims: a year-long token with the original signature."""
    header_part, _, signature = genuine.split(".")
    claims = {**claims_of(genuine), "exp": claims_of(genuine)["exp"] + 365 * 86400}
    return f"{header_part}.{_segment(claims)}.{signature}"


FORGERIES: dict[str, Callable[[str, bytes], str]] = {
    "alg-none": _alg_none,
    "strangers-key-with-our-kid": _strangers_key_with_our_kid,
    "hs256-keyed-with-our-public-key": _hs256_keyed_with_our_public_key,
    "edited-claims": _edited_claims,
}


@pytest.mark.parametrize("forge", list(FORGERIES.values()), ids=list(FORGERIES))
def test_forged_token_is_refused_over_https(server: RunningServer, device: DeviceIdentity,
                                            metadata: dict[str, Any],
                                            forge: Callable[[str, bytes], str]) -> None:
    """Each forgery carries a genuine token's claims (bound to the certificate this
    connection presents), so only the signature is wrong: the device API answers 401
    with ``WWW-Authenticate: Bearer error="invalid_token"``. The genuine token, on the
    same connection setup, is the control."""
    with httpx.Client(verify=device.tls_context(), timeout=10) as client:
        genuine = client.post(metadata["token_endpoint"], data={
            "grant_type": "client_credentials", "client_id": device.device_id}
        ).json()["access_token"]
    jwks = httpx.get(metadata["jwks_uri"], verify=server_only_tls(server), timeout=10).json()
    jwk = next(k for k in jwks["keys"] if k["kid"] == header_of(genuine)["kid"])
    public_key = jwt.algorithms.ECAlgorithm.from_jwk(jwk)
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_pem = public_key.public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)

    assert bearer_get(server, "/v1/devices/self", genuine, device).status_code == 200
    forged = forge(genuine, public_pem)
    assert forged != genuine
    response = bearer_get(server, "/v1/devices/self", forged, device)
    assert response.status_code == 401, response.text
    challenge = response.headers.get("WWW-Authenticate", "")
    assert challenge.startswith('Bearer error="invalid_token"'), challenge
    assert response.headers["content-type"].startswith("application/problem+json")
    with pytest.raises(jwt.PyJWTError):  # and no JWT library would take it either
        verify_with_jwks(metadata, server, forged)


def test_token_response_is_not_cacheable(server: RunningServer, device: DeviceIdentity,
                                         metadata: dict[str, Any]) -> None:
    """RFC 6749 §5.1: a response carrying a token says ``Cache-Control: no-store``."""
    with httpx.Client(verify=device.tls_context(), timeout=10) as client:
        response = client.post(metadata["token_endpoint"], data={
            "grant_type": "client_credentials", "client_id": device.device_id})
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
