"""Fleetward's MQTT 3.1.1 + 5.0 server over mutual TLS (asyncio).

One :class:`asyncio.Protocol` per connection. OpenSSL has verified the client
certificate's chain before the first byte arrives (the listener's context requires a
client certificate); on CONNECT the :class:`~fleetward.edge.channel.DeviceGate`
decides who the peer is (certificate → device, revocation, lifecycle, ``mqtt:connect``,
client id = device id) and every later packet is authorized against the admission's
policy, read afresh each time because the gate swaps it in place.

What the server announces in CONNACK, and therefore enforces (MQTT 5.0 §3.2.2.3):
Maximum QoS 1, Retain Available, Topic Alias Maximum 0, Shared Subscription Available
0, Wildcard and Subscription Identifier Available, Receive Maximum and Maximum Packet
Size from :class:`~fleetward.config.MqttConfig`, and Server Keep Alive when the
client's Keep Alive is 0 or above the maximum. MQTT 3.1.1 clients get the nearest
3.1.1 behaviour: QoS 2 PUBLISHes go through the exactly-once flow and are delivered
onwards at QoS 1; a refusal that 3.1.1 cannot express closes the connection
(3.1.1 §3.3.5).

Accepted PUBLISHes go to :meth:`MqttHooks.accept_publish` (the sinks) in arrival order,
several at a time so a batching sink can group them; they are acknowledged and routed to
subscribers strictly in arrival order once accepted (5.0 §4.6).

Memory is bounded per connection: one packet of at most the maximum packet size in the
decoder, at most ``PIPELINE_MAX_MESSAGES`` / ``PIPELINE_MAX_BYTES`` of PUBLISHes awaiting
the sinks, and a transport write buffer above whose high-water mark the server stops
reading from that client; sessions queue at most ``max_queued_messages`` QoS 1
messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
import os
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

import structlog

from fleetward.clock import Clock, SystemClock
from fleetward.config import MqttConfig
from fleetward.edge.channel import (
    Action,
    Admission,
    AuthMethod,
    Closer,
    DeviceGate,
    LiveConnections,
    Refusal,
    Refused,
    copy_credential,
)
from fleetward.edge.credentials import TOKEN_AUTH_METHOD, PresentedCredentials
from fleetward.edge.mqtt import codec as c
from fleetward.edge.mqtt.broker import Broker
from fleetward.edge.mqtt.codec import ReasonCode
from fleetward.edge.mqtt.session import Delivery, Message, PendingWill, Session, Subscriber
from fleetward.errors import Conflict, InvalidInput
from fleetward.policy.topics import (
    is_shared_subscription,
    validate_topic_filter,
    validate_topic_name,
)
from fleetward.tokens.access import AccessToken
from fleetward.web.tls_gate import ListenerLimits, TLSAcceptor, format_peer

log = structlog.get_logger("fleetward.mqtt")

# Per connection: above this many unsent bytes the client is not reading; stop reading
# from it (and drop QoS 0 to it) until the buffer drains below the low mark.
WRITE_BUFFER_HIGH_BYTES: Final = 256 * 1024
WRITE_BUFFER_LOW_BYTES: Final = 64 * 1024
# Per connection: inbound PUBLISHes handed to the sinks and not yet answered. Above
# either bound the server stops reading from the client (QoS 0 has no other brake).
PIPELINE_MAX_MESSAGES: Final = 256
PIPELINE_MAX_BYTES: Final = 1024 * 1024
# A connection being closed whose peer does not take the last bytes is aborted after
# this, so a revoked device is gone within a second whatever it does.
CLOSE_GRACE_SECONDS: Final = 0.5
# How often expired sessions and delayed wills are looked at; the clock has whole
# seconds, so a finer tick would buy nothing.
HOUSEKEEPING_SECONDS: Final = 0.5
# A device publishes to a handful of topics: remembering the names that passed the
# checks saves re-validating them per message. Bounded; cleared when full.
VALID_TOPIC_CACHE_ENTRIES: Final = 64
# §3.1.2.10: no packet for one and a half Keep Alive periods means the client is gone.
KEEPALIVE_GRACE_FACTOR: Final = 1.5
# A session timer fires one second late rather than early: the clock truncates to
# whole seconds and a session or will must never go before its interval (§3.1.2.11.2).
CLOCK_SLACK_SECONDS: Final = 1.0
# Bytes of the server's challenge in FW-TOKEN enhanced authentication (docs/credentials.md).
AUTH_CHALLENGE_BYTES: Final = 32
# 3.1.1 §3.2.2.3 return code 1: unacceptable protocol version (sent before we know the
# client's version, so in the 3.1.1 format every 3.x client reads).
V311_UNSUPPORTED_VERSION_CONNACK: Final = b"\x20\x02\x00\x01"


class MqttHooks(Protocol):
    """What the server asks of the rest of Fleetward (implemented by the node)."""

    async def accept_publish(self, admission: Admission, topic: str, payload: bytes,
                             qos: int, retain: bool) -> int | None:
        """Take an authorized PUBLISH (or Will Message) into the sinks.

        Called after the policy allowed the publish. Returns None when accepted, else
        an MQTT 5 reason code (0x99 payload format invalid, 0x97 quota exceeded, 0x80
        …). A QoS 1 PUBACK waits for this. Calls for one connection start in arrival
        order and may overlap (up to the Receive Maximum for QoS 1); an implementation
        keeps that order if it enqueues before its first ``await``.
        """
        ...

    def audit(self, action: str, admission: Admission | None, source: str,
              details: dict[str, Any]) -> None:
        """Record a security-relevant event; fire-and-forget, the implementation
        throttles. Actions: mqtt.publish_denied, mqtt.publish_refused,
        mqtt.subscribe_denied, mqtt.will_denied, mqtt.connect_refused,
        mqtt.session_taken_over, mqtt.protocol_error, mqtt.subscription_dropped;
        before TLS authentication (``admission`` None, anyone can cause them):
        mqtt.tls_refused, and mqtt.connections_limited (already aggregated: one call
        per minute at most, with a count)."""
        ...

    def connected(self, admission: Admission, source: str) -> None:
        """A device completed CONNECT (CONNACK 0x00 sent)."""
        ...

    def disconnected(self, admission: Admission, reason: str) -> None:
        """A connected device's connection ended (``reason`` is for logs)."""
        ...

    def subscribed(self, admission: Admission, topic_filters: list[str]) -> None:
        """A SUBACK granted these filters (after retained messages were queued): the
        node resends the device's open commands when it subscribes to them."""
        ...


@dataclass(frozen=True, slots=True)
class MqttStats:
    connections: int  # TLS connections past the handshake, CONNECTed or not yet
    handshaking: int  # TCP connections still in the TLS handshake
    reset_over_limit: int  # connections reset over max_connections / max_pending_handshakes
    sessions: int  # connected and persistent offline sessions
    subscriptions: int
    retained: int  # retained messages held
    messages_in: int  # PUBLISHes (and wills) accepted from clients
    messages_out: int  # PUBLISHes sent to clients
    messages_dropped: int  # QoS 0 to busy/away clients, queue overflow, expired
    publishes_denied: int  # by policy (mqtt:publish)
    receives_denied: int  # by policy (mqtt:receive)


_V311_CONNACK: Final[dict[int, int]] = {
    ReasonCode.UNSUPPORTED_PROTOCOL_VERSION: 1, ReasonCode.CLIENT_IDENTIFIER_NOT_VALID: 2,
    ReasonCode.SERVER_UNAVAILABLE: 3, ReasonCode.SERVER_BUSY: 3,
    ReasonCode.BAD_USER_NAME_OR_PASSWORD: 4, ReasonCode.BAD_AUTHENTICATION_METHOD: 4}


def _v311_connack(code: int) -> int:
    """The nearest 3.1.1 CONNACK return code (3.1.1 §3.2.2.3, Table 3.1)."""
    return _V311_CONNACK.get(code, 5)


def _describe(code: int) -> str:
    try:
        return ReasonCode(code).name.lower().replace("_", " ")
    except ValueError:
        return f"reason code 0x{code:02X}"


class MqttServer:
    """The MQTT listener of one node.

    Args:
        gate: admits each CONNECT (from memory; the node's ``Gate``).
        live: where each connection registers its closer for live enforcement.
        hooks: sinks, audit and connection events.
        config: every limit ([mqtt] in fleetward.toml).
        ssl_context: the listener's TLS context (``fleetward.web.tls.server_context``
            with ``require_client_cert=True`` and our issuing CA as client CA).
        clock: wall time for session expiry, will delay and message expiry.
        credentials: checks access tokens and SAS tokens in CONNECT (password or
            ``FW-TOKEN`` enhanced authentication); None: client certificates only.
    """

    def __init__(self, gate: DeviceGate, live: LiveConnections, hooks: MqttHooks,
                 config: MqttConfig, ssl_context: ssl.SSLContext,
                 clock: Clock | None = None,
                 credentials: PresentedCredentials | None = None) -> None:
        self.gate = gate
        self.credentials = credentials
        self.live = live
        self.hooks = hooks
        self.config = config
        self.ssl_context = ssl_context
        self.clock: Clock = clock or SystemClock()
        self.broker = Broker(config, self.now)
        self._connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._acceptor = TLSAcceptor(
            ssl_context, lambda: _Connection(self),
            limits=ListenerLimits(config.max_connections, config.max_pending_handshakes,
                                  config.max_pending_handshakes_per_source),
            on_refused=self._tls_refused, on_limited=self._connections_limited,
            handshake_timeout_seconds=float(config.connect_timeout_seconds))
        self._housekeeping: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 = any free port); returns the bound port."""
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(self._acceptor, host, port,
                                                      reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._housekeeping = self._loop.call_later(HOUSEKEEPING_SECONDS, self._tick)
        log.info("mqtt listening", host=host, port=self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening and close every connection (5.0 DISCONNECT 0x8B server
        shutting down). Wills are not published: the clients did nothing wrong and the
        sinks are closing too. Persistent sessions live only in memory and end here."""
        if self._server is not None:
            self._server.close()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        for connection in list(self._connections):
            connection.close("server shutting down", will=False,
                             code=ReasonCode.SERVER_SHUTTING_DOWN, reason="server shutting down")
        deadline = asyncio.get_running_loop().time() + CLOSE_GRACE_SECONDS + 0.5
        while self._connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def now(self) -> float:
        """Wall time in epoch seconds, from the injected clock."""
        return self.clock.now().timestamp()

    def stats(self) -> MqttStats:
        counters = self.broker.counters
        return MqttStats(
            connections=len(self._connections), handshaking=self._acceptor.pending,
            reset_over_limit=self._acceptor.reset_total, sessions=len(self.broker.sessions),
            subscriptions=self.broker.subscription_count, retained=len(self.broker.retained),
            messages_in=counters.messages_in, messages_out=counters.messages_out,
            messages_dropped=counters.messages_dropped,
            publishes_denied=counters.publishes_denied,
            receives_denied=counters.receives_denied)

    def _tls_refused(self, peer: str, reason: str) -> None:
        """A client certificate failed the handshake: no certificate, another CA, expired
        (OpenSSL's verify message says which). Throttled per peer by the hooks."""
        self.audit("mqtt.tls_refused", None, peer, {"reason": reason[:256]})

    def _connections_limited(self, peer: str, limit: str, reset: int) -> None:
        self.audit("mqtt.connections_limited", None, peer,
                   {"limit": limit, "reset": reset, "open": self._acceptor.open,
                    "handshaking": self._acceptor.pending})

    # --- server-originated messages --------------------------------------------------------

    def deliver(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Publish a server-originated message (a device command) to every matching
        subscription whose policy allows ``mqtt:receive``. Call it on the server's
        event loop (``loop.call_soon_threadsafe`` from other threads).

        Args:
            topic: a valid topic name within the configured limits.
            payload: the message body.
            qos: 0 or 1 (2 is delivered at 1, like everything here).
            retain: also keep it as the topic's retained message (empty payload: clear).

        Returns:
            How many sessions it was sent or queued to (offline persistent sessions
            queue QoS 1 messages).

        Raises:
            InvalidInput: an invalid topic or QoS.
            Conflict: ``retain`` with the retained-message store full.
        """
        validate_topic_name(topic, max_bytes=self.config.max_topic_bytes,
                            max_levels=self.config.max_topic_levels)
        if qos not in (0, 1, 2):
            raise InvalidInput(f"QoS {qos} does not exist", hint="use QoS 0 or 1")
        message = Message(topic, bytes(payload), min(qos, 1), retain, c.EMPTY_PROPERTIES)
        if retain and not self.broker.retained.put(message):
            raise Conflict("the retained-message store is full",
                           hint="raise [mqtt] max_retained_messages / max_retained_bytes or clear "
                                "retained topics")
        return self.broker.route(message)

    # --- shared by connections -------------------------------------------------------------

    def audit(self, action: str, admission: Admission | None, source: str,
              details: dict[str, Any]) -> None:
        try:
            self.hooks.audit(action, admission, source, details)
        except Exception:
            log.exception("mqtt audit hook failed", action=action)

    def message(self, topic: str, payload: bytes, qos: int, retain: bool,
                properties: c.Properties, origin: str | None) -> Message:
        """The routed form of an accepted PUBLISH or will (5.0 §3.3.2.3: forward the
        properties, restart the expiry clock here)."""
        expires_at = None
        if properties.message_expiry_interval is not None:
            expires_at = self.now() + properties.message_expiry_interval
        if properties.will_delay_interval is not None:
            properties = dataclasses.replace(properties, will_delay_interval=None)
        return Message(topic, payload, min(qos, 1), retain, properties, expires_at, origin)

    def accept(self, message: Message) -> None:
        """An accepted message: count, retain (§3.3.1.3), route."""
        self.broker.counters.messages_in += 1
        if message.retain and not self.broker.retained.put(message):
            self.broker.counters.messages_dropped += 1  # filled up since the precheck
        self.broker.route(message)

    def spawn(self, awaitable: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start_accept(self, admission: Admission, topic: str, payload: bytes, qos: int,
                     retain: bool) -> tuple[int | None, asyncio.Future[Any] | None]:
        """Run ``hooks.accept_publish`` eagerly: ``(code, None)`` when it answered
        without suspending, else ``(None, task)`` continuing where it stopped.

        Python 3.12's eager tasks, by hand for 3.11: a sink that accepts from memory
        costs a coroutine call instead of a Task and two trips through the event loop.
        """
        coro = self.hooks.accept_publish(admission, topic, payload, qos, retain)
        try:
            first = coro.send(None)
        except StopIteration as done:
            return (None if done.value is None else int(done.value)), None
        except Exception as exc:
            log.error("mqtt accept_publish failed", error=repr(exc))
            return int(ReasonCode.UNSPECIFIED_ERROR), None
        return None, self.spawn(_Resumed(coro, first).run())

    def detached(self, session: Session, admission: Admission, will: c.Will | None,
                 source: str, after: asyncio.Future[Any] | None) -> None:
        """A session lost its connection: start its will and expiry clocks
        (5.0 §3.1.2.5, §3.1.2.11.2, §3.1.3.2.2)."""
        now = self.now()
        expiry = session.expiry_seconds
        if will is not None:
            delay = min(will.properties.will_delay_interval or 0, expiry)
            if delay == 0:
                self.publish_will(will, admission, session.client_id, source, after)
            else:
                due = now + delay + CLOCK_SLACK_SECONDS
                session.pending_will = PendingWill(will, admission, source, due)
                self.broker.schedule(session, due)
        if expiry == 0:
            self.end_session(session)
        else:
            session.expires_at = now + expiry + CLOCK_SLACK_SECONDS
            self.broker.schedule(session, session.expires_at)

    def end_session(self, session: Session) -> None:
        """The session ends; a will still waiting for its delay goes now (§3.1.3.2.2)."""
        pending = session.pending_will
        session.pending_will = None
        if pending is not None:
            self.publish_will(pending.will, pending.admission, session.client_id,
                              pending.source, None)
        self.broker.discard(session)

    def publish_will(self, will: c.Will, admission: Admission, client_id: str, source: str,
                     after: asyncio.Future[Any] | None) -> None:
        """Publish a Will Message like a PUBLISH of its client: the policy is asked
        again (it may have changed since CONNECT), then the sinks, then routing."""
        if after is not None and not after.done():
            after.add_done_callback(
                lambda _: self.publish_will(will, admission, client_id, source, None))
            return
        # The device is gone; the control plane may have revoked, disabled or
        # re-policed it since (a Will Delay can be long): ask the gate again.
        current = self.gate.recheck(admission)
        if isinstance(current, Refused):
            self.broker.counters.publishes_denied += 1
            self.audit("mqtt.will_denied", admission, source,
                       {"topic": will.topic, "reason": current.reason})
            return
        admission = current
        decision = admission.decide(Action.MQTT_PUBLISH, will.topic)
        if not decision.allowed:
            self.broker.counters.publishes_denied += 1
            self.audit("mqtt.will_denied", admission, source,
                       {"topic": will.topic, "reason": decision.reason})
            return
        if will.retain and will.payload and not self.broker.retained.has_room_for(
                will.topic, len(will.payload)):
            self.audit("mqtt.publish_refused", admission, source,
                       {"topic": will.topic, "reason_code": ReasonCode.QUOTA_EXCEEDED,
                        "will": True})
            return
        message = self.message(will.topic, will.payload, will.qos, will.retain,
                               will.properties, client_id)
        task = self.spawn(self.hooks.accept_publish(admission, will.topic, will.payload,
                                                    will.qos, will.retain))

        def done(finished: asyncio.Future[Any]) -> None:
            code = _result_code(finished)
            if code is None:
                self.accept(message)
            else:
                self.audit("mqtt.publish_refused", admission, source,
                           {"topic": will.topic, "reason_code": code, "will": True})

        task.add_done_callback(done)

    def _tick(self) -> None:
        try:
            now = self.now()
            for session in self.broker.due(now):
                pending = session.pending_will
                if pending is not None and pending.due_at <= now:
                    session.pending_will = None
                    self.publish_will(pending.will, pending.admission, session.client_id,
                                      pending.source, None)
                if session.expires_at is not None and session.expires_at <= now:
                    self.end_session(session)
        except Exception:
            log.exception("mqtt housekeeping failed")
        finally:
            if self._loop is not None and self._server is not None:
                self._housekeeping = self._loop.call_later(HOUSEKEEPING_SECONDS, self._tick)


def _result_code(future: asyncio.Future[Any]) -> int | None:
    """accept_publish's answer; a failing sink is an unspecified error (fail closed)."""
    if future.cancelled():
        return int(ReasonCode.UNSPECIFIED_ERROR)
    exc = future.exception()
    if exc is not None:
        log.error("mqtt accept_publish failed", error=repr(exc))
        return int(ReasonCode.UNSPECIFIED_ERROR)
    result = future.result()
    if result is None:
        return None
    return int(result)


class _Resumed:
    """A coroutine that already ran its first step (and yielded ``first``, the future it
    waits for), made awaitable again so a Task can drive the rest of it."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Any, first: Any) -> None:
        self.coro = coro
        self.first = first

    async def run(self) -> Any:
        return await self

    def __await__(self) -> Any:
        coro = self.coro
        value = self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the Task (e.g. cancellation)
                try:
                    value = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as done:
                    return done.value


# --- one connection ----------------------------------------------------------------------------


@dataclass(slots=True)
class _PendingAuth:
    """An ``FW-TOKEN`` exchange waiting for the client's proof."""

    connect: c.Connect | None  # the CONNECT it belongs to; None for a re-authentication
    token: AccessToken
    token_text: str = dataclasses.field(repr=False)  # the bearer token itself
    challenge: bytes = dataclasses.field(repr=False)
    client_id: str = ""


def _renew(admission: Admission, fresh: Admission) -> None:
    """Re-authentication succeeded: the live admission (registered with the gate and
    the session) takes the new token's scopes, expiry and revocation markers in place."""
    admission.policy = fresh.policy
    admission.state = fresh.state
    admission.quarantined = fresh.quarantined
    admission.firmware_version = fresh.firmware_version
    copy_credential(fresh, admission)

_STEP_PUBLISH: Final = 0  # an inbound PUBLISH waiting for accept_publish
_STEP_PACKET: Final = 1  # a packet to handle after the ones before it
_STEP_WRITE: Final = 2  # bytes to send after the acknowledgements before them


class _Step:
    __slots__ = ("code", "data", "future", "kind", "packet", "size", "watched")

    def __init__(self, kind: int, packet: Any = None,
                 future: asyncio.Future[Any] | None = None, data: bytes = b"",
                 size: int = 0) -> None:
        self.kind = kind
        self.packet = packet
        self.future = future
        self.data = data
        self.size = size
        self.watched = False
        self.code: int | None = None


class _Connection(asyncio.Protocol):
    """One client connection; also the :class:`SessionLink` of its session."""

    def __init__(self, server: MqttServer) -> None:
        self.server = server
        self.config = server.config
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.source = "unknown"
        self.peer_der: bytes | None = None
        self.reader = c.PacketReader(server.config.max_packet_size_bytes)
        self.version = 0
        self.admission: Admission | None = None
        self.session: Session | None = None
        self.will: c.Will | None = None
        self.will_discarded = False  # DISCONNECT 0x00 received (§3.1.2.5)
        self.disconnecting = False
        self.closing = False
        self.released = False
        self.congested = False
        self.paused = False
        self.problem_information = True  # 5.0 §3.1.2.11.7
        self.client_receive_maximum = server.config.max_inflight_messages
        self.client_max_packet: int | None = None
        self.requested_expiry = 0
        self.keep_alive = 0.0
        self.last_packet = 0.0
        self.live_key: int | None = None
        self.pipeline: deque[_Step] = deque()
        self.out: list[bytes] = []  # written this loop iteration, not yet flushed
        self.out_bytes = 0
        self.flush_scheduled = False
        self.valid_topics: set[str] = set()  # topic names this client used that passed
        self.pipeline_bytes = 0
        self.unacked_in = 0  # inbound QoS > 0 PUBLISHes not yet acknowledged
        self.timer: asyncio.TimerHandle | None = None
        self.abort_timer: asyncio.TimerHandle | None = None
        # Enhanced authentication (§4.12): the method CONNECT named, an exchange waiting
        # for the client's AUTH, and the timer that ends the session when the token or
        # SAS expires.
        self.auth_method: str | None = None
        self.pending_auth: _PendingAuth | None = None
        self.credential_timer: asyncio.TimerHandle | None = None

    # --- SessionLink -----------------------------------------------------------------------

    @property
    def window(self) -> int:
        return self.client_receive_maximum

    @property
    def writable(self) -> bool:
        return not self.congested and not self.closing

    def write_publish(self, delivery: Delivery, dup: bool, expiry: int | None) -> bool:
        transport = self.transport
        if self.closing or transport is None:
            return True  # stays in flight; resent on resume (§4.4)
        message = delivery.message
        properties = c.EMPTY_PROPERTIES
        if self.version == c.MQTT_5:
            properties = message.properties
            if delivery.subscription_ids or expiry is not None:
                properties = dataclasses.replace(
                    properties, subscription_identifiers=delivery.subscription_ids,
                    message_expiry_interval=expiry)
        data = c.encode_publish(message.topic, message.payload, delivery.qos, delivery.retain,
                                dup, delivery.packet_id if delivery.qos else None, properties,
                                self.version)
        if self.client_max_packet is not None and len(data) > self.client_max_packet:
            return False  # 5.0 §3.1.2.11.4: discard as if delivered
        self._send(data)
        self.server.broker.counters.messages_out += 1
        return True

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass: duck-type it.
        if not callable(getattr(transport, "write", None)):
            transport.close()
            return
        self.transport = transport = cast(asyncio.Transport, transport)
        self.server._connections.add(self)
        self.source = format_peer(transport.get_extra_info("peername"))
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.peer_der = ssl_object.getpeercert(binary_form=True)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_BYTES,
                                          low=WRITE_BUFFER_LOW_BYTES)
        # §3.1.4: the server may close a connection that sends no CONNECT in time.
        self.timer = self.loop.call_later(float(self.config.connect_timeout_seconds),
                                          self._connect_timeout)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.reader.feed(data)
        self._process()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self.congested = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.congested = False
        self._update_reading()
        if self.session is not None and self.session.link is self:
            self.session.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        if self.abort_timer is not None:
            self.abort_timer.cancel()
        if not self.closing:
            self.closing = True
            self._cancel_timer()
            reason = "client disconnected" if self.will_discarded else "connection lost"
            self._release(reason, will=True)

    # --- closing -----------------------------------------------------------------------------

    def close(self, why: str, *, will: bool, code: int | None = None, reason: str = "") -> None:
        """Close this connection (idempotent, returns at once).

        Args:
            why: for logs and ``hooks.disconnected``.
            will: publish the will (an abnormal end, 5.0 §3.1.2.5) unless a
                DISCONNECT 0x00 discarded it.
            code: the 5.0 DISCONNECT reason code to send first (after CONNACK only).
            reason: the Reason String for that DISCONNECT.
        """
        if self.closing:
            return
        self.closing = True
        self._cancel_timer()
        transport = self.transport
        if transport is not None:
            self._flush()
            if code is not None and self.version == c.MQTT_5 and self.admission is not None:
                properties = (c.Properties(reason_string=reason[:200]) if reason
                              else c.EMPTY_PROPERTIES)
                transport.write(c.encode(c.Disconnect(code, properties), c.MQTT_5))
            transport.close()
            # A peer that does not read the last bytes must not keep the connection open.
            self.abort_timer = self.loop.call_later(CLOSE_GRACE_SECONDS, transport.abort)
        self._release(why, will=will)

    def _admin_close(self, code: int, reason: str) -> None:
        """Closer.close: the control plane ended this device's right to be here. No
        will: a revoked or disabled device must not publish anything more."""
        self.close(f"closed by the server: {reason}", will=False, code=code, reason=reason)

    def _release(self, why: str, *, will: bool) -> None:
        if self.released:
            return
        self.released = True
        server = self.server
        if self.live_key is not None:
            server.live.unregister(self.live_key)
            self.live_key = None
        session = self.session
        admission = self.admission
        if session is None or admission is None:
            return
        if session.link is self:
            session.detach()
            # A will goes after the PUBLISHes this connection sent before it ended.
            last = next((step.future for step in reversed(self.pipeline)
                         if step.future is not None), None)
            server.detached(session, admission,
                            self.will if will and not self.will_discarded else None,
                            self.source, last)
        try:
            server.hooks.disconnected(admission, why)
        except Exception:
            log.exception("mqtt disconnected hook failed")

    def _fail(self, code: int, message: str) -> None:
        """A malformed packet or protocol error (5.0 §4.13): DISCONNECT with the reason
        code after CONNACK (3.1.1: just close, §4.8); before CONNACK, close."""
        self.server.audit("mqtt.protocol_error", self.admission, self.source,
                          {"reason_code": code, "detail": message[:200]})
        # One structured line per connection (the audit row is throttled per peer). The
        # messages name the rule broken, never the packet's bytes (user name, password).
        log.warning("mqtt protocol error", listener="mqtt", peer=self.source,
                    device_id=self.admission.device_id if self.admission else None,
                    reason_code=code, reason=message[:200])
        if (self.admission is None and code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
                and self.transport is not None and not self.closing):
            self._send(V311_UNSUPPORTED_VERSION_CONNACK)
        self.close(f"protocol error: {message}", will=True, code=code, reason=message)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.credential_timer is not None:
            self.credential_timer.cancel()
            self.credential_timer = None

    def _connect_timeout(self) -> None:
        self.timer = None
        if self.admission is None:
            self.close("no CONNECT in time", will=False)

    def _keepalive_check(self) -> None:
        self.timer = None
        if self.closing:
            return
        limit = self.keep_alive * KEEPALIVE_GRACE_FACTOR
        idle = self.loop.time() - self.last_packet
        if idle >= limit:
            self.close("keep-alive timeout", will=True, code=ReasonCode.KEEP_ALIVE_TIMEOUT,
                       reason=f"no packet for {limit:g} seconds (§3.1.2.10)")
        else:
            self.timer = self.loop.call_later(limit - idle, self._keepalive_check)

    # --- reading --------------------------------------------------------------------------

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        want_pause = (self.congested or len(self.pipeline) >= PIPELINE_MAX_MESSAGES
                      or self.pipeline_bytes >= PIPELINE_MAX_BYTES)
        if want_pause and not self.paused:
            self.paused = True
            transport.pause_reading()
        elif not want_pause and self.paused:
            self.paused = False
            transport.resume_reading()
            self.loop.call_soon(self._process)  # packets already buffered in the reader

    def _process(self) -> None:
        reader = self.reader
        try:
            while not self.closing and not self.paused:
                packet = reader.next_packet()
                if packet is None:
                    return
                self.last_packet = self.loop.time()
                if self.disconnecting:
                    continue  # §3.14.4: nothing counts after DISCONNECT
                if type(packet) is c.Publish:
                    self._on_publish(packet)
                else:
                    self._dispatch(packet)
        except c.MalformedPacket as exc:
            self._fail(exc.reason_code, exc.message)
        except Exception:
            log.exception("mqtt connection failed", source=self.source)
            self.close("internal error", will=True, code=ReasonCode.UNSPECIFIED_ERROR,
                       reason="internal server error")

    def _dispatch(self, packet: c.Packet) -> None:
        if self.admission is None:
            if isinstance(packet, c.Connect):
                if self.version:
                    raise c.MalformedPacket(ReasonCode.PROTOCOL_ERROR,
                                            "second CONNECT (§3.1 [MQTT-3.1.0-2])")
                self._on_connect(packet)
            elif isinstance(packet, c.Auth) and self.pending_auth is not None:
                self._on_connect_auth(packet)
            elif isinstance(packet, c.Disconnect) and self.pending_auth is not None:
                # [MQTT-3.1.2-30] allows it: the client gives up the exchange.
                self.close("client disconnected during authentication", will=False)
            elif self.version:
                raise c.MalformedPacket(ReasonCode.PROTOCOL_ERROR,
                                        f"{type(packet).__name__} before CONNACK (§4.12)")
            return
        session = self.session
        if isinstance(packet, c.Puback):
            if session is not None:
                session.acknowledge(packet.packet_id)
        elif isinstance(packet, c.Pingreq):
            self._write(c.PINGRESP)  # §3.12.4
        elif isinstance(packet, c.Subscribe | c.Unsubscribe | c.Pubrel):
            self._in_order(_Step(_STEP_PACKET, packet))
        elif isinstance(packet, c.Disconnect):
            self._on_disconnect(packet)
        elif isinstance(packet, c.Connect):
            raise c.MalformedPacket(ReasonCode.PROTOCOL_ERROR,
                                    "second CONNECT (§3.1 [MQTT-3.1.0-2])")
        elif isinstance(packet, c.Pubrec | c.Pubcomp):
            raise c.MalformedPacket(ReasonCode.PROTOCOL_ERROR,
                                    "PUBREC/PUBCOMP for a QoS 2 message this server never "
                                    "sends (Maximum QoS 1)")
        elif isinstance(packet, c.Auth):
            self._on_reauth(packet)
        else:
            raise c.MalformedPacket(ReasonCode.PROTOCOL_ERROR,
                                    f"{type(packet).__name__} is sent by servers, not clients")

    def _write(self, packet: c.Packet) -> None:
        if self.transport is None or self.closing:
            return
        data = c.encode(packet, self.version)
        if (self.client_max_packet is not None and len(data) > self.client_max_packet
                and hasattr(packet, "properties")):
            # 5.0 §3.1.2.11.4: leave out the Reason String and User Properties rather
            # than exceed the client's Maximum Packet Size.
            with_properties: Any = packet
            data = c.encode(dataclasses.replace(with_properties,
                                                properties=c.EMPTY_PROPERTIES), self.version)
        self._send(data)

    def _send(self, data: bytes) -> None:
        """Queue bytes for the transport; everything one loop iteration writes goes out
        as one write (a TLS record per small ack would cost more than the ack)."""
        self.out.append(data)
        self.out_bytes += len(data)
        if self.out_bytes >= WRITE_BUFFER_LOW_BYTES:
            self._flush()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if not self.out:
            return
        data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
        self.out.clear()
        self.out_bytes = 0
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)  # may call pause_writing

    def _write_in_order(self, packet: c.Packet) -> None:
        """Acknowledgements go out in the order of the packets they answer (§4.6)."""
        if self.pipeline:
            self.pipeline.append(_Step(_STEP_WRITE, data=c.encode(packet, self.version)))
        else:
            self._write(packet)

    def _in_order(self, step: _Step) -> None:
        if self.pipeline:
            self.pipeline.append(step)
        else:
            self._finish(step)

    def _reason(self, text: str) -> c.Properties:
        """A Reason String, unless the client asked for none (5.0 §3.1.2.11.7)."""
        if self.version != c.MQTT_5 or not self.problem_information:
            return c.EMPTY_PROPERTIES
        return c.Properties(reason_string=text[:200])

    # --- CONNECT --------------------------------------------------------------------------

    def _refuse_connect(self, code: int, reason: str, admission: Admission | None = None,
                        *, audit: bool = True) -> None:
        # Our reason, never the CONNECT's user name or password (the server ignores both).
        log.info("mqtt connect refused", listener="mqtt", peer=self.source,
                 reason_code=code, reason=reason[:200])
        if audit:
            self.server.audit("mqtt.connect_refused", admission, self.source,
                              {"reason_code": code, "reason": reason})
        if self.transport is not None:
            if self.version == c.MQTT_5:
                packet = c.Connack(False, code, c.Properties(reason_string=reason[:200]))
            else:
                packet = c.Connack(False, _v311_connack(code))
            self._send(c.encode(packet, self.version))
        self.close(f"connect refused: {reason}", will=False)

    def _on_connect(self, packet: c.Connect) -> None:
        self._cancel_timer()
        self.version = packet.protocol_version
        if not packet.client_id:
            # The client id must be the device id; an empty one would get a generated
            # id (3.1.1 §3.1.3.1, 5.0 §3.1.3.1), which can never match a certificate.
            self._refuse_connect(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                                 "the client id must be the device id of the certificate")
            return
        try:
            admitted = self._authenticate(packet)
        except c.MalformedPacket:
            raise  # a protocol error (_process answers it), not a failure to decide
        except Exception:
            log.exception("mqtt gate failed", source=self.source)
            self._refuse_connect(ReasonCode.SERVER_UNAVAILABLE, "the server cannot decide now")
            return
        if admitted is None:
            return  # an AUTH exchange is under way (FW-TOKEN challenge)
        if isinstance(admitted, Refused):
            # The gate audits its own refusals.
            self._refuse_connect(admitted.code, admitted.reason, audit=False)
            return
        self._complete_connect(packet, admitted)

    def _authenticate(self, packet: c.Connect) -> Admission | Refused | None:
        """Who the CONNECT is from: ``FW-TOKEN`` enhanced authentication (v5), an access
        or SAS token in the password, or the client certificate (docs/credentials.md).
        None while a challenge waits for the client's AUTH."""
        server = self.server
        credentials = server.credentials
        method = packet.properties.authentication_method if self.version == c.MQTT_5 else None
        if method is None and packet.properties.authentication_data is not None:
            raise c.MalformedPacket(ReasonCode.PROTOCOL_ERROR,
                                    "Authentication Data without an Authentication Method "
                                    "(§3.1.2.11.10)")
        if method is not None:
            if method != TOKEN_AUTH_METHOD or credentials is None:
                reason = (f"authentication method {method[:40]!r} is not supported; use "
                          f"{TOKEN_AUTH_METHOD} (§4.12), a token in the password, or a "
                          "client certificate")
                if credentials is None:
                    return Refused(Refusal.BAD_AUTHENTICATION_METHOD, reason)
                return credentials.gate.refuse(Refusal.BAD_AUTHENTICATION_METHOD, reason,
                                               "mqtt", self.source, None)
            if packet.password is not None:
                return credentials.gate.refuse(
                    Refusal.BAD_CREDENTIALS, f"{TOKEN_AUTH_METHOD} carries the token in "
                    "the Authentication Data; send no password", "mqtt", self.source, None)
            return self._start_token_auth(packet, packet.properties.authentication_data,
                                          None)
        if packet.password is not None and credentials is not None:
            admitted = credentials.mqtt_password(
                packet.username, packet.password, client_id=packet.client_id,
                peer_der=self.peer_der, source=self.source)
            if admitted is not None:
                return admitted
        if self.peer_der is None and credentials is not None:
            return credentials.gate.refuse(
                Refusal.BAD_CREDENTIALS, "no credentials: connect with a client certificate "
                "from this server's CA, or send an access token or SAS token as the password "
                "(docs/credentials.md)", "mqtt", self.source, None)
        return server.gate.admit(self.peer_der, channel="mqtt", client_id=packet.client_id,
                                 source=self.source)

    def _start_token_auth(self, packet: c.Connect | None, data: bytes | None,
                          reauth_of: Admission | None) -> Admission | Refused | None:
        """``FW-TOKEN`` step 1: verify the token; a key-bound one gets a challenge."""
        credentials = self.server.credentials
        assert credentials is not None
        verified = credentials.mqtt_token(data, self.source)
        if isinstance(verified, Refused):
            return verified
        token, text = verified
        client_id = packet.client_id if packet is not None else (
            reauth_of.device_id if reauth_of is not None else "")
        if reauth_of is not None and token.device_id != reauth_of.device_id:
            return credentials.gate.refuse(
                Refusal.NOT_AUTHORIZED, "re-authentication must be for the same device",
                "mqtt", self.source, reauth_of.device_id)
        if token.binding != "jkt":
            return credentials.mqtt_admit(token, text, client_id=client_id,
                                          peer_der=self.peer_der, source=self.source)
        challenge = os.urandom(AUTH_CHALLENGE_BYTES)
        self.pending_auth = _PendingAuth(packet, token, text, challenge, client_id)
        self._send(c.encode(c.Auth(ReasonCode.CONTINUE_AUTHENTICATION, c.Properties(
            authentication_method=TOKEN_AUTH_METHOD, authentication_data=challenge)),
            c.MQTT_5))
        if packet is not None:
            # §4.12: the whole exchange must finish within the CONNECT timeout.
            self.timer = self.loop.call_later(float(self.config.connect_timeout_seconds),
                                              self._connect_timeout)
        return None

    def _finish_token_auth(self, packet: c.Auth) -> Admission | Refused:
        """``FW-TOKEN`` step 2: the client's AUTH answers the challenge with a proof."""
        pending = self.pending_auth
        credentials = self.server.credentials
        assert pending is not None and credentials is not None
        self.pending_auth = None
        if (packet.reason_code != ReasonCode.CONTINUE_AUTHENTICATION
                or packet.properties.authentication_method != TOKEN_AUTH_METHOD):
            raise c.MalformedPacket(ReasonCode.PROTOCOL_ERROR,
                                    f"expected AUTH 0x18 with method {TOKEN_AUTH_METHOD} "
                                    "answering the challenge (§4.12)")
        return credentials.mqtt_admit(pending.token, pending.token_text,
                                      client_id=pending.client_id, peer_der=self.peer_der,
                                      source=self.source,
                                      proof=packet.properties.authentication_data or b"",
                                      challenge=pending.challenge)

    def _on_connect_auth(self, packet: c.Auth) -> None:
        pending = self.pending_auth
        assert pending is not None and pending.connect is not None
        self._cancel_timer()
        admitted = self._finish_token_auth(packet)
        if isinstance(admitted, Refused):
            self._refuse_connect(admitted.code, admitted.reason, audit=False)
            return
        self._complete_connect(pending.connect, admitted)

    def _on_reauth(self, packet: c.Auth) -> None:
        """Re-authentication (§4.12.1): a fresh token (and its proof) while the session
        goes on. Failure ends the session with DISCONNECT 0x87."""
        admission = self.admission
        if self.auth_method is None or admission is None:
            raise c.MalformedPacket(ReasonCode.PROTOCOL_ERROR,
                                    "AUTH without an Authentication Method in CONNECT (§4.12)")
        if packet.properties.authentication_method != self.auth_method:
            raise c.MalformedPacket(ReasonCode.PROTOCOL_ERROR,
                                    "AUTH with another Authentication Method than CONNECT's "
                                    "(§4.12.1)")
        if packet.reason_code == ReasonCode.RE_AUTHENTICATE and self.pending_auth is None:
            verdict = self._start_token_auth(None, packet.properties.authentication_data,
                                             admission)
            if verdict is None:
                return  # challenge sent
        elif (packet.reason_code == ReasonCode.CONTINUE_AUTHENTICATION
              and self.pending_auth is not None):
            verdict = self._finish_token_auth(packet)
        else:
            raise c.MalformedPacket(ReasonCode.PROTOCOL_ERROR,
                                    "unexpected AUTH reason code (§4.12.1)")
        if isinstance(verdict, Refused):
            self.close(f"re-authentication refused: {verdict.reason}", will=False,
                       code=ReasonCode.NOT_AUTHORIZED,
                       reason=f"re-authentication refused: {verdict.reason}")
            return
        _renew(admission, verdict)
        self._write(c.Auth(ReasonCode.SUCCESS, c.Properties(
            authentication_method=TOKEN_AUTH_METHOD)))
        self._schedule_credential_expiry()
        self._recheck_subscriptions()  # the new token's scopes may be narrower

    def _schedule_credential_expiry(self) -> None:
        if self.credential_timer is not None:
            self.credential_timer.cancel()
            self.credential_timer = None
        admission = self.admission
        if admission is None or math.isinf(admission.credential_expires_at):
            return
        delay = max(0.0, admission.credential_expires_at - self.server.now())
        self.credential_timer = self.loop.call_later(delay, self._credential_expired)

    def _credential_expired(self) -> None:
        """The token or SAS that authenticated the session has expired: DISCONNECT 0xA0
        Maximum connect time (5.0; 3.1.1: close). Why 0xA0 and not 0x87: see
        docs/credentials.md ("Expiry"). No will: the device's authority has ended."""
        self.credential_timer = None
        admission = self.admission
        if admission is None or self.closing:
            return
        if admission.credential_expires_at > self.server.now():
            self._schedule_credential_expiry()  # re-authenticated meanwhile
            return
        name = "access token" if admission.auth is AuthMethod.ACCESS_TOKEN else "SAS token"
        at = dt.datetime.fromtimestamp(admission.credential_expires_at, dt.UTC)
        reason = (f"the {name} expired at {at.isoformat().replace('+00:00', 'Z')}; "
                  + ("re-authenticate (AUTH 0x19) before it expires, or " if
                     self.auth_method else "")
                  + f"reconnect with a new {name}")
        self.close(f"{name} expired", will=False, code=ReasonCode.MAXIMUM_CONNECT_TIME,
                   reason=reason)

    def _complete_connect(self, packet: c.Connect, admission: Admission) -> None:
        """CONNECT after authentication: will, keep alive, session, CONNACK."""
        server = self.server
        config = self.config
        version = self.version
        v5 = version == c.MQTT_5
        props = packet.properties
        if v5 and props.authentication_method is not None:
            self.auth_method = props.authentication_method
        will = packet.will
        if will is not None:
            refusal = self._check_will(will, admission)
            if refusal is not None:
                self._refuse_connect(refusal[0], refusal[1], admission)
                return

        # Keep Alive (§3.1.2.10, §3.2.2.3.14): 0 or above the maximum gets the maximum.
        requested_keep_alive = packet.keep_alive
        max_keep_alive = config.max_keepalive_seconds
        keep_alive = (requested_keep_alive if 0 < requested_keep_alive <= max_keep_alive
                      else max_keep_alive)
        # Session expiry (5.0 §3.1.2.11.2; 3.1.1 Clean Session §3.1.2.4), capped.
        if v5:
            self.requested_expiry = props.session_expiry_interval or 0
            expiry = min(self.requested_expiry, config.max_session_expiry_seconds)
        else:
            expiry = 0 if packet.clean_start else config.max_session_expiry_seconds
        if v5:
            self.problem_information = props.request_problem_information != 0
            self.client_receive_maximum = min(props.receive_maximum or 65535,
                                              config.max_inflight_messages)
            self.client_max_packet = props.maximum_packet_size

        broker = server.broker
        client_id = packet.client_id
        existing = broker.sessions.get(client_id)
        if existing is not None and isinstance(existing.link, _Connection):
            # §3.1.4-3: a second connection with the same client id takes over; the old
            # one gets DISCONNECT 0x8E and is closed. Twice the same certificate live
            # at once may be a clone: audited.
            previous = existing.link
            server.audit("mqtt.session_taken_over", admission, self.source,
                         {"previous_source": previous.source, "client_id": client_id})
            previous.close("session taken over", will=True, code=ReasonCode.SESSION_TAKEN_OVER,
                           reason="another connection with this client id took over")
            existing = broker.sessions.get(client_id)
        if existing is not None and packet.clean_start:
            server.end_session(existing)  # §3.1.2.4: Clean Start discards the session
            existing = None
        session_present = existing is not None
        if existing is not None:
            session = existing
            session.pending_will = None  # §3.1.3.2.2: reconnected before the will delay
            session.admission = admission
            session.expiry_seconds = expiry
        else:
            session = broker.new_session(client_id, admission, expiry)

        connack_properties = c.EMPTY_PROPERTIES
        if v5:
            connack_properties = c.Properties(
                session_expiry_interval=expiry if expiry != self.requested_expiry else None,
                receive_maximum=config.max_inflight_messages,
                maximum_qos=1,
                retain_available=1,
                maximum_packet_size=config.max_packet_size_bytes,
                topic_alias_maximum=0,
                wildcard_subscription_available=1,
                subscription_identifier_available=1,
                shared_subscription_available=0,
                server_keep_alive=(keep_alive if keep_alive != requested_keep_alive
                                   else None),
                authentication_method=self.auth_method)
        self.admission = admission
        self.session = session
        self.will = will
        self.keep_alive = float(keep_alive)
        self._write(c.Connack(session_present, 0, connack_properties))
        if session_present:
            # The policy may have changed while the device was away.
            self._recheck_subscriptions()
        self.live_key = server.live.register(
            Closer(channel="mqtt", admission=admission, close=self._admin_close,
                   policy_changed=self._recheck_subscriptions))
        try:
            server.hooks.connected(admission, self.source)
        except Exception:
            log.exception("mqtt connected hook failed")
        self.last_packet = self.loop.time()
        self.timer = self.loop.call_later(self.keep_alive * KEEPALIVE_GRACE_FACTOR,
                                          self._keepalive_check)
        self._schedule_credential_expiry()
        session.resume(self)

    def _check_will(self, will: c.Will, admission: Admission) -> tuple[int, str] | None:
        if self.version == c.MQTT_5 and will.qos == 2:
            # §3.2.2.3.4 [MQTT-3.2.2-12]: a Will QoS above Maximum QoS is refused.
            return ReasonCode.QOS_NOT_SUPPORTED, "Will QoS 2 is not supported (Maximum QoS 1)"
        try:
            validate_topic_name(will.topic, max_bytes=self.config.max_topic_bytes,
                                max_levels=self.config.max_topic_levels)
        except InvalidInput as exc:
            return ReasonCode.TOPIC_NAME_INVALID, f"will topic: {exc.message}"
        decision = admission.decide(Action.MQTT_PUBLISH, will.topic)
        if not decision.allowed:
            self.server.broker.counters.publishes_denied += 1
            return ReasonCode.NOT_AUTHORIZED, f"will topic not authorized: {decision.reason}"
        if will.properties.payload_format_indicator == 1 and not _is_utf8(will.payload):
            return ReasonCode.PAYLOAD_FORMAT_INVALID, "will payload is not UTF-8 (§3.1.3.2.3)"
        return None

    # --- PUBLISH ---------------------------------------------------------------------------

    def _on_publish(self, packet: c.Publish) -> None:
        if self.admission is None or self.session is None:
            if self.version:
                # [MQTT-3.1.2-30]: nothing but AUTH or DISCONNECT before CONNACK.
                raise c.MalformedPacket(ReasonCode.PROTOCOL_ERROR,
                                        "PUBLISH before CONNACK (§4.12)")
            return
        v5 = self.version == c.MQTT_5
        qos = packet.qos
        properties = packet.properties
        if v5:
            if qos == 2:
                raise c.MalformedPacket(ReasonCode.QOS_NOT_SUPPORTED,
                                        "QoS 2 PUBLISH: CONNACK announced Maximum QoS 1 "
                                        "(§3.3.1.2, §3.2.2.3.4)")
            if properties.topic_alias is not None:
                raise c.MalformedPacket(ReasonCode.TOPIC_ALIAS_INVALID,
                                        "Topic Alias: CONNACK announced Topic Alias Maximum 0 "
                                        "(§3.3.2.3.4)")
            if properties.subscription_identifiers:
                raise c.MalformedPacket(ReasonCode.PROTOCOL_ERROR,
                                        "a client PUBLISH carries a Subscription Identifier "
                                        "(§3.3.4 [MQTT-3.3.4-6])")
        topic = packet.topic
        config = self.config
        if topic not in self.valid_topics:
            try:
                validate_topic_name(topic, max_bytes=config.max_topic_bytes,
                                    max_levels=config.max_topic_levels)
            except InvalidInput as exc:
                raise c.MalformedPacket(ReasonCode.TOPIC_NAME_INVALID, exc.message) from exc
            if len(self.valid_topics) >= VALID_TOPIC_CACHE_ENTRIES:
                self.valid_topics.clear()
            self.valid_topics.add(topic)
        session = self.session
        packet_id = packet.packet_id or 0
        if qos:
            if v5 and self.unacked_in >= config.max_inflight_messages:
                raise c.MalformedPacket(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                                        "more unacknowledged PUBLISHes than the Receive "
                                        "Maximum (§3.3.4)")
            if qos == 2:
                if packet_id in session.inbound_qos2:
                    # 3.1.1 §4.3.3: already delivered onwards; acknowledge, do not deliver
                    # again.
                    self._write_in_order(c.Pubrec(packet_id))
                    return
                if len(session.inbound_qos2) >= config.max_inflight_messages:
                    raise c.MalformedPacket(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                                            "too many unreleased QoS 2 messages")
        admission = self.admission
        server = self.server
        decision = admission.decide(Action.MQTT_PUBLISH, topic)
        if not decision.allowed:
            server.broker.counters.publishes_denied += 1
            server.audit("mqtt.publish_denied", admission, self.source,
                         {"topic": topic[:256], "qos": qos, "reason": decision.reason})
            self._refuse_publish(packet, ReasonCode.NOT_AUTHORIZED,
                                 f"not authorized: {decision.reason}")
            return
        if (packet.retain and packet.payload
                and not server.broker.retained.has_room_for(topic, len(packet.payload))):
            server.audit("mqtt.publish_refused", admission, self.source,
                         {"topic": topic[:256], "reason_code": ReasonCode.QUOTA_EXCEEDED})
            self._refuse_publish(packet, ReasonCode.QUOTA_EXCEEDED,
                                 "the retained-message store is full")
            return
        if properties.payload_format_indicator == 1 and not _is_utf8(packet.payload):
            # §3.3.2.3.2: the receiver may check a payload declared as UTF-8.
            self._refuse_publish(packet, ReasonCode.PAYLOAD_FORMAT_INVALID,
                                 "the payload is declared UTF-8 but is not (§3.3.2.3.2)")
            return
        if qos == 2:
            session.inbound_qos2.add(packet_id)
        code, future = server.start_accept(admission, topic, packet.payload, qos,
                                           packet.retain)
        if future is None and not self.pipeline:
            self._complete_publish(packet, code)  # the common case: answered at once
            return
        size = len(packet.payload)
        step = _Step(_STEP_PUBLISH, packet, future, size=size)
        step.code = code
        self.pipeline.append(step)
        self.pipeline_bytes += size
        if qos:
            self.unacked_in += 1
        if len(self.pipeline) == 1:
            self._drain()
        elif (len(self.pipeline) >= PIPELINE_MAX_MESSAGES
              or self.pipeline_bytes >= PIPELINE_MAX_BYTES):
            self._update_reading()

    def _refuse_publish(self, packet: c.Publish, code: int, reason: str) -> None:
        """5.0: PUBACK/PUBREC with the reason code for QoS > 0, QoS 0 is dropped.
        3.1.1 cannot say no: close the connection (3.1.1 §3.3.5)."""
        if self.version != c.MQTT_5:
            self.close(f"publish refused: {reason}", will=True)
            return
        if packet.qos == 1:
            self._write_in_order(c.Puback(packet.packet_id or 0, code, self._reason(reason)))

    # --- in-order completion ------------------------------------------------------------------

    def _drain(self, _: object = None) -> None:
        pipeline = self.pipeline
        while pipeline:
            step = pipeline[0]
            future = step.future
            if future is not None and not future.done():
                if not step.watched:
                    step.watched = True
                    future.add_done_callback(self._drain)
                break
            pipeline.popleft()
            try:
                self._finish(step)
            except c.MalformedPacket as exc:
                self._fail(exc.reason_code, exc.message)
            except Exception:
                log.exception("mqtt step failed", source=self.source)
                self.close("internal error", will=True, code=ReasonCode.UNSPECIFIED_ERROR,
                           reason="internal server error")
        self._update_reading()

    def _finish(self, step: _Step) -> None:
        if step.kind == _STEP_PUBLISH:
            self._finish_publish(step)
        elif self.closing:
            return
        elif step.kind == _STEP_WRITE:
            if self.transport is not None:
                self._send(step.data)
        else:
            packet = step.packet
            if isinstance(packet, c.Subscribe):
                self._on_subscribe(packet)
            elif isinstance(packet, c.Unsubscribe):
                self._on_unsubscribe(packet)
            elif isinstance(packet, c.Pubrel):
                self._on_pubrel(packet)
            elif isinstance(packet, c.Disconnect):
                self.close("client disconnected", will=True)

    def _finish_publish(self, step: _Step) -> None:
        packet: c.Publish = step.packet
        self.pipeline_bytes -= step.size
        if packet.qos:
            self.unacked_in -= 1
        code = _result_code(step.future) if step.future is not None else step.code
        self._complete_publish(packet, code)

    def _complete_publish(self, packet: c.Publish, code: int | None) -> None:
        """The sinks answered: route and acknowledge, or refuse (in arrival order)."""
        qos = packet.qos
        server = self.server
        admission = self.admission
        if code is None:
            origin = self.session.client_id if self.session is not None else None
            server.accept(server.message(packet.topic, packet.payload, qos, packet.retain,
                                         packet.properties, origin))
            if qos == 1:
                self._write(c.Puback(packet.packet_id or 0))
            elif qos == 2:
                self._write(c.Pubrec(packet.packet_id or 0))
            return
        if code not in c.PUBACK_REASON_CODES or code < 0x80:
            code = ReasonCode.UNSPECIFIED_ERROR
        server.audit("mqtt.publish_refused", admission, self.source,
                     {"topic": packet.topic[:256], "reason_code": code})
        if qos == 2 and self.session is not None:
            self.session.inbound_qos2.discard(packet.packet_id or 0)
        if not self.closing:
            if self.version != c.MQTT_5:
                self.close(f"publish refused: {_describe(code)}", will=True)
            elif qos == 1:
                self._write(c.Puback(packet.packet_id or 0, code,
                                     self._reason(f"refused: {_describe(code)}")))

    # --- other packets --------------------------------------------------------------------------

    def _on_disconnect(self, packet: c.Disconnect) -> None:
        """DISCONNECT from the client (§3.14). Decided on arrival, acted on in order."""
        self.disconnecting = True
        code = packet.reason_code
        if self.version != c.MQTT_5 or code == ReasonCode.SUCCESS:
            self.will_discarded = True  # §3.1.2.5 [MQTT-3.1.2-10], 3.1.1 §3.14.4
        new_expiry = packet.properties.session_expiry_interval
        if new_expiry is not None and self.session is not None:
            if self.requested_expiry == 0 and new_expiry != 0:
                self.will_discarded = False
                raise c.MalformedPacket(ReasonCode.PROTOCOL_ERROR,
                                        "Session Expiry Interval set on DISCONNECT after 0 "
                                        "on CONNECT (§3.14.2.2.2)")
            self.session.expiry_seconds = min(new_expiry,
                                              self.config.max_session_expiry_seconds)
        self._in_order(_Step(_STEP_PACKET, packet))

    def _on_pubrel(self, packet: c.Pubrel) -> None:
        """3.1.1 §4.3.3: release the identifier, PUBCOMP. A 5.0 client never has one
        (QoS 2 is refused): 0x92 Packet Identifier not found."""
        session = self.session
        found = session is not None and packet.packet_id in session.inbound_qos2
        if session is not None:
            session.inbound_qos2.discard(packet.packet_id)
        code = 0 if found else ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
        self._write(c.Pubcomp(packet.packet_id, code if self.version == c.MQTT_5 else 0))

    def _on_subscribe(self, packet: c.Subscribe) -> None:
        session = self.session
        admission = self.admission
        if session is None or admission is None:
            return
        v5 = self.version == c.MQTT_5
        config = self.config
        broker = self.server.broker
        sub_ids = packet.properties.subscription_identifiers
        sub_id = sub_ids[0] if sub_ids else None
        codes: list[int] = []
        problems: list[str] = []
        retained: list[Subscriber] = []
        for wanted in packet.subscriptions:
            topic_filter = wanted.topic_filter
            if is_shared_subscription(topic_filter):
                # CONNACK announced Shared Subscription Available 0 (§3.2.2.3.15,
                # [MQTT-3.8.3-4]).
                codes.append(ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED if v5 else 0x80)
                problems.append(f"{topic_filter[:80]}: shared subscriptions not supported")
                continue
            try:
                validate_topic_filter(topic_filter, max_bytes=config.max_topic_bytes,
                                      max_levels=config.max_topic_levels)
            except InvalidInput as exc:
                codes.append(ReasonCode.TOPIC_FILTER_INVALID if v5 else 0x80)
                problems.append(exc.message)
                continue
            decision = admission.decide(Action.MQTT_SUBSCRIBE, topic_filter)
            if not decision.allowed:
                self.server.audit("mqtt.subscribe_denied", admission, self.source,
                                  {"topic_filter": topic_filter[:256],
                                   "reason": decision.reason})
                codes.append(ReasonCode.NOT_AUTHORIZED if v5 else 0x80)
                problems.append(f"{topic_filter[:80]}: not authorized: {decision.reason}")
                continue
            if (topic_filter not in session.subscriptions
                    and len(session.subscriptions) >= config.max_subscriptions_per_session):
                codes.append(ReasonCode.QUOTA_EXCEEDED if v5 else 0x80)
                problems.append(f"at most {config.max_subscriptions_per_session} "
                                "subscriptions per session")
                continue
            granted = min(wanted.qos, 1)  # Maximum QoS 1 (§3.9.3: grant a lower QoS)
            subscriber = Subscriber(session, topic_filter, granted, wanted.no_local,
                                    wanted.retain_as_published, sub_id)
            existed = broker.subscribe(subscriber)
            codes.append(granted)
            # 5.0 §3.8.3.1 Retain Handling: 0 always, 1 only for a new subscription.
            if wanted.retain_handling == 0 or (wanted.retain_handling == 1 and not existed):
                retained.append(subscriber)
        properties = self._reason("; ".join(problems)) if problems else c.EMPTY_PROPERTIES
        self._write(c.Suback(packet.packet_id, tuple(codes), properties))
        for subscriber in retained:
            broker.retained_for(subscriber)
        granted_filters = [wanted.topic_filter for wanted, code in zip(
            packet.subscriptions, codes, strict=True) if code <= 1]
        if granted_filters:
            try:
                self.server.hooks.subscribed(admission, granted_filters)
            except Exception:
                log.exception("mqtt subscribed hook failed")

    def _recheck_subscriptions(self) -> None:
        """Drop the subscriptions the current policy no longer allows (after a policy
        change, or when a persistent session resumes). MQTT has no server-initiated
        UNSUBSCRIBE, so the drop is silent to the client and audited here; deliveries
        were already checked one by one with ``mqtt:receive``."""
        session, admission = self.session, self.admission
        if session is None or admission is None:
            return
        for topic_filter in list(session.subscriptions):
            decision = admission.decide(Action.MQTT_SUBSCRIBE, topic_filter)
            if not decision.allowed:
                self.server.broker.unsubscribe(session, topic_filter)
                self.server.audit("mqtt.subscription_dropped", admission, self.source,
                                  {"topic_filter": topic_filter[:256],
                                   "reason": decision.reason})

    def _on_unsubscribe(self, packet: c.Unsubscribe) -> None:
        session = self.session
        if session is None:
            return
        broker = self.server.broker
        codes: list[int] = []
        for topic_filter in packet.topic_filters:
            try:
                validate_topic_filter(topic_filter, max_bytes=self.config.max_topic_bytes,
                                      max_levels=self.config.max_topic_levels)
            except InvalidInput:
                codes.append(ReasonCode.TOPIC_FILTER_INVALID)
                continue
            existed = broker.unsubscribe(session, topic_filter)
            codes.append(ReasonCode.SUCCESS if existed else ReasonCode.NO_SUBSCRIPTION_EXISTED)
        # 3.1.1 UNSUBACK has no payload (§3.11.3); the codec leaves the codes out.
        self._write(c.Unsuback(packet.packet_id, tuple(codes)))


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True

