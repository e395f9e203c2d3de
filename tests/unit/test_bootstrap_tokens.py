"""One-time bootstrap tokens, as an attacker would try them (issue 3 attack table)."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, select, text

from fleetward.enroll import BootstrapRefused, BootstrapTokens
from fleetward.errors import FleetwardError, InvalidInput, NotFound
from fleetward.store import Database
from fleetward.store.db import MIGRATIONS_DIR
from fleetward.store.schema import audit_events, bootstrap_tokens
from tests.conftest import Stack

DAY = dt.timedelta(days=1)


@pytest.fixture
def tokens(stack: Stack) -> BootstrapTokens:
    return BootstrapTokens(stack.db, stack.audit, stack.clock)


def redeem(stack: Stack, tokens: BootstrapTokens, token: str, device_id: str) -> str:
    """Redeem in a transaction of its own, as enrollment will; returns the bound type."""
    try:
        with stack.db.transaction() as conn:
            return tokens.redeem(conn, token, device_id).device_type
    except BootstrapRefused as refused:
        tokens.audit_refusal(refused, device_id, "127.0.0.1")
        raise


def refusal_reasons(stack: Stack) -> list[str]:
    with stack.db.read() as conn:
        rows = conn.execute(select(audit_events.c.details)
                            .where(audit_events.c.action == "bootstrap.token_refused")
                            .order_by(audit_events.c.seq)).scalars().all()
    return [r.split('"reason":"')[1].split('"')[0] for r in rows]


def test_device_token_enrolls_its_device_once(stack: Stack, tokens: BootstrapTokens) -> None:
    stack.add_device("boot-1")
    issued = tokens.issue_for_device("boot-1", DAY, "operator:test")
    assert redeem(stack, tokens, issued.token, "boot-1") == "sensor"
    with pytest.raises(BootstrapRefused, match="already used"):
        redeem(stack, tokens, issued.token, "boot-1")  # replay
    assert refusal_reasons(stack) == ["token already used"]


ATTACKS = [
    ("expired", lambda s, t, tok: (s.clock.advance(DAY + dt.timedelta(seconds=1)), tok)[1],
     "boot-a", "token expired"),
    ("bound-to-another-device", lambda s, t, tok: tok, "boot-other",
     "token is bound to another device"),
    ("wrong-secret", lambda s, t, tok: tok[:-4] + ("AAAA" if not tok.endswith("AAAA") else "BBBB"),
     "boot-a", "unknown or wrong token"),
    ("unknown-id", lambda s, t, tok: "fwb_" + "0" * 16 + tok[20:], "boot-a",
     "unknown or wrong token"),
    ("malformed", lambda s, t, tok: "Basic " + tok, "boot-a", "malformed token"),
    ("revoked", lambda s, t, tok: (t.revoke(tok[4:20], "operator:test"), tok)[1], "boot-a",
     "token revoked"),
]


@pytest.mark.parametrize(("case", "tamper", "device_id", "reason"), ATTACKS,
                         ids=[a[0] for a in ATTACKS])
def test_attacks_are_refused_audited_and_burn_nothing(
        stack: Stack, tokens: BootstrapTokens, case: str, tamper: Callable[..., str],
        device_id: str, reason: str) -> None:
    stack.add_device("boot-a")
    stack.add_device("boot-other")
    issued = tokens.issue_for_device("boot-a", DAY, "operator:test")
    with pytest.raises(BootstrapRefused, match=reason):
        redeem(stack, tokens, tamper(stack, tokens, issued.token), device_id)
    assert refusal_reasons(stack) == [reason]
    with stack.db.read() as conn:
        uses = conn.execute(select(bootstrap_tokens.c.uses)).scalar_one()
    assert uses == 0


def test_batch_token_enrolls_up_to_its_count(stack: Stack, tokens: BootstrapTokens) -> None:
    issued = tokens.issue_batch("sensor", 3, DAY, "operator:test")
    for n in range(3):
        assert redeem(stack, tokens, issued.token, f"batch-{n}") == "sensor"
    with pytest.raises(BootstrapRefused, match="batch is used up"):
        redeem(stack, tokens, issued.token, "batch-3")


def test_a_use_rolls_back_with_the_enrollment_that_failed(stack: Stack,
                                                         tokens: BootstrapTokens) -> None:
    stack.add_device("boot-rb")
    issued = tokens.issue_for_device("boot-rb", DAY, "operator:test")
    with pytest.raises(RuntimeError), stack.db.transaction() as conn:
        tokens.redeem(conn, issued.token, "boot-rb")
        raise RuntimeError("issuance failed after the token was counted")
    assert redeem(stack, tokens, issued.token, "boot-rb") == "sensor"


@pytest.mark.parametrize(("call", "error"), [
    (lambda t: t.issue_for_device("nobody", DAY, "op"), NotFound),
    (lambda t: t.issue_batch("no-such-type", 5, DAY, "op"), NotFound),
    (lambda t: t.issue_batch("sensor", 0, DAY, "op"), InvalidInput),
    (lambda t: t.issue_batch("sensor", 5, dt.timedelta(days=365), "op"), InvalidInput),
    (lambda t: t.issue_batch("sensor", 5, dt.timedelta(seconds=5), "op"), InvalidInput),
], ids=["unknown-device", "unknown-type", "empty-batch", "ttl-too-long", "ttl-too-short"])
def test_bad_issue_requests_are_refused_with_a_hint(
        tokens: BootstrapTokens, call: Callable[[BootstrapTokens], object],
        error: type[FleetwardError]) -> None:
    with pytest.raises(error) as caught:
        call(tokens)
    assert caught.value.hint


def test_fifty_concurrent_uses_of_one_single_use_token_succeed_once(
        stack: Stack, tokens: BootstrapTokens) -> None:
    stack.add_device("boot-race")
    issued = tokens.issue_for_device("boot-race", DAY, "operator:test")
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(50)

    def attempt() -> None:
        start.wait()
        try:
            with stack.db.transaction() as conn:
                tokens.redeem(conn, issued.token, "boot-race")
            result = "ok"
        except BootstrapRefused as refused:
            result = refused.reason
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=attempt) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes.count("ok") == 1
    assert outcomes.count("token already used") == 49
    with stack.db.read() as conn:
        assert conn.execute(select(bootstrap_tokens.c.uses)).scalar_one() == 1
        assert stack.audit.verify(conn).ok


def test_only_the_hash_of_the_secret_is_stored(stack: Stack, tokens: BootstrapTokens) -> None:
    stack.add_device("boot-h")
    issued = tokens.issue_for_device("boot-h", DAY, "operator:test")
    secret = issued.token.split(".", 1)[1]
    with stack.db.read() as conn:
        cells = [str(v) for row in conn.execute(select(bootstrap_tokens)) for v in row]
        cells += [str(v) for row in conn.execute(select(audit_events)) for v in row]
    assert not any(secret in cell for cell in cells)
    assert any(issued.token_id in cell for cell in cells)  # the search can find things


def test_migrations_upgrade_a_0001_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db = Database(url)
    with db.engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    db.migrate()
    db.dispose()
    engine = create_engine(url)
    with engine.connect() as conn:
        head = ScriptDirectory.from_config(cfg).get_current_head()
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
        assert conn.execute(text("SELECT count(*) FROM bootstrap_tokens")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM oem_bindings")).scalar() == 0
        for table in ("policies", "policy_attachments", "device_messages", "device_commands"):
            assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0
    engine.dispose()
