"""EST enrollment logic (enroll/est.py) on real SQLite and PostgreSQL, with a frozen clock.

The HTTP wire format and real clients are in tests/integration/test_est.py; here the
time-dependent rules (expiry, grace window, overlap) and every refusal of the attack
table are driven directly, each checked for its audit row and for what it did NOT do.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select

from fleetward.ca.setup import register_oem_ca
from fleetward.config import EnrollConfig
from fleetward.enroll import (
    Attempt,
    BootstrapRefused,
    BootstrapTokens,
    EnrollmentRefused,
    EnrollmentService,
)
from fleetward.errors import FleetwardError, PolicyViolation, Unauthenticated
from fleetward.model import DeviceType, LifecycleState
from fleetward.store import devices as device_rows
from fleetward.store.schema import audit_events, bootstrap_tokens, certificates, devices
from tests.conftest import Stack

DAY = dt.timedelta(days=1)
ATTEMPT = Attempt("test", "192.0.2.7", "simpleenroll")


@pytest.fixture
def service(stack: Stack) -> EnrollmentService:
    return EnrollmentService(stack.db, stack.registry,
                             BootstrapTokens(stack.db, stack.audit, stack.clock),
                             stack.audit, stack.clock, EnrollConfig(reenroll_overlap_seconds=3600))


def csr_for(key: ec.EllipticCurvePrivateKey, cn: str | None) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def refusals(stack: Stack) -> list[dict[str, str]]:
    with stack.db.read() as conn:
        rows = conn.execute(select(audit_events.c.details)
                            .where(audit_events.c.action == "enroll.refused")
                            .order_by(audit_events.c.seq)).scalars().all()
    return [json.loads(r) for r in rows]


def count(stack: Stack, table: object) -> int:
    with stack.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def token_for(service: EnrollmentService, stack: Stack, device_id: str) -> str:
    stack.add_device(device_id)
    return service.tokens.issue_for_device(device_id, DAY, "operator:test").token


def enrolled(service: EnrollmentService, stack: Stack, device_id: str,
             key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    token = token_for(service, stack, device_id)
    result = service.enroll_with_token(token=token, device_id=device_id,
                                       csr_data=csr_for(key, device_id), label=None,
                                       attempt=ATTEMPT)
    assert result.record is not None
    return x509.load_pem_x509_certificate(result.record.pem.encode())


# --- bootstrap tokens -------------------------------------------------------------------


def test_token_enrollment_activates_the_device_and_audits(stack: Stack,
                                                          service: EnrollmentService) -> None:
    cert = enrolled(service, stack, "est-1", new_key())
    assert cert.subject.rfc4514_string() == "CN=est-1"
    assert stack.registry.get_device("est-1").state is LifecycleState.ACTIVE
    with stack.db.read() as conn:
        actions = conn.execute(select(audit_events.c.action)).scalars().all()
    assert "enroll.succeeded" in actions and "bootstrap.token_used" in actions


def test_bearer_token_alone_enrolls_its_bound_device(stack: Stack,
                                                     service: EnrollmentService) -> None:
    token = token_for(service, stack, "est-bearer")
    result = service.enroll_with_token(token=token, device_id=None,
                                       csr_data=csr_for(new_key(), None), label=None,
                                       attempt=ATTEMPT)
    assert result.device_id == "est-bearer" and result.record is not None


def test_refused_csr_does_not_burn_the_token(stack: Stack, service: EnrollmentService) -> None:
    token = token_for(service, stack, "est-victim")
    stack.add_device("est-other")
    before = count(stack, certificates)
    with pytest.raises(PolicyViolation, match="not device 'est-victim'"):
        service.enroll_with_token(token=token, device_id="est-victim",
                                  csr_data=csr_for(new_key(), "est-other"), label=None,
                                  attempt=ATTEMPT)
    assert refusals(stack)[-1]["reason"].startswith("the CSR subject names 'est-other'")
    assert count(stack, certificates) == before
    # The token still works for the right identity: the refusal rolled its use back.
    result = service.enroll_with_token(token=token, device_id="est-victim",
                                       csr_data=csr_for(new_key(), "est-victim"), label=None,
                                       attempt=ATTEMPT)
    assert result.record is not None


def test_batch_token_registers_new_devices_up_to_its_count(stack: Stack,
                                                            service: EnrollmentService) -> None:
    batch = service.tokens.issue_batch("sensor", 2, DAY, "operator:test", owner="plant-7")
    for device_id in ("jit-1", "jit-2"):
        result = service.enroll_with_token(token=batch.token, device_id=device_id,
                                           csr_data=csr_for(new_key(), device_id), label=None,
                                           attempt=ATTEMPT)
        assert result.record is not None
        device = stack.registry.get_device(device_id)
        assert (device.type, device.owner, device.state) == ("sensor", "plant-7",
                                                             LifecycleState.ACTIVE)
    with pytest.raises(BootstrapRefused, match="used up"):
        service.enroll_with_token(token=batch.token, device_id="jit-3",
                                  csr_data=csr_for(new_key(), "jit-3"), label=None,
                                  attempt=ATTEMPT)
    with stack.db.read() as conn:
        assert device_rows.get_device(conn, "jit-3") is None  # not half-registered
    assert refusals(stack)[-1]["reason"] == "batch is used up"


def test_batch_token_cannot_take_over_an_existing_device(stack: Stack,
                                                         service: EnrollmentService) -> None:
    stack.add_device("existing")
    batch = service.tokens.issue_batch("sensor", 5, DAY, "operator:test")
    with pytest.raises(EnrollmentRefused, match="already registered"):
        service.enroll_with_token(token=batch.token, device_id="existing",
                                  csr_data=csr_for(new_key(), "existing"), label=None,
                                  attempt=ATTEMPT)
    with stack.db.read() as conn:  # the use was rolled back
        uses = conn.execute(select(bootstrap_tokens.c.uses)).scalar_one()
    assert uses == 0


def test_label_selects_only_profiles_the_type_allows(stack: Stack,
                                                     service: EnrollmentService) -> None:
    stack.registry.create_type("gw", "gateways", [], "operator:test",
                               enrollment_profiles=["device", "gateway"])
    token = token_for(service, stack, "sensor-gw-try")
    with pytest.raises(PolicyViolation, match="may not enroll for the 'gateway' profile"):
        service.enroll_with_token(token=token, device_id="sensor-gw-try",
                                  csr_data=csr_for(new_key(), None), label="gateway",
                                  attempt=ATTEMPT)
    stack.registry.create_device("gw-1", "gw", "acme", {}, "operator:test")
    gw_token = service.tokens.issue_for_device("gw-1", DAY, "operator:test").token
    result = service.enroll_with_token(token=gw_token, device_id="gw-1",
                                       csr_data=csr_for(new_key(), None), label="gateway",
                                       attempt=ATTEMPT)
    assert result.record is not None and result.record.profile == "gateway"


# --- re-enrollment ----------------------------------------------------------------------


def test_reenroll_rotates_key_and_supersedes_after_overlap(stack: Stack,
                                                           service: EnrollmentService) -> None:
    old = enrolled(service, stack, "re-1", new_key())
    result = service.reenroll(current=old, csr_data=csr_for(new_key(), "re-1"), label=None,
                              attempt=ATTEMPT)
    assert result.record is not None
    previous = stack.registry.get_certificate(old.serial_number)
    assert previous.revoked_at is None  # still valid during the overlap
    assert previous.superseded_by == result.record.serial
    assert service.sweep_superseded() == 0
    stack.clock.advance(dt.timedelta(seconds=3601))
    assert service.sweep_superseded() == 1
    revoked = stack.registry.get_certificate(old.serial_number)
    assert revoked.revocation_reason == "superseded"
    assert stack.registry.get_certificate(result.record.serial).revoked_at is None
    with pytest.raises(EnrollmentRefused, match="revoked"):
        service.reenroll(current=old, csr_data=csr_for(new_key(), "re-1"), label=None,
                         attempt=ATTEMPT)


def test_zero_overlap_revokes_at_once(stack: Stack, service: EnrollmentService) -> None:
    service.config = replace(service.config, reenroll_overlap_seconds=0)
    old = enrolled(service, stack, "re-0", new_key())
    service.reenroll(current=old, csr_data=csr_for(new_key(), None), label=None,
                     attempt=ATTEMPT)
    assert stack.registry.get_certificate(old.serial_number).revocation_reason == "superseded"


def test_a_superseded_certificate_cannot_fork_the_identity(stack: Stack,
                                                           service: EnrollmentService) -> None:
    old = enrolled(service, stack, "re-fork", new_key())
    service.reenroll(current=old, csr_data=csr_for(new_key(), None), label=None,
                     attempt=ATTEMPT)
    with pytest.raises(EnrollmentRefused, match="already replaced"):
        service.reenroll(current=old, csr_data=csr_for(new_key(), None), label=None,
                         attempt=ATTEMPT)


def test_lost_reenrollment_response_is_resent_not_reissued(stack: Stack,
                                                           service: EnrollmentService) -> None:
    old = enrolled(service, stack, "re-lost", new_key())
    rotated = new_key()
    first = service.reenroll(current=old, csr_data=csr_for(rotated, None), label=None,
                             attempt=ATTEMPT)
    before = count(stack, certificates)
    # The response never arrived: the device retries with its old certificate, same new key.
    again = service.reenroll(current=old, csr_data=csr_for(rotated, None), label=None,
                             attempt=ATTEMPT)
    assert first.record is not None and again.record is not None
    assert again.record.serial == first.record.serial
    assert count(stack, certificates) == before
    with stack.db.read() as conn:
        details = conn.execute(select(audit_events.c.details)
                               .where(audit_events.c.action == "enroll.succeeded")
                               .order_by(audit_events.c.seq.desc())).scalars().first()
    assert details is not None and json.loads(details)["resent"] is True


def test_lost_same_key_renewal_of_an_expired_certificate_is_resent(
        stack: Stack, service: EnrollmentService) -> None:
    key = new_key()
    old = enrolled(service, stack, "re-exp-lost", key)
    stack.clock.advance(old.not_valid_after_utc - stack.clock.now() + DAY)
    first = service.reenroll(current=None, csr_data=csr_for(key, None), label=None,
                             attempt=ATTEMPT)
    again = service.reenroll(current=None, csr_data=csr_for(key, None), label=None,
                             attempt=ATTEMPT)
    assert first.record is not None and again.record is not None
    assert again.record.serial == first.record.serial


def test_expired_certificate_reenrolls_with_same_key_inside_grace(
        stack: Stack, service: EnrollmentService) -> None:
    key = new_key()
    old = enrolled(service, stack, "re-exp", key)
    stack.clock.advance(old.not_valid_after_utc - stack.clock.now() + DAY)
    with pytest.raises(Unauthenticated, match="needs the current certificate"):
        service.reenroll(current=None, csr_data=csr_for(new_key(), None), label=None,
                         attempt=ATTEMPT)  # another key: nothing links it to the device
    result = service.reenroll(current=None, csr_data=csr_for(key, None), label=None,
                              attempt=ATTEMPT)
    assert result.device_id == "re-exp" and result.record is not None
    assert result.record.not_after > stack.clock.now()


def test_expired_certificate_outside_grace_is_refused(stack: Stack,
                                                      service: EnrollmentService) -> None:
    key = new_key()
    old = enrolled(service, stack, "re-late", key)
    stack.clock.advance(old.not_valid_after_utc - stack.clock.now()
                        + dt.timedelta(days=service.config.expired_grace_days, seconds=1))
    with pytest.raises(EnrollmentRefused, match="beyond the 30-day re-enrollment grace"):
        service.reenroll(current=None, csr_data=csr_for(key, None), label=None,
                         attempt=ATTEMPT)
    assert "grace window" in refusals(stack)[-1]["reason"]


def test_valid_certificate_key_without_tls_is_refused(stack: Stack,
                                                      service: EnrollmentService) -> None:
    key = new_key()
    enrolled(service, stack, "re-notls", key)
    with pytest.raises(Unauthenticated, match="still valid: present it over TLS"):
        service.reenroll(current=None, csr_data=csr_for(key, None), label=None,
                         attempt=ATTEMPT)


REENROLL_ATTACKS: list[tuple[str, Callable[[Stack, str], object], type[FleetwardError], str]] = [
    ("revoked", lambda s, d: s.registry.revoke_device_certificates(d, "keyCompromise",
                                                                   "operator:test"),
     EnrollmentRefused, "revoked"),
    ("retired", lambda s, d: s.registry.change_state(d, LifecycleState.RETIRED, "operator:t"),
     EnrollmentRefused, "revoked"),
    ("disabled", lambda s, d: s.registry.change_state(d, LifecycleState.DISABLED, "operator:t"),
     EnrollmentRefused, "disabled; it cannot re-enroll"),
]


@pytest.mark.parametrize(("case", "attack", "error", "reason"), REENROLL_ATTACKS,
                         ids=[a[0] for a in REENROLL_ATTACKS])
def test_reenroll_attack_table(stack: Stack, service: EnrollmentService, case: str,
                               attack: Callable[[Stack, str], object],
                               error: type[FleetwardError], reason: str) -> None:
    device_id = f"re-{case}"
    cert = enrolled(service, stack, device_id, new_key())
    attack(stack, device_id)
    before = count(stack, certificates)
    with pytest.raises(error, match=reason):
        service.reenroll(current=cert, csr_data=csr_for(new_key(), None), label=None,
                         attempt=ATTEMPT)
    assert count(stack, certificates) == before
    assert reason in refusals(stack)[-1]["reason"]


def test_foreign_certificate_cannot_reenroll(stack: Stack, service: EnrollmentService) -> None:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "re-1")])
    now = stack.clock.now()
    forged = (x509.CertificateBuilder().subject_name(name).issuer_name(
        stack.authority.issuing.certificate.subject).public_key(key.public_key())
        .serial_number(1234).not_valid_before(now).not_valid_after(now + DAY)
        .sign(key, hashes.SHA256()))
    with pytest.raises(Unauthenticated, match="issued by this CA"):
        service.reenroll(current=forged, csr_data=csr_for(new_key(), None), label=None,
                         attempt=ATTEMPT)


# --- manufacturer certificates (IDevID) -------------------------------------------------


def oem_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{name} IDevID CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY).not_valid_after(now + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def idevid(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
           serial_number: str) -> x509.Certificate:
    ca_key, ca_cert = ca
    key = new_key()
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - DAY)
            # IEEE 802.1AR §8.5: an IDevID has no meaningful expiry.
            .not_valid_after(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC))
            .sign(ca_key, hashes.SHA256()))


def register(stack: Stack, name: str, cert: x509.Certificate, approval: bool) -> None:
    with stack.db.transaction() as conn:
        device_rows.insert_type(conn, DeviceType(f"{name}-type", "OEM devices"), stack.clock.now())
        register_oem_ca(conn, name=name, cert_pem=cert.public_bytes(serialization.Encoding.PEM),
                        device_type=f"{name}-type", actor="operator:test",
                        now=stack.clock.now(), audit=stack.audit, enrollment_approval=approval)


def test_idevid_registers_the_device_just_in_time(stack: Stack,
                                                  service: EnrollmentService) -> None:
    ca = oem_ca("acme")
    register(stack, "acme", ca[1], approval=False)
    result = service.enroll_with_idevid(idevid=idevid(ca, "SN-1001"),
                                        csr_data=csr_for(new_key(), None), label=None,
                                        attempt=ATTEMPT)
    assert result.device_id == "SN-1001" and result.record is not None
    device = stack.registry.get_device("SN-1001")
    assert (device.type, device.state) == ("acme-type", LifecycleState.ACTIVE)


def test_idevid_enrollment_waits_for_approval(stack: Stack, service: EnrollmentService) -> None:
    ca = oem_ca("slow")
    register(stack, "slow", ca[1], approval=True)
    device_cert = idevid(ca, "SN-2002")
    pending = service.enroll_with_idevid(idevid=device_cert, csr_data=csr_for(new_key(), None),
                                         label=None, attempt=ATTEMPT)
    assert pending.pending and pending.retry_after_seconds == 60
    assert stack.registry.get_device("SN-2002").state is LifecycleState.REGISTERED
    assert [b.device_id for b in service.list_bindings("pending")] == ["SN-2002"]
    service.decide("SN-2002", approve=True, actor="operator:alice")
    result = service.enroll_with_idevid(idevid=device_cert, csr_data=csr_for(new_key(), None),
                                        label=None, attempt=ATTEMPT)
    assert result.record is not None


def test_rejected_idevid_enrollment_is_refused(stack: Stack, service: EnrollmentService) -> None:
    ca = oem_ca("nope")
    register(stack, "nope", ca[1], approval=True)
    device_cert = idevid(ca, "SN-3003")
    service.enroll_with_idevid(idevid=device_cert, csr_data=csr_for(new_key(), None),
                               label=None, attempt=ATTEMPT)
    service.decide("SN-3003", approve=False, actor="operator:alice")
    with pytest.raises(EnrollmentRefused, match="rejected"):
        service.enroll_with_idevid(idevid=device_cert, csr_data=csr_for(new_key(), None),
                                   label=None, attempt=ATTEMPT)


def test_idevid_from_unregistered_ca_is_refused(stack: Stack,
                                                service: EnrollmentService) -> None:
    registered = oem_ca("known")
    register(stack, "known", registered[1], approval=False)
    rogue = oem_ca("known")  # same name, different key: a look-alike CA
    before = count(stack, devices)
    with pytest.raises(EnrollmentRefused, match="not issued by a registered OEM CA"):
        service.enroll_with_idevid(idevid=idevid(rogue, "SN-4004"),
                                   csr_data=csr_for(new_key(), None), label=None,
                                   attempt=ATTEMPT)
    assert count(stack, devices) == before
    assert "registered OEM CA" in refusals(stack)[-1]["reason"]


def test_second_idevid_for_the_same_device_id_is_refused(stack: Stack,
                                                         service: EnrollmentService) -> None:
    ca = oem_ca("twin")
    register(stack, "twin", ca[1], approval=False)
    service.enroll_with_idevid(idevid=idevid(ca, "SN-5005"), csr_data=csr_for(new_key(), None),
                               label=None, attempt=ATTEMPT)
    with pytest.raises(EnrollmentRefused, match="not bound to this manufacturer certificate"):
        service.enroll_with_idevid(idevid=idevid(ca, "SN-5005"),
                                   csr_data=csr_for(new_key(), None), label=None,
                                   attempt=ATTEMPT)
