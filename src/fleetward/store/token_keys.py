"""Rows of token signing keys (the private key itself lives in a file or on a token)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, or_, select, update

from fleetward.store.schema import token_signing_keys


@dataclass(frozen=True, slots=True)
class TokenKeyRow:
    kid: str
    algorithm: str
    key_ref: dict[str, Any]
    public_jwk: dict[str, str]
    created_at: dt.datetime
    retired_at: dt.datetime | None
    expires_at: dt.datetime | None


def insert_key(conn: Connection, row: TokenKeyRow) -> None:
    conn.execute(insert(token_signing_keys).values(
        kid=row.kid, algorithm=row.algorithm, key_ref=dict(row.key_ref),
        public_jwk=dict(row.public_jwk), created_at=row.created_at,
        retired_at=row.retired_at, expires_at=row.expires_at))


def live_keys(conn: Connection, now: dt.datetime) -> list[TokenKeyRow]:
    """Keys that still sign or verify (not past ``expires_at``), oldest first."""
    rows = conn.execute(
        select(token_signing_keys)
        .where(or_(token_signing_keys.c.expires_at.is_(None),
                   token_signing_keys.c.expires_at > now))
        .order_by(token_signing_keys.c.created_at, token_signing_keys.c.kid))
    return [_from_row(r._mapping) for r in rows]


def retire_others(conn: Connection, keep_kid: str, at: dt.datetime,
                  expires_at: dt.datetime) -> list[str]:
    """Stop every signing key but ``keep_kid``; each stays verifiable until
    ``expires_at``. Returns the kids retired."""
    active = conn.execute(select(token_signing_keys.c.kid).where(
        token_signing_keys.c.retired_at.is_(None),
        token_signing_keys.c.kid != keep_kid)).scalars().all()
    if active:
        conn.execute(update(token_signing_keys)
                     .where(token_signing_keys.c.kid.in_(active))
                     .values(retired_at=at, expires_at=expires_at))
    return list(active)


def _from_row(row: Any) -> TokenKeyRow:
    return TokenKeyRow(row["kid"], row["algorithm"], dict(row["key_ref"]),
                       dict(row["public_jwk"]), row["created_at"], row["retired_at"],
                       row["expires_at"])
