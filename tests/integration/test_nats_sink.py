"""The NATS JetStream sink against the real server on 127.0.0.1:4222 (acceptance 6, NATS
half): what a JetStream consumer receives is exactly what was submitted, on one subject
per tenant / device type / device / kind / message type, and no two devices can ever
share a subject however their ids are spelled. Failures of NATS surface as
``SinkUnavailable`` (an MQTT 0x80 / HTTP 503 the device retries), never as success.

Each test uses its own stream and subject prefix, deleted afterwards, so tests cannot
see each other's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import StreamConfig

from fleetward.config import SinkConfig
from fleetward.edge.channel import DeviceMessage
from fleetward.edge.sinks import FanoutSink, NatsSink, SqlSink, subject_for
from fleetward.errors import SinkUnavailable
from fleetward.store import Database
from fleetward.store import messages as message_rows
from tests.conftest import need_service

NATS_URL = os.environ.get("FLEETWARD_TEST_NATS", "nats://127.0.0.1:4222")
FETCH_WAIT_SECONDS = 2.0  # generous for a local server; only bounds a failing test
QUIET_WAIT_SECONDS = 0.3  # "nothing more arrives" after the expected messages


@dataclass(frozen=True)
class Stream:
    config: SinkConfig
    js: Any  # a second, independent JetStream client: the consumer side

    @property
    def prefix(self) -> str:
        return self.config.nats_subject_prefix


@pytest.fixture
async def stream() -> AsyncIterator[Stream]:
    """A unique stream name and subject prefix; the stream is deleted afterwards."""
    try:
        # nats-py may retry the first connection on its own: bound it here.
        nc = await asyncio.wait_for(nats.connect(NATS_URL, connect_timeout=2,
                                                 allow_reconnect=False), 3)
    except Exception as exc:
        need_service(f"NATS at {NATS_URL}: {exc!r}")
    tag = secrets.token_hex(4)
    config = SinkConfig(sql=False, nats_url=NATS_URL, nats_stream=f"FWTEST_{tag}",
                        nats_subject_prefix=f"fwtest{tag}")
    js = nc.jetstream()
    try:
        yield Stream(config, js)
    finally:
        # The test may have deleted the stream already, or never created it.
        with contextlib.suppress(Exception):
            await js.delete_stream(config.nats_stream)
        await nc.close()


def message(device_id: str = "dev-1", *, owner: str = "acme", device_type: str = "sensor",
            kind: str = "telemetry", message_type: str = "temperature",
            payload: Any = None, received_at: float = 1_780_000_000.25) -> DeviceMessage:
    return DeviceMessage(device_id=device_id, device_type=device_type, owner=owner,
                         kind=kind, message_type=message_type, channel="mqtt",
                         payload={"t": 21.5} if payload is None else payload,
                         received_at_epoch=received_at,
                         topic=f"devices/{device_id}/telemetry/{message_type}")


async def started(config: SinkConfig) -> NatsSink:
    sink = NatsSink(config.nats_url, config)
    await sink.start()
    return sink


async def consume(stream: Stream, expected: int, subject: str | None = None) -> list[Any]:
    """Exactly the messages an ephemeral pull consumer on ``subject`` gets: ``expected``
    of them, and then nothing more."""
    sub = await stream.js.pull_subscribe(subject or f"{stream.prefix}.>",
                                         stream=stream.config.nats_stream)
    got: list[Any] = []
    deadline = time.monotonic() + FETCH_WAIT_SECONDS
    while len(got) < expected and time.monotonic() < deadline:
        try:
            got += await sub.fetch(expected - len(got), timeout=0.5)
        except nats.errors.TimeoutError:
            continue
    assert len(got) == expected, f"the consumer got {len(got)} of {expected} messages"
    with pytest.raises(nats.errors.TimeoutError):
        extra = await sub.fetch(1, timeout=QUIET_WAIT_SECONDS)
        pytest.fail(f"unexpected extra message on {extra[0].subject}")
    for m in got:
        await m.ack()
    await sub.unsubscribe()
    return got


def decode_subject(prefix: str, subject: str) -> tuple[str, ...]:
    """What a consumer does to recover the parts: split on '.', percent-decode."""
    assert subject.startswith(prefix + ".")
    return tuple(urllib.parse.unquote(t, errors="strict")
                 for t in subject[len(prefix) + 1:].split("."))


# --- what arrives --------------------------------------------------------------------

# Device ids that a naive "replace '.' by '_'" or "drop bad characters" encoding would
# merge into one subject, or that would escape into another subject hierarchy.
COLLIDING_IDS = ["a.b", "a%2Eb", "a%2eb", "a_b", "a:b", "a b", "a\tb", "a*", "a>", "a.>",
                 "ä.b", "a%"]


async def test_consumer_receives_exactly_what_was_published_on_injective_subjects(
        stream: Stream) -> None:
    sink = await started(stream.config)
    try:
        sent = [message(device_id, payload={"n": i}) for i, device_id in enumerate(COLLIDING_IDS)]
        await asyncio.gather(*(sink.submit(m) for m in sent))
    finally:
        await sink.close()

    got = await consume(stream, len(sent))
    by_subject = {m.subject: m for m in got}
    assert len(by_subject) == len(sent), "two device ids shared one subject"
    for m in sent:
        subject = subject_for(stream.prefix, m)
        assert subject in by_subject
        # Every token is a legal NATS subject token (no '.', '*', '>', whitespace) ...
        tokens = subject.split(".")
        assert all(t and not set(t) & set("*> \t\r\n") for t in tokens), subject
        # ... and decodes back to exactly the parts it came from.
        assert decode_subject(stream.prefix, subject) == (
            "acme", "sensor", m.device_id, "telemetry", "temperature")
        document = json.loads(by_subject[subject].data)
        assert document["device_id"] == m.device_id
        assert document["payload"] == m.payload


async def test_document_and_deduplication_header(stream: Stream) -> None:
    sink = await started(stream.config)
    try:
        await sink.submit(message("dev-1", kind="event", message_type="door.open",
                                  payload={"open": True, "ü": "ß"}))
        await sink.submit(message("dev-1", kind="event", message_type="door.open",
                                  payload={"open": True, "ü": "ß"}))
    finally:
        await sink.close()

    got = await consume(stream, 2)
    assert {m.subject for m in got} == {f"{stream.prefix}.acme.sensor.dev-1.event.door%2Eopen"}
    document = json.loads(got[0].data)
    assert document == {
        "device_id": "dev-1", "device_type": "sensor", "owner": "acme", "kind": "event",
        "message_type": "door.open", "channel": "mqtt",
        "topic": "devices/dev-1/telemetry/door.open",
        "received_at": "2026-05-28T20:26:40.250000Z", "payload": {"open": True, "ü": "ß"}}
    assert dt.datetime.fromisoformat(document["received_at"]).utcoffset() == dt.timedelta(0)
    # Two submits of equal messages are two messages: each carries its own JetStream
    # de-duplication id (a retry of one submit reuses it; different submits never do).
    ids = [m.headers["Nats-Msg-Id"] for m in got]
    assert all(ids) and len(set(ids)) == 2


async def test_subject_hierarchy_lets_a_consumer_select_one_tenant_and_type(
        stream: Stream) -> None:
    sink = await started(stream.config)
    wanted = [message("s-1"), message("s-2", message_type="humidity")]
    others = [message("s-3", owner="globex"),  # another tenant, same type
              message("s-4", device_type="camera"),  # same tenant, other type
              message("s-5", kind="event")]  # same tenant and type, but an event
    try:
        await asyncio.gather(*(sink.submit(m) for m in wanted + others))
    finally:
        await sink.close()

    got = await consume(stream, len(wanted), f"{stream.prefix}.acme.sensor.*.telemetry.>")
    assert sorted(json.loads(m.data)["device_id"] for m in got) == ["s-1", "s-2"]
    # Negative control: the same consumer on everything sees all five.
    assert len(await consume(stream, len(wanted + others))) == 5


async def test_many_concurrent_submits_are_all_stored_once(stream: Stream) -> None:
    sink = await started(stream.config)
    count = 300
    try:
        await asyncio.gather(*(sink.submit(message(f"d{i % 7}", payload={"i": i}))
                               for i in range(count)))
        assert sink.inflight == 0
    finally:
        await sink.close()
    info = await stream.js.stream_info(stream.config.nats_stream)
    assert info.state.messages == count
    got = await consume(stream, count)
    assert sorted(json.loads(m.data)["payload"]["i"] for m in got) == list(range(count))


# --- stream management ------------------------------------------------------------------


async def test_start_updates_an_existing_stream_to_the_prefix(stream: Stream) -> None:
    # A stream left by an older configuration: start() must take it over, not fail.
    await stream.js.add_stream(StreamConfig(name=stream.config.nats_stream,
                                            subjects=[f"{stream.prefix}.old.>"]))
    sink = await started(stream.config)
    try:
        await sink.submit(message())
    finally:
        await sink.close()
    info = await stream.js.stream_info(stream.config.nats_stream)
    assert info.config.subjects == [f"{stream.prefix}.>"]
    assert info.state.messages == 1
    # Starting twice is idempotent.
    again = await started(stream.config)
    await again.close()


# --- failures are SinkUnavailable, never success ------------------------------------------


async def test_unreachable_nats_fails_start_within_the_bound() -> None:
    config = SinkConfig(nats_url="nats://127.0.0.1:1", nats_stream="FWTEST_unreachable",
                        nats_subject_prefix="fwtestunreachable")
    sink = NatsSink(config.nats_url, config, connect_timeout_s=1.0)
    started_at = time.monotonic()
    with pytest.raises(SinkUnavailable) as caught:
        await sink.start()
    assert time.monotonic() - started_at < 3.0
    assert "127.0.0.1:1" not in caught.value.message  # URLs may carry credentials
    with pytest.raises(SinkUnavailable):
        await sink.submit(message())


async def test_submit_before_start_or_after_close_is_refused(stream: Stream) -> None:
    sink = NatsSink(stream.config.nats_url, stream.config)
    with pytest.raises(SinkUnavailable):
        await sink.submit(message())
    await sink.start()
    await sink.close()
    with pytest.raises(SinkUnavailable):
        await sink.submit(message())


async def test_a_stream_claiming_the_same_subjects_is_a_startup_error(stream: Stream) -> None:
    other = f"{stream.config.nats_stream}_OTHER"
    await stream.js.add_stream(StreamConfig(name=other, subjects=[f"{stream.prefix}.>"]))
    try:
        with pytest.raises(SinkUnavailable) as caught:
            await started(stream.config)
        assert stream.prefix in caught.value.hint
    finally:
        await stream.js.delete_stream(other)


async def test_deleted_stream_makes_submit_fail_not_succeed(stream: Stream) -> None:
    sink = await started(stream.config)
    try:
        await sink.submit(message())
        await stream.js.delete_stream(stream.config.nats_stream)
        with pytest.raises(SinkUnavailable):
            await sink.submit(message())
    finally:
        await sink.close()


# --- fan-out: SQL and NATS together ------------------------------------------------------


@pytest.fixture
def sql(tmp_path: Path) -> Iterator[tuple[Database, ThreadPoolExecutor]]:
    db = Database(f"sqlite:///{tmp_path / 'fleetward.db'}")
    db.migrate()
    executor = ThreadPoolExecutor(1, thread_name_prefix="sql-writer")
    yield db, executor
    executor.shutdown(wait=True)
    db.dispose()


def stored(db: Database, device_id: str) -> list[message_rows.StoredMessage]:
    with db.read() as conn:
        return message_rows.list_for_device(conn, device_id, 100)


async def test_fanout_stores_in_sql_and_on_jetstream(
        stream: Stream, sql: tuple[Database, ThreadPoolExecutor]) -> None:
    db, executor = sql
    fanout = FanoutSink([SqlSink(db, executor, SinkConfig(batch_max_delay_ms=5)),
                         await started(stream.config)])
    try:
        await asyncio.gather(*(fanout.submit(message("dev-f", payload={"i": i}))
                               for i in range(5)))
    finally:
        await fanout.close()
    assert sorted(r.row.payload["i"] for r in stored(db, "dev-f")) == list(range(5))
    got = await consume(stream, 5)
    assert sorted(json.loads(m.data)["payload"]["i"] for m in got) == list(range(5))


async def test_fanout_fails_when_nats_fails_even_though_sql_stored(
        stream: Stream, sql: tuple[Database, ThreadPoolExecutor]) -> None:
    db, executor = sql
    fanout = FanoutSink([SqlSink(db, executor, SinkConfig(batch_max_delay_ms=5)),
                         await started(stream.config)])
    try:
        await stream.js.delete_stream(stream.config.nats_stream)
        with pytest.raises(SinkUnavailable):
            await fanout.submit(message("dev-g"))
    finally:
        await fanout.close()
    # At least once: the SQL copy stays; the device's retry may store it again there.
    assert len(stored(db, "dev-g")) == 1
