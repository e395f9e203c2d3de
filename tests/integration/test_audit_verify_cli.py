"""``fleetward audit verify`` / ``audit tail`` against a real server and its SQLite file.

The attacker writes straight into ``fleetward.db`` (the server keeps running, WAL mode)
with the ``sqlite3`` module, as anyone with file access could. ``audit verify`` must then
exit 3 and name the row and what happened to it. Each tampering is undone afterwards from
a copy of the rows, and the restored log must verify again (so a verifier that failed on
every call would not pass). Failed logins are audited, and neither the admin token nor
the CA passphrase ever reaches an audit row or the server log.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any

import pytest

from tests.conftest import RunningServer

DEVICES = [f"audit-dev-{n}" for n in range(3)]


def flat(text: str) -> str:
    """Rich wraps long lines; compare on single spaces."""
    return " ".join(text.split())


@contextmanager
def database(server: RunningServer) -> Iterator[sqlite3.Connection]:
    """A second connection to the live database file; commits on success."""
    with closing(sqlite3.connect(server.data_dir / "fleetward.db", timeout=30)) as conn:
        conn.row_factory = sqlite3.Row
        with conn:
            yield conn


def tail(server: RunningServer, *args: str) -> list[dict[str, Any]]:
    result = server.cli("audit", "tail", "--json", *args)
    items: list[dict[str, Any]] = json.loads(result.stdout)
    return items


def verify(server: RunningServer) -> subprocess.CompletedProcess[str]:
    return server.cli("audit", "verify", check=False)


def row_count(server: RunningServer) -> int:
    with database(server) as conn:
        return int(conn.execute("SELECT count(*) FROM audit_events").fetchone()[0])


def assert_verifies(server: RunningServer) -> int:
    result = verify(server)
    assert result.returncode == 0, result.stderr
    rows = row_count(server)
    assert f"audit chain OK: {rows} rows verified" in flat(result.stdout)
    return rows


@pytest.fixture(scope="module")
def populated(server: RunningServer) -> RunningServer:
    for device in DEVICES:
        server.cli("device", "add", device, "--type", "default", "--label", "site=lyon")
    return server


def test_untouched_log_verifies_and_tail_lists_newest_last(populated: RunningServer) -> None:
    rows = assert_verifies(populated)
    events = tail(populated, "-n", "5")
    assert len(events) == 5
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(rows - 4, rows + 1)), "not the newest five, oldest first"
    created = [e["target"] for e in events if e["action"] == "device.created"]
    assert created[-len(DEVICES):] == [f"device:{d}" for d in DEVICES]
    assert all({"seq", "at", "actor", "action", "target", "outcome", "details", "hash"} <= e.keys()
               for e in events)


# --- tampering with the file -------------------------------------------------------------


def _edit(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("UPDATE audit_events SET actor = 'operator:nobody' WHERE seq = ?", (seq,))


def _delete(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("DELETE FROM audit_events WHERE seq = ?", (seq,))


def _swap(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("UPDATE audit_events SET seq = -1 WHERE seq = ?", (seq,))
    conn.execute("UPDATE audit_events SET seq = ? WHERE seq = ?", (seq, seq + 1))
    conn.execute("UPDATE audit_events SET seq = ? WHERE seq = -1", (seq + 1,))


def _truncate(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("DELETE FROM audit_events WHERE seq >= ?", (seq,))


def _forge_head(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("UPDATE audit_head SET seq = seq + 1")


TAMPERS: dict[str, tuple[Callable[[sqlite3.Connection, int], None], str, str]] = {
    # name: (what the attacker does to row `seq`, kind reported, which row is named)
    "edited-actor": (_edit, "edited", "middle"),
    "deleted-middle-row": (_delete, "deleted", "middle"),
    "swapped-with-next": (_swap, "reordered", "middle"),
    "cut-off-the-end": (_truncate, "truncated", "last"),
    "head-moved": (_forge_head, "head", "head+1"),
}


@contextmanager
def tampered(server: RunningServer, tamper: Callable[[sqlite3.Connection, int], None],
             seq: int) -> Iterator[None]:
    """Apply ``tamper`` to the live file; put every row back afterwards."""
    with database(server) as conn:
        events = [tuple(r) for r in conn.execute("SELECT * FROM audit_events ORDER BY seq")]
        head = [tuple(r) for r in conn.execute("SELECT * FROM audit_head")]
        columns = len(events[0])
        tamper(conn, seq)
    try:
        yield
    finally:
        with database(server) as conn:
            conn.execute("DELETE FROM audit_events")
            conn.execute("DELETE FROM audit_head")
            conn.executemany(f"INSERT INTO audit_events VALUES ({','.join('?' * columns)})",
                             events)
            conn.executemany("INSERT INTO audit_head VALUES (?, ?, ?, ?)", head)


@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_file_makes_verify_exit_3_naming_row_and_kind(populated: RunningServer,
                                                             case: str) -> None:
    tamper, kind, where = TAMPERS[case]
    rows = row_count(populated)  # the previous case (or the first test) left it verified
    seq = {"middle": rows // 2, "last": rows, "head+1": rows + 1}[where]
    with tampered(populated, tamper, rows // 2 if where == "middle" else rows):
        result = verify(populated)
    assert result.returncode == 3, (result.stdout, result.stderr)
    message = flat(result.stderr)
    assert f"audit chain BROKEN at row {seq} ({kind})" in message, message
    assert "Traceback" not in result.stderr
    assert assert_verifies(populated) == rows  # restored: the same log verifies again


# --- failed logins and secrets -----------------------------------------------------------


def test_failed_admin_login_is_audited_as_a_failure(populated: RunningServer) -> None:
    with populated.admin(token="fwa_x.y") as client:
        assert client.get("/v1/devices").status_code == 401
    events = tail(populated, "-n", "3", "--action", "admin.authentication_failed")
    assert events, "the failed login left no audit event"
    newest = events[-1]
    assert newest["action"] == "admin.authentication_failed"
    assert newest["outcome"] == "failure"
    assert newest["actor"].startswith("remote:")
    assert_verifies(populated)


def test_no_audit_row_or_log_line_holds_the_admin_token_or_ca_passphrase(
        populated: RunningServer) -> None:
    # A near miss of the real token (only the last character differs) must not be recorded
    # either: it would hand most of the secret to anyone who can read the log.
    near_miss = populated.token[:-1] + ("A" if populated.token[-1] != "A" else "B")
    with populated.admin(token=near_miss) as client:
        assert client.get("/v1/devices").status_code == 401
    with populated.admin() as client:  # the real token, used successfully
        assert client.get("/v1/devices").status_code == 200
    passphrase = (populated.data_dir / "secrets" / "ca-passphrase").read_text().strip()
    token_secret = populated.token.partition(".")[2]
    secrets = {"admin token": populated.token, "admin token secret": token_secret,
               "most of the admin token secret": token_secret[:-1], "CA passphrase": passphrase}
    assert all(len(s) >= 16 for s in secrets.values()), "a secret too short to search for"

    with database(populated) as conn:
        audit_dump = "\n".join(" ".join(map(str, r)) for r in conn.execute(
            "SELECT * FROM audit_events"))
    tail_dump = json.dumps(tail(populated, "-n", "1000"))
    server_log = populated.log_file.read_text()
    # Positive controls: what we search really holds the audit trail and the server's log.
    assert "admin.authentication_failed" in audit_dump and "device.created" in tail_dump
    assert "admin.authentication_failed" in server_log
    for where, text in {"audit rows": audit_dump, "audit tail": tail_dump,
                        "server log": server_log}.items():
        for name, secret in secrets.items():
            assert secret not in text, f"the {name} appears in the {where}"
