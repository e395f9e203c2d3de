"""Commands from operators to devices: queue, deliver, answer, expire.

An operator queues a command (admin API / ``fleetward device command``); it reaches the
device over MQTT (``devices/<id>/commands/<name>``, delivered by the node from the
listeners registered here) or the HTTPS long-poll (``GET /v1/commands``); the device
answers once with ``succeeded`` or ``failed`` and a result object.

Delivery is at least once: a command stays open after delivery until it is answered or
expires, so a device that lost the answer to a poll, or a QoS 1 PUBLISH, gets it again.
Every change is audited in the transaction that makes it; payloads and results never
enter the audit log (they are the device owner's data, and may hold secrets).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog

from fleetward.audit import AuditLog
from fleetward.clock import Clock
from fleetward.config import DeviceApiConfig
from fleetward.errors import Conflict, InvalidInput, NotFound, PolicyViolation, TooManyRequests
from fleetward.model import AuditEvent, LifecycleState
from fleetward.store import Database
from fleetward.store import device_commands as rows
from fleetward.store import devices as device_rows
from fleetward.store.device_commands import CommandRow

log = structlog.get_logger("fleetward.commands")

CommandListener = Callable[[str, dict[str, Any]], None]  # (device id, device JSON)

# A command name is one MQTT topic level (devices/<id>/commands/<name>), no wildcards.
COMMAND_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
MAX_TTL_SECONDS = 30 * 24 * 3600  # a command older than a month is a stale order, not a plan
MAX_LIST_LIMIT = 1000  # rows per admin listing
# A delivered, unanswered command is offered to the long-poll again after this long: the
# answer to the poll may have been lost with the connection, but a device still running
# the command (the agent allows a handler 60 s) must not get it back in a tight loop.
REDELIVER_AFTER_SECONDS = 90
# The long-poll re-reads the database this often while it waits, so a command queued on
# another node (whose in-process wake-up never reaches this one) arrives within it.
POLL_DB_RECHECK_SECONDS = 1.0
# Long-polls one device may hold open at once (on this node). Each re-reads the database
# every second, so a device opening connection after connection must not multiply that.
MAX_POLLS_PER_DEVICE = 4
# Hand-out times remembered for re-offering (see due_for_poll); beyond this many the
# memory starts afresh, which at worst re-offers a command once early.
OFFERED_MEMORY = 100_000
_CLOSED_STATES = (LifecycleState.COMPROMISED, LifecycleState.RETIRED)


def command_json(row: CommandRow) -> dict[str, Any]:
    """A command as the admin API shows it."""
    return {"id": row.id, "device_id": row.device_id, "name": row.name,
            "payload": row.payload, "status": row.status, "created_by": row.created_by,
            "created_at": _iso(row.created_at), "expires_at": _iso(row.expires_at),
            "delivered_at": _iso(row.delivered_at), "completed_at": _iso(row.completed_at),
            "result": row.result}


def device_command_json(row: CommandRow) -> dict[str, Any]:
    """A command as the device receives it (MQTT payload and long-poll item)."""
    return {"id": row.id, "name": row.name, "payload": row.payload,
            "created_at": _iso(row.created_at), "expires_at": _iso(row.expires_at)}


@dataclass(slots=True)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event


class DeviceCommandService:
    """Queue and track device commands.

    Args:
        db, audit, clock: as every service.
        config: ``[device_api]`` limits (message size, TTL default, pending cap).
        executor: where ``wait_for_commands`` runs its SQL (never on the event loop);
            None: the loop's default executor.
    """

    def __init__(self, db: Database, audit: AuditLog, clock: Clock, config: DeviceApiConfig,
                 executor: Executor | None = None) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self.config = config
        self.executor = executor
        self._listeners: builtins.list[CommandListener] = []
        self._lock = threading.Lock()
        self._waiters: dict[str, set[int]] = {}
        self._waiter_objects: dict[int, _Waiter] = {}
        # command id -> when this node last handed it out. ``delivered_at`` keeps the
        # first delivery, so without this an unanswered command past the redelivery
        # delay would come back on every poll, in a tight loop, until answered.
        self._offered: dict[str, dt.datetime] = {}

    # --- listeners ------------------------------------------------------------------------

    def add_listener(self, callback: CommandListener) -> None:
        """Call ``callback(device_id, device_command_json)`` after each queued command
        commits, on the committing thread (marshal to a loop yourself). An exception in
        a callback is logged; it never undoes the queueing."""
        self._listeners.append(callback)

    # --- operator side -------------------------------------------------------------------

    def queue(self, device_id: str, name: str, payload: Any, ttl_seconds: int | None,
              actor: str) -> CommandRow:
        """Queue a command for a device; audited as ``command.queued``.

        Args:
            device_id: the addressee; must exist and be neither compromised nor retired.
            name: ``[a-z0-9][a-z0-9_.-]{0,63}`` (an MQTT topic level, no wildcards).
            payload: a JSON object, at most ``max_message_bytes`` serialised.
            ttl_seconds: 1 … 30 days; None: ``command_ttl_seconds``.
            actor: who, for the audit log.

        Raises:
            InvalidInput: bad name, payload or TTL.
            NotFound: no such device.
            PolicyViolation: the device is compromised or retired.
            TooManyRequests: ``max_pending_commands`` are already open for the device.

        Returns:
            The stored command (status ``pending``).
        """
        if not isinstance(name, str) or not COMMAND_NAME_PATTERN.fullmatch(name):
            raise InvalidInput(f"invalid command name {str(name)[:80]!r}",
                               hint="1-64 characters of a-z 0-9 _ . -, starting with a "
                                    "letter or digit, e.g. reboot or set-interval")
        self._check_object(payload, "payload", '{"seconds": 30}')
        ttl = self._ttl(ttl_seconds)
        now = self.clock.now()
        with self.db.transaction() as conn:
            # FOR UPDATE on PostgreSQL: two operators queueing at once cannot both pass
            # the pending cap (SQLite's BEGIN IMMEDIATE serialises writers anyway).
            device = device_rows.get_device(conn, device_id, for_update=True)
            if device is None:
                raise _no_device(device_id)
            if device.state in _CLOSED_STATES:
                raise PolicyViolation(
                    f"device {device_id!r} is {device.state.value}; it can no longer "
                    f"receive commands", hint="its credentials are revoked for good; "
                    "register a replacement device")
            open_count = rows.count_open(conn, device_id, now)
            if open_count >= self.config.max_pending_commands:
                raise TooManyRequests(
                    f"device {device_id!r} already has {open_count} open commands "
                    f"(limit {self.config.max_pending_commands})",
                    hint="wait until the device answers or the commands expire "
                         f"(fleetward device commands {device_id}), or raise "
                         "[device_api] max_pending_commands")
            row = CommandRow(id=_new_id(), device_id=device_id, name=name, payload=payload,
                             status=rows.PENDING, created_by=actor, created_at=now,
                             expires_at=now + dt.timedelta(seconds=ttl))
            rows.insert_command(conn, row)
            self.audit.append(conn, AuditEvent(
                action="command.queued", actor=actor, target=f"device:{device_id}",
                details={"command_id": row.id, "name": name, "ttl_seconds": ttl}))
        self._notify(device_id, device_command_json(row))
        return row

    def list(self, device_id: str, limit: int = 100) -> builtins.list[CommandRow]:
        """The device's newest commands, newest first.

        Raises:
            NotFound: no such device.
            InvalidInput: ``limit`` outside 1 … 1000.
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidInput(f"limit must be between 1 and {MAX_LIST_LIMIT}",
                               hint="e.g. ?limit=100")
        with self.db.read() as conn:
            if device_rows.get_device(conn, device_id) is None:
                raise _no_device(device_id)
            return rows.list_for_device(conn, device_id, limit)

    def get(self, command_id: str) -> CommandRow:
        """Raises: NotFound: no such command."""
        with self.db.read() as conn:
            row = rows.get_command(conn, command_id)
        if row is None:
            raise NotFound(f"no command {command_id[:80]!r}",
                           hint="list the device's commands to see their ids")
        return row

    def expire_due(self) -> int:
        """Expire open commands past their TTL; one ``command.expired`` audit event per
        sweep that expired any. Returns how many expired."""
        with self.db.transaction() as conn:
            count = rows.expire_due(conn, self.clock.now())
            if count:
                self.audit.append(conn, AuditEvent(
                    action="command.expired", actor="system", target="device-commands",
                    details={"count": count}))
        return count

    # --- device side ----------------------------------------------------------------------

    def pending(self, device_id: str) -> builtins.list[CommandRow]:
        """Every open command of ``device_id`` (pending or delivered), oldest first."""
        with self.db.read() as conn:
            return rows.pending_for(conn, device_id, self.clock.now())

    def due_for_poll(self, device_id: str) -> builtins.list[CommandRow]:
        """What a long-poll hands out: pending commands, and delivered ones not answered
        within ``REDELIVER_AFTER_SECONDS`` (the first answer may have been lost)."""
        now = self.clock.now()
        redeliver_before = now - dt.timedelta(seconds=REDELIVER_AFTER_SECONDS)
        with self.db.read() as conn:
            open_rows = rows.pending_for(conn, device_id, now)
        due: builtins.list[CommandRow] = []
        for row in open_rows:
            if row.status == rows.PENDING:
                due.append(row)
                continue
            offered = max(filter(None, (row.delivered_at, self._offered.get(row.id))),
                          default=None)
            if offered is not None and offered <= redeliver_before:
                due.append(row)
        return due

    def mark_delivered(self, ids: builtins.list[str]) -> int:
        """Record that these commands were handed to their device; returns how many were
        pending (redeliveries keep their first delivery time)."""
        if not ids:
            return 0
        now = self.clock.now()
        with self.db.transaction() as conn:
            changed = rows.mark_delivered(conn, ids, now)
        if len(self._offered) + len(ids) > OFFERED_MEMORY:
            self._offered.clear()
        self._offered.update(dict.fromkeys(ids, now))
        return changed

    def complete(self, device_id: str, command_id: str, status: str,
                 result: Any) -> CommandRow:
        """The device's answer; audited as ``command.completed``.

        Args:
            device_id: the answering device (from its certificate, never from the body).
            command_id: the command answered.
            status: ``succeeded`` or ``failed``.
            result: a JSON object, at most ``max_message_bytes`` serialised.

        Raises:
            InvalidInput: bad status or result.
            NotFound: unknown command id, or one addressed to another device (the two
                are indistinguishable on purpose: ids of other devices stay secret).
            Conflict: the command was already answered, or expired.

        Returns:
            The completed command.
        """
        if status not in rows.FINAL_STATUSES:
            raise InvalidInput(f"status must be 'succeeded' or 'failed', not "
                               f"{str(status)[:40]!r}",
                               hint='e.g. {"status": "succeeded", "result": {}}')
        self._check_object(result, "result", '{"status": "succeeded", "result": {"ok": true}}')
        now = self.clock.now()
        with self.db.transaction() as conn:
            if not rows.complete(conn, device_id, command_id, status, result, now):
                row = rows.get_command(conn, command_id)
                if row is None or row.device_id != device_id:
                    raise NotFound(f"no command {command_id[:80]!r} for this device",
                                   hint="answer a command id received from GET /v1/commands "
                                        "or devices/<id>/commands/…")
                if row.status in rows.FINAL_STATUSES:
                    raise Conflict(f"command {command_id!r} was already answered "
                                   f"({row.status})",
                                   hint="send each command's result once; a repeat after a "
                                        "lost response can be ignored")
                raise Conflict(f"command {command_id!r} expired at {_iso(row.expires_at)}",
                               hint="results are not accepted after a command expires; "
                                    "the operator can queue it again")
            self.audit.append(conn, AuditEvent(
                action="command.completed", actor=f"device:{device_id}",
                target=f"device:{device_id}",
                details={"command_id": command_id, "status": status}))
            row = rows.get_command(conn, command_id)
        if row is None:  # deleted between our UPDATE and SELECT in the same transaction
            raise NotFound(f"no command {command_id[:80]!r} for this device")
        return row

    async def wait_for_commands(self, device_id: str,
                                timeout_s: float) -> builtins.list[dict[str, Any]]:
        """Long-poll: the commands due for ``device_id`` (device JSON) as soon as there
        are any, or ``[]`` after ``timeout_s``. Wakes at once for a command queued in
        this process and re-reads the database every ``POLL_DB_RECHECK_SECONDS`` for
        one queued on another node. Does not mark them delivered.

        Raises:
            TooManyRequests: the device already holds ``MAX_POLLS_PER_DEVICE`` polls.
        """
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, asyncio.Event())
        key = self._add_waiter(device_id, waiter)  # before the first read: no lost wake-up
        if key is None:
            raise TooManyRequests(
                f"this device already has {MAX_POLLS_PER_DEVICE} long-polls open",
                hint="poll from one connection at a time; wait for the answer before "
                     "polling again")
        try:
            deadline = time.monotonic() + max(0.0, timeout_s)
            while True:
                # Cleared before the read: a wake-up during the read is kept, not lost.
                waiter.event.clear()
                due = await loop.run_in_executor(self.executor,
                                                 partial(self.due_for_poll, device_id))
                if due:
                    return [device_command_json(r) for r in due]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.event.wait(),
                                           min(remaining, POLL_DB_RECHECK_SECONDS))
        finally:
            self._remove_waiter(device_id, key)

    # --- internals ------------------------------------------------------------------------

    def _notify(self, device_id: str, command: dict[str, Any]) -> None:
        with self._lock:
            waiters = [self._waiter_objects[k] for k in self._waiters.get(device_id, ())]
        for waiter in waiters:
            # RuntimeError: that loop is closed, and its poll with it.
            with contextlib.suppress(RuntimeError):
                waiter.loop.call_soon_threadsafe(waiter.event.set)
        for callback in list(self._listeners):
            try:
                callback(device_id, command)
            except Exception:
                log.exception("command listener failed", device_id=device_id,
                              command_id=command.get("id"))

    def _add_waiter(self, device_id: str, waiter: _Waiter) -> int | None:
        key = id(waiter)
        with self._lock:
            keys = self._waiters.setdefault(device_id, set())
            if len(keys) >= MAX_POLLS_PER_DEVICE:
                return None
            self._waiter_objects[key] = waiter
            keys.add(key)
        return key

    def _remove_waiter(self, device_id: str, key: int | None) -> None:
        if key is None:
            return
        with self._lock:
            self._waiter_objects.pop(key, None)
            keys = self._waiters.get(device_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._waiters[device_id]

    def waiting(self) -> int:
        """How many long-polls are waiting (for metrics and leak tests)."""
        with self._lock:
            return len(self._waiter_objects)

    def _check_object(self, value: Any, field: str, example: str) -> None:
        if not isinstance(value, dict):
            raise InvalidInput(f"{field} must be a JSON object", hint=f"e.g. {example}")
        try:
            size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                                  allow_nan=False).encode())
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"{field} is not plain JSON: {exc}", hint=f"e.g. {example}"
                               ) from None
        if size > self.config.max_message_bytes:
            raise InvalidInput(f"{field} is {size} bytes of JSON; the limit is "
                               f"{self.config.max_message_bytes}",
                               hint="send a reference (e.g. a URL) instead of bulk data, "
                                    "or raise [device_api] max_message_bytes")

    def _ttl(self, ttl_seconds: int | None) -> int:
        if ttl_seconds is None:
            return self.config.command_ttl_seconds
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not (
                1 <= ttl_seconds <= MAX_TTL_SECONDS):
            raise InvalidInput(f"ttl_seconds must be an integer between 1 and "
                               f"{MAX_TTL_SECONDS} (30 days)", hint='e.g. "ttl_seconds": 3600')
        return ttl_seconds


_id_lock = threading.Lock()
_last_id_ms = 0


def _new_id() -> str:
    """11 hex digits of milliseconds (strictly increasing in this process), then 96
    random bits (RFC 4086 §7: unguessable). The clock has whole seconds, so without the
    prefix commands queued within one second would reach the device in random order;
    ordering by (created_at, id) keeps the operator's order. 27 URL- and topic-safe
    characters (RFC 3986 §2.3), starting with a hex digit as the agent requires."""
    global _last_id_ms
    with _id_lock:
        _last_id_ms = max(_last_id_ms + 1, time.time_ns() // 1_000_000)
        stamp = _last_id_ms
    return f"{stamp:011x}{secrets.token_urlsafe(12)}"


def _no_device(device_id: str) -> NotFound:
    return NotFound(f"no device {device_id[:128]!r}",
                    hint="check the id; `fleetward device list` shows the devices")


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


__all__ = ["MAX_TTL_SECONDS", "REDELIVER_AFTER_SECONDS", "CommandListener",
           "DeviceCommandService", "command_json", "device_command_json"]
