"""Acceptance 2: a stolen token is useless without the device's key.

Threat: an attacker copies a device's access token (from a log, a proxy, a memory dump
of a gateway) and presents it. A certificate-bound token (``cnf.x5t#S256``, RFC 8705)
must be refused over any connection that does not present *that* certificate — the
thief's own valid device certificate included; a key-bound token (``cnf.jkt``,
RFC 9449) must be refused without a fresh proof signed by that key, for this method and
this URL, used once. Each refusal is preceded by its accepted control: the same token,
presented correctly, on the same server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import RunningServer, start_server, stop_server
from tests.integration.channel_helpers import DeviceIdentity, make_device
from tests.integration.token_helpers import (
    BAD_USER_NAME_OR_PASSWORD,
    FW_TOKEN,
    TOKEN_PATH,
    TokenSession,
    bearer_get,
    device_url,
    dpop_get,
    dpop_proof,
    fw_token_session,
    https,
    load_key,
    mqtt_uri,
    new_key,
    password_session,
    request_token,
    token_by_dpop,
    token_by_mtls,
    token_endpoint,
)

SELF = "/v1/devices/self"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("tokens-binding") / "data"
    s = start_server(data_dir)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def victim(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> DeviceIdentity:
    return make_device(server, tmp_path_factory.mktemp("victim"), "bind-victim")


@pytest.fixture(scope="module")
def thief(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> DeviceIdentity:
    """A device of the same fleet with its own valid certificate: the strongest thief."""
    return make_device(server, tmp_path_factory.mktemp("thief"), "bind-thief")


@pytest.fixture(scope="module")
def cert_token(server: RunningServer, victim: DeviceIdentity) -> str:
    return token_by_mtls(server, victim)


@pytest.fixture(scope="module")
def dpop_key(victim: DeviceIdentity) -> ec.EllipticCurvePrivateKey:
    return load_key(victim)


@pytest.fixture(scope="module")
def dpop_token(server: RunningServer, victim: DeviceIdentity,
               dpop_key: ec.EllipticCurvePrivateKey) -> str:
    return token_by_dpop(server, victim, dpop_key)


def _session_code(session: TokenSession) -> tuple[int, str | None]:
    code = session.wait_connack()
    reason = session.connack_reason
    session.close()
    return code, reason


# --- certificate-bound tokens --------------------------------------------------------------


@pytest.mark.parametrize("presented", ["thiefs-certificate", "no-certificate"])
def test_certificate_bound_token_over_https_needs_its_certificate(
        server: RunningServer, victim: DeviceIdentity, thief: DeviceIdentity,
        cert_token: str, presented: str) -> None:
    """RFC 8705 §3: the device API compares cnf.x5t#S256 with the certificate on this
    connection; a valid certificate of another device does not do."""
    assert bearer_get(server, SELF, cert_token, victim).status_code == 200  # control
    response = bearer_get(server, SELF, cert_token,
                          thief if presented == "thiefs-certificate" else None)
    assert response.status_code == 401, response.text
    challenge = response.headers.get("WWW-Authenticate", "")
    assert challenge.startswith('Bearer error="invalid_token"'), challenge
    assert "bound to a certificate" in response.json()["detail"]


@pytest.mark.parametrize("presented", ["thiefs-certificate", "no-certificate"])
@pytest.mark.parametrize("how", ["password", "fw-token"])
def test_certificate_bound_token_over_mqtt_needs_its_certificate(
        server: RunningServer, victim: DeviceIdentity, thief: DeviceIdentity,
        cert_token: str, presented: str, how: str) -> None:
    """The same over MQTT 5, in the password and by FW-TOKEN: CONNACK 0x86 (bad
    credentials), with the client id and user name of the victim."""
    def connect(identity: DeviceIdentity | None) -> TokenSession:
        if how == "password":
            return password_session(server, victim.device_id, cert_token, identity=identity)
        return fw_token_session(server, victim.device_id, cert_token, identity=identity)

    assert _session_code(connect(victim))[0] == 0  # control
    code, reason = _session_code(connect(thief if presented == "thiefs-certificate"
                                         else None))
    assert code == BAD_USER_NAME_OR_PASSWORD, reason
    assert reason is not None and "bound to a certificate" in reason


# --- key-bound (DPoP) tokens over HTTPS -----------------------------------------------------


def _https_with(server: RunningServer, token: str, *, scheme: str = "DPoP",
                proofs: list[str] | None = None) -> Any:
    headers: list[tuple[str, str]] = [("Authorization", f"{scheme} {token}")]
    headers += [("DPoP", p) for p in proofs or []]
    with https(server) as client:
        return client.get(SELF, headers=headers)


# attack name -> (what is sent given (token, key, the control's proof), error expected)
HttpAttack = Callable[[RunningServer, str, ec.EllipticCurvePrivateKey, str],
                      tuple[str, list[str]]]
HTTP_ATTACKS: dict[str, tuple[HttpAttack, str]] = {
    "no-proof": (lambda s, t, k, used: ("DPoP", []), "invalid_dpop_proof"),
    "sent-as-bearer": (lambda s, t, k, used: ("Bearer", []), "invalid_token"),
    "replayed-proof": (lambda s, t, k, used: ("DPoP", [used]), "invalid_dpop_proof"),
    "proof-for-another-url": (lambda s, t, k, used: ("DPoP", [dpop_proof(
        k, "GET", device_url(s, "/v1/commands"), token=t)]), "invalid_dpop_proof"),
    "proof-for-another-method": (lambda s, t, k, used: ("DPoP", [dpop_proof(
        k, "POST", device_url(s, SELF), token=t)]), "invalid_dpop_proof"),
    "proof-by-another-key": (lambda s, t, k, used: ("DPoP", [dpop_proof(
        new_key(), "GET", device_url(s, SELF), token=t)]), "invalid_token"),
    "proof-for-another-token": (lambda s, t, k, used: ("DPoP", [dpop_proof(
        k, "GET", device_url(s, SELF), token=t + "x")]), "invalid_dpop_proof"),
    "stale-proof": (lambda s, t, k, used: ("DPoP", [dpop_proof(
        k, "GET", device_url(s, SELF), token=t, iat=int(time.time()) - 600)]),
        "invalid_dpop_proof"),
    "two-proofs": (lambda s, t, k, used: ("DPoP", [dpop_proof(
        k, "GET", device_url(s, SELF), token=t), dpop_proof(
        k, "GET", device_url(s, SELF), token=t)]), "invalid_dpop_proof"),
}


@pytest.mark.parametrize("attack", list(HTTP_ATTACKS))
def test_dpop_bound_token_over_https_needs_a_fresh_proof_by_its_key(
        server: RunningServer, dpop_token: str, dpop_key: ec.EllipticCurvePrivateKey,
        attack: str) -> None:
    """RFC 9449 §4.3, §7.1: the proof must be signed by the key cnf.jkt names, for this
    method and URL (htm, htu), for this token (ath), recent (iat) and unused (jti).
    Refusals are 401 with a DPoP challenge and the error that says what to fix."""
    control = dpop_proof(dpop_key, "GET", device_url(server, SELF), token=dpop_token)
    assert _https_with(server, dpop_token, proofs=[control]).status_code == 200
    make, error = HTTP_ATTACKS[attack]
    scheme, proofs = make(server, dpop_token, dpop_key, control)
    response = _https_with(server, dpop_token, scheme=scheme, proofs=proofs)
    assert response.status_code == 401, response.text
    challenge = response.headers.get("WWW-Authenticate", "")
    assert challenge.startswith(f'DPoP error="{error}"'), challenge
    assert 'algs="ES256"' in challenge  # RFC 9449 §7.1: the algorithms it takes


def test_dpop_bound_token_needs_no_certificate_but_a_certificate_does_not_replace_the_proof(
        server: RunningServer, victim: DeviceIdentity, dpop_token: str,
        dpop_key: ec.EllipticCurvePrivateKey) -> None:
    """Over mTLS with the victim's own certificate, a DPoP-bound token still needs its
    proof: the binding is to the key, not to whatever the connection shows."""
    assert dpop_get(server, SELF, dpop_token, dpop_key).status_code == 200  # control
    with https(server, victim) as client:
        response = client.get(SELF, headers={"Authorization": f"DPoP {dpop_token}"})
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith('DPoP error="invalid_dpop_proof"')


# --- key-bound tokens over MQTT: the password ------------------------------------------------


MqttAttack = Callable[[RunningServer, str, ec.EllipticCurvePrivateKey, str], str]
PASSWORD_ATTACKS: dict[str, MqttAttack] = {
    "no-proof": lambda s, t, k, used: t,
    "replayed-password": lambda s, t, k, used: used,
    "proof-for-another-port": lambda s, t, k, used: f"{t} " + dpop_proof(
        k, "CONNECT", f"mqtts://localhost:{s.device_port}", token=t),
    "proof-for-https": lambda s, t, k, used: f"{t} " + dpop_proof(
        k, "POST", mqtt_uri(s), token=t),
    "proof-by-another-key": lambda s, t, k, used: f"{t} " + dpop_proof(
        new_key(), "CONNECT", mqtt_uri(s), token=t),
    "proof-for-another-token": lambda s, t, k, used: f"{t} " + dpop_proof(
        k, "CONNECT", mqtt_uri(s), token=t + "x"),
}


@pytest.mark.parametrize("attack", list(PASSWORD_ATTACKS))
def test_dpop_bound_token_in_the_mqtt_password_needs_a_fresh_proof(
        server: RunningServer, victim: DeviceIdentity, dpop_token: str,
        dpop_key: ec.EllipticCurvePrivateKey, attack: str) -> None:
    """``<token> <proof>`` with htm CONNECT and htu the MQTT URI (docs/credentials.md):
    the same password twice, a proof for another endpoint or key or token, or no proof:
    CONNACK 0x86. No client certificate anywhere: the proof is the only possession."""
    control = f"{dpop_token} " + dpop_proof(dpop_key, "CONNECT", mqtt_uri(server),
                                            token=dpop_token)
    assert _session_code(TokenSession(server, victim.device_id,
                                      password=control).connect())[0] == 0
    password = PASSWORD_ATTACKS[attack](server, dpop_token, dpop_key, control)
    code, reason = _session_code(TokenSession(server, victim.device_id,
                                              password=password).connect())
    assert code == BAD_USER_NAME_OR_PASSWORD, (code, reason)
    assert reason


# --- key-bound tokens over MQTT: FW-TOKEN challenge -------------------------------------------


ChallengeAttack = Callable[[RunningServer, str, ec.EllipticCurvePrivateKey, bytes], bytes]
CHALLENGE_ATTACKS: dict[str, ChallengeAttack] = {
    "proof-without-the-nonce": lambda s, t, k, c: dpop_proof(
        k, "CONNECT", mqtt_uri(s), token=t).encode(),
    "proof-for-another-challenge": lambda s, t, k, c: dpop_proof(
        k, "CONNECT", mqtt_uri(s), token=t, nonce=bytes(32)).encode(),
    "proof-by-another-key": lambda s, t, k, c: dpop_proof(
        new_key(), "CONNECT", mqtt_uri(s), token=t, nonce=c).encode(),
    "empty-answer": lambda s, t, k, c: b"",
}


@pytest.mark.parametrize("attack", list(CHALLENGE_ATTACKS))
def test_fw_token_challenge_needs_a_proof_carrying_the_nonce(
        server: RunningServer, victim: DeviceIdentity, dpop_token: str,
        dpop_key: ec.EllipticCurvePrivateKey, attack: str) -> None:
    """MQTT 5 enhanced authentication: a key-bound token gets AUTH 0x18 with a random
    challenge; only a proof by that key with nonce = base64url(challenge) opens the
    session (a proof recorded from another exchange cannot answer a new challenge)."""
    control = fw_token_session(server, victim.device_id, dpop_token, dpop_key)
    assert control.wait_connack() == 0
    assert control.connack_auth_method == FW_TOKEN
    assert [a.code for a in control.auths] == [0x18]
    assert control.auths[0].data is not None and len(control.auths[0].data) == 32
    control.close()

    make = CHALLENGE_ATTACKS[attack]
    session = TokenSession(
        server, victim.device_id, auth_method=FW_TOKEN, auth_data=dpop_token.encode(),
        answer=lambda challenge: make(server, dpop_token, dpop_key, challenge)).connect()
    code, reason = _session_code(session)
    assert code == BAD_USER_NAME_OR_PASSWORD, (code, reason)
    assert [a.code for a in session.auths] == [0x18]  # challenged, then refused


# --- the token endpoint's own proof -------------------------------------------------------


def test_token_endpoint_refuses_a_replayed_dpop_proof(
        server: RunningServer, victim: DeviceIdentity) -> None:
    """A DPoP proof sent to the token endpoint is single-use too: replaying a captured
    request (with a fresh assertion) must not mint a token bound to the victim's key."""
    key = load_key(victim)
    proof = dpop_proof(key, "POST", token_endpoint(server))
    form = {"grant_type": "client_credentials", "client_id": victim.device_id}
    with https(server, victim) as client:
        first = client.post(TOKEN_PATH, data=form, headers={"DPoP": proof})
        assert first.status_code == 200, first.text  # control
        assert first.json()["token_type"] == "DPoP"
        again = client.post(TOKEN_PATH, data=form, headers={"DPoP": proof})
    assert again.status_code == 400, again.text
    assert again.json()["error"] == "invalid_dpop_proof"
    assert again.headers["Cache-Control"] == "no-store"


def test_token_endpoint_refuses_a_thiefs_certificate_for_the_victims_client_id(
        server: RunningServer, victim: DeviceIdentity, thief: DeviceIdentity) -> None:
    """tls_client_auth: the certificate names the client; claiming another client_id
    with it is ``invalid_client`` (RFC 8705 §2), not a token for the victim."""
    assert request_token(server, identity=victim).status_code == 200  # control
    response = request_token(server, identity=thief, client_id=victim.device_id)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_client"
    stolen_key = load_key(thief)  # an assertion for the victim signed by the thief's key
    response = request_token(server, assertion_of=(victim.device_id, stolen_key),
                             dpop_key=stolen_key)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_client"
