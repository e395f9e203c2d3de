"""``fleetward-agent`` with access tokens and SAS tokens against a real ``fleetward serve``
(one server for the module, with 6-second access tokens so that expiry and refresh happen
within a test): what the agent sent is read back through the admin API
(``GET /v1/devices/{id}/messages``).

Threats, each a case below:
- a device that can hold a key but not do mTLS (or whose key is on a PKCS#11 token) left
  without a secure channel — tokens bound to its key (DPoP) must carry its telemetry
  over HTTPS and MQTT, with no client certificate at all;
- a stolen-token window stretched because sessions outlive tokens: short tokens must be
  replaced in the live MQTT session (AUTH re-authentication) without dropping it, or by
  reconnecting before expiry (MQTT 3.1.1, SAS) — never by waiting for the server to cut;
- a device that gives up for good when one token expires or is revoked, or that hammers
  the token endpoint once the operator disabled it;
- a symmetric key on the command line or readable by other users.

Devices without a certificate get their key registered through the admin route
``POST /v1/devices/{id}/credentials`` (``{"kind": "public_key"}`` / ``{"kind":
"symmetric_key"}``); nothing is written into the server's database behind its back.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from fleetward.agent.keystore import open_keystore, pinned_ca_pem
from fleetward.agent.mqtt_client import MqttSession, MqttSettings
from fleetward.agent.run import RunOptions, RunStats, run_agent
from fleetward.agent.state import StateLayout, load_config, save_config
from fleetward.agent.telemetry import SimulatedSensor
from fleetward.agent.tokens import TokenProvider, make_credentials
from fleetward.agent.transport import client_tls_context
from fleetward.clock import SystemClock
from tests.conftest import RunningServer, start_server, stop_server
from tests.softhsm import SOFTHSM_MODULE, init_tokens

AGENT = [sys.executable, "-m", "fleetward.agent.cli"]
TOKEN_LIFETIME_SECONDS = 6  # refreshed at 4 s: a test sees several tokens
FAST = {"reconnect_base_seconds": 0.2, "reconnect_cap_seconds": 1.0,
        "refusal_min_seconds": 0.5, "refusal_cap_seconds": 1.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # unbound <= default <= max must hold; 6 s keeps several refreshes inside a test.
    s = start_server(tmp_path_factory.mktemp("agent-credentials") / "data", settings={
        "tokens": {"access_token_lifetime_seconds": TOKEN_LIFETIME_SECONDS,
                   "unbound_token_lifetime_seconds": TOKEN_LIFETIME_SECONDS}})
    yield s
    stop_server(s)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def agent(*args: str, timeout: float = 60,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ))


def device_url(server: RunningServer) -> str:
    return f"https://localhost:{server.device_port}"


def mqtt_url(server: RunningServer) -> str:
    return f"mqtts://localhost:{server.mqtt_port}"


def root_fingerprint(server: RunningServer) -> str:
    root = x509.load_pem_x509_certificate((server.data_dir / "certs/root-ca.pem").read_bytes())
    return root.fingerprint(hashes.SHA256()).hex()


def messages(server: RunningServer, device_id: str) -> list[dict[str, Any]]:
    with server.admin() as admin:
        response = admin.get(f"/v1/devices/{device_id}/messages", params={"limit": 200})
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items


def enrolled_agent(server: RunningServer, directory: Path, device_id: str) -> Path:
    """A device enrolled with a bootstrap token (it has a certificate)."""
    with server.admin() as admin:
        assert admin.post("/v1/devices", json={"id": device_id, "type": "default"}
                          ).status_code == 201
        issued = admin.post(f"/v1/devices/{device_id}/bootstrap-tokens", json={"ttl_hours": 1})
        assert issued.status_code == 201, issued.text
    token_file = directory / f"{device_id}.token"
    token_file.write_text(issued.json()["token"])
    token_file.chmod(0o600)
    state = directory / device_id
    result = agent("enroll", "--server", device_url(server), "--device-id", device_id,
                   "--token-file", str(token_file), "--state-dir", str(state),
                   "--ca-fingerprint", root_fingerprint(server))
    assert result.returncode == 0, result.stdout + result.stderr
    return state


def add_credential(server: RunningServer, device_id: str, body: dict[str, Any]
                   ) -> dict[str, Any]:
    """``POST /v1/devices/{id}/credentials`` then activate the device (registered devices
    get no tokens)."""
    with server.admin() as admin:
        added = admin.post(f"/v1/devices/{device_id}/credentials", json=body)
        assert added.status_code == 201, (
            f"POST /v1/devices/{device_id}/credentials answered {added.status_code}: "
            f"{added.text[:300]}")
        enabled = admin.post(f"/v1/devices/{device_id}/state", json={"state": "active"})
        assert enabled.status_code == 200, enabled.text
        result: dict[str, Any] = added.json()
        return result


def register(server: RunningServer, device_id: str) -> None:
    with server.admin() as admin:
        created = admin.post("/v1/devices", json={"id": device_id, "type": "default"})
        assert created.status_code == 201, created.text


def token_device(server: RunningServer, directory: Path, device_id: str,
                 *extra: str, env: dict[str, str] | None = None) -> Path:
    """``init --auth token`` (no certificate), its public key registered by the operator."""
    register(server, device_id)
    state = directory / device_id
    result = agent("init", "--server", device_url(server), "--device-id", device_id,
                   "--state-dir", str(state), "--ca-fingerprint", root_fingerprint(server),
                   "--auth", "token", "--mqtt-url", mqtt_url(server), *extra, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    pem = result.stdout
    assert pem.startswith("-----BEGIN PUBLIC KEY-----") and pem.count("BEGIN") == 1
    assert f"fleetward credential add --device {device_id} --kind public-key" in result.stderr
    add_credential(server, device_id, {"kind": "public_key", "public_key": pem})
    return state


def sas_device(server: RunningServer, directory: Path, device_id: str) -> Path:
    """``init --auth sas`` with the primary key the server showed once."""
    register(server, device_id)
    created = add_credential(server, device_id, {"kind": "symmetric_key"})
    key_file = directory / f"{device_id}.key"
    key_file.write_text(created["primary_key"] + "\n")
    key_file.chmod(0o600)
    state = directory / device_id
    result = agent("init", "--server", device_url(server), "--device-id", device_id,
                   "--state-dir", str(state), "--ca-file", str(server.chain),
                   "--auth", "sas", "--key-file", str(key_file), "--mqtt-url", mqtt_url(server))
    assert result.returncode == 0, result.stdout + result.stderr
    assert created["primary_key"] not in result.stdout + result.stderr
    return state


def run_in_process(state: Path, *, count: int, interval: float,
                   **options: Any) -> tuple[RunStats, list[dict[str, Any]]]:
    """``run`` in this process (its RunStats count the connections), with its logs."""
    stop = threading.Event()
    timer = threading.Timer(count * interval + 30, stop.set)  # a hung run still ends
    timer.start()
    try:
        with structlog.testing.capture_logs() as logs:
            stats = run_agent(StateLayout(state), RunOptions(
                count=count, interval_seconds=interval, renew=False, exit_on_refusal=True,
                **{**FAST, **options}), stop, source=SimulatedSensor(seed=3))
    finally:
        timer.cancel()
    return stats, [dict(e) for e in logs]


def events(logs: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    return [e for e in logs if text in e["event"]]


# --- an enrolled device (certificate) switches to access tokens ------------------------------


@pytest.mark.parametrize("channel", ["https", "mqtt"])
def test_an_enrolled_agent_sends_telemetry_with_certificate_bound_tokens(
        server: RunningServer, tmp_path: Path, channel: str) -> None:
    device_id = f"cred-enrolled-{channel}"
    state = enrolled_agent(server, tmp_path, device_id)
    assert messages(server, device_id) == []  # negative control
    result = agent("run", "--state-dir", str(state), f"--{channel}", "--auth", "token",
                   "--mqtt-url", mqtt_url(server), "--source", "sim", "--interval", "0.1",
                   "--count", "3", "--exit-on-refusal")
    assert result.returncode == 0, result.stderr
    assert '"binding": "x5t#S256"' in result.stderr  # tls_client_auth, bound to the cert
    rows = messages(server, device_id)
    assert len(rows) == 3 and {r["channel"] for r in rows} == {channel}
    status = agent("status", "--state-dir", str(state), env={**os.environ, "COLUMNS": "200"})
    assert "token (certificate-bound, Bearer over mTLS)" in status.stdout, status.stdout
    assert "x5t#S256 (certificate)" in status.stdout and "serial" in status.stdout
    assert load_config(StateLayout(state)).auth == "token"  # --auth was saved


@pytest.mark.parametrize("binding", ["certificate", "key"])
def test_the_mqtt_session_survives_token_expiry_by_re_authenticating(
        server: RunningServer, tmp_path: Path, binding: str) -> None:
    """≈ 14 s: the session must outlive two 6-second tokens. One connection throughout;
    each token replaced by AUTH 0x19 (a key-bound one answers the server's challenge with
    a proof carrying its nonce)."""
    device_id = f"cred-reauth-{binding}"
    state = enrolled_agent(server, tmp_path, device_id)
    layout = StateLayout(state)
    save_config(layout, dataclasses.replace(load_config(layout), auth="token",
                                            token_binding=binding, mqtt_url=mqtt_url(server)))
    stats, logs = run_in_process(state, count=35, interval=0.4, channel="mqtt")
    assert stats.exit_reason == "finished" and stats.delivered == 35
    assert stats.connections == 1 and stats.refusals == 0 and stats.backoffs == []
    assert len(events(logs, "re-authenticated with a new access token")) >= 2
    obtained = events(logs, "access token obtained")
    assert {e["binding"] for e in obtained} == {"x5t#S256" if binding == "certificate"
                                               else "jkt"}
    assert not events(logs, "credential expired")  # the server never had to cut
    assert len(messages(server, device_id)) == 35


# --- a device without a certificate: key-bound tokens (DPoP) -----------------------------------


def test_a_device_without_a_certificate_sends_telemetry_with_dpop_tokens(
        server: RunningServer, tmp_path: Path) -> None:
    device_id = "cred-dpop"
    state = token_device(server, tmp_path, device_id)
    layout = StateLayout(state)
    assert not layout.cert.exists()
    for channel in ("https", "mqtt"):
        result = agent("run", "--state-dir", str(state), f"--{channel}", "--source", "sim",
                       "--interval", "0.1", "--count", "3", "--exit-on-refusal")
        assert result.returncode == 0, result.stderr
        assert '"binding": "jkt"' in result.stderr
    rows = messages(server, device_id)
    assert sorted(r["channel"] for r in rows) == ["https"] * 3 + ["mqtt"] * 3
    status = agent("status", "--state-dir", str(state), env={**os.environ, "COLUMNS": "200"})
    assert "token (key-bound, DPoP)" in status.stdout and "jkt (DPoP key)" in status.stdout
    assert "none (this device authenticates without one)" in status.stdout


def test_https_tokens_are_replaced_before_they_expire(server: RunningServer,
                                                      tmp_path: Path) -> None:
    """≈ 9 s: longer than one 6-second token; every request carries a fresh proof and
    the token is replaced at 4 s without a single refusal."""
    state = token_device(server, tmp_path, "cred-https-refresh")
    stats, logs = run_in_process(state, count=18, interval=0.5, channel="https")
    assert stats.delivered == 18 and stats.connections == 1 and stats.refusals == 0
    assert len(events(logs, "access token obtained")) >= 2
    assert not events(logs, "refused")


def test_mqtt_3_1_1_reconnects_with_a_new_token_before_expiry(server: RunningServer,
                                                              tmp_path: Path) -> None:
    """≈ 9 s: without AUTH packets the token (and proof) is the password; the agent
    reconnects at the refresh point, at once, never after the server cut the session."""
    state = token_device(server, tmp_path, "cred-v311")
    stats, logs = run_in_process(state, count=18, interval=0.5, channel="mqtt",
                                 mqtt_version="3.1.1")
    assert stats.delivered == 18 and stats.refusals == 0
    assert stats.connections >= 2 and stats.backoffs == []
    assert events(logs, "reconnecting with a new credential before the current one expires")
    assert len(messages(server, "cred-v311")) == 18


def test_a_token_that_runs_out_ends_the_session_with_0xa0_not_a_refusal(
        server: RunningServer, tmp_path: Path) -> None:
    """≈ 7 s: a session that does not replace its token (password, MQTT 5) is ended by
    the server at expiry with DISCONNECT 0xA0: the agent reads "get a new credential",
    not "this device is refused"."""
    state = token_device(server, tmp_path, "cred-expiry")
    layout = StateLayout(state)
    config = load_config(layout)
    credentials = make_credentials(layout, config, open_keystore(layout, config),
                                   clock=SystemClock())
    assert isinstance(credentials, TokenProvider)
    session = MqttSession(config.device_id, MqttSettings(url=mqtt_url(server)),
                          client_tls_context(cadata=pinned_ca_pem(layout)), lambda c: None,
                          credentials=credentials, enhanced_auth=False)
    session.open()
    try:
        token = credentials.current()
        assert token is not None
        deadline = time.monotonic() + TOKEN_LIFETIME_SECONDS + 5
        while not session.lost and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session.lost and session.credential_expired
        assert session.refusal is None
        assert time.time() >= token.expires_at - 1  # not before the token ran out
    finally:
        session.close()


# --- revocation and refusal -------------------------------------------------------------


def test_revoked_tokens_are_replaced_once_and_the_session_goes_on(server: RunningServer,
                                                                  tmp_path: Path) -> None:
    """The operator revokes every token of the device (its generation moves on): the live
    session ends with DISCONNECT 0x98 "access token revoked", the agent gets one new
    token and reconnects at once — it is still the same, active device."""
    device_id = "cred-revoked"
    state = token_device(server, tmp_path, device_id)
    revoked = threading.Event()

    def revoke_when_connected() -> None:
        deadline = time.monotonic() + 20
        while len(messages(server, device_id)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        with server.admin() as admin:
            answer = admin.post(f"/v1/devices/{device_id}/access-tokens/revoke",
                                json={"reason": "test"})
            assert answer.status_code == 200, answer.text
        revoked.set()

    revoker = threading.Thread(target=revoke_when_connected, daemon=True)
    revoker.start()
    stats, logs = run_in_process(state, count=12, interval=0.3, channel="mqtt")
    revoker.join(10)
    assert revoked.is_set()
    assert stats.delivered == 12 and stats.refusals == 0 and stats.exit_code == 0
    assert stats.connections == 2
    assert events(logs, "refused the credential; retrying once with a new one")


def test_a_disabled_device_is_refused_by_the_token_endpoint_and_does_not_retry(
        server: RunningServer, tmp_path: Path) -> None:
    device_id = "cred-disabled"
    state = token_device(server, tmp_path, device_id)
    with server.admin() as admin:
        assert admin.post(f"/v1/devices/{device_id}/state",
                          json={"state": "disabled"}).status_code == 200
    result = agent("run", "--state-dir", str(state), "--https", "--source", "sim",
                   "--count", "1", "--exit-on-refusal")
    assert result.returncode == 4, result.stderr
    assert "is disabled" in result.stderr
    assert "retrying once" not in result.stderr  # the issuer said no: nothing to retry
    assert result.stderr.count("access token obtained") == 0


# --- SAS ------------------------------------------------------------------------------------------


def test_a_sas_device_sends_telemetry_over_https_and_mqtt(server: RunningServer,
                                                          tmp_path: Path) -> None:
    device_id = "cred-sas"
    state = sas_device(server, tmp_path, device_id)
    layout = StateLayout(state)
    assert layout.symmetric_key.stat().st_mode & 0o777 == 0o600
    for channel in ("https", "mqtt"):
        result = agent("run", "--state-dir", str(state), f"--{channel}", "--source", "sim",
                       "--interval", "0.1", "--count", "3", "--exit-on-refusal")
        assert result.returncode == 0, result.stderr
        assert "sig=" not in result.stderr  # the SAS is never logged
    rows = messages(server, device_id)
    assert sorted(r["channel"] for r in rows) == ["https"] * 3 + ["mqtt"] * 3
    status = agent("status", "--state-dir", str(state))
    assert "sas (SAS tokens from the symmetric key)" in status.stdout


def test_sas_sessions_reconnect_with_a_fresh_sas_before_se(server: RunningServer,
                                                           tmp_path: Path) -> None:
    """≈ 6 s: 3-second SAS tokens, replaced after 2 s by reconnecting."""
    state = sas_device(server, tmp_path, "cred-sas-short")
    stats, logs = run_in_process(state, count=12, interval=0.5, channel="mqtt",
                                 sas_validity_seconds=3)
    assert stats.delivered == 12 and stats.refusals == 0 and stats.backoffs == []
    assert stats.connections >= 2
    assert len(events(logs, "SAS token signed")) >= 2


# --- a key on a PKCS#11 token, over MQTT ------------------------------------------------

TOKEN_LABEL = "fw-agent-credentials"  # labels are per process: one token for this module


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    tokens = init_tokens(tmp_path_factory.mktemp("softhsm-credentials"), [TOKEN_LABEL])
    # Only the agent subprocesses use the token (SOFTHSM2_CONF in their environment):
    # this process's PKCS#11 library is never touched.
    return {**os.environ, "SOFTHSM2_CONF": str(tokens.conf)}, tokens.pin_file


def test_a_pkcs11_key_signs_the_tokens_of_an_mqtt_session(
        server: RunningServer, tmp_path: Path, softhsm: tuple[dict[str, str], Path]) -> None:
    """MQTT used to be impossible with a key on a token (Python's TLS needs a key file);
    with DPoP-bound tokens the token signs assertions and proofs and TLS needs no client
    key at all."""
    env, pin_file = softhsm
    device_id = "cred-pkcs11"
    state = token_device(server, tmp_path, device_id, "--pkcs11-module", SOFTHSM_MODULE,
                         "--pkcs11-token-label", TOKEN_LABEL, "--pkcs11-pin-file",
                         str(pin_file), env=env)
    config = load_config(StateLayout(state))
    assert config.keystore.kind == "pkcs11" and config.keystore.key_label
    assert not StateLayout(state).key.exists()  # no key file anywhere
    result = agent("run", "--state-dir", str(state), "--mqtt", "--source", "sim",
                   "--interval", "0.1", "--count", "3", "--exit-on-refusal", env=env)
    assert result.returncode == 0, result.stderr
    assert '"binding": "jkt"' in result.stderr
    assert [r["channel"] for r in messages(server, device_id)] == ["mqtt"] * 3


def test_the_symmetric_key_is_never_taken_from_argv_or_a_shared_file(
        server: RunningServer, tmp_path: Path) -> None:
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    shared = tmp_path / "shared.key"
    shared.write_text(key + "\n")
    shared.chmod(0o644)
    result = agent("init", "--server", device_url(server), "--device-id", "cred-sas-shared",
                   "--state-dir", str(tmp_path / "s"), "--ca-file", str(server.chain),
                   "--auth", "sas", "--key-file", str(shared))
    assert result.returncode == 1 and "readable by other users" in result.stderr
    assert key not in result.stdout + result.stderr
    assert not (tmp_path / "s" / "symmetric-key").exists()
    no_flag = agent("init", "--help")
    assert "--key " not in no_flag.stdout and "--key-file" in no_flag.stdout
