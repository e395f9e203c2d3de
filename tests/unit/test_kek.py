"""Key-encryption keys and data keys, as an attacker with the database would try them.

Threats: a wrapped data key or an encrypted secret that is altered, truncated, moved to
another row or unwrapped with another KEK and yields *something* instead of an error; a
KEK file that others can read, or that is silently replaced; two nodes starting at once
and each keeping a data key of its own (half the fleet's keys would then not decrypt on
the other node); a token KEK that can be read or wrapped off the token, or a planted
exportable key under our label that is used anyway.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from sqlalchemy import func, select, update

from fleetward.clock import FrozenClock
from fleetward.crypto import pkcs11 as p11
from fleetward.crypto.kek import (
    KEY_BYTES,
    NONCE_BYTES,
    WRAP_AAD,
    DataKey,
    DecryptionRefused,
    FileKek,
    KeyEncryptionKey,
    Pkcs11Kek,
)
from fleetward.errors import ConfigurationError, KeyUnavailable
from fleetward.store import Database
from fleetward.store.schema import data_keys
from fleetward.tokens.credentials import load_data_key
from tests.softhsm import SOFTHSM_MODULE as MODULE
from tests.softhsm import softhsm_tokens

DEK = bytes(range(32))


@pytest.fixture
def kek_path(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "credential-kek"


@pytest.fixture
def kek(kek_path: Path) -> FileKek:
    return FileKek.load_or_create(kek_path)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.migrate()
    yield database
    database.dispose()


def flipped(blob: bytes, index: int) -> bytes:
    altered = bytearray(blob)
    altered[index] ^= 0x01
    return bytes(altered)


# Where a bit is flipped: the nonce, the ciphertext, the tag (last byte).
POSITIONS = {"nonce": 0, "ciphertext": NONCE_BYTES + 3, "tag": -1}


# --- the file KEK ------------------------------------------------------------------------


def test_file_kek_is_created_private_and_reloaded(kek_path: Path, kek: FileKek) -> None:
    assert stat.S_IMODE(kek_path.stat().st_mode) == 0o600
    text = kek_path.read_text()
    assert len(text.strip()) == 2 * KEY_BYTES and int(text, 16) >= 0
    again = FileKek.load_or_create(kek_path)
    assert kek_path.read_text() == text, "an existing KEK file was rewritten"
    assert again.unwrap(kek.wrap(DEK)) == DEK


def test_file_kek_never_shows_its_key(kek_path: Path, kek: FileKek) -> None:
    key_hex = kek_path.read_text().strip()
    for shown in (repr(kek), str(kek.kek_ref)):
        assert key_hex not in shown
    assert kek.kek_ref == {"backend": "file", "path": str(kek_path)}


def test_wrapping_twice_gives_different_blobs(kek: FileKek) -> None:
    first, second = kek.wrap(DEK), kek.wrap(DEK)
    assert first != second, "nonce reused"
    assert DEK not in first
    assert kek.unwrap(first) == kek.unwrap(second) == DEK


@pytest.mark.parametrize("index", POSITIONS.values(), ids=POSITIONS.keys())
def test_altered_wrapped_key_is_refused(kek: FileKek, index: int) -> None:
    wrapped = kek.wrap(DEK)
    assert kek.unwrap(wrapped) == DEK  # control: the unaltered blob unwraps
    with pytest.raises(KeyUnavailable, match="does not unwrap"):
        kek.unwrap(flipped(wrapped, index))


@pytest.mark.parametrize("length", [0, NONCE_BYTES, NONCE_BYTES + 15, 59])
def test_truncated_wrapped_key_is_refused(kek: FileKek, length: int) -> None:
    with pytest.raises(KeyUnavailable):
        kek.unwrap(kek.wrap(DEK)[:length])


def test_another_kek_cannot_unwrap(kek: FileKek, tmp_path: Path) -> None:
    other = FileKek.load_or_create(tmp_path / "other-kek")
    with pytest.raises(KeyUnavailable, match="does not unwrap"):
        other.unwrap(kek.wrap(DEK))


def test_blob_encrypted_under_the_kek_for_another_purpose_is_refused(
        kek_path: Path, kek: FileKek) -> None:
    # Same KEK, same algorithm, other associated data: not a wrapped data key.
    raw = bytes.fromhex(kek_path.read_text())
    nonce = os.urandom(NONCE_BYTES)
    foreign = nonce + AESGCM(raw).encrypt(nonce, DEK, b"something else")
    control = nonce + AESGCM(raw).encrypt(nonce, DEK, WRAP_AAD)
    assert kek.unwrap(control) == DEK
    with pytest.raises(KeyUnavailable):
        kek.unwrap(foreign)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_kek_file_others_can_read_is_refused(kek_path: Path, kek: FileKek, mode: int) -> None:
    kek_path.chmod(mode)
    with pytest.raises(ConfigurationError, match="other users") as refused:
        FileKek.load_or_create(kek_path)
    assert "chmod 600" in refused.value.hint


@pytest.mark.parametrize("content", [b"", b"zz" * 32, b"ab" * 31, b"ab" * 33, b"\xff" * 64])
def test_malformed_kek_file_is_refused(kek_path: Path, content: bytes) -> None:
    kek_path.parent.mkdir(parents=True)
    kek_path.write_bytes(content)
    kek_path.chmod(0o600)
    with pytest.raises(ConfigurationError, match="hex characters"):
        FileKek.load_or_create(kek_path)


# --- data keys -----------------------------------------------------------------------------


def test_data_key_round_trip_and_fresh_nonces() -> None:
    key = DataKey(secrets.token_bytes(KEY_BYTES))
    first, second = key.encrypt(b"device secret", b"a|b|c"), key.encrypt(b"device secret",
                                                                          b"a|b|c")
    assert first != second
    assert key.decrypt(first, b"a|b|c") == key.decrypt(second, b"a|b|c") == b"device secret"
    assert repr(key) == "DataKey('device-credentials')"


@pytest.mark.parametrize("index", POSITIONS.values(), ids=POSITIONS.keys())
def test_altered_ciphertext_is_refused(index: int) -> None:
    key = DataKey(secrets.token_bytes(KEY_BYTES))
    blob = key.encrypt(b"device secret", b"aad")
    with pytest.raises(DecryptionRefused):
        key.decrypt(flipped(blob, index), b"aad")


def test_ciphertext_with_other_associated_data_is_refused() -> None:
    key = DataKey(secrets.token_bytes(KEY_BYTES))
    blob = key.encrypt(b"device secret", b"sk_1|dev-a|primary")
    for other in (b"sk_1|dev-b|primary", b"sk_1|dev-a|secondary", b""):
        with pytest.raises(DecryptionRefused):
            key.decrypt(blob, other)


def test_ciphertext_of_another_data_key_or_truncated_is_refused() -> None:
    key, other = DataKey(secrets.token_bytes(KEY_BYTES)), DataKey(secrets.token_bytes(KEY_BYTES))
    blob = key.encrypt(b"device secret", b"aad")
    with pytest.raises(DecryptionRefused):
        other.decrypt(blob, b"aad")
    with pytest.raises(DecryptionRefused):
        key.decrypt(blob[:NONCE_BYTES + 15], b"aad")


def test_data_key_must_be_256_bits() -> None:
    with pytest.raises(KeyUnavailable):
        DataKey(b"short")


# --- the data key in the database -----------------------------------------------------------


def stored_row(db: Database) -> Any:
    with db.read() as conn:
        return conn.execute(select(data_keys)).one()._mapping


def test_data_key_is_created_once_and_stored_only_wrapped(
        db: Database, kek: FileKek, clock: FrozenClock) -> None:
    first = load_data_key(db, kek, clock=clock)
    blob = first.encrypt(b"device secret", b"aad")
    second = load_data_key(db, kek, clock=clock)
    assert second.decrypt(blob, b"aad") == b"device secret", "a second data key was made"

    row = stored_row(db)
    assert row["name"] == "device-credentials"
    assert row["kek_ref"] == kek.kek_ref
    wrapped = bytes(row["wrapped_key"])
    dek = kek.unwrap(wrapped)
    assert DataKey(dek).decrypt(blob, b"aad") == b"device secret"  # it is the data key
    assert dek not in wrapped and dek.hex() not in wrapped.hex()


def test_data_key_wrapped_by_another_kek_is_refused(db: Database, kek: FileKek,
                                                    tmp_path: Path, clock: FrozenClock) -> None:
    load_data_key(db, kek, clock=clock)
    other = FileKek.load_or_create(tmp_path / "node-2-kek")
    with pytest.raises(KeyUnavailable) as refused:
        load_data_key(db, other, clock=clock)
    assert str(kek.kek_ref["path"]) in refused.value.message  # names the KEK that wrapped it
    assert "same KEK" in refused.value.hint


def test_altered_data_key_row_is_refused(db: Database, kek: FileKek, clock: FrozenClock) -> None:
    load_data_key(db, kek, clock=clock)
    wrapped = bytes(stored_row(db)["wrapped_key"])
    with db.transaction() as conn:
        conn.execute(update(data_keys).values(wrapped_key=flipped(wrapped, NONCE_BYTES + 1)))
    with pytest.raises(KeyUnavailable):
        load_data_key(db, kek, clock=clock)


class RacingKek:
    """A KEK during whose first wrap another node creates the data key first."""

    def __init__(self, inner: KeyEncryptionKey, other_node: Database, clock: FrozenClock) -> None:
        self.inner = inner
        self.other_node = other_node
        self.clock = clock
        self.winner: DataKey | None = None

    @property
    def kek_ref(self) -> dict[str, str]:
        return self.inner.kek_ref

    def wrap(self, key: bytes) -> bytes:
        if self.winner is None:
            self.winner = load_data_key(self.other_node, self.inner, clock=self.clock)
        return self.inner.wrap(key)

    def unwrap(self, wrapped: bytes) -> bytes:
        return self.inner.unwrap(wrapped)


def test_nodes_creating_the_data_key_at_once_share_one(db: Database, db_url: str,
                                                       kek: FileKek, clock: FrozenClock) -> None:
    other_node = Database(db_url)
    try:
        racing = RacingKek(kek, other_node, clock)
        ours = load_data_key(db, racing, clock=clock)
    finally:
        other_node.dispose()
    assert racing.winner is not None, "the race was not staged"
    blob = racing.winner.encrypt(b"device secret", b"aad")
    assert ours.decrypt(blob, b"aad") == b"device secret", "two data keys in one cluster"
    with db.read() as conn:
        assert conn.execute(select(func.count()).select_from(data_keys)).scalar_one() == 1


# --- the PKCS#11 KEK (SoftHSM2) ------------------------------------------------------------

# One token per test that logs in differently (a logged-in session is cached per token).
TOKENS = ("fw-kek", "fw-kek-planted", "fw-kek-pin")


@dataclass(frozen=True)
class SoftHsm:
    pin: str

    def kek(self, token: str, pin: str | None = None) -> Pkcs11Kek:
        return Pkcs11Kek.open_or_create(MODULE, token, self.pin if pin is None else pin)


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """A SoftHSM2 token directory with this module's tokens (tests/integration/
    test_pkcs11_ca.py explains why every token is initialised up front)."""
    with softhsm_tokens(tmp_path_factory.mktemp("softhsm-kek"), TOKENS) as tokens:
        yield SoftHsm(pin=tokens.pin)


@pytest.fixture(scope="module")
def token_kek(softhsm: SoftHsm) -> Pkcs11Kek:
    return softhsm.kek("fw-kek")


# (attribute, what the KEK must say, what an exportable control key says)
KEK_ATTRIBUTES = [
    (Attribute.SENSITIVE, True, False),
    (Attribute.EXTRACTABLE, False, True),
    (Attribute.NEVER_EXTRACTABLE, True, False),
    (Attribute.ALWAYS_SENSITIVE, True, False),
    (Attribute.WRAP, False, True),
    (Attribute.UNWRAP, False, True),
    (Attribute.DERIVE, False, True),
    (Attribute.MODIFIABLE, False, True),
]


@pytest.fixture(scope="module")
def exportable_key(token_kek: Pkcs11Kek) -> Any:
    """An AES key made on the same session with export allowed: the checks' control."""
    session = token_kek.token_key.session
    return session.generate_key(
        KeyType.AES, 256, label="exportable-control", store=False,
        template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True,
                  Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.DERIVE: True,
                  Attribute.ENCRYPT: True, Attribute.DECRYPT: True})


@pytest.mark.softhsm
@pytest.mark.parametrize(("attribute", "kek_value", "control_value"), KEK_ATTRIBUTES,
                         ids=[a.name for a, _, _ in KEK_ATTRIBUTES])
def test_token_kek_is_unexportable(token_kek: Pkcs11Kek, exportable_key: Any,
                                   attribute: Attribute, kek_value: bool,
                                   control_value: bool) -> None:
    assert token_kek.token_key[attribute] is kek_value
    assert exportable_key[attribute] is control_value


@pytest.mark.softhsm
def test_token_refuses_to_reveal_or_wrap_the_kek(token_kek: Pkcs11Kek,
                                                 exportable_key: Any) -> None:
    key: Any = token_kek.token_key
    assert key[Attribute.KEY_TYPE] == KeyType.AES and key[Attribute.VALUE_LEN] == KEY_BYTES
    with pytest.raises(pkcs11.AttributeSensitive):
        _ = key[Attribute.VALUE]
    with pytest.raises(pkcs11.KeyUnextractable):
        exportable_key.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    # Control: the same wrapping works on an exportable key, so the refusal is the KEK's.
    session = key.session
    victim = session.generate_key(KeyType.AES, 256, store=False,
                                  template={Attribute.EXTRACTABLE: True})
    assert len(exportable_key.wrap_key(victim, mechanism=Mechanism.AES_KEY_WRAP_PAD)) > 32


@pytest.mark.softhsm
def test_token_kek_round_trips_and_is_found_again(softhsm: SoftHsm,
                                                  token_kek: Pkcs11Kek) -> None:
    wrapped = token_kek.wrap(DEK)
    assert DEK not in wrapped and wrapped != token_kek.wrap(DEK)
    again = softhsm.kek("fw-kek")
    assert again.unwrap(wrapped) == DEK
    session: Any = token_kek.token_key.session
    labelled = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                         Attribute.LABEL: "fleetward-credential-kek"}))
    assert len(labelled) == 1, "opening the KEK again made a second key"
    assert token_kek.kek_ref == {"backend": "pkcs11", "module": MODULE, "token_label": "fw-kek",
                                 "key_label": "fleetward-credential-kek"}
    assert softhsm.pin not in repr(token_kek) + str(token_kek.kek_ref)


@pytest.mark.softhsm
@pytest.mark.parametrize("index", POSITIONS.values(), ids=POSITIONS.keys())
def test_token_kek_refuses_altered_blobs(token_kek: Pkcs11Kek, index: int) -> None:
    wrapped = token_kek.wrap(DEK)
    with pytest.raises(KeyUnavailable, match="does not unwrap"):
        token_kek.unwrap(flipped(wrapped, index))
    assert token_kek.unwrap(wrapped) == DEK  # the session still works after a refusal


@pytest.mark.softhsm
def test_token_kek_and_file_kek_do_not_unwrap_each_other(token_kek: Pkcs11Kek,
                                                         kek: FileKek) -> None:
    with pytest.raises(KeyUnavailable):
        token_kek.unwrap(kek.wrap(DEK))
    with pytest.raises(KeyUnavailable):
        kek.unwrap(token_kek.wrap(DEK))


@pytest.mark.softhsm
def test_data_key_under_the_token_kek(token_kek: Pkcs11Kek, sqlite_url: str,
                                      clock: FrozenClock) -> None:
    db = Database(sqlite_url)
    db.migrate()
    try:
        first = load_data_key(db, token_kek, clock=clock)
        blob = first.encrypt(b"device secret", b"aad")
        assert load_data_key(db, token_kek, clock=clock).decrypt(blob, b"aad") \
            == b"device secret"
        assert stored_row(db)["kek_ref"]["backend"] == "pkcs11"
    finally:
        db.dispose()


# A key someone else made under the label, right in every attribute but one.
PLANTED = {
    "readable": {Attribute.SENSITIVE: False},
    "extractable": {Attribute.EXTRACTABLE: True},
    "wrapping": {Attribute.WRAP: True},
    "modifiable": {Attribute.MODIFIABLE: True},
}


@pytest.mark.softhsm
@pytest.mark.parametrize("override", PLANTED.values(), ids=PLANTED.keys())
def test_planted_key_under_our_label_is_refused(softhsm: SoftHsm,
                                                override: dict[Attribute, bool]) -> None:
    label = f"planted-{secrets.token_hex(4)}"
    session, _lock = p11._open_session(MODULE, "fw-kek-planted", softhsm.pin)
    session.generate_key(KeyType.AES, 256, label=label, store=True,
                         template={**p11.SECRET_KEY_TEMPLATE, **p11.LOCKED_TEMPLATE, **override})
    (attribute,) = override
    with pytest.raises(ConfigurationError, match=f"has {attribute.name} = "):
        Pkcs11Kek.open_or_create(MODULE, "fw-kek-planted", softhsm.pin, key_label=label)


@pytest.mark.softhsm
def test_control_a_key_made_as_we_make_it_is_accepted(softhsm: SoftHsm) -> None:
    label = f"made-alike-{secrets.token_hex(4)}"
    session, _lock = p11._open_session(MODULE, "fw-kek-planted", softhsm.pin)
    session.generate_key(KeyType.AES, 256, label=label, store=True,
                         template={**p11.SECRET_KEY_TEMPLATE, **p11.LOCKED_TEMPLATE})
    kek = Pkcs11Kek.open_or_create(MODULE, "fw-kek-planted", softhsm.pin, key_label=label)
    assert kek.unwrap(kek.wrap(DEK)) == DEK


@pytest.mark.softhsm
def test_token_kek_with_a_wrong_pin_is_refused(softhsm: SoftHsm) -> None:
    with pytest.raises(KeyUnavailable, match="cannot log in"):
        softhsm.kek("fw-kek-pin", pin="0000")
    softhsm.kek("fw-kek-pin")  # control: the right PIN opens it
    with pytest.raises(KeyUnavailable, match="PIN differs"):
        softhsm.kek("fw-kek-pin", pin="0000")
