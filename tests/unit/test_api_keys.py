"""API keys, as an attacker holding an old, guessed or malformed key would try them.

Threats: a key stored (or logged, audited, echoed in an error) in the clear; a guessed or
malformed key reaching the database or the hash; an old secret that outlives its grace
period, a revoked or expired key that still works; a key used for a scope it was not
given; an unknown scope granted because nobody checked.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable

import pytest
from sqlalchemy import select

from fleetward.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from fleetward.store import api_keys as key_rows
from fleetward.store.schema import api_keys, audit_events, metadata
from fleetward.tokens.api_keys import (
    API_KEY_CREATED,
    API_KEY_REVOKED,
    API_KEY_ROTATED,
    API_KEY_SCOPES,
    MAX_GRACE,
    ApiKeyRefused,
    ApiKeyScopeRefused,
    ApiKeyService,
    NewApiKey,
)
from tests.conftest import Stack

ACTOR = "operator:test"
SCOPE = "tokens:introspect"
HOUR = dt.timedelta(hours=1)
KEY_SHAPE = re.compile(r"fwk_([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")


@pytest.fixture
def keys(stack: Stack) -> ApiKeyService:
    return ApiKeyService(stack.db, stack.audit, stack.clock)


@pytest.fixture
def key(keys: ApiKeyService) -> NewApiKey:
    return keys.create("billing gateway", [SCOPE], ACTOR)


def secret_of(new: NewApiKey) -> str:
    return new.key.partition(".")[2]


def refused(keys: ApiKeyService, presented: str, scope: str = SCOPE) -> ApiKeyRefused:
    with pytest.raises(ApiKeyRefused) as caught:
        keys.authenticate(presented, scope)
    assert isinstance(caught.value, Unauthenticated)
    return caught.value


def everything_stored(stack: Stack) -> str:
    with stack.db.read() as conn:
        return "\n".join(str(tuple(row)) for table in metadata.sorted_tables
                         for row in conn.execute(select(table)))


def test_key_has_our_shape_and_authenticates(keys: ApiKeyService, key: NewApiKey) -> None:
    match = KEY_SHAPE.fullmatch(key.key)
    assert match is not None and match.group(1) == key.key_id
    info = keys.authenticate(key.key, SCOPE)
    assert (info.key_id, info.name, info.scopes) == (key.key_id, "billing gateway", (SCOPE,))


def test_secret_is_stored_hashed_and_never_shown(stack: Stack, keys: ApiKeyService,
                                                 key: NewApiKey) -> None:
    rotated = keys.rotate(key.key_id, ACTOR, grace=HOUR)
    stored = everything_stored(stack)
    assert key.key_id in stored  # control: the scan sees the row
    for new in (key, rotated):
        assert secret_of(new) not in stored and new.key not in stored
        assert new.key not in repr(new)
    with stack.db.read() as conn:
        row = key_rows.get_key(conn, key.key_id)
    assert row is not None
    shown = json.dumps([keys.get(key.key_id).to_json(), [k.to_json() for k in keys.list()]])
    for secret in (secret_of(key), secret_of(rotated), row.secret_sha256,
                   row.previous_secret_sha256 or "unset"):
        assert secret not in shown


def test_changes_are_audited_against_the_key(stack: Stack, keys: ApiKeyService,
                                             key: NewApiKey) -> None:
    rotated = keys.rotate(key.key_id, ACTOR, grace=HOUR)
    keys.revoke(key.key_id, ACTOR)
    with stack.db.read() as conn:
        rows = list(conn.execute(select(audit_events).where(audit_events.c.action.in_(
            [API_KEY_CREATED, API_KEY_ROTATED, API_KEY_REVOKED])).order_by(audit_events.c.seq))
            .mappings())
    assert [r["action"] for r in rows] == [API_KEY_CREATED, API_KEY_ROTATED, API_KEY_REVOKED]
    assert {r["target"] for r in rows} == {f"api_key:{key.key_id}"}
    assert json.loads(rows[0]["details"])["scopes"] == [SCOPE]
    assert json.loads(rows[1]["details"])["grace_seconds"] == 3600
    for row in rows:
        assert secret_of(key) not in row["details"] and secret_of(rotated) not in row["details"]


# --- what authenticate refuses ------------------------------------------------------------

MALFORMED = {
    "empty": "",
    "bootstrap-token-prefix": "fwb_0123456789abcdef." + "A" * 43,
    "short-secret": "fwk_0123456789abcdef." + "A" * 42,
    "long-secret": "fwk_0123456789abcdef." + "A" * 44,
    "upper-case-id": "fwk_0123456789ABCDEF." + "A" * 43,
    "trailing-newline": "fwk_0123456789abcdef." + "A" * 43 + "\n",
    "non-ascii": "fwk_0123456789abcdef." + "\u00c5" * 43,
    "padding": "fwk_0123456789abcdef." + "A" * 42 + "=",
    "sql": "fwk_' OR 1=1 --",
}


class UnreachableDatabase:
    """Any use fails the test: proves a refusal was decided without a lookup."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the database was used ({name}) for a malformed key")


@pytest.mark.parametrize("presented", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_key_is_refused_before_any_lookup(stack: Stack, presented: str) -> None:
    keys = ApiKeyService(UnreachableDatabase(), stack.audit, stack.clock)  # type: ignore[arg-type]
    refusal = refused(keys, presented)
    assert refusal.key_id is None and refusal.reason == "malformed API key"


def test_control_a_well_formed_key_is_looked_up(stack: Stack) -> None:
    keys = ApiKeyService(UnreachableDatabase(), stack.audit, stack.clock)  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="database was used"):
        keys.authenticate("fwk_0123456789abcdef." + "A" * 43, SCOPE)


def test_non_string_is_refused(keys: ApiKeyService) -> None:
    with pytest.raises(ApiKeyRefused):
        keys.authenticate(b"fwk_0123456789abcdef." + b"A" * 43, SCOPE)  # type: ignore[arg-type]


def test_unknown_id_with_our_shape_is_refused_and_named(keys: ApiKeyService,
                                                        key: NewApiKey) -> None:
    presented = "fwk_0123456789abcdef." + secret_of(key)
    refusal = refused(keys, presented)
    assert refusal.key_id == "0123456789abcdef"
    assert refusal.reason == "unknown or wrong API key"


def test_wrong_secret_is_refused(keys: ApiKeyService, key: NewApiKey) -> None:
    other = keys.create("other", [SCOPE], ACTOR)
    refusal = refused(keys, f"fwk_{key.key_id}.{secret_of(other)}")
    assert refusal.key_id == key.key_id
    # The same words as for an unknown id: the answer does not say which ids exist.
    assert refusal.message == refused(keys, "fwk_0123456789abcdef." + secret_of(key)).message


def test_expired_key_is_refused(stack: Stack, keys: ApiKeyService) -> None:
    new = keys.create("short-lived", [SCOPE], ACTOR, ttl=HOUR)
    stack.clock.advance(HOUR - dt.timedelta(seconds=1))
    keys.authenticate(new.key, SCOPE)  # control: still valid a second before
    stack.clock.advance(dt.timedelta(seconds=1))
    assert refused(keys, new.key).reason == "API key expired"
    with pytest.raises(Conflict, match="expired"):
        keys.rotate(new.key_id, ACTOR)


def test_revoked_key_is_refused(keys: ApiKeyService, key: NewApiKey) -> None:
    info = keys.revoke(key.key_id, ACTOR)
    assert info.revoked_at is not None
    assert refused(keys, key.key).reason == "API key revoked"
    with pytest.raises(Conflict, match="already revoked"):
        keys.revoke(key.key_id, ACTOR)
    with pytest.raises(Conflict, match="revoked"):
        keys.rotate(key.key_id, ACTOR)


def test_key_without_the_scope_is_forbidden(stack: Stack, keys: ApiKeyService,
                                            key: NewApiKey) -> None:
    # Only one scope exists today, so a narrower key is written as a row directly.
    with stack.db.transaction() as conn:
        row = key_rows.get_key(conn, key.key_id)
        assert row is not None
        conn.execute(api_keys.delete())
        key_rows.insert_key(conn, key_rows.ApiKeyRow(**{
            **{name: getattr(row, name) for name in key_rows.ApiKeyRow.__slots__},
            "scopes": ("telemetry:read",)}))
    with pytest.raises(ApiKeyScopeRefused) as caught:
        keys.authenticate(key.key, SCOPE)
    assert isinstance(caught.value, Forbidden) and caught.value.key_id == key.key_id
    # Wrong secrets are still 401, not 403: only a holder of the key learns its scopes.
    refused(keys, f"fwk_{key.key_id}.{'A' * 43}")


def test_route_scope_must_be_an_api_key_scope(keys: ApiKeyService, key: NewApiKey) -> None:
    with pytest.raises(ValueError, match="not an API key scope"):
        keys.authenticate(key.key, "telemetry:write")


def test_refusals_never_contain_the_secret(stack: Stack, keys: ApiKeyService,
                                           key: NewApiKey) -> None:
    wrong = f"fwk_{key.key_id}.{'B' * 43}"
    attempts = [wrong, "fwk_0123456789abcdef." + secret_of(key), key.key[:-1]]
    keys.revoke(key.key_id, ACTOR)
    attempts.append(key.key)
    for presented in attempts:
        refusal = refused(keys, presented)
        text = " ".join([str(refusal), refusal.message, refusal.hint, repr(refusal),
                         json.dumps(refusal.to_problem())])
        assert presented.partition(".")[2] not in text and secret_of(key) not in text


# --- rotation and its grace period -----------------------------------------------------------


def test_previous_secret_works_during_the_grace_period_only(
        stack: Stack, keys: ApiKeyService, key: NewApiKey) -> None:
    rotated = keys.rotate(key.key_id, ACTOR, grace=HOUR)
    assert rotated.key_id == key.key_id and rotated.key != key.key
    assert rotated.info.previous_valid_until == stack.clock.now() + HOUR
    keys.authenticate(key.key, SCOPE)
    keys.authenticate(rotated.key, SCOPE)
    stack.clock.advance(HOUR - dt.timedelta(seconds=1))
    keys.authenticate(key.key, SCOPE)
    stack.clock.advance(dt.timedelta(seconds=1))
    refusal = refused(keys, key.key)
    assert refusal.reason == "previous secret after its grace period"
    keys.authenticate(rotated.key, SCOPE)


def test_rotation_without_grace_ends_the_old_secret_at_once(
        keys: ApiKeyService, key: NewApiKey) -> None:
    rotated = keys.rotate(key.key_id, ACTOR, grace=dt.timedelta(0))
    assert refused(keys, key.key).key_id == key.key_id
    keys.authenticate(rotated.key, SCOPE)


def test_second_rotation_ends_the_first_previous_secret(keys: ApiKeyService,
                                                        key: NewApiKey) -> None:
    second = keys.rotate(key.key_id, ACTOR, grace=HOUR)
    third = keys.rotate(key.key_id, ACTOR, grace=HOUR)
    refused(keys, key.key)
    keys.authenticate(second.key, SCOPE)
    keys.authenticate(third.key, SCOPE)


def test_revocation_ends_the_previous_secret_too(keys: ApiKeyService, key: NewApiKey) -> None:
    rotated = keys.rotate(key.key_id, ACTOR, grace=HOUR)
    keys.revoke(key.key_id, ACTOR)
    assert refused(keys, key.key).key_id == key.key_id
    assert refused(keys, rotated.key).reason == "API key revoked"


@pytest.mark.parametrize("grace", [-dt.timedelta(seconds=1), MAX_GRACE + dt.timedelta(seconds=1)])
def test_grace_out_of_range_is_refused(keys: ApiKeyService, key: NewApiKey,
                                       grace: dt.timedelta) -> None:
    with pytest.raises(InvalidInput, match="grace"):
        keys.rotate(key.key_id, ACTOR, grace=grace)
    keys.authenticate(key.key, SCOPE)  # nothing changed


# --- creating ------------------------------------------------------------------------------

BAD_CREATES: dict[str, Callable[[ApiKeyService], object]] = {
    "unknown-scope": lambda k: k.create("x", [SCOPE, "admin"], ACTOR),
    "no-scope": lambda k: k.create("x", [], ACTOR),
    "empty-name": lambda k: k.create("", [SCOPE], ACTOR),
    "long-name": lambda k: k.create("n" * 129, [SCOPE], ACTOR),
    "control-character-name": lambda k: k.create("evil\x1b[2J", [SCOPE], ACTOR),
    "ttl-too-short": lambda k: k.create("x", [SCOPE], ACTOR, ttl=dt.timedelta(seconds=59)),
    "ttl-too-long": lambda k: k.create("x", [SCOPE], ACTOR, ttl=dt.timedelta(days=731)),
}


@pytest.mark.parametrize("create", BAD_CREATES.values(), ids=BAD_CREATES.keys())
def test_bad_create_is_refused(stack: Stack, keys: ApiKeyService,
                               create: Callable[[ApiKeyService], object]) -> None:
    with pytest.raises(InvalidInput):
        create(keys)
    assert keys.list() == []


def test_unknown_scope_names_the_known_ones(keys: ApiKeyService) -> None:
    with pytest.raises(InvalidInput) as caught:
        keys.create("x", ["tokens:introspect", "tokens:issue"], ACTOR)
    assert "'tokens:issue'" in caught.value.message
    assert all(scope in caught.value.hint for scope in API_KEY_SCOPES)
    assert caught.value.to_problem()["scopes"] == list(API_KEY_SCOPES)


def test_scopes_given_as_text_or_repeated(keys: ApiKeyService) -> None:
    assert keys.create("a", SCOPE, ACTOR).info.scopes == (SCOPE,)
    assert keys.create("b", [SCOPE, SCOPE], ACTOR).info.scopes == (SCOPE,)


def test_get_and_list(stack: Stack, keys: ApiKeyService, key: NewApiKey) -> None:
    stack.clock.advance(dt.timedelta(seconds=1))  # listed oldest first
    later = keys.create("later", [SCOPE], "operator:other", ttl=HOUR)
    assert [k.key_id for k in keys.list()] == [key.key_id, later.key_id]
    info = keys.get(later.key_id)
    assert info.created_by == "operator:other"
    assert info.to_json()["expires_at"] == (stack.clock.now() + HOUR).isoformat()
    with pytest.raises(NotFound):
        keys.get("0123456789abcdef")
    with pytest.raises(InvalidInput):
        keys.get("fwk_" + key.key_id)
    with pytest.raises(NotFound):
        keys.rotate("0123456789abcdef", ACTOR)
    with pytest.raises(NotFound):
        keys.revoke("0123456789abcdef", ACTOR)
