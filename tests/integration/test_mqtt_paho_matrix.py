"""Acceptance 3 (MQTT part): a paho-mqtt 2.x matrix against a real `fleetward serve`,
MQTT 3.1.1 and 5, times QoS 0 and 1, times clean and persistent sessions.

Threats: a message lost or duplicated on the way from one device to another; a
persistent session (3.1.1 Clean Session 0, §3.1.2.4; 5.0 Clean Start 0 with a Session
Expiry Interval, §3.1.2.4, §3.1.2.11.2) that forgets its subscription or the QoS 1
messages queued while the device was away, or reports Session Present wrongly
(§3.2.2.2); a clean session that still delivers what was queued for an earlier one.

Two lab devices: the publisher writes ``status/<publisher>`` (its own status topic),
the subscriber reads it (the lab policy lets every device read ``status/+``). A marker
message published last bounds every "nothing else arrived" check without sleeping.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningServer, start_server, stop_server
from tests.integration.mqtt_helpers import PahoClient, lab_device, setup_lab

MESSAGES = 50  # per phase
SESSION_EXPIRY_SECONDS = 300  # 5.0 persistent sessions; far longer than a test


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("mqtt-paho") / "data"
    s = start_server(data_dir)
    setup_lab(s)
    yield s
    stop_server(s)


@pytest.mark.parametrize("persistent", [False, True], ids=["clean", "persistent"])
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("v5", [False, True], ids=["mqtt311", "mqtt5"])
def test_paho_matrix(server: RunningServer, tmp_path: Path, v5: bool, qos: int,
                     persistent: bool) -> None:
    tag = f"{'v5' if v5 else 'v311'}-q{qos}-{'p' if persistent else 'c'}-{uuid.uuid4().hex[:6]}"
    pub_id = lab_device(server, tmp_path, f"mx-pub-{tag}")
    sub_id = lab_device(server, tmp_path, f"mx-sub-{tag}")
    topic = f"status/{pub_id.device_id}"

    def subscriber() -> PahoClient:
        return PahoClient(server, sub_id, v5=v5, persistent=persistent,
                          session_expiry_seconds=SESSION_EXPIRY_SECONDS)

    publisher = PahoClient(server, pub_id, v5=v5)
    sub = subscriber()
    try:
        assert publisher.wait_connack() == 0
        assert sub.wait_connack() == 0
        assert sub.session_present is False  # a new session either way (§3.2.2.2)
        assert sub.subscribe(topic, qos) == [qos]

        # Live: every message once, in order (§4.6), at the granted QoS.
        sent = [f"live-{i}".encode() for i in range(MESSAGES)]
        for payload in sent:
            assert publisher.publish(topic, payload, qos) == 0
        live = sub.take(MESSAGES)
        assert [m.payload for m in live] == sent
        assert {(m.topic, m.qos, m.retain) for m in live} == {(topic, qos, False)}

        # Away: a normal DISCONNECT, then QoS 1 messages the session may have to keep.
        sub.close()
        offline = [f"offline-{i}".encode() for i in range(MESSAGES)]
        for payload in offline:
            assert publisher.publish(topic, payload, 1) == 0

        sub = subscriber()
        assert sub.wait_connack() == 0
        assert sub.session_present is persistent
        if persistent:
            # The subscription survived: no new SUBSCRIBE before the marker.
            assert publisher.publish(topic, b"marker", 1) == 0
            got = sub.take_until(b"marker")
            payloads = [m.payload for m in got[:-1]]
            if qos == 1:
                # Queued at the subscription's QoS 1 and sent on reconnect (§4.4; 5.0
                # §3.1.2.4), before anything routed after the reconnect.
                assert payloads == offline
                assert {m.qos for m in got} == {1}
            else:
                # Delivered at QoS 0 (min of publish and subscription QoS, §3.8.4):
                # the server may drop them for an absent client, never invent or repeat.
                assert len(payloads) == len(set(payloads)) and set(payloads) <= set(offline)
        else:
            # Clean: no subscription, nothing queued. What the publisher sends before
            # the new SUBSCRIBE goes nowhere; the marker after it is all that arrives.
            assert publisher.publish(topic, b"unsubscribed", 1) == 0
            assert sub.subscribe(topic, qos) == [qos]
            assert publisher.publish(topic, b"marker", 1) == 0
            got = sub.take_until(b"marker")
            assert [m.payload for m in got] == [b"marker"]
    finally:
        sub.close()
        publisher.close()
