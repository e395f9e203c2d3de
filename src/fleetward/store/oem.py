"""OEM bindings: the manufacturer certificate (IDevID) a device was registered from."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Connection, RowMapping, insert, select, update
from sqlalchemy.exc import IntegrityError

from fleetward.errors import Conflict
from fleetward.store.schema import oem_bindings

# Approval states: "none" (the OEM CA needs no approval), then pending → approved | rejected.
APPROVAL_NONE = "none"
APPROVAL_PENDING = "pending"
APPROVAL_APPROVED = "approved"
APPROVAL_REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class OemBinding:
    idevid_sha256: str
    device_id: str
    ca_name: str
    idevid_subject: str
    approval: str
    created_at: dt.datetime
    decided_at: dt.datetime | None = None
    decided_by: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {
            "device_id": self.device_id,
            "oem_ca": self.ca_name,
            "idevid_subject": self.idevid_subject,
            "idevid_sha256": self.idevid_sha256,
            "approval": self.approval,
            "created_at": self.created_at.isoformat(),
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
            "decided_by": self.decided_by,
        }


def insert_binding(conn: Connection, binding: OemBinding) -> None:
    """Raises: Conflict: the IDevID or the device is already bound."""
    try:
        with conn.begin_nested():
            conn.execute(insert(oem_bindings),
                         {k: getattr(binding, k) for k in OemBinding.__slots__})
    except IntegrityError:
        raise Conflict(f"device {binding.device_id!r} or this IDevID is already bound") from None


def get_by_idevid(conn: Connection, idevid_sha256: str) -> OemBinding | None:
    row = conn.execute(
        select(oem_bindings).where(oem_bindings.c.idevid_sha256 == idevid_sha256)
    ).first()
    return _from_row(row._mapping) if row else None


def get_by_device(conn: Connection, device_id: str) -> OemBinding | None:
    row = conn.execute(select(oem_bindings).where(oem_bindings.c.device_id == device_id)).first()
    return _from_row(row._mapping) if row else None


def list_bindings(conn: Connection, approval: str | None, limit: int) -> list[OemBinding]:
    query = select(oem_bindings).order_by(oem_bindings.c.created_at, oem_bindings.c.device_id)
    if approval is not None:
        query = query.where(oem_bindings.c.approval == approval)
    return [_from_row(r._mapping) for r in conn.execute(query.limit(limit))]


def decide(conn: Connection, device_id: str, approval: str, at: dt.datetime, by: str) -> bool:
    """Approve or reject a pending binding; False if it is not pending (any more)."""
    result = conn.execute(
        update(oem_bindings)
        .where(oem_bindings.c.device_id == device_id)
        .where(oem_bindings.c.approval == APPROVAL_PENDING)
        .values(approval=approval, decided_at=at, decided_by=by)
    )
    return result.rowcount == 1


def _from_row(row: RowMapping) -> OemBinding:
    return OemBinding(**{k: row[k] for k in OemBinding.__slots__})
