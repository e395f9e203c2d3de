"""The MQTT server's audit hook over a real SQLite audit log: what is throttled, what
never is, and what a flood from unauthenticated peers cannot crowd out."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select

from fleetward.edge import hooks as hooks_module
from fleetward.edge.channel import Admission
from fleetward.edge.hooks import AuditWriter, ChannelHooks
from fleetward.model import AuditEvent
from fleetward.store.schema import audit_events
from tests.conftest import Stack


async def _never_called(*args: Any) -> int | None:
    raise AssertionError("no publish in these tests")


def rows(stack: Stack, action: str) -> list[Any]:
    with stack.db.read() as conn:
        return list(conn.execute(select(audit_events).where(audit_events.c.action == action)))


def make_hooks(stack: Stack, executor: ThreadPoolExecutor) -> ChannelHooks:
    return ChannelHooks(_never_called, AuditWriter(stack.db, stack.audit, executor),
                        stack.clock, audit_window_seconds=60)


def device(device_id: str) -> Admission:
    return Admission(device_id=device_id, device_type="sensor", owner="acme", serial=1,
                     not_after_epoch=2e9, state="active", quarantined=False,
                     policy=None)  # type: ignore[arg-type]  # audit never decides


@pytest.fixture
def executor() -> Any:
    with ThreadPoolExecutor(1) as pool:
        yield pool


def test_a_flood_of_tls_refusals_cannot_crowd_out_device_audits(
        sqlite_stack: Stack, executor: ThreadPoolExecutor,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks_module, "THROTTLE_KEYS", 50)
    hooks = make_hooks(sqlite_stack, executor)
    for n in range(200):  # rotating source addresses fill their own key table
        hooks.audit("mqtt.tls_refused", None, f"2001:db8::{n:x}:1234",
                    {"reason": "unable to get local issuer certificate"})
    hooks.audit("mqtt.publish_denied", device("d1"), "127.0.0.1:5000", {"topic": "x"})
    executor.submit(lambda: None).result()  # the writer thread has drained
    assert len(rows(sqlite_stack, "mqtt.tls_refused")) == 50
    assert len(rows(sqlite_stack, "mqtt.publish_denied")) == 1, "device audit was crowded out"
    assert all(r.outcome == "failure" for r in rows(sqlite_stack, "mqtt.tls_refused"))


def test_aggregated_limit_reports_are_never_dropped_and_are_failures(
        sqlite_stack: Stack, executor: ThreadPoolExecutor) -> None:
    hooks = make_hooks(sqlite_stack, executor)
    for reset in (3, 7):  # the listener already sends at most one a minute
        hooks.audit("mqtt.connections_limited", None, "127.0.0.1:4000",
                    {"limit": "max_connections", "reset": reset})
    hooks.audit("mqtt.protocol_error", None, "127.0.0.1:4000", {})
    hooks.audit("mqtt.protocol_error", None, "127.0.0.1:4001", {})  # negative control
    executor.submit(lambda: None).result()
    limited = rows(sqlite_stack, "mqtt.connections_limited")
    assert [json.loads(r.details)["reset"] for r in limited] == [3, 7]
    assert {r.outcome for r in limited} == {"failure"}
    errors = rows(sqlite_stack, "mqtt.protocol_error")
    assert len(errors) == 1, "the throttle still works"
    assert errors[0].outcome == "failure"


def test_events_submitted_together_are_written_in_one_transaction_in_order(
        sqlite_stack: Stack, executor: ThreadPoolExecutor) -> None:
    """A burst (token issuances, refusals) costs one commit, and keeps its order."""
    commits: list[int] = []
    sqlite_stack.db.on_commit = lambda: commits.append(1)
    writer = AuditWriter(sqlite_stack.db, sqlite_stack.audit, executor)
    gate = threading.Event()
    executor.submit(gate.wait)  # the writer thread is busy while the burst arrives
    for n in range(30):
        writer.submit(AuditEvent(action="test.burst", actor="test", target=f"n:{n}"))
    gate.set()
    executor.submit(lambda: None).result()
    assert [r.target for r in rows(sqlite_stack, "test.burst")] == [f"n:{n}" for n in range(30)]
    assert len(commits) == 1
    writer.submit(AuditEvent(action="test.burst", actor="test", target="later"))
    executor.submit(lambda: None).result()
    assert len(commits) == 2 and rows(sqlite_stack, "test.burst")[-1].target == "later"


def test_an_event_that_cannot_be_written_loses_only_itself(
        sqlite_stack: Stack, executor: ThreadPoolExecutor) -> None:
    writer = AuditWriter(sqlite_stack.db, sqlite_stack.audit, executor)
    gate = threading.Event()
    executor.submit(gate.wait)
    writer.submit(AuditEvent(action="test.batch", actor="test", target="before"))
    circular: dict[str, Any] = {}
    circular["self"] = circular  # canonical JSON cannot encode it: append raises
    writer.submit(AuditEvent(action="test.batch", actor="test", target="bad",
                             details=circular))
    writer.submit(AuditEvent(action="test.batch", actor="test", target="after"))
    gate.set()
    executor.submit(lambda: None).result()
    assert [r.target for r in rows(sqlite_stack, "test.batch")] == ["before", "after"]
