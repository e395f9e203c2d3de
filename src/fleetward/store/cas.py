"""Certificate authority rows: our root and issuing CAs, and registered OEM CAs."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Connection, RowMapping, insert, select, update
from sqlalchemy.exc import IntegrityError

from fleetward.errors import Conflict
from fleetward.store.schema import cas


@dataclass(frozen=True, slots=True)
class CARow:
    name: str
    kind: str  # root | issuing | oem
    parent_name: str | None
    subject: str
    cert_pem: str
    fingerprint_sha256: str
    key_ref: dict[str, str] | None
    device_type: str | None
    imported: bool
    created_at: dt.datetime
    crl_number: int
    crl_der: bytes | None
    crl_this_update: dt.datetime | None
    crl_next_update: dt.datetime | None
    enrollment_approval: bool = False  # OEM CA: new devices wait for an operator


def insert_ca(conn: Connection, row: CARow) -> None:
    values = {k: getattr(row, k) for k in CARow.__slots__}
    try:
        with conn.begin_nested():
            conn.execute(insert(cas).values(**values))
    except IntegrityError:
        raise Conflict(
            f"a CA named {row.name!r} or with the same certificate already exists"
        ) from None


def get_ca(conn: Connection, name: str, *, for_update: bool = False) -> CARow | None:
    query = select(cas).where(cas.c.name == name)
    if for_update:
        query = query.with_for_update()
    row = conn.execute(query).first()
    return _from_row(row._mapping) if row else None


def list_cas(conn: Connection, kind: str | None = None) -> list[CARow]:
    query = select(cas).order_by(cas.c.created_at, cas.c.name)
    if kind is not None:
        query = query.where(cas.c.kind == kind)
    return [_from_row(r._mapping) for r in conn.execute(query)]


def store_crl(
    conn: Connection,
    name: str,
    number: int,
    der: bytes,
    this_update: dt.datetime,
    next_update: dt.datetime,
) -> None:
    conn.execute(
        update(cas)
        .where(cas.c.name == name)
        .values(
            crl_number=number, crl_der=der, crl_this_update=this_update, crl_next_update=next_update
        )
    )


def _from_row(row: RowMapping) -> CARow:
    return CARow(**{k: row[k] for k in CARow.__slots__})
