"""One-time bootstrap tokens for first enrollment (RFC 7030 §3.2.3, §4.2.1).

A token is ``fwb_<id>.<secret>`` (crypto.secret_token: SHA-256 at rest, constant-time
compare). It is bound to one device
(single use) or to a claim batch of one device type (at most ``max_uses`` devices), and
it expires. A use is counted by one conditional UPDATE inside the enrollment transaction,
so fifty devices racing with one single-use token get exactly one success.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Connection

from fleetward.audit import AuditLog
from fleetward.clock import Clock
from fleetward.crypto.secret_token import SecretTokenFormat, secret_matches
from fleetward.errors import InvalidInput, NotFound, Unauthenticated
from fleetward.model import AuditEvent, validate_device_id
from fleetward.store import Database
from fleetward.store import bootstrap as token_rows
from fleetward.store import devices as device_rows
from fleetward.store.bootstrap import BootstrapRow

BOOTSTRAP_TOKEN = SecretTokenFormat("fwb_")
MAX_TTL = dt.timedelta(days=90)  # a factory batch may wait on a shelf, not for years
MAX_BATCH = 1_000_000  # devices per claim batch


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str  # shown once; never stored
    token_id: str
    expires_at: dt.datetime
    max_uses: int


@dataclass(frozen=True, slots=True)
class Redemption:
    token_id: str
    device_id: str  # the bound device, or the new device a batch token registers
    device_type: str
    bound_device: str | None  # None for a batch token: the device is registered on first use
    owner: str | None  # batch tokens: owner of the devices they register


class BootstrapRefused(Unauthenticated):
    """The token cannot enroll this device; ``reason`` goes to the audit log."""

    def __init__(self, reason: str, token_id: str | None = None) -> None:
        super().__init__(f"bootstrap token refused: {reason}",
                         hint="ask the operator for a new bootstrap token for this device")
        self.reason = reason
        self.token_id = token_id


class BootstrapTokens:
    def __init__(self, db: Database, audit: AuditLog, clock: Clock) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock

    def issue_for_device(self, device_id: str, ttl: dt.timedelta, actor: str) -> IssuedToken:
        """A single-use token that can enroll only ``device_id`` (which must be registered).

        Raises:
            NotFound: no such device.
            InvalidInput: ttl out of range.
        """
        validate_device_id(device_id)
        with self.db.transaction() as conn:
            device = device_rows.get_device(conn, device_id)
            if device is None:
                raise NotFound(f"device {device_id!r} does not exist",
                               hint="register it first: fleetward device add ID --type T")
            return self._issue(conn, device.type, device_id, 1, ttl, actor)

    def issue_batch(self, device_type: str, max_uses: int, ttl: dt.timedelta,
                    actor: str, owner: str | None = None) -> IssuedToken:
        """A claim-batch token: up to ``max_uses`` new devices of ``device_type``.

        Raises:
            NotFound: no such device type.
            InvalidInput: count or ttl out of range.
        """
        if not 1 <= max_uses <= MAX_BATCH:
            raise InvalidInput(f"a batch holds 1-{MAX_BATCH} devices", hint="e.g. --count 500")
        with self.db.transaction() as conn:
            if device_rows.get_type(conn, device_type) is None:
                raise NotFound(f"device type {device_type!r} does not exist",
                               hint=f"create it first: fleetward type add {device_type}")
            return self._issue(conn, device_type, None, max_uses, ttl, actor, owner)

    def issue_in(self, conn: Connection, device_id: str, device_type: str, ttl: dt.timedelta,
                 actor: str) -> IssuedToken:
        """A single-use token for ``device_id`` inside the caller's transaction (factory
        batches create the device and its token together)."""
        return self._issue(conn, device_type, device_id, 1, ttl, actor)

    def _issue(self, conn: Connection, device_type: str, device_id: str | None,
               max_uses: int, ttl: dt.timedelta, actor: str,
               owner: str | None = None) -> IssuedToken:
        if not dt.timedelta(minutes=1) <= ttl <= MAX_TTL:
            raise InvalidInput(f"a bootstrap token lives between 1 minute and {MAX_TTL.days} "
                               "days", hint="e.g. --ttl-hours 72")
        now = self.clock.now()
        new = BOOTSTRAP_TOKEN.new()
        token_id = new.token_id
        row = BootstrapRow(token_id=token_id, secret_sha256=new.secret_sha256, device_id=device_id,
                           device_type=device_type, max_uses=max_uses, uses=0,
                           expires_at=now + ttl, created_at=now, revoked_at=None, owner=owner)
        token_rows.insert_token(conn, row)
        self.audit.append(conn, AuditEvent(
            action="bootstrap.token_created", actor=actor,
            target=f"device:{device_id}" if device_id else f"type:{device_type}",
            details={"token_id": token_id, "max_uses": max_uses,
                     "expires_at": row.expires_at.isoformat()}))
        return IssuedToken(new.token, token_id, row.expires_at,
                           max_uses)

    def redeem(self, conn: Connection, presented: str, device_id: str | None) -> Redemption:
        """Count one use of ``presented`` for ``device_id`` inside ``conn``'s transaction.

        The use is undone if the caller's transaction rolls back (e.g. issuance fails),
        so a refused CSR does not burn the token. ``device_id`` None means "the device the
        token is bound to" (an EST client that sent only a Bearer token).

        Raises:
            BootstrapRefused: unknown, wrong, expired, revoked, used-up, or bound to
                another device. The caller audits it (its transaction will roll back).
        """
        parts = BOOTSTRAP_TOKEN.split(presented)
        if parts is None:
            raise BootstrapRefused("malformed token")
        token_id, secret = parts
        row = token_rows.get_token(conn, token_id)
        # Hash even for an unknown id (secret_matches does) so timing does not reveal ids.
        if not secret_matches(secret, row.secret_sha256 if row else None) or row is None:
            raise BootstrapRefused("unknown or wrong token")
        now = self.clock.now()
        if row.revoked_at is not None:
            raise BootstrapRefused("token revoked", token_id)
        if row.expires_at <= now:
            raise BootstrapRefused("token expired", token_id)
        if row.device_id is not None and device_id is not None and row.device_id != device_id:
            raise BootstrapRefused("token is bound to another device", token_id)
        resolved = row.device_id or device_id
        if resolved is None:
            raise BootstrapRefused("a claim-batch token needs the new device's id (HTTP Basic "
                                   "user name or the CSR common name)", token_id)
        if not token_rows.consume(conn, token_id, now):
            reason = "token already used" if row.max_uses == 1 else "batch is used up"
            raise BootstrapRefused(reason, token_id)
        self.audit.append(conn, AuditEvent(
            action="bootstrap.token_used", actor=f"device:{resolved}",
            target=f"device:{resolved}", details={"token_id": token_id}))
        return Redemption(token_id, resolved, row.device_type, row.device_id, row.owner)

    def audit_refusal(self, refused: BootstrapRefused, device_id: str, source: str) -> None:
        """Record a refusal in its own transaction (the enrollment one rolls back)."""
        with self.db.transaction() as conn:
            self.audit.append(conn, AuditEvent(
                action="bootstrap.token_refused", actor=f"remote:{source}",
                target=f"device:{device_id}", outcome="failure",
                details={"reason": refused.reason, "token_id": refused.token_id}))

    def revoke(self, token_id: str, actor: str) -> None:
        with self.db.transaction() as conn:
            if not token_rows.revoke_token(conn, token_id, self.clock.now()):
                raise NotFound(f"no active bootstrap token {token_id!r}")
            self.audit.append(conn, AuditEvent(
                action="bootstrap.token_revoked", actor=actor, target=f"token:{token_id}"))
