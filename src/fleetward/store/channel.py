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
                  limit: int = 1000) -> tuple[list[Change], int, bool]:
    """Successful changes of the given actions after ``after_seq``, oldest first.

    Returns the changes, the sequence number to continue from, and whether more may
    follow (the batch was full). Filtering by action happens in SQL, so a flood of
    unrelated audit rows (refused logins, refused enrollments) cannot push a
    revocation behind it. The continuation point is the chain head read first in the
    same unit of work: sequence numbers are assigned under the head lock and committed
    in order, so every row up to that head is already visible.
    """
    head = last_audit_seq(conn)
    rows = conn.execute(
        select(audit_events.c.seq, audit_events.c.action, audit_events.c.target)
        .where(audit_events.c.seq > after_seq, audit_events.c.seq <= head,
               audit_events.c.action.in_(sorted(set(actions))),
               audit_events.c.outcome == "success")
        .order_by(audit_events.c.seq).limit(limit)).all()
    changes = [Change(seq, action, target) for seq, action, target in rows]
    if len(changes) == limit:
        return changes, changes[-1].seq, True
    return changes, max(head, after_seq), False


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

