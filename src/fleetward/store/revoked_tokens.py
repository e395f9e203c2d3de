"""Rows of access tokens revoked one by one (by jti)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, delete, func, select
from sqlalchemy import insert as sql_insert
from sqlalchemy.exc import IntegrityError

from fleetward.store.schema import revoked_access_tokens


def add(conn: Connection, jti: str, device_id: str | None, at: dt.datetime,
        actor: str, forget_after: dt.datetime) -> bool:
    """Record a revoked jti; False if it was already there."""
    try:
        with conn.begin_nested():
            conn.execute(sql_insert(revoked_access_tokens).values(
                jti=jti, device_id=device_id, revoked_at=at, revoked_by=actor,
                forget_after=forget_after))
    except IntegrityError:
        return False
    return True


def forget_expired(conn: Connection, now: dt.datetime) -> int:
    """Drop entries no token they could name can still be presented with."""
    return conn.execute(delete(revoked_access_tokens)
                        .where(revoked_access_tokens.c.forget_after <= now)).rowcount


def live(conn: Connection, now: dt.datetime) -> dict[str, float]:
    """jti → forget-after (epoch seconds) of entries that still matter."""
    rows = conn.execute(select(revoked_access_tokens.c.jti,
                               revoked_access_tokens.c.forget_after)
                        .where(revoked_access_tokens.c.forget_after > now))
    return {jti: forget.timestamp() for jti, forget in rows}


def forget_after(conn: Connection, jti: str) -> float | None:
    row = conn.execute(select(revoked_access_tokens.c.forget_after)
                       .where(revoked_access_tokens.c.jti == jti)).first()
    return None if row is None else float(row[0].timestamp())


def count_live(conn: Connection, now: dt.datetime) -> int:
    return int(conn.execute(select(func.count()).select_from(revoked_access_tokens)
                            .where(revoked_access_tokens.c.forget_after > now)).scalar_one())
