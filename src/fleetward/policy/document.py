"""Policy documents: parsing, strict validation and the statements they hold.

A document is JSON or YAML (``yaml.safe_load``), at most 64 KiB::

    version: "2026-11"              # optional; only this value
    statements:
      - sid: own-telemetry          # optional; unique within the document
        effect: allow               # allow | deny
        actions: [mqtt:publish]
        resources: ["devices/${device.id}/telemetry/#"]

Unknown keys are refused (a misspelt ``resource`` must not silently grant nothing, or
a misspelt ``efect`` silently turn a deny into nothing). Duplicate keys are refused too:
JSON and YAML parsers keep the last one, so a reviewer reading the first would be misled.

Actions (``ACTIONS``; ``mqtt:*`` and ``http:*`` expand to their family) and what the
resource names for each:

=================  ====================================================================
``mqtt:connect``   the MQTT client id (which the gate also requires to be the device id)
``mqtt:publish``   the PUBLISH topic name
``mqtt:receive``   the topic name of a message about to be delivered to the device
``mqtt:subscribe`` the topic filter the device asks for (MQTT 5.0 §4.7): allowed only if
                   an allow resource covers all of it and no deny resource overlaps it
``http:<METHOD>``  the request path without the leading '/', e.g. ``v1/telemetry/temp``
``est:reenroll``   ``est/<label>``, the EST label (RFC 7030 §3.2.2) or ``est/default``
``ota:download``   ``firmware/<name>``
=================  ====================================================================

Resources use MQTT topic-filter syntax ('+' one level, '#' the rest, MQTT 5.0 §4.7.1)
and may contain the variables ``${device.id}``, ``${device.type}``, ``${device.owner}``
and ``${cert.serial}`` (lower-case hex, as ``openssl x509 -serial`` prints it without
leading zeros). Variables are resolved once per connection (``engine.compile_policies``).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from fleetward.errors import InvalidInput
from fleetward.policy.topics import validate_topic_filter

POLICY_VERSION = "2026-11"
MAX_DOCUMENT_BYTES = 64 * 1024  # bytes; a policy is a page of rules, not a data store
MAX_STATEMENTS = 100  # per document; compile cost and explain output stay small
MAX_RESOURCES = 100  # per statement
MAX_ACTIONS = 32  # per statement; there are 11 concrete actions, duplicates are refused
MAX_RESOURCE_BYTES = 1024  # bytes; far above any real topic, far below MQTT's 65,535
MAX_SID_CHARS = 64
# Policy names become URL path segments and audit targets ("policy:<name>").
POLICY_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
SID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DOCUMENT_KEYS = frozenset({"version", "statements"})
STATEMENT_KEYS = frozenset({"sid", "effect", "actions", "resources"})

MQTT_ACTIONS = ("mqtt:connect", "mqtt:publish", "mqtt:subscribe", "mqtt:receive")
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
HTTP_ACTIONS = tuple(f"http:{method}" for method in HTTP_METHODS)
ACTIONS: tuple[str, ...] = (*MQTT_ACTIONS, *HTTP_ACTIONS, "est:reenroll", "ota:download")
WILDCARD_ACTIONS: dict[str, tuple[str, ...]] = {"mqtt:*": MQTT_ACTIONS,
                                                "http:*": HTTP_ACTIONS}
VARIABLES = ("device.id", "device.type", "device.owner", "cert.serial")
_VARIABLE_START = "${"
_SURROGATE = re.compile("[\ud800-\udfff]")


class Effect(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Statement:
    """One rule. ``actions`` are as written (wildcards unexpanded); ``resources`` are
    templates that may still contain ``${…}`` variables."""

    effect: Effect
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    sid: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.sid is None else {"sid": self.sid}
        out.update(effect=self.effect.value, actions=list(self.actions),
                   resources=list(self.resources))
        return out

    def expanded_actions(self) -> tuple[str, ...]:
        """The concrete actions this statement applies to (``mqtt:*`` expanded)."""
        out: list[str] = []
        for action in self.actions:
            out.extend(WILDCARD_ACTIONS.get(action, (action,)))
        return tuple(dict.fromkeys(out))


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    statements: tuple[Statement, ...]
    version: str = POLICY_VERSION

    def to_json(self) -> dict[str, Any]:
        """The normalised document, as stored and as ``GET /v1/policies/{name}`` shows it."""
        return {"version": self.version,
                "statements": [s.to_json() for s in self.statements]}


@dataclass(frozen=True, slots=True)
class NamedPolicy:
    """A document under its name, as the engine combines them.

    ``error`` is set when a stored document can no longer be read (edited in SQL, or a
    newer Fleetward validates more strictly): the engine then denies everything for
    the devices it applies to, because the unreadable document might have held a deny.
    """

    name: str
    document: PolicyDocument
    version: int = 0
    error: str | None = None


# --- names ----------------------------------------------------------------------------


def validate_policy_name(name: str) -> str:
    """Check a policy name.

    Raises:
        InvalidInput: not 1-64 characters of a-z, 0-9, '_' and '-' (starting a-z0-9).
    """
    if not isinstance(name, str) or not POLICY_NAME_PATTERN.fullmatch(name):
        raise InvalidInput(f"invalid policy name {str(name)[:80]!r}",
                           hint="1-64 characters: lower-case letters, digits, _ and -, "
                                "starting with a letter or digit")
    return name


# --- parsing --------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate mapping keys (YAML 1.2 §3.2.1.1 says
    keys are unique; PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode,
                       deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key (a list): not a document we accept
            raise InvalidInput("the document has a mapping key that is not a string",
                               hint="keys are plain words: version, statements, sid, "
                                    "effect, actions, resources") from None
        if duplicate:
            raise InvalidInput(f"duplicate key {str(key)[:40]!r} in the document",
                               hint="give each key once; parsers keep only the last one")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _construct_mapping)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidInput(f"duplicate key {key[:40]!r} in the document",
                               hint="give each key once; parsers keep only the last one")
        out[key] = value
    return out


def load_text(text: str | bytes, fmt: str | None = None) -> Any:
    """Parse document text as JSON or YAML (``fmt`` "json" | "yaml"; None: JSON if it
    starts with '{', else YAML), refusing duplicate keys. Not yet validated.

    Raises:
        InvalidInput: too large, not UTF-8, or not parseable.
    """
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise InvalidInput(f"the policy document is larger than {MAX_DOCUMENT_BYTES} bytes",
                           hint="split it into several policies and attach them together")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the policy document is not UTF-8 text",
                           hint="save it as UTF-8 JSON or YAML") from None
    if fmt is None:
        fmt = "json" if decoded.lstrip().startswith("{") else "yaml"
    if fmt == "json":
        try:
            return json.loads(decoded, object_pairs_hook=_json_object)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"the policy document is not valid JSON: {exc}",
                               hint="check the line and column named; or send YAML with "
                                    "Content-Type: application/yaml") from None
        except RecursionError:
            raise _too_deep() from None
    if fmt == "yaml":
        try:
            return yaml.load(decoded, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as exc:
            raise InvalidInput(f"the policy document is not valid YAML: {_yaml_reason(exc)}",
                               hint="check the indentation and quoting near the line "
                                    "named") from None
        except RecursionError:
            raise _too_deep() from None
    raise InvalidInput(f"unknown document format {fmt!r}", hint="use json or yaml")


def _too_deep() -> InvalidInput:
    # 64 KiB of '[' is nesting far beyond what the parsers recurse into (was a 500).
    return InvalidInput("the policy document is nested too deeply",
                        hint='a document is flat: {"statements": [{"effect": "allow", '
                             '"actions": [...], "resources": [...]}]}')


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "syntax error"
    return f"{problem} at line {mark.line + 1}" if mark is not None else str(problem)


def parse_document(source: str | bytes | Mapping[str, Any],
                   fmt: str | None = None) -> PolicyDocument:
    """Parse and validate a policy document.

    Args:
        source: JSON or YAML text, or an already decoded mapping.
        fmt: "json" or "yaml" for text; None guesses (JSON if it starts with '{').

    Raises:
        InvalidInput: with a hint naming the rule that failed (size, unknown key, action,
            malformed resource filter, unknown variable, limits).

    Returns:
        The validated, normalised document.
    """
    data = source if isinstance(source, Mapping) else load_text(source, fmt)
    if not isinstance(data, Mapping):
        raise InvalidInput("a policy document is a mapping with a 'statements' list",
                           hint='e.g. {"statements": [{"effect": "allow", "actions": '
                                '["mqtt:publish"], "resources": ["devices/${device.id}/#"]}]}')
    if isinstance(source, Mapping) and len(
            json.dumps(data, default=str).encode()) > MAX_DOCUMENT_BYTES:
        raise InvalidInput(f"the policy document is larger than {MAX_DOCUMENT_BYTES} bytes",
                           hint="split it into several policies and attach them together")
    _reject_unknown(data, DOCUMENT_KEYS, "the document")
    version = data.get("version", POLICY_VERSION)
    if version != POLICY_VERSION:
        raise InvalidInput(f"unsupported policy version {str(version)[:20]!r}",
                           hint=f'use "version": "{POLICY_VERSION}" or leave it out')
    statements = data.get("statements")
    if not isinstance(statements, list) or not statements:
        raise InvalidInput("'statements' must be a non-empty list",
                           hint="add at least one statement with effect, actions, resources")
    if len(statements) > MAX_STATEMENTS:
        raise InvalidInput(f"more than {MAX_STATEMENTS} statements",
                           hint="merge statements with the same effect and actions, or split "
                                "the policy")
    parsed = tuple(_statement(s, i) for i, s in enumerate(statements, start=1))
    sids = [s.sid for s in parsed if s.sid is not None]
    duplicates = sorted({sid for sid in sids if sids.count(sid) > 1})
    if duplicates:
        raise InvalidInput(f"duplicate statement id(s): {', '.join(duplicates)}",
                           hint="'sid' names one statement in denial reasons and "
                                "`policy test`; make each unique")
    return PolicyDocument(parsed)


def _reject_unknown(data: Mapping[Any, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(str(k)[:40] for k in data if k not in allowed)
    if unknown:
        raise InvalidInput(f"unknown key(s) in {where}: {', '.join(unknown)}",
                           hint=f"allowed keys: {', '.join(sorted(allowed))}")


def _statement(data: Any, index: int) -> Statement:
    where = f"statement {index}"
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{where} is not a mapping",
                           hint="each statement has effect, actions and resources")
    _reject_unknown(data, STATEMENT_KEYS, where)
    sid = data.get("sid")
    if sid is not None:
        if not isinstance(sid, str) or not SID_PATTERN.fullmatch(sid):
            raise InvalidInput(f"{where}: invalid sid {str(sid)[:80]!r}",
                               hint=f"1-{MAX_SID_CHARS} letters, digits, '_', '.' and '-'")
        where = f"statement {sid!r}"
    effect_value = data.get("effect")
    try:
        effect = Effect(str(effect_value) if isinstance(effect_value, str) else "")
    except ValueError:
        raise InvalidInput(f"{where}: effect must be 'allow' or 'deny', "
                           f"not {str(effect_value)[:20]!r}",
                           hint='e.g. "effect": "allow"') from None
    actions = _string_list(data, "actions", where, MAX_ACTIONS, '["mqtt:publish"]')
    for action in actions:
        if action not in ACTIONS and action not in WILDCARD_ACTIONS:
            raise InvalidInput(f"{where}: unknown action {action[:40]!r}",
                               hint="use one of: " + ", ".join((*ACTIONS, *WILDCARD_ACTIONS)))
    if len(set(actions)) != len(actions):
        raise InvalidInput(f"{where}: an action is listed twice", hint="list each action once")
    resources = _string_list(data, "resources", where, MAX_RESOURCES,
                             '["devices/${device.id}/telemetry/#"]')
    statement = Statement(effect, tuple(actions), tuple(resources), sid)
    http = any(a.startswith("http:") for a in statement.expanded_actions())
    for resource in resources:
        validate_resource(resource, where=where, http=http)
    return statement


def _string_list(data: Mapping[str, Any], key: str, where: str, limit: int,
                 example: str) -> list[str]:
    value = data.get(key)
    if value is None:
        raise InvalidInput(f"{where}: missing {key!r}", hint=f'e.g. "{key}": {example}')
    if isinstance(value, str):
        raise InvalidInput(f"{where}: {key!r} must be a list, even for one entry",
                           hint=f'e.g. "{key}": {example}')
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"{where}: {key!r} must be a non-empty list of strings",
                           hint=f'e.g. "{key}": {example}')
    if len(value) > limit:
        raise InvalidInput(f"{where}: more than {limit} {key}",
                           hint="split the statement in two")
    return list(value)


# --- resources and variables ------------------------------------------------------------


def template_parts(resource: str) -> list[tuple[bool, str]]:
    """Split a resource into literal text and variable names: ``[(is_variable, text)]``.

    Raises:
        InvalidInput: an unknown variable or an unterminated ``${``.
    """
    parts: list[tuple[bool, str]] = []
    rest = resource
    while rest:
        start = rest.find(_VARIABLE_START)
        if start < 0:
            parts.append((False, rest))
            break
        if start:
            parts.append((False, rest[:start]))
        end = rest.find("}", start + 2)
        if end < 0:
            raise InvalidInput(f"resource {resource[:80]!r} has an unterminated '${{'",
                               hint="variables look like ${device.id}")
        name = rest[start + 2:end]
        if name not in VARIABLES:
            raise InvalidInput(f"unknown variable ${{{name[:40]}}} in resource {resource[:80]!r}",
                               hint="use one of: "
                                    + ", ".join("${" + v + "}" for v in VARIABLES))
        parts.append((True, name))
        rest = rest[end + 1:]
    return parts


def validate_resource(resource: str, *, where: str = "resource", http: bool = False) -> str:
    """Check one resource template: known variables, a well-formed topic filter once
    they are filled in, a sane length.

    Raises:
        InvalidInput: with the rule that failed.
    """
    if len(resource.encode("utf-8", "surrogatepass")) > MAX_RESOURCE_BYTES:
        raise InvalidInput(f"{where}: a resource is longer than {MAX_RESOURCE_BYTES} bytes",
                           hint="use wildcards ('+', '#') instead of long literal lists")
    if _SURROGATE.search(resource):
        # A JSON "\\udc00" escape: no topic can hold it (MQTT 5.0 §1.5.4, UTF-8 only).
        raise InvalidInput(f"{where}: a resource holds an unpaired surrogate",
                           hint="resources are UTF-8 text; \\ud800-\\udfff escapes must "
                                "come in pairs")
    # A placeholder without '/', '+' or '#' stands in for any usable variable value.
    filled = "".join("v" if is_var else text for is_var, text in template_parts(resource))
    try:
        validate_topic_filter(filled)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: resource {resource[:80]!r}: {exc.message}",
                           hint=exc.hint) from None
    if http and resource.startswith("/"):
        raise InvalidInput(f"{where}: HTTP resource {resource[:80]!r} starts with '/'",
                           hint="HTTP resources are request paths without the leading '/', "
                                "e.g. v1/telemetry/+")
    return resource
