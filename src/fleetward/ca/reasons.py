"""RFC 5280 §5.3.1 revocation reasons, by the names operators type."""

from __future__ import annotations

from cryptography import x509

from fleetward.errors import InvalidInput

REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key_compromise": x509.ReasonFlags.key_compromise,
    "ca_compromise": x509.ReasonFlags.ca_compromise,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
    "privilege_withdrawn": x509.ReasonFlags.privilege_withdrawn,
}
# certificateHold/removeFromCRL are left out on purpose: Fleetward revocation is final,
# and "unhold" is what disabled → active is for.


def parse_reason(text: str) -> str:
    """Accept ``keyCompromise``, ``key-compromise`` or ``key_compromise``."""
    normalized = "".join("_" + c.lower() if c.isupper() else c for c in text.strip())
    normalized = normalized.replace("-", "_").lstrip("_")
    if normalized not in REASONS:
        raise InvalidInput(
            f"unknown revocation reason {text!r}", hint=f"use one of: {', '.join(REASONS)}"
        )
    return normalized
