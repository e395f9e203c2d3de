"""Bootstrap token rows. Redemption is one conditional UPDATE, so it is atomic."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Connection, RowMapping, bindparam, insert, select, update

from fleetward.store.schema import bootstrap_tokens


@dataclass(frozen=True, slots=True)
class BootstrapRow:
    token_id: str
    secret_sha256: str
    device_id: str | None
    device_type: str
    max_uses: int
    uses: int
    expires_at: dt.datetime
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    owner: str | None = None  # batch tokens: owner of the devices they register


def insert_token(conn: Connection, row: BootstrapRow) -> None:
    conn.execute(insert(bootstrap_tokens), {k: getattr(row, k) for k in BootstrapRow.__slots__})


def get_token(conn: Connection, token_id: str) -> BootstrapRow | None:
    row = conn.execute(
        select(bootstrap_tokens).where(bootstrap_tokens.c.token_id == token_id)
    ).first()
    return _from_row(row._mapping) if row else None


# The use is counted only if, at that instant, the token is unrevoked, unexpired and has
# uses left: two concurrent redemptions of a single-use token cannot both match.
_CONSUME = (
    update(bootstrap_tokens)
    .where(bootstrap_tokens.c.token_id == bindparam("tid"))
    .where(bootstrap_tokens.c.uses < bootstrap_tokens.c.max_uses)
    .where(bootstrap_tokens.c.revoked_at.is_(None))
    .where(bootstrap_tokens.c.expires_at > bindparam("now"))
    .values(uses=bootstrap_tokens.c.uses + 1)
)


def consume(conn: Connection, token_id: str, now: dt.datetime) -> bool:
    """Count one use; False if the token is used up, expired or revoked."""
    return conn.execute(_CONSUME, {"tid": token_id, "now": now}).rowcount == 1


def revoke_token(conn: Connection, token_id: str, at: dt.datetime) -> bool:
    result = conn.execute(
        update(bootstrap_tokens)
        .where(bootstrap_tokens.c.token_id == token_id)
        .where(bootstrap_tokens.c.revoked_at.is_(None))
        .values(revoked_at=at)
    )
    return result.rowcount == 1


def _from_row(row: RowMapping) -> BootstrapRow:
    return BootstrapRow(**{k: row[k] for k in BootstrapRow.__slots__})
