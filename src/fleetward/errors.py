"""One root error, split by who is at fault.

Every error carries a message (what went wrong) and a hint (what the reader can do
about it), kept apart as sigstore-python's ``diagnostics()`` does. The HTTP layers map
``status`` and ``problem_type`` onto RFC 9457 problem details; the CLI prints the hint.
"""

from __future__ import annotations

from typing import Any


class FleetwardError(Exception):
    """Root of every error Fleetward raises on purpose."""

    status: int = 500
    problem_type: str = "internal-error"
    default_hint: str = "This is a bug in Fleetward; the server log has the details."

    def __init__(self, message: str, *, hint: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint
        self.extra = extra

    def to_problem(self) -> dict[str, Any]:
        """RFC 9457 §3 problem details members for this error."""
        problem: dict[str, Any] = {
            "type": f"https://fleetward.dev/problems/{self.problem_type}",
            "title": self.problem_type.replace("-", " ").capitalize(),
            "status": self.status,
            "detail": self.message,
            "hint": self.hint,
        }
        problem.update(self.extra)
        return problem


# --- the caller's fault -----------------------------------------------------------


class ClientError(FleetwardError):
    """The request itself is wrong; retrying it unchanged will fail again."""

    status = 400
    problem_type = "invalid-request"
    default_hint = "Correct the request and send it again."


class InvalidInput(ClientError):
    """Malformed or out-of-range input (bad CSR, unknown field, wrong type)."""


class PolicyViolation(ClientError):
    """Well-formed input that a policy refuses (forbidden key type, CA rights, other name)."""

    status = 422
    problem_type = "policy-violation"
    default_hint = "The request is well-formed but not allowed; see the detail for the rule."


class NotFound(ClientError):
    status = 404
    problem_type = "not-found"
    default_hint = "Check the identifier; list the collection to see what exists."


class Conflict(ClientError):
    status = 409
    problem_type = "conflict"
    default_hint = "The object already exists or is in a state that forbids this change."


class IllegalTransition(Conflict):
    """A lifecycle change that the transitions table does not allow."""

    problem_type = "illegal-transition"


class Unauthenticated(ClientError):
    status = 401
    problem_type = "unauthenticated"
    default_hint = "Send 'Authorization: Bearer <admin token>'; `fleetward init` wrote one."


class Forbidden(ClientError):
    status = 403
    problem_type = "forbidden"
    default_hint = "Your role does not allow this; ask an admin for a token with more rights."


class TooManyRequests(ClientError):
    """A per-caller limit is reached (RFC 6585 §4); the same request may succeed later."""

    status = 429
    problem_type = "too-many-requests"
    default_hint = "Wait until earlier requests are done, then send it again."


class PayloadTooLarge(ClientError):
    """A body or message above a size limit (RFC 9110 §15.5.14)."""

    status = 413
    problem_type = "payload-too-large"
    default_hint = "Send less data per request; the detail names the limit."


# --- the operator's fault ---------------------------------------------------------


class ConfigurationError(FleetwardError):
    """The installation is misconfigured (missing key, bad passphrase, wrong data dir)."""

    status = 500
    problem_type = "configuration-error"
    default_hint = "Check the data directory, passphrase and FLEETWARD_* settings."


class KeyUnavailable(ConfigurationError):
    """A signing key cannot be used here (offline root, locked token, bad passphrase)."""

    problem_type = "key-unavailable"


# --- ours or the environment's -------------------------------------------------------


class StorageError(FleetwardError):
    """The database failed in a way the caller cannot fix."""

    status = 503
    problem_type = "storage-unavailable"
    default_hint = "The database is unreachable or failed; retry later and check its logs."


# --- secure channel (issue 4) ---------------------------------------------------------


class SinkUnavailable(StorageError):
    """A message sink (SQL table, NATS JetStream) cannot accept a message now."""

    problem_type = "sink-unavailable"
    default_hint = ("The message store is unavailable or overloaded; retry with backoff "
                    "(an MQTT QoS 1 publish is retried by the client).")
