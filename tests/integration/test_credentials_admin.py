"""Device credentials, API keys and access tokens through the admin API and the CLI,
against one real ``fleetward serve`` (docs/credentials.md).

Threats, each a case below:

- a key shown twice: retrievable after its one answer (``credential show``, a list, the
  audit log), cached on the way (no ``Cache-Control: no-store``), or left behind in the
  server's log file or the database files;
- a role doing what it may not: an auditor adding, rotating or revoking credentials or
  tokens; an operator minting API keys (which read every device's tokens) or rotating
  the token signing key;
- a revocation that does not take: a token refused by jti, or every token of a device,
  still inspected as valid; a revoked API key still introspecting; a rotated key's
  previous secret working after its grace, or not during it;
- ``fleetward token create --device X --quiet`` (README, existing scripts) broken by the
  rename to ``bootstrap-token``, or ``token`` and ``access-token`` confusable in the help;
- ``access-token inspect`` exiting 0 for a token that is not valid.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.conftest import FLEETWARD, RunningServer
from tests.integration.test_cli import assert_clean_failure

B64_KEY = re.compile(r"[A-Za-z0-9+/]{43}=")
API_KEY = re.compile(r"fwk_([0-9a-f]{16})\.[A-Za-z0-9_-]{43}")
JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


# --- helpers ---------------------------------------------------------------------------------


@dataclass
class Shown:
    """Every secret the server showed in this module, to look for where it must not be."""

    secrets: list[str] = field(default_factory=list)

    def add(self, *values: str) -> None:
        self.secrets.extend(values)


@dataclass
class Roles:
    auditor: str
    operator: str


@pytest.fixture(scope="module")
def shown() -> Shown:
    return Shown()


@pytest.fixture(scope="module")
def roles(server: RunningServer) -> Roles:
    made = {}
    with server.admin() as admin:
        for role in ("auditor", "operator"):
            response = admin.post("/v1/operators", json={"name": f"cred-{role}", "role": role})
            assert response.status_code == 201, response.text
            made[role] = response.json()["token"]
    return Roles(made["auditor"], made["operator"])


def new_id(prefix: str = "cred") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def csr_for(device_id: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    return (x509.CertificateSigningRequestBuilder().subject_name(name)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())


def register(admin: httpx.Client, *, certificate: bool = False) -> tuple[str, str | None]:
    """A new device; with ``certificate`` it gets one and becomes active. Returns its id
    and the certificate's PEM."""
    device_id = new_id()
    assert admin.post("/v1/devices", json={"id": device_id, "type": "default"}
                      ).status_code == 201
    if not certificate:
        return device_id, None
    issued = admin.post(f"/v1/devices/{device_id}/certificates",
                        json={"csr": csr_for(device_id)})
    assert issued.status_code == 201, issued.text
    return device_id, str(issued.json()["pem"])


def public_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo
                                         ).decode()


def rfc7638_thumbprint(key: ec.EllipticCurvePrivateKey) -> str:
    numbers = key.public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()
    canonical = json.dumps({"crv": "P-256", "kty": "EC", "x": b64(numbers.x),
                            "y": b64(numbers.y)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()
                                    ).rstrip(b"=").decode()


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["hint"], body
    return body


def no_store(response: httpx.Response) -> None:
    assert response.headers.get("cache-control") == "no-store", response.headers


def introspect(server: RunningServer, api_key: str, token: str) -> httpx.Response:
    with httpx.Client(verify=server.tls(), timeout=30) as client:
        return client.post(f"https://localhost:{server.device_port}/oauth2/introspect",
                           data={"token": token},
                           headers={"Authorization": f"Bearer {api_key}"})


def wide(server: RunningServer) -> dict[str, str]:
    """A terminal wide enough that no table cell folds."""
    return {**server.env(), "COLUMNS": "300"}


def cli_json(server: RunningServer, *args: str) -> Any:
    return json.loads(server.cli(*args, "--json").stdout)


# --- device symmetric keys -------------------------------------------------------------------


def test_symmetric_keys_are_shown_once_and_rotate_one_slot_at_a_time(
        server: RunningServer, roles: Roles, shown: Shown) -> None:
    with server.admin() as admin, server.admin(roles.operator) as op, \
            server.admin(roles.auditor) as auditor:
        device_id, _ = register(admin)
        created = op.post(f"/v1/devices/{device_id}/credentials",
                          json={"kind": "symmetric_key"})
        assert created.status_code == 201, created.text
        no_store(created)
        body = created.json()
        primary, secondary = body["primary_key"], body["secondary_key"]
        shown.add(primary, secondary)
        assert B64_KEY.fullmatch(primary) and B64_KEY.fullmatch(secondary)
        assert len(base64.b64decode(primary)) == 32 and primary != secondary
        credential_id = body["id"]
        assert re.fullmatch(r"sk_[0-9a-f]{16}", credential_id)
        assert (body["kind"], body["status"], body["primary_version"],
                body["secondary_version"]) == ("symmetric_key", "active", 1, 1)

        # One live symmetric credential per device: the hint says to rotate instead.
        again = problem(op.post(f"/v1/devices/{device_id}/credentials",
                                json={"kind": "symmetric_key"}), 409)
        assert credential_id in again["detail"]

        # Never retrievable again: not by id, not in the list (an auditor reads both).
        one = auditor.get(f"/v1/credentials/{credential_id}")
        listed = auditor.get(f"/v1/devices/{device_id}/credentials")
        assert one.status_code == listed.status_code == 200
        assert listed.json()["items"] == [one.json()]
        assert "primary_key" not in one.json() and primary not in one.text + listed.text

        rotated = op.post(f"/v1/credentials/{credential_id}/rotate",
                          json={"slot": "secondary"})
        assert rotated.status_code == 200, rotated.text
        no_store(rotated)
        new = rotated.json()
        shown.add(new["key"])
        assert (new["id"], new["slot"], new["version"]) == (credential_id, "secondary", 2)
        assert new["key"] not in (primary, secondary) and B64_KEY.fullmatch(new["key"])
        after = auditor.get(f"/v1/credentials/{credential_id}").json()
        assert (after["primary_version"], after["secondary_version"]) == (1, 2)
        assert after["rotated_at"] is not None

        for bad_body in ({"slot": "tertiary"}, {}, {"slot": "primary", "grace": 1}):
            problem(op.post(f"/v1/credentials/{credential_id}/rotate", json=bad_body), 400)

        revoked = op.delete(f"/v1/credentials/{credential_id}")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["status"] == "revoked" and revoked.json()["revoked_at"]
        # Gone by id (HTTP DELETE); kept in the device's list, marked revoked.
        gone = problem(auditor.get(f"/v1/credentials/{credential_id}"), 404)
        assert gone["revoked_at"] == revoked.json()["revoked_at"]
        assert auditor.get(f"/v1/devices/{device_id}/credentials").json()["items"] == [
            revoked.json()]
        problem(op.delete(f"/v1/credentials/{credential_id}"), 409)
        problem(op.post(f"/v1/credentials/{credential_id}/rotate",
                        json={"slot": "primary"}), 409)
        # Revoked, a new credential may be added (negative control of the 409 above).
        replacement = op.post(f"/v1/devices/{device_id}/credentials",
                              json={"kind": "symmetric_key"})
        assert replacement.status_code == 201, replacement.text
        shown.add(replacement.json()["primary_key"], replacement.json()["secondary_key"])

        missing = "sk_" + "0" * 16
        problem(auditor.get(f"/v1/credentials/{missing}"), 404)
        problem(op.delete(f"/v1/credentials/{missing}"), 404)
        problem(auditor.get("/v1/credentials/sk_nothex"), 400)
        problem(auditor.get("/v1/devices/no-such-device/credentials"), 404)
        problem(op.post("/v1/devices/no-such-device/credentials",
                        json={"kind": "symmetric_key"}), 404)
        for bad_body in ({"kind": "password"}, {"kind": "symmetric_key", "public_key": "x"},
                         {}, {"kind": 1}):
            problem(op.post(f"/v1/devices/{device_id}/credentials", json=bad_body), 400)


def test_public_keys_register_once_per_fleet_and_cannot_be_rotated(
        server: RunningServer, roles: Roles) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with server.admin() as admin, server.admin(roles.operator) as op:
        device_id, _ = register(admin)
        other, _ = register(admin)
        created = op.post(f"/v1/devices/{device_id}/credentials",
                          json={"kind": "public_key", "public_key": public_pem(key)})
        assert created.status_code == 201, created.text
        info = created.json()
        assert re.fullmatch(r"pk_[0-9a-f]{16}", info["id"])
        assert info["jkt"] == rfc7638_thumbprint(key)
        assert info["primary_version"] is None and "primary_key" not in info

        # A key pair identifies one device: not twice here, not on another device.
        problem(op.post(f"/v1/devices/{device_id}/credentials",
                        json={"kind": "public_key", "public_key": public_pem(key)}), 409)
        problem(op.post(f"/v1/devices/{other}/credentials",
                        json={"kind": "public_key", "public_key": public_pem(key)}), 409)
        # Public keys have no slots: the path's schema excludes pk_ ids.
        problem(op.post(f"/v1/credentials/{info['id']}/rotate", json={"slot": "primary"}),
                400)
        for bad in ("not a key", public_pem(rsa.generate_private_key(65537, 2048)),
                    public_pem(ec.generate_private_key(ec.SECP384R1()))):
            problem(op.post(f"/v1/devices/{other}/credentials",
                            json={"kind": "public_key", "public_key": bad}), 400)
        problem(op.post(f"/v1/devices/{other}/credentials", json={"kind": "public_key"}), 400)

        # At most four live keys per device (each is a candidate for every assertion).
        for _ in range(3):
            assert op.post(f"/v1/devices/{device_id}/credentials", json={
                "kind": "public_key",
                "public_key": public_pem(ec.generate_private_key(ec.SECP256R1()))}
                ).status_code == 201
        problem(op.post(f"/v1/devices/{device_id}/credentials", json={
            "kind": "public_key",
            "public_key": public_pem(ec.generate_private_key(ec.SECP256R1()))}), 422)

        # A retired device gets no new key material.
        assert admin.post(f"/v1/devices/{other}/state", json={"state": "retired"}
                          ).status_code == 200
        problem(op.post(f"/v1/devices/{other}/credentials", json={"kind": "symmetric_key"}),
                422)


# --- API keys -------------------------------------------------------------------------------


def test_api_keys_introspect_until_revoked_and_rotate_with_a_grace_period(
        server: RunningServer, roles: Roles, shown: Shown) -> None:
    with server.admin() as admin, server.admin(roles.auditor) as auditor:
        device_id, _ = register(admin, certificate=True)
        issued = admin.post("/v1/access-tokens", json={"device_id": device_id})
        assert issued.status_code == 201, issued.text
        token = issued.json()["access_token"]
        shown.add(token)

        created = admin.post("/v1/api-keys", json={
            "name": "gateway introspection", "scopes": ["tokens:introspect"],
            "ttl_hours": 24})
        assert created.status_code == 201, created.text
        no_store(created)
        first = created.json()["key"]
        shown.add(first.partition(".")[2])
        match = API_KEY.fullmatch(first)
        assert match is not None
        key_id = match.group(1)
        assert created.json()["id"] == key_id and created.json()["expires_at"]

        seen = auditor.get(f"/v1/api-keys/{key_id}")
        listed = auditor.get("/v1/api-keys")
        assert seen.status_code == listed.status_code == 200
        assert seen.json() in listed.json()["items"] and "key" not in seen.json()
        assert first.partition(".")[2] not in seen.text + listed.text

        answer = introspect(server, first, token)
        assert answer.status_code == 200, answer.text
        assert answer.json()["active"] is True and answer.json()["sub"] == device_id

        rotated = admin.post(f"/v1/api-keys/{key_id}/rotate", json={"grace_seconds": 600})
        assert rotated.status_code == 200, rotated.text
        no_store(rotated)
        second = rotated.json()["key"]
        shown.add(second.partition(".")[2])
        assert second != first and second.startswith(f"fwk_{key_id}.")
        assert rotated.json()["previous_valid_until"]
        # Both secrets work during the grace period ...
        assert introspect(server, first, token).json()["active"] is True
        assert introspect(server, second, token).json()["active"] is True
        # ... and a rotation without grace ends the previous one at once (a leaked key).
        third = admin.post(f"/v1/api-keys/{key_id}/rotate", json={}).json()["key"]
        shown.add(third.partition(".")[2])
        assert introspect(server, second, token).status_code == 401
        assert introspect(server, third, token).status_code == 200

        revoked = admin.delete(f"/v1/api-keys/{key_id}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"], revoked.text
        assert introspect(server, third, token).status_code == 401
        problem(auditor.get(f"/v1/api-keys/{key_id}"), 404)
        assert revoked.json() in auditor.get("/v1/api-keys").json()["items"]
        problem(admin.delete(f"/v1/api-keys/{key_id}"), 409)
        problem(admin.post(f"/v1/api-keys/{key_id}/rotate", json={}), 409)

        for bad_body in ({"name": "x", "scopes": ["tokens:write"]},
                         {"name": "x", "scopes": []},
                         {"name": "bell\x07", "scopes": ["tokens:introspect"]},
                         {"name": "x", "scopes": ["tokens:introspect"], "ttl_hours": 0},
                         {"name": "x", "scopes": ["tokens:introspect"], "ttl_hours": 17521},
                         {"name": "x", "scopes": "tokens:introspect"},
                         {"name": "x", "scopes": ["tokens:introspect"], "extra": 1}):
            problem(admin.post("/v1/api-keys", json=bad_body), 400)
        problem(admin.post(f"/v1/api-keys/{'0' * 16}/rotate", json={}), 404)
        problem(admin.post(f"/v1/api-keys/{key_id}/rotate", json={"grace_seconds": -1}), 400)
        problem(admin.post(f"/v1/api-keys/{key_id}/rotate",
                           json={"grace_seconds": 31 * 86400}), 400)
        problem(auditor.get("/v1/api-keys/fwk_0123"), 400)


# --- access tokens and their signing keys ------------------------------------------------------


def test_access_tokens_are_issued_inspected_and_revoked(
        server: RunningServer, roles: Roles, shown: Shown) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with server.admin() as admin, server.admin(roles.operator) as op, \
            server.admin(roles.auditor) as auditor:
        device_id, cert_pem = register(admin, certificate=True)
        assert cert_pem is not None
        issued = op.post("/v1/access-tokens", json={"device_id": device_id,
                                                     "scope": "telemetry:write mqtt:connect"})
        assert issued.status_code == 201, issued.text
        no_store(issued)
        grant = issued.json()
        token, jti = grant["access_token"], grant["jti"]
        shown.add(token)
        assert JWT.fullmatch(token)
        assert (grant["token_type"], grant["scope"]) == ("Bearer",
                                                         "telemetry:write mqtt:connect")
        assert 0 < grant["expires_in"] <= 3600

        verdict = auditor.post("/v1/access-tokens/inspect", json={"token": token})
        assert verdict.status_code == 200, verdict.text
        inspected = verdict.json()
        cert_der = x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(
            serialization.Encoding.DER)
        x5t = base64.urlsafe_b64encode(hashlib.sha256(cert_der).digest()).rstrip(b"=").decode()
        assert (inspected["valid"], inspected["reason"], inspected["device_id"]) == (
            True, "valid", device_id)
        assert inspected["binding"] == {"kind": "x5t#S256", "thumbprint": x5t}
        assert inspected["claims"]["jti"] == jti and inspected["header"]["typ"] == "at+jwt"
        # Presented without its certificate: not valid (RFC 8705 §3), with it: valid.
        assert auditor.post("/v1/access-tokens/inspect",
                            json={"token": token, "cnf": {}}).json()["valid"] is False
        assert auditor.post("/v1/access-tokens/inspect", json={
            "token": token, "cnf": {"x5t#S256": x5t}}).json()["valid"] is True
        problem(auditor.post("/v1/access-tokens/inspect",
                             json={"token": token, "cnf": {"x5t": x5t}}), 400)
        garbage = auditor.post("/v1/access-tokens/inspect", json={"token": "not.a.token"})
        assert garbage.status_code == 200 and garbage.json()["valid"] is False
        assert garbage.json()["header"] is None and "binding" not in garbage.json()
        # Unverified claims Python reads but JSON has not (NaN) are not echoed as such.
        odd = ".".join(base64.urlsafe_b64encode(part).rstrip(b"=").decode() for part in (
            b'{"alg": "ES256", "typ": "at+jwt"}', b'{"exp": NaN, "sub": "x"}', b"sig"))
        answer = auditor.post("/v1/access-tokens/inspect", json={"token": odd})
        assert answer.status_code == 200 and json.loads(answer.text)["claims"] is None
        assert answer.json()["header"] == {"alg": "ES256", "typ": "at+jwt"}

        # The token names no scope the request did not ask for; bound to a key on demand.
        dpop = op.post("/v1/access-tokens", json={"device_id": device_id,
                                                   "public_key": public_pem(key)})
        assert dpop.status_code == 201, dpop.text
        shown.add(dpop.json()["access_token"])
        assert dpop.json()["token_type"] == "DPoP"
        bound = auditor.post("/v1/access-tokens/inspect",
                             json={"token": dpop.json()["access_token"]}).json()["binding"]
        assert bound == {"kind": "jkt", "thumbprint": rfc7638_thumbprint(key)}
        with_cert = op.post("/v1/access-tokens", json={"device_id": device_id,
                                                        "certificate": cert_pem})
        assert with_cert.status_code == 201, with_cert.text
        shown.add(with_cert.json()["access_token"])

        revoked = op.post("/v1/access-tokens/revoke", json={"jti": jti})
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["jti"] == jti and revoked.json()["refused_until"]
        after = auditor.post("/v1/access-tokens/inspect", json={"token": token}).json()
        assert after["valid"] is False and "revoked" in after["reason"]
        problem(op.post("/v1/access-tokens/revoke", json={"jti": jti}), 409)
        problem(op.post("/v1/access-tokens/revoke", json={"jti": "a b"}), 400)
        # The other tokens of the device are still valid (control) until all are revoked.
        other = with_cert.json()["access_token"]
        assert auditor.post("/v1/access-tokens/inspect",
                            json={"token": other}).json()["valid"] is True
        everything = op.post(f"/v1/devices/{device_id}/access-tokens/revoke",
                             json={"reason": "lost in transit"})
        assert everything.status_code == 200, everything.text
        assert everything.json()["device_id"] == device_id
        assert everything.json()["credential_generation"] >= 1
        assert auditor.post("/v1/access-tokens/inspect",
                            json={"token": other}).json()["valid"] is False
        problem(op.post("/v1/devices/no-such-device/access-tokens/revoke", json={}), 404)

        # Refusals name what to change.
        registered, _ = register(admin)
        problem(op.post("/v1/access-tokens", json={"device_id": registered}), 422)
        problem(op.post("/v1/access-tokens", json={"device_id": "no-such-device"}), 404)
        for bad_body in ({"device_id": device_id, "scope": "root"},
                         {"device_id": device_id, "certificate": cert_pem,
                          "public_key": public_pem(key)},
                         {"device_id": device_id, "public_key": "nope"},
                         {"device_id": device_id, "certificate": "nope"},
                         {"device_id": device_id, "scope": None},
                         {"device_id": device_id, "lifetime": 10}):
            problem(op.post("/v1/access-tokens", json=bad_body), 400)
        # A certificate that is not the device's.
        _, stranger_pem = register(admin, certificate=True)
        assert stranger_pem is not None
        problem(op.post("/v1/access-tokens", json={"device_id": device_id,
                                                    "certificate": stranger_pem}), 422)

        events = admin.get("/v1/audit", params={"action": "access_token.issued",
                                                "order": "desc", "limit": 10}).json()
    assert any(e["details"]["jti"] == jti for e in events["items"])
    assert token not in json.dumps(events)


def test_a_rotated_signing_key_keeps_verifying_its_tokens(server: RunningServer,
                                                          roles: Roles, shown: Shown) -> None:
    with server.admin() as admin, server.admin(roles.auditor) as auditor:
        device_id, _ = register(admin, certificate=True)
        token = admin.post("/v1/access-tokens", json={"device_id": device_id}
                           ).json()["access_token"]
        shown.add(token)
        before = auditor.get("/v1/token-keys").json()["items"]
        assert [k["active"] for k in before].count(True) == 1
        rotated = admin.post("/v1/token-keys/rotate", json={"reason": "test rotation"})
        assert rotated.status_code == 201, rotated.text
        new = rotated.json()
        assert new["active"] is True and new["verify_until"] is None
        after = auditor.get("/v1/token-keys").json()["items"]
        assert after[0] == new
        old = next(k for k in after if k["kid"] == before[0]["kid"])
        assert old["active"] is False and old["retired_at"] and old["verify_until"]
        assert auditor.post("/v1/access-tokens/inspect",
                            json={"token": token}).json()["valid"] is True
        fresh = admin.post("/v1/access-tokens", json={"device_id": device_id}).json()
        shown.add(fresh["access_token"])
        header = auditor.post("/v1/access-tokens/inspect",
                              json={"token": fresh["access_token"]}).json()["header"]
        assert header["kid"] == new["kid"]
        problem(admin.post("/v1/token-keys/rotate", json={"reason": "x" * 1025}), 400)


# --- roles -----------------------------------------------------------------------------------

# In an order the operator's negative control can replay: rotate and revoke the
# device's symmetric credential, then add a new one.
AUDITOR_REFUSED = [
    ("POST", "/v1/credentials/{sk}/rotate", {"slot": "primary"}),
    ("DELETE", "/v1/credentials/{sk}", None),
    ("POST", "/v1/devices/{device}/credentials", {"kind": "symmetric_key"}),
    ("POST", "/v1/access-tokens", {"device_id": "{device}"}),
    ("POST", "/v1/access-tokens/revoke", {"jti": "abc"}),
    ("POST", "/v1/devices/{device}/access-tokens/revoke", {}),
]
OPERATOR_REFUSED = [
    ("POST", "/v1/api-keys", {"name": "x", "scopes": ["tokens:introspect"]}),
    ("POST", "/v1/api-keys/{key}/rotate", {}),
    ("DELETE", "/v1/api-keys/{key}", None),
    ("POST", "/v1/token-keys/rotate", {}),
]


def test_roles_auditors_read_operators_manage_devices_admins_mint_api_keys(
        server: RunningServer, roles: Roles, shown: Shown) -> None:
    with server.admin() as admin:
        device_id, _ = register(admin, certificate=True)
        created = admin.post(f"/v1/devices/{device_id}/credentials",
                             json={"kind": "symmetric_key"}).json()
        shown.add(created["primary_key"], created["secondary_key"])
        api_key = admin.post("/v1/api-keys", json={"name": "roles",
                                                   "scopes": ["tokens:introspect"]}).json()
        shown.add(api_key["key"].partition(".")[2])
        fill = {"device": device_id, "sk": created["id"], "key": api_key["id"]}

        def request(token: str, method: str, path: str, body: Any) -> httpx.Response:
            text = json.dumps(body).replace("{device}", device_id) if body is not None else None
            with server.admin(token) as client:
                return client.request(method, path.format(**fill), content=text,
                                      headers={"Content-Type": "application/json"})

        for method, path, body in AUDITOR_REFUSED + OPERATOR_REFUSED:
            problem(request(roles.auditor, method, path, body), 403)
        for method, path, body in OPERATOR_REFUSED:
            problem(request(roles.operator, method, path, body), 403)
        # Nothing changed.
        assert admin.get(f"/v1/credentials/{created['id']}").json()["status"] == "active"
        assert admin.get(f"/v1/api-keys/{api_key['id']}").json()["revoked_at"] is None
        # Negative controls: the auditor reads and inspects, and the operator may do what
        # the auditor may not.
        for path in (f"/v1/devices/{device_id}/credentials", f"/v1/credentials/{created['id']}",
                     "/v1/api-keys", f"/v1/api-keys/{api_key['id']}", "/v1/token-keys"):
            assert request(roles.auditor, "GET", path, None).status_code == 200, path
        assert request(roles.auditor, "POST", "/v1/access-tokens/inspect",
                       {"token": "x"}).status_code == 200
        for method, path, body in AUDITOR_REFUSED:
            response = request(roles.operator, method, path, body)
            assert response.status_code in (200, 201), (path, response.text)
            answer = response.json()
            shown.add(*(answer[k] for k in ("primary_key", "secondary_key", "key",
                                            "access_token") if k in answer))


# --- the CLI --------------------------------------------------------------------------------


def test_cli_symmetric_keys_print_once_and_show_never(server: RunningServer,
                                                      shown: Shown) -> None:
    with server.admin() as admin:
        device_id, _ = register(admin)
        quiet_device, _ = register(admin)
    loud = server.cli("credential", "add", "--device", device_id, "--kind", "symmetric")
    lines = loud.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["primary", "secondary"], loud.stdout
    primary, secondary = (line.split(": ")[1] for line in lines)
    shown.add(primary, secondary)
    assert B64_KEY.fullmatch(primary) and B64_KEY.fullmatch(secondary)
    assert "shown only once" in loud.stderr and "warning:" in loud.stderr
    credential_id = re.search(r"sk_[0-9a-f]{16}", loud.stderr)
    assert credential_id is not None, loud.stderr

    quiet = server.cli("credential", "add", "--device", quiet_device, "--kind", "symmetric",
                       "--quiet")
    assert B64_KEY.fullmatch(quiet.stdout.strip()) and quiet.stderr == ""
    shown.add(quiet.stdout.strip())

    # Not retrievable afterwards: show, list and --json carry no key.
    for args in (("credential", "show", credential_id.group()),
                 ("credential", "show", credential_id.group(), "--json"),
                 ("credential", "list", "--device", device_id),
                 ("credential", "list", "--device", device_id, "--json")):
        result = server.cli(*args, env=wide(server))
        assert primary not in result.stdout and secondary not in result.stdout, args
        assert credential_id.group() in result.stdout, args
    info = cli_json(server, "credential", "show", credential_id.group())
    assert "primary_key" not in info and info["primary_version"] == 1

    rotated = server.cli("credential", "rotate", credential_id.group(), "--slot", "secondary",
                         "--quiet")
    new_key = rotated.stdout.strip()
    shown.add(new_key)
    assert B64_KEY.fullmatch(new_key) and new_key not in (primary, secondary)
    assert cli_json(server, "credential", "show", credential_id.group()
                    )["secondary_version"] == 2
    assert_clean_failure(server.cli("credential", "rotate", credential_id.group(),
                                    check=False), "--slot primary")
    assert_clean_failure(server.cli("credential", "add", "--device", device_id, "--kind",
                                    "symmetric", check=False), "already has")
    revoked = server.cli("credential", "revoke", credential_id.group())
    assert f"credential {credential_id.group()} of device {device_id} revoked" in revoked.stdout
    assert_clean_failure(server.cli("credential", "show", credential_id.group(), check=False),
                         "was revoked at", f"credential list --device {device_id}")
    listed = cli_json(server, "credential", "list", "--device", device_id)
    assert [c["status"] for c in listed] == ["revoked"]


def test_cli_public_keys_and_api_keys(server: RunningServer, shown: Shown,
                                      tmp_path: Path) -> None:
    with server.admin() as admin:
        device_id, _ = register(admin)
    key = ec.generate_private_key(ec.SECP256R1())
    pem_file = tmp_path / "device.pub"
    pem_file.write_text(public_pem(key))
    added = server.cli("credential", "add", "--device", device_id, "--kind", "public-key",
                       "--public-key", str(pem_file))
    public_id = added.stdout.strip()
    assert re.fullmatch(r"pk_[0-9a-f]{16}", public_id), added.stdout
    assert rfc7638_thumbprint(key) in added.stderr
    assert_clean_failure(server.cli("credential", "rotate", public_id, "--slot", "primary",
                                    check=False), "cannot be rotated")
    assert_clean_failure(server.cli("credential", "add", "--kind", "public-key", "--device",
                                    device_id, check=False), "--public-key FILE")

    created = server.cli("credential", "add", "--kind", "api-key", "--name", "cli gateway",
                         "--scope", "tokens:introspect", "--ttl-hours", "24", "--quiet")
    match = API_KEY.fullmatch(created.stdout.strip())
    assert match is not None and created.stderr == "", created
    shown.add(created.stdout.strip().partition(".")[2])
    key_id = match.group(1)
    # Shown by its id in both spellings; never the key.
    for spelled in (f"fwk_{key_id}", key_id):
        info = cli_json(server, "credential", "show", spelled)
        assert info["id"] == key_id and "key" not in info
    listed = cli_json(server, "credential", "list", "--api-keys")
    assert key_id in {k["id"] for k in listed}
    assert created.stdout.strip().partition(".")[2] not in json.dumps(listed)
    # The whole key on the command line is refused without echoing it.
    whole = server.cli("credential", "show", created.stdout.strip(), check=False)
    assert_clean_failure(whole, "not a credential id")
    assert created.stdout.strip().partition(".")[2] not in whole.stderr + whole.stdout

    rotated = server.cli("credential", "rotate", f"fwk_{key_id}", "--grace-seconds", "60")
    assert API_KEY.fullmatch(rotated.stdout.strip()) and "works until" in rotated.stderr
    shown.add(rotated.stdout.strip().partition(".")[2])
    assert_clean_failure(server.cli("credential", "rotate", key_id, "--slot", "primary",
                                    check=False), "--slot goes with symmetric")
    assert "revoked" in server.cli("credential", "revoke", f"fwk_{key_id}").stdout
    assert_clean_failure(server.cli("credential", "show", key_id, check=False),
                         "was revoked at")
    assert next(k for k in cli_json(server, "credential", "list", "--api-keys")
                if k["id"] == key_id)["revoked_at"] is not None
    assert_clean_failure(server.cli("credential", "list", check=False), "--api-keys")
    assert_clean_failure(server.cli("credential", "add", "--kind", "api-key", "--device",
                                    device_id, "--name", "x", "--scope", "tokens:introspect",
                                    check=False), "--device")


def test_cli_access_tokens_issue_inspect_revoke_and_keys(server: RunningServer,
                                                          shown: Shown) -> None:
    with server.admin() as admin:
        device_id, _ = register(admin, certificate=True)
    issued = server.cli("access-token", "issue", "--device", device_id, "--scope",
                        "mqtt:connect", "--quiet")
    token = issued.stdout.strip()
    shown.add(token)
    assert JWT.fullmatch(token) and issued.stderr == ""
    loud = server.cli("access-token", "issue", "--device", device_id)
    shown.add(loud.stdout.strip())
    assert JWT.fullmatch(loud.stdout.strip()) and "jti" in loud.stderr

    valid = _cli_stdin(server, token, "access-token", "inspect", "-")
    assert valid.returncode == 0, valid.stdout + valid.stderr
    assert valid.stdout.startswith("VALID") and f"device: {device_id}" in valid.stdout
    assert token not in valid.stdout + valid.stderr
    as_json = json.loads(_cli_stdin(server, token, "access-token", "inspect", "-",
                                    "--json").stdout)
    jti = as_json["claims"]["jti"]

    server.cli("credential", "revoke", "--jti", jti)
    refused = _cli_stdin(server, token, "access-token", "inspect", "-")
    assert refused.returncode == 1 and refused.stdout.startswith("NOT VALID"), refused
    junk = server.cli("access-token", "inspect", "junk", check=False)
    assert junk.returncode == 1 and "NOT VALID" in junk.stdout and "Traceback" not in junk.stderr
    assert_clean_failure(server.cli("access-token", "revoke", "--jti", jti, check=False),
                         "already revoked")

    other = loud.stdout.strip()
    assert _cli_stdin(server, other, "access-token", "inspect", "-").returncode == 0
    everything = server.cli("access-token", "revoke", "--device", device_id, "--reason",
                            "test")
    assert f"every access token of device {device_id} revoked" in everything.stdout
    assert _cli_stdin(server, other, "access-token", "inspect", "-").returncode == 1
    assert_clean_failure(server.cli("access-token", "revoke", check=False), "--jti")

    keys = cli_json(server, "access-token", "keys")
    kid = server.cli("access-token", "rotate-key", "--reason", "cli test").stdout.strip()
    now = cli_json(server, "access-token", "keys")
    assert now[0]["kid"] == kid and now[0]["active"] and kid not in {k["kid"] for k in keys}


def _cli_stdin(server: RunningServer, data: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLEETWARD, *args], input=data, env=server.env(),
                          capture_output=True, text=True, timeout=60)


def test_bootstrap_tokens_keep_their_old_command_name(server: RunningServer) -> None:
    with server.admin() as admin:
        device_id, _ = register(admin)
    for group in ("token", "bootstrap-token"):
        made = server.cli(group, "create", "--device", device_id, "--quiet")
        assert re.fullmatch(r"fwb_[0-9a-f]{16}\.\S+\n", made.stdout), made.stdout
        assert made.stderr == ""
    token_id = made.stdout.removeprefix("fwb_").split(".")[0]
    assert "revoked" in server.cli("bootstrap-token", "revoke", token_id).stdout
    # The root's help names both kinds of token; the old name is not a third one.
    root = server.cli("--help", env=wide(server)).stdout
    commands = {line.split()[1] for line in root.splitlines()
                if line.startswith("│ ") and len(line.split()) > 2}
    assert {"bootstrap-token", "access-token", "credential"} <= commands, root
    assert "token" not in commands, root
    alias = server.cli("token", "--help", env=wide(server)).stdout
    assert "Alias of bootstrap-token" in alias


# --- shown once means shown once --------------------------------------------------------------


def test_no_secret_shown_is_in_the_log_the_audit_log_or_the_database(
        server: RunningServer, shown: Shown) -> None:
    """Last in this module: every key and token the tests above were shown (and one of
    each made here, so that the test stands alone) is nowhere the server writes."""
    with server.admin() as admin:
        device_id, _ = register(admin, certificate=True)
        sym = admin.post(f"/v1/devices/{device_id}/credentials",
                         json={"kind": "symmetric_key"}).json()
        api_key = admin.post("/v1/api-keys", json={"name": "leak check",
                                                   "scopes": ["tokens:introspect"]}).json()
        token = admin.post("/v1/access-tokens", json={"device_id": device_id}).json()
        shown.add(sym["primary_key"], sym["secondary_key"],
                  api_key["key"].partition(".")[2], token["access_token"])
        audit = json.dumps(admin.get("/v1/audit", params={"limit": 1000}).json())
    raw_keys = [base64.b64decode(s) for s in shown.secrets if B64_KEY.fullmatch(s)]
    assert len(raw_keys) >= 2 and len(shown.secrets) >= 4
    log = server.log_file.read_bytes()
    database = b"".join(f.read_bytes() for f in sorted(server.data_dir.glob("fleetward.db*")))
    for secret in shown.secrets:
        assert secret not in audit, "a secret is in the audit log"
        assert secret.encode() not in log, "a secret is in the server's log file"
        assert secret.encode() not in database, "a secret is in the database files"
    for raw in raw_keys:
        assert raw not in database, "a symmetric key is stored in the clear"
    # Negative controls: the searches do see what is stored and logged about them.
    assert sym["id"].encode() in database and api_key["id"].encode() in database
    assert token["jti"] in audit and sym["id"] in audit
    assert sym["id"].encode() in log and api_key["id"].encode() in log
