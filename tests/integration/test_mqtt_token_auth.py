"""Acceptance 5: MQTT sessions authenticated by an access token (docs/credentials.md
"Using a token over MQTT").

Threats: a session that outlives the token that opened it (a token is short-lived so
that a stolen one is worth little; a session kept open for days would undo that); a
re-authentication that lets a session switch to another device's token, or accepts a
token without its proof; a CONNECT password (token and proof) captured on the wire and
replayed; and a server that silently accepts an authentication method it does not
implement.

The server here issues tokens that live ``LIFETIME_SECONDS``, so expiry is observed in
real time; its clock has whole-second resolution (``fleetward.clock``), so a session
ends between ``exp`` and one second after it.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetward.edge.mqtt import codec as c
from tests.conftest import RunningServer, start_server, stop_server
from tests.integration.channel_helpers import DeviceIdentity, make_device
from tests.integration.token_helpers import (
    BAD_AUTHENTICATION_METHOD,
    BAD_USER_NAME_OR_PASSWORD,
    CONTINUE_AUTHENTICATION,
    FW_TOKEN,
    MAXIMUM_CONNECT_TIME,
    NOT_AUTHORIZED,
    SUCCESS,
    TokenSession,
    challenge_answer,
    claims_of,
    dpop_proof,
    fw_token_session,
    load_key,
    mqtt_password,
    mqtt_uri,
    new_key,
    password_session,
    server_only_tls,
    token_by_dpop,
    token_by_mtls,
)

LIFETIME_SECONDS = 4  # [tokens] access_token_lifetime_seconds on this server
# The session must end at exp: not before it, and not later than the server clock's
# one-second resolution plus delivery.
EXPIRY_SLACK_SECONDS = 1.5
TOOL_TIMEOUT_SECONDS = 15.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("mqtt-token-auth") / "data"
    s = start_server(data_dir, settings={"tokens": {
        "access_token_lifetime_seconds": LIFETIME_SECONDS,
        "unbound_token_lifetime_seconds": LIFETIME_SECONDS}})
    yield s
    stop_server(s)


@pytest.fixture
def device(server: RunningServer, tmp_path: Path, request: pytest.FixtureRequest
           ) -> DeviceIdentity:
    """A fresh device per test (no session of another test can take over its id)."""
    name = request.node.name.split("[")[0].removeprefix("test_")[:40].replace("_", "-")
    return make_device(server, tmp_path, f"{name}-{secrets.token_hex(3)}")


def _iso(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat().replace("+00:00", "Z")


def _telemetry(identity: DeviceIdentity) -> str:
    return f"devices/{identity.device_id}/telemetry/reading"


def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        time.sleep(delay)


def _assert_ended_at_expiry(session: TokenSession, exp: int) -> None:
    assert session.disconnected.wait(exp - time.time() + 5), "the session outlived its token"
    assert exp <= session.disconnected_wall <= exp + EXPIRY_SLACK_SECONDS, (
        f"ended {session.disconnected_wall - exp:+.2f} s from exp")


# --- (a) expiry ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["password-dpop", "password-certificate-bound",
                                 "fw-token-dpop"])
def test_token_session_ends_at_expiry_with_maximum_connect_time(
        server: RunningServer, device: DeviceIdentity, how: str) -> None:
    """MQTT 5: DISCONNECT 0xA0 (Maximum connect time) with a Reason String naming the
    expiry, at the token's exp — whichever way the token was presented. Takes about
    LIFETIME_SECONDS: it waits for a real expiry."""
    key = load_key(device)
    if how == "password-certificate-bound":
        token = token_by_mtls(server, device)
        session = password_session(server, device.device_id, token, identity=device)
    elif how == "password-dpop":
        token = token_by_dpop(server, device, key)
        session = password_session(server, device.device_id, token, key)
    else:
        token = token_by_dpop(server, device, key)
        session = fw_token_session(server, device.device_id, token, key)
    exp = claims_of(token)["exp"]
    assert session.wait_connack() == SUCCESS, session.connack_reason
    assert session.publish(_telemetry(device), b'{"t": 1}') == SUCCESS  # control: alive
    _assert_ended_at_expiry(session, exp)
    assert session.disconnect_code == MAXIMUM_CONNECT_TIME, session.disconnect_code
    reason = session.disconnect_reason or ""
    assert f"access token expired at {_iso(exp)}" in reason, reason
    if how == "fw-token-dpop":
        assert "re-authenticate (AUTH 0x19)" in reason, reason
    session.close()


def test_mqtt311_token_session_is_closed_at_expiry(server: RunningServer,
                                                   device: DeviceIdentity) -> None:
    """MQTT 3.1.1 has no DISCONNECT from the server: the connection just closes, at exp.
    Takes about LIFETIME_SECONDS."""
    key = load_key(device)
    token = token_by_dpop(server, device, key)
    exp = claims_of(token)["exp"]
    session = password_session(server, device.device_id, token, key, v5=False)
    assert session.wait_connack() == 0
    assert session.publish(_telemetry(device), b'{"t": 1}') == 0  # control: alive
    _assert_ended_at_expiry(session, exp)
    assert session.disconnect_reason is None
    session.close()


def test_connect_with_an_expired_token_is_refused_not_opened_and_closed(
        server: RunningServer, device: DeviceIdentity) -> None:
    """A token whose exp has passed on the server's own clock grants no connect time:
    the CONNECT should be refused (0x86), not acknowledged as a session that the
    server then ends in the same instant. The same token before exp is the control.
    Takes about LIFETIME_SECONDS."""
    key = load_key(device)
    token = token_by_dpop(server, device, key)
    exp = claims_of(token)["exp"]
    control = password_session(server, device.device_id, token, key)
    assert control.wait_connack() == SUCCESS
    control.close()
    _sleep_until(exp + 1.2)
    late = password_session(server, device.device_id, token, key)
    code = late.wait_connack()
    late.disconnected.wait(2)
    late.close()
    assert code == BAD_USER_NAME_OR_PASSWORD, (
        f"CONNACK 0x{code:02x}, then DISCONNECT {late.disconnect_code}: "
        f"{late.disconnect_reason}")


# --- (b) FW-TOKEN with a key-bound token and re-authentication ---------------------------------


def test_fw_token_reauthentication_extends_the_session(server: RunningServer,
                                                       device: DeviceIdentity) -> None:
    """The client answers the CONNECT challenge (nonce = base64url(challenge), htm
    CONNECT, htu mqtts://localhost:<port>), re-authenticates with AUTH 0x19 and a fresh
    token before expiry (answering the second challenge), and is still connected and
    publishing after the first token's exp; the session then ends at the second
    token's exp. Takes about LIFETIME_SECONDS + 2 s."""
    key = load_key(device)
    first = token_by_dpop(server, device, key)
    exp1 = claims_of(first)["exp"]
    session = fw_token_session(server, device.device_id, first, key)
    assert session.wait_connack() == SUCCESS, session.connack_reason
    assert session.connack_auth_method == FW_TOKEN
    assert session.publish(_telemetry(device), b'{"n": 1}') == SUCCESS

    # 1.5 s before exp1: the second token's exp (whole seconds) is at least exp1 + 2.
    _sleep_until(exp1 - 1.5)
    second = token_by_dpop(server, device, key)
    exp2 = claims_of(second)["exp"]
    assert exp2 >= exp1 + 2
    session.answer = challenge_answer(server, second, key)
    assert session.reauthenticate(second) == SUCCESS, session.disconnect_reason
    # CONNECT challenge, re-authentication challenge, then AUTH 0x00 (Success).
    assert [a.code for a in session.auths] == [CONTINUE_AUTHENTICATION,
                                              CONTINUE_AUTHENTICATION, SUCCESS]
    assert all(a.method == FW_TOKEN for a in session.auths)
    assert session.auths[0].data != session.auths[1].data  # a new challenge each time

    # Past the moment the first token would have ended the session (exp1 plus the
    # server clock's one-second resolution), well before exp2.
    _sleep_until(exp1 + 1.1)
    assert not session.disconnected.is_set(), (
        f"closed with 0x{session.disconnect_code or 0:02x}: {session.disconnect_reason}")
    assert session.publish(_telemetry(device), b'{"n": 2}') == SUCCESS
    _assert_ended_at_expiry(session, exp2)
    assert session.disconnect_code == MAXIMUM_CONNECT_TIME
    assert _iso(exp2) in (session.disconnect_reason or "")
    session.close()


@pytest.mark.parametrize("attack", ["token-of-another-device", "proof-by-another-key",
                                    "proof-without-the-nonce", "not-a-token"])
def test_failed_reauthentication_ends_the_session_with_not_authorized(
        server: RunningServer, device: DeviceIdentity, tmp_path: Path, attack: str) -> None:
    """§4.12.1: a re-authentication that fails ends the session with DISCONNECT 0x87 —
    a session cannot be moved to another device's token, nor renewed with a token
    whose proof does not verify. The session works until then (the control)."""
    key = load_key(device)
    token = token_by_dpop(server, device, key)
    session = fw_token_session(server, device.device_id, token, key)
    assert session.wait_connack() == SUCCESS
    assert session.publish(_telemetry(device), b'{"n": 1}') == SUCCESS

    if attack == "token-of-another-device":
        other = make_device(server, tmp_path / "other", f"other-{secrets.token_hex(3)}")
        other_key = load_key(other)
        fresh = token_by_dpop(server, other, other_key)
        session.answer = challenge_answer(server, fresh, other_key)
    elif attack == "not-a-token":
        fresh = "not.a-token.at-all"
    else:
        fresh = token_by_dpop(server, device, key)
        if attack == "proof-by-another-key":
            session.answer = challenge_answer(server, fresh, new_key())
        else:
            session.answer = lambda challenge: dpop_proof(
                key, "CONNECT", mqtt_uri(server), token=fresh).encode()
    assert session.reauthenticate(fresh) is None, "the re-authentication succeeded"
    assert session.disconnect_code == NOT_AUTHORIZED, session.disconnect_code
    assert (session.disconnect_reason or "").startswith("re-authentication refused"), (
        session.disconnect_reason)
    session.close()


# --- (c) mosquitto_pub with a token in the password -------------------------------------------


def _mosquitto_pub(server: RunningServer, identity: DeviceIdentity, version: str,
                   password: str, payload: str) -> subprocess.CompletedProcess[str]:
    """mosquitto_pub over server-authenticated TLS only (no --cert), QoS 1."""
    return subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(server.mqtt_port), "-V", version,
         "--cafile", str(server.chain), "-i", identity.device_id, "-d",
         "-u", identity.device_id, "-P", password, "-q", "1",
         "-t", _telemetry(identity), "-m", payload],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS)


@pytest.mark.parametrize("version", ["mqttv5", "mqttv311"])
def test_mosquitto_pub_with_token_and_proof_publishes_once(
        server: RunningServer, device: DeviceIdentity, version: str) -> None:
    """``-u DEVICE -P '<token> <proof>'`` without a client certificate: the message is
    published and stored; the same password replayed on a second CONNECT is refused
    (a captured CONNECT is worth nothing), and so is the token without its proof."""
    key = load_key(device)
    token = token_by_dpop(server, device, key)
    password = mqtt_password(server, token, key)
    marker = secrets.token_hex(8)
    published = _mosquitto_pub(server, device, version, password,
                               json.dumps({"marker": marker}))
    assert published.returncode == 0, published.stdout + published.stderr
    assert "received CONNACK (0)" in published.stdout, published.stdout
    assert "received PUBACK" in published.stdout, published.stdout
    with server.admin() as admin:
        stored = admin.get(f"/v1/devices/{device.device_id}/messages")
    assert stored.status_code == 200, stored.text
    assert [m["payload"] for m in stored.json()["items"]] == [{"marker": marker}]
    assert stored.json()["items"][0]["channel"] == "mqtt"

    refused_code = "134" if version == "mqttv5" else "4"  # 0x86 / 3.1.1 return code 4
    for attempt in (password, token):  # the replayed password; the token alone
        refused = _mosquitto_pub(server, device, version, attempt, '{"marker": "no"}')
        assert refused.returncode != 0, refused.stdout
        assert f"received CONNACK ({refused_code})" in refused.stdout, refused.stdout
        assert "bad user name or password" in refused.stderr.lower(), refused.stderr
    with server.admin() as admin:
        items = admin.get(f"/v1/devices/{device.device_id}/messages").json()["items"]
    assert len(items) == 1, items


# --- (d) authentication methods -----------------------------------------------------------


@pytest.mark.parametrize(("method", "with_password", "expected"), [
    ("SCRAM-SHA-256", False, BAD_AUTHENTICATION_METHOD),
    ("fw-token", False, BAD_AUTHENTICATION_METHOD),  # method names are case-sensitive
    (FW_TOKEN, True, BAD_USER_NAME_OR_PASSWORD),  # FW-TOKEN carries no password
], ids=["unknown-method", "wrong-case", "fw-token-with-a-password"])
def test_connect_with_another_authentication_method_is_refused(
        server: RunningServer, device: DeviceIdentity, method: str, with_password: bool,
        expected: int) -> None:
    """§4.12: a server that does not support the client's Authentication Method answers
    CONNACK 0x8C (Bad authentication method) — never a session authenticated by
    something it did not check. FW-TOKEN with the same token is the control."""
    key = load_key(device)
    token = token_by_dpop(server, device, key)
    control = fw_token_session(server, device.device_id, token, key)
    assert control.wait_connack() == SUCCESS
    control.close()
    session = TokenSession(server, device.device_id, auth_method=method,
                           auth_data=token.encode(),
                           password=mqtt_password(server, token, key) if with_password
                           else None,
                           answer=challenge_answer(server, token, key)).connect()
    code = session.wait_connack()
    session.close()
    assert code == expected, (code, session.connack_reason)
    assert session.connack_reason
    if expected == BAD_AUTHENTICATION_METHOD:
        assert FW_TOKEN in session.connack_reason  # says which method to use


@pytest.mark.parametrize("interruption", ["publish", "disconnect"])
def test_only_auth_or_disconnect_may_interrupt_the_challenge(
        server: RunningServer, device: DeviceIdentity, interruption: str) -> None:
    """[MQTT-3.1.2-30]: while the FW-TOKEN challenge waits, the client may send only AUTH
    or DISCONNECT. A PUBLISH there is a protocol error (nothing stored, no session); a
    DISCONNECT ends the attempt quietly."""
    token = token_by_dpop(server, device)
    raw = socket.create_connection(("127.0.0.1", server.mqtt_port), timeout=10)
    with server_only_tls(server).wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(c.encode(c.Connect(device.device_id, c.MQTT_5, properties=c.Properties(
            authentication_method=FW_TOKEN, authentication_data=token.encode())), c.MQTT_5))
        reader = c.PacketReader(1 << 20, c.MQTT_5)  # what the server sends
        challenge = None
        while challenge is None:
            reader.feed(sock.recv(4096))
            challenge = reader.next_packet()
        assert isinstance(challenge, c.Auth)  # control: the exchange is under way
        assert challenge.reason_code == CONTINUE_AUTHENTICATION
        if interruption == "publish":
            sock.sendall(c.encode(c.Publish(f"devices/{device.device_id}/telemetry/t",
                                            b'{"t": 1}', 0, False), c.MQTT_5))
        else:
            sock.sendall(c.encode(c.Disconnect(), c.MQTT_5))
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass  # the server aborted the connection: it is closed all the same
    assert not any(isinstance(p, c.Connack) for p in c.decode_all(received, c.MQTT_5))
    with server.admin() as admin:
        stored = admin.get(f"/v1/devices/{device.device_id}/messages").json()["items"]
    assert stored == []
