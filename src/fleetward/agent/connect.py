"""What the agent's two channels (MQTT, HTTPS) have in common.

A *session* is one authenticated connection to the server with the certificate that was
current when it opened. The supervisor (``run``) hands it batches of outbound messages
and gets back, per message, whether the server took it; commands come back through a
callback. When the session breaks, or the server refuses this identity, the supervisor
opens a new one (with backoff), with whatever certificate is current by then.

Wire names (the server's contract):

=========  =========================================  ===================================
kind       MQTT topic                                 HTTPS request
=========  =========================================  ===================================
telemetry  ``devices/<id>/telemetry/<message type>``  ``POST /v1/telemetry/<message type>``
event      ``devices/<id>/events/<event type>``       ``POST /v1/events/<event type>``
result     ``devices/<id>/command-results/<cmd id>``  ``POST /v1/commands/<cmd id>/result``
commands   subscribe ``devices/<id>/commands/#``      ``GET /v1/commands?wait=<seconds>``
=========  =========================================  ===================================
"""

from __future__ import annotations

import enum
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fleetward.agent.commands import BadCommand, Command, CommandResult
from fleetward.agent.telemetry import Record
from fleetward.errors import FleetwardError

TELEMETRY = "telemetry"
EVENT = "event"
RESULT = "result"

# Reason codes with which a server refuses this *identity* (MQTT 5.0 §2.4 Table 2-6):
# trying again at once cannot help, only an operator can. 3.1.1 CONNACK return codes 4
# and 5 (§3.2.2.3) arrive as 0x86 and 0x87 (paho maps them to the v5 reason codes).
REFUSAL_CODES = {
    0x86: "bad user name or password (bad credentials)",
    0x87: "not authorized",
    0x8A: "banned",
    0x98: "administrative action",
}

# TLS alerts a server sends when it refuses the client certificate (RFC 8446 §6.2):
# the identity is refused before MQTT or HTTP even starts.
_TLS_REFUSAL = re.compile(
    r"alert[ _](certificate[ _]revoked|certificate[ _]expired|bad[ _]certificate|"
    r"certificate[ _]unknown|unknown[ _]ca|access[ _]denied|certificate[ _]required|"
    r"unsupported[ _]certificate)", re.IGNORECASE)


class ChannelRefused(FleetwardError):
    """The server refused this device's identity (revoked, banned, not authorized)."""

    status = 403
    problem_type = "channel-refused"
    default_hint = ("the operator may have revoked the certificate or disabled, quarantined "
                    "or retired the device; check `fleetward device show <id>` on the server")

    def __init__(self, message: str, *, code: int | None = None, reason: str = "",
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.reason = reason


def tls_alert_refusal(text: str) -> bool:
    """Whether an OpenSSL error text is a server's TLS alert against our certificate."""
    return bool(_TLS_REFUSAL.search(text))


def ssl_error_text(exc: BaseException) -> str | None:
    """The text of the first ``ssl.SSLError`` in ``exc``'s cause chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return f"{seen.reason or ''} {seen}"
        seen = seen.__cause__ or seen.__context__
    return None


@dataclass(frozen=True, slots=True)
class Outbound:
    """One message for the server: a record, an event or a command result."""

    kind: str  # telemetry | event | result
    name: str  # message type | event type | command id (validated where they came from)
    body: dict[str, Any]

    @classmethod
    def of_record(cls, record: Record) -> Outbound:
        return cls(EVENT if record.kind == "event" else TELEMETRY, record.message_type,
                   record.data)

    @classmethod
    def of_result(cls, command_id: str, result: CommandResult) -> Outbound:
        return cls(RESULT, command_id, result.body())

    def record(self) -> Record:
        """The record this message came from (for putting it back in the buffer)."""
        return Record("event" if self.kind == EVENT else "telemetry", self.name, self.body)

    def topic(self, device_id: str) -> str:
        level = {TELEMETRY: "telemetry", EVENT: "events", RESULT: "command-results"}[self.kind]
        return f"devices/{device_id}/{level}/{self.name}"

    def path(self) -> str:
        if self.kind == RESULT:
            return f"/v1/commands/{self.name}/result"
        return f"/v1/{'events' if self.kind == EVENT else 'telemetry'}/{self.name}"


def commands_filter(device_id: str) -> str:
    return f"devices/{device_id}/commands/#"


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # the server acknowledged it (PUBACK, HTTP 2xx)
    REJECTED = "rejected"  # the server refused this message: resending cannot help
    UNSENT = "unsent"  # fate unknown (connection lost): send again on the next session


CommandSink = Callable[[Command | BadCommand], None]


class Session(Protocol):
    """One live connection. Thread-safe: the supervisor sends, a network thread
    delivers commands through the ``CommandSink`` given when the session opened."""

    @property
    def channel(self) -> str: ...

    @property
    def lost(self) -> bool:
        """The connection is gone (the supervisor opens another)."""
        ...

    @property
    def refusal(self) -> ChannelRefused | None:
        """Set when the server ended the session because it refuses this identity."""
        ...

    def send(self, messages: Sequence[Outbound], timeout_seconds: float) -> list[Outcome]:
        """Send ``messages`` in order; one outcome each. After the first UNSENT the
        rest are UNSENT too and the session is lost."""
        ...

    def close(self) -> None:
        """End the session cleanly (MQTT DISCONNECT); idempotent."""
        ...


__all__ = ["EVENT", "REFUSAL_CODES", "RESULT", "TELEMETRY", "ChannelRefused", "CommandSink",
           "Outbound", "Outcome", "Session", "commands_filter", "ssl_error_text",
           "tls_alert_refusal"]
