"""PolicyService on a real database (SQLite file and PostgreSQL): storage, attachments,
refusals, the audit trail the data plane's change feed reads, snapshots and `test`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import update

from fleetward.errors import Conflict, InvalidInput, NotFound, PolicyViolation
from fleetward.model import LifecycleState
from fleetward.policy import (
    DEFAULT_POLICY,
    QUARANTINE_POLICY,
    compile_for_device,
    compile_policies,
    policies_for,
)
from fleetward.policy import PolicyVariables as Vars
from fleetward.registry.policies import MAX_POLICIES_PER_TARGET, PolicyService
from fleetward.store import audit as audit_rows
from fleetward.store.schema import policies as policies_table
from tests.conftest import Stack

ACTOR = "operator:alice"
OWN_TREE = {"statements": [
    {"sid": "own", "effect": "allow", "actions": ["mqtt:*"],
     "resources": ["devices/${device.id}/#"]}]}
NO_SECRETS_YAML = """\
statements:
  - sid: secret
    effect: deny
    actions: [mqtt:publish, mqtt:subscribe]
    resources: ["devices/${device.id}/secret/#"]
"""


@pytest.fixture
def service(stack: Stack) -> Iterator[PolicyService]:
    stack.add_device("d1")
    stack.add_device("d2")
    stack.registry.change_state("d1", LifecycleState.ACTIVE, "operator:test")
    yield PolicyService(stack.db, stack.audit, stack.clock)


def audit_tail(stack: Stack, after: int = 0) -> list[tuple[str, str, str, dict[str, Any]]]:
    with stack.db.read() as conn:
        rows = audit_rows.query_events(conn, after=after, action="policy.", limit=1000)
    return [(r.action, r.actor, r.target, json.loads(r.details)) for r in rows]


def last_seq(stack: Stack) -> int:
    with stack.db.read() as conn:
        rows = audit_rows.query_events(conn, limit=1, newest_first=True)
    return rows[0].seq if rows else 0


# --- documents --------------------------------------------------------------------------


def test_put_creates_then_replaces_with_versions_and_audit(service: PolicyService,
                                                           stack: Stack) -> None:
    created = service.put("own-tree", OWN_TREE, ACTOR)
    assert (created.version, created.builtin, created.attachments) == (1, False, ())
    assert created.document["statements"][0]["resources"] == ["devices/${device.id}/#"]
    replaced = service.put("own-tree", json.dumps(OWN_TREE), ACTOR, fmt="json")
    assert replaced.version == 2
    assert replaced.created_at == created.created_at
    assert service.get("own-tree").version == 2
    assert audit_tail(stack) == [
        ("policy.put", ACTOR, "policy:own-tree", {"version": 1, "statements": 1}),
        ("policy.put", ACTOR, "policy:own-tree", {"version": 2, "statements": 1})]


def test_yaml_and_json_puts_store_the_same_document(service: PolicyService) -> None:
    from_yaml = service.put("no-secrets", NO_SECRETS_YAML, ACTOR, fmt="yaml")
    as_json = json.dumps({"statements": [{"sid": "secret", "effect": "deny",
                                          "actions": ["mqtt:publish", "mqtt:subscribe"],
                                          "resources": ["devices/${device.id}/secret/#"]}]})
    from_json = service.put("no-secrets-json", as_json.encode(), ACTOR)
    assert from_yaml.document == from_json.document
    assert from_yaml.document["version"] == "2026-11"


@pytest.mark.parametrize(("name", "source", "error", "expected"), [
    ("default", OWN_TREE, PolicyViolation, "built-in"),
    ("quarantine", OWN_TREE, PolicyViolation, "built-in"),
    ("Upper", OWN_TREE, InvalidInput, "invalid policy name"),
    ("../operators", OWN_TREE, InvalidInput, "invalid policy name"),
    ("x" * 65, OWN_TREE, InvalidInput, "invalid policy name"),
    ("bad-doc", {"statements": [{"effect": "allow", "actions": ["mqtt:publish"],
                                 "resources": ["devices/${device.secret}/#"]}]},
     InvalidInput, "unknown variable"),
    ("bad-yaml", "statements: [\n", InvalidInput, "not valid YAML"),
])
def test_refused_puts_store_and_audit_nothing(service: PolicyService, stack: Stack,
                                              name: str, source: Any,
                                              error: type[Exception], expected: str) -> None:
    seq = last_seq(stack)
    with pytest.raises(error, match=expected):
        service.put(name, source, ACTOR)
    assert audit_tail(stack, seq) == []
    assert {p.name for p in service.list()} == {"default", "quarantine"}


def test_builtins_are_listed_and_readable(service: PolicyService) -> None:
    listed = {p.name: p for p in service.list()}
    assert listed["default"].builtin and listed["quarantine"].builtin
    assert service.get("default").document == DEFAULT_POLICY.document.to_json()
    assert service.get("quarantine").document == QUARANTINE_POLICY.document.to_json()
    with pytest.raises(NotFound):
        service.get("nope")


# --- attachments --------------------------------------------------------------------------


def test_attach_detach_delete_lifecycle_is_audited(service: PolicyService,
                                                   stack: Stack) -> None:
    service.put("own-tree", OWN_TREE, ACTOR)
    seq = last_seq(stack)
    assert service.attach("own-tree", "type", "sensor", ACTOR) is True
    assert service.attach("own-tree", "device", "d2", ACTOR) is True
    assert service.attach("own-tree", "device", "d2", ACTOR) is False  # idempotent
    info = service.get("own-tree")
    assert [a.to_json() for a in info.attachments] == [
        {"kind": "device", "target": "d2"}, {"kind": "type", "target": "sensor"}]
    with pytest.raises(Conflict, match="attached to") as caught:
        service.delete("own-tree", ACTOR)
    assert "fleetward policy detach own-tree" in caught.value.hint
    assert caught.value.extra["attachments"] == [{"kind": "device", "target": "d2"},
                                                 {"kind": "type", "target": "sensor"}]
    service.detach("own-tree", "device", "d2", ACTOR)
    service.detach("own-tree", "type", "sensor", ACTOR)
    with pytest.raises(NotFound, match="not attached"):
        service.detach("own-tree", "type", "sensor", ACTOR)
    service.delete("own-tree", ACTOR)
    with pytest.raises(NotFound):
        service.get("own-tree")
    assert audit_tail(stack, seq) == [
        ("policy.attached", ACTOR, "policy:own-tree", {"kind": "type", "target": "sensor"}),
        ("policy.attached", ACTOR, "policy:own-tree", {"kind": "device", "target": "d2"}),
        ("policy.detached", ACTOR, "policy:own-tree", {"kind": "device", "target": "d2"}),
        ("policy.detached", ACTOR, "policy:own-tree", {"kind": "type", "target": "sensor"}),
        ("policy.deleted", ACTOR, "policy:own-tree", {"version": 1})]


@pytest.mark.parametrize(("name", "kind", "target", "error", "expected"), [
    ("own-tree", "device", "no-such-device", NotFound, "device 'no-such-device'"),
    ("own-tree", "type", "no-such-type", NotFound, "device type 'no-such-type'"),
    ("no-such-policy", "device", "d1", NotFound, "policy 'no-such-policy'"),
    ("own-tree", "tenant", "acme", InvalidInput, "unknown attachment kind"),
    ("quarantine", "device", "d1", PolicyViolation, "cannot be attached"),
])
def test_refused_attachments(service: PolicyService, stack: Stack, name: str, kind: str,
                             target: str, error: type[Exception], expected: str) -> None:
    service.put("own-tree", OWN_TREE, ACTOR)
    seq = last_seq(stack)
    with pytest.raises(error, match=expected):
        service.attach(name, kind, target, ACTOR)
    assert audit_tail(stack, seq) == []
    assert service.snapshot().by_device == {} and service.snapshot().by_type == {}


def test_builtins_cannot_be_deleted_and_missing_ones_are_not_found(
        service: PolicyService) -> None:
    for name in ("default", "quarantine"):
        with pytest.raises(PolicyViolation):
            service.delete(name, ACTOR)
    with pytest.raises(NotFound):
        service.delete("ghost", ACTOR)


def test_default_can_be_attached_explicitly_to_combine(service: PolicyService,
                                                       stack: Stack) -> None:
    service.put("own-tree", OWN_TREE, ACTOR)
    service.attach("own-tree", "device", "d1", ACTOR)
    service.attach("default", "device", "d1", ACTOR)
    snapshot = service.snapshot()
    assert "default" not in snapshot.documents  # the built-in is used, not a stored copy
    applied = {p.name: p for p in policies_for(snapshot, "d1", "sensor")}
    assert set(applied) == {"own-tree", "default"}  # order is irrelevant: deny wins anyway
    assert applied["default"] is DEFAULT_POLICY
    assert [a.to_json() for a in service.get("default").attachments] == [
        {"kind": "device", "target": "d1"}]
    assert service.get("default").builtin
    with pytest.raises(PolicyViolation):
        service.put("default", OWN_TREE, ACTOR)  # still read-only after the attach


def test_attachments_per_target_are_limited(service: PolicyService) -> None:
    for i in range(MAX_POLICIES_PER_TARGET):
        service.put(f"p{i}", OWN_TREE, ACTOR)
        service.attach(f"p{i}", "device", "d1", ACTOR)
    service.put("one-too-many", OWN_TREE, ACTOR)
    with pytest.raises(PolicyViolation, match="already has"):
        service.attach("one-too-many", "device", "d1", ACTOR)
    # Negative control: another device still takes it.
    assert service.attach("one-too-many", "device", "d2", ACTOR)


# --- what the data plane reads ---------------------------------------------------------------


def test_snapshot_and_policies_for(service: PolicyService, stack: Stack) -> None:
    service.put("own-tree", OWN_TREE, ACTOR)
    service.put("no-secrets", NO_SECRETS_YAML, ACTOR)
    service.attach("own-tree", "type", "sensor", ACTOR)
    service.attach("no-secrets", "device", "d1", ACTOR)
    snapshot = service.snapshot()
    assert set(snapshot.documents) == {"own-tree", "no-secrets"}
    assert snapshot.documents["own-tree"].version == 1
    assert dict(snapshot.by_type) == {"sensor": ("own-tree",)}
    assert dict(snapshot.by_device) == {"d1": ("no-secrets",)}
    assert [p.name for p in policies_for(snapshot, "d1", "sensor")] == ["no-secrets",
                                                                         "own-tree"]
    assert [p.name for p in policies_for(snapshot, "d2", "sensor")] == ["own-tree"]
    assert policies_for(snapshot, "d3", "camera") == [DEFAULT_POLICY]
    d1 = stack.registry.get_device("d1")
    compiled = service.compile(snapshot, d1, 0x1A)
    assert not compiled.decide("mqtt:publish", "devices/d1/secret/k").allowed
    assert compiled.decide("mqtt:publish", "devices/d1/anything").allowed
    assert not compiled.decide("mqtt:publish", "devices/d2/anything").allowed


def test_a_stored_document_that_no_longer_validates_denies_everything(
        service: PolicyService, stack: Stack) -> None:
    service.put("own-tree", OWN_TREE, ACTOR)
    service.attach("own-tree", "device", "d1", ACTOR)
    broken = {"statements": [{"effect": "allow", "actions": ["mqtt:teleport"],
                              "resources": ["#"]}]}
    with stack.db.transaction() as conn:
        conn.execute(update(policies_table).where(policies_table.c.name == "own-tree")
                     .values(document=broken))
    snapshot = service.snapshot()
    assert snapshot.documents["own-tree"].error is not None
    compiled = compile_for_device(snapshot, stack.registry.get_device("d1"))
    decision = compiled.decide("mqtt:publish", "devices/d1/x")
    assert not decision.allowed and decision.policy == "own-tree"
    assert service.get("own-tree").error is not None


def test_policy_test_explains_the_decision(service: PolicyService) -> None:
    allowed = service.test("d1", "mqtt:publish", "devices/d1/telemetry/temp")
    assert allowed["allowed"] is True and allowed["policies"] == ["default"]
    assert (allowed["policy"], allowed["statement"]) == ("default", "publish-own")
    assert allowed["matched"] == [{
        "policy": "default", "statement": "publish-own", "effect": "allow",
        "resource": "devices/d1/telemetry/#", "template": "devices/${device.id}/telemetry/#"}]
    denied = service.test("d1", "mqtt:subscribe", "devices/+/commands/#")
    assert denied["allowed"] is False and denied["matched"] == []
    assert denied["reason"] == "no statement allows mqtt:subscribe on 'devices/+/commands/#'"


def test_policy_test_of_a_quarantined_device_uses_the_recovery_policy(
        service: PolicyService, stack: Stack) -> None:
    service.put("own-tree", OWN_TREE, ACTOR)
    service.attach("own-tree", "device", "d1", ACTOR)
    service.attach("default", "device", "d1", ACTOR)
    assert service.test("d1", "mqtt:connect", "d1")["allowed"] is True
    assert service.test("d1", "mqtt:publish", "devices/d1/x")["allowed"] is True
    stack.registry.change_state("d1", LifecycleState.QUARANTINED, "operator:test")
    result = service.test("d1", "mqtt:connect", "d1")
    assert (result["allowed"], result["quarantined"], result["policies"]) == (
        False, True, ["quarantine"])
    assert service.test("d1", "mqtt:publish", "devices/d1/x")["allowed"] is False
    status = service.test("d1", "http:GET", "v1/devices/self")
    assert (status["allowed"], status["statement"]) == (True, "own-status")


def test_policy_test_resolves_the_certificate_serial(service: PolicyService) -> None:
    service.put("by-serial", {"statements": [
        {"sid": "cert", "effect": "allow", "actions": ["mqtt:publish"],
         "resources": ["certs/${cert.serial}/#"]}]}, ACTOR)
    service.attach("by-serial", "device", "d1", ACTOR)
    with_serial = service.test("d1", "mqtt:publish", "certs/1a2b/x", cert_serial="1A:2B")
    assert with_serial["allowed"] is True
    without = service.test("d1", "mqtt:publish", "certs/1a2b/x")
    assert without["allowed"] is False
    assert without["unusable_resources"][0]["reason"] == "${cert.serial} has no value"


@pytest.mark.parametrize(("args", "error"), [
    (("d1", "mqtt:teleport", "x"), InvalidInput),
    (("d1", "mqtt:*", "x"), InvalidInput),
    (("d1", "mqtt:publish", ""), InvalidInput),
    (("ghost", "mqtt:publish", "x"), NotFound),
])
def test_policy_test_refusals(service: PolicyService, args: tuple[str, str, str],
                              error: type[Exception]) -> None:
    with pytest.raises(error):
        service.test(*args)


def test_compile_matches_the_gate_protocol_for_quarantine(service: PolicyService,
                                                          stack: Stack) -> None:
    stack.registry.change_state("d1", LifecycleState.QUARANTINED, "operator:test")
    compiled = service.compile(service.snapshot(), stack.registry.get_device("d1"), None)
    assert compiled.policy_names == ("quarantine",)
    assert not compiled.decide("mqtt:connect", "d1").allowed
    # Negative control: the default policy, compiled for the same device, lets it connect.
    assert compile_policies([DEFAULT_POLICY], Vars("d1", "sensor", "acme")).decide(
        "mqtt:connect", "d1").allowed


# --- what attach/detach report: the effective set and mqtt:connect warnings -----------------


def test_effective_follows_the_data_planes_rule_and_warns_on_lost_connect(
        service: PolicyService, stack: Stack) -> None:
    assert service.effective("type", "sensor").to_json()["implicit_default"] is True
    service.put("own-tree", OWN_TREE, ACTOR)  # mqtt:* on devices/<id>/#: no connect
    service.attach("own-tree", "type", "sensor", ACTOR)
    for kind, target in (("type", "sensor"), ("device", "d1")):
        effective = service.effective(kind, target)
        assert (effective.policies, effective.mqtt_connect) == (("own-tree",), False)
        [warning] = effective.warnings
        assert warning.code == "mqtt-connect-denied" and "no statement in own-tree" in (
            warning.message)
    # ${device.id} counts as satisfiable for a type, and a device's own policy comes first
    service.put("connect", {"statements": [{"effect": "allow", "actions": ["mqtt:connect"],
                                            "resources": ["${device.id}"]}]}, ACTOR)
    service.attach("connect", "device", "d1", ACTOR)
    own = service.effective("device", "d1")
    assert (own.policies, own.device_policies, own.type_policies) == (
        ("connect", "own-tree"), ("connect",), ("own-tree",))
    assert own.mqtt_connect and own.warnings == ()
    assert service.effective("type", "sensor").warnings != ()  # d1's policy is d1's only
    stack.registry.change_state("d1", LifecycleState.QUARANTINED, "operator:test")
    assert service.effective("device", "d1").quarantined is True


def test_effective_names_a_policy_that_no_longer_validates(service: PolicyService,
                                                           stack: Stack) -> None:
    service.put("own-tree", OWN_TREE, ACTOR)
    service.attach("own-tree", "device", "d2", ACTOR)
    service.attach("default", "device", "d2", ACTOR)
    assert service.effective("device", "d2").warnings == ()  # negative control
    with stack.db.transaction() as conn:
        conn.execute(update(policies_table).where(policies_table.c.name == "own-tree")
                     .values(document={"statements": [{"effect": "allow",
                                                       "actions": ["mqtt:teleport"],
                                                       "resources": ["#"]}]}))
    [warning] = service.effective("device", "d2").warnings
    assert "policy 'own-tree' cannot be read" in warning.message
    assert "fleetward policy get own-tree" in warning.hint


@pytest.mark.parametrize(("kind", "target", "error"), [
    ("type", "no-such-type", NotFound), ("device", "ghost", NotFound),
    ("tenant", "acme", InvalidInput)])
def test_effective_refusals(service: PolicyService, kind: str, target: str,
                            error: type[Exception]) -> None:
    with pytest.raises(error):
        service.effective(kind, target)
