"""Acceptance 1: `fleetward serve` as a subprocess answers on the public and admin listeners."""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import RunningServer, start_server, stop_server


def test_public_listener_serves_ca_chain_and_crl(server: RunningServer) -> None:
    chain = httpx.get(f"{server.public_url}/ca/chain.pem", timeout=5)
    assert chain.status_code == 200
    certs = x509.load_pem_x509_certificates(chain.content)
    assert [c.subject.rfc4514_string().split(",")[0] for c in certs] == [
        "CN=Fleetward Issuing CA", "CN=Fleetward Root CA"]
    crl = httpx.get(f"{server.public_url}/crl/issuing.crl", timeout=5)
    assert crl.headers["content-type"] == "application/pkix-crl"
    parsed = x509.load_der_x509_crl(crl.content)
    assert parsed.is_signature_valid(certs[0].public_key())  # type: ignore[arg-type]


def test_admin_listener_requires_token_and_answers_with_it(server: RunningServer) -> None:
    with server.admin(token="fwa_0000.wrong") as client:
        refused = client.get("/v1/devices")
    assert refused.status_code == 401
    assert refused.headers["content-type"].startswith("application/problem+json")
    with server.admin() as client:
        whoami = client.get("/v1/whoami").json()
        spec = client.get("/openapi.json").json()
    assert whoami["role"] == "admin"
    assert spec["openapi"].startswith("3.")
    assert "/v1/devices" in spec["paths"]


def test_unknown_public_path_is_problem_json(server: RunningServer) -> None:
    response = httpx.get(f"{server.public_url}/crl/nope.crl", timeout=5)
    assert response.status_code == 404
    body = response.json()
    assert body["status"] == 404 and body["hint"]


def _client_cert(server: RunningServer, tmp_path: Path, device_id: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    with server.admin() as client:
        assert client.post("/v1/devices", json={"id": device_id, "type": "default"}
                           ).status_code == 201
        issued = client.post(f"/v1/devices/{device_id}/certificates", json={"csr": csr}).json()
    cert_file, key_file = tmp_path / "dev.pem", tmp_path / "dev.key"
    cert_file.write_text(issued["pem"] + issued["chain_pem"])
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_device_listener_sees_the_client_certificate(server: RunningServer,
                                                     tmp_path: Path) -> None:
    cert_file, key_file = _client_cert(server, tmp_path, "smoke-dev-1")
    url = f"https://localhost:{server.device_port}/v1/health"
    with_cert = ssl.create_default_context(cafile=str(server.chain))
    with_cert.load_cert_chain(str(cert_file), str(key_file))
    seen = httpx.get(url, verify=with_cert, timeout=5).json()
    assert seen == {"status": "ok", "client_certificate": True, "client_cn": "smoke-dev-1"}
    anonymous = httpx.get(url, verify=server.tls(), timeout=5).json()
    assert anonymous["client_certificate"] is False


def test_device_listener_refuses_a_certificate_from_another_ca(server: RunningServer,
                                                               tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smoke-dev-1")])
    now = dt.datetime.now(dt.UTC)
    forged = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(hours=1))
              .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "forged.pem").write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "forged.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.create_default_context(cafile=str(server.chain))
    ctx.load_cert_chain(str(tmp_path / "forged.pem"), str(tmp_path / "forged.key"))
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"https://localhost:{server.device_port}/v1/health", verify=ctx, timeout=5)


def test_both_device_listeners_reset_connections_over_their_budget(
        tmp_path: Path) -> None:
    """``fleetward serve`` wires the connection budgets of fleetward.toml into both
    device listeners and audits the resets; a silent client holds its slot."""
    server = start_server(tmp_path / "data", settings={
        "mqtt": {"max_connections": 1},
        "device_api": {"max_pending_handshakes": 1, "idle_timeout_seconds": 1}})
    try:
        for port, action in [(server.mqtt_port, "mqtt.connections_limited"),
                             (server.device_port, "device_api.connections_limited")]:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                time.sleep(0.2)  # accepted: the silent client now holds the only slot
                with socket.create_connection(("127.0.0.1", port), timeout=5) as over, \
                        contextlib.suppress(ConnectionResetError):  # RST or FIN: both fine
                    assert over.recv(1) == b""
                deadline = time.monotonic() + 10
                while True:
                    with server.admin() as admin:
                        rows = admin.get("/v1/audit", params={"action": action}
                                         ).json()["items"]
                    if rows:
                        break
                    assert time.monotonic() < deadline, f"{action} not audited"
                    time.sleep(0.2)
                assert rows[0]["details"]["reset"] == 1
                assert rows[0]["outcome"] == "failure"
            # negative control: with the slot free again, a real client gets TLS
            context = ssl.create_default_context(cafile=str(server.chain))
            deadline = time.monotonic() + 5
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                            context.wrap_socket(raw, server_hostname="localhost"):
                        break
                except (ssl.SSLError, ConnectionError):
                    assert time.monotonic() < deadline, "the slot was never freed"
                    time.sleep(0.1)
        # A client without a certificate (allowed on :8443 for EST bootstrap) that sends
        # no request loses its connection after [device_api] idle_timeout_seconds.
        context = ssl.create_default_context(cafile=str(server.chain))
        with socket.create_connection(("127.0.0.1", server.device_port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as idle:
            started = time.monotonic()
            assert idle.recv(1) == b""
            assert time.monotonic() - started < 5, "idle connection kept too long"
    finally:
        stop_server(server)
