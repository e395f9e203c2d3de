"""The registry: devices, device types, their certificates and every lifecycle change.

This is the one place that changes a device's state. It checks the transitions table,
revokes credentials where the target state demands it, and audits the change in the
same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog
from cryptography import x509
from sqlalchemy import Connection

from fleetward.audit import AuditLog
from fleetward.ca import Authority, IssueRequest, get_profile, parse_csr, profiles_from_config
from fleetward.ca.reasons import parse_reason
from fleetward.clock import Clock
from fleetward.errors import (
    Conflict,
    FleetwardError,
    IllegalTransition,
    InvalidInput,
    NotFound,
    PolicyViolation,
)
from fleetward.model import (
    ISSUABLE_STATES,
    REVOKING_STATES,
    TOKEN_ENDING_STATES,
    TRANSITIONS,
    AuditEvent,
    CertificateRecord,
    Device,
    DeviceType,
    LifecycleState,
    check_transition,
    validate_device_id,
    validate_type_name,
)
from fleetward.store import Database
from fleetward.store import certificates as cert_rows
from fleetward.store import devices as device_rows

log = structlog.get_logger("fleetward.registry")

MAX_LABELS = 32
MAX_LABEL_LENGTH = 128  # characters, for keys and values alike
MAX_PAGE = 1000  # devices per list call
# Profiles that belong to Fleetward itself, never to a device.
INFRASTRUCTURE_PROFILES = frozenset({"ca", "server"})


@dataclass(frozen=True, slots=True)
class StateChange:
    device: Device
    previous: LifecycleState
    revoked: tuple[CertificateRecord, ...] = field(default=())


class Registry:
    def __init__(self, db: Database, authority: Authority, audit: AuditLog, clock: Clock) -> None:
        self.db = db
        self.authority = authority
        self.audit = audit
        self.clock = clock
        self.profiles = profiles_from_config(authority.config)
        # Revokes a device's other credentials (symmetric and public keys) inside the
        # transaction that compromises or retires it; set by the node
        # (``DeviceCredentialService.revoke_all_in``).
        self.credential_revoker: Callable[[Connection, str, str, str], object] | None = None

    # --- device types -----------------------------------------------------------------

    def create_type(
        self,
        name: str,
        description: str,
        message_types: list[str],
        actor: str,
        enrollment_profiles: list[str] | None = None,
    ) -> DeviceType:
        """Create a device type.

        ``enrollment_profiles`` are the certificate profiles its devices may enroll for
        through EST labels (default: device only; e.g. add ``gateway``).

        Raises:
            InvalidInput: bad name or unknown/infrastructure profile.
            Conflict: the name is taken.
        """
        validate_type_name(name)
        profiles = tuple(dict.fromkeys(enrollment_profiles or ["device"]))
        for profile in profiles:
            if profile in INFRASTRUCTURE_PROFILES or profile not in self.profiles:
                allowed = sorted(set(self.profiles) - INFRASTRUCTURE_PROFILES)
                raise InvalidInput(f"{profile!r} is not a device certificate profile",
                                   hint=f"use some of: {', '.join(allowed)}")
        device_type = DeviceType(name, description, tuple(message_types),
                                 enrollment_profiles=profiles)
        with self.db.transaction() as conn:
            device_rows.insert_type(conn, device_type, self.clock.now())
            self.audit.append(
                conn,
                AuditEvent(
                    action="device_type.created",
                    actor=actor,
                    target=f"type:{name}",
                    details={"message_types": list(message_types),
                             "enrollment_profiles": list(profiles)},
                ),
            )
        return device_type

    def list_types(self) -> list[DeviceType]:
        with self.db.read() as conn:
            return device_rows.list_types(conn)

    # --- devices ----------------------------------------------------------------------

    def create_device(
        self,
        device_id: str,
        type_name: str,
        owner: str,
        labels: Mapping[str, str] | None,
        actor: str,
    ) -> Device:
        """Register a device in state ``registered``.

        Raises:
            InvalidInput: bad id, labels or owner.
            NotFound: the device type does not exist.
            Conflict: the id is taken.
        """
        with self.db.transaction() as conn:
            return self.register_in(conn, device_id, type_name, owner, labels, actor)

    def register_in(
        self,
        conn: Connection,
        device_id: str,
        type_name: str,
        owner: str,
        labels: Mapping[str, str] | None,
        actor: str,
        how: str = "operator",
    ) -> Device:
        """``create_device`` inside the caller's transaction (enrollment registers devices
        just in time, together with their first certificate)."""
        validate_device_id(device_id)
        labels = _validate_labels(labels or {})
        if not owner or len(owner) > 128:
            raise InvalidInput("owner must be 1-128 characters", hint="e.g. --owner acme")
        now = self.clock.now()
        device = Device(
            id=device_id,
            type=type_name,
            owner=owner,
            state=LifecycleState.REGISTERED,
            labels=labels,
            created_at=now,
            updated_at=now,
        )
        if device_rows.get_type(conn, type_name) is None:
            raise NotFound(
                f"device type {type_name!r} does not exist",
                hint=f"create it first: fleetward type add {type_name}",
            )
        device_rows.insert_device(conn, device)
        self.audit.append(
            conn,
            AuditEvent(
                action="device.created",
                actor=actor,
                target=f"device:{device_id}",
                details={"type": type_name, "owner": owner, "how": how},
            ),
        )
        return device

    def get_device(self, device_id: str) -> Device:
        with self.db.read() as conn:
            return _require_device(conn, device_id)

    def list_devices(
        self,
        *,
        state: LifecycleState | None = None,
        type_name: str | None = None,
        owner: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Device]:
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}", hint="e.g. limit=100")
        with self.db.read() as conn:
            return device_rows.list_devices(
                conn, state=state, type_name=type_name, owner=owner, after=after, limit=limit
            )

    def change_state(
        self,
        device_id: str,
        target: LifecycleState,
        actor: str,
        reason: str = "",
        expected_from: frozenset[LifecycleState] | None = None,
    ) -> StateChange:
        """Move a device to ``target`` if the transitions table allows it.

        ``expected_from`` narrows the move to an operator's intent: "release" means
        quarantined → active, not disabled → active, although the table allows both.

        Entering ``compromised`` or ``retired`` revokes every unrevoked certificate of the
        device (keyCompromise / cessationOfOperation) and re-signs the CRL once.

        Raises:
            NotFound: no such device.
            IllegalTransition: the move is not in the table; names the allowed ones.
        """
        with self.db.transaction() as conn:
            device = _require_device(conn, device_id, for_update=True)
            check_transition(device.state, target)
            if expected_from is not None and device.state not in expected_from:
                names = ", ".join(sorted(s.value for s in expected_from))
                raise IllegalTransition(
                    f"device {device_id} is {device.state.value}; this action applies only "
                    f"to devices that are {names}",
                    hint=f"from {device.state.value} a device may move to: "
                    + (", ".join(sorted(s.value for s in TRANSITIONS[device.state])) or "nothing"),
                    allowed=sorted(s.value for s in TRANSITIONS[device.state]),
                )
            now = self.clock.now()
            device_rows.update_state(conn, device_id, target, now)
            if target in TOKEN_ENDING_STATES:
                # Every access token the device holds dies with this change (the gate
                # reloads the device from this transaction's audit row).
                device_rows.bump_credential_generation(conn, device_id)
            self.audit.append(
                conn,
                AuditEvent(
                    action="device.state_changed",
                    actor=actor,
                    target=f"device:{device_id}",
                    details={"from": device.state.value, "to": target.value, "reason": reason},
                ),
            )
            revoked: tuple[CertificateRecord, ...] = ()
            if target in REVOKING_STATES:
                revoked = self._revoke_all(conn, device_id, REVOKING_STATES[target], actor)
                if self.credential_revoker is not None:
                    # Symmetric keys and registered public keys go with the certificates.
                    self.credential_revoker(conn, device_id, actor, f"device {target.value}")
            updated = _require_device(conn, device_id)
        log.info(
            "device state changed",
            device=device_id,
            previous=device.state.value,
            state=target.value,
            revoked=len(revoked),
        )
        return StateChange(updated, device.state, revoked)

    # --- certificates -----------------------------------------------------------------

    def issue_certificate(
        self, device_id: str, csr_data: bytes, profile_name: str, actor: str
    ) -> CertificateRecord:
        """Issue a certificate for a registered device from its CSR.

        A ``registered`` device becomes ``active`` with its first certificate.

        Raises:
            InvalidInput, PolicyViolation: the CSR is refused by the pipeline.
            NotFound: no such device.
        """
        try:
            csr = parse_csr(csr_data)
            with self.db.transaction() as conn:
                return self.issue_in(conn, device_id, csr, profile_name, actor)
        except FleetwardError as exc:
            self._audit_failure("certificate.issue_refused", actor, f"device:{device_id}", exc)
            raise

    def issue_in(
        self,
        conn: Connection,
        device_id: str,
        csr: x509.CertificateSigningRequest,
        profile_name: str,
        actor: str,
    ) -> CertificateRecord:
        """``issue_certificate`` inside the caller's transaction; the caller audits refusals.

        Raises:
            InvalidInput, PolicyViolation: refused by the pipeline or the device's state.
            NotFound: no such device.
        """
        profile = get_profile(self.profiles, profile_name)
        if profile.name in INFRASTRUCTURE_PROFILES:
            raise PolicyViolation(
                f"{profile.name} certificates are not issued to devices",
                hint="use the device or gateway profile",
            )
        device = _require_device(conn, device_id, for_update=True)
        if device.state not in ISSUABLE_STATES:
            raise PolicyViolation(
                f"device {device_id} is {device.state.value}; it cannot get certificates",
                hint="only registered, active or quarantined devices can be issued to",
            )
        record = self.authority.issue(
            conn,
            IssueRequest(public_key=csr.public_key(), profile=profile, device=device, csr=csr),
            actor,
        )
        if device.state is LifecycleState.REGISTERED:
            check_transition(device.state, LifecycleState.ACTIVE)
            device_rows.update_state(conn, device_id, LifecycleState.ACTIVE, self.clock.now())
            self.audit.append(
                conn,
                AuditEvent(
                    action="device.state_changed",
                    actor=actor,
                    target=f"device:{device_id}",
                    details={
                        "from": "registered",
                        "to": "active",
                        "reason": "first certificate issued",
                    },
                ),
            )
        return record

    def list_certificates(self, device_id: str | None = None) -> list[CertificateRecord]:
        with self.db.read() as conn:
            if device_id is not None:
                _require_device(conn, device_id)
            return cert_rows.list_certificates(conn, device_id=device_id)

    def get_certificate(self, serial: int) -> CertificateRecord:
        with self.db.read() as conn:
            record = cert_rows.get_certificate(conn, serial)
        if record is None:
            raise NotFound(f"no certificate with serial {serial:x}")
        return record

    def revoke_certificate(self, serial: int, reason: str, actor: str) -> CertificateRecord:
        """Revoke a device or gateway certificate.

        Raises:
            PolicyViolation: the serial is a CA or server certificate; revoking those through
                the device path would take the whole fleet or the admin API down.
        """
        with self.db.transaction() as conn:
            record = cert_rows.get_certificate(conn, serial)
            if record is not None and record.profile in INFRASTRUCTURE_PROFILES:
                raise PolicyViolation(
                    f"certificate {record.serial_hex} is a {record.profile} certificate",
                    hint="CA and server certificates are replaced by re-keying the CA or "
                    "re-running init, not revoked through the device API",
                )
            return self.authority.revoke(conn, serial, reason, actor)

    def revoke_device_certificates(
        self, device_id: str, reason: str, actor: str
    ) -> list[CertificateRecord]:
        reason = parse_reason(reason)
        with self.db.transaction() as conn:
            _require_device(conn, device_id)
            return list(self._revoke_all(conn, device_id, reason, actor))

    def _revoke_all(
        self, conn: Connection, device_id: str, reason: str, actor: str
    ) -> tuple[CertificateRecord, ...]:
        live = cert_rows.list_certificates(conn, device_id=device_id, revoked=False, limit=None)
        revoked = []
        for cert in live:
            try:
                revoked.append(
                    self.authority.revoke(conn, cert.serial, reason, actor, refresh_crl=False)
                )
            except Conflict:
                continue  # revoked by another node since we listed it: already what we want
        for ca_name in sorted({c.ca_name for c in live}):
            self.authority.refresh_crl(conn, ca_name)
        return tuple(revoked)

    def _audit_failure(self, action: str, actor: str, target: str, exc: FleetwardError) -> None:
        try:
            with self.db.transaction() as conn:
                self.audit.append(
                    conn,
                    AuditEvent(
                        action=action,
                        actor=actor,
                        target=target,
                        outcome="failure",
                        details={"error": exc.problem_type, "detail": exc.message},
                    ),
                )
        except FleetwardError:
            log.exception("could not audit a refused request", action=action)


def _require_device(conn: Connection, device_id: str, *, for_update: bool = False) -> Device:
    device = device_rows.get_device(conn, device_id, for_update=for_update)
    if device is None:
        raise NotFound(
            f"device {device_id!r} does not exist",
            hint="register it first: fleetward device add ID --type T",
        )
    return device


def _validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"at most {MAX_LABELS} labels per device", hint="drop some labels")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInput(
                "labels are string keys with string values", hint='e.g. {"site": "plant-3"}'
            )
        if not key or len(key) > MAX_LABEL_LENGTH or len(value) > MAX_LABEL_LENGTH:
            raise InvalidInput(f"label {key!r}: keys and values are 1-{MAX_LABEL_LENGTH} chars")
    return dict(labels)
