"""Pure data: devices, lifecycle, certificates, operators, audit events."""

from fleetward.model.audit import AuditEvent, AuditRecord
from fleetward.model.device import (
    DEVICE_ID_PATTERN,
    CertificateRecord,
    CertificateStatus,
    Device,
    DeviceType,
    device_uri,
    format_serial,
    parse_serial,
    validate_device_id,
    validate_type_name,
)
from fleetward.model.lifecycle import (
    ISSUABLE_STATES,
    REVOKING_STATES,
    TOKEN_ENDING_STATES,
    TRANSITIONS,
    LifecycleState,
    check_transition,
    parse_state,
)
from fleetward.model.operator import Operator, Role, role_allows

__all__ = [
    "DEVICE_ID_PATTERN",
    "ISSUABLE_STATES",
    "REVOKING_STATES",
    "TOKEN_ENDING_STATES",
    "TRANSITIONS",
    "AuditEvent",
    "AuditRecord",
    "CertificateRecord",
    "CertificateStatus",
    "Device",
    "DeviceType",
    "LifecycleState",
    "Operator",
    "Role",
    "check_transition",
    "device_uri",
    "format_serial",
    "parse_serial",
    "parse_state",
    "role_allows",
    "validate_device_id",
    "validate_type_name",
]
