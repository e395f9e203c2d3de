"""Commands queued for devices (``device_commands``).

A command is *open* while its status is ``pending`` (not yet handed to the device) or
``delivered`` (handed over, no result yet) and ``expires_at`` lies in the future. Only
an open command can be completed, by the device it is addressed to, and only once: the
completing UPDATE carries all three conditions, so two racing results (a redelivered
MQTT command answered twice, two nodes) cannot both win.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, RowMapping, func, insert, select, update

from fleetward.store.schema import device_commands

PENDING = "pending"
DELIVERED = "delivered"
SUCCEEDED = "succeeded"
FAILED = "failed"
EXPIRED = "expired"
OPEN_STATUSES = (PENDING, DELIVERED)
FINAL_STATUSES = (SUCCEEDED, FAILED)


@dataclass(frozen=True, slots=True)
class CommandRow:
    id: str
    device_id: str
    name: str
    payload: dict[str, Any]
    status: str
    created_by: str
    created_at: dt.datetime
    expires_at: dt.datetime
    delivered_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    result: dict[str, Any] | None = None


def insert_command(conn: Connection, row: CommandRow) -> None:
    conn.execute(insert(device_commands).values(
        id=row.id, device_id=row.device_id, name=row.name, payload=row.payload,
        status=row.status, created_by=row.created_by, created_at=row.created_at,
        expires_at=row.expires_at, delivered_at=row.delivered_at,
        completed_at=row.completed_at, result=row.result))


def get_command(conn: Connection, command_id: str) -> CommandRow | None:
    row = conn.execute(select(device_commands).where(device_commands.c.id == command_id)
                       ).first()
    return _row(row._mapping) if row else None


def pending_for(conn: Connection, device_id: str, now: dt.datetime) -> list[CommandRow]:
    """Open commands of ``device_id``, oldest first."""
    query = (select(device_commands)
             .where(device_commands.c.device_id == device_id,
                    device_commands.c.status.in_(OPEN_STATUSES),
                    device_commands.c.expires_at > now)
             .order_by(device_commands.c.created_at, device_commands.c.id))
    return [_row(r._mapping) for r in conn.execute(query)]


def mark_delivered(conn: Connection, ids: Iterable[str], at: dt.datetime) -> int:
    """Move pending commands to ``delivered``; a redelivery keeps the first time.
    Returns how many changed."""
    wanted = list(ids)
    if not wanted:
        return 0
    result = conn.execute(update(device_commands)
                          .where(device_commands.c.id.in_(wanted),
                                 device_commands.c.status == PENDING)
                          .values(status=DELIVERED, delivered_at=at))
    return int(result.rowcount)


def complete(conn: Connection, device_id: str, command_id: str, status: str,
             result: dict[str, Any], at: dt.datetime) -> bool:
    """Record the device's answer; False unless the command was open, unexpired and
    addressed to ``device_id`` (one conditional UPDATE: the first answer wins)."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"not a final command status: {status!r}")
    changed = conn.execute(update(device_commands)
                           .where(device_commands.c.id == command_id,
                                  device_commands.c.device_id == device_id,
                                  device_commands.c.status.in_(OPEN_STATUSES),
                                  device_commands.c.expires_at > at)
                           .values(status=status, result=result, completed_at=at))
    return int(changed.rowcount) == 1


def expire_due(conn: Connection, now: dt.datetime) -> int:
    """Mark open commands past ``expires_at`` as expired; returns how many."""
    changed = conn.execute(update(device_commands)
                           .where(device_commands.c.status.in_(OPEN_STATUSES),
                                  device_commands.c.expires_at <= now)
                           .values(status=EXPIRED))
    return int(changed.rowcount)


def count_open(conn: Connection, device_id: str, now: dt.datetime) -> int:
    query = (select(func.count()).select_from(device_commands)
             .where(device_commands.c.device_id == device_id,
                    device_commands.c.status.in_(OPEN_STATUSES),
                    device_commands.c.expires_at > now))
    return int(conn.execute(query).scalar_one())


def list_for_device(conn: Connection, device_id: str, limit: int = 100) -> list[CommandRow]:
    """The newest ``limit`` commands of ``device_id``, newest first."""
    query = (select(device_commands).where(device_commands.c.device_id == device_id)
             .order_by(device_commands.c.created_at.desc(), device_commands.c.id.desc())
             .limit(limit))
    return [_row(r._mapping) for r in conn.execute(query)]


def _row(row: RowMapping) -> CommandRow:
    return CommandRow(
        id=row["id"], device_id=row["device_id"], name=row["name"],
        payload=dict(row["payload"] or {}), status=row["status"],
        created_by=row["created_by"], created_at=row["created_at"],
        expires_at=row["expires_at"], delivered_at=row["delivered_at"],
        completed_at=row["completed_at"],
        result=dict(row["result"]) if row["result"] is not None else None)
