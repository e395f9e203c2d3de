"""Acceptance 8 (issue 2): admin API roles, operator tokens, problem documents, paging, OpenAPI.

The route list comes from ``fleetward.admin.app.ROUTES``, so a route added there is
covered here without editing this file: an under-privileged token must be refused with
403, nothing may change, and the refusal must be audited.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetward.admin.app import ROUTES, Route, openapi_document
from fleetward.model import Role, role_allows
from tests.conftest import RunningServer
from tests.integration.enroll_helpers import csr_der, enroll_with_idevid, make_oem_ca

PROBLEM_MEMBERS = {"type", "title", "status", "detail", "hint"}
GENERIC_400_HINT = "Correct the request and send it again."
PROTECTED = [r for r in ROUTES if r.role is not None]


def route_id(route: Route) -> str:
    return f"{route.method} {route.path}"


# --- helpers ----------------------------------------------------------------------------


def csr_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())


def oem_ca_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RBAC Factory CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """An RFC 9457 problem document with our ``hint`` member."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem.keys() >= PROBLEM_MEMBERS, problem
    assert problem["status"] == status
    assert all(isinstance(problem[k], str) and problem[k] for k in PROBLEM_MEMBERS - {"status"})
    assert "Traceback" not in response.text
    return problem


def bare_client(server: RunningServer) -> httpx.Client:
    """An admin API client that sends no Authorization header of its own."""
    return httpx.Client(base_url=server.admin_url, verify=server.tls(), timeout=30)


def last_seq(admin: httpx.Client) -> int:
    items = admin.get("/v1/audit", params={"order": "desc", "limit": 1}).json()["items"]
    return int(items[0]["seq"]) if items else 0


def audit_since(admin: httpx.Client, seq: int) -> list[dict[str, Any]]:
    response = admin.get("/v1/audit", params={"after": seq, "limit": 1000})
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


@dataclass
class Tokens:
    auditor: str
    operator: str
    names: dict[Role, str]

    def for_role(self, role: Role) -> str:
        return self.auditor if role is Role.AUDITOR else self.operator


@pytest.fixture(scope="module")
def tokens(server: RunningServer) -> Tokens:
    """One auditor and one operator token, created by the initial admin over the API."""
    names = {Role.AUDITOR: "rbac-auditor", Role.OPERATOR: "rbac-operator"}
    made = {}
    with server.admin() as admin:
        for role, name in names.items():
            response = admin.post("/v1/operators", json={"name": name, "role": role.value})
            assert response.status_code == 201, response.text
            made[role] = response.json()["token"]
    return Tokens(made[Role.AUDITOR], made[Role.OPERATOR], names)


@dataclass
class Target:
    """Fresh real objects to put into a route's path and body."""

    device_id: str
    serial: str
    token_id: str
    tag: str
    bootstrap_token_id: str
    pending: Callable[[], str]  # makes a device whose enrollment waits for approval
    # Makes a fresh policy, attached to the given device if one is named.
    policy: Callable[[str | None], str] | None = None
    # Make a fresh symmetric credential of the device (sk_…) and a fresh API key (its id).
    credential: Callable[[], str] | None = None
    api_key: Callable[[], str] | None = None


@pytest.fixture(scope="module")
def pending_enrollments(server: RunningServer,
                        tmp_path_factory: pytest.TempPathFactory) -> Callable[[], str]:
    """Devices that enrolled with a manufacturer certificate (IDevID) and wait for an
    operator, made on demand (only the approve/reject routes need one)."""
    oem = make_oem_ca("RBAC Approval OEM CA")
    with server.admin() as admin:
        response = admin.post("/v1/ca/oem", json={
            "name": "rbac-approval-oem", "certificate": oem.pem, "device_type": "default",
            "require_approval": True})
    assert response.status_code == 201, response.text
    directory = tmp_path_factory.mktemp("idevids")

    def make() -> str:
        device_id = f"rbac-pending-{secrets.token_hex(4)}"
        waiting = enroll_with_idevid(server, oem.idevid(directory, device_id),
                                     csr_der(device_id))
        assert waiting.status_code == 202, waiting.text
        return device_id
    return make


@pytest.fixture
def target(server: RunningServer, pending_enrollments: Callable[[], str],
           policies_on_demand: Callable[[str | None], str]) -> Target:
    """A registered device with one valid certificate and a bootstrap token, and a spare
    operator token."""
    tag = secrets.token_hex(4)
    with server.admin() as admin:
        device_id = f"rbac-dev-{tag}"
        assert admin.post("/v1/devices", json={"id": device_id, "type": "default"}
                          ).status_code == 201
        issued = admin.post(f"/v1/devices/{device_id}/certificates", json={"csr": csr_pem()})
        assert issued.status_code == 201, issued.text
        spare = admin.post("/v1/operators", json={"name": f"spare-{tag}", "role": "auditor"})
        token_id = spare.json()["token"].removeprefix("fwa_").split(".")[0]
        bootstrap = admin.post(f"/v1/devices/{device_id}/bootstrap-tokens", json={})
        assert bootstrap.status_code == 201, bootstrap.text

    def credential() -> str:
        with server.admin() as admin:
            made = admin.post(f"/v1/devices/{device_id}/credentials",
                              json={"kind": "symmetric_key"})
        assert made.status_code == 201, made.text
        return str(made.json()["id"])

    def api_key() -> str:
        with server.admin() as admin:
            made = admin.post("/v1/api-keys", json={"name": f"rbac-{tag}",
                                                    "scopes": ["tokens:introspect"]})
        assert made.status_code == 201, made.text
        return str(made.json()["id"])

    return Target(device_id, issued.json()["serial"], token_id, tag,
                  bootstrap.json()["token_id"], pending_enrollments, policies_on_demand,
                  credential, api_key)


@pytest.fixture(scope="module")
def policies_on_demand(server: RunningServer) -> Callable[[str | None], str]:
    """Policies made for the policy routes, so that each request names a real one."""
    def make(attach_to_device: str | None) -> str:
        name = f"rbac-policy-{secrets.token_hex(4)}"
        with server.admin() as admin:
            created = admin.put(f"/v1/policies/{name}", json=PLAUSIBLE_POLICY)
            assert created.status_code == 201, created.text
            if attach_to_device is not None:
                attached = admin.post(f"/v1/policies/{name}/attachments",
                                      json={"device": attach_to_device})
                assert attached.status_code == 201, attached.text
        return name
    return make


PLAUSIBLE_POLICY = {"statements": [{"sid": "connect", "effect": "allow",
                                    "actions": ["mqtt:connect"], "resources": ["${device.id}"]}]}


# Plausible requests, so that a refusal is due to the role and not to a bad request:
# test_refused_requests_succeed_for_an_admin replays each one as admin.
PLAUSIBLE_BODIES: dict[tuple[str, str], Callable[[Target], dict[str, Any] | None]] = {
    ("POST", "/v1/device-types"): lambda t: {
        "name": f"rbac-type-{t.tag}", "description": "RBAC test", "message_types": ["event"]},
    ("POST", "/v1/devices"): lambda t: {
        "id": f"rbac-new-{t.tag}", "type": "default", "owner": "acme",
        "labels": {"site": "plant-3"}},
    ("POST", "/v1/devices/{device_id}/state"): lambda t: {
        "state": "disabled", "reason": "maintenance"},
    ("POST", "/v1/devices/{device_id}/certificates"): lambda t: {
        "csr": csr_pem(), "profile": "device"},
    ("POST", "/v1/devices/{device_id}/revoke-certificates"): lambda t: {"reason": "superseded"},
    ("POST", "/v1/devices/{device_id}/commands"): lambda t: {
        "name": "reboot", "payload": {"delay_seconds": 5}, "ttl_seconds": 3600},
    ("POST", "/v1/certificates/{serial}/revoke"): lambda t: {"reason": "keyCompromise"},
    ("POST", "/v1/ca/oem"): lambda t: {
        "name": f"rbac-oem-{t.tag}", "certificate": oem_ca_pem(), "device_type": "default"},
    ("POST", "/v1/operators"): lambda t: {"name": f"rbac-new-op-{t.tag}", "role": "auditor"},
    ("DELETE", "/v1/operators/{token_id}"): lambda t: None,
    ("POST", "/v1/devices/{device_id}/bootstrap-tokens"): lambda t: {"ttl_hours": 24},
    ("POST", "/v1/bootstrap-tokens"): lambda t: {
        "type": "default", "count": 10, "ttl_hours": 24, "owner": "acme"},
    ("DELETE", "/v1/bootstrap-tokens/{token_id}"): lambda t: None,
    ("POST", "/v1/enrollments/{device_id}/approve"): lambda t: None,
    ("POST", "/v1/enrollments/{device_id}/reject"): lambda t: None,
    ("POST", "/v1/factory/tokens"): lambda t: {
        "type": "default", "count": 2, "owner": "acme", "id_prefix": f"rbac-{t.tag}-",
        "ttl_hours": 24},
    ("PUT", "/v1/policies/{name}"): lambda t: PLAUSIBLE_POLICY,
    ("DELETE", "/v1/policies/{name}"): lambda t: None,
    ("POST", "/v1/policies/{name}/attachments"): lambda t: {"device": t.device_id},
    ("DELETE", "/v1/policies/{name}/attachments"): lambda t: None,
    ("POST", "/v1/policies/test"): lambda t: {
        "device_id": t.device_id, "action": "mqtt:connect", "resource": t.device_id},
    ("POST", "/v1/factory/sign"): lambda t: {
        "type": "default", "device_id": f"rbac-factory-{t.tag}", "csr_pem": csr_pem(),
        "owner": "acme"},
    ("POST", "/v1/devices/{device_id}/credentials"): lambda t: {"kind": "symmetric_key"},
    ("POST", "/v1/credentials/{credential_id}/rotate"): lambda t: {"slot": "secondary"},
    ("DELETE", "/v1/credentials/{credential_id}"): lambda t: None,
    ("POST", "/v1/api-keys"): lambda t: {
        "name": f"rbac-key-{t.tag}", "scopes": ["tokens:introspect"], "ttl_hours": 24},
    ("POST", "/v1/api-keys/{key_id}/rotate"): lambda t: {"grace_seconds": 60},
    ("DELETE", "/v1/api-keys/{key_id}"): lambda t: None,
    ("POST", "/v1/access-tokens"): lambda t: {"device_id": t.device_id,
                                              "scope": "mqtt:connect"},
    ("POST", "/v1/access-tokens/inspect"): lambda t: {"token": "not.a.token"},
    ("POST", "/v1/access-tokens/revoke"): lambda t: {
        "jti": f"rbac-{t.tag}-{secrets.token_hex(4)}"},
    ("POST", "/v1/devices/{device_id}/access-tokens/revoke"): lambda t: {"reason": "rbac"},
    ("POST", "/v1/token-keys/rotate"): lambda t: {"reason": "rbac"},
}


def schema_body(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """A body that satisfies ``schema``'s required fields (for routes not in the table)."""
    if schema is None:
        return None
    body: dict[str, Any] = {}
    for name in schema.get("required", []):
        spec = schema["properties"][name]
        body[name] = (spec["enum"][0] if "enum" in spec
                      else [] if spec.get("type") == "array"
                      else {} if spec.get("type") == "object" else f"rbac-{name}")
    return body


def plausible_request(route: Route, t: Target) -> tuple[str, dict[str, Any] | None]:
    fill = {"device_id": t.device_id, "serial": t.serial, "token_id": t.token_id}
    if route.path.startswith("/v1/bootstrap-tokens/"):
        fill["token_id"] = t.bootstrap_token_id
    if route.path.startswith("/v1/enrollments/{device_id}/"):
        fill["device_id"] = t.pending()
    if "{credential_id}" in route.path and t.credential is not None:
        fill["credential_id"] = t.credential()
    if "{key_id}" in route.path and t.api_key is not None:
        fill["key_id"] = t.api_key()

    def param(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in fill:
            pytest.fail(f"{route_id(route)}: teach plausible_request the path parameter {name}")
        return fill[name]

    query = ""
    if route.path.startswith("/v1/policies/{name}") and t.policy is not None:
        # Detaching needs an attachment to remove; everything else a policy that exists.
        detach = route.method == "DELETE" and route.path.endswith("/attachments")
        fill["name"] = t.policy(t.device_id if detach else None)
        query = f"?device={t.device_id}" if detach else ""
    path = re.sub(r"\{(\w+)\}", param, route.path) + query
    build = PLAUSIBLE_BODIES.get((route.method, route.path))
    return path, build(t) if build else schema_body(route.body)


def snapshot(admin: httpx.Client, t: Target) -> dict[str, Any]:
    """Everything a wrongly allowed write could change."""
    paths = [f"/v1/devices/{t.device_id}", f"/v1/certificates/{t.serial}",
             f"/v1/devices/{t.device_id}/certificates", "/v1/operators", "/v1/device-types",
             "/v1/devices?limit=1000", "/v1/ca", "/v1/policies",
             f"/v1/devices/{t.device_id}/credentials", "/v1/api-keys", "/v1/token-keys"]
    state = {}
    for path in paths:
        response = admin.get(path)
        assert response.status_code == 200, (path, response.text)
        state[path] = response.json()
    return state


# --- roles ------------------------------------------------------------------------------


# Every (role, route) pair the role table refuses, derived from ROUTES.
REFUSED: list[tuple[Role, Route]] = [
    (role, route) for role in (Role.AUDITOR, Role.OPERATOR) for route in PROTECTED
    if route.role is not None and not role_allows(role, route.role)]
REFUSALS = [pytest.param(role, route, id=f"{role.value}-{route_id(route)}")
            for role, route in REFUSED]


# POSTs that only compute an answer (they need a body, not a write): open to auditors.
READ_ONLY_POSTS = {"POST /v1/policies/test", "POST /v1/access-tokens/inspect"}


def test_the_auditor_role_is_read_only_in_the_route_table() -> None:
    """A write route given Role.AUDITOR by mistake would be open to every auditor token."""
    refused = {route_id(r) for role, r in REFUSED if role is Role.AUDITOR}
    writes = {route_id(r) for r in PROTECTED if r.method != "GET"} - READ_ONLY_POSTS
    assert writes and writes <= refused
    assert "POST /v1/operators" in refused and "POST /v1/ca/oem" in refused
    operator_refused = {route_id(r) for role, r in REFUSED if role is Role.OPERATOR}
    assert {"POST /v1/operators", "POST /v1/ca/oem", "GET /v1/operators",
            "DELETE /v1/operators/{token_id}"} <= operator_refused


@pytest.mark.parametrize(("role", "route"), REFUSALS)
def test_under_privileged_token_is_refused_audited_and_changes_nothing(
        server: RunningServer, tokens: Tokens, target: Target, role: Role,
        route: Route) -> None:
    path, body = plausible_request(route, target)
    with server.admin() as admin, server.admin(tokens.for_role(role)) as caller:
        before = snapshot(admin, target)
        seq = last_seq(admin)
        response = caller.request(route.method, path, json=body)
        problem = assert_problem(response, 403)
        after = snapshot(admin, target)
        appended = audit_since(admin, seq)
        forbidden = admin.get("/v1/audit", params={"action": "admin.forbidden", "after": seq,
                                                   "limit": 1000}).json()["items"]
    assert problem["type"].endswith("/forbidden")
    assert role.value in problem["detail"]
    assert after == before
    # The refusal is the only thing the request left in the audit log.
    assert [e["action"] for e in appended] == ["admin.forbidden"]
    assert forbidden == appended
    event = forbidden[0]
    assert event["outcome"] == "failure"
    assert event["actor"] == f"operator:{tokens.names[role]}"
    assert event["target"] == path.split("?")[0]  # the audit names the path, not the query
    assert event["details"] == {"method": route.method, "role": role.value,
                                "needed": route.role.value}  # type: ignore[union-attr]


@pytest.mark.parametrize("route", [pytest.param(r, id=route_id(r)) for r in PROTECTED
                                   if r.method != "GET"])
def test_refused_requests_succeed_for_an_admin(server: RunningServer, target: Target,
                                               route: Route) -> None:
    """Negative control: the requests refused above are valid, so the 403 was the role."""
    assert (route.method, route.path) in PLAUSIBLE_BODIES, (
        f"add a plausible request body for the new route {route_id(route)}")
    path, body = plausible_request(route, target)
    with server.admin() as admin:
        response = admin.request(route.method, path, json=body)
    assert 200 <= response.status_code < 300, response.text


@pytest.mark.parametrize("route", [pytest.param(r, id=route_id(r)) for r in ROUTES
                                   if r.method == "GET" and r.role is Role.AUDITOR])
def test_auditor_reads_every_auditor_get_route(server: RunningServer, tokens: Tokens,
                                               target: Target, route: Route) -> None:
    path, _ = plausible_request(route, target)
    with server.admin(tokens.auditor) as auditor:
        response = auditor.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")


def test_operator_registers_issues_and_revokes(server: RunningServer, tokens: Tokens) -> None:
    tag = secrets.token_hex(4)
    device_id = f"rbac-op-{tag}"
    with server.admin(tokens.operator) as op, server.admin() as admin:
        seq = last_seq(admin)
        assert op.get("/v1/whoami").json()["role"] == "operator"
        assert op.post("/v1/devices", json={"id": device_id, "type": "default"}
                       ).status_code == 201
        first = op.post(f"/v1/devices/{device_id}/certificates", json={"csr": csr_pem()})
        second = op.post(f"/v1/devices/{device_id}/certificates", json={"csr": csr_pem()})
        assert first.status_code == second.status_code == 201, (first.text, second.text)
        one = op.post(f"/v1/certificates/{first.json()['serial']}/revoke",
                      json={"reason": "superseded"})
        assert one.status_code == 200 and one.json()["status"] == "revoked"
        rest = op.post(f"/v1/devices/{device_id}/revoke-certificates",
                       json={"reason": "keyCompromise"})
        assert [c["serial"] for c in rest.json()["items"]] == [second.json()["serial"]]
        disabled = op.post(f"/v1/devices/{device_id}/state", json={"state": "disabled"})
        assert disabled.status_code == 200 and disabled.json()["device"]["state"] == "disabled"
        # ... but not the admin's business.
        assert_problem(op.post("/v1/operators", json={"name": f"x-{tag}", "role": "admin"}), 403)
        assert_problem(op.post("/v1/ca/oem", json={"name": f"x-{tag}", "device_type": "default",
                                                   "certificate": oem_ca_pem()}), 403)
        events = audit_since(admin, seq)
    actors = {e["actor"] for e in events if e["action"] != "admin.forbidden"}
    assert actors == {f"operator:{tokens.names[Role.OPERATOR]}"}
    assert [e["action"] for e in events].count("admin.forbidden") == 2


# --- authentication ---------------------------------------------------------------------


def _wrong_secret(token: str) -> str:
    head, _, secret = token.partition(".")
    return f"{head}.{secrets.token_urlsafe(len(secret) * 3 // 4)}"


AUTH_FAILURES: list[tuple[str, Callable[[Tokens], str | None], str]] = [
    ("no-header", lambda t: None, "no Authorization header"),
    ("basic-scheme", lambda t: "Basic cmJhYy1hdWRpdG9yOnNlY3JldA==", "not a Bearer token"),
    ("bearer-alone", lambda t: "Bearer", "not a Bearer token"),
    ("empty-id-and-secret", lambda t: "Bearer fwa_.", "malformed token"),
    ("valid-token-other-scheme", lambda t: f"Token {t.auditor}", "not a Bearer token"),
    ("no-prefix", lambda t: f"Bearer {t.auditor.removeprefix('fwa_')}", "malformed token"),
    ("no-secret-separator", lambda t: f"Bearer {t.auditor.split('.')[0]}", "malformed token"),
    ("unknown-id", lambda t: f"Bearer fwa_{secrets.token_hex(8)}.{secrets.token_urlsafe(32)}",
     "unknown or wrong token"),
    ("valid-id-wrong-secret", lambda t: f"Bearer {_wrong_secret(t.auditor)}",
     "unknown or wrong token"),
    ("valid-id-empty-secret", lambda t: f"Bearer {t.auditor.split('.')[0]}.",
     "malformed token"),
    ("valid-id-secret-one-char-short", lambda t: f"Bearer {t.auditor[:-1]}", "malformed token"),
]


@pytest.mark.parametrize(("authorization", "reason"),
                         [pytest.param(build, reason, id=case)
                          for case, build, reason in AUTH_FAILURES])
@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/devices"), ("POST", "/v1/devices")])
def test_bad_credentials_are_401_and_audited(server: RunningServer, tokens: Tokens,
                                             authorization: Callable[[Tokens], str | None],
                                             reason: str, method: str, path: str) -> None:
    header = authorization(tokens)
    headers = {"Authorization": header} if header is not None else {}
    with server.admin() as admin, bare_client(server) as anonymous:
        seq = last_seq(admin)
        devices_before = admin.get("/v1/devices", params={"limit": 1000}).json()
        response = anonymous.request(method, path, headers=headers,
                                     json={"id": f"auth-{secrets.token_hex(4)}",
                                           "type": "default"} if method == "POST" else None)
        problem = assert_problem(response, 401)
        appended = audit_since(admin, seq)
        devices_after = admin.get("/v1/devices", params={"limit": 1000}).json()
    assert problem["type"].endswith("/unauthenticated")
    assert devices_after == devices_before
    assert [(e["action"], e["outcome"], e["details"]["reason"]) for e in appended] == [
        ("admin.authentication_failed", "failure", reason)]
    assert appended[0]["actor"].startswith("remote:")
    # The refusal never echoes a presented secret.
    presented_secret = (header or "").rpartition(".")[2]
    if len(presented_secret) >= 16:
        assert presented_secret not in response.text


def test_valid_token_is_accepted_as_negative_control(server: RunningServer,
                                                     tokens: Tokens) -> None:
    """The 401s above are not a broken server: the same header shapes, done right, pass."""
    with bare_client(server) as anonymous:
        for header in (f"Bearer {tokens.auditor}", f"bearer {tokens.auditor}",
                       f"Bearer  {tokens.auditor}"):
            response = anonymous.get("/v1/whoami", headers={"Authorization": header})
            assert response.status_code == 200, (header, response.text)
            assert response.json()["name"] == tokens.names[Role.AUDITOR]


def test_revoked_token_is_refused(server: RunningServer) -> None:
    name = f"leaver-{secrets.token_hex(4)}"
    with server.admin() as admin:
        token = admin.post("/v1/operators", json={"name": name, "role": "operator"}
                           ).json()["token"]
        token_id = token.removeprefix("fwa_").split(".")[0]
        with server.admin(token) as leaver:
            assert leaver.get("/v1/whoami").status_code == 200
            assert admin.delete(f"/v1/operators/{token_id}").status_code == 204
            seq = last_seq(admin)
            assert_problem(leaver.get("/v1/whoami"), 401)
            assert_problem(leaver.post("/v1/devices", json={"id": f"{name}-dev",
                                                            "type": "default"}), 401)
        appended = audit_since(admin, seq)
        listed = {o["token_id"]: o for o in admin.get("/v1/operators").json()["items"]}
        again = admin.delete(f"/v1/operators/{token_id}")
        missing = admin.get(f"/v1/devices/{name}-dev")
    assert [(e["action"], e["details"]["reason"]) for e in appended] == [
        ("admin.authentication_failed", "token revoked")] * 2
    assert listed[token_id]["revoked"] is True and listed[token_id]["name"] == name
    assert_problem(again, 404)
    assert_problem(missing, 404)


def test_tokens_are_stored_hashed(server: RunningServer, tokens: Tokens) -> None:
    """Neither the token nor its secret part is anywhere in the database files."""
    db_file = server.data_dir / "fleetward.db"
    all_tokens = {"initial-admin": server.token, "auditor": tokens.auditor,
                  "operator": tokens.operator}
    conn = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        cells = [repr(value) for table in tables
                 for row in conn.execute(f'SELECT * FROM "{table}"') for value in row]
    finally:
        conn.close()
    raw = b"".join(f.read_bytes() for f in sorted(server.data_dir.glob("fleetward.db*")))
    assert {f.name for f in server.data_dir.glob("fleetward.db*")} >= {"fleetward.db"}
    for who, token in all_tokens.items():
        token_id, _, secret = token.removeprefix("fwa_").partition(".")
        assert len(secret) >= 40, who
        assert not [c for c in cells if secret in c], f"{who}'s secret is stored in a table"
        assert secret.encode() not in raw, f"{who}'s secret is in the database files"
        assert token.encode() not in raw
        # Negative control: the search does see the token rows (id and hash are stored).
        assert any(token_id in c for c in cells), who
        digest = hashlib.sha256(secret.encode()).hexdigest()
        assert any(digest in c for c in cells), who


# --- bad requests -----------------------------------------------------------------------


JSON = {"Content-Type": "application/json"}
BAD_REQUESTS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("invalid-json", "POST", "/v1/devices", {"content": b'{"id": "bad-1", ', "headers": JSON}),
    ("json-array", "POST", "/v1/devices", {"content": b'["bad-2"]', "headers": JSON}),
    ("not-utf8", "POST", "/v1/devices", {"content": b'{"id": "\xff"}', "headers": JSON}),
    ("text-plain", "POST", "/v1/devices",
     {"content": b'{"id": "bad-3", "type": "default"}', "headers": {"Content-Type": "text/plain"}}),
    ("form-encoded", "POST", "/v1/devices", {"data": {"id": "bad-4", "type": "default"}}),
    ("no-body", "POST", "/v1/devices", {}),
    ("unknown-field", "POST", "/v1/devices",
     {"json": {"id": "bad-5", "type": "default", "colour": "red"}}),
    ("missing-field", "POST", "/v1/devices", {"json": {"id": "bad-6"}}),
    ("wrong-field-type", "POST", "/v1/devices", {"json": {"id": 7, "type": "default"}}),
    ("labels-not-object", "POST", "/v1/devices",
     {"json": {"id": "bad-8", "type": "default", "labels": ["site"]}}),
    ("unknown-role", "POST", "/v1/operators", {"json": {"name": "bad-9", "role": "root"}}),
    ("unknown-state", "POST", "/v1/devices/{device_id}/state", {"json": {"state": "asleep"}}),
    ("unknown-reason", "POST", "/v1/certificates/{serial}/revoke",
     {"json": {"reason": "boredom"}}),
    ("limit-not-int", "GET", "/v1/devices?limit=ten", {}),
    ("limit-zero", "GET", "/v1/devices?limit=0", {}),
    ("limit-too-big", "GET", "/v1/devices?limit=100000", {}),
    ("limit-negative", "GET", "/v1/devices?limit=-1", {}),
    ("state-filter-unknown", "GET", "/v1/devices?state=asleep", {}),
    ("audit-limit-zero", "GET", "/v1/audit?limit=0", {}),
    ("audit-limit-not-int", "GET", "/v1/audit?limit=x", {}),
    ("audit-after-not-int", "GET", "/v1/audit?after=yesterday", {}),
    ("serial-not-hex", "GET", "/v1/certificates/not-a-serial", {}),
    # Found with schemathesis (issue 10); the first four were 500s.
    ("audit-after-beyond-bigint", "GET", "/v1/audit?after=" + "9" * 20, {}),
    ("messages-after-beyond-bigint", "GET",
     "/v1/devices/{device_id}/messages?after=" + "9" * 20, {}),
    ("json-nested-too-deep", "POST", "/v1/device-types",
     {"content": b'{"name": "bad-10", "message_types": ' + b"[" * 100_000 + b"]" * 100_000
      + b"}", "headers": JSON}),
    ("unpaired-surrogate", "POST", "/v1/device-types",
     {"content": b'{"name": "bad-11", "description": "\\udc00"}', "headers": JSON}),
    ("audit-order-unknown", "GET", "/v1/audit?order=sideways", {}),
    ("nan-is-not-json", "POST", "/v1/devices/{device_id}/commands",
     {"content": b'{"name": "bad-12", "ttl_seconds": NaN}', "headers": JSON}),
    ("serial-with-sign", "GET", "/v1/certificates/+1f", {}),
    # U+0000: PostgreSQL text cannot hold it (500s there; test_hardening_api has the run).
    ("nul-in-query", "GET", "/v1/devices?owner=a%00b", {}),
    ("nul-in-path", "GET", "/v1/devices/a%00b", {}),
    ("nul-in-body", "POST", "/v1/devices", {"json": {"id": "bad-13", "type": "default",
                                                     "owner": "a\x00b"}}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"),
                         [pytest.param(m, p, k, id=case) for case, m, p, k in BAD_REQUESTS])
def test_bad_request_is_400_with_a_specific_hint(server: RunningServer, target: Target,
                                                 method: str, path: str,
                                                 kwargs: dict[str, Any]) -> None:
    path = path.format(device_id=target.device_id, serial=target.serial)
    with server.admin() as admin:
        before = snapshot(admin, target)
        response = admin.request(method, path, **kwargs)
        after = snapshot(admin, target)
    problem = assert_problem(response, 400)
    assert problem["hint"] != GENERIC_400_HINT, problem
    assert problem["instance"] == path.split("?")[0]
    assert after == before


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/no-such-route", 404),
    ("GET", "/v1/devices/no-such-device", 404),
    ("PUT", "/v1/devices", 405),
    ("DELETE", "/v1/devices", 405),
])
def test_routing_errors_are_problem_documents(server: RunningServer, method: str, path: str,
                                              status: int) -> None:
    with server.admin() as admin:
        assert_problem(admin.request(method, path), status)


def test_oversized_body_is_refused(server: RunningServer) -> None:
    with server.admin() as admin:
        response = admin.post("/v1/devices", content=b'{"id": "' + b"a" * (2 * 1024 * 1024)
                              + b'"}', headers=JSON)
    assert_problem(response, 413)


# --- paging and filters -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(server: RunningServer) -> dict[str, Any]:
    """Seven devices of one owner: types and states mixed, interleaved with others' ids."""
    tag = secrets.token_hex(3)
    owner, kind = f"pager-{tag}", f"pager-type-{tag}"
    layout = {f"pg-{tag}-{i}": (kind if i % 2 else "default", i < 3) for i in range(7)}
    with server.admin() as admin:
        assert admin.post("/v1/device-types", json={"name": kind}).status_code == 201
        for device_id, (type_name, active) in layout.items():
            assert admin.post("/v1/devices", json={"id": device_id, "type": type_name,
                                                   "owner": owner}).status_code == 201
            # Another owner's device sorts between ours, so a filter that leaks shows up.
            assert admin.post("/v1/devices", json={"id": f"{device_id}-x", "type": type_name,
                                                   "owner": f"other-{tag}"}).status_code == 201
            if active:
                assert admin.post(f"/v1/devices/{device_id}/state",
                                  json={"state": "active"}).status_code == 200
    return {"owner": owner, "type": kind, "layout": layout}


def walk(admin: httpx.Client, **params: Any) -> Iterator[list[dict[str, Any]]]:
    after = None
    for _ in range(10_000):
        query = {**params, "limit": 2, **({"after": after} if after else {})}
        response = admin.get("/v1/devices", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= 2
        yield page["items"]
        if page["next"] is None:
            return
        assert page["next"] == page["items"][-1]["id"]
        after = page["next"]
    pytest.fail("paging did not terminate")


def test_paging_walks_every_device_exactly_once(server: RunningServer,
                                                fleet: dict[str, Any]) -> None:
    with server.admin() as admin:
        walked = [d["id"] for page in walk(admin) for d in page]
        everything = [d["id"] for d in admin.get("/v1/devices", params={"limit": 1000}
                                                 ).json()["items"]]
    assert len(everything) > 14  # more than two pages' worth, and not all of them ours
    assert walked == everything == sorted(set(everything))


@pytest.mark.parametrize(("case", "params", "expect"), [
    ("owner", lambda f: {"owner": f["owner"]}, lambda ids, f: ids),
    ("type", lambda f: {"type": f["type"]},
     lambda ids, f: [i for i in ids if f["layout"][i][0] == f["type"]]
     + [f"{i}-x" for i in ids if f["layout"][i][0] == f["type"]]),
    ("state-active-owner", lambda f: {"state": "active", "owner": f["owner"]},
     lambda ids, f: [i for i in ids if f["layout"][i][1]]),
    ("state-registered-type-owner",
     lambda f: {"state": "registered", "type": f["type"], "owner": f["owner"]},
     lambda ids, f: [i for i in ids if f["layout"][i] == (f["type"], False)]),
    ("owner-nobody", lambda f: {"owner": "nobody-owns-this"}, lambda ids, f: []),
])
def test_filters_select_exactly_the_matching_devices(
        server: RunningServer, fleet: dict[str, Any], case: str,
        params: Callable[[dict[str, Any]], dict[str, str]],
        expect: Callable[[list[str], dict[str, Any]], list[str]]) -> None:
    ours = sorted(fleet["layout"])
    with server.admin() as admin:
        paged = [d for page in walk(admin, **params(fleet)) for d in page]
    wanted = sorted(expect(ours, fleet))
    assert [d["id"] for d in paged] == wanted
    for key, value in params(fleet).items():
        assert all(d[key] == value for d in paged), case


# --- OpenAPI ----------------------------------------------------------------------------


def test_openapi_document_lists_every_route_with_its_method(server: RunningServer) -> None:
    with bare_client(server) as anonymous:
        response = anonymous.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert spec == openapi_document()
    assert spec["openapi"] == "3.1.0"
    assert spec["info"]["title"] and spec["info"]["version"]
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http",
                                                               "scheme": "bearer"}
    # Copies of a templated path's operations on a concrete path it also matches
    # (GET /v1/policies/test shows the policy "test") say which path they copy.
    documented = {(path, method.upper()) for path, ops in spec["paths"].items()
                  for method, op in ops.items() if "x-fleetward-same-as" not in op}
    assert documented == {(r.path, r.method) for r in ROUTES}
    operation_ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))
    for route in ROUTES:
        op = spec["paths"][route.path][route.method.lower()]
        if route.role is None:
            assert op["security"] == []
        else:
            assert "security" not in op  # inherits the bearer requirement
            assert op["x-fleetward-role"] == route.role.value
        path_params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert path_params == set(re.findall(r"\{(\w+)\}", route.path))
        assert all(p["required"] for p in op.get("parameters", []) if p["in"] == "path")
        assert ("requestBody" in op) == (route.body is not None)
        # Explicit statuses only (test_openapi_schemathesis.py checks them against the
        # server); every error is a problem document.
        assert "default" not in op["responses"]
        assert op["responses"]["5XX"]["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    assert "Problem" in spec["components"]["schemas"]


@pytest.mark.parametrize("route", [pytest.param(r, id=route_id(r)) for r in ROUTES])
def test_every_documented_route_is_served(server: RunningServer, target: Target,
                                          route: Route) -> None:
    """Without a token: public routes answer, protected ones say 401 (not 404/405)."""
    path, _ = plausible_request(route, target)
    with bare_client(server) as anonymous:
        response = anonymous.request(route.method, path)
    if route.role is None:
        assert response.status_code == 200, response.text
    else:
        assert_problem(response, 401)
