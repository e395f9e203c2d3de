"""Defects found in review, each pinned by the test named after it."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from sqlalchemy.exc import IntegrityError

from fleetward.ca import OcspResponder
from fleetward.ca.setup import register_oem_ca
from fleetward.crypto.x509util import issuer_hashes
from fleetward.errors import InvalidInput, PolicyViolation
from fleetward.model import AuditEvent, CertificateRecord, LifecycleState
from fleetward.store import certificates as cert_rows
from tests.conftest import Stack

KEY = ec.generate_private_key(ec.SECP256R1())
CSR = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
       .sign(KEY, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def test_compromise_revokes_every_certificate_not_just_one_page(sqlite_stack: Stack) -> None:
    sqlite_stack.add_device("many-certs")
    count = 1005  # more than list_certificates' default page of 1000
    for _ in range(count):
        sqlite_stack.registry.issue_certificate("many-certs", CSR, "device", "test")
    change = sqlite_stack.registry.change_state("many-certs", LifecycleState.COMPROMISED, "test")
    assert len(change.revoked) == count
    with sqlite_stack.db.read() as conn:
        live = cert_rows.list_certificates(conn, device_id="many-certs", revoked=False,
                                           limit=None)
        crl = x509.load_der_x509_crl(sqlite_stack.authority.crl_der(conn, "issuing"))
    assert live == []
    assert len(crl) == count


def test_device_path_cannot_revoke_the_issuing_ca_or_server_certificates(stack: Stack) -> None:
    issuing_serial = stack.authority.issuing.certificate.serial_number
    with pytest.raises(PolicyViolation) as caught:
        stack.registry.revoke_certificate(issuing_serial, "key_compromise", "operator:x")
    assert caught.value.hint
    with stack.db.read() as conn:
        assert cert_rows.get_certificate(conn, issuing_serial).revoked_at is None  # type: ignore[union-attr]
        root_crl = x509.load_der_x509_crl(stack.authority.crl_der(conn, "root"))
    assert root_crl.get_revoked_certificate_by_serial_number(issuing_serial) is None


def test_overlong_attacker_chosen_audit_target_is_capped_not_lost(stack: Stack) -> None:
    with stack.db.transaction() as conn:
        record = stack.audit.append(conn, AuditEvent(
            action="admin.forbidden", actor="x" * 500, target="/v1/" + "a" * 5000,
            outcome="failure"))
    with stack.db.read() as conn:
        report = stack.audit.verify(conn)
    assert report.ok and record.seq == report.rows_checked


@pytest.mark.parametrize("name", ["a/b c?", "UPPER", "x" * 65, "", "../etc"])
def test_oem_ca_names_that_would_break_urls_are_refused(sqlite_stack: Stack, name: str) -> None:
    with sqlite_stack.db.transaction() as conn, pytest.raises(InvalidInput):
        register_oem_ca(conn, name=name, cert_pem=sqlite_stack.authority.issuing.pem.encode(),
                        device_type="sensor", actor="test", now=sqlite_stack.clock.now(),
                        audit=sqlite_stack.audit)


@pytest.mark.parametrize(("nonce", "status"), [
    (b"", ocsp.OCSPResponseStatus.MALFORMED_REQUEST),  # RFC 8954 §2.1: 1..32 octets
    (b"\x01" * 33, ocsp.OCSPResponseStatus.MALFORMED_REQUEST),
    (b"\x01" * 32, ocsp.OCSPResponseStatus.SUCCESSFUL),
])
def test_ocsp_nonce_length_is_enforced(sqlite_stack: Stack, nonce: bytes,
                                       status: ocsp.OCSPResponseStatus) -> None:
    issuing = sqlite_stack.authority.issuing.certificate
    request = (ocsp.OCSPRequestBuilder()
               .add_certificate_by_hash(*_issuer_hashes(issuing), 12345, hashes.SHA256())
               .add_extension(x509.OCSPNonce(nonce), critical=False).build())
    with sqlite_stack.db.read() as conn:
        der = OcspResponder(sqlite_stack.authority).respond(
            conn, request.public_bytes(serialization.Encoding.DER))
    assert ocsp.load_der_ocsp_response(der).response_status == status


def _issuer_hashes(cert: x509.Certificate) -> tuple[bytes, bytes]:
    return issuer_hashes(cert, hashes.SHA256())


def test_integrity_error_other_than_a_serial_is_not_taken_for_a_collision(
        sqlite_stack: Stack) -> None:
    now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    orphan = CertificateRecord(serial=7, fingerprint_sha256="ab" * 32, ca_name="no-such-ca",
                               profile="device", subject="CN=x", not_before=now,
                               not_after=now, pem="-", issued_at=now)
    with sqlite_stack.db.transaction() as conn, pytest.raises(IntegrityError):
        cert_rows.insert_certificate(conn, orphan)
