"""The SQL sink over a real database (SQLite and PostgreSQL): a submit returns only once
its batch committed, batches are bounded by size and delay, a failing database fails
every submit of the batch, and the queue is bounded instead of growing with a slow
database. Plus the NATS subject encoding, which must never let two devices share a
subject."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import event, func, select, text

from fleetward.config import SinkConfig
from fleetward.edge.channel import DeviceMessage
from fleetward.edge.sinks import (
    SQL_QUEUED_BATCHES,
    FanoutSink,
    SqlSink,
    message_document,
    subject_for,
    subject_token,
)
from fleetward.errors import ConfigurationError, SinkUnavailable
from fleetward.store import Database
from fleetward.store import messages as message_rows
from fleetward.store.schema import device_messages


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def writer() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-writer")
    yield pool
    pool.shutdown(wait=True)


def message(n: int, device_id: str = "dev-1", **overrides: object) -> DeviceMessage:
    fields: dict[str, object] = {
        "device_id": device_id, "device_type": "sensor", "owner": "acme",
        "kind": "telemetry", "message_type": "reading", "channel": "mqtt",
        "payload": {"n": n, "text": "grüße \u0000 ok"}, "received_at_epoch": 1_780_000_000.25 + n,
        "topic": f"devices/{device_id}/telemetry/reading"}
    fields.update(overrides)
    return DeviceMessage(**fields)  # type: ignore[arg-type]


def stored(db: Database, device_id: str = "dev-1") -> list[message_rows.StoredMessage]:
    with db.read() as conn:
        return message_rows.list_for_device(conn, device_id, 1000, after_id=0)


def count(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(device_messages)).scalar_one())


def commits(db: Database) -> list[int]:
    """Counts real COMMITs on the engine (one per SqlSink batch)."""
    seen = [0]

    @event.listens_for(db.engine, "commit")
    def _commit(conn: object) -> None:
        seen[0] += 1
    return seen


# --- batching -------------------------------------------------------------------------------


async def test_each_submit_returns_only_after_its_row_is_committed(
        db: Database, writer: ThreadPoolExecutor) -> None:
    sink = SqlSink(db, writer, SinkConfig(batch_max_messages=7, batch_max_delay_ms=30))
    seen_by_other_connection: list[bool] = []

    async def submit_and_look(n: int) -> None:
        await sink.submit(message(n))
        # Read on another connection: only a committed row is visible there.
        seen_by_other_connection.append(
            any(m.row.payload["n"] == n for m in stored(db)))

    await asyncio.gather(*(submit_and_look(n) for n in range(30)))
    await sink.close()
    assert seen_by_other_connection == [True] * 30
    rows = stored(db)
    # Submitted in order, stored in order, nothing lost or doubled, content intact.
    assert [m.row.payload["n"] for m in rows] == list(range(30))
    first = rows[0].row
    assert first.payload == {"n": 0, "text": "grüße \u0000 ok"}
    assert (first.device_type, first.kind, first.message_type, first.channel, first.topic) == (
        "sensor", "telemetry", "reading", "mqtt", "devices/dev-1/telemetry/reading")
    assert first.received_at.timestamp() == pytest.approx(1_780_000_000.25)


async def test_batches_hold_at_most_batch_max_messages(db: Database,
                                                       writer: ThreadPoolExecutor) -> None:
    # A long delay: only a full batch (or close) may trigger a write.
    sink = SqlSink(db, writer, SinkConfig(batch_max_messages=10, batch_max_delay_ms=60_000))
    seen = commits(db)
    await asyncio.wait_for(asyncio.gather(*(sink.submit(message(n)) for n in range(30))), 5)
    assert count(db) == 30
    assert seen[0] == 3  # 30 messages, 10 per transaction
    await sink.close()


async def test_a_lone_message_waits_at_most_the_batch_delay(db: Database,
                                                            writer: ThreadPoolExecutor) -> None:
    sink = SqlSink(db, writer, SinkConfig(batch_max_messages=500, batch_max_delay_ms=20))
    started = time.monotonic()
    await asyncio.wait_for(sink.submit(message(1)), 1)
    assert time.monotonic() - started < 1  # "within one second"; the batch never filled
    assert count(db) == 1
    await sink.close()


async def test_close_writes_what_is_queued_then_refuses(db: Database,
                                                        writer: ThreadPoolExecutor) -> None:
    sink = SqlSink(db, writer, SinkConfig(batch_max_messages=100, batch_max_delay_ms=60_000))
    waiting = [asyncio.ensure_future(sink.submit(message(n))) for n in range(5)]
    await asyncio.sleep(0)
    await asyncio.wait_for(sink.close(), 5)
    await asyncio.gather(*waiting)
    assert count(db) == 5
    with pytest.raises(SinkUnavailable):
        await sink.submit(message(6))


# --- failure and back-pressure --------------------------------------------------------------


async def test_a_failing_database_fails_every_submit_of_the_batch(
        db: Database, writer: ThreadPoolExecutor) -> None:
    sink = SqlSink(db, writer, SinkConfig(batch_max_messages=5, batch_max_delay_ms=10))
    await sink.submit(message(0))  # negative control: the same sink works
    with db.transaction() as conn:
        conn.execute(text("DROP TABLE device_messages"))
    results = await asyncio.gather(*(sink.submit(message(n)) for n in range(1, 6)),
                                   return_exceptions=True)
    assert all(isinstance(r, SinkUnavailable) for r in results), results
    assert all(r.status == 503 for r in results if isinstance(r, SinkUnavailable))
    # The database's own words (paths, hosts) stay in the log, not in the error.
    assert all("device_messages" not in str(r) for r in results)
    await sink.close()


async def test_the_queue_is_bounded_while_the_database_is_stuck(
        db: Database, writer: ThreadPoolExecutor) -> None:
    config = SinkConfig(batch_max_messages=4, batch_max_delay_ms=1)
    sink = SqlSink(db, writer, config)
    assert sink.max_pending == 4 * (SQL_QUEUED_BATCHES + 1)
    release = threading.Event()
    writer.submit(release.wait, 30)  # the writer thread is busy elsewhere (a long write)
    queued = [asyncio.ensure_future(sink.submit(message(n))) for n in range(sink.max_pending)]
    await asyncio.sleep(0.05)
    assert sink.pending == sink.max_pending
    with pytest.raises(SinkUnavailable, match="waiting for the database"):
        await sink.submit(message(999))
    release.set()
    await asyncio.wait_for(asyncio.gather(*queued), 10)
    assert count(db) == sink.max_pending  # the refused one was never stored
    assert sink.pending == 0
    await sink.submit(message(1000))  # and the sink takes messages again
    await sink.close()


async def test_fanout_succeeds_only_if_every_sink_does(db: Database,
                                                       writer: ThreadPoolExecutor) -> None:
    good = SqlSink(db, writer, SinkConfig(batch_max_delay_ms=1))
    closed = SqlSink(db, writer, SinkConfig(batch_max_delay_ms=1))
    await closed.close()
    await FanoutSink([good]).submit(message(1))
    with pytest.raises(SinkUnavailable):
        await FanoutSink([good, closed]).submit(message(2))
    assert [m.row.payload["n"] for m in stored(db)] == [1, 2]  # at least once: good kept it
    with pytest.raises(ConfigurationError):
        FanoutSink([])
    await good.close()


# --- reading back ---------------------------------------------------------------------------


async def test_list_for_device_pages_by_id_and_keeps_devices_apart(
        db: Database, writer: ThreadPoolExecutor) -> None:
    sink = SqlSink(db, writer, SinkConfig(batch_max_delay_ms=1))
    for n in range(5):
        await sink.submit(message(n, "dev-a"))
        await sink.submit(message(n, "dev-b"))
    await sink.close()
    with db.read() as conn:
        newest = message_rows.list_for_device(conn, "dev-a", 2)
        first = message_rows.list_for_device(conn, "dev-a", 2, after_id=0)
        rest = message_rows.list_for_device(conn, "dev-a", 10, after_id=first[-1].id)
        other = message_rows.list_for_device(conn, "dev-b", 10)
    assert [m.row.payload["n"] for m in newest] == [3, 4]  # newest two, oldest first
    assert [m.row.payload["n"] for m in first] == [0, 1]
    assert [m.row.payload["n"] for m in rest] == [2, 3, 4]
    assert {m.row.device_id for m in other} == {"dev-b"} and len(other) == 5
    assert newest[0].to_json()["received_at"].endswith("Z")


# --- NATS subjects (pure) -------------------------------------------------------------------


FORBIDDEN_IN_TOKENS = set(".*> \t\r\n\x0b\x0c")


@given(st.text(min_size=1, max_size=40))
def test_subject_tokens_decode_back_so_the_encoding_is_injective(value: str) -> None:
    token = subject_token(value)
    assert not set(token) & FORBIDDEN_IN_TOKENS
    assert token.isascii() and token.isprintable()
    # A token decodes back to its value: two different values can never share one.
    assert urllib.parse.unquote(token, errors="surrogatepass") == value


@given(st.text(min_size=1, max_size=12), st.text(min_size=1, max_size=12))
def test_distinct_values_get_distinct_tokens(a: str, b: str) -> None:
    assert (subject_token(a) == subject_token(b)) == (a == b)


SUBJECT_CASES = [
    # (value, token): the characters NATS forbids, '%' itself, and ordinary ids.
    ("dev-1", "dev-1"),
    ("dev.1", "dev%2E1"),
    ("dev%2E1", "dev%252E1"),  # an id that looks encoded stays distinct from "dev.1"
    ("gw:01:a", "gw:01:a"),
    ("a*b", "a%2Ab"),
    ("a>b", "a%3Eb"),
    ("acme corp", "acme%20corp"),
    ("grüße", "gr%C3%BC%C3%9Fe"),
]


@pytest.mark.parametrize(("value", "token"), SUBJECT_CASES)
def test_subject_token_table(value: str, token: str) -> None:
    assert subject_token(value) == token


def test_a_naive_join_would_collide_ours_does_not() -> None:
    """Owner 'acme' / type 'sensor' / device 'a.b' versus owner 'acme.sensor' / type 'a' /
    device 'b': joined with dots both read 'acme.sensor.a.b'."""
    one = message(1, "a.b")
    two = message(1, "b", owner="acme.sensor", device_type="a")
    assert subject_for("p", one) == "p.acme.sensor.a%2Eb.telemetry.reading"
    assert subject_for("p", two) == "p.acme%2Esensor.a.b.telemetry.reading"
    assert subject_for("p", one) != subject_for("p", two)
    with pytest.raises(ValueError):
        subject_token("")


def test_the_published_document_names_everything_a_consumer_needs() -> None:
    doc = message_document(message(3, "dev.1"))
    assert doc == {"device_id": "dev.1", "device_type": "sensor", "owner": "acme",
                   "kind": "telemetry", "message_type": "reading", "channel": "mqtt",
                   "topic": "devices/dev.1/telemetry/reading",
                   "received_at": "2026-05-28T20:26:43.250000Z",
                   "payload": {"n": 3, "text": "grüße \u0000 ok"}}
