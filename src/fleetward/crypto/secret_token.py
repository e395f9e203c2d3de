"""Bearer secrets of the form ``<prefix><id>.<secret>``, shared by every token kind.

The 64-bit id finds the stored row; the 256-bit secret is stored only as SHA-256 and
compared in constant time. A fast hash is right here: the secret is 256 random bits, not
a password (OWASP Password Storage Cheat Sheet, "high-entropy secrets").
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

ID_BYTES = 8  # 16 hex characters
SECRET_BYTES = 32  # 256 bits → 43 base64url characters
_UNKNOWN = hashlib.sha256(b"\x00no such token").hexdigest()


@functools.cache
def _pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + r"[0-9a-f]{16}\.[A-Za-z0-9_-]{43}")


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class NewToken:
    token: str  # shown once, never stored
    token_id: str
    secret_sha256: str


@dataclass(frozen=True, slots=True)
class SecretTokenFormat:
    prefix: str  # e.g. "fwa_" (admin), "fwb_" (bootstrap)

    @property
    def pattern(self) -> re.Pattern[str]:
        return _pattern(self.prefix)

    def new(self) -> NewToken:
        token_id = secrets.token_hex(ID_BYTES)
        secret = secrets.token_urlsafe(SECRET_BYTES)
        return NewToken(f"{self.prefix}{token_id}.{secret}", token_id, secret_sha256(secret))

    def split(self, presented: str) -> tuple[str, str] | None:
        """(id, secret) if ``presented`` has exactly our shape, else None.

        Checking the shape first keeps anything we could not have issued (non-ASCII
        bytes, other kinds of token) away from the database and the hash.
        """
        if not self.pattern.fullmatch(presented):
            return None
        token_id, _, secret = presented.removeprefix(self.prefix).partition(".")
        return token_id, secret


def secret_matches(secret: str, stored_sha256: str | None) -> bool:
    """Constant-time check; hashes and compares even when no row was found, so the
    timing does not tell an attacker which token ids exist."""
    matches = hmac.compare_digest(secret_sha256(secret), stored_sha256 or _UNKNOWN)
    return matches and stored_sha256 is not None
