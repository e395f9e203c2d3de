"""Devices, device types and their certificates, as plain frozen data."""

from __future__ import annotations

import datetime as dt
import enum
import re
from dataclasses import dataclass, field
from typing import Any

from fleetward.errors import InvalidInput
from fleetward.model.lifecycle import LifecycleState

# Device ids end up in certificate subjects, SAN URIs, MQTT client ids and topic
# levels, so they must not contain '/', '+', '#', whitespace or URI-reserved characters.
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
TYPE_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_SERIAL_TEXT = re.compile(r"[0-9a-f:]*[0-9a-f][0-9a-f:]*")


def validate_device_id(device_id: str) -> str:
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise InvalidInput(
            f"invalid device id {device_id!r}",
            hint="1-128 characters: letters, digits and . _ : - ; starting with a letter or digit",
        )
    return device_id


def validate_type_name(name: str) -> str:
    if not TYPE_NAME_PATTERN.fullmatch(name):
        raise InvalidInput(
            f"invalid device type name {name!r}",
            hint="1-64 characters: lower-case letters, digits, _ and -",
        )
    return name


def device_uri(device_id: str) -> str:
    """The SAN URI that names a device in its certificates."""
    return f"urn:fleetward:device:{device_id}"


@dataclass(frozen=True, slots=True)
class DeviceType:
    name: str
    description: str = ""
    message_types: tuple[str, ...] = ()
    created_at: dt.datetime | None = None
    # Certificate profiles (EST labels, RFC 7030 §3.2.2) devices of this type may enroll for.
    enrollment_profiles: tuple[str, ...] = ("device",)


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    type: str
    owner: str
    state: LifecycleState
    labels: dict[str, str] = field(default_factory=dict)
    firmware_version: str | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    last_seen_at: dt.datetime | None = None
    # Access tokens carry the generation they were issued under; +1 kills them all.
    credential_generation: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "owner": self.owner,
            "state": self.state.value,
            "labels": dict(self.labels),
            "firmware_version": self.firmware_version,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "last_seen_at": _iso(self.last_seen_at),
        }


class CertificateStatus(enum.StrEnum):
    VALID = "valid"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: int
    fingerprint_sha256: str
    ca_name: str
    profile: str
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime
    pem: str
    device_id: str | None = None
    revoked_at: dt.datetime | None = None
    revocation_reason: str | None = None
    issued_at: dt.datetime | None = None
    spki_sha256: str | None = None  # SHA-256 of the SubjectPublicKeyInfo DER
    csr_sha256: str | None = None  # SHA-256 of the CSR DER it was issued from
    superseded_by: int | None = None  # serial of the re-enrolled successor
    revoke_after: dt.datetime | None = None  # end of the re-enrollment overlap

    @property
    def status(self) -> CertificateStatus:
        return CertificateStatus.REVOKED if self.revoked_at else CertificateStatus.VALID

    @property
    def serial_hex(self) -> str:
        return format_serial(self.serial)

    def to_json(self, *, with_pem: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "serial": self.serial_hex,
            "fingerprint_sha256": self.fingerprint_sha256,
            "ca": self.ca_name,
            "profile": self.profile,
            "device_id": self.device_id,
            "subject": self.subject,
            "not_before": _iso(self.not_before),
            "not_after": _iso(self.not_after),
            "status": self.status.value,
            "revoked_at": _iso(self.revoked_at),
            "revocation_reason": self.revocation_reason,
            "issued_at": _iso(self.issued_at),
            "superseded_by": format_serial(self.superseded_by) if self.superseded_by else None,
            "revoke_after": _iso(self.revoke_after),
        }
        if with_pem:
            out["pem"] = self.pem
        return out


def format_serial(serial: int) -> str:
    """Serials are shown as lower-case hex without separators, as `openssl x509 -serial`."""
    return format(serial, "x")


def parse_serial(text: str) -> int:
    """A serial as operators paste it: hex, upper or lower case, with an optional 0x and
    colons between digits (``openssl x509 -text``), as the OpenAPI document states.

    Raises:
        InvalidInput: anything else (``int()`` alone would also take "+1f" and "1_f"),
            or zero.
    """
    cleaned = text.strip().lower().removeprefix("0x")
    if not _SERIAL_TEXT.fullmatch(cleaned):
        raise InvalidInput(
            f"invalid certificate serial {text!r}",
            hint="give the serial in hex, as `openssl x509 -noout -serial` prints it",
        )
    try:
        value = int(cleaned.replace(":", ""), 16)
    except ValueError:
        raise InvalidInput(
            f"invalid certificate serial {text!r}",
            hint="give the serial in hex, as `openssl x509 -noout -serial` prints it",
        ) from None
    if value <= 0:
        raise InvalidInput("certificate serials are positive", hint="check the serial")
    return value


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
