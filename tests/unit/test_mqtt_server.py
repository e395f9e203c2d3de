"""The MQTT server over real TLS sockets on 127.0.0.1, with real certificates, paho-mqtt
2.x clients and a raw client for exact bytes. Each threat closes only its own
connection: a bystander device keeps receiving its commands."""

from __future__ import annotations

import datetime as dt
import itertools
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetward.clock import FrozenClock
from fleetward.config import MqttConfig
from fleetward.edge.mqtt import broker as broker_module
from fleetward.edge.mqtt import codec as c
from tests.unit.mqtt_support import PahoDevice, Pki, RawClient, ServerThread, pump, wait_until

V311, V5 = c.MQTT_311, c.MQTT_5
VERSIONS = [pytest.param(V311, id="v3.1.1"), pytest.param(V5, id="v5")]
MONITOR_RULES = [("allow", "mqtt:subscribe", "devices/+/telemetry/#"),
                 ("allow", "mqtt:receive", "devices/+/telemetry/#"),
                 ("allow", "mqtt:subscribe", "devices/+/events/#"),
                 ("allow", "mqtt:receive", "devices/+/events/#")]
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("mqtt-pki"))


@pytest.fixture
def make_server(pki: Pki) -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def make(clock: FrozenClock | None = None, **limits: Any) -> ServerThread:
        limits.setdefault("connect_timeout_seconds", 2)
        server = ServerThread(pki, MqttConfig(**limits), clock)
        server.gate.extra["monitor"] = list(MONITOR_RULES)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server()


def frozen() -> FrozenClock:
    return FrozenClock(dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC))


def connected(server: ServerThread, device_id: str, version: int = V5,
              **kwargs: Any) -> RawClient:
    client = RawClient(server, device_id, version)
    connack = client.connect(device_id, **kwargs)
    assert connack.reason_code == 0, connack
    return client


def subscribe(client: RawClient, topic_filter: str, qos: int = 1, *,
              properties: c.Properties = c.EMPTY_PROPERTIES, **options: Any) -> tuple[int, ...]:
    packet_id = next(_ids) % 65535 + 1
    client.send(c.Subscribe(packet_id, (c.Subscription(topic_filter, qos, **options),),
                            properties))
    suback = client.expect(c.Suback)
    assert suback.packet_id == packet_id
    return suback.reason_codes


def codes(packets: list[c.Packet]) -> list[int | None]:
    """The reason codes of what the server sent before it closed."""
    return [getattr(packet, "reason_code", None) for packet in packets]


def expiry(seconds: int) -> c.Properties:
    return c.Properties(session_expiry_interval=seconds)


class Bystander:
    """Another device on the same server that must keep working."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.client = connected(server, "bystander")
        assert subscribe(self.client, "devices/bystander/commands/#") == (1,)

    def still_served(self) -> None:
        assert self.server.deliver("devices/bystander/commands/check", b"ok") == 1
        publish = self.client.expect(c.Publish)
        assert publish.payload == b"ok"
        self.client.send(c.Puback(publish.packet_id or 0))
        self.client.ping()


# --- the paho-mqtt 2.x matrix -----------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("clean", [True, False], ids=["clean", "persistent"])
def test_paho_matrix_own_topics(server: ServerThread, version: int, qos: int,
                                clean: bool) -> None:
    expiry_seconds = None if clean else 300
    monitor = PahoDevice(server, "monitor", version, clean=clean, session_expiry=expiry_seconds)
    assert monitor.connack == (False, 0)
    assert monitor.subscribe("devices/+/telemetry/#", qos) == [qos]
    device = PahoDevice(server, "d1", version)
    device.publish("devices/d1/telemetry/temp", b"21.5", qos)
    pump([monitor, device], lambda: len(monitor.messages) == 1, what="telemetry")
    assert (monitor.messages[0].topic, monitor.messages[0].payload,
            monitor.messages[0].qos) == ("devices/d1/telemetry/temp", b"21.5", qos)
    assert [(a.device_id, a.topic, a.qos) for a in server.hooks.accepted] == [
        ("d1", "devices/d1/telemetry/temp", qos)]

    # Commands from the server reach the device on its own topic.
    assert device.subscribe("devices/d1/commands/#", qos) == [qos]
    assert server.deliver("devices/d1/commands/reboot", b"{}", qos) == 1
    pump([device], lambda: len(device.messages) == 1, what="command")
    assert device.messages[0].topic == "devices/d1/commands/reboot"

    # Persistent sessions keep subscriptions and QoS 1 messages while away; clean ones
    # (and QoS 0) do not.
    monitor.disconnect()
    device.publish("devices/d1/telemetry/temp", b"22.0", qos)
    again = PahoDevice(server, "monitor", version, clean=False, session_expiry=expiry_seconds)
    assert again.connack == (not clean, 0)
    if not clean and qos == 1:
        pump([again], lambda: len(again.messages) == 1, what="queued message")
        assert again.messages[0].payload == b"22.0"
    else:
        # Nothing was kept: the first message after (re)subscribing is a new marker.
        if clean:
            assert again.subscribe("devices/+/telemetry/#", qos) == [qos]
        device.publish("devices/d1/telemetry/marker", b"m", 1)
        pump([again, device], lambda: len(again.messages) >= 1, what="marker")
        assert [m.payload for m in again.messages] == [b"m"]


def test_paho_refused_publish_gets_puback_0x87(server: ServerThread) -> None:
    device = PahoDevice(server, "d1", V5)
    mid = device.publish("devices/d2/telemetry/temp", b"1", 1)
    assert device.pubacks[mid] == 0x87
    assert device.subscribe("devices/d2/commands/#", 1) == [0x87]


# --- CONNECT ----------------------------------------------------------------------------------


def test_connack_announces_what_the_server_enforces(make_server: Callable[..., ServerThread]
                                                    ) -> None:
    server = make_server(max_inflight_messages=7, max_packet_size_bytes=50_000,
                         max_keepalive_seconds=100, max_session_expiry_seconds=600)
    client = RawClient(server, "d1")
    connack = client.connect("d1", keep_alive=60, properties=expiry(0xFFFF_FFFF))
    props = connack.properties
    assert (props.maximum_qos, props.retain_available, props.topic_alias_maximum,
            props.receive_maximum, props.maximum_packet_size,
            props.wildcard_subscription_available, props.shared_subscription_available) == (
        1, 1, 0, 7, 50_000, 1, 0)
    assert props.session_expiry_interval == 600  # capped (§3.2.2.3.2)
    assert props.server_keep_alive is None  # 60 is within the maximum
    for asked in (0, 1000):  # 0 (off) or above the maximum: Server Keep Alive (§3.2.2.3.14)
        other = RawClient(server, "d2")
        assert other.connect("d2", keep_alive=asked).properties.server_keep_alive == 100


REFUSALS = [
    # (case, version, client id, connect options, expected CONNACK code)
    ("client id is another device", V5, "d2", {}, 0x85),
    ("client id is another device", V311, "d2", {}, 2),
    ("empty client id", V5, "", {}, 0x85),
    ("empty client id", V311, "", {}, 2),
    ("certificate banned", V5, "banned", {}, 0x8A),
    ("certificate banned", V311, "banned", {}, 5),
    ("will on another device's topic", V5, "d1",
     {"will": c.Will("devices/d2/events/x", b"")}, 0x87),
    ("will on another device's topic", V311, "d1",
     {"will": c.Will("devices/d2/events/x", b"")}, 5),
    ("will QoS 2 above Maximum QoS", V5, "d1",
     {"will": c.Will("devices/d1/events/x", b"", 2)}, 0x9B),
    ("will topic with a wildcard", V5, "d1", {"will": c.Will("devices/d1/events/#", b"")},
     0x90),
    ("enhanced authentication", V5, "d1",
     {"properties": c.Properties(authentication_method="SCRAM-SHA-1")}, 0x8C),
]


@pytest.mark.parametrize(("case", "version", "client_id", "options", "code"), REFUSALS,
                         ids=[f"{r[0]}-{'v5' if r[1] == V5 else 'v3.1.1'}" for r in REFUSALS])
def test_connect_refusals(server: ServerThread, case: str, version: int, client_id: str,
                          options: dict[str, Any], code: int) -> None:
    server.gate.banned.add("banned")
    device = "banned" if case == "certificate banned" else "d1"
    client = RawClient(server, device, version)
    client.send(c.Connect(client_id or "", version, **options))
    packets = client.until_closed()
    assert len(packets) == 1 and isinstance(packets[0], c.Connack)
    assert packets[0].reason_code == code and not packets[0].session_present
    if version == V5:
        assert packets[0].properties.reason_string
    assert server.live.count() == 0
    # Negative control: the same device with the right CONNECT is admitted.
    if device == "d1":
        connected(server, "d1", version)


def test_connect_must_come_first_and_once(server: ServerThread) -> None:
    bystander = Bystander(server)
    early = RawClient(server, "d1")
    early.send(c.encode(c.Publish("devices/d1/telemetry/t", b"x"), V5))
    assert early.until_closed() == []  # §3.1.0-1: no response, just closed
    twice = connected(server, "d2")
    twice.send(c.Connect("d2", V5))
    assert codes(twice.until_closed()) == [0x82]
    bystander.still_served()


def test_no_connect_in_time_closes(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(connect_timeout_seconds=1)
    silent = RawClient(server, "d1")
    assert silent.until_closed(timeout=3) == []
    wait_until(lambda: server.stats().connections == 0, what="connection gone")


def test_unsupported_protocol_version(server: ServerThread) -> None:
    client = RawClient(server, "d1", V311)
    client.send(b"\x10\x10\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x02d1")
    packets = client.until_closed()
    assert packets == [c.Connack(False, 1)]  # 3.1.1 §3.2.2.3: unacceptable protocol level


# --- authorization ----------------------------------------------------------------------------


def test_v5_denials_carry_reason_codes(server: ServerThread) -> None:
    client = connected(server, "d1")
    client.send(c.Publish("devices/d2/telemetry/t", b"x", 1, packet_id=1))
    puback = client.expect(c.Puback)
    assert (puback.packet_id, puback.reason_code) == (1, 0x87)
    assert "not authorized" in (puback.properties.reason_string or "")
    client.send(c.Publish("devices/d2/telemetry/t", b"x", 0))  # QoS 0: dropped, counted
    client.ping()
    assert subscribe(client, "devices/d2/commands/#") == (0x87,)
    assert subscribe(client, "devices/+/commands/#") == (0x87,)  # wider than allowed
    assert subscribe(client, "$share/g/devices/d1/commands/#") == (0x9E,)
    assert subscribe(client, "devices/#/commands") == (0x8F,)
    assert subscribe(client, "devices/d1/commands/#", 2) == (1,)  # negative control
    assert server.hooks.accepted == []
    assert len(server.hooks.audited("mqtt.publish_denied")) == 2
    assert len(server.hooks.audited("mqtt.subscribe_denied")) == 2
    assert server.stats().publishes_denied == 2


def test_v311_denials_use_the_nearest_behaviour(server: ServerThread) -> None:
    bystander = Bystander(server)
    client = connected(server, "d1", V311)
    assert subscribe(client, "devices/d2/commands/#") == (0x80,)
    assert subscribe(client, "$share/g/devices/d1/commands/#") == (0x80,)
    assert subscribe(client, "devices/d1/commands/#", 2) == (1,)  # QoS 2 granted as 1
    client.send(c.Publish("devices/d2/telemetry/t", b"x", 1, packet_id=1))
    assert client.until_closed() == []  # 3.1.1 §3.3.5: cannot say no, so it closes
    bystander.still_served()


def test_sink_refusal_reason_codes(server: ServerThread) -> None:
    server.hooks.refuse["devices/d1/telemetry/bad"] = 0x99
    server.hooks.refuse["devices/d1/telemetry/full"] = 0x97
    client = connected(server, "d1")
    for packet_id, (topic, code) in enumerate([("bad", 0x99), ("full", 0x97), ("ok", 0)], 1):
        client.send(c.Publish(f"devices/d1/telemetry/{topic}", b"{}", 1, packet_id=packet_id))
        puback = client.expect(c.Puback)
        assert (puback.packet_id, puback.reason_code) == (packet_id, code)
    v311 = connected(server, "d2", V311)
    server.hooks.refuse["devices/d2/telemetry/bad"] = 0x99
    v311.send(c.Publish("devices/d2/telemetry/bad", b"{}", 1, packet_id=1))
    assert v311.until_closed() == []


@pytest.mark.parametrize("delay", [0.0, 0.01], ids=["sink-answers-at-once", "sink-suspends"])
def test_failing_sink_fails_closed(server: ServerThread, delay: float) -> None:
    server.hooks.fail.add("devices/d1/telemetry/t")
    server.hooks.max_delay_seconds = delay
    monitor = connected(server, "monitor")
    subscribe(monitor, "devices/+/telemetry/#", 0)
    client = connected(server, "d1")
    client.send(c.Publish("devices/d1/telemetry/t", b"1", 1, packet_id=1))
    assert client.expect(c.Puback).reason_code == 0x80  # not accepted, not routed
    client.send(c.Publish("devices/d1/telemetry/ok", b"2", 1, packet_id=2))
    assert client.expect(c.Puback).reason_code == 0
    assert monitor.expect(c.Publish).payload == b"2"


def test_policy_change_applies_to_the_live_connection(server: ServerThread) -> None:
    from tests.unit.mqtt_support import RulePolicy, default_rules

    client = connected(server, "d1")
    client.send(c.Publish("devices/d1/telemetry/t", b"1", 1, packet_id=1))
    assert client.expect(c.Puback).reason_code == 0
    admission = server.gate.current("d1")
    locked = RulePolicy([("deny", "mqtt:publish", "devices/d1/telemetry/#"),
                         *default_rules("d1")])
    server.call(lambda: setattr(admission, "policy", locked))  # the gate swaps in place
    client.send(c.Publish("devices/d1/telemetry/t", b"2", 1, packet_id=2))
    assert client.expect(c.Puback).reason_code == 0x87


def test_payload_format_indicator_is_checked(server: ServerThread) -> None:
    client = connected(server, "d1")
    declared_utf8 = c.Properties(payload_format_indicator=1)
    client.send(c.Publish("devices/d1/telemetry/t", b"\xff\xfe", 1, packet_id=1,
                          properties=declared_utf8))
    assert client.expect(c.Puback).reason_code == 0x99
    client.send(c.Publish("devices/d1/telemetry/t", "é".encode(), 1, packet_id=2,
                          properties=declared_utf8))
    assert client.expect(c.Puback).reason_code == 0


# --- retained messages, wills -----------------------------------------------------------------


def test_retained_set_delivered_and_cleared(server: ServerThread) -> None:
    device = connected(server, "d1")
    device.send(c.Publish("devices/d1/telemetry/state", b"on", 1, retain=True, packet_id=1))
    assert device.expect(c.Puback).reason_code == 0
    assert server.stats().retained == 1

    monitor = connected(server, "monitor")
    assert subscribe(monitor, "devices/+/telemetry/#") == (1,)
    retained = monitor.expect(c.Publish)
    assert (retained.topic, retained.payload, retained.retain) == (
        "devices/d1/telemetry/state", b"on", True)  # §3.3.1.3: RETAIN 1 on subscribe
    monitor.send(c.Puback(retained.packet_id or 0))

    device.send(c.Publish("devices/d1/telemetry/state", b"", 1, retain=True, packet_id=2))
    assert device.expect(c.Puback).reason_code == 0
    cleared = monitor.expect(c.Publish)  # still forwarded, RETAIN 0 to live subscribers
    assert (cleared.payload, cleared.retain) == (b"", False)
    monitor.send(c.Puback(cleared.packet_id or 0))
    assert server.stats().retained == 0
    late = connected(server, "monitor")  # takes over; fresh session, nothing retained
    assert subscribe(late, "devices/+/telemetry/#") == (1,)
    late.ping()


def test_retain_handling_and_retain_as_published(server: ServerThread) -> None:
    device = connected(server, "d1")
    device.send(c.Publish("devices/d1/telemetry/state", b"on", 1, retain=True, packet_id=1))
    device.expect(c.Puback)
    monitor = connected(server, "monitor")
    assert subscribe(monitor, "devices/d1/telemetry/#", retain_handling=2) == (1,)
    monitor.ping()  # 2: never send retained
    assert subscribe(monitor, "devices/d1/telemetry/#", retain_handling=1) == (1,)
    monitor.ping()  # 1: only for a new subscription, and it existed
    assert subscribe(monitor, "devices/+/telemetry/#", retain_handling=1,
                     retain_as_published=True) == (1,)
    first = monitor.expect(c.Publish)
    assert first.retain
    monitor.send(c.Puback(first.packet_id or 0))
    device.send(c.Publish("devices/d1/telemetry/state", b"off", 1, retain=True, packet_id=2))
    device.expect(c.Puback)
    # One delivery for the two overlapping subscriptions (§3.3.4); RAP keeps RETAIN.
    forwarded = monitor.expect(c.Publish)
    assert (forwarded.payload, forwarded.retain) == (b"off", True)
    monitor.send(c.Puback(forwarded.packet_id or 0))
    monitor.ping()


def test_retained_store_limit(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(max_retained_messages=1)
    device = connected(server, "d1")
    device.send(c.Publish("devices/d1/telemetry/a", b"1", 1, retain=True, packet_id=1))
    assert device.expect(c.Puback).reason_code == 0
    device.send(c.Publish("devices/d1/telemetry/b", b"1", 1, retain=True, packet_id=2))
    assert device.expect(c.Puback).reason_code == 0x97
    device.send(c.Publish("devices/d1/telemetry/a", b"2", 1, retain=True, packet_id=3))
    assert device.expect(c.Puback).reason_code == 0  # replacing needs no room


def test_retained_store_byte_budget(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(max_retained_bytes=10)
    device = connected(server, "d1")
    device.send(c.Publish("devices/d1/telemetry/a", b"12345678", 1, retain=True, packet_id=1))
    assert device.expect(c.Puback).reason_code == 0
    device.send(c.Publish("devices/d1/telemetry/b", b"123", 1, retain=True, packet_id=2))
    assert device.expect(c.Puback).reason_code == 0x97  # 8 + 3 > 10
    device.send(c.Publish("devices/d1/telemetry/a", b"1234567890", 1, retain=True,
                          packet_id=3))
    assert device.expect(c.Puback).reason_code == 0  # a replacement frees the old bytes
    device.send(c.Publish("devices/d1/telemetry/a", b"", 1, retain=True, packet_id=4))
    assert device.expect(c.Puback).reason_code == 0  # cleared: the budget is free again
    device.send(c.Publish("devices/d1/telemetry/b", b"123", 1, retain=True, packet_id=5))
    assert device.expect(c.Puback).reason_code == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_will_on_abnormal_close_only(server: ServerThread, version: int) -> None:
    monitor = connected(server, "monitor")
    assert subscribe(monitor, "devices/+/events/#") == (1,)
    will = c.Will("devices/d1/events/offline", b"gone", 1)

    device = connected(server, "d1", version, will=will)
    device.close()  # no DISCONNECT: abnormal (§3.1.2.5)
    published = monitor.expect(c.Publish)
    assert (published.topic, published.payload) == ("devices/d1/events/offline", b"gone")
    monitor.send(c.Puback(published.packet_id or 0))
    assert [a.topic for a in server.hooks.accepted] == ["devices/d1/events/offline"]

    polite = connected(server, "d1", version, will=will)
    polite.send(c.Disconnect())  # normal disconnection discards the will
    assert polite.until_closed() == []
    server.deliver("devices/marker/events/x", b"marker")
    assert monitor.expect(c.Publish).payload == b"marker"  # not the will


def test_v5_disconnect_with_will_message(server: ServerThread) -> None:
    monitor = connected(server, "monitor")
    subscribe(monitor, "devices/+/events/#", 0)
    device = connected(server, "d1", will=c.Will("devices/d1/events/bye", b"w"))
    device.send(c.Disconnect(0x04))
    device.until_closed()
    assert monitor.expect(c.Publish).payload == b"w"


def gone_with_a_delayed_will(make_server: Callable[..., ServerThread]
                             ) -> tuple[ServerThread, FrozenClock, RawClient, c.Will]:
    """A monitor watching events; device d1 dropped off (no DISCONNECT) with a persistent
    session and a will delayed by 30 s."""
    clock = frozen()
    server = make_server(clock=clock)
    monitor = connected(server, "monitor")
    subscribe(monitor, "devices/+/events/#", 0)
    will = c.Will("devices/d1/events/offline", b"late",
                  properties=c.Properties(will_delay_interval=30))
    device = connected(server, "d1", will=will, properties=expiry(300))
    device.close()
    wait_until(lambda: server.stats().connections == 1, what="close seen")
    return server, clock, monitor, will


def test_will_delay_and_reconnect_cancel(make_server: Callable[..., ServerThread]) -> None:
    server, clock, monitor, will = gone_with_a_delayed_will(make_server)
    clock.advance(dt.timedelta(seconds=20))
    back = RawClient(server, "d1")
    assert back.connect("d1", clean_start=False, properties=expiry(300),
                        will=will).session_present
    clock.advance(dt.timedelta(seconds=60))  # §3.1.3.2.2: reconnected in time, no will
    back.close()
    wait_until(lambda: server.stats().connections == 1, what="close seen")
    clock.advance(dt.timedelta(seconds=10))
    server.deliver("devices/marker/events/x", b"marker", 0)
    assert monitor.expect(c.Publish).payload == b"marker"
    clock.advance(dt.timedelta(seconds=30))  # now the second close's delay has passed
    assert monitor.expect(c.Publish, timeout=3).payload == b"late"


def test_delayed_will_of_a_device_revoked_meanwhile_is_not_published(
        make_server: Callable[..., ServerThread]) -> None:
    """The device dropped off with a Will Delay; the operator then revoked it. When the
    delay ends the gate is asked again and the will is dropped (and audited)."""
    server, clock, monitor, _ = gone_with_a_delayed_will(make_server)
    server.gate.banned.add("d1")  # revoked while away
    clock.advance(dt.timedelta(seconds=40))
    server.deliver("devices/marker/events/x", b"marker", 0)
    assert monitor.expect(c.Publish, timeout=3).payload == b"marker"
    wait_until(lambda: bool(server.hooks.audited("mqtt.will_denied")), what="will dropped")
    assert [a.topic for a in server.hooks.accepted] == []


def test_no_will_when_the_control_plane_closes(server: ServerThread) -> None:
    monitor = connected(server, "monitor")
    subscribe(monitor, "devices/+/events/#", 0)
    for version in (V5, V311):
        device = connected(server, "d1", version, will=c.Will("devices/d1/events/x", b"will"))
        assert server.call(lambda: server.live.close_device("d1", 0x98, "certificate revoked")
                           ) == 1
        packets = device.until_closed(timeout=1.0)  # within one second
        if version == V5:
            assert packets == [c.Disconnect(0x98, c.Properties(
                reason_string="certificate revoked"))]
        else:
            assert packets == []
        wait_until(lambda: server.live.count() == 1, what="unregistered")  # the monitor
    server.deliver("devices/marker/events/x", b"marker", 0)
    assert monitor.expect(c.Publish).payload == b"marker"


# --- sessions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_persistent_session_resumes_with_dup_redelivery(server: ServerThread,
                                                        version: int) -> None:
    opts: dict[str, Any] = {"clean_start": False}
    if version == V5:
        opts["properties"] = expiry(300)
    first = RawClient(server, "d1", version)
    assert not first.connect("d1", **opts).session_present
    assert subscribe(first, "devices/d1/commands/#") == (1,)
    assert server.deliver("devices/d1/commands/a", b"1") == 1
    unacked = first.expect(c.Publish)
    assert not unacked.dup
    first.close()
    wait_until(lambda: server.stats().connections == 0, what="close seen")
    assert server.deliver("devices/d1/commands/b", b"2") == 1  # queued while away
    assert server.deliver("devices/d1/commands/c", b"3", qos=0) == 0  # QoS 0 is not

    second = RawClient(server, "d1", version)
    assert second.connect("d1", **opts).session_present
    resent = second.expect(c.Publish)  # §4.4: same identifier, DUP=1
    assert (resent.payload, resent.dup, resent.packet_id) == (b"1", True, unacked.packet_id)
    queued = second.expect(c.Publish)
    assert (queued.payload, queued.dup) == (b"2", False)
    second.send(c.Puback(resent.packet_id or 0))
    second.send(c.Puback(queued.packet_id or 0))
    second.send(c.Disconnect())
    second.until_closed()
    third = RawClient(server, "d1", version)
    assert third.connect("d1", **opts).session_present
    third.ping()  # everything was acknowledged: nothing is resent


def test_session_expiry(make_server: Callable[..., ServerThread]) -> None:
    clock = frozen()
    server = make_server(clock=clock)
    client = connected(server, "d1", properties=expiry(60))
    subscribe(client, "devices/d1/commands/#")
    client.send(c.Disconnect())
    client.until_closed()
    clock.advance(dt.timedelta(seconds=50))
    back = RawClient(server, "d1")
    assert back.connect("d1", clean_start=False, properties=expiry(60)).session_present
    back.send(c.Disconnect())
    back.until_closed()
    wait_until(lambda: server.stats().connections == 0, what="close seen")
    assert server.stats().sessions == 1
    clock.advance(dt.timedelta(seconds=62))
    wait_until(lambda: server.stats().sessions == 0, timeout=3, what="session expired")
    assert server.deliver("devices/d1/commands/x", b"") == 0
    late = RawClient(server, "d1")
    assert not late.connect("d1", clean_start=False, properties=expiry(60)).session_present


def test_zero_expiry_and_clean_session_end_with_the_connection(server: ServerThread) -> None:
    for version in (V5, V311):
        client = connected(server, "d1", version)
        subscribe(client, "devices/d1/commands/#")
        assert server.stats().sessions == 1
        client.close()
        wait_until(lambda: server.stats().sessions == 0, what="session ended")


def test_disconnect_cannot_set_expiry_after_zero(server: ServerThread) -> None:
    client = connected(server, "d1")  # Session Expiry Interval 0
    client.send(c.Disconnect(0, expiry(60)))
    assert codes(client.until_closed()) == [0x82]


@pytest.mark.parametrize("version", VERSIONS)
def test_takeover_closes_the_old_connection_and_is_audited(server: ServerThread,
                                                           version: int) -> None:
    opts: dict[str, Any] = {"clean_start": False}
    if version == V5:
        opts["properties"] = expiry(300)
    first = RawClient(server, "d1", version)
    first.connect("d1", **opts)
    subscribe(first, "devices/d1/commands/#")
    first_source = f"127.0.0.1:{first.sock.getsockname()[1]}"
    second = RawClient(server, "d1", version)
    assert second.connect("d1", **opts).session_present  # the session continues
    packets = first.until_closed()
    if version == V5:
        assert codes(packets) == [0x8E]
    else:
        assert packets == []
    takeovers = server.hooks.audited("mqtt.session_taken_over")
    assert takeovers and takeovers[-1]["previous_source"] == first_source
    assert server.deliver("devices/d1/commands/x", b"to-second") == 1
    assert second.expect(c.Publish).payload == b"to-second"
    assert [device for device, _ in server.hooks.connects] == ["d1", "d1"]
    # A takeover with Clean Start discards the session (§3.1.2.4): nothing subscribed.
    third = RawClient(server, "d1", version)
    assert not third.connect("d1", clean_start=True).session_present
    second.until_closed()
    assert server.deliver("devices/d1/commands/y", b"") == 0


def test_deliver_checks_its_input(server: ServerThread) -> None:
    from fleetward.errors import Conflict, InvalidInput

    with pytest.raises(InvalidInput):
        server.deliver("devices/+/commands/x", b"")  # a filter is not a topic name
    with pytest.raises(InvalidInput):
        server.deliver("devices/d1/commands/x", b"", qos=3)
    full = server.call(lambda: server.server.broker.retained)
    full.limit = 0
    with pytest.raises(Conflict):
        server.deliver("devices/d1/commands/x", b"keep", retain=True)


def test_outbound_flow_control_respects_receive_maximum(server: ServerThread) -> None:
    client = connected(server, "d1", properties=c.Properties(receive_maximum=2))
    subscribe(client, "devices/d1/commands/#")
    for index in range(5):
        assert server.deliver(f"devices/d1/commands/{index}", b"%d" % index) == 1
    first, second = client.expect(c.Publish), client.expect(c.Publish)
    client.ping()  # a third PUBLISH would have come before PINGRESP
    client.send(c.Puback(first.packet_id or 0))
    assert client.expect(c.Publish).payload == b"2"
    assert second.payload == b"1"


def test_offline_queue_drops_the_oldest(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(max_queued_messages=3)
    client = connected(server, "d1", properties=expiry(300))
    subscribe(client, "devices/d1/commands/#")
    client.send(c.Disconnect())
    client.until_closed()
    wait_until(lambda: server.stats().connections == 0, what="close seen")
    for index in range(5):
        server.deliver("devices/d1/commands/x", b"%d" % index)
    back = RawClient(server, "d1")
    back.connect("d1", clean_start=False, properties=expiry(300))
    assert [back.expect(c.Publish).payload for _ in range(3)] == [b"2", b"3", b"4"]
    assert server.stats().messages_dropped == 2


@pytest.mark.parametrize("version", VERSIONS)
def test_subscriptions_per_session_are_capped(make_server: Callable[..., ServerThread],
                                              version: int) -> None:
    """Without the cap one device could grow the subscription trie without bound."""
    server = make_server(max_subscriptions_per_session=2)
    client = connected(server, "d1", version)
    assert subscribe(client, "devices/d1/commands/a") == (1,)
    assert subscribe(client, "devices/d1/commands/b") == (1,)
    over = 0x97 if version == V5 else 0x80  # v5 Quota exceeded; 3.1.1 only has Failure
    assert subscribe(client, "devices/d1/commands/c") == (over,)
    assert subscribe(client, "devices/d1/commands/a") == (1,), "re-subscribing is no new entry"
    assert server.deliver("devices/d1/commands/c", b"x") == 0
    assert server.deliver("devices/d1/commands/b", b"y") == 1
    assert client.expect(c.Publish).payload == b"y"


def test_connections_beyond_the_listener_budget_are_reset_and_reported(
        make_server: Callable[..., ServerThread]) -> None:
    server = make_server(max_connections=2)
    bystander = Bystander(server)
    first = connected(server, "d1")
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        connected(server, "d2")  # reset before TLS: no handshake CPU spent on it
    stats = server.stats()
    assert (stats.connections, stats.handshaking, stats.reset_over_limit) == (2, 0, 1)
    wait_until(lambda: server.hooks.audited("mqtt.connections_limited") != [],
               what="limit audited")
    assert server.hooks.audited("mqtt.connections_limited")[0]["limit"] == "max_connections"
    bystander.still_served()
    first.send(c.Disconnect())
    first.until_closed()
    wait_until(lambda: server.stats().connections == 1, what="slot freed")
    connected(server, "d2").ping()  # negative control: room again


def test_a_certificate_refused_in_the_handshake_is_audited(
        make_server: Callable[..., ServerThread], tmp_path: Path) -> None:
    server = make_server()
    foreign = Pki.create(tmp_path / "foreign", name="Somebody Else's CA")
    context = server.pki.client_context(None)
    cert, key = foreign.device("d1")
    context.load_cert_chain(str(cert), str(key))
    client = RawClient(server, None, ctx=context)
    client.send(c.Pingreq())
    assert client.until_closed() == []
    wait_until(lambda: server.hooks.audited("mqtt.tls_refused") != [], what="refusal audited")
    assert "unable to get local issuer" in server.hooks.audited("mqtt.tls_refused")[0]["reason"]
    assert server.stats().handshaking == 0


def test_a_device_reconnecting_in_a_loop_does_not_grow_the_timer_heap(
        make_server: Callable[..., ServerThread], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each detach schedules the session's expiry (here a week away); each resume
    leaves that entry stale. Without compaction the heap grows by one per cycle."""
    monkeypatch.setattr(broker_module, "TIMER_COMPACTION_FLOOR", 16)
    server = make_server()
    for _ in range(60):
        client = RawClient(server, "d1")
        assert client.connect("d1", clean_start=False,
                              properties=expiry(604800)).reason_code == 0
        client.sock.close()  # a flapping link: no DISCONNECT
        wait_until(lambda: server.stats().connections == 0, what="detached")
    timers = server.call(lambda: server.server.broker.timer_count)
    assert timers <= 16 + 4 * 1 + 1, f"{timers} timer entries for one session"
    back = RawClient(server, "d1")  # the live entry survived compaction: session kept
    assert back.connect("d1", clean_start=False, properties=expiry(300)).session_present


def test_acknowledgements_and_routing_keep_arrival_order(server: ServerThread) -> None:
    server.hooks.max_delay_seconds = 0.02  # sink answers in random order
    monitor = connected(server, "monitor")
    subscribe(monitor, "devices/+/telemetry/#", 0)
    device = connected(server, "d1")
    device.send(b"".join(c.encode(c.Publish("devices/d1/telemetry/seq", b"%d" % n, 1,
                                            packet_id=n), V5) for n in range(1, 41)))
    assert [device.expect(c.Puback).packet_id for _ in range(40)] == list(range(1, 41))
    assert [monitor.expect(c.Publish).payload for _ in range(40)] == [
        b"%d" % n for n in range(1, 41)]


# --- QoS 2, topic aliases, other v5 features --------------------------------------------------


def test_qos2_from_v5_is_refused(server: ServerThread) -> None:
    bystander = Bystander(server)
    client = connected(server, "d1")
    client.send(c.Publish("devices/d1/telemetry/t", b"x", 2, packet_id=1))
    assert codes(client.until_closed()) == [0x9B]
    bystander.still_served()


def test_qos2_from_v311_is_delivered_exactly_once(server: ServerThread) -> None:
    monitor = connected(server, "monitor", V311)
    assert subscribe(monitor, "devices/+/telemetry/#", 2) == (1,)
    device = connected(server, "d1", V311)
    publish = c.Publish("devices/d1/telemetry/t", b"once", 2, packet_id=7)
    device.send(publish)
    assert device.expect(c.Pubrec) == c.Pubrec(7)
    device.send(c.Publish("devices/d1/telemetry/t", b"once", 2, dup=True, packet_id=7))
    assert device.expect(c.Pubrec) == c.Pubrec(7)  # acknowledged again, not delivered again
    device.send(c.Pubrel(7))
    assert device.expect(c.Pubcomp) == c.Pubcomp(7)
    delivered = monitor.expect(c.Publish)
    assert (delivered.payload, delivered.qos) == (b"once", 1)  # outbound QoS at most 1
    monitor.send(c.Puback(delivered.packet_id or 0))
    monitor.ping()
    assert len(server.hooks.accepted) == 1


def test_topic_alias_is_refused(server: ServerThread) -> None:
    client = connected(server, "d1")
    client.send(c.Publish("devices/d1/telemetry/t", b"x", 0,
                          properties=c.Properties(topic_alias=1)))
    assert codes(client.until_closed()) == [0x94]


def test_subscription_identifiers_no_local_and_unsubscribe(server: ServerThread) -> None:
    server.gate.extra["d1"] = [("allow", "mqtt:subscribe", "devices/d1/#"),
                               ("allow", "mqtt:receive", "devices/d1/#")]
    client = connected(server, "d1")
    assert subscribe(client, "devices/d1/telemetry/#", no_local=True,
                     properties=c.Properties(subscription_identifiers=(7,))) == (1,)
    client.send(c.Publish("devices/d1/telemetry/t", b"own", 1, packet_id=1))
    assert client.expect(c.Puback).reason_code == 0  # and no echo (No Local)
    assert server.deliver("devices/d1/telemetry/t", b"server") == 1
    delivered = client.expect(c.Publish)
    assert (delivered.payload, delivered.properties.subscription_identifiers) == (
        b"server", (7,))
    client.send(c.Puback(delivered.packet_id or 0))
    client.send(c.Unsubscribe(9, ("devices/d1/telemetry/#", "devices/d1/nothing")))
    assert client.expect(c.Unsuback) == c.Unsuback(9, (0x00, 0x11))
    assert server.deliver("devices/d1/telemetry/t", b"gone") == 0


def test_dollar_topics_are_not_matched_by_wildcards(server: ServerThread) -> None:
    server.gate.extra["d1"] = [("allow", "mqtt:subscribe", "#"), ("allow", "mqtt:receive", "#"),
                               ("allow", "mqtt:subscribe", "$SYS/#"),
                               ("allow", "mqtt:receive", "$SYS/#")]
    client = connected(server, "d1")
    subscribe(client, "#")
    assert server.deliver("$SYS/load", b"1") == 0
    subscribe(client, "$SYS/#")
    assert server.deliver("$SYS/load", b"2") == 1


def test_message_expiry(make_server: Callable[..., ServerThread]) -> None:
    clock = frozen()
    server = make_server(clock=clock)
    device = connected(server, "d1")
    device.send(c.Publish("devices/d1/telemetry/state", b"fresh", 1, retain=True, packet_id=1,
                          properties=c.Properties(message_expiry_interval=10)))
    device.expect(c.Puback)
    clock.advance(dt.timedelta(seconds=4))
    monitor = connected(server, "monitor")
    subscribe(monitor, "devices/+/telemetry/#")
    retained = monitor.expect(c.Publish)
    assert retained.properties.message_expiry_interval == 6  # §3.3.2.3.3: time left
    clock.advance(dt.timedelta(seconds=7))
    late = connected(server, "monitor")
    subscribe(late, "devices/+/telemetry/#")
    late.ping()  # expired: not sent


# --- malformed input closes only that connection ----------------------------------------------

SIXTY_FOUR_KIB = "x" * (65535 - len("devices/d1/telemetry/"))


def _publish(topic: str, payload: bytes = b"", **kwargs: Any) -> Callable[[int, str], bytes]:
    return lambda version, device: c.encode(
        c.Publish(topic.format(device=device), payload, **kwargs), version)


def _raw(data: bytes) -> Callable[[int, str], bytes]:
    return lambda version, device: data


MALFORMED_INPUT: list[tuple[str, Callable[[int, str], bytes], int, bool]] = [
    # (threat, bytes sent after CONNACK for (version, device id), v5 DISCONNECT reason
    #  code, also a threat in 3.1.1)
    ("invalid UTF-8 topic", _raw(b"\x30\x05\x00\x02\xc3\x28\x00"), 0x81, True),
    ("U+0000 in the topic", _raw(b"\x30\x06\x00\x03a\x00b\x00"), 0x81, True),
    ("64 KiB topic", _publish("devices/{device}/telemetry/" + SIXTY_FOUR_KIB), 0x90, True),
    ("wildcard in a topic name", _publish("devices/{device}/telemetry/#"), 0x90, True),
    ("remaining length of five bytes", _raw(b"\x30\xff\xff\xff\xff\x01"), 0x81, True),
    ("remaining length shorter than the content", _raw(b"\x30\x03\x00\x05ab"), 0x81, True),
    ("packet above the maximum size", _publish("devices/{device}/telemetry/t", b"x" * 9000),
     0x95, True),
    ("reserved packet type", _raw(b"\x00\x00"), 0x81, True),
    ("PUBREC for QoS 2 never sent", lambda v, d: c.encode(c.Pubrec(1), v), 0x82, True),
    ("client sends CONNACK", lambda v, d: c.encode(c.Connack(), v), 0x82, True),
    ("AUTH without a method", _raw(b"\xf0\x00"), 0x82, True),
    ("subscription id in PUBLISH", _publish(
        "devices/{device}/telemetry/t", properties=c.Properties(subscription_identifiers=(1,))),
     0x82, False),
]


@pytest.mark.parametrize(("threat", "make", "code", "v311_too"), MALFORMED_INPUT,
                         ids=[row[0] for row in MALFORMED_INPUT])
def test_malformed_input_closes_only_that_connection(
        make_server: Callable[..., ServerThread], threat: str,
        make: Callable[[int, str], bytes], code: int, v311_too: bool) -> None:
    server = make_server(max_packet_size_bytes=8192 if "maximum" in threat else 262144,
                         max_topic_bytes=1024)
    bystander = Bystander(server)
    attacker = connected(server, "d1")
    attacker.send(make(V5, "d1"))
    assert codes(attacker.until_closed()) == [code]
    if v311_too:
        v311 = connected(server, "d2", V311)
        v311.send(make(V311, "d2"))
        assert v311.until_closed() == []  # 3.1.1: closed without a word (§4.8)
    bystander.still_served()
    wait_until(lambda: server.stats().connections == 1, what="attackers gone")
    assert server.hooks.accepted == []


def test_a_client_that_does_not_read_is_bounded(make_server: Callable[..., ServerThread]
                                                ) -> None:
    from fleetward.edge.mqtt.server import WRITE_BUFFER_HIGH_BYTES

    server = make_server()
    bystander = Bystander(server)
    sleeper = connected(server, "d1")  # subscribes, then never reads again
    subscribe(sleeper, "devices/d1/commands/#", 0)
    payload = b"x" * 65536
    for _ in range(400):  # 25 MiB, more than the kernel buffers hold
        server.deliver("devices/d1/commands/flood", payload, 0)
    assert server.stats().messages_dropped > 0

    def largest_buffer() -> int:
        return max(conn.transport.get_write_buffer_size()  # type: ignore[union-attr]
                   for conn in server.server._connections)

    assert server.call(largest_buffer) <= WRITE_BUFFER_HIGH_BYTES + 2 * len(payload)
    bystander.still_served()


def test_keepalive_timeout_closes_silent_clients_only(server: ServerThread) -> None:
    silent = connected(server, "d1", keep_alive=1)
    silent_v311 = connected(server, "d3", V311, keep_alive=1)
    chatty = connected(server, "d2", keep_alive=1)
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # §3.1.2.10: 1.5 x Keep Alive, then closed
        chatty.ping()
        time.sleep(0.3)
    assert codes(silent.until_closed(timeout=1)) == [0x8D]
    assert silent_v311.until_closed(timeout=1) == []
    chatty.ping()
    assert ("d1", "keep-alive timeout") in server.hooks.disconnects


# --- fuzzing through the real listener --------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(pki: Pki) -> Iterator[tuple[ServerThread, Bystander]]:
    server = ServerThread(pki, MqttConfig(connect_timeout_seconds=2, max_packet_size_bytes=4096))
    try:
        yield server, Bystander(server)
    finally:
        server.stop()


@settings(max_examples=40, deadline=None)
@given(junk=st.binary(min_size=1, max_size=400),
       version=st.sampled_from([None, V311, V5]))
def test_random_bytes_close_only_that_connection(
        fuzz_server: tuple[ServerThread, Bystander], junk: bytes, version: int | None) -> None:
    server, bystander = fuzz_server
    client = RawClient(server, "fuzz", version or V5)
    try:
        if version is not None:
            assert client.connect("fuzz").reason_code == 0
        client.send(junk)
    except OSError:
        pass  # the server closed first: fine
    client.close()
    bystander.still_served()
    wait_until(lambda: server.stats().connections == 1, what="fuzz connection gone")
    stats = server.stats()
    assert stats.sessions == 1  # only the bystander's: nothing piles up


def test_authentication_data_without_a_method_is_a_protocol_error(
        server: ServerThread) -> None:
    """§3.1.2.11.10: Authentication Data without an Authentication Method is a Protocol
    Error; no CONNACK 0x00, the connection ends."""
    client = RawClient(server, "d1", V5)
    client.send(c.Connect("d1", V5, properties=c.Properties(authentication_data=b"x")))
    packets = client.until_closed()
    assert not any(isinstance(p, c.Connack) and p.reason_code == 0 for p in packets)
    assert server.live.count() == 0
    control = RawClient(server, "d1", V5)
    assert control.connect("d1").reason_code == 0
