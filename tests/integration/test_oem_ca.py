"""Registering trusted manufacturer (OEM) CAs for later IDevID enrollment."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import RunningServer


def make_cert(cn: str, *, ca: bool, days: int = 365, expired: bool = False) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(days=days + 2) if expired else now - dt.timedelta(hours=1)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_oem_ca_is_registered_listed_and_audited(server: RunningServer) -> None:
    pem = make_cert("Acme Factory CA", ca=True)
    with server.admin() as client:
        created = client.post("/v1/ca/oem", json={"name": "acme-factory", "certificate": pem,
                                                  "device_type": "default"})
        assert created.status_code == 201, created.text
        cas = {c["name"]: c for c in client.get("/v1/ca").json()["items"]}
        events = client.get("/v1/audit", params={"action": "ca.oem_registered"}).json()["items"]
        duplicate = client.post("/v1/ca/oem", json={"name": "acme-factory", "certificate": pem,
                                                    "device_type": "default"})
    assert cas["acme-factory"]["kind"] == "oem"
    assert cas["acme-factory"]["key_online"] is False  # we never hold an OEM's key
    assert cas["acme-factory"]["device_type"] == "default"
    assert [e["target"] for e in events] == ["ca:acme-factory"]
    assert duplicate.status_code == 409
    # An OEM CA is trusted for enrollment, not one of ours: no CRL, not in our chain.
    assert httpx.get(f"{server.public_url}/crl/acme-factory.crl").status_code == 404
    assert "Acme Factory CA" not in httpx.get(f"{server.public_url}/ca/chain.pem").text


@pytest.mark.parametrize(("case", "certificate", "status"), [
    ("not-a-ca", make_cert("Leaf", ca=False), 422),
    ("expired", make_cert("Old CA", ca=True, days=30, expired=True), 400),
    ("garbage", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", 400),
    ("unknown-device-type", make_cert("Typeless CA", ca=True), 404),
])
def test_unusable_oem_certificates_are_refused(server: RunningServer, case: str,
                                               certificate: str, status: int) -> None:
    with server.admin() as client:
        before = client.get("/v1/ca").json()["items"]
        response = client.post("/v1/ca/oem", json={"name": f"bad-{case}",
                                                   "certificate": certificate,
                                                   "device_type": "nope" if "type" in case
                                                   else "default"})
        after = client.get("/v1/ca").json()["items"]
    assert response.status_code == status
    problem = response.json()
    assert problem["detail"] and problem["hint"]
    assert before == after
