"""Ingest: what a device's PUBLISH or POST means, and what reaches the SQL sink.

A real SQLite database, a real SqlSink and the real command service; only the admission
is built by hand (the gate has its own tests). Every refusal is checked for what it
must *not* do as well: nothing stored, no command changed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from fleetward.config import DeviceApiConfig, SinkConfig
from fleetward.edge.channel import Admission, Decision
from fleetward.edge.ingest import Ingest, Rejection
from fleetward.edge.sinks import SqlSink
from fleetward.errors import InvalidInput, PayloadTooLarge, PolicyViolation, SinkUnavailable
from fleetward.registry.device_commands import DeviceCommandService
from fleetward.store import messages as message_rows
from tests.conftest import Stack

MAX_BYTES = 1024


class AllowAll:
    """Ingest runs after the policy allowed the publish; it must not rely on it."""

    def decide(self, action: str, resource: str) -> Decision:
        return Decision(True, "test policy allows everything")


def admission(device_id: str, device_type: str = "meter") -> Admission:
    return Admission(device_id=device_id, device_type=device_type, owner="acme", serial=1,
                     not_after_epoch=float("inf"), state="active", quarantined=False,
                     policy=AllowAll())


@dataclass
class World:
    stack: Stack
    ingest: Ingest
    sink: SqlSink
    commands: DeviceCommandService

    def stored(self, device_id: str = "m1") -> list[message_rows.MessageRow]:
        with self.stack.db.read() as conn:
            return [m.row for m in message_rows.list_for_device(conn, device_id, 1000, 0)]


@pytest.fixture
def writer() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-writer")
    yield pool
    pool.shutdown(wait=True)


@pytest.fixture
async def world(sqlite_stack: Stack, writer: ThreadPoolExecutor) -> World:
    stack = sqlite_stack
    stack.registry.create_type("meter", "meters", ["reading", "alarm"], "operator:test")
    for device_id in ("m1", "m2"):
        stack.registry.create_device(device_id, "meter", "acme", {}, "operator:test")
    stack.add_device("s1")  # type "sensor": no message type list, any valid name goes
    types = {t.name: t.message_types for t in stack.registry.list_types()}
    sink = SqlSink(stack.db, writer, SinkConfig(batch_max_delay_ms=1))
    config = DeviceApiConfig(max_message_bytes=MAX_BYTES)
    commands = DeviceCommandService(stack.db, stack.audit, stack.clock, config)
    ingest = Ingest(sink, commands, config, types.get, writer, wall_clock=lambda: 1.5e9)
    return World(stack, ingest, sink, commands)


# --- MQTT: telemetry and events ---------------------------------------------------------------

OK = None
MQTT_CASES: list[tuple[str, str, str, bytes, int | None, str | None]] = [
    # (case, device, topic, payload, reason code, kind stored or None)
    ("telemetry", "m1", "devices/m1/telemetry/reading", b'{"t": 21.5}', OK, "telemetry"),
    ("event", "m1", "devices/m1/events/alarm", b'{"level": 3}', OK, "event"),
    ("empty object", "m1", "devices/m1/telemetry/reading", b"{}", OK, "telemetry"),
    ("exactly the limit", "m1", "devices/m1/telemetry/reading",
     b'{"x":"' + b"a" * (MAX_BYTES - 8) + b'"}', OK, "telemetry"),
    ("any valid type when the list is empty", "s1", "devices/s1/telemetry/whatever.v2",
     b'{"ok": true}', OK, "telemetry"),
    ("ordinary topic: routed, not stored", "m1", "devices/m1/status", b"not json", OK, None),
    ("foreign namespace: routed, not stored", "m1", "plant/3/line", b"\xff", OK, None),
    ("another device's telemetry topic", "m1", "devices/m2/telemetry/reading", b'{"t": 1}',
     0x87, None),
    ("another device's result topic", "m1", "devices/m2/command-results/abc",
     b'{"status": "succeeded"}', 0x87, None),
    ("one byte over the limit", "m1", "devices/m1/telemetry/reading",
     b'{"x":"' + b"a" * (MAX_BYTES - 7) + b'"}', 0x97, None),
    ("not JSON", "m1", "devices/m1/telemetry/reading", b"21.5 C", 0x99, None),
    ("not UTF-8", "m1", "devices/m1/telemetry/reading", b'{"t": "\xff"}', 0x99, None),
    ("a JSON array", "m1", "devices/m1/telemetry/reading", b"[1, 2]", 0x99, None),
    ("a bare number", "m1", "devices/m1/telemetry/reading", b"21.5", 0x99, None),
    ("NaN is not JSON", "m1", "devices/m1/telemetry/reading", b'{"t": NaN}', 0x99, None),
    ("unpaired surrogate", "m1", "devices/m1/telemetry/reading", b'{"t": "\\ud800"}', 0x99,
     None),
    ("empty payload", "m1", "devices/m1/telemetry/reading", b"", 0x99, None),
    ("type not in the device type's list", "m1", "devices/m1/telemetry/humidity",
     b'{"h": 40}', 0x90, None),
    ("upper-case type", "m1", "devices/m1/telemetry/Reading", b'{"t": 1}', 0x90, None),
    ("type with a space", "s1", "devices/s1/telemetry/a b", b'{"t": 1}', 0x90, None),
    ("no type level", "m1", "devices/m1/telemetry", b'{"t": 1}', 0x90, None),
    ("empty type level", "m1", "devices/m1/telemetry/", b'{"t": 1}', 0x90, None),
    ("a level too deep", "m1", "devices/m1/telemetry/reading/x", b'{"t": 1}', 0x90, None),
]


@pytest.mark.parametrize(("device", "topic", "payload", "code", "kind"),
                         [pytest.param(*case[1:], id=case[0]) for case in MQTT_CASES])
async def test_publish_scenarios(world: World, device: str, topic: str, payload: bytes,
                                 code: int | None, kind: str | None) -> None:
    result = await world.ingest.accept_publish(admission(device, "sensor" if device == "s1"
                                                         else "meter"), topic, payload, 1, False)
    assert result == code
    rows = world.stored(device) + (world.stored("m2") if device == "m1" else [])
    if kind is None:
        assert rows == []
        return
    assert len(rows) == 1
    row = rows[0]
    assert (row.device_id, row.kind, row.channel, row.topic) == (device, kind, "mqtt", topic)
    assert row.message_type == topic.rsplit("/", 1)[1]
    assert row.payload == json.loads(payload)
    assert row.received_at.timestamp() == 1.5e9


async def test_nesting_that_overflows_the_parser_is_refused(world: World,
                                                             writer: ThreadPoolExecutor) -> None:
    """Within the default 64 KiB limit, 30,000 nested arrays exhaust Python's recursion
    limit: that must be a refusal (0x99), not a crashed connection."""
    config = DeviceApiConfig()
    ingest = Ingest(world.sink, world.commands, config, {"meter": ()}.get, writer)
    deep = b"[" * 30_000 + b"]" * 30_000
    assert len(deep) <= config.max_message_bytes
    assert await ingest.accept_publish(admission("m1"), "devices/m1/telemetry/reading", deep,
                                       1, False) == 0x99
    deep_object = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    assert await ingest.accept_publish(admission("m1"), "devices/m1/telemetry/reading",
                                       deep_object, 1, False) == 0x99
    assert world.stored() == []


async def test_a_refusal_carries_a_reason_a_developer_can_act_on(world: World) -> None:
    meter = admission("m1")
    unknown = await world.ingest.check_publish(meter, "devices/m1/telemetry/humidity",
                                               b"{}", 1, False)
    assert unknown == Rejection(0x90, "message type 'humidity' is not allowed for device "
                                      "type 'meter'")
    foreign = await world.ingest.check_publish(meter, "devices/m2/events/alarm", b"{}", 0,
                                               False)
    assert foreign is not None and "m2" in foreign.reason


async def test_publishes_are_stored_in_arrival_order(world: World) -> None:
    meter = admission("m1")
    # Started in order, as the MQTT server starts them, and left to overlap.
    tasks = [asyncio.ensure_future(world.ingest.accept_publish(
        meter, "devices/m1/telemetry/reading", json.dumps({"n": n}).encode(), 1, False))
        for n in range(40)]
    assert await asyncio.gather(*tasks) == [None] * 40
    assert [r.payload["n"] for r in world.stored()] == list(range(40))


async def test_a_sink_that_cannot_take_it_answers_unspecified_error(world: World) -> None:
    await world.sink.close()
    code = await world.ingest.accept_publish(admission("m1"), "devices/m1/telemetry/reading",
                                             b'{"t": 1}', 1, False)
    assert code == 0x80
    assert world.stored() == []


# --- MQTT: command results ------------------------------------------------------------------


async def test_command_results_over_mqtt(world: World) -> None:
    mine = world.commands.queue("m1", "reboot", {}, None, "operator:test")
    theirs = world.commands.queue("m2", "reboot", {}, None, "operator:test")
    m1 = admission("m1")
    answer = b'{"status": "succeeded", "result": {"uptime": 3}}'

    # Another device's command, through the device's own topic: unknown to it.
    assert await world.ingest.accept_publish(
        m1, f"devices/m1/command-results/{theirs.id}", answer, 1, False) == 0x90
    assert world.commands.get(theirs.id).status == "pending"
    # Malformed answers leave the command open.
    for bad in (b'{"status": "done"}', b'{"status": "succeeded", "extra": 1}',
                b'{"result": {}}', b"ok", b'{"status": "succeeded", "result": [1]}'):
        code = await world.ingest.accept_publish(
            m1, f"devices/m1/command-results/{mine.id}", bad, 1, False)
        assert code == 0x99, bad
    assert world.commands.get(mine.id).status == "pending"

    assert await world.ingest.accept_publish(
        m1, f"devices/m1/command-results/{mine.id}", answer, 1, False) is None
    done = world.commands.get(mine.id)
    assert (done.status, done.result) == ("succeeded", {"uptime": 3})
    # Once only: a second answer is refused and changes nothing.
    assert await world.ingest.accept_publish(
        m1, f"devices/m1/command-results/{mine.id}", b'{"status": "failed"}', 1, False) == 0x83
    assert world.commands.get(mine.id).status == "succeeded"
    assert world.stored() == []  # results are not telemetry


# --- HTTPS ----------------------------------------------------------------------------------


async def test_http_records_are_stored(world: World) -> None:
    await world.ingest.accept_http(admission("m1"), "telemetry", "reading", {"t": 1})
    await world.ingest.accept_http(admission("m1"), "event", "alarm", {"level": 2})
    rows = world.stored()
    assert [(r.kind, r.message_type, r.channel, r.topic, r.payload) for r in rows] == [
        ("telemetry", "reading", "https", None, {"t": 1}),
        ("event", "alarm", "https", None, {"level": 2})]


HTTP_CASES: list[tuple[str, str, str, object, type[Exception], str]] = [
    ("type not listed", "telemetry", "humidity", {"h": 1}, PolicyViolation, "reading"),
    ("bad type name", "telemetry", "../x", {"t": 1}, InvalidInput, "lower-case"),
    ("unknown kind", "metrics", "reading", {"t": 1}, InvalidInput, "telemetry"),
    ("data is a list", "telemetry", "reading", [1], InvalidInput, "wrap the value"),
    ("data has NaN", "telemetry", "reading", {"t": float("nan")}, InvalidInput, "finite"),
    ("data too large", "event", "alarm", {"x": "a" * MAX_BYTES}, PayloadTooLarge, "smaller"),
]


@pytest.mark.parametrize(("kind", "message_type", "data", "error", "hint"),
                         [pytest.param(*case[1:], id=case[0]) for case in HTTP_CASES])
async def test_http_refusals(world: World, kind: str, message_type: str, data: object,
                             error: type[Exception], hint: str) -> None:
    with pytest.raises(error) as caught:
        await world.ingest.accept_http(admission("m1"), kind, message_type, data)
    assert hint in caught.value.hint  # type: ignore[attr-defined]
    assert world.stored() == []


async def test_an_unlisted_type_names_the_allowed_ones(world: World) -> None:
    with pytest.raises(PolicyViolation) as caught:
        await world.ingest.accept_http(admission("m1"), "telemetry", "humidity", {})
    problem = caught.value.to_problem()
    assert problem["status"] == 422
    assert problem["allowed"] == ["alarm", "reading"]
    assert "alarm, reading" in problem["hint"]


async def test_http_when_the_sink_is_unavailable(world: World) -> None:
    await world.sink.close()
    with pytest.raises(SinkUnavailable) as caught:
        await world.ingest.accept_http(admission("m1"), "telemetry", "reading", {"t": 1})
    assert caught.value.status == 503


async def test_an_unknown_device_type_fails_closed(world: World) -> None:
    ghost = admission("m1", device_type="ghost")
    assert await world.ingest.accept_publish(ghost, "devices/m1/telemetry/reading", b"{}", 1,
                                             False) == 0x80
    with pytest.raises(SinkUnavailable):
        await world.ingest.accept_http(ghost, "telemetry", "reading", {})
    assert world.stored() == []
