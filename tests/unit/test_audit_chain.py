"""Every edit, deletion, insertion or swap of an audit row is detected and named.

The attacker here can run any SQL against the database but cannot read the audit key
(it lives in the data directory). Each scenario tampers with the raw tables exactly as
such an attacker would, then ``AuditLog.verify`` must report the first bad row and what
happened to it. Every scenario runs at every row position (first, each middle, last) on
SQLite and on PostgreSQL. Negative controls: the untouched chain verifies, and the same
chain checked with the wrong key does not (so a verifier that skipped the MAC would fail).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Connection, delete, insert, select, text, update

from fleetward.audit import AuditLog, VerifyReport
from fleetward.audit.log import GENESIS_HASH, PROBLEM_KINDS
from fleetward.clock import FrozenClock
from fleetward.model import AuditEvent
from fleetward.store.schema import audit_events, audit_head
from tests.conftest import Stack, build_stack, postgres_schema_url

ROWS = 12  # length of the chain every tamper scenario starts from
POSITIONS = list(range(1, ROWS + 1))
MIDDLE = list(range(2, ROWS))
START = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


# --- a 12-row chain per backend, restored before every test ----------------------------


@dataclass
class Chain:
    stack: Stack
    pristine_rows: list[dict[str, Any]]
    pristine_head: dict[str, Any]

    def restore(self) -> None:
        with self.stack.db.transaction() as conn:
            conn.execute(delete(audit_events))
            conn.execute(delete(audit_head))
            conn.execute(insert(audit_events), self.pristine_rows)
            conn.execute(insert(audit_head).values(**self.pristine_head))

    def verify(self, audit: AuditLog | None = None) -> VerifyReport:
        with self.stack.db.read() as conn:
            return (audit or self.stack.audit).verify(conn)

    def row(self, seq: int) -> dict[str, Any]:
        return dict(self.pristine_rows[seq - 1])


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def chain_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Chain]:
    """One CA stack per backend for the module (building one per test would be slow)."""
    tmp = tmp_path_factory.mktemp(f"audit-{request.param}")
    urls = (iter([f"sqlite:///{tmp / 'fleetward.db'}"]) if request.param == "sqlite"
            else postgres_schema_url())
    url = next(urls)
    stack = build_stack(url, tmp, FrozenClock(START))
    with stack.db.transaction() as conn:
        existing = conn.execute(select(audit_head.c.seq)).scalar_one()
        for n in range(existing + 1, ROWS + 1):
            stack.clock.advance(dt.timedelta(seconds=7))
            stack.audit.append(conn, AuditEvent(
                action="device.created", actor=f"operator:op{n % 3}", target=f"device:d{n}",
                outcome="failure" if n % 4 == 0 else "success",
                details={"n": n, "labels": {"site": "lyon", "rack": str(n)}}))
    with stack.db.read() as conn:
        pristine = [dict(r._mapping) for r in conn.execute(
            select(audit_events).order_by(audit_events.c.seq))]
        head = dict(conn.execute(select(audit_head)).one()._mapping)
    assert [r["seq"] for r in pristine] == POSITIONS
    yield Chain(stack, pristine, head)
    stack.db.dispose()
    next(urls, None)  # drops the PostgreSQL schema


@pytest.fixture
def chain(chain_stack: Chain) -> Chain:
    chain_stack.restore()
    return chain_stack


# --- what an attacker without the key can compute --------------------------------------


def attacker_hash(row: dict[str, Any]) -> str:
    """The documented row hash: SHA-256(canonical JSON of the content | prev_hash)."""
    content = json.dumps(
        {"at": row["at"].astimezone(dt.UTC).isoformat(), "actor": row["actor"],
         "action": row["action"], "target": row["target"], "outcome": row["outcome"],
         "details": row["details"]},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(content.encode() + b"|" + row["prev_hash"].encode()).hexdigest()


def attacker_mac(digest: str) -> str:
    """An HMAC under a key the attacker made up (the real one is not in the database)."""
    return hmac.new(b"m" * 32, digest.encode(), hashlib.sha256).hexdigest()


def set_row(conn: Connection, seq: int, /, **values: Any) -> None:
    result = conn.execute(update(audit_events).where(audit_events.c.seq == seq).values(**values))
    assert result.rowcount == 1


def shift_seqs(conn: Connection, first: int, by: int) -> None:
    """Renumber rows ``first..`` by ``by``, in an order that never collides on the key."""
    seqs = conn.execute(select(audit_events.c.seq).where(audit_events.c.seq >= first)
                        .order_by(audit_events.c.seq.desc() if by > 0 else audit_events.c.seq)
                        ).scalars().all()
    for seq in seqs:
        set_row(conn, seq, seq=seq + by)


def assert_broken(report: VerifyReport, seq: int, kind: str) -> None:
    assert not report.ok, "the tampering went unnoticed"
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (seq, kind), report.problem.message
    assert report.problem.kind in PROBLEM_KINDS
    assert str(seq) in report.problem.message
    assert report.to_json()["first_bad_seq"] == seq


# --- negative controls -----------------------------------------------------------------


def test_untouched_chain_verifies_every_row(chain: Chain) -> None:
    report = chain.verify()
    assert report.ok, report.problem
    assert report.rows_checked == ROWS
    assert report.to_json() == {"ok": True, "rows_checked": ROWS}


def test_chain_checked_with_another_key_is_rejected_at_the_first_row(chain: Chain) -> None:
    """A verifier that skipped the MAC would accept this: it must not."""
    impostor = AuditLog(secrets.token_bytes(32), chain.stack.clock)
    assert_broken(chain.verify(impostor), 1, "forged")


def test_the_attacker_hash_formula_matches_the_stored_hashes(chain: Chain) -> None:
    """Control for the forging scenarios: our attacker really can recompute a valid hash."""
    for row in chain.pristine_rows:
        assert attacker_hash(row) == row["hash"]


def test_empty_log_without_head_is_consistent() -> None:
    audit = AuditLog(b"k" * 32, FrozenClock(START))
    assert audit.verify_rows([], None).ok


# --- edits -----------------------------------------------------------------------------


def _flip_outcome(row: dict[str, Any]) -> str:
    return "success" if row["outcome"] == "failure" else "failure"


# (column, new value from the original row, expected kind)
EDITS: dict[str, tuple[str, Any, str]] = {
    "actor": ("actor", lambda r: "operator:mallory", "edited"),
    "actor-case-only": ("actor", lambda r: r["actor"].upper(), "edited"),
    "action": ("action", lambda r: "device.viewed", "edited"),
    "target": ("target", lambda r: "device:someone-else", "edited"),
    "target-emptied": ("target", lambda r: "", "edited"),
    "outcome-flipped": ("outcome", _flip_outcome, "edited"),
    "details-replaced": ("details", lambda r: '{"note":"nothing to see"}', "edited"),
    "details-same-json-other-spacing": (
        "details", lambda r: json.dumps(json.loads(r["details"]), indent=1), "edited"),
    "at-moved-one-day": ("at", lambda r: r["at"] - dt.timedelta(days=1), "edited"),
    "at-moved-one-second": ("at", lambda r: r["at"] + dt.timedelta(seconds=1), "edited"),
    "prev-hash-relinked": ("prev_hash", lambda r: "f" * 64, "edited"),
    "hash-overwritten": ("hash", lambda r: hashlib.sha256(b"x").hexdigest(), "edited"),
    "mac-overwritten": ("mac", lambda r: "0" * 64, "forged"),
}


@pytest.mark.parametrize("seq", POSITIONS)
@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_column_is_named_at_its_row(chain: Chain, edit: str, seq: int) -> None:
    column, new_value, kind = EDITS[edit]
    original = chain.row(seq)
    value = new_value(original)
    assert value != original[column]
    with chain.stack.db.transaction() as conn:
        set_row(conn, seq, **{column: value})
    assert_broken(chain.verify(), seq, kind)


@pytest.mark.parametrize("seq", POSITIONS)
@pytest.mark.parametrize("rechain_following", [False, True], ids=["alone", "rechained-to-end"])
def test_edit_with_recomputed_hashes_is_named_forged(chain: Chain, seq: int,
                                                     rechain_following: bool) -> None:
    """Without the key the attacker can fix every hash, never the MAC of the edited row."""
    rows = [chain.row(n) for n in POSITIONS]
    rows[seq - 1]["actor"] = "operator:mallory"
    last = ROWS if rechain_following else seq
    with chain.stack.db.transaction() as conn:
        for n in range(seq, last + 1):
            row = rows[n - 1]
            if n > 1:
                row["prev_hash"] = rows[n - 2]["hash"]
            row["hash"] = attacker_hash(row)
            set_row(conn, n, actor=row["actor"], prev_hash=row["prev_hash"], hash=row["hash"],
                    mac=attacker_mac(row["hash"]))
        if rechain_following and seq == ROWS:
            conn.execute(update(audit_head).values(hash=rows[-1]["hash"]))
    assert_broken(chain.verify(), seq, "forged")


@pytest.mark.parametrize("seq", POSITIONS)
def test_genuine_row_renumbered_is_named(chain: Chain, seq: int) -> None:
    """Row content untouched, only its sequence number moved into a free slot."""
    with chain.stack.db.transaction() as conn:
        shift_seqs(conn, seq, 1)  # rows seq.. become seq+1..; no row is left at seq
    assert_broken(chain.verify(), seq + 1, "renumbered")


# --- deletions -------------------------------------------------------------------------


@pytest.mark.parametrize("seq", POSITIONS)
def test_deleted_row_is_named(chain: Chain, seq: int) -> None:
    with chain.stack.db.transaction() as conn:
        conn.execute(delete(audit_events).where(audit_events.c.seq == seq))
    assert_broken(chain.verify(), seq, "truncated" if seq == ROWS else "deleted")


@pytest.mark.parametrize(("first", "last"), [
    (1, 2), (1, 6), (1, ROWS - 1), (2, 3), (3, 9), (5, 6), (ROWS - 2, ROWS - 1),
    (ROWS - 1, ROWS), (4, ROWS), (1, ROWS),
])
def test_deleted_range_is_named_at_its_first_row(chain: Chain, first: int, last: int) -> None:
    with chain.stack.db.transaction() as conn:
        conn.execute(delete(audit_events).where(audit_events.c.seq.between(first, last)))
    assert_broken(chain.verify(), first, "truncated" if last == ROWS else "deleted")


@pytest.mark.parametrize("seq", POSITIONS)
def test_deleted_row_hidden_by_renumbering_is_still_named(chain: Chain, seq: int) -> None:
    """The attacker closes the gap (seq i+1.. -> i..) and, at the end, leaves the head."""
    with chain.stack.db.transaction() as conn:
        conn.execute(delete(audit_events).where(audit_events.c.seq == seq))
        shift_seqs(conn, seq + 1, -1)
    assert_broken(chain.verify(), seq, "truncated" if seq == ROWS else "deleted")


# --- swaps -----------------------------------------------------------------------------


@pytest.mark.parametrize("seq", POSITIONS[:-1])
def test_swapped_neighbours_are_named_at_the_first(chain: Chain, seq: int) -> None:
    with chain.stack.db.transaction() as conn:
        set_row(conn, seq, seq=-1)
        set_row(conn, seq + 1, seq=seq)
        set_row(conn, -1, seq=seq + 1)
    assert_broken(chain.verify(), seq, "reordered")


@pytest.mark.parametrize(("a", "b"), [(1, ROWS), (2, 7), (3, 5), (6, ROWS)])
def test_swapped_distant_rows_are_named_at_the_first(chain: Chain, a: int, b: int) -> None:
    with chain.stack.db.transaction() as conn:
        set_row(conn, a, seq=-1)
        set_row(conn, b, seq=a)
        set_row(conn, -1, seq=b)
    assert_broken(chain.verify(), a, "reordered")


# --- insertions ------------------------------------------------------------------------


def _forged_row(seq: int, prev_hash: str, at: dt.datetime) -> dict[str, Any]:
    row = {"seq": seq, "at": at, "actor": "operator:alice", "action": "device.state_changed",
           "target": "device:d3", "outcome": "success",
           "details": '{"from":"active","reason":"maintenance","to":"suspended"}',
           "prev_hash": prev_hash}
    row["hash"] = attacker_hash(row)
    row["mac"] = attacker_mac(row["hash"])
    return row


@pytest.mark.parametrize("seq", [*POSITIONS, ROWS + 1])
def test_forged_row_inserted_is_named(chain: Chain, seq: int) -> None:
    """A well-formed row with a valid hash linked to its predecessor, at position ``seq``
    (following rows renumbered; the last case appends at the end)."""
    prev_hash = GENESIS_HASH if seq == 1 else chain.row(seq - 1)["hash"]
    at = chain.row(min(seq, ROWS))["at"]
    with chain.stack.db.transaction() as conn:
        shift_seqs(conn, seq, 1)
        conn.execute(insert(audit_events).values(**_forged_row(seq, prev_hash, at)))
    assert_broken(chain.verify(), seq, "forged")


@pytest.mark.parametrize("copied", POSITIONS)
@pytest.mark.parametrize("update_head", [False, True], ids=["head-left", "head-moved"])
def test_replayed_copy_of_a_genuine_row_appended_is_named(chain: Chain, copied: int,
                                                          update_head: bool) -> None:
    """A byte-for-byte copy of row ``copied`` (its MAC is genuine) appended as the newest."""
    dup = chain.row(copied) | {"seq": ROWS + 1}
    with chain.stack.db.transaction() as conn:
        conn.execute(insert(audit_events).values(**dup))
        if update_head:  # the attacker can move seq and hash, but not re-MAC the head
            conn.execute(update(audit_head).values(seq=ROWS + 1, hash=dup["hash"],
                                                   mac=dup["mac"]))
    assert_broken(chain.verify(), ROWS + 1, "inserted")


@pytest.mark.parametrize("seq", MIDDLE)
def test_replayed_copy_inserted_in_the_middle_is_named(chain: Chain, seq: int) -> None:
    """Row 1 replayed at position ``seq`` with following rows renumbered."""
    with chain.stack.db.transaction() as conn:
        shift_seqs(conn, seq, 1)
        conn.execute(insert(audit_events).values(**(chain.row(1) | {"seq": seq})))
    assert_broken(chain.verify(), seq, "inserted")


def test_genuine_row_appended_without_the_head_is_named(chain: Chain) -> None:
    """A row MACed with the real key but never committed with its head (e.g. a restored
    backup row): the chain links, only the head can tell."""
    with chain.stack.db.transaction() as conn:
        head = conn.execute(select(audit_head)).one()
        chain.stack.audit.append(conn, AuditEvent(action="device.created", actor="system"))
        conn.execute(update(audit_head).values(seq=head.seq, hash=head.hash, mac=head.mac))
    assert_broken(chain.verify(), ROWS + 1, "inserted")


# --- the head --------------------------------------------------------------------------


HEAD_TAMPERS: dict[str, Callable[[Chain], dict[str, Any]]] = {
    "seq-lowered": lambda c: {"seq": ROWS - 1},
    "seq-raised": lambda c: {"seq": ROWS + 1},
    "hash-replaced": lambda c: {"hash": "a" * 64},
    "hash-of-an-earlier-row": lambda c: {"hash": c.row(5)["hash"]},
    "mac-replaced": lambda c: {"mac": "b" * 64},
    "mac-of-a-row-copied": lambda c: {"mac": c.row(ROWS)["mac"]},
}


@pytest.mark.parametrize("tamper", list(HEAD_TAMPERS))
def test_tampered_head_is_named(chain: Chain, tamper: str) -> None:
    values = HEAD_TAMPERS[tamper](chain)
    with chain.stack.db.transaction() as conn:
        conn.execute(update(audit_head).values(**values))
    report = chain.verify()
    assert not report.ok and report.problem is not None
    assert report.problem.kind == "head", report.problem.message
    assert report.rows_checked == ROWS


def test_deleted_head_is_named(chain: Chain) -> None:
    with chain.stack.db.transaction() as conn:
        conn.execute(delete(audit_head))
    assert_broken(chain.verify(), ROWS, "head")


def test_truncation_with_the_head_moved_back_is_named(chain: Chain) -> None:
    """Rows cut off the end and the head pointed at the new last row: its MAC gives it away."""
    with chain.stack.db.transaction() as conn:
        conn.execute(delete(audit_events).where(audit_events.c.seq > 9))
        conn.execute(update(audit_head).values(seq=9, hash=chain.row(9)["hash"]))
    report = chain.verify()
    assert not report.ok and report.problem is not None
    assert report.problem.kind == "head"


def test_garbage_timestamp_is_named_instead_of_crashing_the_verifier(chain: Chain) -> None:
    """SQLite lets any text into a DATETIME column; the verifier must still name the row."""
    if chain.stack.db.dialect != "sqlite":
        pytest.skip("PostgreSQL refuses a non-timestamp in a timestamptz column")
    with chain.stack.db.transaction() as conn:
        conn.execute(text("UPDATE audit_events SET at = 'yesterday' WHERE seq = 4"))
    assert_broken(chain.verify(), 4, "edited")


# --- secrets and concurrency (on the per-test stack) -----------------------------------


SECRET = "fwa_0123456789abcdef.s3cr3t-VALUE-never-stored"


def test_secret_looking_detail_keys_are_stripped_before_storage(stack: Stack) -> None:
    details = {"token": SECRET, "Password": SECRET, "admin_token": SECRET,
               "db-password": SECRET, "request": {"passphrase": SECRET, "note": "kept"},
               "token_id": "0123456789abcdef", "reason": "rotation"}
    with stack.db.transaction() as conn:
        record = stack.audit.append(conn, AuditEvent(
            action="operator.token_created", actor="operator:root", details=details))
    with stack.db.read() as conn:
        stored = conn.execute(select(audit_events).where(
            audit_events.c.seq == record.seq)).one()._mapping
        assert stack.audit.verify(conn).ok
    assert all(SECRET not in str(v) for v in stored.values())
    assert json.loads(stored["details"]) == {
        "request": {"note": "kept"}, "token_id": "0123456789abcdef", "reason": "rotation"}


WRITERS, APPENDS_EACH = 4, 50


@pytest.mark.parametrize("verifier_txn", ["fresh-read", "already-begun"])
def test_concurrent_appends_keep_one_gapless_chain(stack: Stack, verifier_txn: str) -> None:
    """4 writers in separate transactions: the head lock must serialise them, and a verifier
    running at the same time must never mistake a just-committed append for a truncation,
    whether it gets its own snapshot or runs in a transaction its caller already began."""
    with stack.db.read() as conn:
        before = conn.execute(select(audit_head.c.seq)).scalar_one()
    errors: list[BaseException] = []
    false_alarms: list[dict[str, Any]] = []
    done = threading.Event()

    def writer(n: int) -> None:
        try:
            for i in range(APPENDS_EACH):
                with stack.db.transaction() as conn:
                    stack.audit.append(conn, AuditEvent(
                        action="device.created", actor=f"operator:w{n}", target=f"device:{i}"))
        except BaseException as exc:
            errors.append(exc)

    def verifier() -> None:
        while not done.is_set():
            with stack.db.read() as conn:
                if verifier_txn == "already-begun":
                    conn.execute(select(audit_head.c.seq)).scalar_one()
                    assert conn.in_transaction()
                report = stack.audit.verify(conn)
            if not report.ok:
                false_alarms.append(report.to_json())

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    checker = threading.Thread(target=verifier)
    checker.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    checker.join(60)
    assert not errors, errors
    assert not false_alarms, false_alarms[:3]
    total = before + WRITERS * APPENDS_EACH
    with stack.db.read() as conn:
        seqs = conn.execute(select(audit_events.c.seq).order_by(audit_events.c.seq)
                            ).scalars().all()
        report = stack.audit.verify(conn)
    assert seqs == list(range(1, total + 1))
    assert report.ok, report.problem
    assert report.rows_checked == total


def test_concurrency_harness_sees_a_break_when_there_is_one(stack: Stack) -> None:
    """Control for the test above: the same verify call does report a real break."""
    with stack.db.transaction() as conn:
        conn.execute(delete(audit_events).where(audit_events.c.seq == 1))
    with stack.db.read() as conn:
        assert_broken(stack.audit.verify(conn), 1, "deleted")
