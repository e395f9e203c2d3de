"""Operator API tokens (``fwa_<id>.<secret>``, see crypto.secret_token) and role checks."""

from __future__ import annotations

from fleetward.audit import AuditLog
from fleetward.clock import Clock
from fleetward.crypto.secret_token import SecretTokenFormat, secret_matches
from fleetward.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from fleetward.model import AuditEvent, Operator, Role, role_allows
from fleetward.store import Database
from fleetward.store import operators as token_rows
from fleetward.store.operators import TokenRow

ADMIN_TOKEN = SecretTokenFormat("fwa_")


class OperatorTokens:
    def __init__(self, db: Database, audit: AuditLog, clock: Clock) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock

    def create(self, name: str, role: Role, actor: str) -> str:
        """Create a token and return it; it cannot be retrieved again."""
        if not name or len(name) > 128:
            raise InvalidInput("operator name must be 1-128 characters")
        new = ADMIN_TOKEN.new()
        token_id = new.token_id
        with self.db.transaction() as conn:
            token_rows.insert_token(conn, TokenRow(token_id, name, role, new.secret_sha256,
                                                   self.clock.now(), None))
            self.audit.append(conn, AuditEvent(
                action="operator.token_created", actor=actor, target=f"operator:{name}",
                details={"token_id": token_id, "role": role.value}))
        return new.token

    def revoke(self, token_id: str, actor: str) -> None:
        """Revoke an operator token; the last active admin token cannot be revoked.

        Raises:
            NotFound: no active token with that id.
            Conflict: it is the last active admin token (nobody could create another).
        """
        with self.db.transaction() as conn:
            tokens = token_rows.list_tokens(conn)
            target = next((t for t in tokens if t.token_id == token_id), None)
            active_admins = [t for t in tokens if t.role is Role.ADMIN and t.revoked_at is None]
            if target is not None and active_admins == [target]:
                raise Conflict("this is the last active admin token",
                               hint="create another admin token first, then revoke this one")
            if not token_rows.revoke_token(conn, token_id, self.clock.now()):
                raise NotFound(f"no active operator token {token_id!r}")
            self.audit.append(conn, AuditEvent(
                action="operator.token_revoked", actor=actor, target=f"token:{token_id}"))

    def list(self) -> list[TokenRow]:
        with self.db.read() as conn:
            return token_rows.list_tokens(conn)

    def authenticate(self, authorization: str | None, source: str) -> Operator:
        """Check an ``Authorization`` header value; audit every failure.

        Raises:
            Unauthenticated: missing, malformed, unknown, revoked or wrong token.
        """
        reason = self._check(authorization)
        if isinstance(reason, Operator):
            return reason
        with self.db.transaction() as conn:
            self.audit.append(conn, AuditEvent(
                action="admin.authentication_failed", actor=f"remote:{source}",
                target="admin-api", outcome="failure", details={"reason": reason}))
        raise Unauthenticated(f"authentication failed: {reason}")

    def _check(self, authorization: str | None) -> Operator | str:
        if not authorization:
            return "no Authorization header"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "not a Bearer token"
        token = token.strip()
        # Shape first: nothing that is not exactly a token we could have issued reaches the
        # database or the hash (non-ASCII bytes would fail there with a 500 instead).
        parts = ADMIN_TOKEN.split(token)
        if parts is None:
            return "malformed token"
        token_id, secret = parts
        with self.db.read() as conn:
            row = token_rows.get_token(conn, token_id)
        # Hash even for an unknown id (secret_matches does) so timing does not reveal ids.
        if not secret_matches(secret, row.secret_sha256 if row else None) or row is None:
            return "unknown or wrong token"
        if row.revoked_at is not None:
            return "token revoked"
        return Operator(token_id=row.token_id, name=row.name, role=row.role)


def require_role(operator: Operator, needed: Role) -> None:
    if not role_allows(operator.role, needed):
        raise Forbidden(
            f"role {operator.role.value} may not do this; it needs {needed.value}",
            hint="ask an admin for a token with the needed role",
        )
