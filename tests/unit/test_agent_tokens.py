"""The agent's credentials besides the certificate (``fleetward.agent.tokens``, ``init``,
the MQTT AUTH packets), without a network: what the agent puts on the wire is checked by
PyJWT and by the server's own verifiers (``ProofVerifier``, ``AssertionVerifier``,
``check_sas``, the MQTT codec), independently of the code that made it.

Threats:
- a proof or assertion the server would refuse (wrong htu, a query in htu, no ath, no
  nonce, a long-lived assertion), or one that could be replayed (repeated jti);
- a token used after it expired (refresh scheduled after exp, or measured from the
  answer instead of the request), or fetched on every request (the token endpoint
  flooded by a fleet);
- a refused device that hammers the token endpoint, or a device that gives up for good
  because one token expired or was revoked (no fresh token before "refused");
- tokens, SAS tokens and the symmetric key in a repr, a log line or an exception;
- a device key on a PKCS#11 token that cannot sign assertions and proofs;
- a symmetric key read from a file others can read, or taken from argv;
- AUTH packets paho cannot send or read, encoded differently from what the server
  decodes.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

import fleetward.agent.run as run_module
from fleetward.agent import cli as agent_cli
from fleetward.agent.connect import ChannelRefused, Outbound, Outcome
from fleetward.agent.errors import AgentStateError, ServerUnreachable, TrustBootstrapFailed
from fleetward.agent.keystore import FileKeystore, Pkcs11Keystore
from fleetward.agent.mqtt_auth import (
    CONTINUE_AUTHENTICATION,
    RE_AUTHENTICATE,
    AuthClient,
    MalformedAuth,
    decode_auth,
    encode_auth,
)
from fleetward.agent.mqtt_client import EnhancedAuthUnsupported
from fleetward.agent.provision import InitOptions, init_device
from fleetward.agent.run import EXIT_REFUSED, RunOptions, Supervisor, pick_channel, run_agent
from fleetward.agent.state import (
    AgentConfig,
    KeystoreConfig,
    StateLayout,
    dump_config,
    ensure_state_dir,
    load_config,
    save_config,
)
from fleetward.agent.tokens import (
    ASSERTION_TYPE,
    SasProvider,
    SasToken,
    TokenEndpointRefused,
    TokenProvider,
    htu_of,
    make_assertion,
    make_proof,
    parse_symmetric_key,
    read_token_response,
    resolve_binding,
    token_endpoint_error,
)
from fleetward.agent.transport import HttpResponse
from fleetward.clock import FrozenClock
from fleetward.config import TokensConfig
from fleetward.crypto.sas import SasRefused, check_sas, parse_sas
from fleetward.edge.mqtt import codec
from fleetward.errors import InvalidInput
from fleetward.tokens.access import TokenRefused
from fleetward.tokens.assertion import PRIVATE_KEY_JWT, AssertionVerifier, DeviceKeys
from fleetward.tokens.dpop import ProofVerifier, TargetUri
from fleetward.tokens.replay import ReplayCache
from tests.softhsm import SOFTHSM_MODULE, softhsm_tokens
from tests.unit.test_agent_est_client import NOW, Pki
from tests.unit.test_agent_run import ListSource, ScriptedServer, ScriptedSession, readings
from tests.unit.test_agent_state import enrolled_file_state

CONFIG = TokensConfig()
HOST = "iot.example.com"
SERVER_URL = f"https://{HOST}:8443"
TOKEN_URL = f"{SERVER_URL}/oauth2/token"
MQTT_URL = f"mqtts://{HOST}:8883"
DEVICE = "dev-1"
FAST = {"reconnect_base_seconds": 0.01, "reconnect_cap_seconds": 0.05,
        "refusal_min_seconds": 0.05, "refusal_cap_seconds": 0.1}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The agent CLI configures structlog process-wide; other tests expect the defaults."""
    yield
    structlog.reset_defaults()


def epoch(clock: FrozenClock) -> int:
    return int(clock.now().timestamp())


def proofs(clock: FrozenClock) -> ProofVerifier:
    return ProofVerifier(ReplayCache(1000), CONFIG, clock, frozenset({HOST}))


def fake_jwt(claims: dict[str, Any]) -> str:
    """An access token's shape (the agent reads, never verifies, its payload)."""
    def seg(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{seg({'alg': 'ES256', 'typ': 'at+jwt'})}.{seg(claims)}.c2lnbmF0dXJl"


# --- assertion and proofs, checked by the server's verifiers -------------------------------


def test_the_assertion_is_what_rfc_7523_and_the_server_accept() -> None:
    clock = FrozenClock(NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    assertion = make_assertion(key, device_id=DEVICE, audience=TOKEN_URL, now=epoch(clock))
    claims = jwt.decode(assertion, key.public_key(), algorithms=["ES256"], audience=TOKEN_URL,
                        options={"verify_exp": False, "verify_iat": False})
    assert claims["iss"] == claims["sub"] == DEVICE
    assert 0 < claims["exp"] - claims["iat"] <= CONFIG.max_assertion_lifetime_seconds
    assert len(base64.urlsafe_b64decode(claims["jti"] + "==")) == 16  # 128 random bits
    verifier = AssertionVerifier(ReplayCache(100), CONFIG, clock, frozenset({TOKEN_URL}))
    client = verifier.verify(assertion, DEVICE,
                             lambda device: DeviceKeys(public_keys=(key.public_key(),)))
    assert (client.device_id, client.method) == (DEVICE, PRIVATE_KEY_JWT)
    # single use: the same assertion again is a replay; a new one is fine
    with pytest.raises(TokenRefused, match="used before"):
        verifier.verify(assertion, DEVICE, lambda d: DeviceKeys(public_keys=(key.public_key(),)))
    again = make_assertion(key, device_id=DEVICE, audience=TOKEN_URL, now=epoch(clock))
    verifier.verify(again, DEVICE, lambda d: DeviceKeys(public_keys=(key.public_key(),)))
    # negative control: another key is not the device's
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(TokenRefused, match="does not verify"):
        verifier.verify(make_assertion(other, device_id=DEVICE, audience=TOKEN_URL,
                                       now=epoch(clock)), DEVICE,
                        lambda d: DeviceKeys(public_keys=(key.public_key(),)))


def test_a_request_proof_names_method_url_without_query_and_the_token_hash() -> None:
    clock = FrozenClock(NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    token = fake_jwt({"sub": DEVICE})
    url = f"{SERVER_URL}/v1/commands?wait=20"
    proof = make_proof(key, method="GET", url=url, now=epoch(clock), access_token=token)
    header = jwt.get_unverified_header(proof)
    assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256"
    assert set(header["jwk"]) == {"crv", "kty", "x", "y"}  # the public key only
    claims = jwt.decode(proof, key.public_key(), algorithms=["ES256"])
    assert claims["htu"] == f"{SERVER_URL}/v1/commands"  # RFC 9449 §4.2: no query
    verifier = proofs(clock)
    target = TargetUri.parse(htu_of(url))
    checked = verifier.verify(proof, method="GET", target=target, access_token=token)
    assert checked.public_key.public_numbers() == key.public_key().public_numbers()
    fresh = make_proof(key, method="GET", url=url, now=epoch(clock), access_token=token)
    with pytest.raises(TokenRefused, match="used before"):  # a proof is single-use
        verifier.verify(proof, method="GET", target=target, access_token=token)
    with pytest.raises(TokenRefused, match="not POST"):  # negative: another method
        verifier.verify(fresh, method="POST", target=target, access_token=token)
    with pytest.raises(TokenRefused, match="ath"):  # negative: another token
        verifier.verify(make_proof(key, method="GET", url=url, now=epoch(clock),
                                   access_token=token), method="GET", target=target,
                        access_token=fake_jwt({"sub": "dev-2"}))


def test_the_token_endpoint_proof_carries_no_ath() -> None:
    clock = FrozenClock(NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    proof = make_proof(key, method="POST", url=TOKEN_URL, now=epoch(clock))
    assert "ath" not in jwt.decode(proof, options={"verify_signature": False})
    proofs(clock).verify(proof, method="POST", target=TargetUri.parse(TOKEN_URL),
                         access_token=None)


def test_a_connect_proof_answers_the_mqtt_challenge_with_its_nonce() -> None:
    clock = FrozenClock(NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    token = fake_jwt({"sub": DEVICE})
    challenge = secrets.token_bytes(32)
    # The server cannot know which of its names the device used: host "*" (edge).
    target = TargetUri("mqtts", "*", 8883, "/")
    verifier = proofs(clock)
    verifier.verify(make_proof(key, method="CONNECT", url=MQTT_URL, now=epoch(clock),
                               access_token=token, nonce=challenge),
                    method="CONNECT", target=target, access_token=token, nonce=challenge)
    with pytest.raises(TokenRefused, match="challenge"):  # negative: an old challenge
        verifier.verify(make_proof(key, method="CONNECT", url=MQTT_URL, now=epoch(clock),
                                   access_token=token, nonce=secrets.token_bytes(32)),
                        method="CONNECT", target=target, access_token=token,
                        nonce=challenge)


# --- the token endpoint, scripted -----------------------------------------------------------


@dataclass
class TokenEndpoint:
    """The token endpoint's side: records requests, answers with tokens of ``lifetime``
    (the clock moves by ``latency`` while it answers)."""

    clock: FrozenClock
    lifetime: int = 900
    latency: int = 0
    answers: list[HttpResponse] = field(default_factory=list)
    requests: list[tuple[dict[str, str], dict[str, str]]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    closed: int = 0

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> HttpResponse:
        assert (method, path) == ("POST", "/oauth2/token")
        form = dict(urllib.parse.parse_qsl((body or b"").decode(), strict_parsing=True))
        self.requests.append((form, dict(headers or {})))
        self.clock.advance(dt.timedelta(seconds=self.latency))
        if self.answers:
            return self.answers.pop(0)
        dpop = "DPoP" in (headers or {})
        token = fake_jwt({"sub": DEVICE, "jti": secrets.token_urlsafe(16),
                          "iat": epoch(self.clock), "exp": epoch(self.clock) + self.lifetime,
                          "fw_binding": "jkt" if dpop else "x5t#S256"})
        self.issued.append(token)
        return HttpResponse(200, {"content-type": "application/json"}, json.dumps({
            "access_token": token, "token_type": "DPoP" if dpop else "Bearer",
            "expires_in": self.lifetime, "scope": "telemetry:write"}).encode())

    def close(self) -> None:
        self.closed += 1


def key_provider(endpoint: TokenEndpoint, key: ec.EllipticCurvePrivateKey | None = None,
                 **kwargs: Any) -> TokenProvider:
    device_key = key or ec.generate_private_key(ec.SECP256R1())
    return TokenProvider(device_id=DEVICE, server_url=SERVER_URL, binding="key",
                         key=lambda: device_key, transport=lambda: endpoint,
                         clock=endpoint.clock, **kwargs)


def test_key_binding_asks_with_an_assertion_and_a_dpop_proof() -> None:
    endpoint = TokenEndpoint(FrozenClock(NOW))
    key = ec.generate_private_key(ec.SECP256R1())
    token = key_provider(endpoint, key).token()
    form, headers = endpoint.requests[0]
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert form["grant_type"] == "client_credentials"
    assert form["client_assertion_type"] == ASSERTION_TYPE
    assert "client_id" not in form  # the assertion names the client (RFC 7523 §3)
    proofs(endpoint.clock).verify(headers["DPoP"], method="POST",
                                  target=TargetUri.parse(TOKEN_URL), access_token=None)
    jwt.decode(form["client_assertion"], key.public_key(), algorithms=["ES256"],
               audience=TOKEN_URL, options={"verify_exp": False, "verify_iat": False})
    assert (token.token_type, token.binding) == ("DPoP", "jkt")
    assert endpoint.closed == 1  # one transport per request, closed


def test_certificate_binding_asks_with_client_id_over_mtls_only() -> None:
    endpoint = TokenEndpoint(FrozenClock(NOW))
    provider = TokenProvider(device_id=DEVICE, server_url=SERVER_URL, binding="certificate",
                             key=lambda: pytest.fail("the key is not needed"),
                             transport=lambda: endpoint, clock=endpoint.clock)
    token = provider.token()
    form, headers = endpoint.requests[0]
    assert form == {"grant_type": "client_credentials", "client_id": DEVICE}
    assert "DPoP" not in headers
    assert provider.http_headers("POST", "/v1/telemetry/t") == {
        "Authorization": f"Bearer {token.value}"}


def test_every_request_gets_a_fresh_dpop_proof_for_its_own_url() -> None:
    endpoint = TokenEndpoint(FrozenClock(NOW))
    provider = key_provider(endpoint)
    verifier = proofs(endpoint.clock)
    seen = set()
    for path in ("/v1/devices/self", "/v1/telemetry/reading", "/v1/commands?wait=20"):
        headers = provider.http_headers("GET", path)
        token = headers["Authorization"].removeprefix("DPoP ")
        assert token == endpoint.issued[0]
        target = TargetUri.parse(SERVER_URL + path.split("?")[0])
        proof = verifier.verify(headers["DPoP"], method="GET", target=target,
                                access_token=token)
        seen.add(proof.jti)
    assert len(seen) == 3 and len(endpoint.requests) == 1  # one token, three proofs


def test_a_token_is_refreshed_at_two_thirds_of_its_lifetime_and_not_before() -> None:
    clock = FrozenClock(NOW)
    endpoint = TokenEndpoint(clock, lifetime=900, latency=3)
    provider = key_provider(endpoint)
    first = provider.token()
    # measured from when the request was SENT: never later than the server's exp
    assert first.obtained_at == NOW.timestamp()
    assert first.expires_at == NOW.timestamp() + 900
    assert first.refresh_at == NOW.timestamp() + 600
    clock.advance(dt.timedelta(seconds=596))  # 599 s after the request
    assert provider.token() is first and len(endpoint.requests) == 1
    clock.advance(dt.timedelta(seconds=1))  # 600 s: due
    second = provider.token()
    assert second is not first and len(endpoint.requests) == 2
    assert second.value != first.value


def test_refresh_is_never_after_expiry_for_any_lifetime() -> None:
    for lifetime in (1, 2, 6, 60, 900, 3600):
        token = read_token_response(HttpResponse(200, {}, json.dumps({
            "access_token": fake_jwt({}), "token_type": "DPoP",
            "expires_in": lifetime}).encode()), obtained_at=1000.0)
        assert 1000.0 < token.refresh_at < token.expires_at == 1000.0 + lifetime


def test_the_token_endpoint_is_asked_once_by_concurrent_users() -> None:
    endpoint = TokenEndpoint(FrozenClock(NOW))
    provider = key_provider(endpoint)
    threads = [threading.Thread(target=provider.token) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(endpoint.requests) == 1


@pytest.mark.parametrize(("status", "body", "refused", "shown"), [
    (401, {"error": "invalid_client", "error_description": "device dev-1 is disabled"},
     True, "device dev-1 is disabled"),
    (400, {"error": "unauthorized_client", "error_description": "not active yet"},
     True, "not active yet"),
    (400, {"error": "invalid_scope", "error_description": "no scope"}, True, "no scope"),
    (400, {"error": "invalid_dpop_proof", "error_description": "iat outside the window"},
     False, "iat outside the window"),
    (503, {"error": "temporarily_unavailable"}, False, "temporarily_unavailable"),
    (502, "<html>bad gateway</html>", False, "HTTP 502"),
])
def test_token_endpoint_errors_are_refusals_only_when_an_operator_must_act(
        status: int, body: Any, refused: bool, shown: str) -> None:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
    error = token_endpoint_error(HttpResponse(status, {}, raw))
    assert isinstance(error, TokenEndpointRefused) is refused
    assert isinstance(error, ServerUnreachable) is not refused
    assert shown in error.message


@pytest.mark.parametrize("body", [
    {"token_type": "DPoP", "expires_in": 900},
    {"access_token": "", "token_type": "DPoP", "expires_in": 900},
    {"access_token": "a b.c", "token_type": "DPoP", "expires_in": 900},
    {"access_token": "x.y.z", "token_type": "mac", "expires_in": 900},
    {"access_token": "x.y.z", "token_type": "DPoP", "expires_in": "900"},
    {"access_token": "x.y.z", "token_type": "DPoP", "expires_in": True},
    {"access_token": "x.y.z", "token_type": "DPoP", "expires_in": 0},
    ["not", "an", "object"],
])
def test_an_unusable_token_answer_is_an_error_not_a_token(body: Any) -> None:
    with pytest.raises(ServerUnreachable):
        read_token_response(HttpResponse(200, {}, json.dumps(body).encode()),
                            obtained_at=0.0)


def test_an_unbound_token_for_a_key_bound_request_is_not_used() -> None:
    endpoint = TokenEndpoint(FrozenClock(NOW))
    endpoint.answers.append(HttpResponse(200, {}, json.dumps({
        "access_token": fake_jwt({}), "token_type": "Bearer", "expires_in": 300}).encode()))
    with pytest.raises(ServerUnreachable, match="asked for a DPoP token"):
        key_provider(endpoint).token()


# --- refusals: one fresh credential, then a refusal of the device ---------------------------


@pytest.mark.parametrize("reason", [
    "the access token has expired; get a new one",
    "the access token was revoked (the device's credentials changed since it was issued); "
    "get a new one",
    "access token revoked",
    "the symmetric key that signed the SAS token was rotated or revoked",
    "proof: the proof was used before (replay)",
])
def test_a_credential_refusal_gets_one_fresh_credential_then_counts(reason: str) -> None:
    endpoint = TokenEndpoint(FrozenClock(NOW))
    provider = key_provider(endpoint)
    first = provider.token()
    refusal = ChannelRefused("refused", code=0x86, reason=reason)
    assert provider.note_refusal(refusal) is True  # retry now, with a new token
    assert provider.token() is not first and len(endpoint.requests) == 2
    assert provider.note_refusal(refusal) is False  # the second is the device's
    provider.note_success()  # a session opened: the next refusal gets its retry again
    assert provider.note_refusal(refusal) is True


@pytest.mark.parametrize("refusal", [
    ChannelRefused("refused", code=0x87, reason="device dev-1 is disabled"),
    ChannelRefused("refused", code=0x8A, reason="the client certificate is not valid"),
    TokenEndpointRefused("refused", code=401, reason="the access token has expired"),
])
def test_a_refusal_of_the_device_gets_no_retry(refusal: ChannelRefused) -> None:
    endpoint = TokenEndpoint(FrozenClock(NOW))
    provider = key_provider(endpoint)
    first = provider.token()
    assert provider.note_refusal(refusal) is False
    assert provider.token() is first  # nothing invalidated


# --- SAS ------------------------------------------------------------------------------------


def test_sas_tokens_are_what_the_server_checks_and_are_refreshed_before_se() -> None:
    clock = FrozenClock(NOW)
    key = secrets.token_bytes(32)
    provider = SasProvider(device_id=DEVICE, host=HOST, key=key, clock=clock,
                           validity_seconds=3600)
    sas = provider.sas()
    parsed = parse_sas(sas.value)
    assert parsed.resource == f"{HOST}/devices/{DEVICE}"
    assert parsed.expiry == epoch(clock) + 3600 == sas.expires_at
    assert check_sas(parsed, DEVICE, [("primary", key, 1)], now=clock.now().timestamp(),
                     max_validity_seconds=CONFIG.max_sas_validity_seconds) == "primary"
    with pytest.raises(SasRefused):  # negative control: another key
        check_sas(parsed, DEVICE, [("primary", secrets.token_bytes(32), 1)],
                  now=clock.now().timestamp(), max_validity_seconds=86400)
    assert provider.http_headers("GET", "/v1/devices/self") == {"Authorization": sas.value}
    password = provider.mqtt_password(MQTT_URL)
    assert (password.username, password.password) == (DEVICE, sas.value)
    clock.advance(dt.timedelta(seconds=2399))
    assert provider.sas() is sas
    clock.advance(dt.timedelta(seconds=1))  # two thirds of an hour
    assert provider.sas() is not sas and provider.sas().expires_at > sas.expires_at


@pytest.mark.parametrize(("text", "match"), [
    (b"not base64 at all!", "not base64"),
    (base64.b64encode(b"short"), "5 bytes"),
])
def test_a_bad_symmetric_key_is_refused_without_showing_it(text: bytes, match: str) -> None:
    with pytest.raises(AgentStateError, match=match) as caught:
        parse_symmetric_key(text)
    assert text.decode() not in caught.value.message + caught.value.hint


# --- secrets stay secret -----------------------------------------------------------------------


def test_no_token_sas_or_key_in_reprs_or_logs() -> None:
    endpoint = TokenEndpoint(FrozenClock(NOW))
    key = secrets.token_bytes(32)
    with structlog.testing.capture_logs() as logs:
        provider = key_provider(endpoint)
        token = provider.token()
        headers = provider.http_headers("POST", "/v1/telemetry/t")
        password = provider.mqtt_password(MQTT_URL)
        sas_provider = SasProvider(device_id=DEVICE, host=HOST, key=key, clock=endpoint.clock)
        sas = sas_provider.sas()
    secrets_shown = [token.value, headers["DPoP"], password.password, sas.value,
                     base64.b64encode(key).decode(), parse_sas(sas.value).signature.hex()]
    texts = [repr(token), repr(provider), repr(password), repr(sas), repr(sas_provider),
             json.dumps(logs, default=str), json.dumps(token.status())]
    for text in texts:
        for secret in secrets_shown:
            assert secret not in text
    assert any(e["event"] == "access token obtained" for e in logs)  # logs were captured


# --- binding and channel choice ------------------------------------------------------------------


def config(auth: str = "token", binding: str = "auto", kind: str = "file") -> AgentConfig:
    keystore = (KeystoreConfig(kind="file", passphrase_file="/p") if kind == "file" else
                KeystoreConfig(kind="pkcs11", module="/m.so", token_label="t", pin_file="/p")
                if kind == "pkcs11" else KeystoreConfig(kind="none"))
    return AgentConfig(server_url=SERVER_URL, device_id=DEVICE, keystore=keystore, auth=auth,
                       token_binding=binding)


@pytest.mark.parametrize(("binding", "kind", "has_cert", "expected"), [
    ("auto", "file", True, "certificate"),  # mTLS works: bind to the certificate
    ("auto", "file", False, "key"),  # no certificate: DPoP
    ("auto", "pkcs11", True, "key"),  # Python's TLS cannot use the token key: DPoP
    ("key", "file", True, "key"),
    ("certificate", "pkcs11", True, "certificate"),  # curl over mTLS (HTTPS only)
])
def test_token_binding(binding: str, kind: str, has_cert: bool, expected: str) -> None:
    assert resolve_binding(config(binding=binding, kind=kind), kind, has_cert) == expected


def test_a_certificate_binding_without_a_certificate_is_refused() -> None:
    with pytest.raises(AgentStateError, match="no certificate"):
        resolve_binding(config(binding="certificate"), "file", False)


def test_without_a_client_certificate_mqtt_works_with_a_pkcs11_key() -> None:
    assert pick_channel(None, "pkcs11", client_certificate=False) == "mqtt"
    assert pick_channel("mqtt", "pkcs11", client_certificate=False) == "mqtt"
    with pytest.raises(InvalidInput):  # negative control: as the TLS client key
        pick_channel("mqtt", "pkcs11", client_certificate=True)


def test_agent_toml_keeps_the_auth_mode_and_old_files_stay_as_they_were(
        tmp_path: Path) -> None:
    layout = ensure_state_dir(tmp_path / "s")
    save_config(layout, config(auth="token", binding="key"))
    assert load_config(layout) == config(auth="token", binding="key")
    assert b"auth" not in dump_config(config(auth="mtls"))  # a part-1 file is unchanged
    with pytest.raises(AgentStateError, match="needs a key pair"):
        config(auth="token", kind="none")
    layout.config.write_text(layout.config.read_text().replace('"token"', '"kerberos"'))
    with pytest.raises(AgentStateError, match="unknown authentication mode"):
        load_config(layout)


# --- MQTT AUTH packets, against the server's codec -----------------------------------------------


def test_auth_packets_paho_sends_are_what_the_server_decodes() -> None:
    data = b"eyJ0b2tlbiI6MX0.x.y"
    for code in (RE_AUTHENTICATE, CONTINUE_AUTHENTICATION):
        packet = codec.decode_all(bytes(encode_auth(code, "FW-TOKEN", data)), codec.MQTT_5)[0]
        assert isinstance(packet, codec.Auth) and packet.reason_code == code
        assert packet.properties.authentication_method == "FW-TOKEN"
        assert packet.properties.authentication_data == data
    # a long token crosses the one-byte Remaining Length (Variable Byte Integer, §1.5.5)
    long = b"t" * 5000
    packet = codec.decode_all(bytes(encode_auth(RE_AUTHENTICATE, "FW-TOKEN", long)),
                              codec.MQTT_5)[0]
    assert isinstance(packet, codec.Auth) and packet.properties.authentication_data == long


def test_auth_packets_the_server_sends_are_what_paho_reads() -> None:
    challenge = secrets.token_bytes(32)
    wire = codec.encode(codec.Auth(CONTINUE_AUTHENTICATION, codec.Properties(
        authentication_method="FW-TOKEN", authentication_data=challenge)), codec.MQTT_5)
    assert decode_auth(wire[0], wire[2:]) == (CONTINUE_AUTHENTICATION, "FW-TOKEN", challenge)
    success = codec.encode(codec.Auth(0, codec.Properties(authentication_method="FW-TOKEN")),
                           codec.MQTT_5)
    assert decode_auth(success[0], success[2:]) == (0, "FW-TOKEN", None)
    assert decode_auth(0xF0, b"") == (0, None, None)  # §3.15.2.1: no reason code = 0x00
    with pytest.raises(MalformedAuth, match="reserved flags"):
        decode_auth(0xF1, wire[2:])
    with pytest.raises(MalformedAuth, match="not defined"):
        decode_auth(0xF0, b"\x87")


def test_the_paho_subclass_hands_auth_to_its_handler_and_queues_its_answers() -> None:
    from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

    client = AuthClient(CallbackAPIVersion.VERSION2, client_id=DEVICE,
                        protocol=MQTTProtocolVersion.MQTTv5)
    received: list[tuple[int, str | None, bytes | None]] = []
    client.on_auth = lambda *args: received.append(args)
    wire = codec.encode(codec.Auth(CONTINUE_AUTHENTICATION, codec.Properties(
        authentication_method="FW-TOKEN", authentication_data=b"nonce")), codec.MQTT_5)
    client._in_packet["command"] = wire[0]
    client._in_packet["packet"] = bytearray(wire[2:])
    assert client._packet_handle() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert received == [(CONTINUE_AUTHENTICATION, "FW-TOKEN", b"nonce")]
    # not connected: paho keeps the packet queued (and says so); connected, its network
    # thread writes it
    client.send_auth(CONTINUE_AUTHENTICATION, "FW-TOKEN", b"proof")
    queued = bytes(client._out_packet[-1]["packet"])
    assert codec.decode_all(queued, codec.MQTT_5) == [codec.Auth(
        CONTINUE_AUTHENTICATION, codec.Properties(authentication_method="FW-TOKEN",
                                                  authentication_data=b"proof"))]
    client.on_auth = None  # negative control: plain paho's answer, a protocol error
    client._in_packet["command"] = wire[0]
    client._in_packet["packet"] = bytearray(wire[2:])
    assert client._packet_handle() == MQTTErrorCode.MQTT_ERR_PROTOCOL


# --- keys on a PKCS#11 token sign assertions and proofs ------------------------------------------

TOKEN_LABEL = "fw-agent-tokens-unit"  # labels are per process: one token for this module


@pytest.fixture(scope="module")
def softhsm_pin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with softhsm_tokens(tmp_path_factory.mktemp("softhsm-tokens"), [TOKEN_LABEL]) as tokens:
        yield tokens.pin_file


def test_a_key_on_a_pkcs11_token_signs_assertions_and_proofs(
        tmp_path: Path, softhsm_pin: Path) -> None:
    layout = ensure_state_dir(tmp_path / "state")
    settings = AgentConfig(server_url=SERVER_URL, device_id=DEVICE, auth="token",
                           keystore=KeystoreConfig(kind="pkcs11", module=SOFTHSM_MODULE,
                                                   token_label=TOKEN_LABEL,
                                                   pin_file=str(softhsm_pin)))
    save_config(layout, settings)
    keystore = Pkcs11Keystore(layout, settings)
    keystore.create_pending()
    keystore.commit_pending()
    key = keystore.private_key()
    with pytest.raises(Exception):  # noqa: B017 - the key never leaves the token
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    clock = FrozenClock(dt.datetime.now(dt.UTC))
    endpoint = TokenEndpoint(clock)
    provider = TokenProvider(device_id=DEVICE, server_url=SERVER_URL, binding="key",
                             key=keystore.private_key, transport=lambda: endpoint, clock=clock)
    headers = provider.http_headers("POST", "/v1/telemetry/reading")
    form, token_headers = endpoint.requests[0]
    public = key.public_key()
    AssertionVerifier(ReplayCache(10), CONFIG, clock, frozenset({TOKEN_URL})).verify(
        form["client_assertion"], None, lambda d: DeviceKeys(public_keys=(public,)))
    verifier = proofs(clock)
    assert verifier.verify(token_headers["DPoP"], method="POST",
                           target=TargetUri.parse(TOKEN_URL),
                           access_token=None).public_key.public_numbers() == \
        public.public_numbers()
    verifier.verify(headers["DPoP"], method="POST",
                    target=TargetUri.parse(f"{SERVER_URL}/v1/telemetry/reading"),
                    access_token=headers["Authorization"].removeprefix("DPoP "))


# --- init ----------------------------------------------------------------------------------


def public_numbers(pem: bytes) -> ec.EllipticCurvePublicNumbers:
    key = serialization.load_pem_public_key(pem)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_numbers()


def ca_file(tmp_path: Path, pki: Pki) -> Path:
    path = tmp_path / "chain.pem"
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                              for c in (pki.issuing, pki.root)))
    return path


def key_file(tmp_path: Path, key: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "device.key.b64"
    path.write_text(base64.b64encode(key).decode() + "\n")
    path.chmod(mode)
    return path


def test_init_token_generates_a_key_pair_and_returns_its_public_key(tmp_path: Path) -> None:
    pki = Pki.create(dt.datetime.now(dt.UTC))
    state = tmp_path / "state"
    options = InitOptions(server_url=SERVER_URL, device_id=DEVICE, state_dir=state,
                          auth="token", ca_file=ca_file(tmp_path, pki))
    result = init_device(options)
    layout = StateLayout(state)
    saved = load_config(layout)
    assert (saved.auth, saved.keystore.kind, saved.mqtt_url) == ("token", "file",
                                                                 f"mqtts://{HOST}:8883")
    key = FileKeystore.from_config(layout, saved).private_key()
    assert result.public_key_pem is not None and result.created_key
    assert public_numbers(result.public_key_pem) == \
        key.public_key().public_numbers()
    assert not layout.cert.exists() and layout.key.stat().st_mode & 0o777 == 0o600
    again = init_device(options)  # run again: the same key, printed again
    assert again.public_key_pem == result.public_key_pem and not again.created_key


def test_init_sas_stores_the_key_0600_and_refuses_a_key_others_can_read(
        tmp_path: Path) -> None:
    pki = Pki.create(dt.datetime.now(dt.UTC))
    symmetric = secrets.token_bytes(32)
    options = InitOptions(server_url=SERVER_URL, device_id=DEVICE, state_dir=tmp_path / "s",
                          auth="sas", ca_file=ca_file(tmp_path, pki),
                          key_file=key_file(tmp_path, symmetric, 0o644))
    with pytest.raises(AgentStateError, match="readable by other users"):
        init_device(options)
    assert not (tmp_path / "s" / "agent.toml").exists()  # nothing written
    key_file(tmp_path, symmetric, 0o600)
    assert init_device(options).public_key_pem is None
    layout = StateLayout(tmp_path / "s")
    assert layout.symmetric_key.stat().st_mode & 0o777 == 0o600
    assert base64.b64decode(layout.symmetric_key.read_text()) == symmetric
    assert load_config(layout).keystore.kind == "none"


@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"auth": "mtls"}, InvalidInput, "--auth token or --auth sas"),
    ({"auth": "sas"}, InvalidInput, "--key-file"),
    ({"ca_file": None}, InvalidInput, "pinned"),
    ({"ca_fingerprint": b"\x00" * 32}, InvalidInput, "once"),
])
def test_init_refuses_incomplete_or_contradictory_options(
        tmp_path: Path, changes: dict[str, Any], error: type[Exception], match: str) -> None:
    pki = Pki.create(dt.datetime.now(dt.UTC))
    options = {"server_url": SERVER_URL, "device_id": DEVICE, "state_dir": tmp_path / "s",
               "auth": "token", "ca_file": ca_file(tmp_path, pki), **changes}
    with pytest.raises(error, match=match):
        init_device(InitOptions(**options))


def test_init_refuses_a_ca_file_with_a_leaf_and_another_device_s_state(tmp_path: Path) -> None:
    pki = Pki.create(dt.datetime.now(dt.UTC))
    leaf = pki.leaf(ec.generate_private_key(ec.SECP256R1()).public_key(), "server",
                    not_before=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1),
                    not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    bad = tmp_path / "leaf.pem"
    bad.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    options = InitOptions(server_url=SERVER_URL, device_id=DEVICE, state_dir=tmp_path / "s",
                          auth="token", ca_file=bad)
    with pytest.raises(TrustBootstrapFailed, match="not a CA"):
        init_device(options)
    init_device(InitOptions(server_url=SERVER_URL, device_id=DEVICE, state_dir=tmp_path / "s",
                            auth="token", ca_file=ca_file(tmp_path, pki)))
    from fleetward.errors import Conflict
    with pytest.raises(Conflict, match="belongs to device dev-1"):
        init_device(InitOptions(server_url=SERVER_URL, device_id="dev-2",
                                state_dir=tmp_path / "s", auth="token"))


def test_an_enrolled_device_switches_to_tokens_and_keeps_its_certificate_key(
        tmp_path: Path) -> None:
    pki = Pki.create()
    layout, keystore = enrolled_file_state(tmp_path / "state", pki)
    before = keystore.private_key().public_key().public_numbers()
    result = init_device(InitOptions(server_url="https://127.0.0.1:9", device_id="dev-1",
                                     state_dir=layout.root, auth="token"))
    assert not result.created_key and result.public_key_pem is not None
    assert public_numbers(result.public_key_pem) == before
    assert layout.cert.exists() and load_config(layout).auth == "token"


def test_run_auth_checks_what_the_mode_needs(tmp_path: Path) -> None:
    pki = Pki.create(dt.datetime.now(dt.UTC))
    state = tmp_path / "state"
    init_device(InitOptions(server_url=SERVER_URL, device_id=DEVICE, state_dir=state,
                            auth="token", ca_file=ca_file(tmp_path, pki)))
    layout = StateLayout(state)
    # (`run --auth` calls this before anything else; the command itself is not invoked
    # here: it installs signal handlers in the test process.)
    for mode, error, match in (("mtls", AgentStateError, "needs a certificate"),
                               ("sas", AgentStateError, "symmetric key"),
                               ("kerberos", InvalidInput, "unknown authentication mode")):
        with pytest.raises(error, match=match):
            agent_cli._save_auth(layout, mode, None)
    with pytest.raises(InvalidInput, match="unknown token binding"):
        agent_cli._save_auth(layout, None, "x5c")
    assert load_config(layout).auth == "token"  # unchanged
    agent_cli._save_auth(layout, None, "key")  # negative control: a valid change is saved
    assert load_config(layout).token_binding == "key"


def test_status_shows_the_auth_mode_and_the_token_but_never_the_token(tmp_path: Path) -> None:
    pki = Pki.create(dt.datetime.now(dt.UTC))
    state = tmp_path / "state"
    init_device(InitOptions(server_url=SERVER_URL, device_id=DEVICE, state_dir=state,
                            auth="token", ca_file=ca_file(tmp_path, pki)))
    runner = CliRunner()
    before = runner.invoke(agent_cli.app, ["status", "--state-dir", str(state)],
                           env={"COLUMNS": "200"})
    assert before.exit_code == 0, before.output
    assert "token (key-bound, DPoP)" in before.output and "none obtained yet" in before.output
    clock = FrozenClock(dt.datetime.now(dt.UTC))
    endpoint = TokenEndpoint(clock)
    provider = key_provider(endpoint, status_file=StateLayout(state).token_status)
    token = provider.token()
    shown = runner.invoke(agent_cli.app, ["status", "--state-dir", str(state)],
                          env={"COLUMNS": "200"}).output
    assert "jkt (DPoP key)" in shown and token.jti in shown
    expires = dt.datetime.fromtimestamp(token.expires_at, dt.UTC)
    assert f"{expires:%Y-%m-%d %H:%M:%S} UTC (valid)" in shown
    assert token.value not in shown and token.value.split(".")[2] not in shown
    assert StateLayout(state).token_status.stat().st_mode & 0o777 == 0o600
    assert token.value not in StateLayout(state).token_status.read_text()


# --- the supervisor with a credential ------------------------------------------------------


class CredentialSession(ScriptedSession):
    """A scripted session that can end the way token and SAS sessions end."""

    def __init__(self, server: ScriptedServer, supervisor: Supervisor) -> None:
        super().__init__(server, None)
        self.supervisor = supervisor
        self.credential_expired = False
        self.credential_due = False


def sas_state(tmp_path: Path) -> StateLayout:
    layout, _ = enrolled_file_state(tmp_path / "state", Pki.create())
    key_file_path = layout.symmetric_key
    key_file_path.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    key_file_path.chmod(0o600)
    settings = load_config(layout)
    save_config(layout, AgentConfig(server_url=settings.server_url,
                                    device_id=settings.device_id,
                                    keystore=settings.keystore, auth="sas"))
    return layout


def run_scripted(layout: StateLayout, server: ScriptedServer, records: Sequence[Any],
                 waits: list[float], **options: Any) -> Any:
    stop = threading.Event()
    result: list[Any] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        stop.wait(seconds)

    thread = threading.Thread(target=lambda: result.append(run_agent(
        layout, RunOptions(renew=False, **{**FAST, **options}), stop,
        source=ListSource(list(records)), clock=FrozenClock(NOW), wait=wait,
        open_session=server.open)), daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        stop.set()
        thread.join(10)
        raise AssertionError("run_agent did not finish")
    return result[0]


def credential_server(end: Any) -> ScriptedServer:
    """Sessions that deliver two records, then end as ``end(session, supervisor)`` says
    (the first session only)."""
    server = ScriptedServer()

    def open_session(sup: Supervisor) -> CredentialSession:
        server.attempts += 1
        session = CredentialSession(server, sup)
        server.sessions.append(session)
        return session

    def judge(session: ScriptedSession, message: Outbound) -> Outcome | None:
        if session is server.sessions[0] and len(server.received) == 2:
            assert isinstance(session, CredentialSession)
            end(session, session.supervisor)
            return Outcome.UNSENT
        return None

    server.open = open_session  # type: ignore[method-assign]
    server.judge_hook = judge
    return server


def test_disconnect_0xa0_gets_a_new_credential_and_reconnects_at_once(tmp_path: Path) -> None:
    """Expiry is not a failure and not a refusal: no backoff, no refusal count."""
    layout = sas_state(tmp_path)
    signed: list[SasToken] = []

    def expire(session: CredentialSession, sup: Supervisor) -> None:
        assert isinstance(sup.credentials, SasProvider)
        signed.append(sup.credentials.sas())
        session.credential_expired = True
        session.drop()

    server = credential_server(expire)
    waits: list[float] = []
    # MIN_CREDENTIAL_SESSION_SECONDS: a session ended by 0xA0 right after it opened is
    # backed off; this one is old enough
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "MIN_CREDENTIAL_SESSION_SECONDS", 0.0)
        stats = run_scripted(layout, server, readings(5), waits)
    assert server.seqs() == [1, 2, 3, 4, 5]
    assert (stats.connections, stats.refusals, waits) == (2, 0, [])
    second = server.sessions[1]
    assert isinstance(second, CredentialSession)
    credentials = second.supervisor.credentials
    assert isinstance(credentials, SasProvider)
    assert credentials.sas() is not signed[0]  # the expired one was dropped


def test_a_password_credential_due_for_refresh_reconnects_at_once(tmp_path: Path) -> None:
    layout = sas_state(tmp_path)

    def due(session: CredentialSession, sup: Supervisor) -> None:
        session.credential_due = True

    server = credential_server(due)
    waits: list[float] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "MIN_CREDENTIAL_SESSION_SECONDS", 0.0)
        stats = run_scripted(layout, server, readings(4), waits)
    assert server.seqs() == [1, 2, 3, 4]
    assert stats.connections == 2 and stats.refusals == 0 and waits == []
    # negative control: a credential due right after connecting (a lifetime too short
    # for the link) is backed off like a failure, never a tight reconnect loop
    server2 = credential_server(due)
    waits2: list[float] = []
    run_scripted(layout, server2, readings(4), waits2)
    assert len(waits2) == 1


def test_a_server_without_fw_token_gets_the_token_as_the_password(tmp_path: Path) -> None:
    """CONNACK 0x8C (bad authentication method) once: switch to the password, at once."""
    layout = sas_state(tmp_path)
    server = ScriptedServer()
    modes: list[bool] = []
    original = server.open

    def open_session(sup: Supervisor) -> ScriptedSession:
        modes.append(sup._enhanced_auth)
        if len(modes) == 1:
            raise EnhancedAuthUnsupported("CONNACK 0x8C")
        return original(sup)

    server.open = open_session  # type: ignore[method-assign]
    waits: list[float] = []
    stats = run_scripted(layout, server, readings(2), waits)
    assert modes == [True, False] and waits == [] and stats.refusals == 0
    assert server.seqs() == [1, 2]


def test_a_revoked_credential_is_replaced_once_then_the_refusal_counts(tmp_path: Path) -> None:
    layout = sas_state(tmp_path)
    revoked = ChannelRefused("DISCONNECT 0x98", code=0x98,
                             reason="the symmetric key that signed the SAS token was rotated "
                                    "or revoked")
    server = ScriptedServer()
    server.refuse_open = revoked
    with structlog.testing.capture_logs() as logs:
        stats = run_scripted(layout, server, readings(1), [], exit_on_refusal=True)
    # one immediate retry with a fresh SAS, then the refusal of the device
    assert server.attempts == 2 and stats.exit_code == EXIT_REFUSED
    assert [e["event"] for e in logs if "credential" in e["event"]] == [
        "the server refused the credential; retrying once with a new one"]
    # negative control: a refusal of the device itself gets no retry
    server2 = ScriptedServer()
    server2.refuse_open = ChannelRefused("0x87", code=0x87, reason="device dev-1 is disabled")
    stats2 = run_scripted(layout, server2, readings(1), [], exit_on_refusal=True)
    assert server2.attempts == 1 and stats2.exit_code == EXIT_REFUSED
