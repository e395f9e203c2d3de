"""The server's shared state: sessions by client id, the subscription trie, retained
messages, and the timers of sessions that outlive their connection.

Routing uses :class:`fleetward.policy.topics.TopicTrie` (MQTT §4.7 matching, '$' topics
never matched by a leading wildcard) and asks each subscriber's policy for
``mqtt:receive`` before anything is sent or queued.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from fleetward.config import MqttConfig
from fleetward.edge.channel import Action, Admission
from fleetward.edge.mqtt.session import Counters, Delivery, Message, Session, Subscriber
from fleetward.policy.topics import MULTI_LEVEL, SEPARATOR, SINGLE_LEVEL, TopicTrie

# The timer heap is rebuilt without stale entries when it holds this many more than
# four per session (see Broker.schedule).
TIMER_COMPACTION_FLOOR = 1024


class _Level:
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _Level] = {}
        self.message: Message | None = None


class RetainedStore:
    """Retained messages by topic name (§3.3.1.3), one per topic, at most ``limit``.

    Stored as a tree of topic levels: a new subscription's filter walks only the
    branches it can match instead of testing every retained topic.
    """

    def __init__(self, limit: int, max_bytes: int | None = None) -> None:
        self.limit = limit
        self.max_bytes = max_bytes  # payload bytes of every retained message together
        self._root = _Level()
        self._count = 0
        self._bytes = 0

    def __len__(self) -> int:
        return self._count

    def get(self, topic: str) -> Message | None:
        node: _Level | None = self._root
        for level in topic.split(SEPARATOR):
            node = node.children.get(level) if node is not None else None
        return node.message if node is not None else None

    @property
    def bytes(self) -> int:
        return self._bytes

    def has_room_for(self, topic: str, size: int = 0) -> bool:
        """Can a ``size``-byte payload be retained on ``topic`` (replacing what is
        there) within both the message count and the byte budget?"""
        existing = self.get(topic)
        if existing is None and self._count >= self.limit:
            return False
        freed = len(existing.payload) if existing is not None else 0
        return self.max_bytes is None or self._bytes - freed + size <= self.max_bytes

    def put(self, message: Message) -> bool:
        """Store ``message`` as the retained message of its topic; an empty payload
        deletes it (§3.3.1.3 [MQTT-3.3.1-6]). False if the store is full."""
        if not message.payload:
            self.delete(message.topic)
            return True
        if not self.has_room_for(message.topic, len(message.payload)):
            return False
        node = self._root
        for level in message.topic.split(SEPARATOR):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Level()
            node = child
        if node.message is None:
            self._count += 1
        else:
            self._bytes -= len(node.message.payload)
        node.message = message
        self._bytes += len(message.payload)
        return True

    def delete(self, topic: str) -> bool:
        path: list[tuple[_Level, str]] = []
        node = self._root
        for level in topic.split(SEPARATOR):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.message is None:
            return False
        self._bytes -= len(node.message.payload)
        node.message = None
        self._count -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.message is not None or child.children:
                break
            del parent.children[level]
        return True

    def matching(self, topic_filter: str) -> list[Message]:
        """Retained messages whose topic the (valid) ``topic_filter`` matches (§4.7)."""
        levels = topic_filter.split(SEPARATOR)
        found: list[Message] = []
        stack: list[tuple[_Level, int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == len(levels):
                if node.message is not None:
                    found.append(node.message)
                continue
            level = levels[depth]
            if level == MULTI_LEVEL:
                # '#' matches the parent level too ("a/#" matches "a", §4.7.1.2), and at
                # the first level never a '$' topic (§4.7.2).
                if depth > 0 and node.message is not None:
                    found.append(node.message)
                self._collect(node, found, skip_dollar=depth == 0)
            elif level == SINGLE_LEVEL:
                for name, child in node.children.items():
                    if depth == 0 and name.startswith("$"):
                        continue
                    stack.append((child, depth + 1))
            else:
                exact = node.children.get(level)
                if exact is not None:
                    stack.append((exact, depth + 1))
        return found

    @staticmethod
    def _collect(node: _Level, found: list[Message], *, skip_dollar: bool) -> None:
        stack = [child for name, child in node.children.items()
                 if not (skip_dollar and name.startswith("$"))]
        while stack:
            current = stack.pop()
            if current.message is not None:
                found.append(current.message)
            stack.extend(current.children.values())


class Broker:
    """Sessions, subscriptions and retained messages of one server."""

    def __init__(self, config: MqttConfig, now: Callable[[], float]) -> None:
        self.config = config
        self.now = now
        self.counters = Counters()
        self.sessions: dict[str, Session] = {}
        self.retained = RetainedStore(config.max_retained_messages,
                                      config.max_retained_bytes)
        self._trie: TopicTrie[Subscriber] = TopicTrie()
        self._timers: list[tuple[float, int, int, Session]] = []
        self._sequence = itertools.count()

    # --- sessions ------------------------------------------------------------------------

    def new_session(self, client_id: str, admission: Admission, expiry_seconds: int) -> Session:
        session = Session(client_id, admission, expiry_seconds=expiry_seconds,
                          max_queued=self.config.max_queued_messages,
                          counters=self.counters, now=self.now)
        self.sessions[client_id] = session
        return session

    def discard(self, session: Session) -> None:
        """End ``session``: its subscriptions and queued messages are gone (§4.1)."""
        for subscriber in session.subscriptions.values():
            self._trie.remove(subscriber.topic_filter, subscriber)
        session.subscriptions.clear()
        session.queue.clear()
        session.inflight.clear()
        session.generation += 1
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    def schedule(self, session: Session, due_at: float) -> None:
        """Look at ``session`` again at ``due_at`` unless it is attached meanwhile.

        A reattached or ended session leaves its entries behind (they are skipped when
        due). A device that reconnects in a loop with a week's session expiry would
        grow the heap by an entry per cycle for a week, so once stale entries clearly
        outnumber live ones the heap is rebuilt without them: every live session has at
        most two entries (will delay, expiry), and the rebuild is paid for by the
        pushes that made it necessary.
        """
        timers = self._timers
        if len(timers) >= TIMER_COMPACTION_FLOOR + 4 * len(self.sessions):
            timers[:] = [entry for entry in timers
                         if entry[3].generation == entry[2] and entry[3].link is None]
            heapq.heapify(timers)
        heapq.heappush(timers, (due_at, next(self._sequence), session.generation, session))

    @property
    def timer_count(self) -> int:
        """Entries in the timer heap, stale ones included (for stats and tests)."""
        return len(self._timers)

    def due(self, now: float) -> list[Session]:
        """Detached sessions whose expiry or delayed will is due."""
        found: dict[int, Session] = {}
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, generation, session = heapq.heappop(timers)
            if session.generation == generation and session.link is None:
                found[id(session)] = session
        return list(found.values())

    # --- subscriptions ------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> bool:
        """Add or replace (§3.8.4) a subscription; True if the filter existed."""
        session = subscriber.session
        old = session.subscriptions.get(subscriber.topic_filter)
        if old is not None:
            self._trie.remove(old.topic_filter, old)
        session.subscriptions[subscriber.topic_filter] = subscriber
        self._trie.insert(subscriber.topic_filter, subscriber)
        return old is not None

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        old = session.subscriptions.pop(topic_filter, None)
        if old is None:
            return False
        self._trie.remove(topic_filter, old)
        return True

    @property
    def subscription_count(self) -> int:
        return len(self._trie)

    # --- routing ---------------------------------------------------------------------------

    def route(self, message: Message) -> int:
        """Offer ``message`` to every session with a matching subscription whose policy
        allows ``mqtt:receive`` on the topic; returns how many sent or queued it.

        One delivery per session, at the highest QoS of its matching subscriptions and
        with all their Subscription Identifiers (5.0 §3.3.4).
        """
        if not len(self._trie):
            return 0
        topic = message.topic
        matched: dict[Session, list[Subscriber]] = {}
        for subscriber in self._trie.match(topic):
            if subscriber.no_local and subscriber.session.client_id == message.origin:
                continue  # 5.0 §3.8.3.1 No Local
            matched.setdefault(subscriber.session, []).append(subscriber)
        count = 0
        counters = self.counters
        for session, subscribers in matched.items():
            admission = session.admission
            # The policy and, for a token session, its scopes (Admission.decide).
            if not admission.decide(Action.MQTT_RECEIVE, topic).allowed:
                counters.receives_denied += 1
                continue
            qos = 0
            retain = False
            ids: list[int] = []
            for subscriber in subscribers:
                qos = max(qos, subscriber.qos)
                # §3.3.1.3: RETAIN is 0 on forwarded messages unless Retain As Published.
                retain = retain or (subscriber.retain_as_published and message.retain)
                if subscriber.subscription_id is not None:
                    ids.append(subscriber.subscription_id)
            delivery = Delivery(message, min(qos, message.qos), retain, tuple(ids),
                                admission.policy, checked_scope=admission.scope)
            if session.offer(delivery):
                count += 1
        return count

    def retained_for(self, subscriber: Subscriber) -> int:
        """Send the retained messages a new subscription matches (§3.3.1.3: RETAIN=1);
        returns how many were sent or queued."""
        session = subscriber.session
        count = 0
        for message in self.retained.matching(subscriber.topic_filter):
            if subscriber.no_local and message.origin == session.client_id:
                continue
            admission = session.admission
            if not admission.decide(Action.MQTT_RECEIVE, message.topic).allowed:
                self.counters.receives_denied += 1
                continue
            ids = () if subscriber.subscription_id is None else (subscriber.subscription_id,)
            delivery = Delivery(message, min(subscriber.qos, message.qos), True, ids,
                                admission.policy, checked_scope=admission.scope)
            if session.offer(delivery):
                count += 1
        return count
