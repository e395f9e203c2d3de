"""Clients for the access-token acceptance tests (docs/credentials.md): DPoP proofs and
client assertions made with PyJWT, tokens from a real token endpoint (mTLS or
``private_key_jwt`` + DPoP), and a paho-mqtt v5 client that can speak MQTT 5 AUTH.

Everything here is computed from the standards, not from Fleetward's code: the RFC 7638
thumbprint, the RFC 8705 certificate thumbprint and the RFC 9449 ``ath`` are worked out
below so that a server that computes them wrongly fails the tests.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.conftest import RunningServer
from tests.integration.channel_helpers import DeviceIdentity

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 §2.2
TOKEN_PATH = "/oauth2/token"
FW_TOKEN = "FW-TOKEN"  # the MQTT 5 Authentication Method of access tokens
WAIT_SECONDS = 10.0  # bound on waiting for a packet that is expected to come

# MQTT 5.0 §2.4 reason codes the tests assert on.
SUCCESS = 0x00
CONTINUE_AUTHENTICATION = 0x18
RE_AUTHENTICATE = 0x19
BAD_USER_NAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87
BANNED = 0x8A
BAD_AUTHENTICATION_METHOD = 0x8C
ADMINISTRATIVE_ACTION = 0x98
MAXIMUM_CONNECT_TIME = 0xA0


# --- JOSE pieces, computed independently ---------------------------------------------------


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def load_key(identity: DeviceIdentity) -> ec.EllipticCurvePrivateKey:
    """The device's certificate key (unencrypted PEM written by ``make_device``)."""
    key = serialization.load_pem_private_key(identity.key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """The public half as a JWK, by PyJWT (what a device library would send)."""
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return jwk


def jkt(key: ec.EllipticCurvePrivateKey) -> str:
    """RFC 7638 §3 thumbprint: SHA-256 of the required members (crv, kty, x, y) in
    lexicographic order, no whitespace, from the raw coordinates (not from a JWK
    library, so that a wrong server-side canonicalisation cannot agree with it)."""
    numbers = key.public_key().public_numbers()
    x = b64url(numbers.x.to_bytes(32, "big"))
    y = b64url(numbers.y.to_bytes(32, "big"))
    canonical = f'{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}'
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def x5t_s256(cert_pem: Path) -> str:
    """RFC 8705 §3.1: base64url SHA-256 of the DER certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    return b64url(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


def ath(token: str) -> str:
    """RFC 9449 §4.2: base64url SHA-256 of the ASCII access token."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def claims_of(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified (for reading exp, jti, cnf in assertions)."""
    payload: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return payload


def header_of(token: str) -> dict[str, Any]:
    header: dict[str, Any] = jwt.get_unverified_header(token)
    return header


def dpop_proof(key: ec.EllipticCurvePrivateKey, method: str, url: str, *,
               token: str | None = None, nonce: bytes | None = None,
               iat: int | None = None, jti: str | None = None) -> str:
    """A DPoP proof (RFC 9449 §4.2): ``typ`` dpop+jwt, ES256, the public key in ``jwk``;
    ``htm``, ``htu``, a fresh ``jti`` and ``iat``; ``ath`` when it accompanies a token;
    ``nonce`` = base64url(challenge) for an MQTT ``FW-TOKEN`` challenge."""
    claims: dict[str, Any] = {"jti": jti or secrets.token_urlsafe(16), "htm": method,
                              "htu": url, "iat": int(time.time()) if iat is None else iat}
    if token is not None:
        claims["ath"] = ath(token)
    if nonce is not None:
        claims["nonce"] = b64url(nonce)
    return jwt.encode(claims, key, algorithm="ES256",
                      headers={"typ": "dpop+jwt", "jwk": public_jwk(key)})


def client_assertion(key: ec.EllipticCurvePrivateKey, device_id: str, audience: str, *,
                     lifetime_seconds: int = 60) -> str:
    """A ``private_key_jwt`` client assertion (RFC 7523 §3): iss = sub = the device id,
    aud = the token endpoint, a short exp and a single-use jti."""
    now = int(time.time())
    return jwt.encode({"iss": device_id, "sub": device_id, "aud": audience, "iat": now,
                       "exp": now + lifetime_seconds, "jti": secrets.token_urlsafe(16)},
                      key, algorithm="ES256")


# --- the token endpoint ------------------------------------------------------------------


def issuer(server: RunningServer) -> str:
    """The issuer a test server uses: https://<public URL host>:<device port>."""
    return f"https://127.0.0.1:{server.device_port}"


def token_endpoint(server: RunningServer) -> str:
    return issuer(server) + TOKEN_PATH


def device_url(server: RunningServer, path: str) -> str:
    """A device-listener URL; the host is the issuer's, so a proof's htu names it."""
    return issuer(server) + path


def mqtt_uri(server: RunningServer) -> str:
    """A CONNECT proof's htu: the MQTT listener as the client reached it (localhost)."""
    return f"mqtts://localhost:{server.mqtt_port}"


def server_only_tls(server: RunningServer) -> ssl.SSLContext:
    """Server-authenticated TLS (trusting our CA), no client certificate."""
    return ssl.create_default_context(cafile=str(server.chain))


def https(server: RunningServer, identity: DeviceIdentity | None = None) -> httpx.Client:
    """A client of the device listener, presenting ``identity``'s certificate or none."""
    context = identity.tls_context() if identity is not None else server_only_tls(server)
    return httpx.Client(base_url=issuer(server), verify=context, timeout=10)


def request_token(server: RunningServer, *, identity: DeviceIdentity | None = None,
                  assertion_of: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
                  dpop_key: ec.EllipticCurvePrivateKey | None = None,
                  scope: str | None = None, client_id: str | None = None) -> httpx.Response:
    """``POST /oauth2/token`` (client credentials). ``identity``: present its certificate
    (``tls_client_auth`` unless an assertion is sent too); ``assertion_of``: (device id,
    key) for ``private_key_jwt``; ``dpop_key``: add a DPoP proof (htm POST, htu the
    token endpoint, no ath)."""
    form = {"grant_type": "client_credentials"}
    if client_id is not None:
        form["client_id"] = client_id
    elif identity is not None and assertion_of is None:
        form["client_id"] = identity.device_id
    if assertion_of is not None:
        form["client_assertion_type"] = ASSERTION_TYPE
        form["client_assertion"] = client_assertion(assertion_of[1], assertion_of[0],
                                                    token_endpoint(server))
    if scope is not None:
        form["scope"] = scope
    headers = {}
    if dpop_key is not None:
        headers["DPoP"] = dpop_proof(dpop_key, "POST", token_endpoint(server))
    with https(server, identity) as client:
        return client.post(TOKEN_PATH, data=form, headers=headers)


def token_by_mtls(server: RunningServer, identity: DeviceIdentity,
                  scope: str | None = None) -> str:
    """A certificate-bound token (``tls_client_auth``)."""
    response = request_token(server, identity=identity, scope=scope)
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "Bearer", response.text
    token: str = response.json()["access_token"]
    return token


def token_by_dpop(server: RunningServer, identity: DeviceIdentity,
                  key: ec.EllipticCurvePrivateKey | None = None,
                  scope: str | None = None) -> str:
    """A key-bound token: ``private_key_jwt`` signed by the certificate key, over TLS
    without a client certificate, with a DPoP proof by ``key`` (default: the same key)."""
    cert_key = load_key(identity)
    response = request_token(server, assertion_of=(identity.device_id, cert_key),
                             dpop_key=key or cert_key, scope=scope)
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "DPoP", response.text
    token: str = response.json()["access_token"]
    return token


def dpop_get(server: RunningServer, path: str, token: str,
             key: ec.EllipticCurvePrivateKey) -> httpx.Response:
    """``GET path`` with ``Authorization: DPoP`` and a fresh proof, no client cert."""
    proof = dpop_proof(key, "GET", device_url(server, path), token=token)
    with https(server) as client:
        return client.get(path, headers={"Authorization": f"DPoP {token}", "DPoP": proof})


def bearer_get(server: RunningServer, path: str, token: str,
               identity: DeviceIdentity | None) -> httpx.Response:
    """``GET path`` with ``Authorization: Bearer`` over a connection presenting
    ``identity``'s certificate (or none)."""
    with https(server, identity) as client:
        return client.get(path, headers={"Authorization": f"Bearer {token}"})


def mqtt_password(server: RunningServer, token: str,
                  key: ec.EllipticCurvePrivateKey | None) -> str:
    """The CONNECT password: the token, or ``<token> <proof>`` for a key-bound token
    (htm CONNECT, htu the MQTT URI, ath)."""
    if key is None:
        return token
    return f"{token} {dpop_proof(key, 'CONNECT', mqtt_uri(server), token=token)}"


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --- paho with MQTT 5 AUTH ---------------------------------------------------------------

_AUTH = 0xF0  # MQTT 5.0 §3.15: AUTH fixed header (type 15, flags 0)


class AuthClient(mqtt.Client):
    """paho has no AUTH: this adds the packet, nothing else.

    An AUTH from the server (MQTT 5.0 §3.15) is parsed and handed to ``on_auth(client,
    reason_code, properties)`` on paho's network thread; ``send_auth`` queues one.
    Everything else is paho's own behaviour.
    """

    on_auth: Callable[[AuthClient, int, Properties], None] | None = None

    def _packet_handle(self) -> MQTTErrorCode:
        if self._in_packet["command"] & 0xF0 != _AUTH:
            return super()._packet_handle()
        data = bytes(self._in_packet["packet"])
        # §3.15.2.1: no reason code (remaining length 0) means 0x00 Success.
        code = data[0] if data else SUCCESS
        properties = Properties(PacketTypes.AUTH)  # type: ignore[no-untyped-call]
        if len(data) > 1:
            properties.unpack(data[1:])  # type: ignore[no-untyped-call]
        if self.on_auth is not None:
            self.on_auth(self, code, properties)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def send_auth(self, reason_code: int, method: str, data: bytes | None) -> None:
        """Queue AUTH with ``reason_code`` and Authentication Method / Data."""
        properties = Properties(PacketTypes.AUTH)  # type: ignore[no-untyped-call]
        properties.AuthenticationMethod = method
        if data is not None:
            properties.AuthenticationData = data
        packed = properties.pack()  # type: ignore[no-untyped-call]
        packet = bytearray([_AUTH])
        self._pack_remaining_length(packet, 1 + len(packed))
        packet.append(reason_code)
        packet += packed
        self._packet_queue(_AUTH, packet, 0, 0)


Answer = Callable[[bytes], bytes]  # an FW-TOKEN challenge -> the AUTH data (a proof)


def challenge_answer(server: RunningServer, token: str,
                     key: ec.EllipticCurvePrivateKey) -> Answer:
    """Answer an ``FW-TOKEN`` challenge with a CONNECT proof carrying it as nonce."""
    def answer(challenge: bytes) -> bytes:
        return dpop_proof(key, "CONNECT", mqtt_uri(server), token=token,
                          nonce=challenge).encode("ascii")
    return answer


@dataclass
class AuthRecord:
    code: int
    method: str | None
    data: bytes | None
    at: float  # time.time()


@dataclass
class TokenSession:
    """One paho connection that authenticates with a token: in the password, or by
    ``FW-TOKEN`` (v5), over TLS with or without a client certificate. Records CONNACK,
    AUTH and DISCONNECT with their reason codes, Reason Strings and wall-clock times.

    ``answer`` answers each ``AUTH 0x18`` challenge (CONNECT and re-authentication);
    replace it before ``reauthenticate`` to answer the next one differently.
    """

    server: RunningServer
    device_id: str
    v5: bool = True
    identity: DeviceIdentity | None = None  # present its certificate
    password: str | None = None
    username: str | None = None
    auth_method: str | None = None
    auth_data: bytes | None = None
    answer: Answer | None = None
    client_id: str | None = None
    connack: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    connack_code: int | None = None
    connack_reason: str | None = None
    connack_auth_method: str | None = None
    disconnect_code: int | None = None
    disconnect_reason: str | None = None
    disconnected_wall: float = 0.0  # time.time() when the DISCONNECT or close was seen
    disconnected_at: float = 0.0  # the same moment, time.monotonic()
    auths: list[AuthRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._changed = threading.Condition()
        self._acks: dict[int, int] = {}
        self.client = AuthClient(CallbackAPIVersion.VERSION2,
                                 client_id=self.client_id or self.device_id,
                                 protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
                                 reconnect_on_failure=False)
        context = (self.identity.tls_context() if self.identity is not None
                   else server_only_tls(self.server))
        self.client.tls_set_context(context)
        if self.password is not None:
            self.client.username_pw_set(self.username if self.username is not None
                                        else self.device_id, self.password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_auth = self._on_auth

    def connect(self) -> TokenSession:
        properties = None
        if self.v5 and self.auth_method is not None:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.AuthenticationMethod = self.auth_method
            if self.auth_data is not None:
                properties.AuthenticationData = self.auth_data
        self.client.connect("localhost", self.server.mqtt_port, keepalive=30,
                            properties=properties)
        self.client.loop_start()
        return self

    # paho's network thread --------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self.connack_code = reason.value
        self.connack_reason = getattr(properties, "ReasonString", None)
        self.connack_auth_method = getattr(properties, "AuthenticationMethod", None)
        self.connack.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        self.disconnected_wall = time.time()
        self.disconnected_at = time.monotonic()
        self.disconnect_code = reason.value
        self.disconnect_reason = getattr(properties, "ReasonString", None)
        self.disconnected.set()
        with self._changed:
            self._changed.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        with self._changed:
            self._acks[mid] = reason.value
            self._changed.notify_all()

    def _on_auth(self, client: AuthClient, code: int, properties: Properties) -> None:
        data = getattr(properties, "AuthenticationData", None)
        with self._changed:
            self.auths.append(AuthRecord(code, getattr(properties, "AuthenticationMethod",
                                                       None), data, time.time()))
            self._changed.notify_all()
        if code == CONTINUE_AUTHENTICATION and self.answer is not None and data:
            client.send_auth(CONTINUE_AUTHENTICATION, FW_TOKEN, self.answer(bytes(data)))

    # test-facing --------------------------------------------------------------------------

    def wait_connack(self) -> int:
        assert self.connack.wait(WAIT_SECONDS), "no CONNACK"
        assert self.connack_code is not None
        return self.connack_code

    def publish(self, topic: str, payload: bytes) -> int:
        """PUBLISH QoS 1 and wait for the PUBACK; its reason code."""
        info = self.client.publish(topic, payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        deadline = time.monotonic() + WAIT_SECONDS
        with self._changed:
            while info.mid not in self._acks:
                left = deadline - time.monotonic()
                assert left > 0 and not self.disconnected.is_set(), (
                    f"no PUBACK (disconnect {self.disconnect_code})")
                self._changed.wait(min(left, 0.1))
            return self._acks[info.mid]

    def reauthenticate(self, token: str) -> int | None:
        """AUTH 0x19 with a fresh token (§4.12.1); the server's final AUTH code (0x00), or
        None if the session ended instead (see ``disconnect_code``)."""
        seen = len(self.auths)
        self.client.send_auth(RE_AUTHENTICATE, FW_TOKEN, token.encode("ascii"))
        deadline = time.monotonic() + WAIT_SECONDS
        with self._changed:
            while True:
                done = [a for a in self.auths[seen:] if a.code != CONTINUE_AUTHENTICATION]
                if done:
                    return done[0].code
                if self.disconnected.is_set():
                    return None
                left = deadline - time.monotonic()
                assert left > 0, "no answer to the re-authentication"
                self._changed.wait(min(left, 0.1))

    def close(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
            self.disconnected.wait(WAIT_SECONDS)
        self.client.loop_stop()


def password_session(server: RunningServer, device_id: str, token: str,
                     key: ec.EllipticCurvePrivateKey | None = None, *, v5: bool = True,
                     identity: DeviceIdentity | None = None) -> TokenSession:
    """Connect with the token (and a proof by ``key``) in the password."""
    return TokenSession(server, device_id, v5=v5, identity=identity,
                        password=mqtt_password(server, token, key)).connect()


def fw_token_session(server: RunningServer, device_id: str, token: str,
                     key: ec.EllipticCurvePrivateKey | None = None, *,
                     identity: DeviceIdentity | None = None) -> TokenSession:
    """Connect with ``FW-TOKEN`` (v5 enhanced authentication), answering the challenge
    with a proof by ``key`` for a key-bound token."""
    answer = challenge_answer(server, token, key) if key is not None else None
    return TokenSession(server, device_id, identity=identity, auth_method=FW_TOKEN,
                        auth_data=token.encode("ascii"), answer=answer).connect()
