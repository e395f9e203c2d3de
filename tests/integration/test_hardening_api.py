"""Defects found in review of the admin API, init and CLI, pinned against a real server."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import FLEETWARD, RunningServer, start_server, stop_server


def _audit_count(server: RunningServer, action: str) -> int:
    with server.admin() as client:
        return len(client.get("/v1/audit", params={"action": action, "limit": 1000}
                              ).json()["items"])


def test_non_ascii_authorization_header_is_refused_and_audited(server: RunningServer) -> None:
    before = _audit_count(server, "admin.authentication_failed")
    ctx = ssl.create_default_context(cafile=str(server.chain))
    with socket.create_connection(("127.0.0.1", server.admin_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /v1/devices HTTP/1.1\r\nHost: localhost\r\n"
                    b"Authorization: Bearer fwa_a.\xff\xfe\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 401"), response[:200]
    assert b"application/problem+json" in response
    assert _audit_count(server, "admin.authentication_failed") == before + 1


def test_the_last_admin_token_cannot_be_revoked(server: RunningServer) -> None:
    with server.admin() as client:
        admins = [t for t in client.get("/v1/operators").json()["items"]
                  if t["role"] == "admin" and not t["revoked"]]
        assert len(admins) == 1
        refused = client.delete(f"/v1/operators/{admins[0]['token_id']}")
        assert refused.status_code == 409 and "another admin" in refused.json()["hint"]
        second = client.post("/v1/operators", json={"name": "admin-2", "role": "admin"}).json()
        second_id = second["token"].removeprefix("fwa_").split(".")[0]
        # With two active admins, either may go.
        assert client.delete(f"/v1/operators/{second_id}").status_code == 204


def test_only_the_device_listener_asks_for_client_certificates(server: RunningServer) -> None:
    def ca_names(port: int) -> str:
        return subprocess.run(
            ["openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{port}",
             "-servername", "localhost", "-CAfile", str(server.chain)], input="",
            capture_output=True, text=True, timeout=30).stdout
    # s_client prints the CertificateRequest's fields only when it received one
    # (RFC 5246 §7.4.4); TLS 1.2 so the request is visible to it.
    assert "Client Certificate Types" not in ca_names(server.admin_port)
    assert "Client Certificate Types" in ca_names(server.device_port)


def test_cli_registers_an_oem_ca_given_as_der(server: RunningServer, tmp_path: Path) -> None:
    from tests.integration.test_oem_ca import make_cert

    der = tmp_path / "oem.der"
    der.write_bytes(x509.load_pem_x509_certificate(make_cert("DER Factory CA", ca=True).encode())
                    .public_bytes(serialization.Encoding.DER))
    result = server.cli("ca", "add-oem", "der-factory", "--cert", str(der),
                        "--device-type", "default", check=False)
    assert result.returncode == 0, result.stderr
    garbage = tmp_path / "junk.bin"
    garbage.write_bytes(b"\x00\x01\x02")
    refused = server.cli("ca", "add-oem", "junk", "--cert", str(garbage),
                         "--device-type", "default", check=False)
    assert refused.returncode != 0 and "hint:" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_cli_unwritable_out_is_refused_before_issuing(server: RunningServer,
                                                      tmp_path: Path) -> None:
    from tests.integration.test_issuance_refusals import _csr

    with server.admin() as client:
        client.post("/v1/devices", json={"id": "hard-out", "type": "default"})
    csr = tmp_path / "req.csr"
    csr.write_text(_csr("hard-out"))
    result = server.cli("cert", "issue", "--device", "hard-out", "--csr", str(csr), "--out",
                        str(tmp_path / "missing-dir" / "cert.pem"), check=False)
    assert result.returncode != 0 and "hint:" in result.stderr
    with server.admin() as client:
        assert client.get("/v1/devices/hard-out/certificates").json()["items"] == []


@pytest.mark.parametrize(("listener", "method", "path", "allow"), [
    ("admin", "PUT", "/v1/devices", {"GET", "POST"}),
    ("admin", "TRACE", "/v1/whoami", {"GET"}),
    # POST explains; GET, PUT and DELETE address the policy named "test" (the document
    # lists all four there).
    ("admin", "PATCH", "/v1/policies/test", {"POST", "GET", "PUT", "DELETE"}),
    ("public", "POST", "/healthz", {"GET", "HEAD"}),
    ("device", "DELETE", "/v1/health", {"GET", "HEAD"}),
])
def test_405_answers_carry_allow_on_every_listener(server: RunningServer, listener: str,
                                                   method: str, path: str,
                                                   allow: set[str]) -> None:
    # RFC 9110 §15.5.6: a 405 MUST list the allowed methods; problem_middleware dropped
    # the header when it rewrote aiohttp's error into problem+json.
    url = {"admin": server.admin_url, "public": server.public_url,
           "device": f"https://localhost:{server.device_port}"}[listener]
    with httpx.Client(verify=server.tls(), timeout=30) as client:
        response = client.request(method, url + path,
                                  headers={"Authorization": f"Bearer {server.token}"})
    assert response.status_code == 405, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert set(response.headers["allow"].split(",")) == allow


def test_an_integral_json_number_is_an_integer(server: RunningServer) -> None:
    # The document says {"type": "integer"}, which JSON Schema satisfies with 72.0.
    with server.admin() as client:
        issued = client.post("/v1/bootstrap-tokens",
                             json={"type": "default", "count": 2.0, "ttl_hours": 72.0})
        assert issued.status_code == 201, issued.text
        assert issued.json()["max_uses"] == 2
        refused = client.post("/v1/bootstrap-tokens",
                              json={"type": "default", "count": 2.5})
        assert refused.status_code == 400 and "integer" in refused.json()["detail"]


def test_nul_characters_are_refused_before_postgresql_sees_them(tmp_path: Path,
                                                                postgres_url: str) -> None:
    # Found by schemathesis on PostgreSQL: psycopg refuses U+0000 in text parameters
    # ("PostgreSQL text fields cannot contain NUL"), so each of these was a 500.
    server = start_server(tmp_path / "data",
                          env=dict(os.environ, FLEETWARD_DATABASE_URL=postgres_url))
    try:
        with server.admin() as client:
            for method, path, body in [
                ("GET", "/v1/audit?action=a%00b", None),
                ("GET", "/v1/devices?owner=a%00b", None),
                ("GET", "/v1/devices/a%00b", None),
                ("DELETE", "/v1/policies/default/attachments?device=a%00b", None),
                ("POST", "/v1/device-types", {"name": "nul", "description": "a\x00b"}),
            ]:
                response = client.request(method, path, json=body)
                assert response.status_code == 400, (path, response.text)
                assert "U+0000" in response.json()["detail"]
            # Negative control: the same requests without the character are fine.
            assert client.get("/v1/audit", params={"action": "ab"}).status_code == 200
            assert client.post("/v1/device-types", json={"name": "nul", "description": "ab"}
                               ).status_code == 201
    finally:
        stop_server(server)


def _init(data_dir: Path, *args: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLEETWARD, "init", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=120, env=env or dict(os.environ))


@pytest.mark.parametrize("args", [
    ["--organization", "O" * 54],
    ["--hostname", "bad host!"],
    ["--hostname", "exämple.com"],
], ids=["organization-too-long", "hostname-with-space", "hostname-not-idna"])
def test_init_refuses_bad_names_before_creating_anything(tmp_path: Path, args: list[str]) -> None:
    data_dir = tmp_path / "data"
    result = _init(data_dir, *args)
    assert result.returncode != 0
    assert "hint:" in result.stderr and "Traceback" not in result.stderr
    assert not list((data_dir / "keys").glob("*")) if (data_dir / "keys").exists() else True
    retry = _init(data_dir)  # the same directory is still usable
    assert retry.returncode == 0, retry.stderr


def test_init_over_leftover_keys_explains_instead_of_crashing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "keys").mkdir(parents=True)
    (data_dir / "keys" / "root-ca.key").write_text("left over from an interrupted init")
    result = _init(data_dir)
    assert result.returncode != 0
    assert "already exists" in result.stderr and "hint:" in result.stderr
    assert "Traceback" not in result.stderr


def test_database_password_stays_in_the_environment(tmp_path: Path, postgres_url: str) -> None:
    with_password = postgres_url.replace("postgres@", "postgres:s3cret-pw@")
    env = dict(os.environ, FLEETWARD_DATABASE_URL=with_password)
    server = start_server(tmp_path / "data", env=env)
    stop_server(server)
    config = (server.data_dir / "fleetward.toml").read_text()
    assert "s3cret-pw" not in config and "url_from_env = true" in config
    bare = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWARD_")}
    result = subprocess.run([*FLEETWARD, "serve", "--data-dir", str(server.data_dir)],
                            env=bare, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "FLEETWARD_DATABASE_URL" in result.stderr and "Traceback" not in result.stderr
    assert not (server.data_dir / "fleetward.db").exists()
