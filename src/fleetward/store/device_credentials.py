"""Rows of device credentials other than certificates (raw public keys, symmetric keys)
and of the wrapped data keys that encrypt the symmetric ones.

Row functions only: which credential may be added, rotated or revoked is decided in
tokens/credentials.py. Symmetric keys arrive here already encrypted; the plaintext never
reaches SQL.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, RowMapping, insert, select, update
from sqlalchemy.exc import IntegrityError

from fleetward.store.schema import data_keys, device_credentials

PUBLIC_KEY = "public_key"
SYMMETRIC_KEY = "symmetric_key"
SLOTS = ("primary", "secondary")

_c = device_credentials.c
# slot -> (ciphertext column, version column)
_SLOT_COLUMNS = {"primary": (_c.primary_ciphertext, _c.primary_version),
                 "secondary": (_c.secondary_ciphertext, _c.secondary_version)}


@dataclass(frozen=True, slots=True)
class CredentialRow:
    id: str
    device_id: str
    kind: str  # PUBLIC_KEY | SYMMETRIC_KEY
    public_key_pem: str | None
    jkt: str | None
    primary_ciphertext: bytes | None = field(repr=False)
    secondary_ciphertext: bytes | None = field(repr=False)
    primary_version: int
    secondary_version: int
    created_at: dt.datetime
    created_by: str
    rotated_at: dt.datetime | None
    revoked_at: dt.datetime | None


def insert_credential(conn: Connection, row: CredentialRow) -> None:
    conn.execute(insert(device_credentials),
                 {name: getattr(row, name) for name in CredentialRow.__slots__})


def get_credential(conn: Connection, credential_id: str) -> CredentialRow | None:
    row = conn.execute(select(device_credentials).where(_c.id == credential_id)).first()
    return _from_row(row._mapping) if row else None


def list_credentials(conn: Connection, device_id: str | None = None) -> list[CredentialRow]:
    """Every credential (revoked ones too), of one device or of all, oldest first."""
    query = select(device_credentials).order_by(_c.device_id, _c.created_at, _c.id)
    if device_id is not None:
        query = query.where(_c.device_id == device_id)
    return [_from_row(r._mapping) for r in conn.execute(query)]


def live_credentials(conn: Connection, device_id: str, kind: str) -> list[CredentialRow]:
    """The device's unrevoked credentials of ``kind``, oldest first."""
    rows = conn.execute(
        select(device_credentials)
        .where(_c.device_id == device_id, _c.kind == kind, _c.revoked_at.is_(None))
        .order_by(_c.created_at, _c.id))
    return [_from_row(r._mapping) for r in rows]


def live_symmetric_credentials(conn: Connection) -> list[CredentialRow]:
    """Every unrevoked symmetric credential of every device, oldest first."""
    rows = conn.execute(
        select(device_credentials)
        .where(_c.kind == SYMMETRIC_KEY, _c.revoked_at.is_(None))
        .order_by(_c.device_id, _c.created_at, _c.id))
    return [_from_row(r._mapping) for r in rows]


def live_by_jkt(conn: Connection, jkt: str) -> list[CredentialRow]:
    """Unrevoked public-key credentials, of any device, whose key has this thumbprint."""
    rows = conn.execute(
        select(device_credentials)
        .where(_c.jkt == jkt, _c.kind == PUBLIC_KEY, _c.revoked_at.is_(None)))
    return [_from_row(r._mapping) for r in rows]


def replace_slot(conn: Connection, credential_id: str, slot: str, ciphertext: bytes,
                 expected_version: int, at: dt.datetime) -> bool:
    """Store a slot's new encrypted key with its version + 1.

    Conditional on the credential being unrevoked and the slot still at
    ``expected_version``, so two concurrent rotations cannot both win.

    Returns:
        False if the credential is revoked or the slot moved on meanwhile.
    """
    ciphertext_column, version_column = _SLOT_COLUMNS[slot]
    result = conn.execute(
        update(device_credentials)
        .where(_c.id == credential_id, _c.revoked_at.is_(None),
               version_column == expected_version)
        .values({ciphertext_column: ciphertext, version_column: expected_version + 1,
                 _c.rotated_at: at}))
    return result.rowcount == 1


def revoke_credential(conn: Connection, credential_id: str, at: dt.datetime) -> bool:
    """Mark a credential revoked and drop its encrypted keys (nothing needs them again).

    Returns:
        False if it does not exist or was already revoked.
    """
    result = conn.execute(
        update(device_credentials)
        .where(_c.id == credential_id, _c.revoked_at.is_(None))
        .values(revoked_at=at, primary_ciphertext=None, secondary_ciphertext=None))
    return result.rowcount == 1


def _from_row(row: RowMapping) -> CredentialRow:
    values: dict[str, Any] = {name: row[name] for name in CredentialRow.__slots__}
    for name in ("primary_ciphertext", "secondary_ciphertext"):
        if values[name] is not None:
            values[name] = bytes(values[name])  # psycopg hands out memoryview
    return CredentialRow(**values)


# --- wrapped data keys -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataKeyRow:
    name: str
    wrapped_key: bytes = field(repr=False)
    kek_ref: dict[str, str]
    created_at: dt.datetime


def get_data_key(conn: Connection, name: str) -> DataKeyRow | None:
    row = conn.execute(select(data_keys).where(data_keys.c.name == name)).first()
    if row is None:
        return None
    m = row._mapping
    return DataKeyRow(m["name"], bytes(m["wrapped_key"]), dict(m["kek_ref"]), m["created_at"])


def insert_data_key(conn: Connection, row: DataKeyRow) -> bool:
    """Insert unless a key of that name exists (another node may have just made it).

    Returns:
        False on a name conflict; the caller's transaction stays usable (savepoint).
    """
    try:
        with conn.begin_nested():
            conn.execute(insert(data_keys).values(
                name=row.name, wrapped_key=row.wrapped_key, kek_ref=dict(row.kek_ref),
                created_at=row.created_at))
    except IntegrityError:
        return False
    return True
