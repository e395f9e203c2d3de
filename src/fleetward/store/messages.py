"""Rows of the SQL message sink (``device_messages``): accepted telemetry and events."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select

from fleetward.store.schema import device_messages


@dataclass(frozen=True, slots=True)
class MessageRow:
    """One message as the sink writes it (``id`` is assigned by the database)."""

    device_id: str
    device_type: str
    kind: str  # telemetry | event
    message_type: str
    channel: str  # mqtt | https
    payload: dict[str, Any]
    received_at: dt.datetime
    topic: str | None = None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    row: MessageRow

    def to_json(self) -> dict[str, Any]:
        r = self.row
        return {"id": self.id, "device_id": r.device_id, "device_type": r.device_type,
                "kind": r.kind, "message_type": r.message_type, "channel": r.channel,
                "topic": r.topic, "payload": r.payload,
                "received_at": r.received_at.isoformat().replace("+00:00", "Z")}


def insert_many(conn: Connection, rows: Sequence[MessageRow]) -> None:
    """Insert ``rows`` in one statement (executemany) inside the caller's transaction."""
    if not rows:
        return
    conn.execute(insert(device_messages), [
        {"device_id": r.device_id, "device_type": r.device_type, "kind": r.kind,
         "message_type": r.message_type, "channel": r.channel, "topic": r.topic,
         "payload": r.payload, "received_at": r.received_at} for r in rows])


def list_for_device(conn: Connection, device_id: str, limit: int,
                    after_id: int | None = None) -> list[StoredMessage]:
    """A device's messages, oldest first.

    Without ``after_id``: the newest ``limit`` messages. With it: the first ``limit``
    messages whose id is greater (keyset paging, for following a device's stream).
    """
    c = device_messages.c
    query = select(device_messages).where(c.device_id == device_id)
    if after_id is None:
        rows = list(conn.execute(query.order_by(c.id.desc()).limit(limit)))
        rows.reverse()
    else:
        rows = list(conn.execute(query.where(c.id > after_id).order_by(c.id).limit(limit)))
    return [_from_row(r._mapping) for r in rows]


def _from_row(m: Any) -> StoredMessage:
    return StoredMessage(int(m["id"]), MessageRow(
        device_id=m["device_id"], device_type=m["device_type"], kind=m["kind"],
        message_type=m["message_type"], channel=m["channel"], payload=m["payload"],
        received_at=m["received_at"], topic=m["topic"]))
