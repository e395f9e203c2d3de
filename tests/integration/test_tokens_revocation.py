"""Acceptance 3: an operator's decision ends a device's tokens within a second.

Threat: a device is stolen, cloned or misbehaving; the operator revokes its certificate
or disables, quarantines, compromises or retires it — and the tokens it already holds
(valid for 15 minutes) keep working, over HTTPS, over MQTT, in a session that is already
open, at introspecting resource servers, or simply by asking the token endpoint for
more. Revocation moves the device's credential generation on (``fw_gen``,
docs/credentials.md "Revocation"): every earlier token must be refused at once.

Each case uses a fresh device holding a certificate-bound token (mTLS) and a DPoP-bound
token (``private_key_jwt`` + DPoP, no client certificate), with a live MQTT session
authenticated by the DPoP-bound token (FW-TOKEN). Everything is checked to work before
the admin call (the controls), and timed from the moment the admin call returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import RunningServer, start_server, stop_server
from tests.integration.channel_helpers import DeviceIdentity, make_device
from tests.integration.token_helpers import (
    ADMINISTRATIVE_ACTION,
    BANNED,
    bearer_get,
    claims_of,
    device_url,
    dpop_get,
    dpop_proof,
    fw_token_session,
    https,
    load_key,
    password_session,
    request_token,
    token_by_dpop,
    token_by_mtls,
    wait_until,
    x5t_s256,
)

BUDGET_SECONDS = 1.0  # the acceptance bound: refused / closed within one second
SELF = "/v1/devices/self"
TELEMETRY = "/v1/telemetry/reading"
RECOVERY_SCOPES = "device:read ota:download"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("tokens-revocation") / "data"
    s = start_server(data_dir)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def introspection_key(server: RunningServer) -> str:
    """An API key with ``tokens:introspect`` (what a resource server holds)."""
    with server.admin() as admin:
        created = admin.post("/v1/api-keys", json={"name": "resource-server",
                                                   "scopes": ["tokens:introspect"]})
    assert created.status_code == 201, created.text
    key: str = created.json()["key"]
    return key


def introspect(server: RunningServer, api_key: str, token: str) -> dict[str, Any]:
    """RFC 7662 introspection on the device listener."""
    with https(server) as client:
        response = client.post("/oauth2/introspect", data={"token": token},
                               headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body: dict[str, Any] = response.json()
    return body


Change = Callable[[httpx.Client, DeviceIdentity], httpx.Response]


def _state(state: str) -> Change:
    def act(admin: httpx.Client, identity: DeviceIdentity) -> httpx.Response:
        return admin.post(f"/v1/devices/{identity.device_id}/state",
                          json={"state": state, "reason": "acceptance test"})
    return act


def _revoke_certificate(admin: httpx.Client, identity: DeviceIdentity) -> httpx.Response:
    return admin.post(f"/v1/certificates/{identity.serial_hex}/revoke",
                      json={"reason": "key_compromise"})


@dataclass(frozen=True)
class Scenario:
    name: str
    change: Change
    # What the token endpoint answers afterwards: an OAuth error, or None for a token
    # with the recovery scopes only (quarantine).
    token_error: str | None


SCENARIOS = [
    Scenario("revoke-certificate", _revoke_certificate, "invalid_client"),
    Scenario("disable", _state("disabled"), "invalid_client"),
    Scenario("quarantine", _state("quarantined"), None),
    Scenario("compromise", _state("compromised"), "invalid_client"),
    Scenario("retire", _state("retired"), "invalid_client"),
]


@dataclass
class Holder:
    """A device and the tokens it holds before the operator acts."""

    identity: DeviceIdentity
    key: ec.EllipticCurvePrivateKey
    cert_token: str
    dpop_token: str


def _holder(server: RunningServer, directory: Path, device_id: str) -> Holder:
    identity = make_device(server, directory, device_id)
    key = load_key(identity)
    return Holder(identity, key, token_by_mtls(server, identity),
                  token_by_dpop(server, identity, key))


def _refused_on_https(server: RunningServer, holder: Holder) -> list[httpx.Response]:
    """Both tokens on a route the device may reach in every state it can be in with a
    token (its own status is a recovery route); the refusals, or [] if one passed."""
    responses = [dpop_get(server, SELF, holder.dpop_token, holder.key),
                 bearer_get(server, SELF, holder.cert_token, holder.identity)]
    return responses if all(r.status_code != 200 for r in responses) else []


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_operator_decision_ends_outstanding_tokens_within_a_second(
        server: RunningServer, introspection_key: str, tmp_path: Path,
        scenario: Scenario) -> None:
    holder = _holder(server, tmp_path, f"revoke-{scenario.name}")
    device_id = holder.identity.device_id

    # Controls: every use of the tokens works before the change.
    assert dpop_get(server, SELF, holder.dpop_token, holder.key).status_code == 200
    assert bearer_get(server, SELF, holder.cert_token, holder.identity).status_code == 200
    live = fw_token_session(server, device_id, holder.dpop_token, holder.key)
    assert live.wait_connack() == 0
    assert live.publish(f"devices/{device_id}/telemetry/reading", b'{"t": 1}') == 0
    for token in (holder.dpop_token, holder.cert_token):
        answer = introspect(server, introspection_key, token)
        assert answer["active"] is True and answer["sub"] == device_id, answer
    assert introspect(server, introspection_key, holder.cert_token)["cnf"] == {
        "x5t#S256": x5t_s256(holder.identity.cert)}

    with server.admin() as admin:
        response = scenario.change(admin, holder.identity)
        assert response.status_code == 200, response.text
    changed_at = time.monotonic()

    # HTTPS: both tokens refused within the budget (measured from the call's return).
    refusals: list[httpx.Response] = []

    def both_refused() -> bool:
        refusals[:] = _refused_on_https(server, holder)
        return bool(refusals)

    assert wait_until(both_refused, BUDGET_SECONDS), (
        f"{scenario.name}: a token still works on HTTPS after {BUDGET_SECONDS} s")
    https_elapsed = time.monotonic() - changed_at
    for refused in refusals:
        body = refused.json()
        # 0x8A: the token itself is revoked (not merely the route closed to the state).
        assert body["reason_code"] == "0x8a", body
        assert "revoked" in body["detail"], body

    # The live MQTT session: DISCONNECT 0x98 (administrative action) within the budget.
    assert live.disconnected.wait(5), f"{scenario.name}: MQTT session not closed"
    assert live.disconnect_code == ADMINISTRATIVE_ACTION, live.disconnect_code
    assert live.disconnected_at - changed_at < BUDGET_SECONDS
    live.close()

    # A new MQTT CONNECT with the outstanding token and a fresh proof: 0x8A (banned).
    again = password_session(server, device_id, holder.dpop_token, holder.key)
    assert again.wait_connack() == BANNED, again.connack_reason
    assert again.connack_reason is not None and "revoked" in again.connack_reason
    again.close()
    assert https_elapsed < BUDGET_SECONDS

    # Resource servers that introspect learn it too.
    for token in (holder.dpop_token, holder.cert_token):
        assert introspect(server, introspection_key, token) == {"active": False}

    # And the device cannot simply fetch new ones.
    by_jwt = request_token(server, assertion_of=(device_id, holder.key),
                           dpop_key=holder.key)
    by_mtls = request_token(server, identity=holder.identity)
    if scenario.token_error is not None:
        for refused in (by_jwt, by_mtls):
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"] == scenario.token_error
    else:
        # Quarantine: a new token with the recovery scopes only; a request for more is
        # narrowed to them (not refused, docs/credentials.md "Scopes").
        narrowed = request_token(server, identity=holder.identity,
                                 scope="telemetry:write device:read")
        for granted, scope in ((by_jwt, RECOVERY_SCOPES), (by_mtls, RECOVERY_SCOPES),
                               (narrowed, "device:read")):
            assert granted.status_code == 200, granted.text
            assert granted.json()["scope"] == scope
        recovery = by_jwt.json()["access_token"]
        assert claims_of(recovery)["fw_gen"] > claims_of(holder.dpop_token)["fw_gen"]
        # Control: the route the old token was refused on is open to the new one...
        assert dpop_get(server, SELF, recovery, holder.key).status_code == 200
        # ...and nothing beyond recovery is.
        with https(server) as client:
            proof = dpop_proof(holder.key, "POST", device_url(server, TELEMETRY),
                               token=recovery)
            telemetry = client.post(TELEMETRY, json={"t": 1}, headers={
                "Authorization": f"DPoP {recovery}", "DPoP": proof})
        assert telemetry.status_code == 403, telemetry.text
        assert 'error="insufficient_scope"' in telemetry.headers["WWW-Authenticate"]


def test_tokens_stay_dead_after_the_device_is_enabled_again(
        server: RunningServer, introspection_key: str, tmp_path: Path) -> None:
    """docs/credentials.md: a token must not outlive the decision that took the device
    out of service, even if the operator switches it back on. New tokens work (the
    control), the old ones do not."""
    holder = _holder(server, tmp_path, "revoke-reenabled")
    device_id = holder.identity.device_id
    with server.admin() as admin:
        for state in ("disabled", "active"):
            response = admin.post(f"/v1/devices/{device_id}/state", json={"state": state})
            assert response.status_code == 200, response.text
    fresh = token_by_dpop(server, holder.identity, holder.key)
    assert dpop_get(server, SELF, fresh, holder.key).status_code == 200
    assert dpop_get(server, SELF, holder.dpop_token, holder.key).status_code != 200
    assert bearer_get(server, SELF, holder.cert_token, holder.identity).status_code != 200
    assert introspect(server, introspection_key, holder.dpop_token) == {"active": False}
    assert introspect(server, introspection_key, fresh)["active"] is True


def test_revoked_token_is_answered_as_an_invalid_token(
        server: RunningServer, tmp_path: Path) -> None:
    """RFC 6750 §3.1: "invalid_token — the access token provided is expired, revoked,
    malformed, or invalid for other reasons: 401". A client library reads the 401 and
    the challenge to fetch a new token; a 403 tells it to give up."""
    holder = _holder(server, tmp_path, "revoke-challenge")
    with server.admin() as admin:
        response = admin.post(f"/v1/devices/{holder.identity.device_id}/state",
                              json={"state": "disabled"})
        assert response.status_code == 200, response.text
    for refused, scheme in ((dpop_get(server, SELF, holder.dpop_token, holder.key), "DPoP"),
                            (bearer_get(server, SELF, holder.cert_token, holder.identity),
                             "Bearer")):
        assert refused.status_code == 401, refused.text
        assert refused.headers.get("WWW-Authenticate", "").startswith(
            f'{scheme} error="invalid_token"'), refused.headers
