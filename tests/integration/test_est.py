"""EST (RFC 7030) end to end: a real `fleetward serve`, real TLS, and clients nobody here
wrote (openssl, curl), plus the issue-3 attack table over the wire.

Time-dependent rules (expired certificates, grace window) are in
tests/unit/test_enrollment_service.py with a frozen clock.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from sqlalchemy import create_engine, text

from tests.conftest import RunningServer, start_server, stop_server
from tests.integration.enroll_helpers import make_oem_ca

OVERLAP_SECONDS = 3
RETRY_AFTER_SECONDS = 7


@pytest.fixture(scope="module")
def est(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("est") / "data"
    server = start_server(data_dir, settings={"enroll": {
        "reenroll_overlap_seconds": OVERLAP_SECONDS, "supersede_sweep_seconds": 1,
        "approval_retry_after_seconds": RETRY_AFTER_SECONDS}})
    yield server
    stop_server(server)


def url(server: RunningServer, operation: str, label: str | None = None) -> str:
    prefix = f"/.well-known/est/{label}" if label else "/.well-known/est"
    return f"https://127.0.0.1:{server.device_port}{prefix}/{operation}"


def add_device(server: RunningServer, device_id: str, type_name: str = "default") -> None:
    with server.admin() as client:
        response = client.post("/v1/devices", json={"id": device_id, "type": type_name})
    assert response.status_code == 201, response.text


def device_token(server: RunningServer, device_id: str) -> str:
    with server.admin() as client:
        response = client.post(f"/v1/devices/{device_id}/bootstrap-tokens",
                               json={"ttl_hours": 1})
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def openssl_csr(tmp: Path, name: str, cn: str | None) -> tuple[Path, Path]:
    """`openssl req` as in RFC 7030's examples; returns (base64 DER CSR file, key file)."""
    key, der = tmp / f"{name}.key", tmp / f"{name}.csr.der"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
                    "-subj", f"/CN={cn}" if cn else "/", "-outform", "DER", "-out", str(der)],
                   check=True, capture_output=True)
    b64 = tmp / f"{name}.csr.b64"
    b64.write_bytes(base64.encodebytes(der.read_bytes()))
    return b64, key


def curl(server: RunningServer, *args: str) -> tuple[int, dict[str, str], bytes]:
    """Run curl against the device listener; returns (status, headers, body)."""
    result = subprocess.run(
        ["curl", "-sS", "--cacert", str(server.chain), "-D", "-", "-o", "-",
         "-H", "Content-Type: application/pkcs10", *args],
        capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, body


def certs_from(body: bytes, tmp: Path, name: str) -> Path:
    """`openssl pkcs7 -print_certs` on a base64 certs-only response."""
    der = tmp / f"{name}.p7b"
    der.write_bytes(base64.b64decode(body))
    out = tmp / f"{name}.pem"
    subprocess.run(["openssl", "pkcs7", "-inform", "DER", "-in", str(der), "-print_certs",
                    "-out", str(out)], check=True, capture_output=True)
    return out


def cacerts_file(server: RunningServer, tmp: Path) -> Path:
    status, headers, body = curl(server, url(server, "cacerts"))
    assert status == 200
    assert headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
    assert headers["content-transfer-encoding"] == "base64"
    return certs_from(body, tmp, "cacerts")


def openssl_verify(ca: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)],
                          capture_output=True, text=True)


def audit(server: RunningServer, action: str) -> list[dict[str, object]]:
    with server.admin() as client:
        items = client.get("/v1/audit", params={"action": action, "limit": 1000}).json()["items"]
    return list(items)


def certificate(server: RunningServer, serial: int) -> dict[str, object]:
    with server.admin() as client:
        return dict(client.get(f"/v1/certificates/{serial:x}").json())


def serial_of(pem: Path) -> int:
    return x509.load_pem_x509_certificate(pem.read_bytes()).serial_number


def enroll_with_curl(server: RunningServer, tmp: Path, device_id: str) -> tuple[Path, Path]:
    add_device(server, device_id)
    token = device_token(server, device_id)
    csr, key = openssl_csr(tmp, device_id, device_id)
    status, _, body = curl(server, "-u", f"{device_id}:{token}", "--data-binary", f"@{csr}",
                           url(server, "simpleenroll"))
    assert status == 200, body
    return certs_from(body, tmp, device_id), key


# --- acceptance 1 and 2: openssl + curl ------------------------------------------------


def test_enrollment_with_openssl_and_curl_only(est: RunningServer, tmp_path: Path) -> None:
    cert, _ = enroll_with_curl(est, tmp_path, "curl-1")
    ca = cacerts_file(est, tmp_path)
    verified = openssl_verify(ca, cert)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    text_out = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-text"],
                              capture_output=True, text=True, check=True).stdout
    assert "Subject: CN = curl-1" in text_out
    assert "URI:urn:fleetward:device:curl-1" in text_out
    assert "TLS Web Client Authentication" in text_out
    # Negative control: a certificate from another CA does not verify against cacerts.
    other_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "curl-1")])
    now = dt.datetime.now(dt.UTC)
    foreign = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(other_key.public_key()).serial_number(7)
               .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
               .sign(other_key, hashes.SHA256()))
    (tmp_path / "foreign.pem").write_bytes(foreign.public_bytes(serialization.Encoding.PEM))
    assert openssl_verify(ca, tmp_path / "foreign.pem").returncode != 0
    assert audit(est, "enroll.succeeded")[-1]["details"]["method"] == "bootstrap-token"


def test_cacerts_holds_issuing_and_root(est: RunningServer, tmp_path: Path) -> None:
    status, _, body = curl(est, url(est, "cacerts"))
    certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    root = x509.load_pem_x509_certificate((est.data_dir / "certs" / "root-ca.pem").read_bytes())
    assert status == 200 and root in certs and len(certs) == 2


def test_csrattrs_asks_for_p256_and_sha256(est: RunningServer) -> None:
    status, headers, body = curl(est, url(est, "csrattrs"))
    parsed = subprocess.run(["openssl", "asn1parse", "-inform", "DER"],
                            input=base64.b64decode(body), capture_output=True, check=True)
    assert status == 200 and headers["content-type"] == "application/csrattrs"
    out = parsed.stdout.decode()
    assert "ecdsa-with-SHA256" in out and "id-ecPublicKey" in out and "prime256v1" in out


def test_reenrollment_with_curl_cert_and_key_supersedes_after_overlap(
        est: RunningServer, tmp_path: Path) -> None:
    old_cert, old_key = enroll_with_curl(est, tmp_path, "curl-re")
    csr, _new_key = openssl_csr(tmp_path, "curl-re-2", "curl-re")  # key rotation
    status, _, body = curl(est, "--cert", str(old_cert), "--key", str(old_key),
                           "--data-binary", f"@{csr}", url(est, "simplereenroll"))
    assert status == 200, body
    new_cert = certs_from(body, tmp_path, "curl-re-new")
    assert openssl_verify(cacerts_file(est, tmp_path), new_cert).returncode == 0
    old_serial, new_serial = serial_of(old_cert), serial_of(new_cert)
    assert certificate(est, old_serial)["status"] == "valid"  # inside the overlap
    assert certificate(est, old_serial)["superseded_by"] == f"{new_serial:x}"
    deadline = time.monotonic() + OVERLAP_SECONDS + 10
    while certificate(est, old_serial)["status"] != "revoked":
        assert time.monotonic() < deadline, "superseded certificate was never revoked"
        time.sleep(0.3)
    assert certificate(est, old_serial)["revocation_reason"] == "superseded"
    assert certificate(est, new_serial)["status"] == "valid"
    # The superseded (now revoked) certificate cannot re-enroll again.
    status, _, body = curl(est, "--cert", str(old_cert), "--key", str(old_key),
                           "--data-binary", f"@{csr}", url(est, "simplereenroll"))
    assert status == 403 and b"revoked" in body


def test_a_lost_reenrollment_answer_is_resent_for_the_same_key(est: RunningServer,
                                                               tmp_path: Path) -> None:
    old_cert, old_key = enroll_with_curl(est, tmp_path, "curl-lost")
    csr, _ = openssl_csr(tmp_path, "curl-lost-2", None)
    first = post_csr(est, csr, "--cert", str(old_cert), "--key", str(old_key),
                     operation="simplereenroll")
    # The answer was lost; the device still holds the old certificate and retries.
    again = post_csr(est, csr, "--cert", str(old_cert), "--key", str(old_key),
                     operation="simplereenroll")
    assert first[0] == again[0] == 200
    assert serial_of(certs_from(first[1], tmp_path, "lost-1")) == serial_of(
        certs_from(again[1], tmp_path, "lost-2"))
    # A CSR for any other key is a second identity, and refused.
    other, _ = openssl_csr(tmp_path, "curl-lost-3", None)
    status, body = post_csr(est, other, "--cert", str(old_cert), "--key", str(old_key),
                            operation="simplereenroll")
    assert status == 403 and b"already replaced" in body
    with est.admin() as client:
        assert len(client.get("/v1/devices/curl-lost/certificates").json()["items"]) == 2


# --- acceptance 4: the attack table over the wire --------------------------------------


def refused_reasons(server: RunningServer) -> list[str]:
    return [str(e["details"]["reason"]) for e in audit(server, "enroll.refused")]


def post_csr(server: RunningServer, csr: Path, *auth: str,
             operation: str = "simpleenroll") -> tuple[int, bytes]:
    status, _, body = curl(server, *auth, "--data-binary", f"@{csr}", url(server, operation))
    return status, body


def test_token_replay_is_refused_and_audited(est: RunningServer, tmp_path: Path) -> None:
    add_device(est, "atk-replay")
    token = device_token(est, "atk-replay")
    csr, _ = openssl_csr(tmp_path, "r1", "atk-replay")
    assert post_csr(est, csr, "-u", f"atk-replay:{token}")[0] == 200
    status, body = post_csr(est, csr, "-u", f"atk-replay:{token}")
    assert status == 401 and b"already used" in body
    assert refused_reasons(est)[-1] == "token already used"


def test_expired_token_is_refused_and_audited(est: RunningServer, tmp_path: Path) -> None:
    add_device(est, "atk-expired")
    token = device_token(est, "atk-expired")
    token_id = token.split(".")[0].removeprefix("fwb_")
    # Time passes: the token's expiry is moved into the past in the server's database.
    engine = create_engine(f"sqlite:///{est.data_dir / 'fleetward.db'}")
    with engine.begin() as conn:
        changed = conn.execute(text("UPDATE bootstrap_tokens SET expires_at = :past "
                                    "WHERE token_id = :tid"),
                               {"past": dt.datetime(2020, 1, 1), "tid": token_id}).rowcount
    engine.dispose()
    assert changed == 1
    csr, _ = openssl_csr(tmp_path, "e1", "atk-expired")
    status, body = post_csr(est, csr, "-u", f"atk-expired:{token}")
    assert status == 401 and b"expired" in body
    assert refused_reasons(est)[-1] == "token expired"


def test_token_bound_to_another_device_is_refused(est: RunningServer, tmp_path: Path) -> None:
    add_device(est, "atk-owner")
    add_device(est, "atk-thief")
    token = device_token(est, "atk-owner")
    csr, _ = openssl_csr(tmp_path, "b1", "atk-thief")
    status, body = post_csr(est, csr, "-u", f"atk-thief:{token}")
    assert status == 401 and b"bound to another device" in body
    assert refused_reasons(est)[-1] == "token is bound to another device"


def test_batch_token_past_its_count_is_refused(est: RunningServer, tmp_path: Path) -> None:
    with est.admin() as client:
        response = client.post("/v1/bootstrap-tokens",
                               json={"type": "default", "count": 2, "ttl_hours": 1})
    assert response.status_code == 201, response.text
    batch = response.json()["token"]
    for device_id in ("atk-batch-1", "atk-batch-2"):
        csr, _ = openssl_csr(tmp_path, device_id, device_id)
        assert post_csr(est, csr, "-u", f"{device_id}:{batch}")[0] == 200
    csr, _ = openssl_csr(tmp_path, "atk-batch-3", "atk-batch-3")
    status, body = post_csr(est, csr, "-u", f"atk-batch-3:{batch}")
    assert status == 401 and b"used up" in body
    with est.admin() as client:
        assert client.get("/v1/devices/atk-batch-3").status_code == 404
        assert client.get("/v1/devices/atk-batch-2").json()["state"] == "active"


def test_csr_for_another_identity_is_refused(est: RunningServer, tmp_path: Path) -> None:
    add_device(est, "atk-csr")
    add_device(est, "atk-csr-victim")
    token = device_token(est, "atk-csr")
    for subject in ("atk-csr-victim", "admin"):
        csr, _ = openssl_csr(tmp_path, f"c-{subject}", subject)
        status, body = post_csr(est, csr, "-u", f"atk-csr:{token}")
        assert status == 422 and b"not device 'atk-csr'" in body
        assert refused_reasons(est)[-1].startswith(f"the CSR subject names '{subject}'")
    csr, _ = openssl_csr(tmp_path, "c-ok", "atk-csr")  # the token was not burned
    assert post_csr(est, csr, "-u", f"atk-csr:{token}")[0] == 200


def test_revoked_and_retired_certificates_cannot_reenroll(est: RunningServer,
                                                          tmp_path: Path) -> None:
    revoked_cert, revoked_key = enroll_with_curl(est, tmp_path, "atk-revoked")
    retired_cert, retired_key = enroll_with_curl(est, tmp_path, "atk-retired")
    with est.admin() as client:
        assert client.post(f"/v1/certificates/{serial_of(revoked_cert):x}/revoke",
                           json={"reason": "keyCompromise"}).status_code == 200
        assert client.post("/v1/devices/atk-retired/state",
                           json={"state": "retired"}).status_code == 200
    for cert, key in ((revoked_cert, revoked_key), (retired_cert, retired_key)):
        csr, _ = openssl_csr(tmp_path, f"{cert.stem}-again", None)
        status, body = post_csr(est, csr, "--cert", str(cert), "--key", str(key),
                                operation="simplereenroll")
        assert status == 403 and b"revoked" in body, body
        assert "revoked" in refused_reasons(est)[-1]


def test_requests_without_credentials_get_a_challenge(est: RunningServer,
                                                      tmp_path: Path) -> None:
    csr, _ = openssl_csr(tmp_path, "anon", "anon")
    status, headers, body = curl(est, "--data-binary", f"@{csr}", url(est, "simpleenroll"))
    assert status == 401 and "Basic" in headers["www-authenticate"]
    assert json.loads(body)["hint"].startswith("send HTTP Basic")
    status, _, body = curl(est, "--data-binary", f"@{csr}", url(est, "simplereenroll"))
    assert status == 401 and b"current certificate" in body


@pytest.mark.parametrize(("content_type", "body", "status"), [
    ("application/json", b"{}", 415),
    ("application/pkcs10", b"!!not base64!!", 400),
    ("application/pkcs10", base64.encodebytes(b"\x30\x03\x02\x01\x00"), 400),
    ("application/pkcs10", b"", 400),
])
def test_malformed_requests_get_problem_details(est: RunningServer, content_type: str,
                                                body: bytes, status: int) -> None:
    add_device(est, f"atk-bad-{status}-{len(body)}")
    token = device_token(est, f"atk-bad-{status}-{len(body)}")
    refused_before = len(refused_reasons(est))
    with httpx.Client(verify=est.tls()) as client:
        response = client.post(url(est, "simpleenroll"), content=body,
                               headers={"Content-Type": content_type},
                               auth=(f"atk-bad-{status}-{len(body)}", token))
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["detail"]
    assert len(refused_reasons(est)) == refused_before + 1  # audited, even this early


def test_unknown_label_is_refused(est: RunningServer, tmp_path: Path) -> None:
    add_device(est, "atk-label")
    token = device_token(est, "atk-label")
    csr, _ = openssl_csr(tmp_path, "l1", "atk-label")
    status, _, body = curl(est, "-u", f"atk-label:{token}", "--data-binary", f"@{csr}",
                           url(est, "simpleenroll", label="gateway"))
    assert status == 422 and b"may not enroll for the 'gateway' profile" in body
    status, _, body = curl(est, "-u", f"atk-label:{token}", "--data-binary", f"@{csr}",
                           url(est, "simpleenroll", label="device"))
    assert status == 200


def test_fifty_concurrent_uses_of_one_token_yield_one_certificate(
        est: RunningServer) -> None:
    add_device(est, "atk-race")
    token = device_token(est, "atk-race")
    bodies = []
    for _ in range(50):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atk-race")]))
               .sign(key, hashes.SHA256()))
        bodies.append(base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)))
    statuses: list[int] = []
    start = threading.Barrier(50)

    def attempt(body: bytes) -> None:
        with httpx.Client(verify=est.tls(), timeout=60) as client:
            start.wait()
            statuses.append(client.post(url(est, "simpleenroll"), content=body,
                                        headers={"Content-Type": "application/pkcs10"},
                                        auth=("atk-race", token)).status_code)
    threads = [threading.Thread(target=attempt, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] + [401] * 49
    with est.admin() as client:
        certs = client.get("/v1/devices/atk-race/certificates").json()["items"]
    assert len(certs) == 1
    assert refused_reasons(est).count("token already used") >= 49


# --- manufacturer certificates over TLS -------------------------------------------------


def register_oem(server: RunningServer, name: str, cert: x509.Certificate,
                 require_approval: bool) -> None:
    with server.admin() as client:
        created = client.post("/v1/device-types", json={"name": f"{name}-type"})
        assert created.status_code in (201, 409), created.text
        response = client.post("/v1/ca/oem", json={
            "name": name, "certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
            "device_type": f"{name}-type", "require_approval": require_approval})
    assert response.status_code == 201, response.text


def wait_for_tls_trust(server: RunningServer, cert: Path, key: Path) -> None:
    """The device listener picks up a new OEM CA within a few seconds."""
    deadline = time.monotonic() + 15
    while True:
        result = subprocess.run(["curl", "-sS", "--cacert", str(server.chain), "--cert",
                                 str(cert), "--key", str(key), "-o", "/dev/null",
                                 f"https://127.0.0.1:{server.device_port}/v1/health"],
                                capture_output=True)
        if result.returncode == 0:
            return
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.5)


def test_idevid_enrollment_with_approval_answers_202_then_issues(
        est: RunningServer, tmp_path: Path) -> None:
    oem = make_oem_ca("acme")
    register_oem(est, "acme", oem.cert, require_approval=True)
    idevid, idevid_key = oem.idevid(tmp_path, "ACME-0001")
    wait_for_tls_trust(est, idevid, idevid_key)
    csr, _ = openssl_csr(tmp_path, "acme-1", None)
    status, headers, _ = curl(est, "--cert", str(idevid), "--key", str(idevid_key),
                              "--data-binary", f"@{csr}", url(est, "simpleenroll"))
    assert status == 202 and headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    with est.admin() as client:
        device = client.get("/v1/devices/ACME-0001").json()
        assert (device["state"], device["type"]) == ("registered", "acme-type")
        assert client.post("/v1/enrollments/ACME-0001/approve").status_code == 200
    status, _, body = curl(est, "--cert", str(idevid), "--key", str(idevid_key),
                           "--data-binary", f"@{csr}", url(est, "simpleenroll"))
    assert status == 200
    cert = certs_from(body, tmp_path, "acme-1")
    assert openssl_verify(cacerts_file(est, tmp_path), cert).returncode == 0
    # The operational certificate now re-enrolls; the IDevID cannot use simplereenroll.
    status, _, body = curl(est, "--cert", str(idevid), "--key", str(idevid_key),
                           "--data-binary", f"@{csr}", url(est, "simplereenroll"))
    assert status == 401 and b"issued by this CA" in body


def _tls_refusals(server: RunningServer, source_host: str) -> list[dict[str, Any]]:
    rows = [cast(dict[str, Any], event) for event in audit(server, "enroll.refused")]
    return [row for row in rows if row["details"]["method"] == "tls-client-certificate"
            and str(row["details"]["source"]).startswith(f"{source_host}:")]


def test_idevid_from_an_unregistered_ca_is_refused_at_tls_and_audited(
        est: RunningServer, tmp_path: Path) -> None:
    """Each attempt comes from its own loopback address: refusals are audited once per
    peer and reason per window, and earlier tests have been refused from 127.0.0.1."""
    idevid, idevid_key = make_oem_ca("rogue").idevid(tmp_path, "ROGUE-1")
    csr, _ = openssl_csr(tmp_path, "rogue-1", None)

    def attempt(source_host: str) -> None:
        result = subprocess.run(
            ["curl", "-sS", "--interface", source_host, "--cacert", str(est.chain),
             "--cert", str(idevid), "--key", str(idevid_key),
             "-H", "Content-Type: application/pkcs10", "--data-binary", f"@{csr}",
             url(est, "simpleenroll")], capture_output=True, timeout=30)
        assert result.returncode != 0  # the handshake is refused

    def wait_for_refusal(source_host: str) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while not (rows := _tls_refusals(est, source_host)):
            assert time.monotonic() < deadline, f"TLS refusal from {source_host} not audited"
            time.sleep(0.2)
        return rows[-1]

    attempt("127.0.0.7")
    event = wait_for_refusal("127.0.0.7")
    assert "unable to get local issuer certificate" in str(event["details"]["reason"])
    for _ in range(5):  # the same peer retrying: no row per handshake
        attempt("127.0.0.7")
    attempt("127.0.0.8")  # negative control: another peer is still recorded
    wait_for_refusal("127.0.0.8")
    assert len(_tls_refusals(est, "127.0.0.7")) == 1
    with est.admin() as client:
        assert client.get("/v1/devices/ROGUE-1").status_code == 404
