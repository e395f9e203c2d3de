"""Bad certificate requests are refused over the real admin API and the real CLI.

Every vector goes over HTTPS to a running ``fleetward serve``. The answer must be RFC 9457
problem details with the status that says who is at fault, a detail and a hint; and the
device's certificate list, its state and the audit trail of issuances must not change.
A good CSR through the same harness is the negative control.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtensionOID, NameOID

from fleetward.model import device_uri
from tests.conftest import RunningServer

PROBLEM_JSON = "application/problem+json"


def _csr(device_id: str, key: CertificateIssuerPrivateKeyTypes | None = None,
         cn: str | None = None, extensions: Sequence[tuple[x509.ExtensionType, bool]] = ()
         ) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def _pem(der: bytes) -> str:
    body = base64.b64encode(der).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "\n".join(["-----BEGIN CERTIFICATE REQUEST-----", *lines,
                      "-----END CERTIFICATE REQUEST-----", ""])


def _bad_signature(device_id: str) -> str:
    der = bytearray(x509.load_pem_x509_csr(_csr(device_id).encode())
                    .public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last octet of the ECDSA signature
    return _pem(bytes(der))


def _sm2_curve(device_id: str) -> str:
    """A P-256 CSR relabelled to the SM2 curve, which cryptography cannot load."""
    key = ec.generate_private_key(ec.SECP256R1())
    tbs = x509.load_pem_x509_csr(_csr(device_id, key).encode()).tbs_certrequest_bytes
    tbs = tbs.replace(bytes.fromhex("06082a8648ce3d030107"), bytes.fromhex("06082a811ccf5501822d"))
    sig = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    alg = bytes.fromhex("300a06082a8648ce3d040302")  # ecdsa-with-SHA256
    bits = b"\x03" + bytes([len(sig) + 1]) + b"\x00" + sig
    body = tbs + alg + bits
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x81 if n < 0x100 else 0x82]) + n.to_bytes(
        1 if n < 0x100 else 2, "big")  # X.690 §8.1.3 definite length
    return _pem(b"\x30" + length + body)


_CA = (x509.BasicConstraints(ca=True, path_length=0), True)
_CERT_SIGN = (x509.KeyUsage(digital_signature=True, content_commitment=False,
                            key_encipherment=False, data_encipherment=False,
                            key_agreement=False, key_cert_sign=True, crl_sign=False,
                            encipher_only=False, decipher_only=False), True)
_JUNK_SAN = (x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x00junk"),
             False)


@dataclass(frozen=True)
class Vector:
    csr: Callable[[str], str]  # gets the target device id
    status: int
    problem: str  # the problem type's last path segment
    unknown_device: bool = False
    profile: str | None = None


VECTORS: dict[str, Vector] = {
    "garbage-instead-of-csr": Vector(lambda d: "hello, please sign me", 400, "invalid-request"),
    "truncated-pem": Vector(lambda d: _csr(d)[:200], 400, "invalid-request"),
    "signature-bit-flipped": Vector(_bad_signature, 400, "invalid-request"),
    "san-extension-not-der": Vector(lambda d: _csr(d, extensions=[_JUNK_SAN]), 400,
                                    "invalid-request"),
    "ed25519-key": Vector(lambda d: _csr(d, ed25519.Ed25519PrivateKey.generate()), 422,
                          "policy-violation"),
    "rsa-1024-key": Vector(lambda d: _csr(d, rsa.generate_private_key(65537, 1024)), 422,
                           "policy-violation"),
    "ec-p521-key": Vector(lambda d: _csr(d, ec.generate_private_key(ec.SECP521R1())), 422,
                          "policy-violation"),
    "sm2-curve-was-a-500": Vector(_sm2_curve, 422, "policy-violation"),
    "cn-names-another-device": Vector(lambda d: _csr(d, cn=f"{d}-other"), 422,
                                      "policy-violation"),
    "san-uri-names-another-device": Vector(
        lambda d: _csr(d, extensions=[(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(device_uri(f"{d}-other"))]), False)]),
        422, "policy-violation"),
    "asks-for-ca-basic-constraints": Vector(lambda d: _csr(d, extensions=[_CA]), 422,
                                            "policy-violation"),
    "asks-for-key-cert-sign": Vector(lambda d: _csr(d, extensions=[_CERT_SIGN]), 422,
                                     "policy-violation"),
    "server-profile-for-a-device": Vector(lambda d: _csr(d), 422, "policy-violation",
                                          profile="server"),
    "unknown-device": Vector(lambda d: _csr(d), 404, "not-found", unknown_device=True),
}


def _new_device(admin: httpx.Client) -> str:
    device_id = f"refuse-{secrets.token_hex(4)}"
    response = admin.post("/v1/devices", json={"id": device_id, "type": "default"})
    assert response.status_code == 201, response.text
    return device_id


def _observable(admin: httpx.Client, device_id: str) -> dict[str, Any]:
    """Everything a refused request must leave as it was."""
    certs = admin.get(f"/v1/devices/{device_id}/certificates")
    device = admin.get(f"/v1/devices/{device_id}")
    issued = admin.get("/v1/audit", params={"action": "certificate.issued", "limit": 1000})
    assert issued.status_code == 200
    return {"certs": (certs.status_code, certs.json()),
            "device": (device.status_code, device.json()),
            "issued_events": len(issued.json()["items"])}


def _refusals(admin: httpx.Client, device_id: str) -> list[dict[str, Any]]:
    items = admin.get("/v1/audit", params={"action": "certificate.issue_refused",
                                           "limit": 1000}).json()["items"]
    return [e for e in items if e["target"] == f"device:{device_id}"]


@pytest.mark.parametrize("vector", VECTORS.values(), ids=VECTORS.keys())
def test_admin_api_refuses_and_changes_nothing(server: RunningServer, vector: Vector) -> None:
    with server.admin() as admin:
        device_id = _new_device(admin)
        target = f"{device_id}-ghost" if vector.unknown_device else device_id
        before = _observable(admin, target)
        body: dict[str, str] = {"csr": vector.csr(device_id)}
        if vector.profile:
            body["profile"] = vector.profile

        response = admin.post(f"/v1/devices/{target}/certificates", json=body)

        assert response.status_code == vector.status, response.text
        assert response.headers["content-type"].startswith(PROBLEM_JSON)
        problem = response.json()
        assert problem["type"].endswith(f"/{vector.problem}")
        assert problem["status"] == vector.status
        assert problem["detail"].strip() and problem["hint"].strip()
        assert problem["detail"] != "the server failed to handle this request"
        assert "pem" not in problem and "serial" not in problem
        assert _observable(admin, target) == before
        refused = _refusals(admin, target)
        assert refused and refused[-1]["outcome"] == "failure"
        assert refused[-1]["details"]["detail"] == problem["detail"]


def test_admin_api_control_a_good_csr_is_issued(server: RunningServer) -> None:
    """Negative control: the same harness sees an issuance when there is one."""
    with server.admin() as admin:
        device_id = _new_device(admin)
        before = _observable(admin, device_id)
        response = admin.post(f"/v1/devices/{device_id}/certificates",
                              json={"csr": _csr(device_id, cn=device_id)})
        assert response.status_code == 201, response.text
        after = _observable(admin, device_id)
        assert after != before
        assert [c["serial"] for c in after["certs"][1]["items"]] == [response.json()["serial"]]
        assert after["issued_events"] == before["issued_events"] + 1
        assert after["device"][1]["state"] == "active"
        cert = x509.load_pem_x509_certificate(response.json()["pem"].encode())
        assert cert.subject.rfc4514_string() == f"CN={device_id}"


# --- the CLI ---------------------------------------------------------------------------

CLI_VECTORS: dict[str, tuple[Callable[[str], str], bool]] = {
    # name: (CSR text for the device, target an unknown device)
    "garbage-instead-of-csr": (lambda d: "not a CSR at all\n", False),
    "asks-for-ca-basic-constraints": (lambda d: _csr(d, extensions=[_CA]), False),
    "cn-names-another-device": (lambda d: _csr(d, cn=f"{d}-other"), False),
    "ed25519-key": (lambda d: _csr(d, ed25519.Ed25519PrivateKey.generate()), False),
    "unknown-device": (lambda d: _csr(d), True),
}


@pytest.mark.parametrize(("make_csr", "unknown"), CLI_VECTORS.values(), ids=CLI_VECTORS.keys())
def test_cli_refuses_with_hint_and_writes_no_file(
        server: RunningServer, tmp_path: Path, make_csr: Callable[[str], str],
        unknown: bool) -> None:
    with server.admin() as admin:
        device_id = _new_device(admin)
        target = f"{device_id}-ghost" if unknown else device_id
        before = _observable(admin, target)
        csr_file = tmp_path / "request.csr"
        csr_file.write_text(make_csr(device_id))
        out = tmp_path / "device.pem"

        result = server.cli("cert", "issue", "--device", target, "--csr", str(csr_file),
                            "--out", str(out), check=False)

        assert result.returncode != 0, result.stdout
        assert "error:" in result.stderr and "hint:" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists()
        assert _observable(admin, target) == before


def test_cli_control_a_good_csr_writes_the_certificate(server: RunningServer,
                                                       tmp_path: Path) -> None:
    with server.admin() as admin:
        device_id = _new_device(admin)
    csr_file = tmp_path / "request.csr"
    csr_file.write_text(_csr(device_id))
    out = tmp_path / "device.pem"
    result = server.cli("cert", "issue", "--device", device_id, "--csr", str(csr_file),
                        "--out", str(out), check=False)
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    assert cert.subject.rfc4514_string() == f"CN={device_id}"


def test_cli_accepts_a_der_csr(server: RunningServer, tmp_path: Path) -> None:
    with server.admin() as admin:
        device_id = _new_device(admin)
    csr_file = tmp_path / "request.der"
    csr_file.write_bytes(x509.load_pem_x509_csr(_csr(device_id).encode())
                         .public_bytes(serialization.Encoding.DER))
    out = tmp_path / "device.pem"
    result = server.cli("cert", "issue", "--device", device_id, "--csr", str(csr_file),
                        "--out", str(out), check=False)
    assert result.returncode == 0, result.stderr
    assert x509.load_pem_x509_certificate(out.read_bytes()).subject.rfc4514_string() == (
        f"CN={device_id}")


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\xff", b"\x30\x03\x02\x01\x00"],
                         ids=["binary-garbage", "der-but-not-a-csr"])
def test_cli_binary_non_csr_is_refused_with_hint(server: RunningServer, tmp_path: Path,
                                                 content: bytes) -> None:
    with server.admin() as admin:
        device_id = _new_device(admin)
    csr_file = tmp_path / "request.der"
    csr_file.write_bytes(content)
    out = tmp_path / "device.pem"
    result = server.cli("cert", "issue", "--device", device_id, "--csr", str(csr_file),
                        "--out", str(out), check=False)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode != 0
    assert "error:" in result.stderr and "hint:" in result.stderr
    assert not out.exists()
