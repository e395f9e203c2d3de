"""Device and device-type rows."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, RowMapping, insert, select, update
from sqlalchemy.exc import IntegrityError

from fleetward.errors import Conflict
from fleetward.model import Device, DeviceType, LifecycleState
from fleetward.store.schema import device_types, devices


def insert_type(conn: Connection, device_type: DeviceType, at: dt.datetime) -> None:
    try:
        with conn.begin_nested():
            conn.execute(
                insert(device_types).values(
                    name=device_type.name,
                    description=device_type.description,
                    message_types=list(device_type.message_types),
                    created_at=at,
                    enrollment_profiles=list(device_type.enrollment_profiles),
                )
            )
    except IntegrityError:
        raise Conflict(f"device type {device_type.name!r} already exists") from None


def get_type(conn: Connection, name: str) -> DeviceType | None:
    row = conn.execute(select(device_types).where(device_types.c.name == name)).first()
    return _type_from_row(row._mapping) if row else None


def list_types(conn: Connection) -> list[DeviceType]:
    rows = conn.execute(select(device_types).order_by(device_types.c.name))
    return [_type_from_row(r._mapping) for r in rows]


def insert_device(conn: Connection, device: Device) -> None:
    try:
        with conn.begin_nested():
            conn.execute(
                insert(devices).values(
                    id=device.id,
                    type=device.type,
                    owner=device.owner,
                    labels=dict(device.labels),
                    state=device.state.value,
                    firmware_version=device.firmware_version,
                    created_at=device.created_at,
                    updated_at=device.updated_at,
                    last_seen_at=device.last_seen_at,
                )
            )
    except IntegrityError:
        raise Conflict(
            f"device {device.id!r} already exists", hint="choose another id or use the existing one"
        ) from None


def get_device(conn: Connection, device_id: str, *, for_update: bool = False) -> Device | None:
    query = select(devices).where(devices.c.id == device_id)
    if for_update:
        query = query.with_for_update()
    row = conn.execute(query).first()
    return device_from_row(row._mapping) if row else None


def list_devices(
    conn: Connection,
    *,
    state: LifecycleState | None = None,
    type_name: str | None = None,
    owner: str | None = None,
    after: str | None = None,
    limit: int = 100,
) -> list[Device]:
    """Devices ordered by id; keyset paging with ``after`` (the last id of the previous page)."""
    query = select(devices).order_by(devices.c.id).limit(limit)
    if state is not None:
        query = query.where(devices.c.state == state.value)
    if type_name is not None:
        query = query.where(devices.c.type == type_name)
    if owner is not None:
        query = query.where(devices.c.owner == owner)
    if after is not None:
        query = query.where(devices.c.id > after)
    return [device_from_row(r._mapping) for r in conn.execute(query)]


def update_state(conn: Connection, device_id: str, state: LifecycleState, at: dt.datetime) -> None:
    conn.execute(
        update(devices).where(devices.c.id == device_id).values(state=state.value, updated_at=at)
    )


def bump_credential_generation(conn: Connection, device_id: str) -> None:
    """Invalidate every access token the device holds (they name the old generation).

    Runs inside the transaction that makes the change (state change, revocation), whose
    audit row is the change feed entry that makes every node reload the device.
    """
    conn.execute(update(devices).where(devices.c.id == device_id).values(
        credential_generation=devices.c.credential_generation + 1))


def device_from_row(row: RowMapping) -> Device:
    return Device(
        id=row["id"],
        type=row["type"],
        owner=row["owner"],
        state=LifecycleState(row["state"]),
        labels=dict(row["labels"] or {}),
        firmware_version=row["firmware_version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_seen_at=row["last_seen_at"],
        credential_generation=int(row["credential_generation"] or 0),
    )


def _type_from_row(row: RowMapping) -> DeviceType:
    return DeviceType(
        name=row["name"],
        description=row["description"],
        message_types=tuple(row["message_types"] or ()),
        created_at=row["created_at"],
        enrollment_profiles=tuple(row["enrollment_profiles"] or ("device",)),
    )
