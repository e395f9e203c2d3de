"""MQTT topic matching (MQTT 5.0 §4.7; 3.1.1 §4.7 is the same), as policies and the
MQTT server's routing use it.

The trie is checked against a brute-force ``topic_matches`` over random filters and
topics (with '$' topics, empty levels and wildcards everywhere they are legal);
``filter_covers`` must be sound (never says "covers" when some topic escapes) because
it grants subscriptions; ``filters_intersect`` must be sound the other way (never says
"disjoint" when a topic is shared) because it applies denies.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetward.errors import InvalidInput
from fleetward.policy.topics import (
    TopicTrie,
    filter_covers,
    filters_intersect,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)

# Few distinct levels, so that random filters and topics collide often.
LEVELS = ["a", "b", "", "$SYS", "$x"]
level = st.sampled_from(LEVELS)
plain_level = st.sampled_from(["a", "b", "z", ""])


@st.composite
def topics(draw: st.DrawFn) -> str:
    topic = "/".join(draw(st.lists(level, min_size=1, max_size=5)))
    return topic or "/"  # a lone empty level is not a topic (§4.7.3); "/" is


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(level, st.just("+")), min_size=0, max_size=4))
    if not levels or draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "/"


@st.composite
def instances(draw: st.DrawFn, topic_filter: str) -> str:
    """A topic made from ``topic_filter`` by filling its wildcards (may not match it:
    a '$' level under a leading wildcard does not)."""
    out: list[str] = []
    for part in topic_filter.split("/"):
        if part == "+":
            out.append(draw(st.one_of(level, plain_level)))
        elif part == "#":
            out.extend(draw(st.lists(st.one_of(level, plain_level), max_size=2)))
        else:
            out.append(part)
    return "/".join(out) or "/"


@st.composite
def narrowed(draw: st.DrawFn, topic_filter: str) -> str:
    """A filter made from ``topic_filter`` by replacing some wildcards with narrower
    parts: most such pairs are covered, so the soundness check sees positives."""
    out: list[str] = []
    for part in topic_filter.split("/"):
        if part == "+":
            out.append(draw(st.sampled_from(["+", "a", "$x", ""])))
        elif part == "#":
            extra = draw(st.lists(st.sampled_from(["a", "+", "b"]), max_size=2))
            out.extend(extra)
            if draw(st.booleans()):
                out.append("#")
        else:
            out.append(part)
    return "/".join(out) or "/"


def witness(first: str, second: str) -> str | None:
    """A topic that both filters should match, if the level-by-level walk finds one."""
    a_levels, b_levels = first.split("/"), second.split("/")
    out: list[str] = []
    for index in range(max(len(a_levels), len(b_levels))):
        a = a_levels[index] if index < len(a_levels) else None
        b = b_levels[index] if index < len(b_levels) else None
        if a == "#" or b == "#":
            rest = b_levels[index:] if a == "#" else a_levels[index:]
            out += ["z" if part == "+" else part for part in rest if part != "#"]
            if out == [""]:  # "/#" and "#": a lone empty level is no topic, "/z" is
                out.append("z")
            break
        if a is None or b is None:
            return None
        if a == "+" and b == "+":
            out.append("z")
        elif a == "+" or b == "+":
            out.append(b if a == "+" else a)
        elif a == b:
            out.append(a)
        else:
            return None
    return "/".join(out) or "z"


# --- the trie ---------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.lists(filters(), max_size=12), st.lists(topics(), min_size=1, max_size=8))
def test_trie_matches_exactly_what_brute_force_matches(topic_filters: list[str],
                                                       names: list[str]) -> None:
    trie: TopicTrie[int] = TopicTrie()
    for index, topic_filter in enumerate(topic_filters):
        trie.insert(topic_filter, index)
    assert len(trie) == len(topic_filters)
    for name in names:
        expected = sorted(i for i, f in enumerate(topic_filters) if topic_matches(f, name))
        assert sorted(trie.match(name)) == expected, (name, topic_filters)


@settings(max_examples=150)
@given(st.lists(filters(), min_size=1, max_size=10), st.data())
def test_trie_after_removals_matches_the_filters_left(topic_filters: list[str],
                                                      data: st.DataObject) -> None:
    trie: TopicTrie[int] = TopicTrie()
    for index, topic_filter in enumerate(topic_filters):
        trie.insert(topic_filter, index)
    gone = data.draw(st.sets(st.sampled_from(range(len(topic_filters)))))
    for index in gone:
        assert trie.remove(topic_filters[index], index)
        assert not trie.remove(topic_filters[index], index)  # removed once only
    kept = [i for i in range(len(topic_filters)) if i not in gone]
    assert len(trie) == len(kept)
    for name in data.draw(st.lists(topics(), min_size=1, max_size=6)):
        expected = sorted(i for i in kept if topic_matches(topic_filters[i], name))
        assert sorted(trie.match(name)) == expected


@pytest.mark.parametrize(("topic_filter", "topic", "matches"), [
    ("#", "$SYS/broker/load", False),  # §4.7.2: wildcards never match '$' at level one
    ("+/broker/load", "$SYS/broker/load", False),
    ("$SYS/#", "$SYS/broker/load", True),
    ("$SYS/+/load", "$SYS/broker/load", True),
    ("devices/#", "devices", True),  # §4.7.1.2: '#' also matches the parent level
    ("devices/+", "devices", False),
    ("devices/+", "devices/", True),  # an empty level is a level (§4.7.1.3)
    ("+/+", "/finance", True),
    ("devices/d1/#", "devices/d1x/telemetry", False),
    ("a/$x", "a/$x", True),  # '$' matters only at the first level
    ("a/+", "a/$x", True),
])
def test_spec_examples(topic_filter: str, topic: str, matches: bool) -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.insert(topic_filter, topic_filter)
    assert topic_matches(topic_filter, topic) is matches
    assert (list(trie.match(topic)) == [topic_filter]) is matches


# --- covers ---------------------------------------------------------------------------


@st.composite
def filter_pairs(draw: st.DrawFn) -> tuple[str, str]:
    outer = draw(filters())
    inner = draw(st.one_of(narrowed(outer), filters()))
    return outer, inner


@settings(max_examples=400)
@given(filter_pairs(), st.data())
def test_filter_covers_is_sound(pair: tuple[str, str], data: st.DataObject) -> None:
    """If ``outer`` covers ``inner``, no topic matched by ``inner`` escapes ``outer``:
    otherwise a subscription would receive what the policy does not allow."""
    outer, inner = pair
    validate_topic_filter(inner)
    if not filter_covers(outer, inner):
        return
    candidates = data.draw(st.lists(st.one_of(instances(inner), topics()), min_size=20,
                                    max_size=20))
    for topic in candidates:
        if topic_matches(inner, topic):
            assert topic_matches(outer, topic), (outer, inner, topic)


@settings(max_examples=200)
@given(filters())
def test_every_filter_covers_itself_and_intersects_itself(topic_filter: str) -> None:
    assert filter_covers(topic_filter, topic_filter)
    assert filters_intersect(topic_filter, topic_filter)


@pytest.mark.parametrize(("outer", "inner", "covers"), [
    ("devices/d1/#", "devices/d1/commands/+", True),
    ("devices/d1/#", "devices/d1", True),
    ("devices/d1/commands/#", "devices/+/commands/#", False),  # escapes into other devices
    ("devices/d1/commands/#", "#", False),
    ("devices/d1/commands/#", "devices/d1/#", False),
    ("devices/d1/commands/+", "devices/d1/commands/#", False),  # deeper levels escape
    ("#", "$SYS/#", False),  # '#' never grants '$' topics
    ("+/#", "$SYS/broker", False),
    ("$SYS/#", "$SYS/broker/+", True),
    ("#", "devices/+/x", True),
    ("devices/+", "devices/d1/x", False),
])
def test_covers_examples(outer: str, inner: str, covers: bool) -> None:
    assert filter_covers(outer, inner) is covers


# --- intersect ------------------------------------------------------------------------


@settings(max_examples=400)
@given(filters(), filters(), st.lists(topics(), min_size=10, max_size=10))
def test_filters_intersect_is_symmetric_and_sound(first: str, second: str,
                                                  names: list[str]) -> None:
    """A deny on ``second`` must refuse a subscription to ``first`` whenever some topic
    is matched by both: "disjoint" must never be said of overlapping filters."""
    overlap = filters_intersect(first, second)
    assert overlap == filters_intersect(second, first)
    for name in names:
        if topic_matches(first, name) and topic_matches(second, name):
            assert overlap, (first, second, name)
    if overlap:
        # ... and it is not over-eager: a shared topic really exists.
        shared = witness(first, second)
        assert shared is not None, (first, second)
        validate_topic_name(shared)
        assert topic_matches(first, shared) and topic_matches(second, shared), (
            first, second, shared)


@pytest.mark.parametrize(("first", "second", "overlap"), [
    ("devices/+/commands/#", "devices/d2/#", True),
    ("devices/d1/#", "devices/d2/#", False),
    ("#", "$SYS/#", False),
    ("$SYS/#", "$SYS/broker", True),
    ("a/#", "a", True),
    ("a/+", "a", False),
    ("+/+", "a/b/c", False),
])
def test_intersect_examples(first: str, second: str, overlap: bool) -> None:
    assert filters_intersect(first, second) is overlap


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "#/a", "a+/b", "a/+b", "nul\x00"])
def test_malformed_filters_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        validate_topic_filter(bad)


@pytest.mark.parametrize("bad", ["", "a/+", "a/#", "nul\x00", "x" * 65536])
def test_malformed_topic_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        validate_topic_name(bad)


@given(filters())
def test_generated_filters_are_valid(topic_filter: str) -> None:
    """Negative control for the properties above: they run on legal filters only."""
    assert validate_topic_filter(topic_filter) == topic_filter
