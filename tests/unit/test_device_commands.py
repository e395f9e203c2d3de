"""Device commands over a real database (SQLite and PostgreSQL): who may answer, how
often, for how long, how many may wait, what the audit log keeps, and the long-poll."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select

from fleetward.config import DeviceApiConfig
from fleetward.errors import (
    Conflict,
    FleetwardError,
    InvalidInput,
    NotFound,
    PolicyViolation,
    TooManyRequests,
)
from fleetward.model import LifecycleState
from fleetward.registry import device_commands as commands_module
from fleetward.registry.device_commands import (
    MAX_TTL_SECONDS,
    REDELIVER_AFTER_SECONDS,
    DeviceCommandService,
    device_command_json,
)
from fleetward.store.schema import audit_events
from tests.conftest import Stack

SECRET_MARKER = "payload-marker-7f3a"  # must never show up in the audit log


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-commands")
    yield pool
    pool.shutdown(wait=True)


def service(stack: Stack, executor: ThreadPoolExecutor | None = None,
            **limits: int) -> DeviceCommandService:
    return DeviceCommandService(stack.db, stack.audit, stack.clock, DeviceApiConfig(**limits),
                                executor)


def audit_rows(stack: Stack, prefix: str = "command.") -> list[dict[str, Any]]:
    with stack.db.read() as conn:
        rows = conn.execute(select(audit_events).order_by(audit_events.c.seq)).all()
    out = []
    for row in rows:
        record = dict(row._mapping)
        if record["action"].startswith(prefix):
            details = record["details"]
            record["details"] = json.loads(details) if isinstance(details, str) else details
            out.append(record)
    return out


def test_queue_stores_a_pending_command_and_audits_it_without_the_payload(
        stack: Stack) -> None:
    stack.add_device("d1")
    commands = service(stack)
    row = commands.queue("d1", "set-interval", {"seconds": 30, "note": SECRET_MARKER}, None,
                         "operator:alice")
    assert row.status == "pending" and row.device_id == "d1"
    assert row.expires_at - row.created_at == dt.timedelta(
        seconds=DeviceApiConfig().command_ttl_seconds)
    assert row.id[0].isalnum() and len(row.id) == 27
    assert commands.get(row.id).payload == {"seconds": 30, "note": SECRET_MARKER}
    queued = audit_rows(stack)
    assert [(r["action"], r["actor"], r["target"]) for r in queued] == [
        ("command.queued", "operator:alice", "device:d1")]
    assert queued[0]["details"]["command_id"] == row.id
    assert queued[0]["details"]["name"] == "set-interval"
    assert SECRET_MARKER not in json.dumps(queued, default=str)
    assert device_command_json(row) == {
        "id": row.id, "name": "set-interval",
        "payload": {"seconds": 30, "note": SECRET_MARKER},
        "created_at": "2026-06-01T12:00:00Z", "expires_at": "2026-06-02T12:00:00Z"}


BAD_QUEUES: list[tuple[str, str, Any, Any, type[FleetwardError]]] = [
    # case, name, payload, ttl, error
    ("upper-case name", "Reboot", {}, None, InvalidInput),
    ("wildcard in name (topic level)", "re+boot", {}, None, InvalidInput),
    ("slash in name (topic level)", "a/b", {}, None, InvalidInput),
    ("empty name", "", {}, None, InvalidInput),
    ("65-char name", "a" * 65, {}, None, InvalidInput),
    ("payload is a list", "reboot", [1, 2], None, InvalidInput),
    ("payload is a string", "reboot", "now", None, InvalidInput),
    ("payload above the message limit", "reboot", {"blob": "x" * 2000}, None, InvalidInput),
    ("NaN in payload", "reboot", {"v": float("nan")}, None, InvalidInput),
    ("ttl zero", "reboot", {}, 0, InvalidInput),
    ("ttl above 30 days", "reboot", {}, MAX_TTL_SECONDS + 1, InvalidInput),
    ("ttl is a bool", "reboot", {}, True, InvalidInput),
    ("ttl is a string", "reboot", {}, "60", InvalidInput),
]


@pytest.mark.parametrize(("case", "name", "payload", "ttl", "error"), BAD_QUEUES,
                         ids=[c[0] for c in BAD_QUEUES])
def test_bad_commands_are_refused_and_leave_nothing_behind(
        stack: Stack, case: str, name: str, payload: Any, ttl: Any,
        error: type[FleetwardError]) -> None:
    stack.add_device("d1")
    commands = service(stack, max_message_bytes=1024)
    with pytest.raises(error) as raised:
        commands.queue("d1", name, payload, ttl, "operator:alice")
    assert raised.value.hint
    assert commands.list("d1") == [] and audit_rows(stack) == []
    # Negative control: the same service queues a good command for the same device.
    commands.queue("d1", "reboot", {"delay_seconds": 1}, 60, "operator:alice")


@pytest.mark.parametrize(("state", "error"), [
    (None, NotFound),  # never registered
    (LifecycleState.COMPROMISED, PolicyViolation),
    (LifecycleState.RETIRED, PolicyViolation),
])
def test_commands_for_unknown_or_dead_devices_are_refused(
        stack: Stack, state: LifecycleState | None, error: type[FleetwardError]) -> None:
    commands = service(stack)
    if state is not None:
        stack.add_device("d1")
        stack.registry.change_state("d1", state, "operator:test")
    with pytest.raises(error):
        commands.queue("d1", "reboot", {}, None, "operator:alice")
    assert audit_rows(stack) == []


def test_only_the_addressed_device_completes_a_command_and_only_once(stack: Stack) -> None:
    stack.add_device("d1")
    stack.add_device("d2")
    commands = service(stack)
    row = commands.queue("d1", "reboot", {}, None, "operator:alice")
    # Another device, and an id that does not exist, get the same answer: the ids of
    # other devices' commands stay secret.
    with pytest.raises(NotFound) as other:
        commands.complete("d2", row.id, "succeeded", {"stolen": True})
    with pytest.raises(NotFound) as unknown:
        commands.complete("d2", "NoSuchCommandId0000000", "succeeded", {})
    assert other.value.message.replace(row.id, "X") == \
        unknown.value.message.replace("NoSuchCommandId0000000", "X")
    assert commands.get(row.id).status == "pending"

    done = commands.complete("d1", row.id, "succeeded", {"uptime": 5})
    assert (done.status, done.result) == ("succeeded", {"uptime": 5})
    assert done.completed_at == stack.clock.now()
    with pytest.raises(Conflict):
        commands.complete("d1", row.id, "failed", {"late": True})
    assert commands.get(row.id).result == {"uptime": 5}  # the first answer stands
    completed = [r for r in audit_rows(stack) if r["action"] == "command.completed"]
    assert len(completed) == 1
    assert (completed[0]["actor"], completed[0]["target"]) == ("device:d1", "device:d1")
    assert completed[0]["details"] == {"command_id": row.id, "status": "succeeded"}


@pytest.mark.parametrize(("status", "result"), [
    ("done", {}), ("SUCCEEDED", {}), ("succeeded", ["not", "an", "object"]),
    ("failed", {"blob": "x" * 2000})])
def test_malformed_results_are_refused_and_the_command_stays_open(
        stack: Stack, status: str, result: Any) -> None:
    stack.add_device("d1")
    commands = service(stack, max_message_bytes=1024)
    row = commands.queue("d1", "reboot", {}, None, "operator:alice")
    with pytest.raises(InvalidInput):
        commands.complete("d1", row.id, status, result)
    assert commands.get(row.id).status == "pending"
    commands.complete("d1", row.id, "failed", {"error": "disk full"})  # negative control


def test_commands_expire_after_their_ttl(stack: Stack) -> None:
    stack.add_device("d1")
    commands = service(stack)
    short = commands.queue("d1", "reboot", {}, 60, "operator:alice")
    long = commands.queue("d1", "update", {}, 3600, "operator:alice")
    assert [r.id for r in commands.pending("d1")] == [short.id, long.id]

    stack.clock.advance(dt.timedelta(seconds=60))
    # Past its TTL a command is no longer offered nor answerable, even before the sweep.
    assert [r.id for r in commands.pending("d1")] == [long.id]
    with pytest.raises(Conflict) as late:
        commands.complete("d1", short.id, "succeeded", {})
    assert "expired" in late.value.message
    assert commands.expire_due() == 1
    assert commands.get(short.id).status == "expired"
    assert commands.expire_due() == 0  # nothing new: no second audit row
    expired = [r for r in audit_rows(stack) if r["action"] == "command.expired"]
    assert [(r["actor"], r["details"]) for r in expired] == [("system", {"count": 1})]
    commands.complete("d1", long.id, "succeeded", {})  # negative control: still open


def test_the_pending_cap_refuses_with_429_until_a_command_is_answered(stack: Stack) -> None:
    stack.add_device("d1")
    stack.add_device("d2")
    commands = service(stack, max_pending_commands=2)
    first = commands.queue("d1", "a", {}, 60, "operator:alice")
    commands.queue("d1", "b", {}, 3600, "operator:alice")
    with pytest.raises(TooManyRequests) as refused:
        commands.queue("d1", "c", {}, None, "operator:alice")
    assert refused.value.status == 429 and "fleetward device commands d1" in refused.value.hint
    commands.queue("d2", "c", {}, None, "operator:alice")  # the cap is per device
    commands.complete("d1", first.id, "succeeded", {})
    third = commands.queue("d1", "c", {}, 60, "operator:alice")
    with pytest.raises(TooManyRequests):
        commands.queue("d1", "d", {}, None, "operator:alice")
    # An expired command no longer holds a place, swept or not.
    stack.clock.advance(dt.timedelta(seconds=60))
    commands.queue("d1", "d", {}, None, "operator:alice")
    assert commands.get(third.id).status == "pending"  # not swept yet
    assert len([r for r in audit_rows(stack) if r["action"] == "command.queued"]) == 5


def test_delivery_is_recorded_once_and_unanswered_commands_are_offered_again(
        stack: Stack) -> None:
    stack.add_device("d1")
    commands = service(stack)
    row = commands.queue("d1", "reboot", {}, None, "operator:alice")
    assert [r.id for r in commands.due_for_poll("d1")] == [row.id]
    assert commands.mark_delivered([row.id]) == 1
    delivered_at = commands.get(row.id).delivered_at
    assert delivered_at == stack.clock.now()
    # Delivered and unanswered: still open (MQTT redelivery), not re-offered to the poll
    # at once (the device may be running it) ...
    assert [r.id for r in commands.pending("d1")] == [row.id]
    assert commands.due_for_poll("d1") == []
    # ... but again once the first answer may have been lost.
    stack.clock.advance(dt.timedelta(seconds=REDELIVER_AFTER_SECONDS))
    assert [r.id for r in commands.due_for_poll("d1")] == [row.id]
    assert commands.mark_delivered([row.id]) == 0
    assert commands.get(row.id).delivered_at == delivered_at


def test_a_redelivered_command_waits_out_the_delay_again(stack: Stack) -> None:
    """delivered_at keeps the first delivery: the re-offer must count from the last
    hand-out, or an unanswered command would come back on every poll at once."""
    stack.add_device("d1")
    commands = service(stack)
    row = commands.queue("d1", "reboot", {}, None, "operator:alice")
    commands.mark_delivered([row.id])
    for _ in range(3):
        stack.clock.advance(dt.timedelta(seconds=REDELIVER_AFTER_SECONDS - 1))
        assert commands.due_for_poll("d1") == [], "re-offered before the delay"
        stack.clock.advance(dt.timedelta(seconds=1))
        assert [r.id for r in commands.due_for_poll("d1")] == [row.id]
        commands.mark_delivered([row.id])  # handed out again
        assert commands.due_for_poll("d1") == [], "re-offered in a tight loop"


def test_listeners_hear_of_each_queued_command_after_commit(stack: Stack) -> None:
    stack.add_device("d1")
    commands = service(stack)
    heard: list[tuple[str, dict[str, Any], str]] = []

    def listener(device_id: str, command: dict[str, Any]) -> None:
        # After COMMIT: another connection already sees the row.
        heard.append((device_id, command, commands.get(command["id"]).status))

    def broken(device_id: str, command: dict[str, Any]) -> None:
        raise RuntimeError("a broken listener")

    commands.add_listener(broken)
    commands.add_listener(listener)
    row = commands.queue("d1", "reboot", {"delay_seconds": 5}, None, "operator:alice")
    assert heard == [("d1", device_command_json(row), "pending")]
    with pytest.raises(NotFound):
        commands.queue("nobody", "reboot", {}, None, "operator:alice")
    assert len(heard) == 1  # a refused command is not announced


# --- long-poll --------------------------------------------------------------------------


def poll_while_queueing(poller: DeviceCommandService, queuer: DeviceCommandService, *,
                        queue_for: str, after: float, wait: float
                        ) -> tuple[list[dict[str, Any]], float]:
    """Long-poll d1 on ``poller`` while another thread has ``queuer`` queue a command for
    ``queue_for`` ``after`` seconds in; what the poll returned, and how long it took."""
    def queue_later() -> None:
        time.sleep(after)
        queuer.queue(queue_for, "ping", {}, None, "operator:alice")

    async def poll() -> tuple[list[dict[str, Any]], float]:
        thread = threading.Thread(target=queue_later)
        thread.start()
        started = time.monotonic()
        items = await poller.wait_for_commands("d1", wait)
        elapsed = time.monotonic() - started
        await asyncio.to_thread(thread.join)
        return items, elapsed

    return asyncio.run(poll())


def test_long_poll_wakes_when_a_command_is_queued_in_process(
        stack: Stack, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    stack.add_device("d1")
    commands = service(stack, executor)
    # Only the in-process wake-up can answer within the bound: the database re-read is
    # pushed out of reach.
    monkeypatch.setattr(commands_module, "POLL_DB_RECHECK_SECONDS", 60.0)
    items, elapsed = poll_while_queueing(commands, commands, queue_for="d1", after=0.3,
                                         wait=20)
    assert [i["name"] for i in items] == ["ping"]
    assert elapsed < 1.5  # woken by the queue, within one second of it
    assert commands.waiting() == 0


def test_long_poll_sees_a_command_queued_by_another_node(
        stack: Stack, executor: ThreadPoolExecutor) -> None:
    stack.add_device("d1")
    this_node, other_node = service(stack, executor), service(stack, executor)
    items, _ = poll_while_queueing(this_node, other_node, queue_for="d1", after=0.2, wait=20)
    assert [i["name"] for i in items] == ["ping"]


def test_long_poll_times_out_empty_and_ignores_other_devices(
        stack: Stack, executor: ThreadPoolExecutor) -> None:
    stack.add_device("d1")
    stack.add_device("d2")
    commands = service(stack, executor)
    items, elapsed = poll_while_queueing(commands, commands, queue_for="d2", after=0.1,
                                         wait=1.2)
    assert items == [] and elapsed >= 1.2
    assert commands.waiting() == 0
    # wait 0 answers at once with what is due.
    commands.queue("d1", "ping", {}, None, "operator:alice")
    assert [i["name"] for i in asyncio.run(commands.wait_for_commands("d1", 0))] == ["ping"]


def test_a_device_holds_a_bounded_number_of_long_polls(
        stack: Stack, executor: ThreadPoolExecutor) -> None:
    stack.add_device("d1")
    stack.add_device("d2")
    commands = service(stack, executor)

    async def polls() -> None:
        held = [asyncio.create_task(commands.wait_for_commands("d1", 20))
                for _ in range(commands_module.MAX_POLLS_PER_DEVICE)]
        while commands.waiting() < commands_module.MAX_POLLS_PER_DEVICE:
            await asyncio.sleep(0.01)
        with pytest.raises(TooManyRequests):
            await commands.wait_for_commands("d1", 20)
        assert await commands.wait_for_commands("d2", 0) == []  # per device
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)

    asyncio.run(polls())
    assert commands.waiting() == 0  # cancelled polls leave nothing behind
    asyncio.run(commands.wait_for_commands("d1", 0))  # and the device may poll again
