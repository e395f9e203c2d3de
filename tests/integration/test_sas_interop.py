"""Acceptance 6: SAS tokens (symmetric device keys) interoperate with Azure IoT Hub's own
SDK, and everything that is not exactly a valid SAS for this device is refused
(docs/credentials.md "SAS tokens").

Every SAS here is made by an implementation nobody here wrote: ``azure-iot-device``'s
``RenewableSasToken`` with its ``SymmetricKeySigningMechanism``, run from the SDK's own
virtual environment (``.venv-azure``: the SDK pins paho-mqtt < 2, the project needs 2) with
the key on stdin, never in argv. A server that signs or parses the format differently
from Azure fails here, not only a server that disagrees with itself.

Threats, each a case below with an accepted control made the same way:

- a forged or tampered signature; a SAS past its ``se``; a SAS made to live for weeks
  (``se`` beyond ``[tokens] max_sas_validity_seconds``); a hub-policy SAS (``skn``);
- a device impersonating another: its own SAS presented under the other's name, the
  other's key used for its own resource, its key used for the other's resource, an
  Azure-style user name naming another device;
- a leaked key that is rotated or revoked but keeps working: new connections and the
  live sessions it signed must end (DISCONNECT 0x98), a session must not outlive its
  SAS (DISCONNECT 0xA0 at ``se``), while the other slot's devices carry on;
- a device written for Azure (user name ``<host>/<device>/?api-version=…``, topic
  ``devices/<id>/messages/events/[<property bag>]``) whose telemetry is silently dropped
  or typed wrongly;
- ``client_secret_jwt``: the unbound bearer token of a device without a key pair that
  is bound after all, lives longer than 300 s, or survives the revocation of the key
  that got it.

The full ``IoTHubDeviceClient`` is driven too. Its MQTT transport connects to port 8883,
hard-coded (azure/iot/device/common/mqtt_transport.py; no option names a port), so it
reaches the server's MQTT port through the SDK's own ``ProxyOptions``: an HTTP CONNECT
relay below passes the bytes unchanged (TLS runs end to end between the SDK and the
server, which the SDK verifies as ``localhost`` against our CA).

One server for the module; ≈ 15 s, most of it the server's start and one SAS that must
expire in real time (4 s).
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import REPO, RunningServer, need_service
from tests.integration.token_helpers import (
    ADMINISTRATIVE_ACTION,
    ASSERTION_TYPE,
    BAD_USER_NAME_OR_PASSWORD,
    BANNED,
    MAXIMUM_CONNECT_TIME,
    SUCCESS,
    TOKEN_PATH,
    TokenSession,
    claims_of,
    header_of,
    https,
    token_endpoint,
    wait_until,
)

AZURE_PYTHON = REPO / ".venv-azure" / "bin" / "python"
HOST = "localhost"  # the host part of sr and of the Azure user name (not compared)
API_VERSION = "2021-04-12"
MAX_SAS_VALIDITY_SECONDS = 86400  # [tokens] max_sas_validity_seconds (default)
UNBOUND_LIFETIME_SECONDS = 300  # [tokens] unbound_token_lifetime_seconds (default)
TTL_SECONDS = 600  # the controls' SAS lifetime
REVOCATION_BUDGET_SECONDS = 1.0  # docs: rotating or revoking ends sessions at once
SHORT_TTL_SECONDS = 4  # a SAS that expires while the test watches its session
# The session must end at se: not before, and not later than the server clock's
# one-second resolution plus delivery (as in test_mqtt_token_auth.py).
EXPIRY_SLACK_SECONDS = 1.5
SDK_TIMEOUT_SECONDS = 60.0
TOOL_TIMEOUT_SECONDS = 15.0

# The SDK's own SAS generator, in its own interpreter. Requests (with the keys) come on
# stdin as JSON; the SAS tokens go to stdout as JSON, in order.
AZURE_SAS_SCRIPT = """
import json, sys
from azure.iot.device.common.auth.sastoken import RenewableSasToken
from azure.iot.device.common.auth.signing_mechanism import SymmetricKeySigningMechanism
out = []
for r in json.load(sys.stdin):
    token = RenewableSasToken(r["uri"], SymmetricKeySigningMechanism(r["key"]),
                              key_name=r["key_name"], ttl=r["ttl"])
    out.append(str(token))
json.dump(out, sys.stdout)
"""

# The SDK's device client: connect with a connection string (key inside, so on stdin),
# send each message, shut down. Messages with a "type" get it as a custom property,
# which the SDK puts in the topic's property bag.
AZURE_CLIENT_SCRIPT = """
import json, sys
from azure.iot.device import IoTHubDeviceClient, Message, ProxyOptions
request = json.load(sys.stdin)
client = IoTHubDeviceClient.create_from_connection_string(
    request["connection_string"], server_verification_cert=request["ca_pem"],
    proxy_options=ProxyOptions("HTTP", "127.0.0.1", request["proxy_port"]),
    connection_retry=False, sastoken_ttl=600)
client.connect()
for m in request["messages"]:
    message = Message(json.dumps(m["payload"]), content_encoding="utf-8",
                      content_type="application/json")
    if m.get("type"):
        message.custom_properties["type"] = m["type"]
    client.send_message(message)
client.shutdown()
print("sent", len(request["messages"]))
"""


# --- the SDK, out of process -------------------------------------------------------------------


@pytest.fixture(scope="module")
def azure() -> Path:
    """The SDK's interpreter; missing fails under CI=true (``make test`` creates it)."""
    if not AZURE_PYTHON.exists():
        need_service(f"{AZURE_PYTHON} with azure-iot-device (make .venv-azure/.stamp)")
    return AZURE_PYTHON


@dataclass(frozen=True)
class SasRequest:
    device_id: str  # the resource: <HOST>/devices/<device_id>
    key: str  # base64, as the server showed it
    ttl: int = TTL_SECONDS
    key_name: str | None = None  # skn (a hub policy name in Azure)


def azure_sas(azure: Path, *requests: SasRequest) -> list[str]:
    """SAS tokens from the SDK's ``RenewableSasToken``, in one run of its interpreter."""
    stdin = json.dumps([{"uri": f"{HOST}/devices/{r.device_id}", "key": r.key, "ttl": r.ttl,
                         "key_name": r.key_name} for r in requests])
    result = subprocess.run([str(azure), "-c", AZURE_SAS_SCRIPT], input=stdin,
                            capture_output=True, text=True, timeout=SDK_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr[-2000:]
    tokens: list[str] = json.loads(result.stdout)
    assert len(tokens) == len(requests)
    return tokens


def sas_fields(sas: str) -> dict[str, str]:
    """``sr``, ``sig``, ``se`` (and ``skn``) as sent (URL-encoded)."""
    prefix = "SharedAccessSignature "
    assert sas.startswith(prefix), sas[:40]
    return dict(part.split("=", 1) for part in sas.removeprefix(prefix).split("&"))


def expiry_of(sas: str) -> int:
    return int(sas_fields(sas)["se"])


def tampered(sas: str) -> str:
    """The same SAS with one bit of its HMAC flipped (still well-formed base64)."""
    fields = sas_fields(sas)
    digest = bytearray(base64.b64decode(urllib.parse.unquote(fields["sig"])))
    digest[0] ^= 0x01
    forged = urllib.parse.quote(base64.b64encode(bytes(digest)).decode(), safe="")
    return sas.replace(f"sig={fields['sig']}", f"sig={forged}")


def azure_username(device_id: str) -> str:
    """Azure IoT Hub's MQTT user name (what its SDKs send)."""
    return f"{HOST}/{device_id}/?api-version={API_VERSION}"


# --- devices with symmetric keys ---------------------------------------------------------------


@dataclass(frozen=True)
class SasDevice:
    device_id: str
    credential_id: str
    primary: str  # base64 keys, shown once
    secondary: str

    @property
    def events_topic(self) -> str:
        return f"devices/{self.device_id}/messages/events/"


def sas_device(server: RunningServer, device_id: str) -> SasDevice:
    """A registered device given a symmetric credential, then made active (a device
    without a certificate stays ``registered`` until an operator enables it)."""
    with server.admin() as admin:
        created = admin.post("/v1/devices", json={"id": device_id, "type": "default"})
        assert created.status_code == 201, created.text
        added = admin.post(f"/v1/devices/{device_id}/credentials", json={"kind": "symmetric_key"})
        assert added.status_code == 201, added.text
        enabled = admin.post(f"/v1/devices/{device_id}/state", json={"state": "active"})
        assert enabled.status_code == 200, enabled.text
    body = added.json()
    return SasDevice(device_id, body["id"], body["primary_key"], body["secondary_key"])


def messages(server: RunningServer, device_id: str) -> list[dict[str, Any]]:
    with server.admin() as admin:
        response = admin.get(f"/v1/devices/{device_id}/messages", params={"limit": 1000})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


# --- presenting a SAS ---------------------------------------------------------------------------


def sas_session(server: RunningServer, sas: str, device_id: str, *, username: str | None = None,
                v5: bool = True) -> TokenSession:
    """A paho connection with password = the SAS, client id = ``device_id``, user name =
    ``username`` (default: the device id), no client certificate."""
    return TokenSession(server, device_id, v5=v5, password=sas,
                        username=username if username is not None else device_id).connect()


def post_telemetry(server: RunningServer, sas: str, message_type: str,
                   payload: dict[str, Any]) -> httpx.Response:
    """``POST /v1/telemetry/<type>`` with ``Authorization: SharedAccessSignature …``, no
    client certificate."""
    with https(server) as client:
        return client.post(f"/v1/telemetry/{message_type}", json=payload,
                           headers={"Authorization": sas})


# --- acceptance: the SDK's SAS is accepted, telemetry lands -------------------------------------


def test_the_sdks_sas_is_accepted_over_mqtt_and_https_and_lands_in_the_sink(
        server: RunningServer, azure: Path) -> None:
    device = sas_device(server, "sas-accepted")
    sas, = azure_sas(azure, SasRequest(device.device_id, device.primary))
    fields = sas_fields(sas)
    # The SDK's form: sr URL-encoded (the server must verify the string as sent).
    assert fields["sr"] == f"{HOST}%2Fdevices%2F{device.device_id}" and "skn" not in fields
    assert messages(server, device.device_id) == []  # negative control for the reads below

    by_id = sas_session(server, sas, device.device_id)
    assert by_id.wait_connack() == SUCCESS, by_id.connack_reason
    assert by_id.publish(device.events_topic, b'{"n": 1}') == SUCCESS
    by_id.close()
    by_azure_name = sas_session(server, sas, device.device_id,
                                username=azure_username(device.device_id), v5=False)
    assert by_azure_name.wait_connack() == SUCCESS
    assert by_azure_name.publish(device.events_topic + "type=temperature", b'{"n": 2}') == 0
    by_azure_name.close()
    response = post_telemetry(server, sas, "temperature", {"n": 3})
    assert response.status_code == 202, response.text

    rows = messages(server, device.device_id)
    assert [(r["channel"], r["kind"], r["message_type"], r["payload"]) for r in rows] == [
        ("mqtt", "telemetry", "message", {"n": 1}),
        ("mqtt", "telemetry", "temperature", {"n": 2}),
        ("https", "telemetry", "temperature", {"n": 3})]


# --- refusals, each with its accepted control ----------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One presentation of a SAS. ``refused``: a piece of the reason the server must give
    (CONNACK Reason String / problem detail); None: it must be accepted."""

    sas: str
    client_id: str  # MQTT client id (the device it is presented as)
    refused: str | None
    username: str | None = None  # default: the client id
    channels: tuple[str, ...] = ("mqtt", "https")  # HTTPS reads the device from sr only


@dataclass
class Case:
    attempts: list[Attempt] = field(default_factory=list)


A, B = "sas-a", "sas-b"
NOT_MATCHING = "does not match"
OTHER_RESOURCE = "another resource"
CASE_NAMES = ("wrong-signature", "expired", "se-too-far-ahead", "skn-present",
              "other-devices-key", "other-devices-sas-as-this-device",
              "this-key-for-another-resource", "azure-username-of-another-device")


@pytest.fixture(scope="module")
def refusal_table(server: RunningServer, azure: Path) -> dict[str, Case]:
    """Every case's SAS tokens, made by the SDK in one run."""
    a, b = sas_device(server, A), sas_device(server, B)
    plan: dict[str, list[tuple[SasRequest, str, str | None, dict[str, Any]]]] = {
        # name: [(request, presented as, refused?, extra)], the control first.
        "wrong-signature": [(SasRequest(A, a.primary), A, None, {}),
                            (SasRequest(A, a.primary), A, NOT_MATCHING, {"tamper": True})],
        "expired": [(SasRequest(A, a.primary), A, None, {}),
                    (SasRequest(A, a.primary, ttl=-120), A, "expired", {})],
        "se-too-far-ahead": [
            (SasRequest(A, a.primary, ttl=MAX_SAS_VALIDITY_SECONDS - 600), A, None, {}),
            (SasRequest(A, a.primary, ttl=MAX_SAS_VALIDITY_SECONDS + 600), A,
             f"more than {MAX_SAS_VALIDITY_SECONDS} s", {})],
        "skn-present": [(SasRequest(A, a.primary), A, None, {}),
                        (SasRequest(A, a.primary, key_name="iothubowner"), A, "skn", {})],
        # B's key, A's resource: HTTPS and MQTT both see A's resource, B's signature.
        "other-devices-key": [(SasRequest(A, a.secondary), A, None, {}),
                              (SasRequest(A, b.primary), A, NOT_MATCHING, {})],
        # B's own valid SAS, presented over MQTT as A (HTTPS takes the device from sr,
        # so there it can only be B's: the control).
        "other-devices-sas-as-this-device": [
            (SasRequest(B, b.primary), B, None, {}),
            (SasRequest(B, b.primary), A, OTHER_RESOURCE, {"channels": ("mqtt",)})],
        # A's key signing B's resource: presented as A (wrong resource) or as B (wrong key).
        "this-key-for-another-resource": [
            (SasRequest(A, a.primary), A, None, {}),
            (SasRequest(B, a.primary), A, OTHER_RESOURCE, {"channels": ("mqtt",)}),
            (SasRequest(B, a.primary), B, NOT_MATCHING, {})],
        # A's valid SAS and client id, but the Azure user name names B.
        "azure-username-of-another-device": [
            (SasRequest(A, a.primary), A, None,
             {"username": azure_username(A), "channels": ("mqtt",)}),
            (SasRequest(A, a.primary), A, OTHER_RESOURCE,
             {"username": azure_username(B), "channels": ("mqtt",)})],
    }
    assert set(plan) == set(CASE_NAMES)
    flat = [(name, *row) for name, rows in plan.items() for row in rows]
    tokens = azure_sas(azure, *(request for _, request, *_ in flat))
    table: dict[str, Case] = {name: Case() for name in plan}
    for (name, _, client_id, refused, extra), sas in zip(flat, tokens, strict=True):
        if extra.get("tamper"):
            sas = tampered(sas)
        table[name].attempts.append(Attempt(sas, client_id, refused, extra.get("username"),
                                            extra.get("channels", ("mqtt", "https"))))
    return table


# HTTPS names the device by sr alone: presenting a SAS "as" another device is MQTT's.
MQTT_ONLY = ("other-devices-sas-as-this-device", "azure-username-of-another-device")
CASES = [(name, channel) for name in CASE_NAMES for channel in ("mqtt", "https")
         if channel == "mqtt" or name not in MQTT_ONLY]


@pytest.mark.parametrize(("case", "channel"), CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_a_sas_that_is_not_exactly_right_is_refused_and_its_control_accepted(
        server: RunningServer, refusal_table: dict[str, Case], case: str, channel: str) -> None:
    attempts = [a for a in refusal_table[case].attempts if channel in a.channels]
    assert attempts[0].refused is None, "every case starts with its accepted control"
    assert any(a.refused for a in attempts), f"{case}: nothing to refuse over {channel}"
    for attempt in attempts:
        if channel == "https":
            response = post_telemetry(server, attempt.sas, "check", {"case": case})
            if attempt.refused is None:
                assert response.status_code == 202, (case, response.text)
                continue
            assert response.status_code == 401, (case, response.text)
            assert response.headers["WWW-Authenticate"].startswith(
                'SharedAccessSignature error="invalid_token"'), response.headers
            assert attempt.refused in response.json()["detail"], (case, response.text)
            continue
        session = sas_session(server, attempt.sas, attempt.client_id, username=attempt.username)
        try:
            code = session.wait_connack()
            if attempt.refused is None:
                assert code == SUCCESS, (case, session.connack_reason)
                topic = f"devices/{attempt.client_id}/messages/events/"
                assert session.publish(topic, b'{"control": true}') == SUCCESS
            else:
                assert code == BAD_USER_NAME_OR_PASSWORD, (case, code, session.connack_reason)
                assert attempt.refused in (session.connack_reason or ""), (
                    case, session.connack_reason)
        finally:
            session.close()


# --- rotation and revocation end what the old key signed -----------------------------------------


def rotate(server: RunningServer, credential_id: str, slot: str) -> str:
    with server.admin() as admin:
        response = admin.post(f"/v1/credentials/{credential_id}/rotate", json={"slot": slot})
    assert response.status_code == 200, response.text
    key: str = response.json()["key"]
    return key


def test_rotating_the_primary_ends_what_it_signed_and_spares_the_secondary(
        server: RunningServer, azure: Path) -> None:
    """One client id per device (a second CONNECT takes the session over), so the
    primary's session is watched first, then the secondary's through another rotation
    of the primary."""
    device = sas_device(server, "sas-rotate")
    old_primary, secondary = azure_sas(azure, SasRequest(device.device_id, device.primary),
                                       SasRequest(device.device_id, device.secondary))
    on_primary = sas_session(server, old_primary, device.device_id)
    try:
        assert on_primary.wait_connack() == SUCCESS, on_primary.connack_reason
        new_key = rotate(server, device.credential_id, "primary")
        rotated_at = time.monotonic()
        assert new_key != device.primary
        # The live session the old primary signed: DISCONNECT 0x98, within the budget.
        assert on_primary.disconnected.wait(5), "the old primary's session is still open"
        assert on_primary.disconnect_code == ADMINISTRATIVE_ACTION, on_primary.disconnect_code
        assert on_primary.disconnected_at - rotated_at < REVOCATION_BUDGET_SECONDS
    finally:
        on_primary.close()

    # New connections: the old primary's SAS is refused, the new primary's and the
    # (untouched) secondary's are accepted, over MQTT and HTTPS.
    new_primary, = azure_sas(azure, SasRequest(device.device_id, new_key))
    refused = sas_session(server, old_primary, device.device_id)
    assert refused.wait_connack() == BAD_USER_NAME_OR_PASSWORD
    assert NOT_MATCHING in (refused.connack_reason or ""), refused.connack_reason
    refused.close()
    response = post_telemetry(server, old_primary, "rotated", {"key": "old"})
    assert response.status_code == 401 and NOT_MATCHING in response.json()["detail"]
    for label, sas in (("new-primary", new_primary), ("secondary", secondary)):
        session = sas_session(server, sas, device.device_id)
        assert session.wait_connack() == SUCCESS, (label, session.connack_reason)
        session.close()
        response = post_telemetry(server, sas, "rotated", {"key": label})
        assert response.status_code == 202, (label, response.text)

    # The secondary's live session is not disturbed by the primary's rotation.
    on_secondary = sas_session(server, secondary, device.device_id,
                               username=azure_username(device.device_id))
    try:
        assert on_secondary.wait_connack() == SUCCESS, on_secondary.connack_reason
        rotate(server, device.credential_id, "primary")
        # Control for "not disturbed": the primary's SAS stops working at once...
        assert wait_until(lambda: post_telemetry(server, new_primary, "rotated", {}
                                                 ).status_code == 401,
                          REVOCATION_BUDGET_SECONDS)
        # ...while the secondary's session, given the same time to be cut, carries on.
        time.sleep(REVOCATION_BUDGET_SECONDS)
        assert not on_secondary.disconnected.is_set(), on_secondary.disconnect_code
        assert on_secondary.publish(device.events_topic, b'{"still": "up"}') == SUCCESS
    finally:
        on_secondary.close()


def test_revoking_the_symmetric_credential_ends_its_sas_sessions(
        server: RunningServer, azure: Path) -> None:
    device = sas_device(server, "sas-revoke")
    primary, secondary = azure_sas(azure, SasRequest(device.device_id, device.primary),
                                   SasRequest(device.device_id, device.secondary))
    session = sas_session(server, secondary, device.device_id,
                          username=azure_username(device.device_id))
    try:
        assert session.wait_connack() == SUCCESS, session.connack_reason
        assert post_telemetry(server, primary, "revoked", {"before": True}).status_code == 202
        with server.admin() as admin:
            revoked = admin.delete(f"/v1/credentials/{device.credential_id}")
        assert revoked.status_code == 200, revoked.text
        revoked_at = time.monotonic()
        assert session.disconnected.wait(5), "a revoked key's session is still open"
        assert session.disconnect_code == ADMINISTRATIVE_ACTION, session.disconnect_code
        assert session.disconnected_at - revoked_at < REVOCATION_BUDGET_SECONDS
    finally:
        session.close()
    for sas in (primary, secondary):
        again = sas_session(server, sas, device.device_id)
        assert again.wait_connack() == BAD_USER_NAME_OR_PASSWORD, again.connack_reason
        assert "no symmetric key" in (again.connack_reason or ""), again.connack_reason
        again.close()
        response = post_telemetry(server, sas, "revoked", {"after": True})
        assert response.status_code == 401, response.text


@pytest.mark.slow
def test_a_sas_session_ends_with_0xa0_when_se_passes(server: RunningServer,
                                                     azure: Path) -> None:
    """≈ 4 s: the SAS expires in real time. MQTT 5 gets DISCONNECT 0xA0 (Maximum connect
    time: the credential is used up, nothing was refused); MQTT 3.1.1 is closed."""
    v5_device, v311_device = sas_device(server, "sas-expiry-5"), sas_device(server,
                                                                            "sas-expiry-311")
    v5_sas, v311_sas = azure_sas(
        azure, SasRequest(v5_device.device_id, v5_device.primary, ttl=SHORT_TTL_SECONDS),
        SasRequest(v311_device.device_id, v311_device.primary, ttl=SHORT_TTL_SECONDS))
    v5 = sas_session(server, v5_sas, v5_device.device_id)
    v311 = sas_session(server, v311_sas, v311_device.device_id,
                       username=azure_username(v311_device.device_id), v5=False)
    try:
        assert v5.wait_connack() == SUCCESS and v311.wait_connack() == SUCCESS
        assert time.time() < min(expiry_of(v5_sas), expiry_of(v311_sas)), (
            "the SAS expired before the test could watch it")
        assert v5.publish(v5_device.events_topic, b'{"before": "se"}') == SUCCESS
        assert v311.publish(v311_device.events_topic, b'{"before": "se"}') == SUCCESS
        wait = expiry_of(v5_sas) - time.time() + EXPIRY_SLACK_SECONDS + 3
        assert v5.disconnected.wait(wait) and v311.disconnected.wait(5), "sessions outlive se"
        assert v5.disconnect_code == MAXIMUM_CONNECT_TIME, v5.disconnect_code
        assert "SAS token expired" in (v5.disconnect_reason or ""), v5.disconnect_reason
        for session, sas in ((v5, v5_sas), (v311, v311_sas)):
            se = expiry_of(sas)
            assert se - 0.05 <= session.disconnected_wall <= se + EXPIRY_SLACK_SECONDS, (
                session.disconnected_wall - se)
    finally:
        v5.close()
        v311.close()


# --- Azure's MQTT conventions with mosquitto_pub -----------------------------------------------


def mosquitto_pub(server: RunningServer, device_id: str, sas: str, topic: str,
                  payload: str) -> subprocess.CompletedProcess[str]:
    """MQTT 3.1.1 as Azure's devices speak it: no client certificate, client id = device
    id, Azure's user name, the SAS as password, QoS 1."""
    return subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(server.mqtt_port), "-V", "mqttv311",
         "--cafile", str(server.chain), "-i", device_id, "-u", azure_username(device_id),
         "-P", sas, "-t", topic, "-m", payload, "-q", "1", "-d"],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS)


@pytest.mark.parametrize(("suffix", "message_type"), [("", "message"),
                                                      ("type=temperature", "temperature")],
                         ids=["no-property-bag", "type-in-property-bag"])
def test_mosquitto_pub_with_azures_user_name_and_topic_lands_typed_telemetry(
        server: RunningServer, azure: Path, suffix: str, message_type: str) -> None:
    device = sas_device(server, f"sas-mosquitto-{message_type}")
    sas, = azure_sas(azure, SasRequest(device.device_id, device.primary))
    topic = device.events_topic + suffix
    # Negative control first: the same command with a forged signature lands nothing.
    forged = mosquitto_pub(server, device.device_id, tampered(sas), topic, '{"forged": 1}')
    assert forged.returncode != 0, forged.stdout + forged.stderr
    assert messages(server, device.device_id) == []

    sent = mosquitto_pub(server, device.device_id, sas, topic, '{"t": 21.5}')
    assert sent.returncode == 0, sent.stdout + sent.stderr
    rows = messages(server, device.device_id)
    assert [(r["channel"], r["kind"], r["message_type"], r["topic"], r["payload"])
            for r in rows] == [("mqtt", "telemetry", message_type, topic, {"t": 21.5})]


# --- client_secret_jwt: an unbound token for a device with only a symmetric key ----------------


def secret_jwt(server: RunningServer, device_id: str, key: bytes) -> str:
    """A ``client_secret_jwt`` assertion (RFC 7523 §3, HS256) keyed with ``key``."""
    now = int(time.time())
    return jwt.encode({"iss": device_id, "sub": device_id, "aud": token_endpoint(server),
                       "iat": now, "exp": now + 60, "jti": secrets.token_urlsafe(16)},
                      key, algorithm="HS256")


def token_by_secret_jwt(server: RunningServer, device_id: str, key: bytes) -> httpx.Response:
    with https(server) as client:
        return client.post(TOKEN_PATH, data={
            "grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": secret_jwt(server, device_id, key)})


def test_client_secret_jwt_gives_an_unbound_bearer_token_until_the_key_is_revoked(
        server: RunningServer) -> None:
    device = sas_device(server, "sas-secret-jwt")
    raw_primary = base64.b64decode(device.primary)

    # Negative control: the key's base64 text is not the key (docs: the raw 32 bytes).
    wrong = token_by_secret_jwt(server, device.device_id, device.primary.encode())
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_client", wrong.text

    granted = token_by_secret_jwt(server, device.device_id, raw_primary)
    assert granted.status_code == 200, granted.text
    assert granted.headers["Cache-Control"] == "no-store"
    body = granted.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == UNBOUND_LIFETIME_SECONDS
    token = body["access_token"]
    claims = claims_of(token)
    assert header_of(token)["alg"] == "ES256"
    assert claims["fw_binding"] == "none" and "cnf" not in claims, claims
    assert claims["exp"] - claims["iat"] == UNBOUND_LIFETIME_SECONDS
    assert claims["sub"] == claims["client_id"] == device.device_id
    # The secondary key gets one too.
    by_secondary = token_by_secret_jwt(server, device.device_id,
                                       base64.b64decode(device.secondary))
    assert by_secondary.status_code == 200, by_secondary.text

    # Usable as a bearer token without any client certificate, on HTTPS and MQTT.
    bearer = {"Authorization": f"Bearer {token}"}
    with https(server) as client:
        me = client.get("/v1/devices/self", headers=bearer)
        assert me.status_code == 200 and me.json()["id"] == device.device_id, me.text
        posted = client.post("/v1/telemetry/unbound", json={"by": "bearer"}, headers=bearer)
        assert posted.status_code == 202, posted.text
    session = TokenSession(server, device.device_id, password=token).connect()
    try:
        assert session.wait_connack() == SUCCESS, session.connack_reason
        assert session.publish(device.events_topic, b'{"by": "mqtt"}') == SUCCESS
    finally:
        session.close()
    assert [(r["channel"], r["payload"]) for r in messages(server, device.device_id)] == [
        ("https", {"by": "bearer"}), ("mqtt", {"by": "mqtt"})]

    with server.admin() as admin:
        revoked = admin.delete(f"/v1/credentials/{device.credential_id}")
    assert revoked.status_code == 200, revoked.text

    def refused_on_https() -> bool:
        with https(server) as client:
            return client.get("/v1/devices/self", headers=bearer).status_code == 401
    assert wait_until(refused_on_https, REVOCATION_BUDGET_SECONDS), "the token outlived its key"
    session = TokenSession(server, device.device_id, password=token).connect()
    try:
        assert session.wait_connack() == BANNED, session.connack_reason
    finally:
        session.close()
    again = token_by_secret_jwt(server, device.device_id, raw_primary)
    assert again.status_code == 400 and again.json()["error"] == "invalid_client", again.text


# --- the SDK's whole device client ---------------------------------------------------------------


class ConnectRelay:
    """An HTTP CONNECT proxy (RFC 9110 §9.3.6) for the SDK's ``ProxyOptions``: whatever
    host and port the client asks for, it connects to ``target_port`` on 127.0.0.1 and
    relays bytes unchanged both ways. ``requested`` records each CONNECT line."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.requested: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            self._sockets.append(client)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = client.recv(1)
                if not chunk:
                    break
                head += chunk
            self.requested.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            upstream.settimeout(None)
            self._sockets.append(upstream)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def relay(server: RunningServer) -> Iterator[ConnectRelay]:
    proxy = ConnectRelay(server.mqtt_port)
    yield proxy
    proxy.close()


def test_the_sdks_device_client_sends_telemetry_with_its_own_sas(
        server: RunningServer, azure: Path, relay: ConnectRelay) -> None:
    """``IoTHubDeviceClient.create_from_connection_string`` end to end: the SDK makes its
    own SAS from the key, sends Azure's user name, and publishes on Azure's topic with
    its system properties and a custom ``type`` in the property bag."""
    device = sas_device(server, "sas-sdk-client")
    request = {"connection_string": f"HostName={HOST};DeviceId={device.device_id};"
                                    f"SharedAccessKey={device.primary}",
               "ca_pem": server.chain.read_text(), "proxy_port": relay.port,
               "messages": [{"payload": {"t": 21.5}, "type": "temperature"},
                            {"payload": {"hello": "fleetward"}}]}
    result = subprocess.run([str(azure), "-c", AZURE_CLIENT_SCRIPT], input=json.dumps(request),
                            capture_output=True, text=True, timeout=SDK_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "sent 2"
    # The SDK asked for its fixed port; the relay is what made our port reachable.
    assert relay.requested == [f"CONNECT {HOST}:8883 HTTP/1.1"], relay.requested
    rows = messages(server, device.device_id)
    assert [(r["channel"], r["message_type"], r["payload"]) for r in rows] == [
        ("mqtt", "temperature", {"t": 21.5}), ("mqtt", "message", {"hello": "fleetward"})]
    assert all(r["topic"].startswith(device.events_topic) for r in rows), rows
