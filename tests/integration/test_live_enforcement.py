"""Acceptance 4: a control-plane change reaches live connections within one second.

Each scenario connects a device over MQTT 5 (paho) and over HTTPS keep-alive (a raw TLS
socket, so that we see the server close it), applies one change through the admin
API, and checks that both connections end within a second, MQTT with DISCONNECT 0x98
(administrative action), and that the next CONNECT is refused with the right code.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.conftest import RunningServer, start_server, stop_server
from tests.integration.channel_helpers import DeviceIdentity, make_device

LIVE_BUDGET_SECONDS = 1.0  # the bound: closed within one second


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("live") / "data"
    s = start_server(data_dir)
    yield s
    stop_server(s)


class Session:
    """One paho MQTT 5 connection, recording CONNACK and DISCONNECT reason codes."""

    def __init__(self, server: RunningServer, identity: DeviceIdentity,
                 client_id: str | None = None, persistent: bool = False) -> None:
        self.connack = threading.Event()
        self.session_present: bool | None = None
        self.disconnected = threading.Event()
        self.connack_code: int | None = None
        self.disconnect_code: int | None = None
        self.disconnect_reason_string: str | None = None
        self.disconnected_at = 0.0
        self.pubacks: dict[int, int] = {}
        self.puback_event = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or identity.device_id,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set_context(identity.tls_context())
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        properties = None
        if persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 300
        self.client.connect("localhost", server.mqtt_port, keepalive=30,
                            clean_start=not persistent, properties=properties)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self.connack_code = reason.value
        self.session_present = bool(flags.session_present)
        self.connack.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        self.disconnect_code = reason.value
        props = getattr(properties, "ReasonString", None) if properties else None
        self.disconnect_reason_string = props
        self.disconnected_at = time.monotonic()
        self.disconnected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self.pubacks[mid] = reason.value
        self.puback_event.set()

    def wait_connack(self) -> int:
        assert self.connack.wait(10), "no CONNACK"
        assert self.connack_code is not None
        return self.connack_code

    def publish(self, topic: str, payload: dict[str, Any]) -> int:
        self.puback_event.clear()
        info = self.client.publish(topic, json.dumps(payload), qos=1)
        deadline = time.monotonic() + 10
        while info.mid not in self.pubacks and time.monotonic() < deadline:
            self.puback_event.wait(0.1)
        assert info.mid in self.pubacks, "no PUBACK"
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class KeepAlive:
    """An HTTP/1.1 keep-alive connection on a raw TLS socket: we can see its close."""

    def __init__(self, server: RunningServer, identity: DeviceIdentity) -> None:
        raw = socket.create_connection(("localhost", server.device_port), timeout=10)
        self.sock = identity.tls_context().wrap_socket(raw, server_hostname="localhost")
        self.closed_at = 0.0

    def get(self, path: str) -> int:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "connection closed before the response"
            head += chunk
        status = int(head.split(b" ", 2)[1])
        header_block, _, body = head.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in header_block.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += self.sock.recv(4096)
        return status

    def wait_closed(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1)
        except TimeoutError:
            return False
        except (ssl.SSLError, ConnectionError, OSError):
            data = b""
        if data == b"":
            self.closed_at = time.monotonic()
            return True
        return False


def _https(server: RunningServer, identity: DeviceIdentity) -> httpx.Client:
    return httpx.Client(base_url=f"https://localhost:{server.device_port}",
                        verify=identity.tls_context(), timeout=10)


def _state(state: str) -> Callable[[httpx.Client, DeviceIdentity], httpx.Response]:
    def act(admin: httpx.Client, identity: DeviceIdentity) -> httpx.Response:
        return admin.post(f"/v1/devices/{identity.device_id}/state",
                          json={"state": state, "reason": "test"})
    return act


def _revoke(admin: httpx.Client, identity: DeviceIdentity) -> httpx.Response:
    return admin.post(f"/v1/certificates/{identity.serial_hex}/revoke",
                      json={"reason": "key_compromise"})


# change, CONNACK code on reconnect, HTTPS status of GET /v1/devices/self afterwards
SCENARIOS: list[tuple[str, Callable[[httpx.Client, DeviceIdentity], httpx.Response], int, int]] = [
    ("revoke", _revoke, 0x8A, 403),
    ("disable", _state("disabled"), 0x87, 403),
    ("quarantine", _state("quarantined"), 0x87, 200),  # own status is a recovery route
    ("compromise", _state("compromised"), 0x8A, 403),
    ("retire", _state("retired"), 0x8A, 403),
]


@pytest.mark.parametrize(("name", "change", "connack", "self_status"), SCENARIOS,
                         ids=[s[0] for s in SCENARIOS])
def test_change_closes_live_sessions_within_a_second_and_reconnect_fails(
        server: RunningServer, tmp_path: Path, name: str,
        change: Callable[[httpx.Client, DeviceIdentity], httpx.Response],
        connack: int, self_status: int) -> None:
    identity = make_device(server, tmp_path, f"live-{name}")
    session = Session(server, identity)
    assert session.wait_connack() == 0
    own = f"devices/{identity.device_id}/telemetry/reading"
    assert session.publish(own, {"t": 1}) == 0  # negative control: it works before
    http = KeepAlive(server, identity)
    assert http.get("/v1/devices/self") == 200

    with server.admin() as admin:
        response = change(admin, identity)
        assert response.status_code == 200, response.text
        changed_at = time.monotonic()

    assert session.disconnected.wait(5), f"{name}: MQTT session not closed"
    assert session.disconnect_code == 0x98, session.disconnect_code
    assert session.disconnected_at - changed_at < LIVE_BUDGET_SECONDS
    if self_status == 200:
        # Quarantine keeps the HTTPS connection (its own status is a recovery route)
        # but its policy is swapped: telemetry is refused without a reconnect.
        assert not http.wait_closed(0.5)
        assert http.get("/v1/devices/self") == 200
    else:
        assert http.wait_closed(5), f"{name}: HTTPS keep-alive connection not closed"
        assert http.closed_at - changed_at < LIVE_BUDGET_SECONDS
    session.close()

    again = Session(server, identity)
    assert again.wait_connack() == connack
    again.close()
    with _https(server, identity) as client:
        response = client.get("/v1/devices/self")
        assert response.status_code == self_status, response.text
        if self_status != 200:
            assert response.headers["content-type"].startswith("application/problem+json")
        telemetry = client.post("/v1/telemetry/reading", json={"t": 1})
        assert telemetry.status_code == 403, telemetry.text
        assert telemetry.headers["content-type"].startswith("application/problem+json")


def test_policy_change_applies_to_a_live_session_without_reconnect(
        server: RunningServer, tmp_path: Path) -> None:
    identity = make_device(server, tmp_path, "live-policy")
    session = Session(server, identity)
    assert session.wait_connack() == 0
    topic = f"devices/{identity.device_id}/telemetry/reading"
    assert session.publish(topic, {"t": 1}) == 0
    deny = {"statements": [
        {"sid": "allow-all-default", "effect": "allow", "actions": ["mqtt:*"],
         "resources": ["devices/${device.id}/#", "${device.id}"]},
        {"sid": "no-telemetry", "effect": "deny", "actions": ["mqtt:publish"],
         "resources": ["devices/${device.id}/telemetry/#"]}]}
    with server.admin() as admin:
        assert admin.put("/v1/policies/no-telemetry", json=deny).status_code in (200, 201)
        attached = admin.post("/v1/policies/no-telemetry/attachments",
                              json={"device": identity.device_id})
        assert attached.status_code in (200, 201), attached.text
    deadline = time.monotonic() + LIVE_BUDGET_SECONDS + 0.5
    code = 0
    while time.monotonic() < deadline:
        code = session.publish(topic, {"t": 2})
        if code == 0x87:
            break
        time.sleep(0.05)
    assert code == 0x87, "the live session still publishes after the deny policy"
    assert not session.disconnected.is_set(), "a policy change must not need a reconnect"
    with server.admin() as admin:
        detached = admin.delete("/v1/policies/no-telemetry/attachments",
                                params={"device": identity.device_id})
        assert detached.status_code in (200, 204), detached.text
    deadline = time.monotonic() + LIVE_BUDGET_SECONDS + 0.5
    while time.monotonic() < deadline:
        code = session.publish(topic, {"t": 3})
        if code == 0:
            break
        time.sleep(0.05)
    assert code == 0, "detaching the deny policy did not restore publishing"
    session.close()


def test_client_id_must_match_the_certificate_and_takeover_is_audited(
        server: RunningServer, tmp_path: Path) -> None:
    identity = make_device(server, tmp_path, "live-id")
    wrong = Session(server, identity, client_id="someone-else")
    assert wrong.wait_connack() == 0x85  # client identifier not valid
    wrong.close()
    first = Session(server, identity)
    assert first.wait_connack() == 0
    second = Session(server, identity)
    assert second.wait_connack() == 0
    assert first.disconnected.wait(5)
    assert first.disconnect_code == 0x8E  # session taken over
    second.close()
    first.close()
    with server.admin() as admin:
        deadline = time.monotonic() + 5
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not rows:
            rows = [e for e in admin.get("/v1/audit", params={
                "action": "mqtt.session_taken_over", "limit": 100}).json()["items"]
                if e["target"] == f"device:{identity.device_id}"]
            time.sleep(0.1)
        assert rows, "takeover not audited"


def _reenroll(server: RunningServer, identity: DeviceIdentity) -> httpx.Response:
    import base64

    from tests.integration.enroll_helpers import csr_der
    with _https(server, identity) as client:
        return client.post("/.well-known/est/simplereenroll",
                           content=base64.encodebytes(csr_der(identity.device_id)),
                           headers={"Content-Type": "application/pkcs10"})


def _attach_policy(server: RunningServer, name: str, device_id: str,
                   statements: list[dict[str, Any]]) -> None:
    with server.admin() as admin:
        assert admin.put(f"/v1/policies/{name}", json={"statements": statements}
                         ).status_code in (200, 201)
        assert admin.post(f"/v1/policies/{name}/attachments",
                          json={"device": device_id}).status_code in (200, 201)


def test_est_reenroll_is_decided_by_the_device_policy(server: RunningServer,
                                                      tmp_path: Path) -> None:
    denied = make_device(server, tmp_path, "reenroll-denied")
    allowed = make_device(server, tmp_path, "reenroll-allowed")
    _attach_policy(server, "no-reenroll", denied.device_id, [
        {"sid": "default-ish", "effect": "allow", "actions": ["mqtt:connect"],
         "resources": ["${device.id}"]},
        {"sid": "no-renewal", "effect": "deny", "actions": ["est:reenroll"],
         "resources": ["#"]}])
    refused = _reenroll(server, denied)
    assert refused.status_code == 403, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "no-renewal" in refused.json()["detail"]
    assert _reenroll(server, allowed).status_code == 200  # negative control: default policy


def _collect_messages(session: Session) -> tuple[list[str], threading.Event]:
    received: list[str] = []
    got = threading.Event()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        received.append(message.topic)
        got.set()
    session.client.on_message = on_message
    return received, got


def _subscribe_to_commands(session: Session, device_id: str) -> tuple[list[str],
                                                                      threading.Event]:
    received, got = _collect_messages(session)
    subscribed = threading.Event()
    session.client.on_subscribe = lambda *args: subscribed.set()
    session.client.subscribe(f"devices/{device_id}/commands/#", qos=1)
    assert subscribed.wait(5)
    return received, got


def _attach_receive_only_policy(server: RunningServer, device_id: str) -> None:
    """Connect and receive stay allowed; subscribe is withdrawn."""
    _attach_policy(server, "no-subscribe", device_id, [
        {"sid": "connect", "effect": "allow", "actions": ["mqtt:connect"],
         "resources": ["${device.id}"]},
        {"sid": "receive-only", "effect": "allow", "actions": ["mqtt:receive"],
         "resources": ["devices/${device.id}/#"]}])


def _subscription_drops(server: RunningServer, device_id: str) -> int:
    with server.admin() as admin:
        rows = admin.get("/v1/audit", params={"action": "mqtt.subscription_dropped"}
                         ).json()["items"]
    return sum(1 for r in rows if r["target"] == f"device:{device_id}")


def test_a_policy_change_drops_subscriptions_it_no_longer_allows(
        server: RunningServer, tmp_path: Path) -> None:
    """Receive stays allowed; subscribe is withdrawn: the live subscription must go, or
    the old grant would outlive the policy."""
    identity = make_device(server, tmp_path, "live-subs")
    session = Session(server, identity)
    assert session.wait_connack() == 0
    received, got = _subscribe_to_commands(session, identity.device_id)
    server.cli("device", "command", identity.device_id, "first", "--payload", "{}")
    assert got.wait(5), "negative control: the command arrives while subscribed"
    got.clear()
    _attach_receive_only_policy(server, identity.device_id)
    server.cli("device", "command", identity.device_id, "second", "--payload", "{}")
    assert not got.wait(1.5), f"delivered after the subscribe grant was withdrawn: {received}"
    assert not session.disconnected.is_set()
    assert _subscription_drops(server, identity.device_id) >= 1
    session.close()


def test_a_resumed_session_loses_subscriptions_the_policy_withdrew_meanwhile(
        server: RunningServer, tmp_path: Path) -> None:
    identity = make_device(server, tmp_path, "resume-subs")
    first = Session(server, identity, persistent=True)
    assert first.wait_connack() == 0
    _subscribe_to_commands(first, identity.device_id)
    first.client.disconnect()
    first.client.loop_stop()
    time.sleep(0.3)  # let the server see the DISCONNECT and park the session
    _attach_receive_only_policy(server, identity.device_id)
    time.sleep(0.5)  # no live connection to notify: the drop must happen on resume
    assert _subscription_drops(server, identity.device_id) == 0

    second = Session(server, identity, persistent=True)
    assert second.wait_connack() == 0
    assert second.session_present, "negative control: the session was resumed"
    received, got = _collect_messages(second)
    server.cli("device", "command", identity.device_id, "after", "--payload", "{}")
    assert not got.wait(1.5), f"resumed subscription outlived the policy: {received}"
    assert _subscription_drops(server, identity.device_id) >= 1
    second.close()
