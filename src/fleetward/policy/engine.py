"""Decisions: policies compiled once per connection, then asked per packet or request.

``compile_policies`` resolves the variables of every resource once, expands wildcard
actions, and builds per action an allow and a deny ``TopicTrie``. ``decide`` is then a
dict lookup and one or two trie walks whose cost grows with the topic's depth, not with
the number of statements — microseconds, no regex, nothing large allocated per call.

Rules (ARCHITECTURE §5.5, EMQX/mosquitto style, deny by default):

* an explicit deny wins over any allow, whichever policy holds them;
* nothing matched means deny ("no statement allows <action> on '<resource>'");
* ``mqtt:subscribe`` is asked with the requested topic *filter*: it is allowed only if
  some allow resource covers every topic the filter can match (``filter_covers``) and
  no deny resource matches any topic it can match (``filters_intersect``), so
  ``devices/+/commands/#`` or ``#`` never slip out of a device's own subtree;
* '$' topics (``$SYS/…``) are never matched by a resource that starts with a wildcard
  (MQTT 5.0 §4.7.2); only a resource that names them grants them;
* other actions take a concrete name; one that contains '+' or '#' is denied;
* a variable whose value is empty, contains '/', '+', '#' or U+0000, starts with '$',
  or is '.' or '..' would change what a resource means (an owner named ``+`` must not
  turn ``tenants/${device.owner}/#`` into every tenant): such an allow resource is
  dropped, and such a deny resource denies the action on everything (it reads as '#',
  '$' topics included) — fail closed either way.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fleetward.errors import InvalidInput
from fleetward.model import Device, LifecycleState, format_serial
from fleetward.policy.defaults import BUILTIN_POLICIES, DEFAULT_POLICY, QUARANTINE_POLICY
from fleetward.policy.document import Effect, NamedPolicy, PolicyDocument, template_parts
from fleetward.policy.topics import (
    MULTI_LEVEL,
    SINGLE_LEVEL,
    TopicTrie,
    filter_covers,
    filters_intersect,
    validate_topic_filter,
)

SUBSCRIBE = "mqtt:subscribe"
MAX_REASON_RESOURCE_CHARS = 200  # a reason may reach the device; a 64 KiB topic must not
# Per connection and action, the last decisions are kept: a device publishes to the same
# few topics over and over, and a hit is one dict lookup instead of two trie walks.
# Bounded in entries and characters, so that a device cycling through topics costs at
# most 11 actions * 32 entries * 256 characters per connection; emptied when full.
MAX_CACHED_DECISIONS = 32  # per action
MAX_CACHED_RESOURCE_CHARS = 256
_UNUSABLE_CHARS = ("/", MULTI_LEVEL, SINGLE_LEVEL, "\x00")
_DOT_SEGMENTS = (".", "..")  # an HTTP path segment that walks the path


@dataclass(frozen=True, slots=True)
class Decision:
    """One authorization answer. ``statement`` names what matched, for ``policy test``
    and for denial messages a device developer can act on.

    Re-exported as ``fleetward.edge.channel.Decision``.
    """

    allowed: bool
    reason: str  # e.g. "denied by policy 'lockdown' statement 'no-ota'" / "no statement allows"
    policy: str | None = None
    statement: str | None = None


# --- variables --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyVariables:
    """The values of ``${device.id}``, ``${device.type}``, ``${device.owner}`` and
    ``${cert.serial}`` for one connection. ``cert_serial`` is lower-case hex; None (no
    certificate, e.g. ``policy test`` without one) makes resources that use it unusable."""

    device_id: str
    device_type: str
    owner: str
    cert_serial: str | None = None

    @classmethod
    def for_device(cls, device: Device, cert_serial: int | str | None = None
                   ) -> PolicyVariables:
        serial = format_serial(cert_serial) if isinstance(cert_serial, int) else cert_serial
        return cls(device.id, device.type, device.owner, serial)

    def value(self, name: str) -> str | None:
        return {"device.id": self.device_id, "device.type": self.device_type,
                "device.owner": self.owner, "cert.serial": self.cert_serial}.get(name)


def unusable_reason(value: str | None) -> str | None:
    """Why a variable value cannot be put into a resource, or None if it can."""
    if value is None:
        return "has no value"
    if not value:
        return "is empty"
    for char in _UNUSABLE_CHARS:
        if char in value:
            return f"contains {char!r}"
    if value.startswith("$"):
        return "starts with '$'"  # would make the resource name a reserved topic (§4.7.2)
    if value in _DOT_SEGMENTS:
        return f"is {value!r}"
    return None


@functools.lru_cache(maxsize=4096)
def _parts(template: str) -> tuple[tuple[bool, str], ...]:
    return tuple(template_parts(template))


def resolve(template: str, variables: PolicyVariables) -> tuple[str | None, str | None]:
    """Fill in a resource's variables: ``(resource, None)`` or ``(None, why unusable)``."""
    parts = _parts(template)
    if len(parts) == 1 and not parts[0][0]:
        return template, None
    out: list[str] = []
    for is_variable, text in parts:
        if not is_variable:
            out.append(text)
            continue
        value = variables.value(text)
        problem = unusable_reason(value)
        if problem is not None or value is None:
            return None, f"${{{text}}} {problem or 'has no value'}"
        out.append(value)
    return "".join(out), None


# --- explanations -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatementMatch:
    """A statement resource that matched, with its variables resolved."""

    policy: str
    statement: str  # the sid, or "#<n>" (1-based position) for a statement without one
    effect: Effect
    resource: str  # as resolved ('#' for an unusable deny resource)
    template: str  # as written in the document

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "statement": self.statement,
                "effect": self.effect.value, "resource": self.resource,
                "template": self.template}


@dataclass(frozen=True, slots=True)
class UnusableResource:
    """A resource whose variables could not be filled in for this device."""

    policy: str
    statement: str
    effect: Effect
    template: str
    reason: str  # e.g. "${device.owner} contains '+'"

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "statement": self.statement,
                "effect": self.effect.value, "template": self.template,
                "reason": self.reason,
                "treated_as": "dropped" if self.effect is Effect.ALLOW else "deny everything"}


@dataclass(frozen=True, slots=True)
class Explanation:
    """A decision and every statement that matched the request (``policy test``)."""

    decision: Decision
    matches: tuple[StatementMatch, ...]
    unusable: tuple[UnusableResource, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = self.decision
        return {"allowed": d.allowed, "reason": d.reason, "policy": d.policy,
                "statement": d.statement, "matched": [m.to_json() for m in self.matches],
                "unusable_resources": [u.to_json() for u in self.unusable]}


# --- compiled policy --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    match: StatementMatch
    decision: Decision  # made once at compile time: decide() allocates none


@dataclass(slots=True)
class _ActionRules:
    allow: TopicTrie[_Rule] = field(default_factory=TopicTrie)
    deny: TopicTrie[_Rule] = field(default_factory=TopicTrie)
    allow_list: list[_Rule] = field(default_factory=list)  # for subscribe and explain
    deny_list: list[_Rule] = field(default_factory=list)
    deny_all: list[_Rule] = field(default_factory=list)  # unusable deny resources
    unusable: list[UnusableResource] = field(default_factory=list)


class CompiledPolicy:
    """One device's policies for one connection; implements
    ``fleetward.edge.channel.ChannelPolicy``. Immutable once built."""

    __slots__ = ("_cache", "_failure", "_rules", "policy_names", "variables")

    def __init__(self, rules: Mapping[str, _ActionRules], variables: PolicyVariables,
                 policy_names: tuple[str, ...], failure: Decision | None) -> None:
        self._rules = rules
        self._failure = failure
        self.variables = variables
        self.policy_names = policy_names
        # Decisions are pure functions of (action, resource) for a compiled policy, so
        # caching them changes no answer; a policy change compiles a new object.
        self._cache: dict[str, dict[str, Decision]] = {action: {} for action in rules}

    def decide(self, action: str, resource: str) -> Decision:
        """Decide ``action`` on ``resource``.

        Args:
            action: a concrete action (``mqtt:publish``, ``http:GET``, …).
            resource: what the action is on — the client id (``mqtt:connect``), a topic
                name (``mqtt:publish``/``mqtt:receive``), the requested topic filter
                (``mqtt:subscribe``), the request path without its leading '/'
                (``http:*``), ``est/<label>`` (``est:reenroll``) or ``firmware/<name>``
                (``ota:download``).

        Returns:
            The decision; ``reason`` is safe to show to the device.
        """
        if self._failure is not None:
            return self._failure
        cache = self._cache.get(action)
        if cache is None:
            return _no_match(action, resource)
        decision = cache.get(resource)
        if decision is not None:
            return decision
        decision = self._decide(self._rules[action], action, resource)
        if len(resource) <= MAX_CACHED_RESOURCE_CHARS:
            if len(cache) >= MAX_CACHED_DECISIONS:
                cache.clear()
            cache[resource] = decision
        return decision

    @staticmethod
    def _decide(rules: _ActionRules, action: str, resource: str) -> Decision:
        if not resource:
            return _no_match(action, resource)
        if rules.deny_all:
            return rules.deny_all[0].decision
        if action == SUBSCRIBE:
            return _decide_subscribe(rules, resource)
        if MULTI_LEVEL in resource or SINGLE_LEVEL in resource:
            return _wildcard_refusal(action, resource)
        if rules.deny_list:  # most policies deny nothing: skip the walk
            for rule in rules.deny.match(resource):
                return rule.decision
        for rule in rules.allow.match(resource):
            return rule.decision
        return _no_match(action, resource)

    def allows_any(self, action: str, topic_filter: str) -> bool:
        """Whether some allow resource of ``action`` overlaps ``topic_filter`` (a name
        or a filter) and no deny resource covers all of it: "does the policy open
        anything here". Used to narrow token scopes, never to decide a request."""
        if self._failure is not None:
            return False
        rules = self._rules.get(action)
        if rules is None or rules.deny_all:
            return False
        if any(filter_covers(r.match.resource, topic_filter) for r in rules.deny_list):
            return False
        return any(filters_intersect(r.match.resource, topic_filter)
                   for r in rules.allow_list)

    def decide_uncached(self, action: str, resource: str) -> Decision:
        """``decide`` without the per-connection cache (for benchmarks and tests)."""
        if self._failure is not None:
            return self._failure
        rules = self._rules.get(action)
        if rules is None:
            return _no_match(action, resource)
        return self._decide(rules, action, resource)

    def explain(self, action: str, resource: str) -> Explanation:
        """The decision plus every statement resource that matched ``resource`` (allow
        and deny alike, deny first) and the resources that variables made unusable."""
        decision = self.decide(action, resource)
        rules = self._rules.get(action)
        if rules is None or self._failure is not None or not resource:
            return Explanation(decision, ())
        matched: list[_Rule] = list(rules.deny_all)
        if action == SUBSCRIBE:
            try:
                validate_topic_filter(resource)
            except InvalidInput:
                return Explanation(decision, tuple(r.match for r in matched),
                                   tuple(rules.unusable))
            matched += [r for r in rules.deny_list
                        if filters_intersect(r.match.resource, resource)]
            matched += [r for r in rules.allow_list
                        if filter_covers(r.match.resource, resource)]
        elif not (MULTI_LEVEL in resource or SINGLE_LEVEL in resource):
            matched += list(rules.deny.match(resource))
            matched += list(rules.allow.match(resource))
        return Explanation(decision, tuple(r.match for r in matched), tuple(rules.unusable))

    def __repr__(self) -> str:
        return (f"CompiledPolicy(device={self.variables.device_id!r}, "
                f"policies={list(self.policy_names)!r})")


def _clip(resource: str) -> str:
    return resource[:MAX_REASON_RESOURCE_CHARS]


def _no_match(action: str, resource: str) -> Decision:
    return Decision(False, f"no statement allows {action} on '{_clip(resource)}'")


def _wildcard_refusal(action: str, resource: str) -> Decision:
    return Decision(False, f"'{_clip(resource)}' contains a wildcard; only mqtt:subscribe "
                           f"takes topic filters, {action} needs a concrete name")


def _decide_subscribe(rules: _ActionRules, topic_filter: str) -> Decision:
    # The listener validates filters first (MQTT 5.0 §4.7.1); checking again here keeps
    # a malformed "a/#/b" from being judged as if it were "a/#".
    try:
        validate_topic_filter(topic_filter)
    except InvalidInput as exc:
        return Decision(False, f"'{_clip(topic_filter)}' is not a valid topic filter: "
                               f"{exc.hint}")
    for rule in rules.deny_list:
        if filters_intersect(rule.match.resource, topic_filter):
            return rule.decision
    for rule in rules.allow_list:
        if filter_covers(rule.match.resource, topic_filter):
            return rule.decision
    return _no_match(SUBSCRIBE, topic_filter)


def compile_policies(policies: Sequence[NamedPolicy],
                     variables: PolicyVariables) -> CompiledPolicy:
    """Compile ``policies`` for one connection.

    Args:
        policies: every policy that applies to the device (``policies_for``), or the
            quarantine policy alone.
        variables: the device's and certificate's values for ``${…}``.

    Returns:
        A ``CompiledPolicy``; with no policies at all it denies everything.
    """
    rules: dict[str, _ActionRules] = {}
    broken = [p for p in policies if p.error is not None]
    failure = None
    if broken:
        failure = Decision(False, f"policy '{broken[0].name}' cannot be read, so every "
                                  f"request is denied until an operator fixes it",
                           policy=broken[0].name)
    for policy in policies:
        for index, statement in enumerate(policy.document.statements, start=1):
            sid = statement.sid or f"#{index}"
            allow = statement.effect is Effect.ALLOW
            verb = "allowed" if allow else "denied"
            decision = Decision(allow, f"{verb} by policy '{policy.name}' statement '{sid}'",
                                policy.name, sid)
            actions = statement.expanded_actions()
            for template in statement.resources:
                resource, problem = resolve(template, variables)
                if resource is None:
                    unusable = UnusableResource(policy.name, sid, statement.effect, template,
                                                problem or "cannot be resolved")
                    for action in actions:
                        entry = rules.setdefault(action, _ActionRules())
                        entry.unusable.append(unusable)
                        if not allow:
                            match = StatementMatch(policy.name, sid, statement.effect,
                                                   MULTI_LEVEL, template)
                            entry.deny_all.append(_Rule(match, Decision(
                                False, f"denied by policy '{policy.name}' statement '{sid}' "
                                       f"(its resource {template!r} cannot be resolved for "
                                       f"this device, so it denies everything)",
                                policy.name, sid)))
                    continue
                rule = _Rule(StatementMatch(policy.name, sid, statement.effect, resource,
                                            template), decision)
                for action in actions:
                    entry = rules.setdefault(action, _ActionRules())
                    if allow:
                        entry.allow.insert(resource, rule)
                        entry.allow_list.append(rule)
                    else:
                        entry.deny.insert(resource, rule)
                        entry.deny_list.append(rule)
    return CompiledPolicy(MappingProxyType(rules), variables,
                          tuple(p.name for p in policies), failure)


# --- which policies apply -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """Every stored policy and attachment, read once (off the hot path) and shared by
    every connection compiled from it. Built-in policies are not in ``documents``."""

    documents: Mapping[str, NamedPolicy] = field(default_factory=dict)
    by_type: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    by_device: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def policies_for(snapshot: PolicySnapshot, device_id: str,
                 device_type: str) -> list[NamedPolicy]:
    """The policies attached to the device and to its type (device ones first, each
    once); ``[DEFAULT_POLICY]`` when there are none. Ignores quarantine: see
    ``effective_policies``.

    A name with no document in the snapshot (it cannot happen through the service,
    which refuses to delete an attached policy) yields a policy that denies everything.
    """
    names = dict.fromkeys((*snapshot.by_device.get(device_id, ()),
                           *snapshot.by_type.get(device_type, ())))
    if not names:
        return [DEFAULT_POLICY]
    out: list[NamedPolicy] = []
    for name in names:
        policy = BUILTIN_POLICIES.get(name) or snapshot.documents.get(name)
        if policy is None:
            policy = NamedPolicy(name, PolicyDocument(()), error="attached but not stored")
        out.append(policy)
    return out


def effective_policies(snapshot: PolicySnapshot, device: Device) -> list[NamedPolicy]:
    """What governs ``device`` now: the quarantine policy alone while it is
    quarantined, otherwise ``policies_for``."""
    if device.state is LifecycleState.QUARANTINED:
        return [QUARANTINE_POLICY]
    return policies_for(snapshot, device.id, device.type)


def compile_for_device(snapshot: PolicySnapshot, device: Device,
                       cert_serial: int | str | None = None) -> CompiledPolicy:
    """``compile_policies(effective_policies(snapshot, device), variables of device)``."""
    return compile_policies(effective_policies(snapshot, device),
                            PolicyVariables.for_device(device, cert_serial))
