"""The certificate authority at run time: issue, revoke, keep CRLs fresh.

Every method works inside the caller's transaction, so a certificate, its audit event
and the CRL that reflects it are committed together or not at all.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Connection

from fleetward.audit import AuditLog
from fleetward.ca.crl import build_crl
from fleetward.ca.pipeline import IssuerContext, IssueRequest, run_pipeline
from fleetward.ca.reasons import parse_reason
from fleetward.clock import Clock
from fleetward.config import CAConfig
from fleetward.crypto.signer import Signer, signature_hash
from fleetward.crypto.x509util import fingerprint_sha256, random_serial, spki_sha256
from fleetward.errors import Conflict, KeyUnavailable, NotFound, StorageError
from fleetward.model import AuditEvent, CertificateRecord, format_serial
from fleetward.store import cas as ca_rows
from fleetward.store import certificates as cert_rows
from fleetward.store import devices as device_rows

log = structlog.get_logger("fleetward.ca")

# Serial collisions at 128 bits mean a broken RNG, not bad luck; a few retries cover an
# injected or degraded generator without looping forever.
MAX_SERIAL_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class CAHandle:
    name: str
    kind: str  # root | issuing | oem
    certificate: x509.Certificate
    signer: Signer | None  # None: key offline (root) or not ours (OEM)

    @property
    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()


class Authority:
    """Issues and revokes certificates for the online issuing CA and keeps CRLs."""

    def __init__(
        self,
        handles: dict[str, CAHandle],
        issuing_name: str,
        config: CAConfig,
        public_url: str,
        clock: Clock,
        audit: AuditLog,
        serials: Callable[[], int] = random_serial,
    ) -> None:
        if issuing_name not in handles or handles[issuing_name].signer is None:
            raise KeyUnavailable(f"the issuing CA {issuing_name!r} has no usable key here")
        self.handles = handles
        self.issuing_name = issuing_name
        self.config = config
        self.public_url = public_url
        self.clock = clock
        self.audit = audit
        self._serials = serials

    @property
    def issuing(self) -> CAHandle:
        return self.handles[self.issuing_name]

    def chain_pem(self) -> str:
        """Issuing CA first, then its parents up to the root (RFC 8446 §4.4.2 order)."""
        return "".join(h.pem for h in self.own_cas())

    def own_cas(self) -> list[CAHandle]:
        order = {"issuing": 0, "root": 1}
        return sorted(
            (h for h in self.handles.values() if h.kind in order), key=lambda h: order[h.kind]
        )

    def issue(self, conn: Connection, request: IssueRequest, actor: str) -> CertificateRecord:
        """Run the pipeline, sign, store and audit one certificate.

        Raises:
            InvalidInput, PolicyViolation: the pipeline refused the request.
            StorageError: no unique serial could be stored.
        """
        ca = self.issuing
        signer = require_signer(ca)
        now = self.clock.now()
        ctx = IssuerContext(
            ca.name,
            ca.certificate,
            self.public_url,
            dt.timedelta(seconds=self.config.backdate_seconds),
            now,
        )
        template = run_pipeline(request, ctx)
        key_digest = spki_sha256(request.public_key)
        csr_digest = (
            hashlib.sha256(request.csr.public_bytes(serialization.Encoding.DER)).hexdigest()
            if request.csr is not None else None
        )
        for _attempt in range(MAX_SERIAL_ATTEMPTS):
            serial = self._serials()
            builder = (
                x509.CertificateBuilder()
                .subject_name(template.subject)
                .issuer_name(ca.certificate.subject)
                .public_key(request.public_key)
                .serial_number(serial)
                .not_valid_before(template.not_before)
                .not_valid_after(template.not_after)
            )
            for ext in template.extensions:
                builder = builder.add_extension(ext.value, critical=ext.critical)
            cert = builder.sign(signer.private_key, signature_hash(signer.public_key()))
            record = CertificateRecord(
                serial=serial,
                fingerprint_sha256=fingerprint_sha256(cert),
                ca_name=ca.name,
                profile=request.profile.name,
                subject=cert.subject.rfc4514_string(),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
                device_id=request.device.id if request.device else None,
                issued_at=now,
                spki_sha256=key_digest,
                csr_sha256=csr_digest,
            )
            try:
                cert_rows.insert_certificate(conn, record)
            except cert_rows.DuplicateSerial:
                log.warning("serial collision; drawing a new serial", serial=format_serial(serial))
                continue
            self.audit.append(
                conn,
                AuditEvent(
                    action="certificate.issued",
                    actor=actor,
                    target=f"device:{record.device_id}" if record.device_id else f"ca:{ca.name}",
                    details={
                        "serial": record.serial_hex,
                        "profile": record.profile,
                        "fingerprint_sha256": record.fingerprint_sha256,
                        "not_after": record.not_after.isoformat(),
                    },
                ),
            )
            return record
        raise StorageError(
            f"no unique serial after {MAX_SERIAL_ATTEMPTS} attempts",
            hint="the random number generator is broken; stop issuing and investigate",
        )

    def revoke(
        self, conn: Connection, serial: int, reason: str, actor: str, *, refresh_crl: bool = True,
        planned_rotation: bool = False,
    ) -> CertificateRecord:
        """Revoke one certificate (RFC 5280 reason), audit it and re-sign its CA's CRL.

        The device's access tokens end with it (its credential generation moves on),
        unless ``planned_rotation``: re-enrollment retiring the previous certificate after
        its overlap, where the device's key-bound tokens must live on. An operator's
        revocation always ends them, whatever reason it names.

        Raises:
            NotFound: no such certificate.
            Conflict: it is already revoked.
        """
        reason = parse_reason(reason)
        record = cert_rows.get_certificate(conn, serial)
        if record is None:
            raise NotFound(
                f"no certificate with serial {format_serial(serial)}",
                hint="list certificates with `fleetward cert list --device ID`",
            )
        now = self.clock.now()
        if not cert_rows.mark_revoked(conn, serial, now, reason):
            raise Conflict(
                f"certificate {record.serial_hex} is already revoked",
                hint="revocation is final; nothing to do",
            )
        if record.device_id and not planned_rotation:
            # A revoked key may have been used to obtain access tokens (private_key_jwt,
            # tls_client_auth): they die with it. A planned rotation is no reason to cut
            # off tokens bound to the device's other keys.
            device_rows.bump_credential_generation(conn, record.device_id)
        self.audit.append(
            conn,
            AuditEvent(
                action="certificate.revoked",
                actor=actor,
                target=f"device:{record.device_id}" if record.device_id else f"ca:{record.ca_name}",
                details={"serial": record.serial_hex, "reason": reason},
            ),
        )
        if refresh_crl:
            self.refresh_crl(conn, record.ca_name)
        return cert_rows.get_certificate(conn, serial) or record

    def refresh_crl(self, conn: Connection, ca_name: str) -> bytes | None:
        """Re-sign the CRL of ``ca_name`` with the next CRL number; None if its key is offline."""
        handle = self.handles.get(ca_name)
        if handle is None or handle.signer is None:
            log.warning("crl not re-signed: CA key not available here", ca=ca_name)
            return None
        row = ca_rows.get_ca(conn, ca_name, for_update=True)
        if row is None:
            raise NotFound(f"no CA named {ca_name!r}")
        now = self.clock.now()
        next_update = now + dt.timedelta(hours=self.config.crl_validity_hours)
        number = row.crl_number + 1  # RFC 5280 §5.2.3: monotonically increasing
        entries = cert_rows.revoked_entries(conn, ca_name, now)
        der = build_crl(handle.certificate, handle.signer, entries, number, now, next_update)
        ca_rows.store_crl(conn, ca_name, number, der, now, next_update)
        log.info("crl signed", ca=ca_name, number=number, entries=len(entries))
        return der

    def refresh_due_crls(self, conn: Connection) -> list[str]:
        """Re-sign every CRL that is missing or inside the refresh margin of nextUpdate."""
        margin = dt.timedelta(hours=self.config.crl_refresh_margin_hours)
        now = self.clock.now()
        refreshed = []
        for handle in self.own_cas():
            row = ca_rows.get_ca(conn, handle.name)
            if row is None or handle.signer is None:
                continue
            due = row.crl_next_update is None or row.crl_next_update - margin <= now
            if due and self.refresh_crl(conn, handle.name) is not None:
                refreshed.append(handle.name)
        return refreshed

    def crl_der(self, conn: Connection, ca_name: str) -> bytes:
        row = ca_rows.get_ca(conn, ca_name)
        if row is None or row.kind == "oem" or row.crl_der is None:
            raise NotFound(
                f"no CRL for CA {ca_name!r}",
                hint=f"known CAs: {', '.join(h.name for h in self.own_cas())}",
            )
        return row.crl_der


def require_signer(handle: CAHandle) -> Signer:
    if handle.signer is None:
        raise KeyUnavailable(f"the key of CA {handle.name!r} is not available on this host")
    return handle.signer
