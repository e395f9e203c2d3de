"""API keys for back-end services, gateway integrations and resource servers:
``fwk_<16 hex id>.<43 base64url secret>``, sent as ``Authorization: Bearer fwk_…``
(docs/credentials.md, API keys).

Only the secret's SHA-256 is stored (crypto/secret_token.py: 256 random bits need no
slow hash). A key has scopes, an optional expiry, and can be rotated with a grace
period during which the previous secret still works, so a client can be redeployed
without an outage; a grace of zero ends the old secret at once (a leaked key).
"""

from __future__ import annotations

import builtins
import datetime as dt
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import Connection

from fleetward.audit import AuditLog
from fleetward.clock import Clock
from fleetward.crypto.secret_token import (
    SECRET_BYTES,
    SecretTokenFormat,
    secret_matches,
    secret_sha256,
)
from fleetward.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from fleetward.model import AuditEvent
from fleetward.store import Database
from fleetward.store import api_keys as key_rows
from fleetward.store.api_keys import ApiKeyRow

log = structlog.get_logger("fleetward.tokens")

API_KEY = SecretTokenFormat("fwk_")
API_KEY_SCOPES = ("tokens:introspect",)  # RFC 7662 introspection (edge/oauth.py)
API_KEY_CREATED = "api_key.created"
API_KEY_ROTATED = "api_key.rotated"
API_KEY_REVOKED = "api_key.revoked"

MIN_TTL = dt.timedelta(minutes=1)
MAX_TTL = dt.timedelta(days=730)  # keys that never expire are allowed (ttl None), not typos
# Long enough to redeploy every client of a key, short enough that a rotation away from
# a leaked key cannot be stretched into a second life for it.
MAX_GRACE = dt.timedelta(days=30)
MAX_NAME_CHARS = 128  # api_keys.name is String(128)
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,128}")  # printable: it is shown in tables and logs
_KEY_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """What may be shown about an API key: never the secret or its hash."""

    key_id: str
    name: str
    scopes: tuple[str, ...]
    created_at: dt.datetime
    created_by: str
    expires_at: dt.datetime | None
    rotated_at: dt.datetime | None
    revoked_at: dt.datetime | None
    previous_valid_until: dt.datetime | None  # end of the last rotation's grace period

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.key_id,
            "name": self.name,
            "scopes": list(self.scopes),
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "expires_at": _iso(self.expires_at),
            "rotated_at": _iso(self.rotated_at),
            "revoked_at": _iso(self.revoked_at),
            "previous_valid_until": _iso(self.previous_valid_until),
        }


@dataclass(frozen=True, slots=True)
class NewApiKey:
    """A key as created or rotated: ``key`` is shown once, never stored."""

    key: str
    info: ApiKeyInfo

    @property
    def key_id(self) -> str:
        return self.info.key_id

    def to_json(self) -> dict[str, Any]:
        """The one answer that carries the key (to the operator who made it)."""
        return {**self.info.to_json(), "key": self.key}

    def __repr__(self) -> str:  # never the key
        return f"NewApiKey({self.info.key_id!r}, {self.info.name!r})"


class ApiKeyRefused(Unauthenticated):
    """Unknown, wrong, expired or revoked key. ``key_id`` is set when the presented
    value had our shape (for the caller's audit row); the message never holds the key."""

    def __init__(self, reason: str, key_id: str | None = None) -> None:
        super().__init__(f"API key refused: {reason}",
                         hint="send Authorization: Bearer fwk_<id>.<secret> with a current "
                              "key; ask an operator for a new one")
        self.reason = reason
        self.key_id = key_id


class ApiKeyScopeRefused(Forbidden):
    """A valid key that lacks the scope the route needs."""

    def __init__(self, key_id: str, required_scope: str) -> None:
        super().__init__(f"API key {key_id} lacks the scope {required_scope}",
                         hint=f"create a key with --scope {required_scope}")
        self.reason = f"missing scope {required_scope}"
        self.key_id = key_id


class ApiKeyService:
    """Creates, rotates, revokes and checks API keys."""

    def __init__(self, db: Database, audit: AuditLog, clock: Clock) -> None:
        self._db = db
        self._audit = audit
        self._clock = clock

    def create(self, name: str, scopes: Iterable[str], actor: str,
               ttl: dt.timedelta | None = None) -> NewApiKey:
        """A new key.

        Args:
            name: what it is for (1-128 printable characters).
            scopes: some of ``API_KEY_SCOPES``.
            actor: who asks.
            ttl: how long it lives; None: until revoked.

        Returns:
            The key (shown once) and its description.

        Raises:
            InvalidInput: bad name, no or unknown scope, ttl out of range.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidInput(f"an API key name is 1-{MAX_NAME_CHARS} printable characters",
                               hint='e.g. --name "billing gateway"')
        granted = _check_scopes(scopes)
        if ttl is not None and not MIN_TTL <= ttl <= MAX_TTL:
            raise InvalidInput(f"an API key lives between 1 minute and {MAX_TTL.days} days "
                               "(or until revoked)", hint="e.g. --ttl-hours 2160 (90 days)")
        now = self._clock.now()
        new = API_KEY.new()
        row = ApiKeyRow(
            key_id=new.token_id, name=name, secret_sha256=new.secret_sha256,
            previous_secret_sha256=None, previous_valid_until=None, scopes=granted,
            created_at=now, created_by=actor, expires_at=now + ttl if ttl else None,
            rotated_at=None, revoked_at=None)
        with self._db.transaction() as conn:
            key_rows.insert_key(conn, row)
            self._audit.append(conn, AuditEvent(
                action=API_KEY_CREATED, actor=actor, target=f"api_key:{row.key_id}",
                details={"name": name, "scopes": list(granted),
                         "expires_at": _iso(row.expires_at)}))
        log.info("api key created", key_id=row.key_id, scopes=list(granted))
        return NewApiKey(new.token, _info(row))

    def rotate(self, key_id: str, actor: str,
               grace: dt.timedelta = dt.timedelta(0)) -> NewApiKey:
        """Give a key a new secret. The previous secret keeps working until
        ``now + grace`` (zero: it stops at once); one from an earlier rotation stops now.

        Args:
            key_id: the key's id (16 hex digits).
            actor: who asks.
            grace: how long the previous secret stays valid, 0 to ``MAX_GRACE``.

        Returns:
            The new key (shown once) and its description.

        Raises:
            InvalidInput: malformed id or grace out of range.
            NotFound: no such key.
            Conflict: revoked, expired, or rotated concurrently.
        """
        if not dt.timedelta(0) <= grace <= MAX_GRACE:
            raise InvalidInput(f"the grace period is 0 to {MAX_GRACE.days} days",
                               hint="e.g. --grace-seconds 86400, or 0 if the key leaked")
        now = self._clock.now()
        secret = secrets.token_urlsafe(SECRET_BYTES)
        token = f"{API_KEY.prefix}{key_id}.{secret}"
        with self._db.transaction() as conn:
            row = _require(conn, key_id)
            if API_KEY.split(token) is None:  # the id was checked: cannot happen, fail closed
                raise RuntimeError("a rotated API key does not have the fwk_ shape")
            if row.revoked_at is not None:
                raise Conflict(f"API key {key_id} is revoked", hint="create a new one")
            if row.expires_at is not None and row.expires_at <= now:
                raise Conflict(f"API key {key_id} has expired", hint="create a new one")
            previous_until = now + grace if grace else None
            if not key_rows.rotate_secret(
                    conn, key_id, expected_sha256=row.secret_sha256,
                    new_sha256=secret_sha256(secret),
                    previous_sha256=row.secret_sha256 if grace else None,
                    previous_valid_until=previous_until, at=now):
                raise Conflict(f"API key {key_id} changed while it was rotated",
                               hint="look at it (fleetward credential list --api-keys) and "
                                    "try again")
            self._audit.append(conn, AuditEvent(
                action=API_KEY_ROTATED, actor=actor, target=f"api_key:{key_id}",
                details={"grace_seconds": int(grace.total_seconds()),
                         "previous_valid_until": _iso(previous_until)}))
            rotated = _require(conn, key_id)
        log.info("api key rotated", key_id=key_id, grace_seconds=int(grace.total_seconds()))
        return NewApiKey(token, _info(rotated))

    def revoke(self, key_id: str, actor: str) -> ApiKeyInfo:
        """Revoke a key (and any previous secret still in its grace period) at once.

        Raises:
            InvalidInput: malformed id.
            NotFound: no such key.
            Conflict: already revoked.
        """
        with self._db.transaction() as conn:
            _require(conn, key_id)
            if not key_rows.revoke_key(conn, key_id, self._clock.now()):
                raise Conflict(f"API key {key_id} is already revoked", hint="nothing to do")
            self._audit.append(conn, AuditEvent(
                action=API_KEY_REVOKED, actor=actor, target=f"api_key:{key_id}"))
            revoked = _require(conn, key_id)
        log.info("api key revoked", key_id=key_id)
        return _info(revoked)

    def get(self, key_id: str) -> ApiKeyInfo:
        """One key, revoked or expired ones too.

        Raises:
            InvalidInput: malformed id.
            NotFound: no such key.
        """
        with self._db.read() as conn:
            return _info(_require(conn, key_id))

    def list(self) -> builtins.list[ApiKeyInfo]:
        """Every key, revoked and expired ones too, oldest first."""
        with self._db.read() as conn:
            return [_info(r) for r in key_rows.list_keys(conn)]

    def authenticate(self, presented: str, required_scope: str) -> ApiKeyInfo:
        """Check a presented key for a route that needs ``required_scope``.

        Anything without our exact shape is refused before any hash or lookup. The
        secret is hashed and compared in constant time against the current and the
        previous secret even when the id is unknown (``secret_matches``), so timing
        does not tell which ids exist. Not audited here: the caller throttles and
        audits refusals (``key_id`` on the exception says which key, if any).

        Args:
            presented: the bearer value, ``fwk_<id>.<secret>``.
            required_scope: one of ``API_KEY_SCOPES``.

        Returns:
            The key.

        Raises:
            ApiKeyRefused: (Unauthenticated) malformed, unknown, wrong, expired or
                revoked.
            ApiKeyScopeRefused: (Forbidden) valid, but without ``required_scope``.
            ValueError: ``required_scope`` is not an API key scope (a bug in the caller).
        """
        if required_scope not in API_KEY_SCOPES:
            raise ValueError(f"{required_scope!r} is not an API key scope")
        parts = API_KEY.split(presented) if isinstance(presented, str) else None
        if parts is None:
            raise ApiKeyRefused("malformed API key")
        key_id, secret = parts
        with self._db.read() as conn:
            row = key_rows.get_key(conn, key_id)
        now = self._clock.now()
        # Both comparisons always run (for unknown ids too): equal work on every path.
        current = secret_matches(secret, row.secret_sha256 if row else None)
        previous = secret_matches(secret, row.previous_secret_sha256 if row else None)
        if row is None:
            raise ApiKeyRefused("unknown or wrong API key", key_id)
        in_grace = row.previous_valid_until is not None and now < row.previous_valid_until
        if not (current or (previous and in_grace)):
            reason = ("previous secret after its grace period" if previous
                      else "unknown or wrong API key")
            raise ApiKeyRefused(reason, key_id)
        if row.revoked_at is not None:
            raise ApiKeyRefused("API key revoked", key_id)
        if row.expires_at is not None and row.expires_at <= now:
            raise ApiKeyRefused("API key expired", key_id)
        if required_scope not in row.scopes:
            raise ApiKeyScopeRefused(key_id, required_scope)
        return _info(row)


def _check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    if isinstance(scopes, str):  # "a b" would otherwise be read letter by letter
        scopes = scopes.split()
    requested = tuple(dict.fromkeys(scopes))
    unknown = [s for s in requested if s not in API_KEY_SCOPES]
    if not requested or unknown:
        raise InvalidInput(
            f"unknown API key scope(s): {', '.join(map(repr, unknown))}" if unknown
            else "an API key needs at least one scope",
            hint=f"scopes: {', '.join(API_KEY_SCOPES)}", scopes=list(API_KEY_SCOPES))
    return tuple(sorted(requested))


def _require(conn: Connection, key_id: str) -> ApiKeyRow:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise InvalidInput(f"invalid API key id {key_id!r}",
                           hint="16 hex digits, the part after fwk_: "
                                "fleetward credential list --api-keys")
    row = key_rows.get_key(conn, key_id)
    if row is None:
        raise NotFound(f"API key {key_id} does not exist")
    return row


def _info(row: ApiKeyRow) -> ApiKeyInfo:
    return ApiKeyInfo(
        key_id=row.key_id, name=row.name, scopes=row.scopes, created_at=row.created_at,
        created_by=row.created_by, expires_at=row.expires_at, rotated_at=row.rotated_at,
        revoked_at=row.revoked_at, previous_valid_until=row.previous_valid_until)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None
