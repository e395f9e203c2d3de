"""Reads that fill and refresh the data plane's in-memory trust caches.

None of these run per packet: they run once at start, then on the change feed, which
is the audit log itself. Every control-plane change (state change, revocation, policy
edit) is audited in the same transaction that makes it, and audit sequence numbers
are handed out under the chain-head lock, so reading ``seq > last`` in order sees
every committed change exactly once and in commit order, on every node.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, func, select, update

from fleetward.model import Device, DeviceType
from fleetward.store.devices import device_from_row, get_device, list_types
from fleetward.store.schema import audit_events, certificates, devices

LOAD_BATCH = 5000  # rows per query when loading every device at start


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    action: str
    target: str


def last_audit_seq(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(audit_events.c.seq), 0))).scalar_one())


def changes_since(conn: Connection, after_seq: int, actions: Iterable[str],
                  limit: int = 1000) -> tuple[list[Change], int]:
    """Successful changes of the given actions after ``after_seq``, oldest first, and the
    sequence number to continue from (the last row read, matching or not)."""
    wanted = sorted(set(actions))
    rows = conn.execute(
        select(audit_events.c.seq, audit_events.c.action, audit_events.c.target,
               audit_events.c.outcome)
        .where(audit_events.c.seq > after_seq)
        .order_by(audit_events.c.seq).limit(limit))
    changes: list[Change] = []
    last = after_seq
    for seq, action, target, outcome in rows:
        last = seq
        if outcome == "success" and action in wanted:
            changes.append(Change(seq, action, target))
    return changes, last


def all_devices(conn: Connection) -> Iterable[Device]:
    last: str | None = None
    while True:
        query = select(devices).order_by(devices.c.id).limit(LOAD_BATCH)
        if last is not None:
            query = query.where(devices.c.id > last)
        batch = [device_from_row(r._mapping) for r in conn.execute(query)]
        if not batch:
            return
        yield from batch
        last = batch[-1].id


def revoked_serials(conn: Connection, now: dt.datetime) -> set[int]:
    """Serials of revoked certificates that have not expired (expired ones fail the
    TLS handshake anyway, so the set stays bounded by what is still valid)."""
    rows = conn.execute(select(certificates.c.serial)
                        .where(certificates.c.revoked_at.is_not(None))
                        .where(certificates.c.not_after > now))
    return {int(serial, 16) for (serial,) in rows}


def device_revoked_serials(conn: Connection, device_id: str) -> set[int]:
    rows = conn.execute(select(certificates.c.serial)
                        .where(certificates.c.device_id == device_id)
                        .where(certificates.c.revoked_at.is_not(None)))
    return {int(serial, 16) for (serial,) in rows}


def device(conn: Connection, device_id: str) -> Device | None:
    return get_device(conn, device_id)


def device_types(conn: Connection) -> list[DeviceType]:
    return list_types(conn)


def touch_last_seen(conn: Connection, seen: dict[str, dt.datetime]) -> None:
    """Record when devices were last connected (one batched statement, not per packet)."""
    if not seen:
        return
    conn.execute(
        update(devices).where(devices.c.id == bindparam("device_id"))
        .values(last_seen_at=bindparam("seen_at")),
        [{"device_id": device_id, "seen_at": at} for device_id, at in seen.items()])
