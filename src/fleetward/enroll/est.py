"""Enrollment over Secure Transport (RFC 7030), without the HTTP: who may get what.

Three ways in, each a method that runs in ONE transaction (credential use, JIT
registration, issuance and audit commit together or not at all):

- ``enroll_with_token``: a one-time bootstrap token (RFC 7030 §3.2.3 HTTP-based client
  authentication) enrolls the device it is bound to, or registers a new device of a
  claim batch's type.
- ``enroll_with_idevid``: a manufacturer certificate (IEEE 802.1AR IDevID) issued by a
  registered OEM CA registers the device on first contact (just-in-time provisioning),
  optionally held for operator approval (RFC 7030 §4.2.3: 202 + Retry-After).
- ``reenroll``: the device's current certificate (over mTLS, RFC 7030 §4.2.2); or, if
  it has expired, a CSR signed by the same key within a grace window.

Every refusal is audited with its reason in a separate transaction (the enrollment one
rolls back, so a refused request never burns a token or half-registers a device).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from sqlalchemy import Connection

from fleetward.audit import AuditLog
from fleetward.ca import Authority, parse_csr
from fleetward.clock import Clock
from fleetward.config import EnrollConfig
from fleetward.crypto.x509util import fingerprint_sha256, spki_sha256
from fleetward.enroll.bootstrap import BootstrapRefused, BootstrapTokens
from fleetward.errors import (
    Conflict,
    FleetwardError,
    Forbidden,
    InvalidInput,
    NotFound,
    PolicyViolation,
    Unauthenticated,
)
from fleetward.model import (
    ISSUABLE_STATES,
    AuditEvent,
    CertificateRecord,
    format_serial,
    validate_device_id,
)
from fleetward.registry import Registry
from fleetward.store import Database
from fleetward.store import cas as ca_rows
from fleetward.store import certificates as cert_rows
from fleetward.store import devices as device_rows
from fleetward.store import oem as oem_rows

log = structlog.get_logger("fleetward.enroll")

DEFAULT_PROFILE = "device"
SWEEP_BATCH = 500  # superseded certificates revoked per transaction

# RFC 7030 §4.5.2 CSR attributes: "use ECDSA P-256 and sign with ecdsa-with-SHA256".
#   CsrAttrs ::= SEQUENCE { ecdsa-with-SHA256,
#                           Attribute { id-ecPublicKey, SET { secp256r1 } } }
# Fixed content, so the DER is spelled out once here (checked by `openssl asn1parse`
# in tests/integration/test_est.py).
_OID_ECDSA_WITH_SHA256 = bytes.fromhex("06082a8648ce3d040302")  # 1.2.840.10045.4.3.2
_OID_EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")  # 1.2.840.10045.2.1
_OID_SECP256R1 = bytes.fromhex("06082a8648ce3d030107")  # 1.2.840.10045.3.1.7


def _der(tag: int, content: bytes) -> bytes:
    if len(content) >= 128:  # long lengths never occur in this fixed structure
        raise ValueError("short-form DER lengths only")
    return bytes([tag, len(content)]) + content


CSR_ATTRS_DER = _der(0x30, _OID_ECDSA_WITH_SHA256 + _der(
    0x30, _OID_EC_PUBLIC_KEY + _der(0x31, _OID_SECP256R1)))


class EnrollmentRefused(Forbidden):
    """Authenticated (or not) but not allowed to enroll; ``reason`` goes to the audit log."""


@dataclass(frozen=True, slots=True)
class EnrollmentResult:
    device_id: str
    record: CertificateRecord | None  # None: waiting for approval
    retry_after_seconds: int | None = None

    @property
    def pending(self) -> bool:
        return self.record is None


@dataclass(frozen=True, slots=True)
class Attempt:
    """Who is asking, for the audit trail."""

    method: str  # bootstrap-token | idevid | reenroll | reenroll-expired
    source: str  # remote address
    route: str  # simpleenroll | simplereenroll (with label)


class EnrollmentService:
    def __init__(self, db: Database, registry: Registry, tokens: BootstrapTokens,
                 audit: AuditLog, clock: Clock, config: EnrollConfig) -> None:
        self.db = db
        self.registry = registry
        self.authority: Authority = registry.authority
        self.tokens = tokens
        self.audit = audit
        self.clock = clock
        self.config = config

    # --- distribution of CA certificates (RFC 7030 §4.1) ----------------------------------

    def cacerts_der(self) -> bytes:
        """Our CA certificates (issuing first, then root) as a certs-only PKCS#7."""
        certs = [h.certificate for h in self.authority.own_cas()]
        return pkcs7.serialize_certificates(certs, serialization.Encoding.DER)

    def is_ours(self, cert: x509.Certificate) -> bool:
        """True if our issuing CA signed ``cert`` (an operational, not a manufacturer, one)."""
        try:
            cert.verify_directly_issued_by(self.authority.issuing.certificate)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def oem_ca_pems(self) -> dict[str, str]:
        """Fingerprint → PEM of every registered OEM CA (the device listener trusts them
        at the TLS layer so IDevIDs can be presented; routes decide what they allow)."""
        with self.db.read() as conn:
            return {r.fingerprint_sha256: r.cert_pem for r in ca_rows.list_cas(conn, "oem")}

    # --- initial enrollment ---------------------------------------------------------------

    def enroll_with_token(self, *, token: str, device_id: str | None, csr_data: bytes,
                          label: str | None, attempt: Attempt) -> EnrollmentResult:
        """Enroll with a bootstrap token (``device_id`` from HTTP Basic, or None).

        Raises:
            Unauthenticated: the token is refused (unknown, used, expired, revoked, bound
                to another device).
            EnrollmentRefused: the device may not enroll (state, taken id, label).
            InvalidInput, PolicyViolation: the CSR is refused.
        """
        claimed = device_id
        token_id: str | None = None
        try:
            csr = parse_csr(csr_data)
            claimed = claimed or _csr_common_name(csr)
            with self.db.transaction() as conn:
                redemption = self.tokens.redeem(conn, token, claimed)
                token_id = redemption.token_id
                claimed = redemption.device_id
                actor = f"device:{claimed}"
                if redemption.bound_device is None:
                    # A claim batch registers new devices only: it must never hand an
                    # existing device's identity to whoever holds the batch token.
                    if device_rows.get_device(conn, claimed) is not None:
                        raise EnrollmentRefused(
                            f"device {claimed!r} is already registered; a claim-batch token "
                            "only enrolls new devices",
                            hint="use a token bound to this device, or another device id")
                    self.registry.register_in(
                        conn, claimed, redemption.device_type,
                        redemption.owner or self.config.jit_owner, None, actor,
                        how="bootstrap-batch")
                profile = self._allowed_profile(conn, claimed, label)
                record = self.registry.issue_in(conn, claimed, csr, profile, actor)
                self._audit_success(conn, attempt, claimed, record, {"token_id": token_id})
            return EnrollmentResult(claimed, record)
        except BootstrapRefused as exc:
            self.audit_refusal(attempt, claimed, exc.reason, exc.token_id)
            raise
        except FleetwardError as exc:
            self.audit_refusal(attempt, claimed, exc.message, token_id)
            raise

    def enroll_with_idevid(self, *, idevid: x509.Certificate, csr_data: bytes,
                           label: str | None, attempt: Attempt) -> EnrollmentResult:
        """Enroll with a manufacturer certificate presented over TLS.

        The TLS layer verified the IDevID's chain to a CA in its trust store; this checks
        that the DIRECT issuer is a registered OEM CA, registers the device on first
        contact under the OEM CA's device type, and issues (or answers "pending").

        Raises:
            EnrollmentRefused: unknown OEM CA, id taken by another device, rejected,
                or a device state that cannot enroll.
            InvalidInput, PolicyViolation: the CSR is refused.
        """
        claimed: str | None = None
        try:
            csr = parse_csr(csr_data)
            claimed = _idevid_device_id(idevid)
            digest = fingerprint_sha256(idevid)
            with self.db.transaction() as conn:
                oem = self._issuing_oem_ca(conn, idevid)
                binding = oem_rows.get_by_idevid(conn, digest)
                actor = f"device:{claimed}"
                if binding is None:
                    if device_rows.get_device(conn, claimed) is not None:
                        raise EnrollmentRefused(
                            f"device {claimed!r} is already registered and not bound to this "
                            "manufacturer certificate",
                            hint="two IDevIDs name the same device (a clone?), or the "
                                 "device was registered by hand; an operator must resolve it")
                    self.registry.register_in(conn, claimed, oem.device_type or "default",
                                              self.config.jit_owner, None, actor, how="idevid")
                    approval = (oem_rows.APPROVAL_PENDING if oem.enrollment_approval
                                else oem_rows.APPROVAL_NONE)
                    binding = oem_rows.OemBinding(
                        idevid_sha256=digest, device_id=claimed, ca_name=oem.name,
                        idevid_subject=idevid.subject.rfc4514_string(), approval=approval,
                        created_at=self.clock.now())
                    oem_rows.insert_binding(conn, binding)
                    self.audit.append(conn, AuditEvent(
                        action="enroll.device_registered", actor=actor,
                        target=f"device:{claimed}",
                        details={"oem_ca": oem.name, "idevid_sha256": digest,
                                 "approval": approval, "source": attempt.source}))
                if binding.approval == oem_rows.APPROVAL_REJECTED:
                    raise EnrollmentRefused(f"enrollment of {claimed!r} was rejected by an "
                                            "operator", hint="contact the fleet operator")
                if binding.approval == oem_rows.APPROVAL_PENDING:
                    self.audit.append(conn, AuditEvent(
                        action="enroll.pending", actor=actor, target=f"device:{claimed}",
                        details={"method": attempt.method, "source": attempt.source}))
                    return EnrollmentResult(claimed, None,
                                            self.config.approval_retry_after_seconds)
                profile = self._allowed_profile(conn, claimed, label)
                record = self.registry.issue_in(conn, claimed, csr, profile, actor)
                self._audit_success(conn, attempt, claimed, record,
                                    {"oem_ca": oem.name, "idevid_sha256": digest})
            return EnrollmentResult(claimed, record)
        except FleetwardError as exc:
            self.audit_refusal(attempt, claimed, exc.message, None)
            raise

    # --- re-enrollment ----------------------------------------------------------------------

    def reenroll(self, *, current: x509.Certificate | None, csr_data: bytes,
                 label: str | None, attempt: Attempt) -> EnrollmentResult:
        """Re-enroll with the current certificate (mTLS) or, without one, by the key of an
        expired certificate inside the grace window.

        The new certificate may carry a new key (rotation, recommended). The old one
        stays valid for the configured overlap and is then revoked as superseded.

        Raises:
            Unauthenticated: no usable certificate (none, not ours, unknown key).
            EnrollmentRefused: revoked, superseded, expired beyond grace, device state.
            InvalidInput, PolicyViolation: the CSR is refused.
        """
        claimed: str | None = None
        try:
            csr = parse_csr(csr_data)
            with self.db.transaction() as conn:
                if current is not None:
                    old = self._current_certificate(conn, current)
                else:
                    old = self._expired_certificate_for_key(conn, csr)
                if old.device_id is None:
                    raise Unauthenticated("this certificate does not belong to a device")
                claimed = old.device_id
                device = device_rows.get_device(conn, claimed, for_update=True)
                if device is None or device.state not in ISSUABLE_STATES:
                    state = device.state.value if device else "unknown"
                    raise EnrollmentRefused(f"device {claimed} is {state}; it cannot re-enroll",
                                            hint="only active or quarantined devices re-enroll")
                actor = f"device:{claimed}"
                if old.superseded_by is not None:
                    resent = self._resent_successor(conn, old, csr)
                    self._audit_success(conn, attempt, claimed, resent,
                                        {"previous_serial": old.serial_hex, "resent": True})
                    return EnrollmentResult(claimed, resent)
                profile = self._allowed_profile(conn, claimed, label or old.profile)
                record = self.registry.issue_in(conn, claimed, csr, profile, actor)
                self._supersede(conn, old, record, actor)
                self._audit_success(conn, attempt, claimed, record,
                                    {"previous_serial": old.serial_hex,
                                     "key_rotated": old.spki_sha256 != record.spki_sha256})
            return EnrollmentResult(claimed, record)
        except FleetwardError as exc:
            self.audit_refusal(attempt, claimed, exc.message, None)
            raise

    def _resent_successor(self, conn: Connection, old: CertificateRecord,
                          csr: x509.CertificateSigningRequest) -> CertificateRecord:
        """The certificate that already replaced ``old``, if the CSR proves its key.

        A device whose re-enrollment response was lost still holds only ``old`` and retries
        with the same new key (RFC 7030 §4.2.2 leaves retries to the client). It gets the
        same certificate back and nothing new is issued; a CSR for any other key is a fork
        of the identity and is refused.
        """
        successor = (cert_rows.get_certificate(conn, old.superseded_by)
                     if old.superseded_by is not None else None)
        if (successor is None or successor.revoked_at is not None
                or successor.spki_sha256 != spki_sha256(csr.public_key())):
            raise EnrollmentRefused(
                f"certificate {old.serial_hex} was already replaced by "
                f"{format_serial(old.superseded_by or 0)}",
                hint="re-enroll with the newest certificate (or resend the CSR of the key "
                     "that replaced it)")
        return successor

    def _current_certificate(self, conn: Connection,
                             cert: x509.Certificate) -> CertificateRecord:
        issuing = self.authority.issuing.certificate
        try:
            cert.verify_directly_issued_by(issuing)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise Unauthenticated(
                "re-enrollment needs a certificate issued by this CA",
                hint="a manufacturer certificate enrolls with simpleenroll, not "
                     "simplereenroll") from exc
        record = cert_rows.get_certificate(conn, cert.serial_number)
        if record is None or record.fingerprint_sha256 != fingerprint_sha256(cert):
            raise Unauthenticated("this certificate is not in the registry",
                                  hint="enroll with a bootstrap token first")
        self._check_usable(record, allow_superseded=True)
        now = self.clock.now()
        if record.not_after <= now:  # the TLS layer checks this too; belt and braces
            raise EnrollmentRefused("the certificate has expired",
                                    hint="re-enroll without a client certificate, with a CSR "
                                         "signed by the same key, inside the grace window")
        return record

    def _expired_certificate_for_key(self, conn: Connection,
                                     csr: x509.CertificateSigningRequest) -> CertificateRecord:
        # RFC 7030 §3.3.2 lets the server accept other evidence than a valid certificate;
        # ours is possession of the expired certificate's key: the CSR is signed by it
        # (the pipeline checks that signature) and carries exactly that public key.
        candidates = cert_rows.find_by_key(conn, spki_sha256(csr.public_key()))
        if not candidates:
            raise Unauthenticated(
                "re-enrollment needs the current certificate over TLS",
                hint="connect with the device certificate and key (curl --cert --key); "
                     "without one, only a device whose certificate expired can re-enroll, "
                     "with a CSR signed by that certificate's key")
        newest = candidates[0]
        now = self.clock.now()
        # A same-key renewal whose response was lost: the expired predecessor points at
        # ``newest``; hand it back to the caller via the superseded path.
        for older in candidates[1:]:
            if older.superseded_by == newest.serial and older.revoked_at is None:
                self._check_usable(older, allow_superseded=True)
                return older
        if newest.not_after > now:
            raise Unauthenticated(
                "this key's certificate is still valid: present it over TLS",
                hint="connect with the device certificate and key (curl --cert --key)")
        self._check_usable(newest)
        grace = dt.timedelta(days=self.config.expired_grace_days)
        if newest.not_after + grace <= now:
            raise EnrollmentRefused(
                f"the certificate expired on {newest.not_after:%Y-%m-%d}, beyond the "
                f"{self.config.expired_grace_days}-day re-enrollment grace window",
                hint="the device needs a new bootstrap token from the operator")
        return newest

    @staticmethod
    def _check_usable(record: CertificateRecord, *, allow_superseded: bool = False) -> None:
        if record.device_id is None or record.profile in {"ca", "server"}:
            raise Unauthenticated("this certificate does not belong to a device")
        if record.revoked_at is not None:
            raise EnrollmentRefused(f"certificate {record.serial_hex} is revoked "
                                    f"({record.revocation_reason})",
                                    hint="a revoked certificate cannot re-enroll; ask the "
                                         "operator for a bootstrap token")
        if record.superseded_by is not None and not allow_superseded:
            raise EnrollmentRefused(
                f"certificate {record.serial_hex} was already replaced by "
                f"{record.superseded_by:x}",
                hint="re-enroll with the newest certificate")

    def _supersede(self, conn: Connection, old: CertificateRecord, new: CertificateRecord,
                   actor: str) -> None:
        overlap = dt.timedelta(seconds=self.config.reenroll_overlap_seconds)
        if not cert_rows.schedule_supersede(conn, old.serial, new.serial,
                                            self.clock.now() + overlap):
            raise Conflict(f"certificate {old.serial_hex} was re-enrolled concurrently",
                           hint="re-enroll with the newest certificate")
        if overlap <= dt.timedelta(0):
            self.authority.revoke(conn, old.serial, "superseded", actor,
                                  planned_rotation=True)

    def sweep_superseded(self) -> int:
        """Revoke superseded certificates whose overlap has ended; returns how many."""
        revoked = 0
        with self.db.read() as conn:  # the common case: nothing due, no write lock taken
            if not cert_rows.due_for_supersede(conn, self.clock.now(), 1):
                return 0
        with self.db.transaction() as conn:
            due = cert_rows.due_for_supersede(conn, self.clock.now(), SWEEP_BATCH)
            for record in due:
                try:
                    self.authority.revoke(conn, record.serial, "superseded", "system",
                                          refresh_crl=False, planned_rotation=True)
                    revoked += 1
                except Conflict:
                    continue
            for ca_name in sorted({r.ca_name for r in due}):
                self.authority.refresh_crl(conn, ca_name)
        if revoked:
            log.info("superseded certificates revoked", count=revoked)
        return revoked

    # --- approval of OEM enrollments ------------------------------------------------------

    def list_bindings(self, approval: str | None = None,
                      limit: int = 100) -> list[oem_rows.OemBinding]:
        if approval is not None and approval not in {
                oem_rows.APPROVAL_NONE, oem_rows.APPROVAL_PENDING, oem_rows.APPROVAL_APPROVED,
                oem_rows.APPROVAL_REJECTED}:
            raise InvalidInput(f"unknown approval state {approval!r}",
                               hint="use pending, approved, rejected or none")
        if not 1 <= limit <= 1000:
            raise InvalidInput("limit must be between 1 and 1000", hint="e.g. limit=100")
        with self.db.read() as conn:
            return oem_rows.list_bindings(conn, approval, limit)

    def decide(self, device_id: str, approve: bool, actor: str) -> oem_rows.OemBinding:
        """Approve or reject a pending OEM enrollment.

        Rejecting also retires nothing by itself: the device stays ``registered`` with
        no certificate and every further attempt is refused and audited.

        Raises:
            NotFound: no OEM enrollment for this device.
            Conflict: it is not pending.
        """
        validate_device_id(device_id)
        decision = oem_rows.APPROVAL_APPROVED if approve else oem_rows.APPROVAL_REJECTED
        with self.db.transaction() as conn:
            binding = oem_rows.get_by_device(conn, device_id)
            if binding is None:
                raise NotFound(f"no manufacturer-certificate enrollment for {device_id!r}",
                               hint="list them with `fleetward enroll pending`")
            if not oem_rows.decide(conn, device_id, decision, self.clock.now(), actor):
                raise Conflict(f"the enrollment of {device_id!r} is {binding.approval}, "
                               "not pending", hint="decisions are final")
            self.audit.append(conn, AuditEvent(
                action=f"enroll.{decision}", actor=actor, target=f"device:{device_id}",
                details={"oem_ca": binding.ca_name}))
            updated = oem_rows.get_by_device(conn, device_id)
        return updated or binding

    # --- helpers --------------------------------------------------------------------------

    def _allowed_profile(self, conn: Connection, device_id: str, label: str | None) -> str:
        """The certificate profile an EST label selects, if the device's type allows it."""
        profile = label or DEFAULT_PROFILE
        device = device_rows.get_device(conn, device_id)
        if device is None:
            raise NotFound(f"device {device_id!r} does not exist")
        device_type = device_rows.get_type(conn, device.type)
        allowed = device_type.enrollment_profiles if device_type else (DEFAULT_PROFILE,)
        if profile not in allowed:
            raise PolicyViolation(
                f"devices of type {device.type} may not enroll for the {profile!r} profile",
                hint=f"use the label(s): {', '.join(allowed)}")
        return profile

    def _issuing_oem_ca(self, conn: Connection, idevid: x509.Certificate) -> ca_rows.CARow:
        for row in ca_rows.list_cas(conn, "oem"):
            ca_cert = x509.load_pem_x509_certificate(row.cert_pem.encode())
            try:
                idevid.verify_directly_issued_by(ca_cert)
            except (InvalidSignature, ValueError, TypeError):
                continue  # not issued by this CA
            if ca_cert.not_valid_after_utc <= self.clock.now():
                raise EnrollmentRefused(f"the OEM CA {row.name} has expired",
                                        hint="the operator must register a current OEM CA")
            return row
        raise EnrollmentRefused(
            f"the manufacturer certificate ({idevid.issuer.rfc4514_string()}) was not issued "
            "by a registered OEM CA",
            hint="an administrator registers OEM CAs with `fleetward ca add-oem`")

    def _audit_success(self, conn: Connection, attempt: Attempt, device_id: str,
                       record: CertificateRecord, extra: dict[str, object]) -> None:
        self.audit.append(conn, AuditEvent(
            action="enroll.succeeded", actor=f"device:{device_id}", target=f"device:{device_id}",
            details={"method": attempt.method, "route": attempt.route, "source": attempt.source,
                     "serial": record.serial_hex, "profile": record.profile, **extra}))

    def audit_refusal(self, attempt: Attempt, device_id: str | None, reason: str,
                      token_id: str | None = None) -> None:
        """Record one refused attempt in a transaction of its own (the enrollment
        transaction, if any, has rolled back)."""
        details: dict[str, object] = {"method": attempt.method, "route": attempt.route,
                                      "source": attempt.source, "reason": reason}
        if token_id:
            details["token_id"] = token_id
        try:
            with self.db.transaction() as conn:
                self.audit.append(conn, AuditEvent(
                    action="enroll.refused", actor=f"remote:{attempt.source}",
                    target=f"device:{device_id}" if device_id else "device:unknown",
                    outcome="failure", details=details))
        except FleetwardError:
            log.exception("could not audit a refused enrollment")
        log.info("enrollment refused", method=attempt.method, device=device_id, reason=reason,
                 source=attempt.source)

    def audit_tls_refusal(self, source: str, reason: str) -> None:
        """A client certificate failed the TLS handshake (e.g. an unregistered OEM CA)."""
        self.audit_refusal(Attempt("tls-client-certificate", source, "handshake"), None,
                            reason, None)


def _csr_common_name(csr: x509.CertificateSigningRequest) -> str | None:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


def _idevid_device_id(idevid: x509.Certificate) -> str:
    """IEEE 802.1AR §8.6: the IDevID subject carries the device serial number; fall back
    to the common name."""
    for oid in (NameOID.SERIAL_NUMBER, NameOID.COMMON_NAME):
        attrs = idevid.subject.get_attributes_for_oid(oid)
        if attrs and isinstance(attrs[0].value, str):
            try:
                validate_device_id(attrs[0].value)
            except InvalidInput as exc:
                raise EnrollmentRefused(
                    f"the manufacturer certificate names the device {attrs[0].value!r}, "
                    "which is not a valid device id", hint=exc.hint) from None
            return attrs[0].value
    raise EnrollmentRefused("the manufacturer certificate names no device (no serialNumber "
                            "or CN in its subject)", hint="use an IEEE 802.1AR IDevID")


__all__ = ["CSR_ATTRS_DER", "Attempt", "EnrollmentRefused", "EnrollmentResult",
           "EnrollmentService"]
