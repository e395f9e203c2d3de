"""Policy documents and their attachments to device types and devices.

Documents are stored as the validated, normalised JSON the policy module produced; this
module does not interpret them. ``version`` counts puts (1 on create, +1 each replace).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, RowMapping, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from fleetward.errors import Conflict
from fleetward.store.schema import policies, policy_attachments

TARGET_KINDS = ("type", "device")


@dataclass(frozen=True, slots=True)
class PolicyRow:
    name: str
    document: dict[str, Any]
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class AttachmentRow:
    policy_name: str
    target_kind: str  # "type" | "device"
    target: str  # type name or device id
    attached_at: dt.datetime


@dataclass(frozen=True, slots=True)
class SnapshotRows:
    """Everything a policy snapshot is built from, read in one transaction."""

    policies: list[PolicyRow]
    attachments: list[AttachmentRow]


def put_policy(conn: Connection, name: str, document: dict[str, Any], at: dt.datetime) -> int:
    """Insert ``name`` or replace its document; returns the new version.

    Raises:
        Conflict: a concurrent create of the same name won (retry to replace it).
    """
    current = conn.execute(
        select(policies.c.version).where(policies.c.name == name).with_for_update()
    ).scalar_one_or_none()
    if current is None:
        try:
            with conn.begin_nested():
                conn.execute(insert(policies).values(name=name, document=document, version=1,
                                                     created_at=at, updated_at=at))
        except IntegrityError:
            raise Conflict(f"policy {name!r} was created concurrently",
                           hint="send the request again to replace it") from None
        return 1
    version = int(current) + 1
    conn.execute(update(policies).where(policies.c.name == name)
                 .values(document=document, version=version, updated_at=at))
    return version


def ensure_policy(conn: Connection, name: str, document: dict[str, Any],
                  at: dt.datetime) -> None:
    """Insert a row for ``name`` unless one exists (built-in policies get a row only so
    that attachments can reference them)."""
    exists = conn.execute(select(policies.c.name).where(policies.c.name == name)).first()
    if exists is None:
        try:
            with conn.begin_nested():
                conn.execute(insert(policies).values(name=name, document=document, version=1,
                                                     created_at=at, updated_at=at))
        except IntegrityError:
            pass  # created concurrently: what we wanted


def get_policy(conn: Connection, name: str) -> PolicyRow | None:
    row = conn.execute(select(policies).where(policies.c.name == name)).first()
    return _policy(row._mapping) if row else None


def list_policies(conn: Connection) -> list[PolicyRow]:
    return [_policy(r._mapping) for r in conn.execute(select(policies).order_by(policies.c.name))]


def delete_policy(conn: Connection, name: str) -> bool:
    """Delete ``name``; False if it did not exist.

    Raises:
        Conflict: it is still attached (naming where), so no device loses a policy
            silently.
    """
    attached = attachments_of(conn, name)
    if attached:
        where = ", ".join(f"{a.target_kind} {a.target}" for a in attached[:5])
        more = f" and {len(attached) - 5} more" if len(attached) > 5 else ""
        first = attached[0]
        raise Conflict(f"policy {name!r} is attached to {where}{more}",
                       hint=f"detach it first, e.g. fleetward policy detach {name} "
                            f"--{first.target_kind} {first.target}",
                       attachments=[{"kind": a.target_kind, "target": a.target}
                                    for a in attached])
    return conn.execute(delete(policies).where(policies.c.name == name)).rowcount == 1


def attach(conn: Connection, name: str, kind: str, target: str, at: dt.datetime) -> bool:
    """Attach ``name`` to a type or device; False if it already was (idempotent)."""
    exists = conn.execute(select(policy_attachments.c.policy_name).where(
        policy_attachments.c.policy_name == name, policy_attachments.c.target_kind == kind,
        policy_attachments.c.target == target)).first()
    if exists is not None:
        return False
    try:
        with conn.begin_nested():
            conn.execute(insert(policy_attachments).values(
                policy_name=name, target_kind=kind, target=target, attached_at=at))
    except IntegrityError:
        return False  # attached concurrently: the same outcome
    return True


def detach(conn: Connection, name: str, kind: str, target: str) -> bool:
    """Remove one attachment; False if there was none."""
    return conn.execute(delete(policy_attachments).where(
        policy_attachments.c.policy_name == name, policy_attachments.c.target_kind == kind,
        policy_attachments.c.target == target)).rowcount == 1


def attachments_of(conn: Connection, name: str) -> list[AttachmentRow]:
    rows = conn.execute(select(policy_attachments)
                        .where(policy_attachments.c.policy_name == name)
                        .order_by(policy_attachments.c.target_kind,
                                  policy_attachments.c.target))
    return [_attachment(r._mapping) for r in rows]


def count_attached_to(conn: Connection, kind: str, target: str) -> int:
    """How many policies are attached to one type or device."""
    return int(conn.execute(select(func.count()).select_from(policy_attachments).where(
        policy_attachments.c.target_kind == kind,
        policy_attachments.c.target == target)).scalar_one())


def load_snapshot(conn: Connection) -> SnapshotRows:
    """Every policy and attachment (run inside one read transaction for consistency)."""
    attachments = conn.execute(select(policy_attachments).order_by(
        policy_attachments.c.target_kind, policy_attachments.c.target,
        policy_attachments.c.attached_at, policy_attachments.c.policy_name))
    return SnapshotRows(list_policies(conn), [_attachment(r._mapping) for r in attachments])


def _policy(row: RowMapping) -> PolicyRow:
    return PolicyRow(name=row["name"], document=dict(row["document"]),
                     version=int(row["version"]), created_at=row["created_at"],
                     updated_at=row["updated_at"])


def _attachment(row: RowMapping) -> AttachmentRow:
    return AttachmentRow(policy_name=row["policy_name"], target_kind=row["target_kind"],
                         target=row["target"], attached_at=row["attached_at"])
