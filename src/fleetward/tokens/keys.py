"""The keys that sign access tokens: one active key, rotated on a schedule and on
demand; retired keys stay in the JWKS (and verify) until every token they signed has
expired, then they are refused.

A key lives where the CA keys live (``Signer``: an encrypted PKCS#8 file, or a
non-extractable key on the PKCS#11 token); the database keeps only where it is and its
public JWK. Its ``kid`` is its RFC 7638 thumbprint, so a kid can never name two keys.
"""

from __future__ import annotations

import datetime as dt
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.audit import AuditLog
from fleetward.clock import Clock
from fleetward.config import TokensConfig
from fleetward.crypto.jose import ALGORITHM, jwk_thumbprint, public_jwk, public_key_from_jwk
from fleetward.crypto.signer import Signer
from fleetward.errors import ConfigurationError, KeyUnavailable
from fleetward.model import AuditEvent
from fleetward.store import Database
from fleetward.store import token_keys as key_rows

log = structlog.get_logger("fleetward.tokens")

KEY_ROTATED = "token_key.rotated"  # audit action; the change feed makes nodes reload


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    public_key: ec.EllipticCurvePublicKey
    jwk: Mapping[str, str]
    created_at: dt.datetime
    signer: Signer | None  # None: retired (verifies only) or not openable on this node
    retired_at: dt.datetime | None
    expires_at_epoch: float  # inf while active; verification refused from then on

    def published(self) -> dict[str, str]:
        """This key as a JWKS member (RFC 7517 §4)."""
        return {**self.jwk, "kid": self.kid, "use": "sig", "alg": ALGORITHM}


class SigningKeys:
    """Token signing keys of this node, read from the database.

    Args:
        open_signer: opens the private key a stored ``key_ref`` names.
        new_signer: creates a new private key where new keys go (the CA's backend),
            given a label for its file or token object.
    """

    def __init__(self, db: Database, audit: AuditLog, clock: Clock, config: TokensConfig,
                 *, open_signer: Callable[[Mapping[str, Any]], Signer],
                 new_signer: Callable[[str], Signer]) -> None:
        self._db = db
        self._audit = audit
        self._clock = clock
        self._config = config
        self._open_signer = open_signer
        self._new_signer = new_signer
        self._keys: dict[str, SigningKey] = {}
        self._active: SigningKey | None = None
        self._newest: SigningKey | None = None

    # --- reading (any thread; the dicts are replaced, never mutated) -------------------

    def load(self) -> None:
        """Read every live key and open the active one; create the first key if none
        is active.

        Raises:
            KeyUnavailable: the active key cannot be opened (passphrase, token).
        """
        self._read()
        if self._newest is None:  # none at all (not: one this node cannot open)
            self.rotate("system", "first token signing key")

    def reload(self) -> None:
        """Re-read after another node rotated (the change feed's ``token_key.rotated``)."""
        self._read()

    def _read(self) -> None:
        with self._db.read() as conn:
            rows = key_rows.live_keys(conn, self._clock.now())
        keys: dict[str, SigningKey] = {}
        active: SigningKey | None = None
        newest: SigningKey | None = None  # the newest key not retired, openable or not
        for row in rows:
            public = public_key_from_jwk(row.public_jwk)
            signer = None
            if row.retired_at is None:
                previous = self._keys.get(row.kid)
                signer = (previous.signer if previous is not None and previous.signer
                          else self._try_open(row.kid, row.key_ref))
            expires = (row.expires_at.timestamp() if row.expires_at is not None
                       else math.inf)
            key = SigningKey(row.kid, public, row.public_jwk, row.created_at, signer,
                             row.retired_at, expires)
            keys[row.kid] = key
            if row.retired_at is None and (newest is None
                                           or key.created_at >= newest.created_at):
                newest = key
            if signer is not None and (active is None or key.created_at >= active.created_at):
                active = key
        self._keys = keys
        self._active = active
        self._newest = newest

    def _try_open(self, kid: str, key_ref: Mapping[str, Any]) -> Signer | None:
        """The signer of a key, or None when this node cannot open it (another node's
        key file, a token error): it still verifies, this node just cannot sign with it."""
        try:
            return self._open_signer(key_ref)
        except (KeyUnavailable, ConfigurationError) as exc:
            log.error("token signing key not available on this node; it verifies but "
                      "cannot sign here", kid=kid, reason=exc.message, hint=exc.hint)
            return None

    def signing_key(self) -> SigningKey:
        """The key new tokens are signed with.

        Raises:
            KeyUnavailable: no active key could be opened.
        """
        active = self._active
        if active is None or active.signer is None:
            raise KeyUnavailable("no token signing key is available",
                                 hint="check the CA passphrase or PKCS#11 PIN, then restart; "
                                      "or rotate: fleetward access-token rotate-key")
        return active

    def verification_key(self, kid: str, now_epoch: float) -> SigningKey | None:
        """The key ``kid`` names while it may still verify, else None (unknown kid, or
        rotated out longer ago than any token it signed can live)."""
        key = self._keys.get(kid)
        if key is None or now_epoch >= key.expires_at_epoch:
            return None
        return key

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JWK Set (RFC 7517 §5) of every key that may still verify, newest first."""
        now = self._clock.now().timestamp()
        live = [k for k in self._keys.values() if now < k.expires_at_epoch]
        # The signing key first, then the retired ones, newest first.
        live.sort(key=lambda k: (k.retired_at is None, k.created_at), reverse=True)
        return {"keys": [k.published() for k in live]}

    def keys(self) -> list[SigningKey]:
        return sorted(self._keys.values(), key=lambda k: k.created_at, reverse=True)

    # --- rotation -----------------------------------------------------------------------

    def rotate(self, actor: str, reason: str) -> SigningKey:
        """Create a new signing key and retire the others: they keep verifying for the
        longest token lifetime plus the clock skew, then leave the JWKS.

        Raises:
            KeyUnavailable, ConfigurationError: the new key cannot be created.
        """
        signer = self._new_signer(secrets.token_hex(8))
        public = signer.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
                public.curve, ec.SECP256R1):
            raise ConfigurationError("token signing keys must be EC P-256 (ES256)",
                                     hint="the key backend created another key type")
        jwk = public_jwk(public)
        kid = jwk_thumbprint(jwk)
        now = self._clock.now()
        overlap = dt.timedelta(seconds=self._config.max_access_token_lifetime_seconds
                               + self._config.clock_skew_seconds)
        with self._db.transaction() as conn:
            key_rows.insert_key(conn, key_rows.TokenKeyRow(
                kid, ALGORITHM, dict(signer.key_ref), jwk, now, None, None))
            retired = key_rows.retire_others(conn, kid, now, now + overlap)
            self._audit.append(conn, AuditEvent(
                action=KEY_ROTATED, actor=actor, target=f"token_key:{kid}",
                details={"reason": reason, "retired": retired,
                         "retired_verify_until": (now + overlap).isoformat(),
                         "backend": signer.key_ref.get("backend", "")}))
        self._read()
        log.info("token signing key rotated", kid=kid, retired=retired, reason=reason)
        return self.signing_key()

    def rotate_if_due(self) -> SigningKey | None:
        """Rotate when the newest key is older than ``signing_key_rotation_days``.

        Re-reads first: another node may have rotated since this one last looked (every
        node runs this check; the feed reloads keys too, but a check must not act on a
        stale view and rotate a second time)."""
        self._read()
        newest = self._newest
        due = dt.timedelta(days=self._config.signing_key_rotation_days)
        if newest is not None and self._clock.now() - newest.created_at < due:
            return None
        return self.rotate("system", "scheduled rotation")
