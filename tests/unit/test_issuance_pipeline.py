"""Issuance refuses every bad request before anything is stored; serials never repeat.

Each refusal vector is named after the defect it carries. For every one we check the
error class (who is at fault), that the error explains itself (message and hint), that
not one certificate row or ``certificate.issued`` event appeared, that the device did not
move, and that the refusal itself is in the audit log. Positive controls run through the
same harness, so a harness that could not see a stored row would fail them.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, ObjectIdentifier
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from fleetward.ca import Authority, IssueRequest
from fleetward.ca.authority import MAX_SERIAL_ATTEMPTS
from fleetward.ca.setup import ISSUING_NAME
from fleetward.clock import FrozenClock
from fleetward.config import CAConfig
from fleetward.crypto import x509util
from fleetward.errors import FleetwardError, InvalidInput, NotFound, PolicyViolation, StorageError
from fleetward.model import (
    CertificateRecord,
    LifecycleState,
    device_uri,
    format_serial,
    parse_serial,
)
from fleetward.registry import Registry
from fleetward.store import audit as audit_rows
from fleetward.store.certificates import list_certificates
from fleetward.store.schema import certificates as certificates_table
from tests.conftest import Stack, build_stack

DEVICE = "dev-1"
OTHER_DEVICE = "dev-2"

# --- keys and CSRs ---------------------------------------------------------------------


@functools.cache
def _key(kind: str) -> CertificateIssuerPrivateKeyTypes:
    """One key per kind for the whole module: RSA and DSA generation is slow."""
    makers: dict[str, Callable[[], CertificateIssuerPrivateKeyTypes]] = {
        "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "p256-other": lambda: ec.generate_private_key(ec.SECP256R1()),
        "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
        "secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
        "brainpool": lambda: ec.generate_private_key(ec.BrainpoolP256R1()),
        "rsa1024": lambda: rsa.generate_private_key(65537, 1024),
        "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
        "ed448": ed448.Ed448PrivateKey.generate,
        "dsa2048": lambda: dsa.generate_private_key(2048),
    }
    return makers[kind]()


def _sign_alg(key: CertificateIssuerPrivateKeyTypes) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None  # EdDSA hashes internally (RFC 8410 §6)
    return hashes.SHA256()


def csr_der(key: str = "p256", subject: list[x509.NameAttribute] | None = None,
            extensions: list[tuple[x509.ExtensionType, bool]] | None = None) -> bytes:
    private = _key(key)
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject or []))
    for value, critical in extensions or []:
        builder = builder.add_extension(value, critical=critical)
    csr = builder.sign(private, _sign_alg(private))
    return csr.public_bytes(serialization.Encoding.DER)


def pem(der: bytes) -> bytes:
    """Wrap DER ourselves (RFC 7468 §7) so a tampered body is sent exactly as tampered."""
    body = base64.b64encode(der).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    text = "\n".join(["-----BEGIN CERTIFICATE REQUEST-----", *lines,
                      "-----END CERTIFICATE REQUEST-----", ""])
    return text.encode()


def csr_pem(key: str = "p256", subject: list[x509.NameAttribute] | None = None,
            extensions: list[tuple[x509.ExtensionType, bool]] | None = None) -> bytes:
    return pem(csr_der(key, subject, extensions))


def cn(value: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def san(*names: x509.GeneralName) -> tuple[x509.ExtensionType, bool]:
    return x509.SubjectAlternativeName(list(names)), False


# Minimal DER writer for the vectors cryptography's builders refuse to produce.
def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


ECDSA_WITH_SHA256 = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a8648ce3d040302")))  # RFC 5758 §3.2


def resigned(tbs: bytes, key: str = "p256") -> bytes:
    """CertificationRequest (RFC 2986 §4.2) over ``tbs``, signed with ``key`` (ECDSA)."""
    private = _key(key)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    signature = private.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _tlv(0x30, tbs + ECDSA_WITH_SHA256 + _tlv(0x03, b"\x00" + signature))


def _tbs(der: bytes) -> bytes:
    return x509.load_der_x509_csr(der).tbs_certrequest_bytes


def bad_signature() -> bytes:
    """A valid P-256 CSR with one bit of the ECDSA ``s`` value flipped."""
    der = bytearray(csr_der())
    der[-1] ^= 0x01  # the last octet of the signature BIT STRING
    return pem(bytes(der))


def signed_by_another_key() -> bytes:
    """Carries key A but is signed by key B: no proof of possession (RFC 2986 §3)."""
    return pem(resigned(_tbs(csr_der("p256")), key="p256-other"))


def truncated_pem() -> bytes:
    text = csr_pem()
    return text[: len(text) // 2]


def truncated_der() -> bytes:
    return csr_der()[:-10]


def certificate_instead_of_csr() -> bytes:
    key = _key("p256")
    name = x509.Name([cn(DEVICE)])
    now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def malformed_san_extension() -> bytes:
    junk = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x00junk")
    return csr_pem(extensions=[(junk, False)])


def duplicate_san_extension() -> bytes:
    """Two SAN extensions (forbidden by RFC 5280 §4.2): the second one names evil.example."""
    stand_in = ObjectIdentifier("2.5.29.99")  # same DER length as 2.5.29.17, swapped below
    evil = x509.SubjectAlternativeName([x509.DNSName("evil.example")]).public_bytes()
    der = csr_der(extensions=[san(x509.UniformResourceIdentifier(device_uri(DEVICE))),
                              (x509.UnrecognizedExtension(stand_in, evil), False)])
    tbs = _tbs(der).replace(bytes.fromhex("0603551d63"), bytes.fromhex("0603551d11"))
    return pem(resigned(tbs))


def malformed_subject() -> bytes:
    """CN encoded as an INTEGER instead of a string type."""
    tbs = _tbs(csr_der(subject=[cn(DEVICE)]))
    utf8_cn = b"\x0c" + bytes([len(DEVICE)]) + DEVICE.encode()
    assert utf8_cn in tbs
    return pem(resigned(tbs.replace(utf8_cn, b"\x02" + utf8_cn[1:])))


def key_off_the_curve() -> bytes:
    key = _key("p256")
    point = key.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint)
    tbs = _tbs(csr_der())
    return pem(resigned(tbs.replace(point, point[:-1] + bytes([point[-1] ^ 0x01]))))


def sm2_curve() -> bytes:
    """A P-256 CSR relabelled as SM2 (GB/T 32918): a curve cryptography cannot load."""
    prime256v1 = _tlv(0x06, bytes.fromhex("2a8648ce3d030107"))
    sm2 = _tlv(0x06, bytes.fromhex("2a811ccf5501822d"))  # 1.2.156.10197.1.301
    tbs = _tbs(csr_der())
    assert prime256v1 in tbs
    return pem(resigned(tbs.replace(prime256v1, sm2)))


def dsa_csr() -> bytes:
    try:
        return csr_pem("dsa2048")
    except Exception as exc:  # the cryptography build may lack DSA signing
        pytest.skip(f"cryptography cannot build a DSA CSR here: {exc}")


_CA_BASIC_CONSTRAINTS = x509.BasicConstraints(ca=True, path_length=None)


def _key_usage(**set_bits: bool) -> x509.KeyUsage:
    bits = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
    bits.update(set_bits)
    return x509.KeyUsage(**bits)


# --- the scenario table ----------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    csr: Callable[[], bytes]
    error: type[FleetwardError]
    says: str  # a fragment the message must contain, so the refusal is the right one
    device: str = DEVICE
    state: LifecycleState | None = None  # move the device here first
    profile: str = "device"


def _ok() -> bytes:
    return csr_pem()


def _ext(*exts: tuple[x509.ExtensionType, bool], key: str = "p256") -> Callable[[], bytes]:
    return lambda: csr_pem(key, extensions=list(exts))


REFUSALS: dict[str, Refusal] = {
    # -- malformed bytes: the caller's fault, 400
    "garbage-bytes": Refusal(lambda: b"\x00\x01this is not a certificate request\xff",
                             InvalidInput, "malformed"),
    "empty-body": Refusal(lambda: b"", InvalidInput, "malformed"),
    "truncated-pem": Refusal(truncated_pem, InvalidInput, "malformed"),
    "truncated-der": Refusal(truncated_der, InvalidInput, "malformed"),
    "certificate-sent-instead-of-csr": Refusal(certificate_instead_of_csr, InvalidInput,
                                               "malformed"),
    "signature-bit-flipped": Refusal(bad_signature, InvalidInput, "signature"),
    "signed-by-another-key": Refusal(signed_by_another_key, InvalidInput, "signature"),
    "san-extension-not-der": Refusal(malformed_san_extension, InvalidInput, "extension"),
    "san-extension-twice": Refusal(duplicate_san_extension, InvalidInput, "extension"),
    "subject-cn-not-a-string": Refusal(malformed_subject, InvalidInput, "subject"),
    "ec-point-not-on-curve": Refusal(key_off_the_curve, InvalidInput, "key"),
    # -- forbidden keys: well-formed but not allowed, 422
    "ed25519-key": Refusal(lambda: csr_pem("ed25519"), PolicyViolation, "Ed25519"),
    "ed448-key": Refusal(lambda: csr_pem("ed448"), PolicyViolation, "Ed448"),
    "ec-p521-key": Refusal(lambda: csr_pem("p521"), PolicyViolation, "secp521r1"),
    "ec-secp256k1-key": Refusal(lambda: csr_pem("secp256k1"), PolicyViolation, "secp256k1"),
    "ec-brainpool-key": Refusal(lambda: csr_pem("brainpool"), PolicyViolation, "brainpool"),
    "ec-sm2-curve-unsupported": Refusal(sm2_curve, PolicyViolation, "not supported"),
    "rsa-1024-key": Refusal(lambda: csr_pem("rsa1024"), PolicyViolation, "1024"),
    "dsa-2048-key": Refusal(dsa_csr, PolicyViolation, "DSA"),
    # -- asks for rights or options a device never gets, 422
    "asks-for-ca-basic-constraints": Refusal(_ext((_CA_BASIC_CONSTRAINTS, True)),
                                             PolicyViolation, "CA rights"),
    "asks-for-key-cert-sign": Refusal(_ext((_key_usage(digital_signature=True,
                                                       key_cert_sign=True), True)),
                                      PolicyViolation, "signing"),
    "asks-for-crl-sign": Refusal(_ext((_key_usage(crl_sign=True), True)),
                                 PolicyViolation, "signing"),
    "requests-ocsp-nocheck": Refusal(_ext((x509.OCSPNoCheck(), False)), PolicyViolation,
                                     ExtensionOID.OCSP_NO_CHECK.dotted_string),
    "requests-unknown-private-extension": Refusal(
        _ext((x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
              False)),
        PolicyViolation, "1.3.6.1.4.1.99999.1"),
    "requests-critical-name-constraints": Refusal(
        _ext((x509.NameConstraints([x509.DNSName("example.com")], None), True)),
        PolicyViolation, ExtensionOID.NAME_CONSTRAINTS.dotted_string),
    # -- names another identity, 422
    "cn-names-another-device": Refusal(lambda: csr_pem(subject=[cn(OTHER_DEVICE)]),
                                       PolicyViolation, OTHER_DEVICE),
    "cn-differs-only-in-case": Refusal(lambda: csr_pem(subject=[cn(DEVICE.upper())]),
                                       PolicyViolation, DEVICE.upper()),
    "second-cn-names-another-device": Refusal(
        lambda: csr_pem(subject=[cn(DEVICE), cn(OTHER_DEVICE)]), PolicyViolation, OTHER_DEVICE),
    "san-uri-names-another-device": Refusal(
        _ext(san(x509.UniformResourceIdentifier(device_uri(OTHER_DEVICE)))),
        PolicyViolation, device_uri(OTHER_DEVICE)),
    "san-dns-name": Refusal(_ext(san(x509.DNSName("dev-1.example.com"))), PolicyViolation,
                            "dev-1.example.com"),
    "san-own-uri-plus-dns-name": Refusal(
        _ext(san(x509.UniformResourceIdentifier(device_uri(DEVICE)),
                 x509.DNSName("admin.example.com"))), PolicyViolation, "admin.example.com"),
    "san-email": Refusal(_ext(san(x509.RFC822Name("root@example.com"))), PolicyViolation,
                         "root@example.com"),
    # -- the registry says no
    "unknown-device": Refusal(_ok, NotFound, "ghost-7", device="ghost-7"),
    "device-disabled": Refusal(_ok, PolicyViolation, "disabled", state=LifecycleState.DISABLED),
    "device-compromised": Refusal(_ok, PolicyViolation, "compromised",
                                  state=LifecycleState.COMPROMISED),
    "device-retired": Refusal(_ok, PolicyViolation, "retired", state=LifecycleState.RETIRED),
    "server-profile-for-a-device": Refusal(_ok, PolicyViolation, "server", profile="server"),
    "unknown-profile": Refusal(_ok, InvalidInput, "superuser", profile="superuser"),
}

_PATH_TO: dict[LifecycleState, tuple[LifecycleState, ...]] = {
    LifecycleState.DISABLED: (LifecycleState.ACTIVE, LifecycleState.DISABLED),
    LifecycleState.QUARANTINED: (LifecycleState.ACTIVE, LifecycleState.QUARANTINED),
    LifecycleState.COMPROMISED: (LifecycleState.COMPROMISED,),
    LifecycleState.RETIRED: (LifecycleState.RETIRED,),
}


@dataclass(frozen=True)
class Snapshot:
    certificates: list[CertificateRecord]
    issued_events: int
    refused: list[audit_rows.AuditRow]
    state: LifecycleState | None


def snapshot(stack: Stack, device_id: str) -> Snapshot:
    with stack.db.read() as conn:
        certs = list_certificates(conn)
        issued = audit_rows.query_events(conn, action="certificate.issued", limit=10_000)
        refused = audit_rows.query_events(conn, action="certificate.issue_refused",
                                          limit=10_000)
    try:
        state: LifecycleState | None = stack.registry.get_device(device_id).state
    except NotFound:
        state = None
    return Snapshot(certs, len(issued), refused, state)


def prepare_device(stack: Stack, device_id: str, state: LifecycleState | None) -> None:
    stack.add_device(device_id)
    stack.add_device(OTHER_DEVICE)  # the identity the hostile CSRs try to take
    for step in _PATH_TO.get(state, ()) if state else ():
        stack.registry.change_state(device_id, step, "operator:test")


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_refused_request_stores_nothing(stack: Stack, case: Refusal) -> None:
    prepare_device(stack, DEVICE, case.state)
    data = case.csr()
    before = snapshot(stack, case.device)

    with pytest.raises(FleetwardError) as caught:
        stack.registry.issue_certificate(case.device, data, case.profile, "operator:test")

    exc = caught.value
    assert type(exc) is case.error, f"{type(exc).__name__}: {exc.message}"
    assert case.says in exc.message
    assert exc.hint.strip() and exc.hint != exc.message
    after = snapshot(stack, case.device)
    assert after.certificates == before.certificates
    assert after.issued_events == before.issued_events
    assert after.state == before.state
    # The refusal itself is on the record, attributed and with the reason.
    assert len(after.refused) == len(before.refused) + 1
    event = after.refused[-1]
    assert (event.outcome, event.actor, event.target) == (
        "failure", "operator:test", f"device:{case.device}")
    assert json.loads(event.details) == {"error": exc.problem_type, "detail": exc.message}
    with stack.db.read() as conn:
        assert stack.audit.verify(conn).ok


# --- positive controls: the same harness sees an issuance -------------------------------

_EXPECTED_EXTENSIONS = {
    ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER, ExtensionOID.CRL_DISTRIBUTION_POINTS,
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
}

ACCEPTED: dict[str, tuple[Callable[[], bytes], LifecycleState | None]] = {
    "empty-subject": (lambda: csr_pem(), None),
    "cn-is-the-device-id": (lambda: csr_pem(subject=[cn(DEVICE)]), None),
    "san-is-exactly-the-device-uri": (
        _ext(san(x509.UniformResourceIdentifier(device_uri(DEVICE)))), None),
    "rsa-2048": (lambda: csr_pem("rsa2048", subject=[cn(DEVICE)]), None),
    "ec-p384": (lambda: csr_pem("p384"), None),
    "subject-carries-o-evil": (lambda: csr_pem(subject=[
        cn(DEVICE), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Root CA")]), None),
    "requests-harmless-usage-which-is-ignored": (_ext(
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(digital_signature=True, key_agreement=True, data_encipherment=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                ExtendedKeyUsageOID.CODE_SIGNING]), False)), None),
    "quarantined-device-re-enrolls": (lambda: csr_pem(), LifecycleState.QUARANTINED),
}


@pytest.mark.parametrize(("make_csr", "state"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_acceptable_request_gets_a_profile_certificate(
        stack: Stack, make_csr: Callable[[], bytes], state: LifecycleState | None) -> None:
    prepare_device(stack, DEVICE, state)
    data = make_csr()
    before = snapshot(stack, DEVICE)

    record = stack.registry.issue_certificate(DEVICE, data, "device", "operator:test")

    after = snapshot(stack, DEVICE)
    # Rows come ordered by (issued_at, serial) and the clock is frozen: compare as sets.
    assert len(after.certificates) == len(before.certificates) + 1
    assert ({c.serial for c in after.certificates} - {c.serial for c in before.certificates}
            == {record.serial})
    assert after.issued_events == before.issued_events + 1
    # Only the first certificate activates; a quarantined device stays quarantined.
    assert after.state is (state or LifecycleState.ACTIVE)
    csr = x509.load_pem_x509_csr(data)
    cert = x509.load_pem_x509_certificate(record.pem.encode())
    cert.verify_directly_issued_by(stack.authority.issuing.certificate)
    assert cert.public_key() == csr.public_key()
    # The name comes from the registry, never from the CSR.
    assert cert.subject == x509.Name([cn(DEVICE)])
    assert record.subject == f"CN={DEVICE}"
    exts = cert.extensions
    assert {e.oid for e in exts} == _EXPECTED_EXTENSIONS
    assert list(exts.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier(device_uri(DEVICE))]
    bc = exts.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = exts.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_agreement
                or ku.value.data_encipherment or ku.value.content_commitment)
    assert ku.value.key_encipherment == isinstance(cert.public_key(), rsa.RSAPublicKey)
    assert list(exts.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.fixture
def long_validity_stack(db_url: str, tmp_path: Path, clock: FrozenClock) -> Iterator[Stack]:
    """Asks for device certificates that would outlive the issuing CA by centuries."""
    s = build_stack(db_url, tmp_path, clock, config=CAConfig(device_validity_days=100_000))
    yield s
    s.db.dispose()


def _issue_one(s: Stack) -> tuple[x509.Certificate, dt.datetime]:
    s.add_device(DEVICE)
    record = s.registry.issue_certificate(DEVICE, csr_pem(), "device", "operator:test")
    cert = x509.load_pem_x509_certificate(record.pem.encode())
    assert record.not_after == cert.not_valid_after_utc
    return cert, s.authority.issuing.certificate.not_valid_after_utc


def test_validity_is_clamped_to_the_issuing_ca(long_validity_stack: Stack) -> None:
    cert, issuer_end = _issue_one(long_validity_stack)
    # 100,000 days would reach the 23rd century; the chain would be invalid long before.
    assert cert.not_valid_after_utc == issuer_end


def test_ordinary_validity_is_the_profile_not_the_clamp(stack: Stack) -> None:
    """Negative control for the clamp test: it must not be the clamp that sets lifetimes."""
    cert, issuer_end = _issue_one(stack)
    assert cert.not_valid_after_utc == stack.clock.now() + dt.timedelta(days=365)
    assert cert.not_valid_after_utc < issuer_end


def test_expired_issuing_ca_refuses_and_stores_nothing(sqlite_stack: Stack) -> None:
    prepare_device(sqlite_stack, DEVICE, None)
    issuer_end = sqlite_stack.authority.issuing.certificate.not_valid_after_utc
    sqlite_stack.clock.advance(issuer_end - sqlite_stack.clock.now() + dt.timedelta(days=1))
    before = snapshot(sqlite_stack, DEVICE)
    with pytest.raises(PolicyViolation, match="issuing CA expires") as caught:
        sqlite_stack.registry.issue_certificate(DEVICE, csr_pem(), "device", "operator:test")
    assert "renew" in caught.value.hint
    after = snapshot(sqlite_stack, DEVICE)
    assert (after.certificates, after.state) == (before.certificates, before.state)


# --- serials ---------------------------------------------------------------------------


def _stored_serials(stack: Stack) -> list[str]:
    with stack.db.read() as conn:
        return sorted(conn.execute(select(certificates_table.c.serial)).scalars())


def _request(stack: Stack, device_id: str = DEVICE) -> IssueRequest:
    key = _key("p256").public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return IssueRequest(public_key=key, profile=stack.registry.profiles["device"],
                        device=stack.registry.get_device(device_id))


@pytest.fixture
def quiet_info_logs() -> Iterator[None]:
    """100,000 info lines ("audit", per issuance) cost ~20 s to capture; warnings still show."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**saved)


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_info_logs")
def test_100k_issuances_never_repeat_a_serial(sqlite_stack: Stack) -> None:
    """Measured 165-185 s on the dev box (~1.5-1.8 ms per issuance): most of it is
    SQLAlchemy building a new INSERT ... VALUES per row in store/, the rest signing."""
    total, batch = 100_000, 5_000
    sqlite_stack.add_device(DEVICE)
    request = _request(sqlite_stack)
    preexisting = set(_stored_serials(sqlite_stack))  # the issuing CA's own certificate
    returned: set[int] = set()
    started = time.perf_counter()
    for _ in range(total // batch):
        with sqlite_stack.db.transaction() as conn:
            for _ in range(batch):
                returned.add(sqlite_stack.authority.issue(conn, request, "test").serial)
    elapsed = time.perf_counter() - started
    print(f"\n{total} issuances in {elapsed:.1f} s ({total / elapsed:.0f}/s)")

    stored = [s for s in _stored_serials(sqlite_stack) if s not in preexisting]
    with sqlite_stack.db.read() as conn:
        distinct = conn.execute(
            select(func.count(func.distinct(certificates_table.c.serial)))).scalar_one()
    assert len(stored) == distinct - len(preexisting) == total
    assert {int(s, 16) for s in stored} == returned
    assert len(returned) == total
    assert all(0 < s < 2**128 for s in returned)
    # Negative control on the generator: 100,000 draws of 128 bits reach the top bit.
    assert max(s.bit_length() for s in returned) == 128


def _scripted(serials: list[int]) -> tuple[Callable[[], int], list[int]]:
    drawn: list[int] = []
    source = iter(serials)

    def next_serial() -> int:
        drawn.append(next(source))
        return drawn[-1]

    return next_serial, drawn


def _authority_with(stack: Stack, serials: Callable[[], int]) -> Authority:
    a = stack.authority
    return Authority(a.handles, ISSUING_NAME, a.config, a.public_url, a.clock, a.audit,
                     serials=serials)


def test_colliding_serial_is_redrawn_and_stored_once(stack: Stack) -> None:
    stack.add_device(DEVICE)
    existing = stack.registry.issue_certificate(DEVICE, csr_pem(), "device", "operator:test")
    fresh = existing.serial ^ (1 << 100)
    next_serial, drawn = _scripted([existing.serial, fresh])
    authority = _authority_with(stack, next_serial)
    before = snapshot(stack, DEVICE)
    stored_before = _stored_serials(stack)

    with stack.db.transaction() as conn:
        record = authority.issue(conn, _request(stack), "test")

    assert drawn == [existing.serial, fresh]
    assert record.serial == fresh
    cert = x509.load_pem_x509_certificate(record.pem.encode())
    assert cert.serial_number == fresh
    after = snapshot(stack, DEVICE)
    assert after.issued_events == before.issued_events + 1
    assert sorted(_stored_serials(stack)) == sorted([*stored_before, format_serial(fresh)])
    assert format_serial(existing.serial) in stored_before
    by_serial = {c.serial: c for c in after.certificates}
    # The first holder of the serial keeps its row untouched.
    assert by_serial[existing.serial] == existing


def test_generator_that_always_repeats_fails_closed(stack: Stack) -> None:
    stack.add_device(DEVICE)
    existing = stack.registry.issue_certificate(DEVICE, csr_pem(), "device", "operator:test")
    stack.add_device(OTHER_DEVICE)
    drawn: list[int] = []

    def stuck() -> int:
        drawn.append(existing.serial)
        return existing.serial

    registry = Registry(stack.db, _authority_with(stack, stuck), stack.audit, stack.clock)
    before = snapshot(stack, OTHER_DEVICE)
    stored_before = _stored_serials(stack)

    with pytest.raises(StorageError, match="no unique serial") as caught:
        registry.issue_certificate(OTHER_DEVICE, csr_pem(), "device", "operator:test")

    assert caught.value.hint
    assert len(drawn) == MAX_SERIAL_ATTEMPTS  # bounded: it gives up instead of looping
    after = snapshot(stack, OTHER_DEVICE)
    assert after.certificates == before.certificates
    assert after.issued_events == before.issued_events
    assert after.state is LifecycleState.REGISTERED  # the first-certificate move rolled back
    assert after.refused[-1].target == f"device:{OTHER_DEVICE}"
    assert _stored_serials(stack) == stored_before


@settings(max_examples=200, deadline=None)
@given(zeros=st.integers(0, 3),
       value=st.one_of(st.integers(1, 2**128 - 1),
                       st.sampled_from([1, 2**64, 2**127 - 1, 2**127, 2**128 - 1])))
def test_random_serial_is_positive_and_fits_128_bits(zeros: int, value: int) -> None:
    """Feed random_serial's entropy source and check what it makes of any 128-bit draw.

    Zero is not a valid serial (RFC 5280 §4.1.2.2: positive), so a zero draw must be
    redrawn; every accepted serial fits 16 octets of magnitude, hence at most 17 DER
    content octets with the sign octet, inside the RFC's 20-octet limit.
    """
    draws = iter([0] * zeros + [value])
    requested_bits: list[int] = []

    def randbits(k: int) -> int:
        requested_bits.append(k)
        return next(draws)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(x509util.secrets, "randbits", randbits)
        serial = x509util.random_serial()

    assert serial == value
    assert requested_bits == [128] * (zeros + 1)
    assert 0 < serial < 2**128
    assert len(serial.to_bytes(16, "big")) == 16  # raises OverflowError beyond 16 octets
    der_content = serial.to_bytes(serial.bit_length() // 8 + 1, "big")  # with sign octet
    assert len(der_content) <= 17
    hex_text = format_serial(serial)
    assert len(hex_text) <= 32 <= certificates_table.c.serial.type.length
    assert parse_serial(hex_text) == serial
    # cryptography rejects what X.509 forbids (≤ 0, > 20 octets); it must accept ours.
    key = _key("p256")
    now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
            .public_key(key.public_key()).serial_number(serial).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    assert cert.serial_number == serial


def test_random_serial_uses_the_full_128_bits() -> None:
    """Real entropy: a generator cut to 64 bits, or a constant, fails this."""
    serials = [x509util.random_serial() for _ in range(2_000)]
    assert len(set(serials)) == len(serials)
    assert all(0 < s < 2**128 for s in serials)
    assert any(s >> 127 for s in serials)  # P(no top bit in 2,000 draws) = 2**-2000
    low_bits = {s & 0xFF for s in serials}
    assert len(low_bits) > 200  # the low octet varies too (expected ≈ 255 values)
