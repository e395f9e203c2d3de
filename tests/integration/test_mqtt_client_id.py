"""An MQTT client id that is not the certificate's device id (issue 10).

The refusal must say what was wrong: the MQTT 5 CONNACK Reason String (property 0x1F,
§3.2.2.3.9) and the ``channel.refused`` audit row both read ``client id "X",
certificate names "Y"``. The client id is the client's own text: it is echoed at most
64 characters long, with control characters (newline, terminal escapes, bidirectional
overrides) escaped. MQTT 3.1.1 has no reason string: CONNACK return code 2 (identifier
rejected, §3.2.2.3) and the same audit row. Each case uses a device of its own, since
refusals are audited once per device and reason per window.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.conftest import RunningServer, start_server, stop_server
from tests.integration.channel_helpers import DeviceIdentity, make_device
from tests.integration.mqtt_helpers import PahoClient

CLIENT_ID_NOT_VALID = 0x85  # MQTT 5.0 §3.2.2.2
V311_IDENTIFIER_REJECTED = 2  # MQTT 3.1.1 §3.2.2.3
MAX_REASON_BYTES = 200  # the server's cap on any Reason String
ECHO_CHARS = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    s = start_server(tmp_path_factory.mktemp("mqtt-client-id") / "data")
    yield s
    stop_server(s)


def device(server: RunningServer, tmp_path: Path, name: str) -> DeviceIdentity:
    return make_device(server, tmp_path, f"{name}-{uuid.uuid4().hex[:8]}")


class ReasonClient(PahoClient):
    """PahoClient that also keeps the CONNACK's Reason String."""

    reason_string: str | None = None

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self.reason_string = getattr(properties, "ReasonString", None)
        super()._on_connect(client, userdata, flags, reason, properties)


def refuse(server: RunningServer, identity: DeviceIdentity, client_id: str) -> str:
    """Connect over MQTT 5 with ``client_id``; the CONNACK must be 0x85; its reason."""
    client = ReasonClient(server, identity, v5=True, client_id=client_id)
    try:
        assert client.wait_connack() == CLIENT_ID_NOT_VALID
    finally:
        client.close()
    assert client.reason_string is not None, "CONNACK 0x85 without a Reason String"
    return client.reason_string


def refusal_row(server: RunningServer, device_id: str) -> dict[str, Any]:
    """The ``channel.refused`` audit row of ``device_id`` (written off the event loop)."""
    deadline = time.monotonic() + 10
    with server.admin() as admin:
        while True:
            rows = [e for e in admin.get("/v1/audit", params={
                "action": "channel.refused", "limit": 500}).json()["items"]
                if e["target"] == f"device:{device_id}"]
            if rows or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert len(rows) == 1, rows
    return rows[0]


def expected(client_id_shown: str, device_id: str) -> str:
    return (f'client id "{client_id_shown}", certificate names "{device_id}": '
            "the client id must be the device id")


def test_v5_reason_string_and_audit_row_name_both_ids(server: RunningServer,
                                                      tmp_path: Path) -> None:
    identity = device(server, tmp_path, "cid")
    reason = refuse(server, identity, "someone-else")
    assert reason == expected("someone-else", identity.device_id)
    row = refusal_row(server, identity.device_id)
    assert row["details"]["reason_code"] == "0x85"
    assert row["details"]["reason"] == reason
    # Positive control: the same certificate with the right client id is accepted.
    right = ReasonClient(server, identity, v5=True)
    try:
        assert right.wait_connack() == 0
    finally:
        right.close()


def test_a_long_client_id_is_echoed_only_in_part(server: RunningServer,
                                                 tmp_path: Path) -> None:
    identity = device(server, tmp_path, "cid-long")
    client_id = "x" * 1000
    reason = refuse(server, identity, client_id)
    assert reason == expected("x" * ECHO_CHARS + "…", identity.device_id)
    assert len(reason.encode()) <= MAX_REASON_BYTES
    assert refusal_row(server, identity.device_id)["details"]["reason"] == reason


def test_control_characters_in_the_client_id_are_escaped(server: RunningServer,
                                                        tmp_path: Path) -> None:
    identity = device(server, tmp_path, "cid-ctl")
    # A forged second log line, a terminal colour escape, a right-to-left override,
    # and a quote that would close the quoted id early.
    client_id = 'evil\nfake: ok\x1b[31m\u202e"'
    reason = refuse(server, identity, client_id)
    assert reason == expected('evil\\nfake: ok\\x1b[31m\\u202e\\"', identity.device_id)
    assert all(ch.isprintable() for ch in reason), repr(reason)
    assert refusal_row(server, identity.device_id)["details"]["reason"] == reason


def _v311_connect(client_id: str) -> bytes:
    """MQTT 3.1.1 CONNECT: clean session, keep-alive 60 s (§3.1)."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + bytes([len(body)]) + body


def test_v311_gets_identifier_rejected_and_the_audit_row(server: RunningServer,
                                                          tmp_path: Path) -> None:
    identity = device(server, tmp_path, "cid-311")
    ctx = identity.tls_context()
    with socket.create_connection(("127.0.0.1", server.mqtt_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(_v311_connect("someone-else"))
        connack = b""
        while len(connack) < 4:
            chunk = tls.recv(4 - len(connack))
            if not chunk:
                break
            connack += chunk
    # §3.2: CONNACK, remaining length 2, session present 0, return code 2.
    assert connack == bytes([0x20, 0x02, 0x00, V311_IDENTIFIER_REJECTED]), connack
    row = refusal_row(server, identity.device_id)
    assert row["details"]["reason"] == expected("someone-else", identity.device_id)
