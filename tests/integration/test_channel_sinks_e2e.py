"""Acceptance 6: telemetry published over MQTT and over HTTPS to a real ``fleetward
serve`` arrives in the SQL sink and on a NATS JetStream consumer (127.0.0.1:4222)."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import paho.mqtt.client as mqtt
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from tests.conftest import RunningServer, need_service, start_server, stop_server
from tests.integration.channel_helpers import DeviceIdentity, make_device

NATS_URL = "nats://127.0.0.1:4222"
STREAM = f"FW_E2E_{secrets.token_hex(4).upper()}"
PREFIX = f"fwe2e{secrets.token_hex(3)}"


def _nats_reachable() -> None:
    async def probe() -> None:
        connection = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
        await connection.jetstream().account_info()
        await connection.close()
    try:
        asyncio.run(probe())
    except Exception as exc:
        need_service(f"NATS JetStream at {NATS_URL}: {exc!r}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    _nats_reachable()
    s = start_server(tmp_path_factory.mktemp("sinks") / "data", settings={
        "sinks": {"nats_url": NATS_URL, "nats_stream": STREAM, "nats_subject_prefix": PREFIX}})
    yield s
    stop_server(s)

    async def drop_stream() -> None:
        connection = await nats.connect(NATS_URL, connect_timeout=2)
        try:
            await connection.jetstream().delete_stream(STREAM)
        finally:
            await connection.close()
    asyncio.run(drop_stream())


def publish_mqtt(server: RunningServer, identity: DeviceIdentity, records: list[dict[str, Any]],
                 message_type: str) -> list[int]:
    """Publish at QoS 1 over MQTT 5 and return the PUBACK reason codes."""
    acked = threading.Event()
    codes: dict[int, int] = {}
    connected = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=identity.device_id,
                         protocol=mqtt.MQTTv5)
    client.tls_set_context(identity.tls_context())
    client.on_connect = lambda c, u, f, reason, p: connected.set()

    def on_publish(c: Any, u: Any, mid: int, reason: Any, p: Any) -> None:
        codes[mid] = reason.value
        if len(codes) == len(records):
            acked.set()
    client.on_publish = on_publish
    client.connect("localhost", server.mqtt_port)
    client.loop_start()
    try:
        assert connected.wait(10)
        mids = [client.publish(f"devices/{identity.device_id}/telemetry/{message_type}",
                               json.dumps(r), qos=1).mid for r in records]
        assert acked.wait(10), "not every PUBACK arrived"
    finally:
        client.disconnect()
        client.loop_stop()
    return [codes[m] for m in mids]


async def consume(subject: str, expected: int) -> list[dict[str, Any]]:
    connection = await nats.connect(NATS_URL, connect_timeout=2)
    try:
        js = connection.jetstream()
        sub = await js.pull_subscribe(subject, stream=STREAM, config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL))
        out: list[dict[str, Any]] = []
        while len(out) < expected:
            try:
                batch = await sub.fetch(expected - len(out), timeout=5)
            except nats.errors.TimeoutError:
                break
            for message in batch:
                out.append(json.loads(message.data))
                await message.ack()
        # One more short fetch: nothing beyond what was published may be there.
        try:
            extra = await sub.fetch(1, timeout=0.5)
            out.extend(json.loads(m.data) for m in extra)
        except nats.errors.TimeoutError:
            pass
        return out
    finally:
        await connection.close()


def stored(server: RunningServer, device_id: str) -> list[dict[str, Any]]:
    with server.admin() as admin:
        response = admin.get(f"/v1/devices/{device_id}/messages", params={"limit": 100})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def test_mqtt_and_https_telemetry_reach_sql_and_jetstream(server: RunningServer,
                                                          tmp_path: Path) -> None:
    identity = make_device(server, tmp_path, "sink.dev:1")  # '.' and ':' need encoding
    mqtt_records = [{"seq": i, "via": "mqtt"} for i in range(5)]
    assert publish_mqtt(server, identity, mqtt_records, "temperature") == [0] * 5
    with httpx.Client(base_url=f"https://localhost:{server.device_port}",
                      verify=identity.tls_context(), timeout=10) as client:
        for i in range(3):
            response = client.post("/v1/telemetry/temperature", json={"seq": i, "via": "https"})
            assert response.status_code == 202, response.text
        event = client.post("/v1/events", json={"type": "door", "data": {"open": True}})
        assert event.status_code == 202, event.text

    rows = stored(server, identity.device_id)
    assert [(r["channel"], r["kind"], r["payload"]) for r in rows] == (
        [("mqtt", "telemetry", r) for r in mqtt_records]
        + [("https", "telemetry", {"seq": i, "via": "https"}) for i in range(3)]
        + [("https", "event", {"open": True})])

    encoded_id = "sink%2Edev:1"
    subject = f"{PREFIX}.acme.default.{encoded_id}.>"
    received = asyncio.run(consume(subject, 9))
    assert len(received) == 9
    assert sorted((m["channel"], m["kind"], json.dumps(m["payload"], sort_keys=True))
                  for m in received) == sorted(
        (r["channel"], r["kind"], json.dumps(r["payload"], sort_keys=True)) for r in rows)
    assert {m["device_id"] for m in received} == {identity.device_id}


def test_refused_telemetry_reaches_no_sink(server: RunningServer, tmp_path: Path) -> None:
    identity = make_device(server, tmp_path, "sink-refused")
    with httpx.Client(base_url=f"https://localhost:{server.device_port}",
                      verify=identity.tls_context(), timeout=10) as client:
        not_json = client.post("/v1/telemetry/temperature", content=b"not json",
                               headers={"Content-Type": "application/json"})
        assert not_json.status_code == 400
        assert not_json.headers["content-type"].startswith("application/problem+json")
        other = client.post("/v1/telemetry", json={"type": "Bad Type!", "data": {}})
        assert other.status_code in (400, 422)
    assert stored(server, identity.device_id) == []
    assert asyncio.run(consume(f"{PREFIX}.acme.default.sink-refused.>", 1)) == []
