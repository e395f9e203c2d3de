"""Operator API tokens, stored as SHA-256 of the secret part only."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Connection, RowMapping, insert, select, update

from fleetward.model import Role
from fleetward.store.schema import operator_tokens


@dataclass(frozen=True, slots=True)
class TokenRow:
    token_id: str
    name: str
    role: Role
    secret_sha256: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None


def insert_token(conn: Connection, row: TokenRow) -> None:
    conn.execute(
        insert(operator_tokens).values(
            token_id=row.token_id,
            name=row.name,
            role=row.role.value,
            secret_sha256=row.secret_sha256,
            created_at=row.created_at,
            revoked_at=None,
        )
    )


def get_token(conn: Connection, token_id: str) -> TokenRow | None:
    row = conn.execute(
        select(operator_tokens).where(operator_tokens.c.token_id == token_id)
    ).first()
    return _from_row(row._mapping) if row else None


def list_tokens(conn: Connection) -> list[TokenRow]:
    rows = conn.execute(select(operator_tokens).order_by(operator_tokens.c.created_at))
    return [_from_row(r._mapping) for r in rows]


def revoke_token(conn: Connection, token_id: str, at: dt.datetime) -> bool:
    result = conn.execute(
        update(operator_tokens)
        .where(operator_tokens.c.token_id == token_id)
        .where(operator_tokens.c.revoked_at.is_(None))
        .values(revoked_at=at)
    )
    return result.rowcount == 1


def _from_row(row: RowMapping) -> TokenRow:
    return TokenRow(
        token_id=row["token_id"],
        name=row["name"],
        role=Role(row["role"]),
        secret_sha256=row["secret_sha256"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )
