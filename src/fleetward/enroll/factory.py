"""Factory provisioning: devices made in batches on a production line.

Two ways, both run by an operator (never by a device):

- ``create_batch``: register N new devices under random ids, each with a single-use
  bootstrap token bound to it (RFC 7030 §3.2.3). The line flashes one token per unit;
  the tokens exist only in the caller's manifest (SHA-256 at rest here).
- ``sign``: the line generated the key on the device and exported a CSR; sign it for a
  named device, registering the device if needed. Idempotent per CSR, so a re-run after a
  crash or a lost output file issues nothing new.

Each call is ONE transaction: devices, tokens, certificates and audit events commit
together or not at all, so a failed batch leaves no half-provisioned devices.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

import structlog
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Connection

from fleetward.audit import AuditLog
from fleetward.ca import parse_csr
from fleetward.clock import Clock
from fleetward.enroll.bootstrap import BootstrapTokens, IssuedToken
from fleetward.errors import Conflict, FleetwardError, InvalidInput, NotFound
from fleetward.model import AuditEvent, CertificateRecord, validate_device_id
from fleetward.registry import Registry
from fleetward.store import Database
from fleetward.store import certificates as cert_rows
from fleetward.store import devices as device_rows

log = structlog.get_logger("fleetward.factory")

MAX_FACTORY_BATCH = 500  # devices per call: one transaction stays short (≈ seconds)
ID_RANDOM_HEX = 12  # 48 random bits per id; a collision is retried, never overwritten
MAX_ID_DRAWS = 5  # per device; a sixth collision in a row means something else is wrong
FACTORY_PROFILE = "device"


class FactoryService:
    def __init__(self, db: Database, registry: Registry, tokens: BootstrapTokens,
                 audit: AuditLog, clock: Clock) -> None:
        self.db = db
        self.registry = registry
        self.tokens = tokens
        self.audit = audit
        self.clock = clock

    def create_batch(self, device_type: str, count: int, owner: str, id_prefix: str,
                     ttl: dt.timedelta, actor: str) -> list[tuple[str, IssuedToken]]:
        """Register ``count`` new devices, each with a single-use bootstrap token.

        Device ids are ``id_prefix`` followed by 12 random hex characters (CSPRNG): the
        ids are printed on labels and must not be guessable from each other.

        Args:
            device_type: existing device type of every new device.
            count: 1-500 devices (the CLI splits larger runs into several calls).
            owner: owner / tenant of the devices.
            id_prefix: e.g. ``"plant3-"``; the whole id must be a valid device id.
            ttl: lifetime of the tokens (1 minute to 90 days).
            actor: who asked, for the audit log.

        Raises:
            InvalidInput: count, prefix, owner or ttl out of range.
            NotFound: no such device type.

        Returns:
            (device id, token) pairs; the tokens are never retrievable again.
        """
        try:
            if not 1 <= count <= MAX_FACTORY_BATCH:
                raise InvalidInput(f"a factory batch holds 1-{MAX_FACTORY_BATCH} devices per "
                                   "request", hint="split the run into several requests")
            _check_prefix(id_prefix)
            created: list[tuple[str, IssuedToken]] = []
            with self.db.transaction() as conn:
                if device_rows.get_type(conn, device_type) is None:
                    raise NotFound(f"device type {device_type!r} does not exist",
                                   hint=f"create it first: fleetward type add {device_type}")
                for _ in range(count):
                    device_id = self._register_new(conn, device_type, owner, id_prefix, actor)
                    created.append((device_id, self.tokens.issue_in(conn, device_id,
                                                                    device_type, ttl, actor)))
                self.audit.append(conn, AuditEvent(
                    action="factory.tokens_created", actor=actor, target=f"type:{device_type}",
                    details={"count": count, "owner": owner, "id_prefix": id_prefix,
                             "expires_at": created[0][1].expires_at.isoformat(),
                             "first_device": created[0][0], "last_device": created[-1][0]}))
        except FleetwardError as exc:
            self._audit_failure("factory.tokens_refused", actor, f"type:{device_type}", exc)
            raise
        log.info("factory batch created", type=device_type, count=count)
        return created

    def _register_new(self, conn: Connection, device_type: str, owner: str, prefix: str,
                      actor: str) -> str:
        for _ in range(MAX_ID_DRAWS):
            device_id = prefix + secrets.token_hex(ID_RANDOM_HEX // 2)
            try:
                self.registry.register_in(conn, device_id, device_type, owner, None, actor,
                                          how="factory")
            except Conflict:
                continue  # the id is taken (insert ran in a savepoint): draw another
            return device_id
        raise Conflict(f"could not draw a free device id with prefix {prefix!r}",
                       hint="use a more specific --id-prefix")

    def sign(self, device_type: str, device_id: str, csr_data: bytes, owner: str,
             actor: str) -> tuple[CertificateRecord, bool]:
        """Sign a factory CSR for ``device_id``; register the device if it is new.

        Idempotent per CSR: if an unrevoked, unexpired certificate was already issued from
        exactly these CSR bytes (SHA-256 of the DER) for this device, it is returned and
        nothing is issued. A re-run of a production batch therefore never doubles
        certificates. (Concurrent identical requests are serialised by the admin API's
        single writer; across nodes two could both issue, which is harmless but not
        deduplicated.)

        Args:
            device_type: the device's type; an existing device must already have it.
            device_id: the device the CSR belongs to; the CSR may name only this device.
            csr_data: PKCS#10 request, PEM or DER.
            owner: owner when the device is registered here.
            actor: who asked, for the audit log.

        Raises:
            InvalidInput, PolicyViolation: bad id or CSR, or the pipeline refuses it
                (e.g. the CSR names another device).
            NotFound: no such device type.
            Conflict: the device exists with another type, or this CSR was already
                signed for another device.

        Returns:
            (certificate, reused): reused is True if nothing new was issued.
        """
        try:
            validate_device_id(device_id)
            csr = parse_csr(csr_data)
            digest = hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).hexdigest()
            with self.db.transaction() as conn:
                device = device_rows.get_device(conn, device_id, for_update=True)
                if device is not None and device.type != device_type:
                    raise Conflict(f"device {device_id!r} exists with type {device.type}, "
                                   f"not {device_type}",
                                   hint=f"sign it with --type {device.type}, or use another "
                                        "device id")
                previous = cert_rows.find_by_csr(conn, digest)
                if previous is not None and previous.device_id != device_id:
                    raise Conflict(f"this CSR was already signed for device "
                                   f"{previous.device_id!r}",
                                   hint="each device needs its own key and CSR; check the "
                                        "file names or the manifest")
                if previous is not None and previous.not_after > self.clock.now():
                    return previous, True
                if device is None:
                    self.registry.register_in(conn, device_id, device_type, owner, None, actor,
                                              how="factory")
                record = self.registry.issue_in(conn, device_id, csr, FACTORY_PROFILE, actor)
                return record, False
        except FleetwardError as exc:
            self._audit_failure("factory.sign_refused", actor, f"device:{device_id}", exc)
            raise

    def _audit_failure(self, action: str, actor: str, target: str, exc: FleetwardError) -> None:
        """Record a refusal in its own transaction (the request's one rolled back)."""
        try:
            with self.db.transaction() as conn:
                self.audit.append(conn, AuditEvent(
                    action=action, actor=actor, target=target, outcome="failure",
                    details={"error": exc.problem_type, "detail": exc.message}))
        except FleetwardError:
            log.exception("could not audit a refused factory request", action=action)


def _check_prefix(prefix: str) -> None:
    # The id is prefix + 12 hex; checking a sample id gives the id rules' own message.
    if len(prefix) > 128 - ID_RANDOM_HEX:
        raise InvalidInput(f"the id prefix is longer than {128 - ID_RANDOM_HEX} characters",
                           hint="device ids are at most 128 characters")
    try:
        validate_device_id(prefix + "0" * ID_RANDOM_HEX)
    except InvalidInput as exc:
        raise InvalidInput(f"invalid id prefix {prefix!r}", hint=exc.hint) from None


__all__ = ["MAX_FACTORY_BATCH", "FactoryService"]
