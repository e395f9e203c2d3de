"""MQTT sessions: what the server keeps for one client id between connections.

A session holds the client's subscriptions, its in-flight and queued QoS 1 deliveries
and, for MQTT 3.1.1 clients, the packet identifiers of QoS 2 messages it is still
releasing (MQTT 5.0 §4.1, 3.1.1 §4.1). It outlives its network connection for the
Session Expiry Interval (5.0 §3.1.2.11.2) or, for a 3.1.1 client with Clean Session 0,
for the server's maximum (3.1.1 leaves it unbounded; we bound it).

Every queue here is bounded by :class:`~fleetward.config.MqttConfig`: when a client
does not read, the oldest QoS 1 message is dropped and counted, never buffered without
limit.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fleetward.edge.channel import Action, Admission, ChannelPolicy
from fleetward.edge.mqtt.codec import Properties, Will

MAX_PACKET_ID = 0xFFFF  # §2.2.1: packet identifiers are two-byte, non-zero


@dataclass(frozen=True, slots=True)
class Message:
    """An accepted Application Message, shared by every delivery of it.

    ``properties`` are the ones the server forwards unaltered (5.0 §3.3.2.3: payload
    format, content type, response topic, correlation data, user properties);
    ``expires_at`` comes from the Message Expiry Interval (§3.3.2.3.3).
    """

    topic: str
    payload: bytes
    qos: int  # 0 or 1: QoS 2 is accepted from 3.1.1 clients but delivered at QoS 1
    retain: bool
    properties: Properties
    expires_at: float | None = None  # epoch seconds; None = never
    origin: str | None = None  # publishing client id, for No Local; None = the server


@dataclass(slots=True)
class Delivery:
    """One message on its way to one session."""

    message: Message
    qos: int
    retain: bool  # the RETAIN flag this client sees (§3.3.1.3)
    subscription_ids: tuple[int, ...]
    # The policy and token-scope objects that allowed ``mqtt:receive``; a different one
    # (the gate swapped the policy, the client reconnected or re-authenticated with
    # other scopes) means: decide again before sending.
    checked_policy: ChannelPolicy | None
    packet_id: int = 0
    checked_scope: ChannelPolicy | None = None


@dataclass(eq=False, slots=True)
class Subscriber:
    """One subscription of one session; the value stored in the topic trie."""

    session: Session
    topic_filter: str
    qos: int  # granted QoS, 0 or 1
    no_local: bool = False
    retain_as_published: bool = False
    subscription_id: int | None = None


@dataclass(frozen=True, slots=True)
class PendingWill:
    """A Will Message waiting for its Will Delay Interval (5.0 §3.1.3.2.2)."""

    will: Will
    admission: Admission
    source: str
    due_at: float  # epoch seconds


class SessionLink(Protocol):
    """The live connection a session sends through."""

    @property
    def window(self) -> int:
        """How many QoS 1 messages may be unacknowledged (the client's Receive
        Maximum, capped by ours; 5.0 §3.3.4 flow control)."""
        ...

    @property
    def writable(self) -> bool:
        """False while the transport's buffer is above its high-water mark."""
        ...

    def write_publish(self, delivery: Delivery, dup: bool, expiry: int | None) -> bool:
        """Send one PUBLISH; False if the client's Maximum Packet Size forbids it."""
        ...


@dataclass(slots=True)
class Counters:
    """Server-wide message counters (what :meth:`MqttServer.stats` reports)."""

    messages_in: int = 0
    messages_out: int = 0
    messages_dropped: int = 0
    publishes_denied: int = 0
    receives_denied: int = 0


class Session:
    """The state of one client id. Not thread-safe: lives on the event loop."""

    __slots__ = ("_next_id", "_now", "admission", "client_id", "counters", "expires_at",
                 "expiry_seconds", "generation", "inbound_qos2", "inflight", "link",
                 "max_queued", "pending_will", "queue", "subscriptions")

    def __init__(self, client_id: str, admission: Admission, *, expiry_seconds: int,
                 max_queued: int, counters: Counters, now: Callable[[], float]) -> None:
        self.client_id = client_id
        self.admission = admission
        self.expiry_seconds = expiry_seconds
        self.max_queued = max_queued
        self.counters = counters
        self._now = now
        self.link: SessionLink | None = None
        self.subscriptions: dict[str, Subscriber] = {}
        self.inflight: OrderedDict[int, Delivery] = OrderedDict()
        self.queue: deque[Delivery] = deque()
        # 3.1.1 §4.3.3 (method B): identifiers of QoS 2 PUBLISHes delivered onwards and
        # not yet released by PUBREL; a resent PUBLISH with one of them is not
        # delivered again.
        self.inbound_qos2: set[int] = set()
        self.expires_at: float | None = None
        self.pending_will: PendingWill | None = None
        self.generation = 0  # bumped on every attach/detach; stale timers compare it
        self._next_id = 1

    # --- routing ---------------------------------------------------------------------

    def offer(self, delivery: Delivery) -> bool:
        """Send or queue ``delivery``; True if it was sent or queued."""
        link = self.link
        if delivery.qos == 0:
            # QoS 0 is "at most once": never queued, dropped when the client is away
            # or not reading (5.0 §4.3.1).
            if link is None or not link.writable:
                self.counters.messages_dropped += 1
                return False
            return self._write(link, delivery, dup=False)
        if (link is not None and not self.queue and link.writable
                and len(self.inflight) < link.window):
            self._send_new(link, delivery)
            return True
        self._enqueue(delivery)
        return True

    def _enqueue(self, delivery: Delivery) -> None:
        if len(self.queue) >= self.max_queued:
            self.queue.popleft()  # drop the oldest: the newest reading is worth most
            self.counters.messages_dropped += 1
        self.queue.append(delivery)

    def flush(self) -> None:
        """Send queued QoS 1 messages while the window and the transport allow."""
        link = self.link
        if link is None:
            return
        queue = self.queue
        while queue and link.writable and len(self.inflight) < link.window:
            self._send_new(link, queue.popleft())

    def acknowledge(self, packet_id: int) -> bool:
        """PUBACK received (§4.3.2): the message is delivered; make room for the next."""
        if self.inflight.pop(packet_id, None) is None:
            return False
        if self.queue:
            self.flush()
        return True

    def resume(self, link: SessionLink) -> None:
        """Attach a new connection and resend what was in flight (§4.4: same packet
        identifiers, DUP=1), then the queue."""
        self.link = link
        self.generation += 1
        self.expires_at = None
        pending = list(self.inflight.values())
        self.inflight.clear()
        requeue: list[Delivery] = []
        for delivery in pending:
            if len(self.inflight) >= link.window:
                requeue.append(delivery)  # the client lowered its Receive Maximum
                continue
            if not self._still_allowed(delivery):
                continue
            expiry = self._expiry(delivery)
            if expiry == -1:
                continue
            self.inflight[delivery.packet_id] = delivery
            if not link.write_publish(delivery, True, expiry):
                del self.inflight[delivery.packet_id]
        self.queue.extendleft(reversed(requeue))
        self.flush()

    def detach(self) -> None:
        self.link = None
        self.generation += 1

    # --- internals -----------------------------------------------------------------------

    def _still_allowed(self, delivery: Delivery) -> bool:
        admission = self.admission
        policy, scope = admission.policy, admission.scope
        if delivery.checked_policy is policy and delivery.checked_scope is scope:
            return True
        # Admission.decide: the policy and, for a token session, its scopes.
        if admission.decide(Action.MQTT_RECEIVE, delivery.message.topic).allowed:
            delivery.checked_policy = policy
            delivery.checked_scope = scope
            return True
        self.counters.receives_denied += 1
        return False

    def _expiry(self, delivery: Delivery) -> int | None:
        """Seconds of Message Expiry left (§3.3.2.3.3), None if none, -1 if expired."""
        expires_at = delivery.message.expires_at
        if expires_at is None:
            return None
        left = expires_at - self._now()
        if left <= 0:
            self.counters.messages_dropped += 1
            return -1
        return math.ceil(left)

    def _write(self, link: SessionLink, delivery: Delivery, *, dup: bool) -> bool:
        if not self._still_allowed(delivery):
            return False
        expiry = self._expiry(delivery)
        if expiry == -1:
            return False
        if not link.write_publish(delivery, dup, expiry):
            self.counters.messages_dropped += 1
            return False
        return True

    def _send_new(self, link: SessionLink, delivery: Delivery) -> None:
        packet_id = self._allocate_id()
        delivery.packet_id = packet_id
        self.inflight[packet_id] = delivery
        if not self._write(link, delivery, dup=False):
            # Not sent (denied, expired or too large for the client): as if delivered
            # (5.0 §3.1.2.11.4 says exactly this for the size case).
            del self.inflight[packet_id]

    def _allocate_id(self) -> int:
        packet_id = self._next_id
        while packet_id in self.inflight:
            packet_id = packet_id % MAX_PACKET_ID + 1
        self._next_id = packet_id % MAX_PACKET_ID + 1
        return packet_id
