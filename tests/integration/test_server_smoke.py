"""Acceptance 1: `fleetward serve` as a subprocess answers on the public and admin listeners."""

from __future__ import annotations

import httpx
from cryptography import x509

from tests.conftest import RunningServer


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
