"""Issued certificates: stored with fingerprint, revocation state and owner."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, RowMapping, insert, select, update
from sqlalchemy.exc import IntegrityError

from fleetward.model import CertificateRecord, format_serial
from fleetward.store.schema import certificates


class DuplicateSerial(Exception):
    """The unique constraint on the serial fired; the caller draws a new serial."""


def insert_certificate(conn: Connection, record: CertificateRecord) -> None:
    """Insert inside a savepoint so a serial collision leaves the transaction usable.

    Raises:
        DuplicateSerial: the serial (or fingerprint) is already stored.
    """
    try:
        with conn.begin_nested():
            # Parameters, not .values(): one cached statement for every issuance.
            conn.execute(
                insert(certificates),
                {
                    "serial": format_serial(record.serial),
                    "fingerprint_sha256": record.fingerprint_sha256,
                    "ca_name": record.ca_name,
                    "device_id": record.device_id,
                    "profile": record.profile,
                    "subject": record.subject,
                    "not_before": record.not_before,
                    "not_after": record.not_after,
                    "pem": record.pem,
                    "issued_at": record.issued_at,
                    "spki_sha256": record.spki_sha256,
                    "csr_sha256": record.csr_sha256,
                },
            )
    except IntegrityError as exc:
        # Only a serial that is already stored is a collision; anything else (an unknown
        # CA or device) is a real integrity error and must not be retried as one.
        if get_certificate(conn, record.serial) is not None:
            raise DuplicateSerial(format_serial(record.serial)) from exc
        raise


def get_certificate(conn: Connection, serial: int) -> CertificateRecord | None:
    row = conn.execute(
        select(certificates).where(certificates.c.serial == format_serial(serial))
    ).first()
    return certificate_from_row(row._mapping) if row else None


def list_certificates(
    conn: Connection,
    *,
    device_id: str | None = None,
    ca_name: str | None = None,
    revoked: bool | None = None,
    limit: int | None = 1000,
) -> list[CertificateRecord]:
    """Certificates oldest first; ``limit=None`` for all of them (revocation must not stop
    at a page boundary)."""
    query = select(certificates).order_by(certificates.c.issued_at, certificates.c.serial)
    if device_id is not None:
        query = query.where(certificates.c.device_id == device_id)
    if ca_name is not None:
        query = query.where(certificates.c.ca_name == ca_name)
    if revoked is True:
        query = query.where(certificates.c.revoked_at.is_not(None))
    elif revoked is False:
        query = query.where(certificates.c.revoked_at.is_(None))
    if limit is not None:
        query = query.limit(limit)
    return [certificate_from_row(r._mapping) for r in conn.execute(query)]


def get_by_fingerprint(conn: Connection, fingerprint_sha256: str) -> CertificateRecord | None:
    """The certificate whose DER has this SHA-256 (lower-case hex), if we issued it."""
    row = conn.execute(select(certificates).where(
        certificates.c.fingerprint_sha256 == fingerprint_sha256)).first()
    return certificate_from_row(row._mapping) if row else None


def find_by_key(conn: Connection, spki_digest: str) -> list[CertificateRecord]:
    """Certificates for one public key (SHA-256 of its SPKI), newest first."""
    rows = conn.execute(
        select(certificates)
        .where(certificates.c.spki_sha256 == spki_digest)
        .order_by(certificates.c.not_after.desc(), certificates.c.serial)
    )
    return [certificate_from_row(r._mapping) for r in rows]


def find_by_csr(conn: Connection, csr_digest: str) -> CertificateRecord | None:
    """The newest unrevoked certificate issued from exactly this CSR, if any."""
    row = conn.execute(
        select(certificates)
        .where(certificates.c.csr_sha256 == csr_digest)
        .where(certificates.c.revoked_at.is_(None))
        .order_by(certificates.c.issued_at.desc())
        .limit(1)
    ).first()
    return certificate_from_row(row._mapping) if row else None


def schedule_supersede(
    conn: Connection, serial: int, successor: int, revoke_after: dt.datetime
) -> bool:
    """Mark ``serial`` as replaced by ``successor``, to be revoked at ``revoke_after``.

    False if it is already revoked or already superseded (a concurrent re-enrollment won).
    """
    result = conn.execute(
        update(certificates)
        .where(certificates.c.serial == format_serial(serial))
        .where(certificates.c.revoked_at.is_(None))
        .where(certificates.c.superseded_by.is_(None))
        .values(superseded_by=format_serial(successor), revoke_after=revoke_after)
    )
    return result.rowcount == 1


def due_for_supersede(conn: Connection, now: dt.datetime, limit: int) -> list[CertificateRecord]:
    """Superseded certificates whose overlap has ended and that are not yet revoked."""
    rows = conn.execute(
        select(certificates)
        .where(certificates.c.revoke_after <= now)
        .where(certificates.c.revoked_at.is_(None))
        .order_by(certificates.c.revoke_after)
        .limit(limit)
    )
    return [certificate_from_row(r._mapping) for r in rows]


def mark_revoked(conn: Connection, serial: int, at: dt.datetime, reason: str) -> bool:
    """Set revocation fields unless already revoked; True if this call revoked it."""
    result = conn.execute(
        update(certificates)
        .where(certificates.c.serial == format_serial(serial))
        .where(certificates.c.revoked_at.is_(None))
        .values(revoked_at=at, revocation_reason=reason)
    )
    return result.rowcount == 1


def revoked_entries(
    conn: Connection, ca_name: str, now: dt.datetime
) -> list[tuple[int, dt.datetime, str]]:
    """(serial, revoked_at, reason) of revoked, unexpired certificates of one CA.

    Expired certificates leave the CRL (RFC 5280 §3.3 allows it; validation rejects them
    on expiry anyway), which keeps the list from growing without bound.
    """
    rows = conn.execute(
        select(certificates.c.serial, certificates.c.revoked_at, certificates.c.revocation_reason)
        .where(certificates.c.ca_name == ca_name)
        .where(certificates.c.revoked_at.is_not(None))
        .where(certificates.c.not_after > now)
    )
    return [(int(s, 16), at, reason) for s, at, reason in rows]


def certificate_from_row(row: RowMapping) -> CertificateRecord:
    return CertificateRecord(
        serial=int(row["serial"], 16),
        fingerprint_sha256=row["fingerprint_sha256"],
        ca_name=row["ca_name"],
        device_id=row["device_id"],
        profile=row["profile"],
        subject=row["subject"],
        not_before=row["not_before"],
        not_after=row["not_after"],
        pem=row["pem"],
        issued_at=row["issued_at"],
        revoked_at=row["revoked_at"],
        revocation_reason=row["revocation_reason"],
        spki_sha256=row["spki_sha256"],
        csr_sha256=row["csr_sha256"],
        superseded_by=int(row["superseded_by"], 16) if row["superseded_by"] else None,
        revoke_after=row["revoke_after"],
    )
