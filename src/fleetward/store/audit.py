"""Audit rows and the chain head. Hashing and verification live in fleetward.audit."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Dialect, String, bindparam, insert, select, type_coerce, update
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

from fleetward.store.schema import audit_events, audit_head


@dataclass(frozen=True, slots=True)
class AuditRow:
    seq: int
    at: dt.datetime | None  # None: the stored value is not a timestamp (someone wrote junk)
    actor: str
    action: str
    target: str
    outcome: str
    details: str  # canonical JSON text, exactly as hashed
    prev_hash: str
    hash: str
    mac: str


@dataclass(frozen=True, slots=True)
class HeadRow:
    seq: int
    hash: str
    mac: str


def lock_head(conn: Connection) -> HeadRow | None:
    """Read the chain head, locking it until commit (PostgreSQL ``FOR UPDATE``).

    On SQLite the transaction already holds the write lock (BEGIN IMMEDIATE).
    """
    row = conn.execute(select(audit_head).where(audit_head.c.id == 1).with_for_update()).first()
    return HeadRow(row.seq, row.hash, row.mac) if row else None


def insert_event(conn: Connection, row: AuditRow) -> None:
    # Parameters, not .values(): one cached statement for every append.
    conn.execute(insert(audit_events), {k: getattr(row, k) for k in AuditRow.__slots__})


_UPDATE_HEAD = (
    update(audit_head)
    .where(audit_head.c.id == bindparam("head_id"))
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"), mac=bindparam("new_mac"))
)


def write_head(conn: Connection, head: HeadRow, *, existed: bool) -> None:
    if existed:
        conn.execute(_UPDATE_HEAD, {"head_id": 1, "new_seq": head.seq, "new_hash": head.hash,
                                    "new_mac": head.mac})
    else:
        conn.execute(insert(audit_head), {"id": 1, "seq": head.seq, "hash": head.hash,
                                          "mac": head.mac})


class _StoredAt(TypeDecorator[dt.datetime | None]):
    """Reads ``at`` without failing on junk.

    SQLite accepts any text in a DATETIME column; decoding it the usual way would raise
    and turn ``audit verify`` into a server error instead of naming the edited row.
    """

    impl = String
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value)
            except ValueError:
                return None
        if not isinstance(value, dt.datetime):
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _columns() -> list[ColumnElement[Any]]:
    return [
        type_coerce(c, _StoredAt()).label("at") if c.name == "at" else c
        for c in audit_events.columns
    ]


def iter_events(conn: Connection, batch: int = 5000) -> Iterator[AuditRow]:
    """Every row in sequence order, fetched in batches (keyset on seq)."""
    last = None
    while True:
        query = select(*_columns()).order_by(audit_events.c.seq).limit(batch)
        if last is not None:
            query = query.where(audit_events.c.seq > last)
        rows = [AuditRow(**r._mapping) for r in conn.execute(query)]
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


def query_events(
    conn: Connection,
    *,
    after: int | None = None,
    action: str | None = None,
    limit: int = 100,
    newest_first: bool = False,
) -> list[AuditRow]:
    query = select(*_columns()).limit(limit)
    query = query.order_by(audit_events.c.seq.desc() if newest_first else audit_events.c.seq)
    if after is not None:
        query = query.where(audit_events.c.seq > after)
    if action is not None:
        query = query.where(audit_events.c.action.startswith(action, autoescape=True))
    return [AuditRow(**r._mapping) for r in conn.execute(query)]


def read_head(conn: Connection) -> HeadRow | None:
    row = conn.execute(select(audit_head).where(audit_head.c.id == 1)).first()
    return HeadRow(row.seq, row.hash, row.mac) if row else None
