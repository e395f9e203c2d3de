"""A token's scopes bound what an MQTT session receives, end to end against a real server
process: a persistent session resumed by a token without ``commands:read`` gets none of
the commands queued for it (they were delivered by the policy alone before a review
found it; tests/unit/test_credential_hardening.py has the unit-level cases)."""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import RunningServer, start_server, stop_server
from tests.integration.channel_helpers import DeviceIdentity, make_device
from tests.integration.token_helpers import (
    load_key,
    mqtt_password,
    server_only_tls,
    token_by_dpop,
)

WAIT = 10.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = start_server(tmp_path_factory.mktemp("review-findings") / "data")
    yield s
    stop_server(s)


class Client:
    """A paho v5 client that keeps its session (Clean Start 0, Session Expiry 600 s)
    and records what it receives."""

    def __init__(self, server: RunningServer, client_id: str, *,
                 identity: DeviceIdentity | None = None, password: str | None = None) -> None:
        self.received: list[str] = []
        self.connack: int | None = None
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        self.client.tls_set_context(identity.tls_context() if identity is not None
                                    else server_only_tls(server))
        if password is not None:
            self.client.username_pw_set(client_id, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.received.append(m.topic)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 600
        self.client.connect("localhost", server.mqtt_port, keepalive=30, clean_start=False,
                            properties=props)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        self.connack = reason.value
        self.connected.set()

    def close(self) -> None:
        self.client.disconnect()
        time.sleep(0.3)
        self.client.loop_stop()


def test_token_without_commands_read_receives_no_queued_command(
        server: RunningServer, tmp_path: Path) -> None:
    device = make_device(server, tmp_path, f"rv-cmd-{secrets.token_hex(3)}")
    device_id = device.device_id

    # 1. The device (certificate) keeps a session subscribed to its commands, goes away.
    cert = Client(server, device_id, identity=device)
    assert cert.connected.wait(WAIT) and cert.connack == 0
    cert.client.subscribe(f"devices/{device_id}/commands/#", qos=1)
    assert cert.subscribed.wait(WAIT)
    cert.close()

    # 2. An operator queues a command: it waits in the offline session.
    with server.admin() as admin:
        queued = admin.post(f"/v1/devices/{device_id}/commands", json={
            "name": "reboot", "payload": {"delay_seconds": 5}, "ttl_seconds": 3600})
        assert queued.status_code == 201, queued.text

    # 3. Someone holding a token scoped to telemetry only connects as the device id.
    key = load_key(device)
    token = token_by_dpop(server, device, key, scope="telemetry:write mqtt:connect")
    thief = Client(server, device_id, password=mqtt_password(server, token, key))
    assert thief.connected.wait(WAIT) and thief.connack == 0  # control: it may connect
    time.sleep(1.5)
    received = list(thief.received)
    thief.close()
    assert received == [], f"a token without commands:read received {received}"
