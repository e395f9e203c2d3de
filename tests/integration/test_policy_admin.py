"""Policies through a real `fleetward serve`: the admin API (JSON and YAML bodies,
problem+json refusals, roles) and the `fleetward policy …` CLI, including `policy test`
explaining which statement decided."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer

YAML = {"Content-Type": "application/yaml"}
LOCKDOWN_YAML = """\
# Sensors may publish anywhere under their own tree, except their config.
statements:
  - sid: own-tree
    effect: allow
    actions: [mqtt:publish, mqtt:subscribe, mqtt:receive]
    resources: ["devices/${device.id}/#"]
  - sid: no-config
    effect: deny
    actions: [mqtt:publish]
    resources: ["devices/${device.id}/config/#"]
"""
CONNECT_JSON = {"version": "2026-11", "statements": [
    {"sid": "connect", "effect": "allow", "actions": ["mqtt:connect"],
     "resources": ["${device.id}"]}]}


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["hint"] and "Traceback" not in response.text
    return body


@pytest.fixture(scope="module")
def fleet(server: RunningServer) -> dict[str, str]:
    """A device type with two active devices, and an auditor and operator token."""
    tag = secrets.token_hex(3)
    names = {"type": f"pol-sensor-{tag}", "d1": f"pol-d1-{tag}", "d2": f"pol-d2-{tag}"}
    with server.admin() as admin:
        assert admin.post("/v1/device-types", json={"name": names["type"]}).status_code == 201
        for key in ("d1", "d2"):
            assert admin.post("/v1/devices", json={"id": names[key], "type": names["type"],
                                                   "owner": "acme"}).status_code == 201
            assert admin.post(f"/v1/devices/{names[key]}/state",
                              json={"state": "active"}).status_code == 200
        for role in ("auditor", "operator"):
            made = admin.post("/v1/operators", json={"name": f"pol-{role}-{tag}",
                                                     "role": role})
            names[role] = made.json()["token"]
    return names


@pytest.fixture
def admin(server: RunningServer) -> Iterator[httpx.Client]:
    with server.admin() as client:
        yield client


def audit_since(admin: httpx.Client, seq: int) -> list[dict[str, Any]]:
    return list(admin.get("/v1/audit", params={"after": seq, "limit": 1000}).json()["items"])


def last_seq(admin: httpx.Client) -> int:
    items = admin.get("/v1/audit", params={"order": "desc", "limit": 1}).json()["items"]
    return int(items[0]["seq"])


# --- admin API --------------------------------------------------------------------------


def test_put_yaml_and_json_get_list(admin: httpx.Client) -> None:
    name = f"lock-{secrets.token_hex(3)}"
    created = admin.put(f"/v1/policies/{name}", content=LOCKDOWN_YAML.encode(), headers=YAML)
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1
    replaced = admin.put(f"/v1/policies/{name}", content=LOCKDOWN_YAML.encode(),
                         headers={"Content-Type": "application/x-yaml"})
    assert replaced.status_code == 200 and replaced.json()["version"] == 2
    shown = admin.get(f"/v1/policies/{name}").json()
    assert shown["document"]["statements"][1] == {
        "sid": "no-config", "effect": "deny", "actions": ["mqtt:publish"],
        "resources": ["devices/${device.id}/config/#"]}
    assert (shown["builtin"], shown["attachments"]) == (False, [])
    json_name = f"conn-{secrets.token_hex(3)}"
    assert admin.put(f"/v1/policies/{json_name}", json=CONNECT_JSON).status_code == 201
    listed = {p["name"]: p for p in admin.get("/v1/policies").json()["items"]}
    assert {name, json_name, "default", "quarantine"} <= set(listed)
    assert listed[name]["statements"] == 2 and "document" not in listed[name]
    assert listed["default"]["builtin"] is True
    default = admin.get("/v1/policies/default").json()
    assert default["builtin"] and default["version"] == 0


BAD_PUTS: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("unknown-variable", "bad-var", {"json": {"statements": [{
        "effect": "allow", "actions": ["mqtt:publish"],
        "resources": ["devices/${device.serial}/#"]}]}}, 400, "unknown variable"),
    ("malformed-filter", "bad-filter", {"json": {"statements": [{
        "effect": "allow", "actions": ["mqtt:publish"], "resources": ["a/#/b"]}]}},
     400, "misplaces '#'"),
    ("unknown-key", "bad-key", {"json": {"statements": [{
        "effect": "allow", "action": ["mqtt:publish"], "resources": ["a"]}]}}, 400,
     "unknown key"),
    ("duplicate-key", "bad-dup", {"content": b'{"statements": [], "statements": []}',
                                  "headers": {"Content-Type": "application/json"}},
     400, "duplicate key"),
    ("yaml-syntax", "bad-yaml", {"content": b"statements: [\n", "headers": YAML}, 400,
     "not valid YAML"),
    ("text-plain", "bad-type", {"content": LOCKDOWN_YAML.encode(),
                                "headers": {"Content-Type": "text/plain"}}, 400,
     "expected a JSON or YAML"),
    ("builtin-default", "default", {"json": CONNECT_JSON}, 422, "built-in"),
    ("builtin-quarantine", "quarantine", {"json": CONNECT_JSON}, 422, "built-in"),
    ("bad-name", "Not_Lower", {"json": CONNECT_JSON}, 400, "invalid policy name"),
    ("too-large", "bad-size", {"content": b"statements: []\n" + b"#" * (65 * 1024),
                               "headers": YAML}, 400, "larger than"),
]


@pytest.mark.parametrize(("name", "kwargs", "status", "detail"),
                         [pytest.param(n, k, s, d, id=case) for case, n, k, s, d in BAD_PUTS])
def test_bad_puts_are_problem_documents_and_change_nothing(
        admin: httpx.Client, name: str, kwargs: dict[str, Any], status: int,
        detail: str) -> None:
    seq = last_seq(admin)
    before = admin.get("/v1/policies").json()
    body = problem(admin.put(f"/v1/policies/{name}", **kwargs), status)
    assert detail in body["detail"], body
    assert admin.get("/v1/policies").json() == before
    assert audit_since(admin, seq) == []


def test_attach_test_detach_delete(admin: httpx.Client, fleet: dict[str, str]) -> None:
    name = f"lock-{secrets.token_hex(3)}"
    assert admin.put(f"/v1/policies/{name}", content=LOCKDOWN_YAML.encode(),
                     headers=YAML).status_code == 201
    seq = last_seq(admin)
    first = admin.post(f"/v1/policies/{name}/attachments", json={"type": fleet["type"]})
    again = admin.post(f"/v1/policies/{name}/attachments", json={"type": fleet["type"]})
    assert (first.status_code, first.json()["changed"]) == (201, True)
    assert (again.status_code, again.json()["changed"]) == (200, False)
    d1 = fleet["d1"]

    def test(action: str, resource: str) -> dict[str, Any]:
        response = admin.post("/v1/policies/test", json={"device_id": d1, "action": action,
                                                         "resource": resource})
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    own = test("mqtt:publish", f"devices/{d1}/telemetry/t")
    assert (own["allowed"], own["policy"], own["statement"]) == (True, name, "own-tree")
    config = test("mqtt:publish", f"devices/{d1}/config/wifi")
    assert (config["allowed"], config["statement"]) == (False, "no-config")
    assert [(m["statement"], m["effect"]) for m in config["matched"]] == [
        ("no-config", "deny"), ("own-tree", "allow")]
    other = test("mqtt:publish", f"devices/{fleet['d2']}/telemetry/t")
    assert other["allowed"] is False and other["matched"] == []
    # The type's policy replaced the default, which granted mqtt:connect.
    assert test("mqtt:connect", d1)["allowed"] is False

    attached = problem(admin.delete(f"/v1/policies/{name}"), 409)
    assert attached["attachments"] == [{"kind": "type", "target": fleet["type"]}]
    problem(admin.delete(f"/v1/policies/{name}/attachments", params={"device": d1}), 404)
    problem(admin.delete(f"/v1/policies/{name}/attachments",
                         params={"device": d1, "type": fleet["type"]}), 400)
    detached = admin.delete(f"/v1/policies/{name}/attachments", params={"type": fleet["type"]})
    assert detached.status_code == 200, detached.text
    assert detached.json()["effective"]["policies"] == ["default"]  # what applies now
    assert test("mqtt:connect", d1)["allowed"] is True  # back to the default policy
    assert admin.delete(f"/v1/policies/{name}").status_code == 204
    problem(admin.get(f"/v1/policies/{name}"), 404)
    appended = [(e["action"], e["target"], e["details"]) for e in audit_since(admin, seq)]
    assert appended == [
        ("policy.attached", f"policy:{name}", {"kind": "type", "target": fleet["type"]}),
        ("policy.detached", f"policy:{name}", {"kind": "type", "target": fleet["type"]}),
        ("policy.deleted", f"policy:{name}", {"version": 1})]


@pytest.mark.parametrize(("body", "status"), [
    ({"device": "no-such-device"}, 404),
    ({"type": "no-such-type"}, 404),
    ({}, 400),
    ({"tenant": "acme"}, 400),
    ({"device": 7}, 400),
])
def test_bad_attachments_are_refused(admin: httpx.Client, body: dict[str, Any],
                                     status: int) -> None:
    name = f"conn-{secrets.token_hex(3)}"
    assert admin.put(f"/v1/policies/{name}", json=CONNECT_JSON).status_code == 201
    problem(admin.post(f"/v1/policies/{name}/attachments", json=body), status)
    assert admin.get(f"/v1/policies/{name}").json()["attachments"] == []


def test_quarantined_device_is_explained_as_quarantined(admin: httpx.Client,
                                                        fleet: dict[str, str]) -> None:
    d2 = fleet["d2"]
    assert admin.post(f"/v1/devices/{d2}/state",
                      json={"state": "quarantined"}).status_code == 200
    try:
        results = {
            (action, resource): admin.post("/v1/policies/test", json={
                "device_id": d2, "action": action, "resource": resource}).json()
            for action, resource in [("mqtt:connect", d2), ("http:GET", "v1/devices/self"),
                                     ("http:POST", "v1/telemetry"),
                                     ("est:reenroll", "est/default")]}
    finally:
        assert admin.post(f"/v1/devices/{d2}/state",
                          json={"state": "active", "from": ["quarantined"]}
                          ).status_code == 200
    assert {k: v["allowed"] for k, v in results.items()} == {
        ("mqtt:connect", d2): False, ("http:GET", "v1/devices/self"): True,
        ("http:POST", "v1/telemetry"): False, ("est:reenroll", "est/default"): True}
    assert all(v["policies"] == ["quarantine"] and v["quarantined"] for v in results.values())


def test_roles(server: RunningServer, admin: httpx.Client, fleet: dict[str, str]) -> None:
    """Auditors read and test; only admins write policies (operators cannot widen what
    devices may do)."""
    name = f"conn-{secrets.token_hex(3)}"
    with server.admin(fleet["auditor"]) as auditor, server.admin(fleet["operator"]) as op:
        seq = last_seq(admin)
        assert auditor.get("/v1/policies").status_code == 200
        assert auditor.get("/v1/policies/default").status_code == 200
        tested = auditor.post("/v1/policies/test", json={
            "device_id": fleet["d1"], "action": "mqtt:connect", "resource": fleet["d1"]})
        assert tested.status_code == 200 and tested.json()["allowed"] is True
        assert audit_since(admin, seq) == []  # `test` is a read: nothing recorded
        for client in (auditor, op):
            problem(client.put(f"/v1/policies/{name}", json=CONNECT_JSON), 403)
            problem(client.post("/v1/policies/default/attachments",
                                json={"device": fleet["d1"]}), 403)
    problem(admin.get(f"/v1/policies/{name}"), 404)


# --- CLI --------------------------------------------------------------------------------


def test_cli_policy_lifecycle_and_test(server: RunningServer, fleet: dict[str, str],
                                       tmp_path: Path) -> None:
    name = f"cli-lock-{secrets.token_hex(3)}"
    d1, d2 = fleet["d1"], fleet["d2"]
    yaml_file = tmp_path / "lockdown.yaml"
    yaml_file.write_text(LOCKDOWN_YAML)
    put = server.cli("policy", "put", name, str(yaml_file))
    assert f"policy {name} created (version 1" in put.stdout
    json_file = tmp_path / "connect.json"
    json_file.write_text(json.dumps(CONNECT_JSON))
    assert "replaced (version 2" in server.cli("policy", "put", name, str(json_file)).stdout
    server.cli("policy", "put", name, str(yaml_file))
    assert f"attached to device {d1}" in server.cli("policy", "attach", name, "--device",
                                                    d1).stdout
    server.cli("policy", "attach", "default", "--device", d1)

    allowed = server.cli("policy", "test", "--device", d1, "--action", "mqtt:publish",
                         "--resource", f"devices/{d1}/telemetry/temp")
    assert allowed.returncode == 0
    assert "ALLOW" in allowed.stdout
    assert f"allowed by policy '{name}' statement 'own-tree'" in allowed.stdout
    assert "devices/${device.id}/#" in allowed.stdout  # the statement as written

    denied = server.cli("policy", "test", "--device", d1, "--action", "mqtt:publish",
                        "--resource", f"devices/{d1}/config/wifi", check=False)
    assert denied.returncode == 1, denied.stderr
    assert "DENY" in denied.stdout
    assert f"denied by policy '{name}' statement 'no-config'" in denied.stdout

    escape = server.cli("policy", "test", "--device", d1, "--action", "mqtt:subscribe",
                        "--resource", "devices/+/commands/#", check=False)
    assert escape.returncode == 1
    assert "no statement allows mqtt:subscribe on 'devices/+/commands/#'" in escape.stdout
    assert "no statement matched" in escape.stdout

    as_json = server.cli("policy", "test", "--device", d1, "--action", "mqtt:connect",
                         "--resource", d1, "--json")
    assert json.loads(as_json.stdout)["statement"] == "connect-as-self"

    shown = server.cli("policy", "get", name)
    assert "no-config" in shown.stdout and f"device:{d1}" in shown.stdout
    assert name in server.cli("policy", "list").stdout
    # Deleting an attached policy is refused with a hint on what to do.
    refused = server.cli("policy", "delete", name, check=False)
    assert refused.returncode == 1
    assert "attached" in refused.stderr and "fleetward policy detach" in refused.stderr
    server.cli("policy", "detach", name, "--device", d1)
    server.cli("policy", "detach", "default", "--device", d1)
    assert "deleted" in server.cli("policy", "delete", name).stdout
    # Negative control for the denial above: with no policy attached, d2 gets the default.
    other = server.cli("policy", "test", "--device", d2, "--action", "mqtt:publish",
                       "--resource", f"devices/{d2}/telemetry/temp")
    assert "default" in other.stdout and "publish-own" in other.stdout


@pytest.mark.parametrize(("content", "args", "expected"), [
    ("statements:\n  - effect: allow\n    actions: [mqtt:publish]\n"
     "    resources: ['devices/${device.nme}/#']\n", (), "unknown variable"),
    ("statements: [\n", (), "not valid YAML"),
    (json.dumps(CONNECT_JSON), ("--name", "default"), "built-in"),
])
def test_cli_put_refusals_name_the_problem(server: RunningServer, tmp_path: Path,
                                           content: str, args: tuple[str, ...],
                                           expected: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(content)
    name = args[1] if args else f"cli-bad-{secrets.token_hex(3)}"
    result = server.cli("policy", "put", name, str(path), check=False)
    assert result.returncode == 1
    assert expected in result.stderr and "hint:" in result.stderr


def test_cli_attach_needs_exactly_one_target(server: RunningServer) -> None:
    result = server.cli("policy", "attach", "default", check=False)
    assert result.returncode == 1 and "--type T or --device D" in result.stderr


def test_a_policy_named_test_is_not_shadowed_by_the_test_route(admin: httpx.Client) -> None:
    """POST /v1/policies/test explains; GET/PUT/DELETE /v1/policies/test is a policy."""
    assert admin.put("/v1/policies/test", json=CONNECT_JSON).status_code in (200, 201)
    shown = admin.get("/v1/policies/test")
    assert shown.status_code == 200 and shown.json()["name"] == "test"
    assert admin.delete("/v1/policies/test").status_code == 204
    problem(admin.get("/v1/policies/test"), 404)
