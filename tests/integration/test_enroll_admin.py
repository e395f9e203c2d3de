"""The operator side of enrollment, against a real server: bootstrap tokens, device types'
enrollment profiles, OEM CAs that need approval, and approving or rejecting devices that
enrolled with a manufacturer certificate.

Every token made here is used for real (EST over the device listener), so a test cannot
pass with a token that would not enroll anything.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer
from tests.integration.enroll_helpers import (
    csr_der,
    enroll_with_idevid,
    est_enroll,
    make_oem_ca,
)
from tests.integration.test_cli import assert_clean_failure, flat

NEW_WRITE_ROUTES = [
    ("POST", "/v1/devices/{device_id}/bootstrap-tokens", {"ttl_hours": 1}),
    ("POST", "/v1/bootstrap-tokens", {"type": "default", "count": 2}),
    ("DELETE", "/v1/bootstrap-tokens/{token_id}", None),
    ("POST", "/v1/enrollments/{device_id}/approve", None),
    ("POST", "/v1/enrollments/{device_id}/reject", None),
    ("POST", "/v1/factory/tokens", {"type": "default", "count": 1}),
    ("POST", "/v1/factory/sign", {"type": "default", "device_id": "x", "csr_pem": "x"}),
]


def new_id(prefix: str = "enr") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def register(server: RunningServer, device_id: str, device_type: str = "default") -> None:
    with server.admin() as admin:
        response = admin.post("/v1/devices", json={"id": device_id, "type": device_type})
    assert response.status_code == 201, response.text


def audit(server: RunningServer, action: str) -> list[dict[str, Any]]:
    with server.admin() as admin:
        response = admin.get("/v1/audit", params={"action": action, "order": "desc",
                                                  "limit": 1000})
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def device(server: RunningServer, device_id: str) -> httpx.Response:
    with server.admin() as admin:
        return admin.get(f"/v1/devices/{device_id}")


def admin_name(server: RunningServer) -> str:
    with server.admin() as admin:
        return str(admin.get("/v1/whoami").json()["name"])


def make_token(server: RunningServer, role: str) -> str:
    with server.admin() as admin:
        response = admin.post("/v1/operators", json={"name": new_id(role), "role": role})
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


# --- bootstrap tokens ------------------------------------------------------------------


def test_device_token_is_printed_once_and_enrolls_only_its_device(
        server: RunningServer) -> None:
    device_id = new_id()
    register(server, device_id)
    result = server.cli("token", "create", "--device", device_id, "--ttl-hours", "2")
    token = result.stdout.strip()
    assert token.startswith("fwb_") and "\n" not in token  # stdout: the token alone
    assert "shown only once" in flat(result.stderr)
    assert f"for device {device_id}" in flat(result.stderr)
    # Negative control first: the token is bound to its device, not to whoever holds it.
    other = new_id()
    register(server, other)
    refused = est_enroll(server, csr_der(other), basic=(other, token))
    assert refused.status_code == 401, refused.text
    enrolled = est_enroll(server, csr_der(device_id), basic=(device_id, token))
    assert enrolled.status_code == 200, enrolled.text
    assert device(server, device_id).json()["state"] == "active"
    again = est_enroll(server, csr_der(device_id), basic=(device_id, token))
    assert again.status_code == 401, "a single-use token enrolled twice"


def test_batch_token_json_registers_new_devices_up_to_its_count(
        server: RunningServer) -> None:
    owner = new_id("owner")
    result = server.cli("token", "create", "--type", "default", "--count", "2", "--owner",
                        owner, "--json")
    created = json.loads(result.stdout)
    assert "shown only once" in flat(result.stderr)
    assert created.keys() >= {"token", "token_id", "expires_at", "max_uses", "device_type"}
    assert (created["max_uses"], created["device_type"], created["owner"]) == (2, "default",
                                                                              owner)
    first, second, third = new_id(), new_id(), new_id()
    for device_id in (first, second):
        response = est_enroll(server, csr_der(device_id),
                              basic=(device_id, created["token"]))
        assert response.status_code == 200, response.text
        shown = device(server, device_id).json()
        assert (shown["owner"], shown["state"]) == (owner, "active")
    used_up = est_enroll(server, csr_der(third), basic=(third, created["token"]))
    assert used_up.status_code == 401, used_up.text
    assert device(server, third).status_code == 404


def test_revoked_token_enrolls_nothing_and_its_id_is_audited(server: RunningServer) -> None:
    device_id = new_id()
    register(server, device_id)
    with server.admin() as admin:
        response = admin.post(f"/v1/devices/{device_id}/bootstrap-tokens", json={})
    assert response.status_code == 201, response.text
    created = response.json()
    result = server.cli("token", "revoke", created["token_id"])
    assert f"bootstrap token {created['token_id']} revoked" in flat(result.stdout)
    refused = est_enroll(server, csr_der(device_id), basic=(device_id, created["token"]))
    assert refused.status_code == 401, refused.text
    assert device(server, device_id).json()["state"] == "registered"
    [event] = [e for e in audit(server, "bootstrap.token_revoked")
               if e["target"] == f"token:{created['token_id']}"]
    assert event["actor"] == f"operator:{admin_name(server)}"
    refusals = [e for e in audit(server, "enroll.refused")
                if e["details"].get("token_id") == created["token_id"]]
    assert refusals and "revoked" in refusals[0]["details"]["reason"]
    # Revoking twice is an error with a hint, not a silent success.
    assert_clean_failure(server.cli("token", "revoke", created["token_id"], check=False),
                         "no active bootstrap token")


def test_device_token_defaults_to_72_hours_and_single_use(server: RunningServer) -> None:
    device_id = new_id()
    register(server, device_id)
    with server.admin() as admin:
        response = admin.post(f"/v1/devices/{device_id}/bootstrap-tokens", json={})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body.keys() == {"token", "token_id", "device_id", "expires_at", "max_uses"}
    assert (body["device_id"], body["max_uses"]) == (device_id, 1)
    assert body["token"].startswith(f"fwb_{body['token_id']}.")
    lifetime = dt.datetime.fromisoformat(body["expires_at"]) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=71, minutes=55) < lifetime <= dt.timedelta(hours=72)


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/v1/devices/{known}/bootstrap-tokens", {"ttl_hours": 0}, 400, "between 1 and 2160"),
    ("/v1/devices/{known}/bootstrap-tokens", {"ttl_hours": 2161}, 400, "between 1 and 2160"),
    ("/v1/devices/{known}/bootstrap-tokens", {"ttl_hours": "72"}, 400, "must be an integer"),
    ("/v1/devices/{known}/bootstrap-tokens", {"ttl_hours": True}, 400, "must be an integer"),
    ("/v1/devices/{known}/bootstrap-tokens", {"max_uses": 5}, 400, "max_uses"),
    ("/v1/devices/{unknown}/bootstrap-tokens", {}, 404, "does not exist"),
    ("/v1/bootstrap-tokens", {"type": "default"}, 400, "missing field 'count'"),
    ("/v1/bootstrap-tokens", {"type": "default", "count": 0}, 400, "between 1 and"),
    ("/v1/bootstrap-tokens", {"type": "no-such-type", "count": 3}, 404, "does not exist"),
    ("/v1/bootstrap-tokens", {"type": "default", "count": 3, "owner": ""}, 400, "owner"),
])
def test_token_requests_are_validated(server: RunningServer, path: str, body: dict[str, Any],
                                      status: int, needle: str) -> None:
    known = new_id()
    register(server, known)
    with server.admin() as admin:
        before = len(audit(server, "bootstrap.token_created"))
        response = admin.post(path.format(known=known, unknown=new_id()), json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"]
    assert response.json()["hint"]
    assert len(audit(server, "bootstrap.token_created")) == before


@pytest.mark.parametrize("token_id", ["../../operators/0123456789abcdef", "fwb_x.y", ""])
def test_token_revoke_takes_only_a_token_id(server: RunningServer, token_id: str) -> None:
    assert_clean_failure(server.cli("token", "revoke", token_id, check=False),
                         "invalid bootstrap token id")


@pytest.mark.parametrize(("args", "needle"), [
    ([], "either --device ID or --type T"),
    (["--device", "d1", "--type", "default"], "either --device ID or --type T"),
    (["--type", "default"], "--type needs --count"),
    (["--device", "d1", "--count", "3"], "--count and --owner go with --type"),
    (["--device", "../admin"], "invalid device id"),
])
def test_token_create_cli_refuses_unclear_requests(server: RunningServer, args: list[str],
                                                   needle: str) -> None:
    assert_clean_failure(server.cli("token", "create", *args, check=False), needle)


def test_tokens_are_only_in_the_response(server: RunningServer) -> None:
    """Neither the audit log nor the database files hold a bootstrap token's secret."""
    device_id = new_id()
    register(server, device_id)
    with server.admin() as admin:
        made = [admin.post(f"/v1/devices/{device_id}/bootstrap-tokens", json={}).json(),
                admin.post("/v1/bootstrap-tokens", json={"type": "default", "count": 5}).json()]
        audit_text = admin.get("/v1/audit", params={"limit": 1000, "order": "desc"}).text
    raw = b"".join(f.read_bytes() for f in sorted(server.data_dir.glob("fleetward.db*")))
    for created in made:
        secret = created["token"].partition(".")[2]
        assert len(secret) >= 40
        assert secret not in audit_text
        assert secret.encode() not in raw and created["token"].encode() not in raw
        # Negative control: the same search finds what is stored (the token id).
        assert created["token_id"] in audit_text
        assert created["token_id"].encode() in raw


# --- roles -------------------------------------------------------------------------------


def test_auditor_can_list_enrollments_but_not_write(server: RunningServer) -> None:
    auditor = make_token(server, "auditor")
    device_id = new_id()
    register(server, device_id)
    with server.admin() as admin:
        token_id = admin.post(f"/v1/devices/{device_id}/bootstrap-tokens", json={}
                              ).json()["token_id"]
    with server.admin(auditor) as caller:
        listed = caller.get("/v1/enrollments", params={"approval": "pending"})
        assert listed.status_code == 200, listed.text
        for method, path, body in NEW_WRITE_ROUTES:
            url = path.format(device_id=device_id, token_id=token_id)
            response = caller.request(method, url, json=body)
            assert response.status_code == 403, (method, path, response.text)
    # The refused revocation changed nothing: the token is still active.
    with server.admin() as admin:
        assert admin.delete(f"/v1/bootstrap-tokens/{token_id}").status_code == 204
    assert device(server, device_id).json()["state"] == "registered"


def test_operator_role_is_enough_for_tokens_and_factory(server: RunningServer) -> None:
    operator = make_token(server, "operator")
    device_id = new_id()
    register(server, device_id)
    with server.admin(operator) as caller:
        token = caller.post(f"/v1/devices/{device_id}/bootstrap-tokens", json={})
        batch = caller.post("/v1/bootstrap-tokens", json={"type": "default", "count": 2})
        factory = caller.post("/v1/factory/tokens", json={"type": "default", "count": 1})
        assert (token.status_code, batch.status_code, factory.status_code) == (201, 201, 201)
        revoked = caller.delete(f"/v1/bootstrap-tokens/{token.json()['token_id']}")
        assert revoked.status_code == 204, revoked.text


# --- device types and OEM CAs ---------------------------------------------------------


def test_type_add_with_enrollment_profiles(server: RunningServer) -> None:
    name = f"gw-{secrets.token_hex(3)}"
    added = server.cli("type", "add", name, "--profile", "device", "--profile", "gateway")
    assert "enrollment profiles: device, gateway" in flat(added.stdout)
    row = next(line for line in server.cli("type", "list").stdout.splitlines()
               if name in line)
    assert "device, gateway" in row
    listed = {t["name"]: t for t in json.loads(server.cli("type", "list", "--json").stdout)}
    assert listed[name]["enrollment_profiles"] == ["device", "gateway"]
    assert listed["default"]["enrollment_profiles"] == ["device"]


@pytest.mark.parametrize("profile", ["server", "ca", "no-such-profile"])
def test_type_add_refuses_profiles_devices_cannot_have(server: RunningServer,
                                                       profile: str) -> None:
    name = f"bad-{secrets.token_hex(3)}"
    assert_clean_failure(server.cli("type", "add", name, "--profile", profile, check=False),
                         "is not a device certificate profile")
    with server.admin() as admin:
        names = {t["name"] for t in admin.get("/v1/device-types").json()["items"]}
    assert name not in names


def test_oem_ca_approval_flag_is_stored_and_shown(server: RunningServer,
                                                  tmp_path: Path) -> None:
    strict, lenient = f"oem-strict-{secrets.token_hex(3)}", f"oem-auto-{secrets.token_hex(3)}"
    for name, flags in ((strict, ["--require-approval"]), (lenient, [])):
        cert = tmp_path / f"{name}.pem"
        cert.write_text(make_oem_ca(name).pem)
        result = server.cli("ca", "add-oem", name, "--cert", str(cert), "--device-type",
                            "default", *flags)
        assert ("wait for approval" in flat(result.stdout)) == bool(flags)
    shown = {c["name"]: c for c in json.loads(server.cli("ca", "show", "--json").stdout)}
    assert shown[strict]["require_approval"] is True
    assert shown[lenient]["require_approval"] is False
    assert shown["issuing"]["require_approval"] is None  # not an OEM CA
    table = server.cli("ca", "show", env={**server.env(), "COLUMNS": "300"}).stdout
    assert "required" in next(line for line in table.splitlines() if strict in line)
    assert "automatic" in next(line for line in table.splitlines() if lenient in line)
    with server.admin() as admin:
        wrong = admin.post("/v1/ca/oem", json={"name": f"oem-x-{secrets.token_hex(3)}",
                                               "certificate": make_oem_ca("x").pem,
                                               "device_type": "default",
                                               "require_approval": "yes"})
    assert wrong.status_code == 400 and "true or false" in wrong.json()["detail"]


# --- approvals -----------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["approve", "reject"])
def test_deciding_an_enrollment_that_does_not_exist_is_a_clear_error(
        server: RunningServer, verb: str) -> None:
    registered = new_id()
    register(server, registered)  # registered by hand: no manufacturer certificate
    for device_id in (registered, new_id()):
        assert_clean_failure(server.cli("enroll", verb, device_id, check=False),
                             f"no manufacturer-certificate enrollment for '{device_id}'",
                             "fleetward enroll pending")
    assert device(server, registered).json()["state"] == "registered"


def test_listing_enrollments_validates_its_query(server: RunningServer) -> None:
    with server.admin() as admin:
        bad_state = admin.get("/v1/enrollments", params={"approval": "maybe"})
        bad_limit = admin.get("/v1/enrollments", params={"limit": "0"})
        everything = admin.get("/v1/enrollments")
    assert bad_state.status_code == 400 and "unknown approval state" in bad_state.json()[
        "detail"]
    assert bad_limit.status_code == 400
    assert everything.status_code == 200 and isinstance(everything.json()["items"], list)


def _pending_ids(server: RunningServer) -> set[str]:
    result = server.cli("enroll", "pending", "--json")
    return {b["device_id"] for b in json.loads(result.stdout)}


def test_approve_and_reject_manufacturer_certificate_enrollments(
        server: RunningServer, tmp_path: Path) -> None:
    oem = make_oem_ca(f"Approval OEM {secrets.token_hex(3)}")
    ca_file = tmp_path / "oem.pem"
    ca_file.write_text(oem.pem)
    server.cli("ca", "add-oem", f"oem-appr-{secrets.token_hex(3)}", "--cert", str(ca_file),
               "--device-type", "default", "--require-approval")
    keep, refuse = new_id("unit"), new_id("unit")
    idevids = {d: oem.idevid(tmp_path, d) for d in (keep, refuse)}

    for device_id, idevid in idevids.items():
        waiting = enroll_with_idevid(server, idevid, csr_der(device_id))
        assert waiting.status_code == 202, waiting.text  # RFC 7030 §4.2.3
        assert int(waiting.headers["Retry-After"]) > 0
    assert {keep, refuse} <= _pending_ids(server)
    table = server.cli("enroll", "pending").stdout
    assert keep in table and refuse in table

    approved = server.cli("enroll", "approve", keep)
    assert f"enrollment of {keep} approved" in flat(approved.stdout)
    rejected = server.cli("enroll", "reject", refuse)
    assert f"enrollment of {refuse} rejected" in flat(rejected.stdout)
    assert not {keep, refuse} & _pending_ids(server)

    # The decisions take effect on the devices' next attempts.
    issued = enroll_with_idevid(server, idevids[keep], csr_der(keep))
    assert issued.status_code == 200, issued.text
    assert device(server, keep).json()["state"] == "active"
    refused = enroll_with_idevid(server, idevids[refuse], csr_der(refuse))
    assert refused.status_code == 403, refused.text
    assert device(server, refuse).json()["state"] == "registered"

    # Decisions are final, and say so.
    for verb, device_id in (("approve", refuse), ("reject", keep), ("approve", keep)):
        assert_clean_failure(server.cli("enroll", verb, device_id, check=False),
                             "not pending", "decisions are final")
    with server.admin() as admin:
        decided = {b["device_id"]: b for b in admin.get(
            "/v1/enrollments", params={"limit": 1000}).json()["items"]}
    assert (decided[keep]["approval"], decided[refuse]["approval"]) == ("approved", "rejected")
    assert decided[keep]["decided_by"] == f"operator:{admin_name(server)}"
    actions = {(e["action"], e["target"]) for name in ("enroll.approved", "enroll.rejected")
               for e in audit(server, name)}
    assert {("enroll.approved", f"device:{keep}"),
            ("enroll.rejected", f"device:{refuse}")} <= actions


def test_nothing_pending_is_said_plainly(server: RunningServer) -> None:
    """Runs after the approval test in this module, which decides everything it created."""
    pending = _pending_ids(server)
    result = server.cli("enroll", "pending")
    if pending:  # another module's leftovers on a shared server: still a table, not an error
        assert all(p in result.stdout for p in pending)
    else:
        assert flat(result.stdout) == "no enrollments are waiting for approval"
        assert json.loads(server.cli("enroll", "pending", "--json").stdout) == []


def test_database_holds_the_decisions(server: RunningServer) -> None:
    """Negative control for the CLI: the rows it reported are the rows stored."""
    conn = sqlite3.connect(f"file:{server.data_dir / 'fleetward.db'}?mode=ro", uri=True)
    try:
        rows = dict(conn.execute("SELECT device_id, approval FROM oem_bindings").fetchall())
    finally:
        conn.close()
    with server.admin() as admin:
        items = admin.get("/v1/enrollments", params={"limit": 1000}).json()["items"]
    assert {b["device_id"]: b["approval"] for b in items} == rows
