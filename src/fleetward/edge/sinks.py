"""Message sinks: where accepted telemetry and events go (``MessageSink`` in channel.py).

- :class:`SqlSink` writes the ``device_messages`` table in batches, one transaction per
  batch on the node's single writer thread; each ``submit`` returns once its batch has
  committed (a QoS 1 PUBACK or an HTTP 202 therefore means "on disk").
- :class:`NatsSink` publishes to NATS JetStream, one subject per tenant, device type,
  device, kind and message type; ``submit`` returns once JetStream acknowledged the
  message as stored.
- :class:`FanoutSink` hands each message to several sinks and succeeds only if all do.

Every sink bounds what it holds: past the bound ``submit`` raises ``SinkUnavailable``
(the device backs off and retries) instead of growing memory. Delivery is at least
once: a message a device re-sends after a failure may be stored twice (JetStream drops
duplicates of one ``submit``'s retries through ``Nats-Msg-Id``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import re
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import structlog
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from fleetward.config import SinkConfig
from fleetward.edge.channel import DeviceMessage, MessageSink
from fleetward.errors import ConfigurationError, SinkUnavailable
from fleetward.store import Database
from fleetward.store import messages as message_rows

log = structlog.get_logger("fleetward.sinks")

# Batches that may wait behind the one being written. Beyond this the database is not
# keeping up; devices are told to back off (MQTT 0x80, HTTP 503) rather than the node
# holding an ever longer queue (and PUBACKs) in memory.
SQL_QUEUED_BATCHES = 8
# JetStream acknowledges a publish in about a millisecond on a LAN; this many waiting
# for their ack means the stream is not keeping up (or NATS is gone): refuse more.
NATS_MAX_INFLIGHT = 4096
NATS_PUBLISH_TIMEOUT_SECONDS = 5.0  # per attempt; one retry with the same Nats-Msg-Id
NATS_CONNECT_TIMEOUT_SECONDS = 5.0  # start() gives up after this (then: fail to start)
NATS_RECONNECT_WAIT_SECONDS = 1  # between reconnect attempts after a lost connection
NATS_ERROR_LOG_SECONDS = 10.0  # connection errors are logged at most this often
# NATS subject tokens may not contain '.', '*', '>' or whitespace (NATS docs, "Subject
# Names"); anything beyond this conservative set is percent-encoded, and so is '%'
# itself, which makes the encoding injective: two different values never share a token.
_SUBJECT_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_:~")
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_STREAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _failure(what: str) -> SinkUnavailable:
    return SinkUnavailable(f"the {what} sink cannot accept messages now")


# --- SQL ----------------------------------------------------------------------------------


class SqlSink:
    """Batched writes to ``device_messages`` (``[sinks] sql``).

    Args:
        db: the database.
        executor: the node's single SQL writer thread; batches run there, so message
            writes queue with every other write instead of racing them.
        config: ``batch_max_messages`` per transaction, ``batch_max_delay_ms`` that the
            first message of a batch may wait for company.
    """

    def __init__(self, db: Database, executor: Executor, config: SinkConfig) -> None:
        if config.batch_max_messages < 1 or config.batch_max_delay_ms < 0:
            raise ConfigurationError(
                "[sinks] batch_max_messages must be at least 1 and batch_max_delay_ms "
                "not negative", hint="remove the keys to use the defaults (500, 20)")
        self._db = db
        self._executor = executor
        self._batch = config.batch_max_messages
        self._delay = config.batch_max_delay_ms / 1000
        self.max_pending = config.batch_max_messages * (SQL_QUEUED_BATCHES + 1)
        self._queue: collections.deque[
            tuple[DeviceMessage, asyncio.Future[None], float]] = collections.deque()
        self._writing = 0
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pending(self) -> int:
        """Messages accepted by ``submit`` and not yet committed."""
        return len(self._queue) + self._writing

    async def submit(self, message: DeviceMessage) -> None:
        """Queue ``message`` and return once its batch committed.

        The message is queued before the first suspension, so messages submitted in
        order are written in that order.

        Raises:
            SinkUnavailable: the queue is full, the sink is closing, or the batch failed.
        """
        if self._closing:
            raise SinkUnavailable("the server is shutting down",
                                  hint="retry against another node or after the restart")
        if self.pending >= self.max_pending:
            raise SinkUnavailable(
                f"the SQL sink has {self.pending} messages waiting for the database",
                hint="the database is not keeping up; retry with backoff")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._run(), name="fleetward-sql-sink")
        future: asyncio.Future[None] = loop.create_future()
        self._queue.append((message, future, loop.time()))
        self._arrived.set()
        if len(self._queue) >= self._batch:
            self._full.set()
        await future

    async def close(self) -> None:
        """Write what is queued, then stop. Later ``submit`` calls fail."""
        self._closing = True
        self._arrived.set()
        self._full.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # Wait for company until the first message has waited batch_max_delay_ms.
            wait = self._queue[0][2] + self._delay - loop.time()
            if len(self._queue) < self._batch and wait > 0 and not self._closing:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), wait)
            count = min(self._batch, len(self._queue))
            batch = [self._queue.popleft() for _ in range(count)]
            self._writing = count
            try:
                await loop.run_in_executor(self._executor, self._write,
                                           [m for m, _, _ in batch])
            except Exception as exc:
                log.error("sql sink batch failed", messages=count, error=repr(exc))
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(_failure("SQL"))
            else:
                for _, future, _ in batch:
                    if not future.done():
                        future.set_result(None)
            finally:
                self._writing = 0

    def _write(self, messages: Sequence[DeviceMessage]) -> None:
        rows = [message_rows.MessageRow(
            device_id=m.device_id, device_type=m.device_type, kind=m.kind,
            message_type=m.message_type, channel=m.channel, payload=m.payload,
            received_at=dt.datetime.fromtimestamp(m.received_at_epoch, dt.UTC),
            topic=m.topic) for m in messages]
        with self._db.transaction() as conn:
            message_rows.insert_many(conn, rows)


# --- NATS JetStream -------------------------------------------------------------------------


def subject_token(value: str) -> str:
    """``value`` as one NATS subject token, injectively percent-encoded (UTF-8 bytes).

    Raises:
        ValueError: ``value`` is empty (NATS forbids empty tokens).
    """
    if not value:
        raise ValueError("an empty value cannot be a NATS subject token")
    return "".join(chr(b) if b in _SUBJECT_SAFE else f"%{b:02X}"
                   for b in value.encode("utf-8"))


def subject_for(prefix: str, message: DeviceMessage) -> str:
    """``<prefix>.<owner>.<device_type>.<device_id>.<kind>.<message_type>``; each part a
    :func:`subject_token`, so consumers can filter by tenant, type, device or kind with
    ``*`` and ``>`` (e.g. ``fleetward.acme.sensor.*.telemetry.>``)."""
    parts = (message.owner, message.device_type, message.device_id, message.kind,
             message.message_type)
    return ".".join([prefix, *(subject_token(p) for p in parts)])


def message_document(message: DeviceMessage) -> dict[str, Any]:
    """The JSON published for ``message``."""
    received = dt.datetime.fromtimestamp(message.received_at_epoch, dt.UTC)
    return {"device_id": message.device_id, "device_type": message.device_type,
            "owner": message.owner, "kind": message.kind,
            "message_type": message.message_type, "channel": message.channel,
            "topic": message.topic,
            "received_at": received.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "payload": message.payload}


class NatsSink:
    """Publishes to a JetStream stream (``[sinks] nats_url``, ``nats_stream``,
    ``nats_subject_prefix``). Call :meth:`start` on the event loop before ``submit``.

    Args:
        url: e.g. ``nats://127.0.0.1:4222`` (credentials, if any, belong in the URL).
        config: stream name and subject prefix.
        connect_timeout_s: how long :meth:`start` tries to reach NATS.

    Raises:
        ConfigurationError: an invalid stream name or subject prefix.
    """

    def __init__(self, url: str, config: SinkConfig, *,
                 connect_timeout_s: float = NATS_CONNECT_TIMEOUT_SECONDS) -> None:
        if not url:
            raise ConfigurationError("[sinks] nats_url is empty",
                                     hint="e.g. nats_url = \"nats://127.0.0.1:4222\"")
        if not _STREAM_NAME.fullmatch(config.nats_stream):
            raise ConfigurationError(f"[sinks] nats_stream {config.nats_stream!r} is not a "
                                     f"valid JetStream stream name",
                                     hint="use letters, digits, _ and -")
        if not _PREFIX.fullmatch(config.nats_subject_prefix):
            raise ConfigurationError(
                f"[sinks] nats_subject_prefix {config.nats_subject_prefix!r} is not a "
                f"literal subject", hint="dot-separated tokens of letters, digits, _ and -")
        self._url = url
        self._connect_timeout = connect_timeout_s
        self.stream = config.nats_stream
        self.prefix = config.nats_subject_prefix
        self._nc: Any = None
        self._js: Any = None
        self._inflight = 0
        self._last_error_log = 0.0

    async def start(self) -> None:
        """Connect and create (or update) the stream on ``<prefix>.>``.

        Raises:
            SinkUnavailable: NATS cannot be reached within ``connect_timeout_s``, or
                JetStream refused the stream.
        """
        nc = Client()
        try:
            # nats-py retries the first connection forever with max_reconnect_attempts
            # -1 (which we want after start: NATS restarts must not end the sink), so
            # the first connection is bounded here.
            await asyncio.wait_for(nc.connect(
                self._url, connect_timeout=2, allow_reconnect=True,
                max_reconnect_attempts=-1, reconnect_time_wait=NATS_RECONNECT_WAIT_SECONDS,
                error_cb=self._on_error, name="fleetward"), self._connect_timeout)
            js = nc.jetstream()
            config = StreamConfig(name=self.stream, subjects=[f"{self.prefix}.>"])
            try:
                await js.stream_info(self.stream)
                await js.update_stream(config)
            except NotFoundError:
                await js.add_stream(config)
        except Exception as exc:
            await nc.close()
            # The URL may carry credentials: it is not repeated in the message.
            log.error("nats sink cannot start", error=repr(exc))
            raise SinkUnavailable(
                f"cannot use NATS JetStream stream {self.stream!r}: {type(exc).__name__}",
                hint="check [sinks] nats_url (or FLEETWARD_NATS_URL), that the server runs "
                     "with JetStream enabled (nats-server -js), and that no other stream "
                     f"claims subjects {self.prefix}.>") from None
        self._nc, self._js = nc, js
        log.info("nats sink ready", stream=self.stream, subjects=f"{self.prefix}.>")

    async def _on_error(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= NATS_ERROR_LOG_SECONDS:
            self._last_error_log = now
            log.warning("nats connection error", error=repr(exc))

    @property
    def inflight(self) -> int:
        return self._inflight

    async def submit(self, message: DeviceMessage) -> None:
        """Publish ``message`` and return once JetStream stored it. Concurrent calls
        publish concurrently.

        Raises:
            SinkUnavailable: not started, too many publishes waiting for their ack,
                or NATS did not acknowledge.
        """
        if self._js is None or self._nc is None or self._nc.is_closed:
            raise _failure("NATS")
        if self._inflight >= NATS_MAX_INFLIGHT:
            raise SinkUnavailable(f"{self._inflight} NATS publishes are waiting for their "
                                  f"acknowledgement", hint="retry with backoff")
        subject = subject_for(self.prefix, message)
        data = json.dumps(message_document(message), ensure_ascii=False,
                          separators=(",", ":")).encode("utf-8")
        # One id for every attempt: JetStream's duplicate window (2 min by default)
        # drops the retry if the first attempt was stored but its ack lost.
        headers = {"Nats-Msg-Id": secrets.token_urlsafe(16)}
        self._inflight += 1
        try:
            for attempt in (1, 2):
                try:
                    await self._js.publish(subject, data, timeout=NATS_PUBLISH_TIMEOUT_SECONDS,
                                           stream=self.stream, headers=headers)
                    return
                except (TimeoutError, NatsTimeout) as exc:
                    if attempt == 2:
                        log.error("nats publish not acknowledged", subject=subject,
                                  error=repr(exc))
                        raise _failure("NATS") from None
                except NatsError as exc:
                    log.error("nats publish failed", subject=subject, error=repr(exc))
                    raise _failure("NATS") from None
        finally:
            self._inflight -= 1

    async def close(self) -> None:
        """Flush what is buffered and disconnect."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.drain()
            except Exception as exc:
                log.warning("nats drain failed", error=repr(exc))
                await nc.close()


# --- fan-out ------------------------------------------------------------------------------


class FanoutSink:
    """Every message to every sink; ``submit`` succeeds only if all of them did.

    The sinks are fed concurrently, each in submission order (their ``submit`` starts
    before the first suspension). When one fails the others may still have stored the
    message; the device's retry can then duplicate it there (at least once).
    """

    def __init__(self, sinks: Sequence[MessageSink]) -> None:
        if not sinks:
            raise ConfigurationError("no message sink is configured",
                                     hint="enable [sinks] sql or set [sinks] nats_url")
        self.sinks = tuple(sinks)

    async def submit(self, message: DeviceMessage) -> None:
        """Raises:
            SinkUnavailable: at least one sink failed (the first failure is raised).
        """
        if len(self.sinks) == 1:
            await self.sinks[0].submit(message)
            return
        results = await asyncio.gather(*(s.submit(message) for s in self.sinks),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, SinkUnavailable):
                raise result
            if isinstance(result, BaseException):
                log.error("sink failed unexpectedly", error=repr(result))
                raise _failure("message")

    async def close(self) -> None:
        for sink in self.sinks:
            try:
                await sink.close()
            except Exception as exc:
                log.error("closing a sink failed", error=repr(exc))


__all__ = ["FanoutSink", "NatsSink", "SqlSink", "message_document", "subject_for",
           "subject_token"]
