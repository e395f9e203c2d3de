"""Profiles give each certificate its purpose; CRLs are re-signed before nextUpdate."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fleetward.config import CAConfig
from tests.conftest import Stack


def _csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize(("profile", "days"), [
    ("device", CAConfig().device_validity_days),
    ("gateway", CAConfig().gateway_validity_days),
    ("bootstrap", CAConfig().bootstrap_validity_days),
])
def test_client_profiles_carry_client_auth_and_their_validity(
        sqlite_stack: Stack, profile: str, days: int) -> None:
    sqlite_stack.add_device(f"p-{profile}")
    record = sqlite_stack.registry.issue_certificate(f"p-{profile}", _csr(), profile, "test")
    cert = x509.load_pem_x509_certificate(record.pem.encode())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    backdate = dt.timedelta(seconds=CAConfig().backdate_seconds)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=days) + backdate
    assert record.profile == profile


def test_crl_is_resigned_before_next_update_and_not_otherwise(sqlite_stack: Stack) -> None:
    config = sqlite_stack.authority.config
    with sqlite_stack.db.transaction() as conn:
        assert sqlite_stack.authority.refresh_due_crls(conn) == []
        first = x509.load_der_x509_crl(sqlite_stack.authority.crl_der(conn, "issuing"))
    sqlite_stack.clock.advance(dt.timedelta(
        hours=config.crl_validity_hours - config.crl_refresh_margin_hours, seconds=1))
    with sqlite_stack.db.transaction() as conn:
        assert sorted(sqlite_stack.authority.refresh_due_crls(conn)) == ["issuing", "root"]
        second = x509.load_der_x509_crl(sqlite_stack.authority.crl_der(conn, "issuing"))
    number = x509.CRLNumber
    assert (second.extensions.get_extension_for_class(number).value.crl_number
            == first.extensions.get_extension_for_class(number).value.crl_number + 1)
    assert second.next_update_utc == sqlite_stack.clock.now() + dt.timedelta(
        hours=config.crl_validity_hours)
    assert second.next_update_utc > first.next_update_utc


def test_expired_revoked_certificates_leave_the_crl(sqlite_stack: Stack) -> None:
    sqlite_stack.add_device("p-expiring")
    record = sqlite_stack.registry.issue_certificate("p-expiring", _csr(), "bootstrap", "test")
    sqlite_stack.registry.revoke_certificate(record.serial, "superseded", "test")
    with sqlite_stack.db.read() as conn:
        crl = x509.load_der_x509_crl(sqlite_stack.authority.crl_der(conn, "issuing"))
    assert crl.get_revoked_certificate_by_serial_number(record.serial) is not None
    sqlite_stack.clock.advance(dt.timedelta(days=CAConfig().bootstrap_validity_days + 1))
    with sqlite_stack.db.transaction() as conn:
        sqlite_stack.authority.refresh_crl(conn, "issuing")
        crl = x509.load_der_x509_crl(sqlite_stack.authority.crl_der(conn, "issuing"))
    assert crl.get_revoked_certificate_by_serial_number(record.serial) is None
