"""Hash-chained, MACed audit log.

Each row stores ``hash = SHA-256(canonical(content) || prev_hash)`` and
``mac = HMAC-SHA256(audit_key, hash)``. The key lives in the data directory, not in the
database, so someone who can write SQL but cannot read the key can neither forge a row
nor re-chain the log after an edit. A one-row *head* (newest seq and hash, also MACed)
catches rows cut off the end, which a chain alone cannot see.

The verifier names the first bad row and what happened to it: edited, forged,
deleted, inserted or reordered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import Connection

from fleetward.clock import Clock
from fleetward.model import AuditEvent, AuditRecord
from fleetward.store import audit as rows
from fleetward.store.audit import AuditRow, HeadRow

GENESIS_HASH = "0" * 64
log = structlog.get_logger("fleetward.audit")

# Keys in event details that must never be stored or logged, whatever the caller passes.
_SECRET_KEYS = frozenset({"token", "secret", "password", "passphrase", "pin", "private_key"})


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces, UTF-8): what is hashed is what is stored."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _content_hash(row: AuditRow | dict[str, Any], prev_hash: str) -> str:
    get = row.get if isinstance(row, dict) else row.__getattribute__
    content = canonical_json(
        {
            "at": get("at").isoformat(),
            "actor": get("actor"),
            "action": get("action"),
            "target": get("target"),
            "outcome": get("outcome"),
            "details": get("details"),
        }
    )
    return hashlib.sha256(content.encode() + b"|" + prev_hash.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainProblem:
    seq: int
    kind: str  # edited | forged | deleted | inserted | reordered | truncated | head
    message: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    rows_checked: int
    problem: ChainProblem | None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "rows_checked": self.rows_checked}
        if self.problem:
            out.update(
                first_bad_seq=self.problem.seq, kind=self.problem.kind, message=self.problem.message
            )
        return out


class AuditLog:
    """Appends events in the caller's transaction and verifies the chain."""

    def __init__(self, key: bytes, clock: Clock) -> None:
        if len(key) < 32:
            raise ValueError("the audit key must be at least 32 bytes")
        self._key = key
        self._clock = clock

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def append(self, conn: Connection, event: AuditEvent) -> AuditRecord:
        """Append ``event`` inside ``conn``'s transaction (it commits or rolls back with it)."""
        details = {k: v for k, v in event.details.items() if k.lower() not in _SECRET_KEYS}
        head = rows.lock_head(conn)
        prev_hash = head.hash if head else GENESIS_HASH
        seq = head.seq + 1 if head else 1
        at = self._clock.now()
        content = {
            "at": at,
            "actor": event.actor,
            "action": event.action,
            "target": event.target,
            "outcome": event.outcome,
            "details": canonical_json(details),
        }
        digest = _content_hash(content, prev_hash)
        row = AuditRow(seq=seq, prev_hash=prev_hash, hash=digest, mac=self._mac(digest), **content)
        rows.insert_event(conn, row)
        rows.write_head(
            conn, HeadRow(seq, digest, self._mac(f"{seq}:{digest}")), existed=head is not None
        )
        log.info(
            "audit",
            seq=seq,
            action=event.action,
            actor=event.actor,
            target=event.target,
            outcome=event.outcome,
        )
        return AuditRecord(seq=seq, at=at, event=event, prev_hash=prev_hash, hash=digest)

    def verify(self, conn: Connection) -> VerifyReport:
        """Walk the whole chain; report the first row that is not as written."""
        chain = list(rows.iter_events(conn))
        return self.verify_rows(chain, rows.read_head(conn))

    def verify_rows(self, chain: Iterable[AuditRow], head: HeadRow | None) -> VerifyReport:
        chain = list(chain)
        position_of_hash = {row.hash: i for i, row in enumerate(chain)}
        prev_hash, expected_seq = GENESIS_HASH, 1
        for i, row in enumerate(chain):
            problem = self._check_row(row, i, prev_hash, expected_seq, position_of_hash)
            if problem:
                return VerifyReport(i, problem)
            prev_hash, expected_seq = row.hash, row.seq + 1
        count = len(chain)
        last_seq = chain[-1].seq if chain else 0
        if head is None:
            if chain:
                return VerifyReport(
                    count, ChainProblem(last_seq, "head", "the signed chain head is missing")
                )
            return VerifyReport(0, None)
        if not hmac.compare_digest(head.mac, self._mac(f"{head.seq}:{head.hash}")):
            return VerifyReport(
                count,
                ChainProblem(
                    head.seq, "head", "the chain head was altered (its MAC does not verify)"
                ),
            )
        if head.seq != last_seq or head.hash != prev_hash:
            if head.seq > last_seq:
                return VerifyReport(
                    count,
                    ChainProblem(
                        last_seq + 1,
                        "truncated",
                        f"rows {last_seq + 1}..{head.seq} were deleted from the end of the log",
                    ),
                )
            return VerifyReport(
                count,
                ChainProblem(
                    head.seq + 1, "inserted", f"rows after {head.seq} were appended without the key"
                ),
            )
        return VerifyReport(count, None)

    def _check_row(
        self,
        row: AuditRow,
        index: int,
        prev_hash: str,
        expected_seq: int,
        position_of_hash: dict[str, int],
    ) -> ChainProblem | None:
        if _content_hash(row, row.prev_hash) != row.hash:
            return ChainProblem(
                row.seq, "edited", f"row {row.seq} was edited: its content does not match its hash"
            )
        if not hmac.compare_digest(row.mac, self._mac(row.hash)):
            return ChainProblem(
                row.seq,
                "forged",
                f"row {row.seq} was written without the audit key (inserted or rewritten)",
            )
        if row.prev_hash == prev_hash:
            if row.seq != expected_seq:
                return ChainProblem(
                    row.seq,
                    "renumbered",
                    f"row {row.seq} follows row {expected_seq - 1} in the chain "
                    "but its sequence number was changed",
                )
            return None
        if row.seq > expected_seq and row.prev_hash not in position_of_hash:
            return ChainProblem(
                expected_seq,
                "deleted",
                f"row {expected_seq} was deleted"
                if row.seq == expected_seq + 1
                else f"rows {expected_seq}..{row.seq - 1} were deleted",
            )
        linked = position_of_hash.get(row.prev_hash)
        if linked is not None and linked > index:
            return ChainProblem(
                row.seq, "reordered", f"row {row.seq} is out of order: it belongs after a later row"
            )
        if linked is not None and linked < index - 1:
            return ChainProblem(
                row.seq, "inserted", f"row {row.seq} is a copy of an earlier row inserted here"
            )
        return ChainProblem(
            row.seq, "deleted", f"the row(s) just before row {row.seq} were deleted"
        )


def record_to_json(row: AuditRow) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "at": row.at.isoformat().replace("+00:00", "Z"),
        "actor": row.actor,
        "action": row.action,
        "target": row.target,
        "outcome": row.outcome,
        "details": json.loads(row.details),
        "hash": row.hash,
    }
