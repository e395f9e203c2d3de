"""Hash-chained, MACed audit log.

Each row stores ``hash = SHA-256(canonical(content) || prev_hash)`` and
``mac = HMAC-SHA256(audit_key, hash)``. The key lives in the data directory, not in the
database, so someone who can write SQL but cannot read the key can neither forge a row
nor re-chain the log after an edit. A one-row *head* (newest seq and hash, also MACed)
catches rows cut off the end, which a chain alone cannot see.

The verifier names the first bad row and what happened to it (``PROBLEM_KINDS``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import Connection

from fleetward.clock import Clock
from fleetward.model import AuditEvent, AuditRecord
from fleetward.store import audit as rows
from fleetward.store.audit import AuditRow, HeadRow

GENESIS_HASH = "0" * 64
MAX_ACTOR_CHARS = 200  # audit_events.actor is String(200)
MAX_TARGET_CHARS = 300  # audit_events.target is String(300)


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"

log = structlog.get_logger("fleetward.audit")

# Keys in event details that must never be stored or logged, whatever the caller passes:
# these names, and any key ending in one of them ("admin_token", "db-password"), at any depth.
_SECRET_KEYS = frozenset({"token", "secret", "password", "passphrase", "pin", "private_key"})

# What ``ChainProblem.kind`` can say, and what it means for the row it names:
PROBLEM_KINDS = frozenset(
    {
        "edited",  # the content no longer matches its hash
        "forged",  # the hash matches but was not MACed with the audit key (written without it)
        "deleted",  # this row (and maybe the following ones) is missing from the chain
        "inserted",  # a row that does not belong here: a replayed copy, or appended past the head
        "reordered",  # a genuine row moved before the row it was chained after
        "renumbered",  # a genuine row in its place in the chain, with its sequence number changed
        "truncated",  # rows from here to the head were cut off the end
        "head",  # the signed head is missing or altered
    }
)


def _is_secret_key(key: str) -> bool:
    key = key.lower()
    return any(key == word or key.endswith(("_" + word, "-" + word)) for word in _SECRET_KEYS)


def _strip_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_secrets(v) for k, v in value.items() if not _is_secret_key(str(k))}
    if isinstance(value, list | tuple):
        return [_strip_secrets(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces, UTF-8): what is hashed is what is stored."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _content_hash(row: AuditRow | dict[str, Any], prev_hash: str) -> str:
    get = row.get if isinstance(row, dict) else row.__getattribute__
    at = get("at")
    if at is None:  # the stored timestamp was not a timestamp: cannot match any hash
        return ""
    content = canonical_json(
        {
            "at": at.isoformat(),
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
    kind: str  # one of PROBLEM_KINDS
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
        # Called with each appended event's action, inside the transaction (before it
        # commits): lets this node's data plane learn of its own changes at once.
        self.on_append: Callable[[str], None] | None = None

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def append(self, conn: Connection, event: AuditEvent) -> AuditRecord:
        """Append ``event`` inside ``conn``'s transaction (it commits or rolls back with it)."""
        details = _strip_secrets(event.details)
        head = rows.lock_head(conn)
        prev_hash = head.hash if head else GENESIS_HASH
        seq = head.seq + 1 if head else 1
        at = self._clock.now()
        content: dict[str, Any] = {
            "at": at,
            # Capped to the column widths: these often carry attacker-chosen text (a URL
            # path, a device id from a request) and an over-long one must not lose the row.
            "actor": _cap(event.actor, MAX_ACTOR_CHARS),
            "action": event.action,
            "target": _cap(event.target, MAX_TARGET_CHARS),
            "outcome": event.outcome,
            "details": canonical_json(details),
        }
        digest = _content_hash(content, prev_hash)
        row = AuditRow(seq=seq, prev_hash=prev_hash, hash=digest, mac=self._mac(digest), **content)
        rows.insert_event(conn, row)
        if self.on_append is not None:
            self.on_append(event.action)
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
        """Walk the whole chain; report the first row that is not as written.

        The head is read before the rows. Appends only ever add rows past the head, so
        every row up to the head read first is anchored by it, even if appends commit
        while we read (PostgreSQL's default READ COMMITTED gives each statement a new
        snapshot; a naive rows-then-head read would take a fresh append for rows cut off
        the end). Rows read past that head must be covered by the head read after them.
        Where we can, PostgreSQL reads everything from one REPEATABLE READ snapshot.
        """
        if conn.dialect.name == "postgresql" and not conn.in_transaction():
            conn.execution_options(isolation_level="REPEATABLE READ")
        head = rows.read_head(conn)
        chain = list(rows.iter_events(conn))
        later_head = head
        if chain and (head is None or chain[-1].seq > head.seq):
            later_head = rows.read_head(conn)
        return self.verify_rows(chain, head, later_head)

    def verify_rows(
        self, chain: Iterable[AuditRow], head: HeadRow | None, later_head: HeadRow | None = None
    ) -> VerifyReport:
        """Verify ``chain`` against ``head`` (read before it) and ``later_head`` (after it).

        Args:
            chain: every row, in sequence order.
            head: the head as read before the rows.
            later_head: the head as read after the rows, if appends may have committed in
                between; defaults to ``head``.
        """
        chain = list(chain)
        position_of_hash = {row.hash: i for i, row in enumerate(chain)}
        prev_hash, expected_seq = GENESIS_HASH, 1
        for i, row in enumerate(chain):
            problem = self._check_row(row, i, prev_hash, expected_seq, position_of_hash)
            if problem:
                return VerifyReport(i, problem)
            prev_hash, expected_seq = row.hash, row.seq + 1
        # The rows are now 1..last_seq, each linked to the one before.
        count = len(chain)
        last_seq = chain[-1].seq if chain else 0
        if head is None:  # the log was empty when we started reading, or the head is gone
            head = later_head
        if later_head is None:
            later_head = head
        if head is None or later_head is None:
            if chain:
                return VerifyReport(
                    count,
                    ChainProblem(
                        last_seq, "head", f"the signed chain head (row {last_seq}) is missing"
                    ),
                )
            return VerifyReport(0, None)
        for signed in (head, later_head):
            if not hmac.compare_digest(signed.mac, self._mac(f"{signed.seq}:{signed.hash}")):
                return VerifyReport(
                    count,
                    ChainProblem(
                        signed.seq, "head", f"the chain head (row {signed.seq}) was altered"
                    ),
                )
        if head.seq > last_seq:
            return VerifyReport(
                count,
                ChainProblem(
                    last_seq + 1,
                    "truncated",
                    f"rows {last_seq + 1}..{head.seq} were deleted from the end of the log",
                ),
            )
        if later_head.seq < last_seq:
            return VerifyReport(
                count,
                ChainProblem(
                    later_head.seq + 1,
                    "inserted",
                    f"rows {later_head.seq + 1}..{last_seq} are past the signed head "
                    f"(row {later_head.seq}): appended without the key or the head rolled back",
                ),
            )
        for signed in (head, later_head):
            if signed.seq <= last_seq and (
                signed.seq == 0 or chain[signed.seq - 1].hash != signed.hash
            ):
                return VerifyReport(
                    count,
                    ChainProblem(
                        signed.seq, "head", f"row {signed.seq} is not the row the signed head names"
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
        if (linked is not None and linked < index - 1) or (
            row.prev_hash == GENESIS_HASH and index > 0
        ):
            return ChainProblem(
                row.seq, "inserted", f"row {row.seq} is a copy of an earlier row inserted here"
            )
        return ChainProblem(
            row.seq, "deleted", f"the row(s) just before row {row.seq} were deleted"
        )


def record_to_json(row: AuditRow) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "at": row.at.isoformat().replace("+00:00", "Z") if row.at else None,
        "actor": row.actor,
        "action": row.action,
        "target": row.target,
        "outcome": row.outcome,
        "details": json.loads(row.details),
        "hash": row.hash,
    }
