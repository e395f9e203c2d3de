"""Errors the device agent raises, split by who is at fault (see ``fleetward.errors``).

The agent runs on the device, so "the server" is the other side: a refusal the server
explains (RFC 9457 problem details) keeps the server's own ``detail`` and ``hint``.
"""

from __future__ import annotations

from fleetward.errors import ConfigurationError, FleetwardError


class TrustBootstrapFailed(FleetwardError):
    """The server could not be authenticated: wrong pinned fingerprint or a TLS
    certificate that does not chain to the pinned CA (RFC 7030 §4.1.1)."""

    status = 495
    problem_type = "trust-bootstrap-failed"
    default_hint = (
        "compare --ca-fingerprint with the root CA on the server host: "
        "openssl x509 -noout -fingerprint -sha256 -in <data dir>/certs/root-ca.pem"
    )


class ServerRefused(FleetwardError):
    """The server answered, and said no (4xx/5xx); ``detail`` and ``hint`` are its own."""

    problem_type = "server-refused"
    default_hint = "see the server's explanation above; the operator can check the audit log"

    def __init__(self, status: int, detail: str, hint: str | None = None) -> None:
        super().__init__(f"the server refused the request (HTTP {status}): {detail}",
                         hint=hint)
        self.status = status
        self.detail = detail


class ServerUnreachable(FleetwardError):
    """No usable answer: connection refused, timeout, TLS failure, garbled response."""

    status = 502
    problem_type = "server-unreachable"
    default_hint = "check the server URL and the network; the agent retries by itself in `run`"


class EnrollmentPending(FleetwardError):
    """The server kept answering 202 (operator approval pending) past our patience."""

    status = 202
    problem_type = "enrollment-pending"
    default_hint = ("an operator has to approve this device; run the same command again "
                    "once they have")


class AgentStateError(ConfigurationError):
    """The state directory is missing, incomplete or unsafe."""

    problem_type = "agent-state"
    default_hint = "check --state-dir; enroll first with `fleetward-agent enroll`"


__all__ = ["AgentStateError", "EnrollmentPending", "ServerRefused", "ServerUnreachable",
           "TrustBootstrapFailed"]
