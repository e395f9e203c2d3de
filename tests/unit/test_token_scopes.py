"""Token scopes (docs/credentials.md "Scopes"): what a ``scope`` parameter may name,
how a request is narrowed to what the device's policy opens, and what a token's
scopes let it do — never more than its policy, never another device's topics."""

from __future__ import annotations

import pytest

from fleetward.model import Device, LifecycleState
from fleetward.policy.defaults import DEFAULT_POLICY, QUARANTINE_POLICY
from fleetward.policy.document import NamedPolicy, parse_document
from fleetward.policy.engine import CompiledPolicy, PolicyVariables, compile_policies
from fleetward.tokens.scopes import (
    RECOVERY_SCOPES,
    SCOPES,
    compile_scope,
    narrow,
    parse_scope,
)

ALL = ("telemetry:write", "commands:read", "commands:write", "device:read", "ota:download",
       "mqtt:connect")
RECOVERY = ("device:read", "ota:download")


def device(device_id: str = "d1",
           state: LifecycleState = LifecycleState.ACTIVE) -> Device:
    return Device(device_id, "sensor", "acme", state)


def compiled(*policies: NamedPolicy, device_id: str = "d1") -> CompiledPolicy:
    return compile_policies(list(policies), PolicyVariables(device_id, "sensor", "acme"))


TELEMETRY_ONLY = NamedPolicy("telemetry-only", parse_document({"statements": [
    {"sid": "telemetry", "effect": "allow", "actions": ["mqtt:publish"],
     "resources": ["devices/${device.id}/telemetry/#"]},
    {"sid": "telemetry-https", "effect": "allow", "actions": ["http:POST"],
     "resources": ["v1/telemetry/+"]},
]}))


# --- parse_scope -----------------------------------------------------------------------


def test_the_documented_scopes_are_the_known_ones() -> None:
    assert SCOPES == ALL
    assert frozenset(RECOVERY) == RECOVERY_SCOPES


@pytest.mark.parametrize(("scope", "expected"), [
    (None, ()),
    ("", ()),
    ("telemetry:write", ("telemetry:write",)),
    ("ota:download telemetry:write", ("telemetry:write", "ota:download")),
    ("mqtt:connect mqtt:connect device:read mqtt:connect", ("device:read", "mqtt:connect")),
    (" ".join(reversed(ALL)), ALL),
])
def test_parse_scope_orders_and_deduplicates(scope: str | None,
                                             expected: tuple[str, ...]) -> None:
    assert parse_scope(scope) == expected


@pytest.mark.parametrize("scope", [
    pytest.param("telemetry:read", id="unknown_scope"),
    pytest.param("telemetry:write admin", id="unknown_beside_a_known_one"),
    pytest.param("TELEMETRY:WRITE", id="case_matters"),
    pytest.param("telemetry:write  device:read", id="double_space"),
    pytest.param(" telemetry:write", id="leading_space"),
    pytest.param("telemetry:write ", id="trailing_space"),
    pytest.param("telemetry:write,device:read", id="comma_separated"),
    pytest.param("telemetry:write\tdevice:read", id="tab_separated"),
    pytest.param("telemetry:write\ndevice:read", id="newline_separated"),
    pytest.param('telemetry:write "device:read"', id="quote_not_a_scope_char"),
    pytest.param("telemetry:write\\", id="backslash_not_a_scope_char"),
    pytest.param("télémétrie", id="non_ascii"),
    pytest.param("device:read " * 200, id="longer_than_the_limit"),
])
def test_parse_scope_refuses(scope: str) -> None:
    """RFC 6749 §3.3: scope tokens of %x21 / %x23-5B / %x5D-7E, separated by single
    spaces; an unknown name is invalid_scope, not silently dropped."""
    assert parse_scope("telemetry:write device:read")  # control
    with pytest.raises(ValueError):
        parse_scope(scope)


# --- narrow ----------------------------------------------------------------------------


def test_empty_request_gets_everything_the_default_policy_opens() -> None:
    assert narrow((), compiled(DEFAULT_POLICY), quarantined=False) == ALL


def test_request_within_the_default_policy_is_granted_as_asked() -> None:
    requested = ("commands:read", "device:read")
    assert narrow(requested, compiled(DEFAULT_POLICY), quarantined=False) == requested


def test_a_telemetry_only_policy_narrows_the_other_scopes_away() -> None:
    policy = compiled(TELEMETRY_ONLY)
    assert narrow((), policy, quarantined=False) == ("telemetry:write",)
    assert narrow(("telemetry:write", "commands:read", "mqtt:connect"), policy,
                  quarantined=False) == ("telemetry:write",)
    assert narrow(("commands:read", "ota:download"), policy, quarantined=False) == ()


def test_a_policy_for_another_device_opens_no_scope_of_this_one() -> None:
    """The scopes' ${device.id} is this device: a policy naming d2's topics literally
    (attached to d1 by mistake) must not make d1's telemetry:write look open."""
    other = NamedPolicy("d2-topics", parse_document({"statements": [
        {"effect": "allow", "actions": ["mqtt:publish"], "resources": ["devices/d2/#"]}]}))
    assert narrow((), compiled(other), quarantined=False) == ()
    assert narrow((), compiled(other, device_id="d2"), quarantined=False) == (
        "telemetry:write", "commands:write")  # control


def test_a_deny_covering_a_scope_narrows_it_away() -> None:
    no_commands = NamedPolicy("no-commands", parse_document({"statements": [
        {"effect": "deny", "actions": ["mqtt:subscribe", "mqtt:receive", "http:GET"],
         "resources": ["#"]}]}))
    granted = narrow((), compiled(DEFAULT_POLICY, no_commands), quarantined=False)
    assert "commands:read" not in granted and "device:read" not in granted
    assert "telemetry:write" in granted  # control


@pytest.mark.parametrize("policy", [DEFAULT_POLICY, QUARANTINE_POLICY],
                         ids=["default_policy", "quarantine_policy"])
def test_quarantined_device_gets_the_recovery_scopes_only(policy: NamedPolicy) -> None:
    """Whatever its policy would open, a quarantined device's tokens reach recovery
    routes only (ARCHITECTURE §1)."""
    assert narrow((), compiled(policy), quarantined=True) == RECOVERY
    assert narrow(("telemetry:write", "mqtt:connect", "device:read"), compiled(policy),
                  quarantined=True) == ("device:read",)
    assert narrow(("telemetry:write",), compiled(policy), quarantined=True) == ()


def test_policy_that_opens_nothing_grants_nothing() -> None:
    assert narrow((), compiled(), quarantined=False) == ()


# --- compile_scope ---------------------------------------------------------------------


@pytest.mark.parametrize("scope", ALL)
def test_compile_scope_compiles_every_scope(scope: str) -> None:
    assert compile_scope((scope,), device()).policy_names == ("token-scope",)


def test_telemetry_scope_publishes_own_telemetry_only() -> None:
    scope = compile_scope(("telemetry:write",), device())
    assert scope.decide("mqtt:publish", "devices/d1/telemetry/temp").allowed
    assert scope.decide("mqtt:publish", "devices/d1/messages/events/a=b").allowed
    assert scope.decide("http:POST", "v1/telemetry/temp").allowed
    assert not scope.decide("mqtt:subscribe", "devices/d1/commands/#").allowed
    assert not scope.decide("mqtt:receive", "devices/d1/commands/reboot").allowed
    assert not scope.decide("mqtt:publish", "devices/d1/command-results/42").allowed
    assert not scope.decide("mqtt:connect", "d1").allowed
    assert not scope.decide("http:GET", "v1/devices/self").allowed


@pytest.mark.parametrize(("action", "resource"), [
    ("mqtt:publish", "devices/d2/telemetry/temp"),
    ("mqtt:publish", "devices/+/telemetry/temp"),
    ("mqtt:publish", "devices/d1/../d2/telemetry"),
    ("mqtt:subscribe", "devices/d2/commands/#"),
    ("mqtt:subscribe", "devices/+/commands/#"),
    ("mqtt:subscribe", "#"),
    ("mqtt:receive", "devices/d2/commands/reboot"),
    ("mqtt:connect", "d2"),
    ("mqtt:publish", "$SYS/broker/clients"),
])
def test_every_scope_together_never_reaches_another_device(action: str,
                                                           resource: str) -> None:
    scope = compile_scope(ALL, device())
    assert not scope.decide(action, resource).allowed
    own = resource.replace("d2", "d1").replace("+", "d1")
    if own != resource and ".." not in own:  # control: the device's own resource
        assert scope.decide(action, own).allowed


def test_commands_scopes() -> None:
    read = compile_scope(("commands:read",), device())
    assert read.decide("mqtt:subscribe", "devices/d1/commands/#").allowed
    assert read.decide("mqtt:receive", "devices/d1/commands/reboot").allowed
    assert read.decide("http:GET", "v1/commands").allowed
    assert not read.decide("mqtt:publish", "devices/d1/command-results/1").allowed
    write = compile_scope(("commands:write",), device())
    assert write.decide("mqtt:publish", "devices/d1/command-results/1").allowed
    assert write.decide("http:POST", "v1/commands/1/result").allowed
    assert not write.decide("mqtt:publish", "devices/d1/command-results/1/x").allowed
    assert not write.decide("http:GET", "v1/commands").allowed


def test_no_scope_denies_everything() -> None:
    scope = compile_scope((), device())
    policy = compiled(DEFAULT_POLICY)
    for action, resource in [("mqtt:connect", "d1"), ("http:GET", "v1/devices/self"),
                             ("mqtt:publish", "devices/d1/telemetry/t"),
                             ("ota:download", "firmware/x")]:
        assert not scope.decide(action, resource).allowed
        assert policy.decide(action, resource).allowed  # control: the policy opens it


def test_recovery_scopes_open_recovery_routes_only() -> None:
    scope = compile_scope(RECOVERY, device())
    assert scope.decide("ota:download", "firmware/x").allowed
    assert scope.decide("http:GET", "v1/devices/self").allowed
    assert not scope.decide("mqtt:connect", "d1").allowed
    assert not scope.decide("http:POST", "v1/telemetry").allowed
