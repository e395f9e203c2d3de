"""What the device listeners hand to the rest of Fleetward: audit rows (throttled, off
the event loop), last-seen times (batched) and accepted messages (the ingest).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

import structlog

from fleetward.audit import AuditLog
from fleetward.clock import Clock
from fleetward.edge.channel import Admission
from fleetward.model import AuditEvent
from fleetward.policy.topics import filters_intersect
from fleetward.store import Database
from fleetward.store import channel as channel_rows

log = structlog.get_logger("fleetward.edge")

THROTTLE_KEYS = 10_000  # distinct (device or peer, action) pairs remembered per window
# Caused before TLS authentication, by anyone from any address: they get a key table of
# their own, so a flood of them (rotating addresses) cannot crowd devices' audits out.
UNAUTHENTICATED_ACTIONS = frozenset({"mqtt.tls_refused"})
# Aggregated by the listener already (one event a minute with a count): never dropped.
AGGREGATED_ACTIONS = frozenset({"mqtt.connections_limited"})

AcceptPublish = Callable[[Admission, str, bytes, int, bool], Awaitable[int | None]]


class AuditWriter:
    """Appends audit events on the node's single writer thread, never on the loop.

    ``submit`` returns at once. Events submitted while a write is queued or running are
    appended together, in submission order, in one transaction (at most
    ``MAX_BATCH_EVENTS``): a burst of token issuances or refusals costs one commit, not
    one each (bench/tokens.py: the per-event transaction was half of an issuance's server
    CPU). A failed batch is retried event by event, so one bad event loses only itself;
    a failed write is logged (the event is also in the structured log), it never fails
    the connection that caused it.
    """

    MAX_BATCH_EVENTS = 500

    def __init__(self, db: Database, audit: AuditLog, executor: Executor) -> None:
        self._db = db
        self._audit = audit
        self._executor = executor
        self._pending: collections.deque[AuditEvent] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def submit(self, event: AuditEvent) -> None:
        with self._lock:
            self._pending.append(event)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._executor.submit(self._flush)
        except RuntimeError:  # executor shut down: the server is stopping
            with self._lock:
                dropped = list(self._pending)
                self._pending.clear()
                self._scheduled = False
            for lost in dropped:
                log.warning("audit event dropped at shutdown", action=lost.action,
                            target=lost.target)

    def _flush(self) -> None:
        while True:
            with self._lock:
                batch = [self._pending.popleft() for _ in range(
                    min(len(self._pending), self.MAX_BATCH_EVENTS))]
                if not batch:
                    self._scheduled = False
                    return
            self._write(batch)

    def _write(self, batch: list[AuditEvent]) -> None:
        try:
            with self._db.transaction() as conn:
                for event in batch:
                    self._audit.append(conn, event)
            return
        except Exception:
            if len(batch) == 1:
                log.exception("audit write failed", action=batch[0].action,
                              target=batch[0].target)
                return
        for event in batch:  # isolate the event that failed the batch
            self._write([event])


class Throttle:
    """At most one event per key per window; bounded memory (an attacker who cycles
    keys only loses audit detail for the rest of the window, never grows the map)."""

    def __init__(self, window_seconds: float) -> None:
        self._window = window_seconds
        self._seen: set[tuple[str, str]] = set()
        self._started = time.monotonic()
        self.suppressed = 0

    def allow(self, key: tuple[str, str]) -> bool:
        now = time.monotonic()
        if now - self._started > self._window:
            self._seen.clear()
            self._started = now
        if key in self._seen or len(self._seen) >= THROTTLE_KEYS:
            self.suppressed += 1
            return False
        self._seen.add(key)
        return True


class ChannelHooks:
    """The MQTT server's hooks (``fleetward.edge.mqtt.server.MqttHooks``)."""

    # Open commands are resent on SUBSCRIBE at most this often per device: a device
    # repeating SUBSCRIBE must not turn into a stream of SQL reads and writes.
    COMMAND_RESEND_MIN_SECONDS = 5.0
    RESEND_MEMORY = 100_000  # devices remembered; beyond it the map starts afresh

    def __init__(self, accept: AcceptPublish, writer: AuditWriter, clock: Clock,
                 audit_window_seconds: float,
                 commands_subscribed: Callable[[str], None] | None = None) -> None:
        self._accept = accept
        self._commands_subscribed = commands_subscribed
        self._writer = writer
        self._clock = clock
        self._throttle = Throttle(audit_window_seconds)
        self._unauthenticated_throttle = Throttle(audit_window_seconds)
        self._last_seen: dict[str, Any] = {}
        self._resent: dict[str, float] = {}

    async def accept_publish(self, admission: Admission, topic: str, payload: bytes,
                             qos: int, retain: bool) -> int | None:
        return await self._accept(admission, topic, payload, qos, retain)

    def audit(self, action: str, admission: Admission | None, source: str,
              details: dict[str, Any]) -> None:
        # Every action is throttled per device (or peer) and window, takeovers included:
        # two clones taking a session from each other in a loop would otherwise write
        # an audit row per round. The first one of each window is recorded.
        subject = admission.device_id if admission else source.rsplit(":", 1)[0]
        if action not in AGGREGATED_ACTIONS:
            throttle = (self._unauthenticated_throttle if action in UNAUTHENTICATED_ACTIONS
                        else self._throttle)
            if not throttle.allow((subject, action)):
                return
        self._writer.submit(AuditEvent(
            action=action,
            actor=f"device:{admission.device_id}" if admission else f"remote:{source}",
            target=f"device:{admission.device_id}" if admission else f"remote:{subject}",
            outcome=("failure" if action.endswith(("_denied", "refused", "_limited", "_error"))
                     else "success"),
            details={"source": source, **details}))

    def connected(self, admission: Admission, source: str) -> None:
        self._last_seen[admission.device_id] = self._clock.now()

    def disconnected(self, admission: Admission, reason: str) -> None:
        self._last_seen[admission.device_id] = self._clock.now()

    def subscribed(self, admission: Admission, topic_filters: list[str]) -> None:
        """A device that subscribes to its command topic gets its open commands again
        (commands queued while it was away, or sent but never answered)."""
        commands_topic = f"devices/{admission.device_id}/commands/+"
        if self._commands_subscribed is None or not any(
                filters_intersect(f, commands_topic) for f in topic_filters):
            return
        now = time.monotonic()
        last = self._resent.get(admission.device_id)
        if last is not None and now - last < self.COMMAND_RESEND_MIN_SECONDS:
            return
        if len(self._resent) >= self.RESEND_MEMORY:
            self._resent.clear()
        self._resent[admission.device_id] = now
        self._commands_subscribed(admission.device_id)

    def seen(self, device_id: str) -> None:
        self._last_seen[device_id] = self._clock.now()

    def take_last_seen(self) -> dict[str, Any]:
        seen, self._last_seen = self._last_seen, {}
        return seen


def flush_last_seen(db: Database, seen: dict[str, Any]) -> None:
    """Write a batch of last-seen times (worker thread)."""
    if seen:
        with db.transaction() as conn:
            channel_rows.touch_last_seen(conn, seen)
