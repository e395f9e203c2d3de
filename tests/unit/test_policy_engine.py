"""Policy documents and decisions, read as threats.

The scenario table is what a device (or a stolen device key) might try: other devices'
topics, subscriptions that escape its own subtree, '$SYS', hostile variable values, a
quarantined device reaching for anything but recovery. Each row names the statement
that must decide, so a row that passes by accident (denied for the wrong reason) fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetward.edge.channel import ChannelPolicy
from fleetward.edge.channel import Decision as ChannelDecision
from fleetward.errors import ClientError, InvalidInput
from fleetward.model import Device, LifecycleState
from fleetward.policy import (
    DEFAULT_POLICY,
    QUARANTINE_POLICY,
    CompiledPolicy,
    Decision,
    NamedPolicy,
    PolicyDocument,
    PolicySnapshot,
    PolicyVariables,
    compile_for_device,
    compile_policies,
    effective_policies,
    parse_document,
    policies_for,
)
from fleetward.policy.document import MAX_DOCUMENT_BYTES
from fleetward.policy.engine import MAX_CACHED_DECISIONS, MAX_CACHED_RESOURCE_CHARS
from fleetward.policy.topics import topic_matches
from tests.conftest import REPO

D1 = PolicyVariables(device_id="d1", device_type="sensor", owner="acme", cert_serial="1a2b")


def policy(name: str, *statements: dict[str, Any]) -> NamedPolicy:
    return NamedPolicy(name, parse_document({"statements": list(statements)}))


def allow(sid: str, actions: list[str], resources: list[str]) -> dict[str, Any]:
    return {"sid": sid, "effect": "allow", "actions": actions, "resources": resources}


def deny(sid: str, actions: list[str], resources: list[str]) -> dict[str, Any]:
    return {"sid": sid, "effect": "deny", "actions": actions, "resources": resources}


PUBLISH_ALL = policy("wide-open", allow("everything", ["mqtt:publish"], ["#"]))
OWN_TREE = policy("own-tree", allow("own", ["mqtt:*"], ["devices/${device.id}/#"]))
NO_SECRETS = policy("no-secrets", deny("secret", ["mqtt:publish", "mqtt:subscribe"],
                                       ["devices/${device.id}/secret/#"]))
NO_CONFIG = policy("lockdown", allow("all", ["mqtt:publish"], ["#"]),
                   deny("no-config", ["mqtt:publish"], ["devices/+/config/#"]))
TENANT = policy("tenant", allow("tenant-tree", ["mqtt:publish", "mqtt:subscribe"],
                                ["tenants/${device.owner}/#"]))
TENANT_DENY = policy("tenant-deny", deny("not-tenant", ["mqtt:publish"],
                                         ["tenants/${device.owner}/#"]))
BY_SERIAL = policy("by-serial", allow("cert", ["mqtt:publish"], ["certs/${cert.serial}/#"]))
BY_TYPE = policy("by-type", allow("fleet-broadcast", ["mqtt:subscribe"],
                                  ["types/${device.type}/broadcast/#"]))
SYS_READER = policy("sys-reader", allow("sys", ["mqtt:subscribe"], ["$SYS/broker/#"]))
SYS_PUBLISHER = policy("sys-publisher", allow("sys", ["mqtt:publish"], ["$SYS/#"]))
HTTP_ALL = policy("http-all", allow("api", ["http:*"], ["v1/#"]))


@dataclass(frozen=True)
class Case:
    name: str
    policies: tuple[NamedPolicy, ...]
    action: str
    resource: str
    allowed: bool
    decided_by: str | None  # "policy/statement", or None for "nothing matched"
    variables: PolicyVariables = D1


def owner(value: str) -> PolicyVariables:
    return PolicyVariables("d1", "sensor", value, "1a2b")


CASES = [
    # --- the default policy: a device acts as itself ---------------------------------
    Case("connect-as-self", (DEFAULT_POLICY,), "mqtt:connect", "d1", True,
         "default/connect-as-self"),
    Case("connect-as-another-device", (DEFAULT_POLICY,), "mqtt:connect", "d2", False, None),
    Case("publish-own-telemetry", (DEFAULT_POLICY,), "mqtt:publish",
         "devices/d1/telemetry/temp", True, "default/publish-own"),
    Case("publish-own-events", (DEFAULT_POLICY,), "mqtt:publish", "devices/d1/events/boot",
         True, "default/publish-own"),
    Case("publish-command-result", (DEFAULT_POLICY,), "mqtt:publish",
         "devices/d1/command-results/c-17", True, "default/publish-own"),
    Case("publish-other-device-telemetry", (DEFAULT_POLICY,), "mqtt:publish",
         "devices/d2/telemetry/temp", False, None),
    Case("publish-id-prefix-confusion", (DEFAULT_POLICY,), "mqtt:publish",
         "devices/d1x/telemetry/temp", False, None),
    Case("publish-into-own-commands", (DEFAULT_POLICY,), "mqtt:publish",
         "devices/d1/commands/reboot", False, None),
    Case("publish-with-wildcard-name", (DEFAULT_POLICY,), "mqtt:publish",
         "devices/d1/telemetry/+", False, None),
    Case("publish-sys", (DEFAULT_POLICY,), "mqtt:publish", "$SYS/broker/load", False, None),
    Case("subscribe-own-commands", (DEFAULT_POLICY,), "mqtt:subscribe",
         "devices/d1/commands/#", True, "default/own-commands"),
    Case("subscribe-own-command-level", (DEFAULT_POLICY,), "mqtt:subscribe",
         "devices/d1/commands/+", True, "default/own-commands"),
    Case("subscribe-every-devices-commands", (DEFAULT_POLICY,), "mqtt:subscribe",
         "devices/+/commands/#", False, None),
    Case("subscribe-everything", (DEFAULT_POLICY,), "mqtt:subscribe", "#", False, None),
    Case("subscribe-first-level-wildcard", (DEFAULT_POLICY,), "mqtt:subscribe",
         "+/d1/commands/#", False, None),
    Case("subscribe-own-tree-beyond-commands", (DEFAULT_POLICY,), "mqtt:subscribe",
         "devices/d1/#", False, None),
    Case("subscribe-sys", (DEFAULT_POLICY,), "mqtt:subscribe", "$SYS/#", False, None),
    Case("subscribe-malformed-filter", (DEFAULT_POLICY,), "mqtt:subscribe",
         "devices/d1/commands/#/x", False, None),
    Case("receive-own-command", (DEFAULT_POLICY,), "mqtt:receive",
         "devices/d1/commands/reboot", True, "default/own-commands"),
    Case("receive-other-device-command", (DEFAULT_POLICY,), "mqtt:receive",
         "devices/d2/commands/reboot", False, None),
    Case("https-own-status", (DEFAULT_POLICY,), "http:GET", "v1/devices/self", True,
         "default/https-get"),
    Case("https-other-device-status", (DEFAULT_POLICY,), "http:GET", "v1/devices/d2",
         False, None),
    Case("https-telemetry-typed", (DEFAULT_POLICY,), "http:POST", "v1/telemetry/temp", True,
         "default/https-post"),
    Case("https-command-result", (DEFAULT_POLICY,), "http:POST", "v1/commands/c-17/result",
         True, "default/https-post"),
    Case("https-command-result-deeper", (DEFAULT_POLICY,), "http:POST",
         "v1/commands/c-17/x/result", False, None),
    Case("https-delete-self", (DEFAULT_POLICY,), "http:DELETE", "v1/devices/self", False,
         None),
    Case("https-unknown-method", (DEFAULT_POLICY,), "http:HEAD", "v1/devices/self", False,
         None),
    Case("reenroll", (DEFAULT_POLICY,), "est:reenroll", "est/default", True,
         "default/reenroll"),
    Case("firmware", (DEFAULT_POLICY,), "ota:download", "firmware/sensor-2.1.bin", True,
         "default/firmware"),
    # --- '#' never grants '$' topics (MQTT 5.0 §4.7.2) --------------------------------
    Case("wide-open-still-not-sys", (PUBLISH_ALL,), "mqtt:publish", "$SYS/broker/load",
         False, None),
    Case("sys-named-explicitly", (SYS_READER,), "mqtt:subscribe", "$SYS/broker/+", True,
         "sys-reader/sys"),
    Case("sys-wider-than-named", (SYS_READER,), "mqtt:subscribe", "$SYS/#", False, None),
    # --- explicit deny wins -----------------------------------------------------------
    Case("deny-in-same-policy", (NO_CONFIG,), "mqtt:publish", "devices/d1/config/wifi",
         False, "lockdown/no-config"),
    Case("allow-beside-deny", (NO_CONFIG,), "mqtt:publish", "devices/d1/telemetry/t", True,
         "lockdown/all"),
    Case("deny-in-other-policy", (OWN_TREE, NO_SECRETS), "mqtt:publish",
         "devices/d1/secret/key", False, "no-secrets/secret"),
    Case("deny-order-does-not-matter", (NO_SECRETS, OWN_TREE), "mqtt:publish",
         "devices/d1/secret/key", False, "no-secrets/secret"),
    Case("subscribe-overlapping-a-deny", (OWN_TREE, NO_SECRETS), "mqtt:subscribe",
         "devices/d1/#", False, "no-secrets/secret"),
    Case("subscribe-beside-a-deny", (OWN_TREE, NO_SECRETS), "mqtt:subscribe",
         "devices/d1/commands/#", True, "own-tree/own"),
    Case("deny-on-other-action-irrelevant", (OWN_TREE, NO_SECRETS), "mqtt:receive",
         "devices/d1/secret/key", True, "own-tree/own"),
    # --- wildcard actions expand --------------------------------------------------------
    Case("mqtt-star-subscribe", (OWN_TREE,), "mqtt:subscribe", "devices/d1/x/#", True,
         "own-tree/own"),
    Case("mqtt-star-not-http", (OWN_TREE,), "http:GET", "devices/d1/x", False, None),
    Case("http-star-patch", (HTTP_ALL,), "http:PATCH", "v1/devices/self", True,
         "http-all/api"),
    Case("http-star-not-mqtt", (HTTP_ALL,), "mqtt:publish", "v1/x", False, None),
    # --- variables --------------------------------------------------------------------
    Case("owner-tree", (TENANT,), "mqtt:publish", "tenants/acme/x", True,
         "tenant/tenant-tree"),
    Case("other-owner-tree", (TENANT,), "mqtt:publish", "tenants/globex/x", False, None),
    Case("hostile-owner-plus", (TENANT,), "mqtt:publish", "tenants/globex/x", False, None,
         owner("+")),
    Case("hostile-owner-hash-subscribe", (TENANT,), "mqtt:subscribe", "tenants/globex/#",
         False, None, owner("#")),
    Case("hostile-owner-slash", (TENANT,), "mqtt:publish", "tenants/acme/evil/x", False,
         None, owner("acme/evil")),
    Case("hostile-owner-slash-wild", (TENANT,), "mqtt:subscribe", "tenants/globex/#", False,
         None, owner("globex/#")),
    Case("hostile-owner-empty", (TENANT,), "mqtt:publish", "tenants//x", False, None,
         owner("")),
    Case("hostile-owner-nul", (TENANT,), "mqtt:publish", "tenants/a\x00/x", False, None,
         owner("a\x00")),
    Case("hostile-owner-dollar", (PUBLISH_ALL, policy("p", allow(
        "owner-root", ["mqtt:publish"], ["${device.owner}/#"]))), "mqtt:publish",
         "$SYS/broker/x", False, None, owner("$SYS")),
    Case("hostile-owner-dotdot", (policy("h", allow("up", ["http:GET"],
                                                    ["v1/${device.owner}/+"])),),
         "http:GET", "v1/../secret", False, None, owner("..")),
    Case("hostile-owner-in-deny-denies-all", (PUBLISH_ALL, TENANT_DENY), "mqtt:publish",
         "devices/d1/telemetry/t", False, "tenant-deny/not-tenant", owner("+")),
    Case("hostile-owner-in-deny-denies-sys", (SYS_PUBLISHER, TENANT_DENY), "mqtt:publish",
         "$SYS/broker/x", False, "tenant-deny/not-tenant", owner("#")),
    Case("benign-owner-in-deny-leaves-sys", (SYS_PUBLISHER, TENANT_DENY), "mqtt:publish",
         "$SYS/broker/x", True, "sys-publisher/sys"),
    Case("benign-owner-in-deny-is-just-a-deny", (PUBLISH_ALL, TENANT_DENY), "mqtt:publish",
         "devices/d1/telemetry/t", True, "wide-open/everything"),
    Case("cert-serial", (BY_SERIAL,), "mqtt:publish", "certs/1a2b/status", True,
         "by-serial/cert"),
    Case("other-cert-serial", (BY_SERIAL,), "mqtt:publish", "certs/ffff/status", False,
         None),
    Case("no-cert-serial", (BY_SERIAL,), "mqtt:publish", "certs/None/status", False, None,
         PolicyVariables("d1", "sensor", "acme", None)),
    Case("device-type", (BY_TYPE,), "mqtt:subscribe", "types/sensor/broadcast/#", True,
         "by-type/fleet-broadcast"),
    Case("other-device-type", (BY_TYPE,), "mqtt:subscribe", "types/camera/broadcast/#",
         False, None),
    # --- quarantine: recovery routes only ---------------------------------------------
    Case("quarantine-own-status", (QUARANTINE_POLICY,), "http:GET", "v1/devices/self",
         True, "quarantine/own-status"),
    Case("quarantine-reenroll", (QUARANTINE_POLICY,), "est:reenroll", "est/default", True,
         "quarantine/reenroll"),
    Case("quarantine-firmware", (QUARANTINE_POLICY,), "ota:download", "firmware/fix.bin",
         True, "quarantine/firmware"),
    Case("quarantine-no-mqtt-connect", (QUARANTINE_POLICY,), "mqtt:connect", "d1", False,
         None),
    Case("quarantine-no-telemetry-http", (QUARANTINE_POLICY,), "http:POST",
         "v1/telemetry", False, None),
    Case("quarantine-no-commands", (QUARANTINE_POLICY,), "http:GET", "v1/commands", False,
         None),
    Case("quarantine-no-publish", (QUARANTINE_POLICY,), "mqtt:publish",
         "devices/d1/telemetry/t", False, None),
    # --- nothing to go on --------------------------------------------------------------
    Case("no-policies-at-all", (), "mqtt:connect", "d1", False, None),
    Case("empty-resource", (DEFAULT_POLICY,), "mqtt:connect", "", False, None),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_decision_scenarios(case: Case) -> None:
    compiled = compile_policies(case.policies, case.variables)
    decision = compiled.decide(case.action, case.resource)
    assert decision.allowed is case.allowed, decision
    if case.decided_by is None:
        assert decision.policy is None and decision.statement is None, decision
    else:
        policy_name, sid = case.decided_by.split("/")
        assert (decision.policy, decision.statement) == (policy_name, sid), decision
        verb = "allowed" if case.allowed else "denied"
        assert decision.reason.startswith(f"{verb} by policy '{policy_name}' statement "
                                          f"'{sid}'"), decision.reason
    # The per-connection cache changes no answer, on a miss or on a hit.
    assert compiled.decide_uncached(case.action, case.resource) == decision
    assert compiled.decide(case.action, case.resource) == decision
    # explain() agrees with decide(), and names the deciding statement among its matches.
    explanation = compiled.explain(case.action, case.resource)
    assert explanation.decision == decision
    if case.decided_by is not None:
        assert (decision.policy, decision.statement) in {
            (m.policy, m.statement) for m in explanation.matches}


def test_no_match_reason_names_action_and_resource() -> None:
    decision = compile_policies([DEFAULT_POLICY], D1).decide("mqtt:publish",
                                                             "devices/d2/telemetry/t")
    assert decision == Decision(False, "no statement allows mqtt:publish on "
                                       "'devices/d2/telemetry/t'")


def test_reasons_never_carry_a_huge_resource() -> None:
    topic = "devices/d2/" + "x" * 65_000
    decision = compile_policies([DEFAULT_POLICY], D1).decide("mqtt:publish", topic)
    assert not decision.allowed and len(decision.reason) < 400


def test_decision_cache_stays_bounded() -> None:
    compiled = compile_policies([DEFAULT_POLICY], D1)
    for i in range(1000):
        compiled.decide("mqtt:publish", f"devices/d1/telemetry/t{i}")
        compiled.decide("mqtt:publish", f"devices/d2/telemetry/t{i}")
        compiled.decide("mqtt:publish", f"devices/d1/telemetry/{'x' * 300}{i}")
    assert 0 < len(compiled._cache["mqtt:publish"]) <= MAX_CACHED_DECISIONS
    assert all(len(r) <= MAX_CACHED_RESOURCE_CHARS for r in compiled._cache["mqtt:publish"])
    # Unknown actions get no cache at all.
    compiled.decide("mqtt:teleport", "x")
    assert "mqtt:teleport" not in compiled._cache


def test_statements_without_sid_are_named_by_position() -> None:
    unnamed = NamedPolicy("anon", parse_document({"statements": [
        {"effect": "allow", "actions": ["mqtt:publish"], "resources": ["a/#"]},
        {"effect": "deny", "actions": ["mqtt:publish"], "resources": ["a/b"]}]}))
    compiled = compile_policies([unnamed], D1)
    assert compiled.decide("mqtt:publish", "a/c").statement == "#1"
    denied = compiled.decide("mqtt:publish", "a/b")
    assert (denied.allowed, denied.statement) == (False, "#2")
    assert denied.reason == "denied by policy 'anon' statement '#2'"


def test_explain_lists_every_matching_statement_with_resolved_resources() -> None:
    compiled = compile_policies([OWN_TREE, NO_SECRETS, DEFAULT_POLICY], D1)
    explanation = compiled.explain("mqtt:publish", "devices/d1/secret/k")
    assert not explanation.decision.allowed
    got = [(m.policy, m.statement, m.effect.value, m.resource, m.template)
           for m in explanation.matches]
    assert got == [
        ("no-secrets", "secret", "deny", "devices/d1/secret/#",
         "devices/${device.id}/secret/#"),
        ("own-tree", "own", "allow", "devices/d1/#", "devices/${device.id}/#")]
    as_json = explanation.to_json()
    assert as_json["matched"][0]["effect"] == "deny" and as_json["allowed"] is False
    json.dumps(as_json)  # serialisable for the admin API


def test_explain_names_resources_made_unusable_by_variables() -> None:
    compiled = compile_policies([TENANT, TENANT_DENY], owner("acme/#"))
    explanation = compiled.explain("mqtt:publish", "tenants/acme/x")
    assert not explanation.decision.allowed
    unusable = {(u.policy, u.effect.value, u.reason) for u in explanation.unusable}
    assert unusable == {("tenant", "allow", "${device.owner} contains '/'"),
                        ("tenant-deny", "deny", "${device.owner} contains '/'")}
    treated = {u["policy"]: u["treated_as"] for u in explanation.to_json()["unusable_resources"]}
    assert treated == {"tenant": "dropped", "tenant-deny": "deny everything"}
    # The deny that became '#' is what decided, and it says so.
    assert explanation.decision.policy == "tenant-deny"
    assert "cannot be resolved" in explanation.decision.reason


def test_a_policy_that_cannot_be_read_denies_everything() -> None:
    broken = NamedPolicy("corrupt", PolicyDocument(()), error="stored document invalid")
    compiled = compile_policies([PUBLISH_ALL, DEFAULT_POLICY, broken], D1)
    for action, resource in [("mqtt:connect", "d1"),
                             ("mqtt:publish", "devices/d1/telemetry/t")]:
        decision = compiled.decide(action, resource)
        assert not decision.allowed and decision.policy == "corrupt"
    # Negative control: without the broken policy the same requests are allowed.
    fine = compile_policies([PUBLISH_ALL, DEFAULT_POLICY], D1)
    assert fine.decide("mqtt:connect", "d1").allowed
    assert fine.decide("mqtt:publish", "devices/d1/telemetry/t").allowed


def test_compiled_policy_is_the_channel_contract() -> None:
    compiled: ChannelPolicy = compile_policies([DEFAULT_POLICY], D1)
    assert ChannelDecision is Decision
    assert isinstance(compiled.decide("mqtt:connect", "d1"), ChannelDecision)


# --- the engine agrees with a brute-force reading of the rules -----------------------------

RESOURCE_LEVELS = ["devices", "d1", "d2", "+", "$SYS", "x"]


@st.composite
def resource_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(RESOURCE_LEVELS), min_size=0, max_size=3))
    if not levels or draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


statements = st.builds(
    lambda effect, resources: {"effect": effect, "actions": ["mqtt:publish"],
                               "resources": resources},
    st.sampled_from(["allow", "deny"]), st.lists(resource_filters(), min_size=1, max_size=3))
topic_names = st.lists(st.sampled_from(["devices", "d1", "d2", "$SYS", "x", ""]),
                       min_size=1, max_size=4).map("/".join).filter(bool)


@settings(max_examples=300)
@given(st.lists(st.lists(statements, min_size=1, max_size=4), min_size=1, max_size=3),
       st.lists(topic_names, min_size=1, max_size=8))
def test_publish_decisions_match_brute_force(documents: list[list[dict[str, Any]]],
                                             topics: list[str]) -> None:
    """Deny if any deny resource matches, else allow if any allow matches, else deny."""
    policies = [NamedPolicy(f"p{i}", parse_document({"statements": doc}))
                for i, doc in enumerate(documents)]
    compiled = compile_policies(policies, D1)
    for topic in topics:
        matching = [s["effect"] for doc in documents for s in doc
                    if any(topic_matches(r, topic) for r in s["resources"])]
        expected = "deny" not in matching and "allow" in matching
        assert compiled.decide("mqtt:publish", topic).allowed is expected, (documents, topic)


# --- which policies apply --------------------------------------------------------------------


def device(state: LifecycleState = LifecycleState.ACTIVE, device_id: str = "d1",
           device_type: str = "sensor") -> Device:
    return Device(id=device_id, type=device_type, owner="acme", state=state)


SNAPSHOT = PolicySnapshot(
    documents={"own-tree": OWN_TREE, "no-secrets": NO_SECRETS, "tenant": TENANT},
    by_type={"sensor": ("own-tree", "no-secrets")},
    by_device={"d1": ("tenant", "no-secrets"), "d9": ("default", "tenant")})


def test_nothing_attached_means_the_default_policy() -> None:
    assert policies_for(SNAPSHOT, "d2", "camera") == [DEFAULT_POLICY]
    assert policies_for(PolicySnapshot(), "d1", "sensor") == [DEFAULT_POLICY]


def test_device_and_type_attachments_combine_once_each() -> None:
    names = [p.name for p in policies_for(SNAPSHOT, "d1", "sensor")]
    assert names == ["tenant", "no-secrets", "own-tree"]
    # Attachments replace the default: it applies only when attached explicitly.
    assert "default" not in names
    assert [p.name for p in policies_for(SNAPSHOT, "d9", "camera")] == ["default", "tenant"]
    assert policies_for(SNAPSHOT, "d9", "camera")[0] is DEFAULT_POLICY


def test_an_attached_name_without_a_document_fails_closed() -> None:
    snapshot = PolicySnapshot(documents={}, by_device={"d1": ("ghost",)})
    compiled = compile_policies(policies_for(snapshot, "d1", "sensor"), D1)
    assert not compiled.decide("mqtt:connect", "d1").allowed


def test_quarantine_replaces_every_attached_policy() -> None:
    quarantined = device(LifecycleState.QUARANTINED)
    assert effective_policies(SNAPSHOT, quarantined) == [QUARANTINE_POLICY]
    compiled = compile_for_device(SNAPSHOT, quarantined, 0x1A2B)
    assert not compiled.decide("mqtt:connect", "d1").allowed
    assert not compiled.decide("mqtt:publish", "devices/d1/x").allowed
    assert compiled.decide("http:GET", "v1/devices/self").allowed
    # Negative control: the same device, active, gets its attached policies.
    active = compile_for_device(SNAPSHOT, device(), 0x1A2B)
    assert active.decide("mqtt:publish", "devices/d1/x").allowed
    assert active.variables.cert_serial == "1a2b"


# --- built-in policies -----------------------------------------------------------------------


def statements_of(named: NamedPolicy) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for statement in named.document.statements:
        assert statement.effect.value == "allow"
        for action in statement.actions:
            out[action] = out.get(action, ()) + statement.resources
    return out


def test_default_policy_is_exactly_the_documented_one() -> None:
    own = "devices/${device.id}"
    assert statements_of(DEFAULT_POLICY) == {
        "mqtt:connect": ("${device.id}",),
        "mqtt:publish": (f"{own}/telemetry/#", f"{own}/events/#", f"{own}/command-results/+",
                         f"{own}/messages/events/#"),
        "mqtt:subscribe": (f"{own}/commands/#",),
        "mqtt:receive": (f"{own}/commands/#",),
        "http:POST": ("v1/telemetry", "v1/telemetry/+", "v1/events", "v1/events/+",
                      "v1/commands/+/result"),
        "http:GET": ("v1/devices/self", "v1/commands"),
        "est:reenroll": ("#",),
        "ota:download": ("#",),
    }


def test_quarantine_policy_is_recovery_only() -> None:
    assert statements_of(QUARANTINE_POLICY) == {
        "http:GET": ("v1/devices/self",), "est:reenroll": ("#",), "ota:download": ("#",)}


# --- documents ----------------------------------------------------------------------------

YAML_DOC = """\
version: "2026-11"
statements:
  - sid: own-telemetry
    effect: allow
    actions: [mqtt:publish, "http:POST"]
    resources:
      - devices/${device.id}/telemetry/#
      - v1/telemetry
  - sid: no-firmware
    effect: deny
    actions: [ota:download]
    resources: ["#"]
"""

JSON_DOC = json.dumps({"version": "2026-11", "statements": [
    {"sid": "own-telemetry", "effect": "allow", "actions": ["mqtt:publish", "http:POST"],
     "resources": ["devices/${device.id}/telemetry/#", "v1/telemetry"]},
    {"sid": "no-firmware", "effect": "deny", "actions": ["ota:download"],
     "resources": ["#"]}]})


def test_yaml_and_json_documents_parse_to_the_same_policy() -> None:
    from_yaml = parse_document(YAML_DOC, "yaml")
    from_json = parse_document(JSON_DOC, "json")
    guessed = (parse_document(YAML_DOC), parse_document(JSON_DOC.encode()))
    assert from_yaml == from_json == guessed[0] == guessed[1]
    assert from_yaml.to_json() == json.loads(JSON_DOC)
    assert parse_document(from_yaml.to_json()) == from_yaml  # stored form round-trips
    compiled = compile_policies([NamedPolicy("doc", from_yaml)], D1)
    assert compiled.decide("http:POST", "v1/telemetry").allowed
    assert not compiled.decide("ota:download", "firmware/x").allowed


def one(statement: dict[str, Any]) -> str:
    return json.dumps({"statements": [statement]})


GOOD = {"effect": "allow", "actions": ["mqtt:publish"], "resources": ["a/#"]}
BAD_DOCUMENTS: list[tuple[str, str | bytes, str]] = [
    ("unknown-top-level-key", json.dumps({"statement": [GOOD]}), "unknown key"),
    ("unknown-statement-key", one({**GOOD, "resource": ["a"]}), "unknown key"),
    ("misspelt-effect-key", one({"efect": "deny", "actions": ["mqtt:publish"],
                                 "resources": ["a"]}), "unknown key"),
    ("bad-effect", one({**GOOD, "effect": "permit"}), "effect must be"),
    ("unknown-action", one({**GOOD, "actions": ["mqtt:publsh"]}), "unknown action"),
    ("head-not-an-action", one({**GOOD, "actions": ["http:HEAD"]}), "unknown action"),
    ("star-action", one({**GOOD, "actions": ["*"]}), "unknown action"),
    ("action-twice", one({**GOOD, "actions": ["mqtt:publish", "mqtt:publish"]}), "twice"),
    ("actions-a-string", one({**GOOD, "actions": "mqtt:publish"}), "must be a list"),
    ("no-resources", one({**GOOD, "resources": []}), "non-empty list"),
    ("resource-not-string", one({**GOOD, "resources": [7]}), "non-empty list"),
    ("unknown-variable", one({**GOOD, "resources": ["devices/${device.name}/#"]}),
     "unknown variable"),
    ("unterminated-variable", one({**GOOD, "resources": ["devices/${device.id/#"]}),
     "unterminated"),
    ("hash-not-last", one({**GOOD, "resources": ["a/#/b"]}), "misplaces '#'"),
    ("plus-inside-level", one({**GOOD, "resources": ["a/b+"]}), "misplaces '+'"),
    ("variable-beside-plus", one({**GOOD, "resources": ["a/${device.id}+"]}),
     "misplaces '+'"),
    ("nul-in-resource", one({**GOOD, "resources": ["a/\x00"]}), "U+0000"),
    ("empty-resource", one({**GOOD, "resources": [""]}), "empty"),
    ("http-leading-slash", one({**GOOD, "actions": ["http:GET"],
                                "resources": ["/v1/devices/self"]}), "starts with '/'"),
    ("too-many-statements", json.dumps({"statements": [GOOD] * 101}), "more than 100"),
    ("too-many-resources", one({**GOOD, "resources": [f"r/{i}" for i in range(101)]}),
     "more than 100"),
    ("too-large", json.dumps({"statements": [{**GOOD, "sid": "x",
                                              "resources": ["a" * 1000] * 70}]}),
     "larger than"),
    ("other-version", json.dumps({"version": "2012-10-17", "statements": [GOOD]}),
     "unsupported policy version"),
    ("no-statements", json.dumps({"statements": []}), "non-empty list"),
    ("duplicate-sid", json.dumps({"statements": [{**GOOD, "sid": "s"}, {**GOOD, "sid": "s"}]}),
     "duplicate statement id"),
    ("bad-sid", one({**GOOD, "sid": "has space"}), "invalid sid"),
    ("duplicate-json-key",
     '{"statements": [{"effect": "allow", "effect": "deny", "actions": ["mqtt:publish"], '
     '"resources": ["a"]}]}', "duplicate key"),
    ("duplicate-yaml-key",
     "statements:\n  - effect: deny\n    effect: allow\n    actions: [mqtt:publish]\n"
     "    resources: [a]\n", "duplicate key"),
    ("not-a-mapping", "[1, 2]", "a mapping"),
    ("invalid-json", '{"statements": [', "not valid JSON"),
    ("invalid-yaml", "statements: [a\n  b: c", "not valid YAML"),
    ("yaml-python-object", "!!python/object/apply:os.system ['true']", "not valid YAML"),
    ("not-utf8", b'{"statements": "\xff"}', "not UTF-8"),
    # Found by schemathesis (issue 10): both were 500s through PUT /v1/policies/{name}.
    ("json-nested-too-deep-was-a-500", '{"statements": ' + "[" * 30000 + "]" * 30000 + "}",
     "nested too deeply"),
    ("yaml-nested-too-deep-was-a-500", "statements: " + "[" * 30000 + "]" * 30000,
     "nested too deeply"),
    ("unpaired-surrogate-in-resource",
     '{"statements": [{"effect": "allow", "actions": ["mqtt:publish"], '
     '"resources": ["a/\\udc00"]}]}', "unpaired surrogate"),
]


@pytest.mark.parametrize(("text", "expected"),
                         [pytest.param(t, e, id=case) for case, t, e in BAD_DOCUMENTS])
def test_bad_documents_are_refused_with_a_hint(text: str | bytes, expected: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_document(text)
    assert expected in caught.value.message, caught.value.message
    assert caught.value.hint and caught.value.hint != ClientError.default_hint


def test_too_large_check_counts_bytes_of_the_text() -> None:
    assert MAX_DOCUMENT_BYTES == 64 * 1024
    padded = json.dumps({"statements": [GOOD]}) + " " * (MAX_DOCUMENT_BYTES - 100)
    parse_document(padded)  # negative control: just under the limit is fine
    with pytest.raises(InvalidInput, match="larger than"):
        parse_document(padded + " " * 200)


def test_yaml_alias_bombs_stay_bounded() -> None:
    """Anchors let a small YAML text name a huge tree; validation must not walk it all."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)) + "statements: *i\n"
    assert len(yaml.safe_load(bomb)["statements"]) == 8
    with pytest.raises(InvalidInput):
        parse_document(bomb)


# --- bench ---------------------------------------------------------------------------------


def test_bench_policy_prints_its_ratio() -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "policy.py"),
                             "--decisions", "2000"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^policy: \d+(\.\d+)? ns/decision", result.stdout, re.MULTILINE), (
        result.stdout)
    assert re.search(r"^policy-uncached: \d+(\.\d+)? ns/decision", result.stdout,
                     re.MULTILINE)
    assert re.search(r"^baseline: \d+(\.\d+)? ns/lookup", result.stdout, re.MULTILINE)
    assert re.search(r"^ratio policy/baseline: \d+(\.\d+)?$", result.stdout, re.MULTILINE)
    assert re.search(r"^ratio policy-uncached/baseline: \d+(\.\d+)?$", result.stdout,
                     re.MULTILINE)


def test_compiled_policy_repr_names_device_and_policies() -> None:
    compiled: CompiledPolicy = compile_policies([DEFAULT_POLICY, TENANT], D1)
    assert repr(compiled) == "CompiledPolicy(device='d1', policies=['default', 'tenant'])"
