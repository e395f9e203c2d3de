"""Audit events as appended to the hash-chained log."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class AuditEvent:
    action: str  # dotted verb, e.g. "certificate.issued", "device.state_changed"
    actor: str  # "operator:<name>", "system", "device:<id>"
    target: str = ""  # what the action was about, e.g. "device:abc", "ca:issuing"
    outcome: str = "success"  # "success" | "failure"
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    at: dt.datetime
    event: AuditEvent
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at.isoformat().replace("+00:00", "Z"),
            "action": self.event.action,
            "actor": self.event.actor,
            "target": self.event.target,
            "outcome": self.event.outcome,
            "details": self.event.details,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }
