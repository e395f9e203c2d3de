"""MQTT topic names, topic filters and the trie that matches them (MQTT 5.0 §4.7,
identical in 3.1.1 §4.7).

Used twice: by the MQTT server to route PUBLISHes to subscriptions, and by policies,
whose resources are topic filters. Pure code, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fleetward.errors import InvalidInput

V = TypeVar("V")

SEPARATOR = "/"
MULTI_LEVEL = "#"
SINGLE_LEVEL = "+"
# §4.7.3: topic names and filters are UTF-8 strings of at most 65,535 bytes.
MAX_TOPIC_BYTES = 65535
SHARED_PREFIX = "$share/"


def validate_topic_name(topic: str, *, max_bytes: int = MAX_TOPIC_BYTES,
                        max_levels: int | None = None) -> str:
    """Check a PUBLISH topic name.

    §4.7.3: at least one character, no wildcards (§4.7.1), no U+0000 (§1.5.4).

    Raises:
        InvalidInput: with a hint naming the rule.
    """
    _check_common(topic, max_bytes, max_levels, "topic name")
    if MULTI_LEVEL in topic or SINGLE_LEVEL in topic:
        raise InvalidInput(f"topic name {topic[:80]!r} contains a wildcard",
                           hint="'+' and '#' are only allowed in subscriptions (MQTT §4.7.1)")
    return topic


def validate_topic_filter(topic_filter: str, *, max_bytes: int = MAX_TOPIC_BYTES,
                          max_levels: int | None = None) -> str:
    """Check a SUBSCRIBE topic filter (or a policy resource).

    §4.7.1.2: '#' alone in the last level; §4.7.1.3: '+' alone in its level.

    Raises:
        InvalidInput: with a hint naming the rule.
    """
    _check_common(topic_filter, max_bytes, max_levels, "topic filter")
    levels = topic_filter.split(SEPARATOR)
    for index, level in enumerate(levels):
        if MULTI_LEVEL in level and (level != MULTI_LEVEL or index != len(levels) - 1):
            raise InvalidInput(f"topic filter {topic_filter[:80]!r} misplaces '#'",
                               hint="'#' must be a whole level and the last one (MQTT §4.7.1.2)")
        if SINGLE_LEVEL in level and level != SINGLE_LEVEL:
            raise InvalidInput(f"topic filter {topic_filter[:80]!r} misplaces '+'",
                               hint="'+' must fill a whole level (MQTT §4.7.1.3)")
    return topic_filter


def _check_common(text: str, max_bytes: int, max_levels: int | None, what: str) -> None:
    if not text:
        raise InvalidInput(f"empty {what}", hint="MQTT §4.7.3: at least one character")
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidInput(f"{what} longer than {max_bytes} bytes",
                           hint=f"keep {what}s within {max_bytes} bytes")
    if "\x00" in text:
        raise InvalidInput(f"{what} contains U+0000", hint="MQTT §1.5.4 forbids the null char")
    if max_levels is not None and text.count(SEPARATOR) + 1 > max_levels:
        raise InvalidInput(f"{what} has more than {max_levels} levels",
                           hint=f"use at most {max_levels} '/'-separated levels")


def is_shared_subscription(topic_filter: str) -> bool:
    return topic_filter.startswith(SHARED_PREFIX)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Does ``topic_filter`` match the topic name ``topic``?

    §4.7.2: a filter starting with a wildcard never matches a topic starting with '$'.
    """
    if topic.startswith("$") and topic_filter[:1] in (MULTI_LEVEL, SINGLE_LEVEL):
        return False
    f_levels = topic_filter.split(SEPARATOR)
    t_levels = topic.split(SEPARATOR)
    for index, f in enumerate(f_levels):
        if f == MULTI_LEVEL:
            return True  # §4.7.1.2: also matches the parent level ("a/#" matches "a")
        if index >= len(t_levels):
            return False
        if f != SINGLE_LEVEL and f != t_levels[index]:
            return False
    return len(f_levels) == len(t_levels)


def filter_covers(outer: str, inner: str) -> bool:
    """True if every topic that ``inner`` matches is also matched by ``outer``.

    Decides whether a subscription is within what a policy allows: ``devices/d1/#``
    covers ``devices/d1/commands/+`` but not ``devices/+/commands/#``.
    """
    if outer[:1] in (MULTI_LEVEL, SINGLE_LEVEL) and inner.startswith("$"):
        return False  # outer never matches '$' topics, inner matches only such topics
    o_levels = outer.split(SEPARATOR)
    i_levels = inner.split(SEPARATOR)
    for index, o in enumerate(o_levels):
        if o == MULTI_LEVEL:
            return True
        if index >= len(i_levels):
            return False  # inner matches a shorter topic that outer does not
        i = i_levels[index]
        if i == MULTI_LEVEL:
            return False  # inner matches any depth here, outer only a fixed one
        if o == SINGLE_LEVEL:
            continue
        if i == SINGLE_LEVEL or i != o:
            return False
    return len(o_levels) == len(i_levels)


def filters_intersect(first: str, second: str) -> bool:
    """True if some topic name is matched by both filters (a deny on ``second`` must
    refuse a subscription to ``first``)."""
    a_levels = first.split(SEPARATOR)
    b_levels = second.split(SEPARATOR)
    a_head, b_head = a_levels[0], b_levels[0]
    wild = (MULTI_LEVEL, SINGLE_LEVEL)
    if (a_head in wild and b_head.startswith("$")) or (b_head in wild and a_head.startswith("$")):
        return False
    for index in range(max(len(a_levels), len(b_levels))):
        a = a_levels[index] if index < len(a_levels) else None
        b = b_levels[index] if index < len(b_levels) else None
        if a == MULTI_LEVEL or b == MULTI_LEVEL:
            return True
        if a is None or b is None:
            return False
        if SINGLE_LEVEL in (a, b):
            continue
        if a != b:
            return False
    return True


@dataclass(slots=True)
class _Node(Generic[V]):
    children: dict[str, _Node[V]] = field(default_factory=dict)
    values: list[V] = field(default_factory=list)


class TopicTrie(Generic[V]):
    """Topic filters → values; ``match(topic)`` yields the values of every matching
    filter. Cost grows with the topic's depth, not with the number of filters."""

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def insert(self, topic_filter: str, value: V) -> None:
        node = self._root
        for level in topic_filter.split(SEPARATOR):
            node = node.children.setdefault(level, _Node())
        node.values.append(value)
        self._size += 1

    def remove(self, topic_filter: str, value: V) -> bool:
        """Remove one ``value`` stored under ``topic_filter``; prune empty branches."""
        path: list[tuple[_Node[V], str]] = []
        node = self._root
        for level in topic_filter.split(SEPARATOR):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        try:
            node.values.remove(value)
        except ValueError:
            return False
        self._size -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.values or child.children:
                break
            del parent.children[level]
        return True

    def match(self, topic: str) -> Iterator[V]:
        """Values of every filter matching the topic name ``topic`` (§4.7)."""
        levels = topic.split(SEPARATOR)
        dollar = topic.startswith("$")
        stack: list[tuple[_Node[V], int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            # §4.7.2: wildcards at the first level never match '$' topics.
            wild_ok = not (dollar and depth == 0)
            if wild_ok:
                multi = node.children.get(MULTI_LEVEL)
                if multi is not None:
                    yield from multi.values  # '#' also matches the parent level
            if depth == len(levels):
                yield from node.values
                continue
            exact = node.children.get(levels[depth])
            if exact is not None:
                stack.append((exact, depth + 1))
            if wild_ok:
                single = node.children.get(SINGLE_LEVEL)
                if single is not None:
                    stack.append((single, depth + 1))
