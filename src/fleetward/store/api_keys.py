"""API key rows: SHA-256 of the secret only, and of the previous one during a rotation's
grace period. Rotation and revocation are conditional UPDATEs, so they are atomic."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Connection, RowMapping, insert, select, update

from fleetward.store.schema import api_keys


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    key_id: str
    name: str
    secret_sha256: str  # never the secret itself
    previous_secret_sha256: str | None
    previous_valid_until: dt.datetime | None
    scopes: tuple[str, ...]
    created_at: dt.datetime
    created_by: str
    expires_at: dt.datetime | None
    rotated_at: dt.datetime | None
    revoked_at: dt.datetime | None


def insert_key(conn: Connection, row: ApiKeyRow) -> None:
    values = {name: getattr(row, name) for name in ApiKeyRow.__slots__}
    values["scopes"] = list(row.scopes)
    conn.execute(insert(api_keys), values)


def get_key(conn: Connection, key_id: str) -> ApiKeyRow | None:
    row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
    return _from_row(row._mapping) if row else None


def list_keys(conn: Connection) -> list[ApiKeyRow]:
    rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id))
    return [_from_row(r._mapping) for r in rows]


def rotate_secret(conn: Connection, key_id: str, *, expected_sha256: str, new_sha256: str,
                  previous_sha256: str | None, previous_valid_until: dt.datetime | None,
                  at: dt.datetime) -> bool:
    """Replace the secret's hash, keeping ``previous_sha256`` valid until
    ``previous_valid_until`` (both None: the old secret dies at once).

    Returns:
        False if the key is revoked, or its secret changed since it was read.
    """
    result = conn.execute(
        update(api_keys)
        .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None),
               api_keys.c.secret_sha256 == expected_sha256)
        .values(secret_sha256=new_sha256, previous_secret_sha256=previous_sha256,
                previous_valid_until=previous_valid_until, rotated_at=at))
    return result.rowcount == 1


def revoke_key(conn: Connection, key_id: str, at: dt.datetime) -> bool:
    """Returns False if the key does not exist or is already revoked."""
    result = conn.execute(
        update(api_keys)
        .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=at, previous_secret_sha256=None, previous_valid_until=None))
    return result.rowcount == 1


def _from_row(row: RowMapping) -> ApiKeyRow:
    return ApiKeyRow(
        key_id=row["key_id"], name=row["name"], secret_sha256=row["secret_sha256"],
        previous_secret_sha256=row["previous_secret_sha256"],
        previous_valid_until=row["previous_valid_until"],
        scopes=tuple(row["scopes"] or ()), created_at=row["created_at"],
        created_by=row["created_by"], expires_at=row["expires_at"],
        rotated_at=row["rotated_at"], revoked_at=row["revoked_at"])
