"""Symmetric device keys and registered public keys, as an attacker (or a careless
operator) would try them.

Threats: a device key readable from the database, the audit log, a log line or a repr; an
encrypted key copied into another device's row (or another slot) and then accepted for
that device; a regenerated key that keeps working; a second live symmetric credential or
a duplicated public key (one key, two identities); new key material for a compromised or
retired device; a public key of the wrong kind (RSA, another curve, a private key).
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from sqlalchemy import select, update

from fleetward.crypto.jose import b64url, key_thumbprint
from fleetward.crypto.kek import FileKek
from fleetward.crypto.sas import check_sas, parse_sas, sign_sas
from fleetward.edge import gate
from fleetward.errors import Conflict, FleetwardError, InvalidInput, NotFound, PolicyViolation
from fleetward.model import LifecycleState
from fleetward.store import devices as device_rows
from fleetward.store.schema import audit_events, device_credentials, metadata
from fleetward.tokens.credentials import (
    CREDENTIAL_ADDED,
    CREDENTIAL_REVOKED,
    CREDENTIAL_ROTATED,
    MAX_PUBLIC_KEYS_PER_DEVICE,
    DeviceCredentialService,
    DeviceSecrets,
    NewSymmetricCredential,
    load_data_key,
)
from tests.conftest import Stack

ACTOR = "operator:test"
SPKI = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo


@pytest.fixture
def service(stack: Stack, tmp_path: Path) -> DeviceCredentialService:
    kek = FileKek.load_or_create(tmp_path / "secrets" / "credential-kek")
    data_key = load_data_key(stack.db, kek, clock=stack.clock)
    return DeviceCredentialService(stack.db, stack.audit, stack.clock, data_key)


@pytest.fixture
def device(stack: Stack) -> str:
    stack.add_device("dev-a")
    return "dev-a"


def raw(credential: NewSymmetricCredential) -> tuple[bytes, bytes]:
    return (base64.b64decode(credential.primary_key, validate=True),
            base64.b64decode(credential.secondary_key, validate=True))


def loaded(stack: Stack, service: DeviceCredentialService, device_id: str) -> DeviceSecrets | None:
    with stack.db.read() as conn:
        return service.load_device(conn, device_id)


def load_all(stack: Stack, service: DeviceCredentialService) -> dict[str, DeviceSecrets]:
    with stack.db.read() as conn:
        return service.load_all(conn)


def audit_rows(stack: Stack, action: str) -> list[Any]:
    with stack.db.read() as conn:
        return list(conn.execute(select(audit_events).where(audit_events.c.action == action)
                                 .order_by(audit_events.c.seq)).mappings())


def spellings(key: bytes) -> list[bytes]:
    """Every form a leaked key could take in storage or text."""
    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key),
            b64url(key).encode()]


def database_contents(stack: Stack) -> bytes:
    """Every value of every table, and for SQLite the database and WAL file bytes."""
    parts: list[bytes] = []
    with stack.db.read() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(select(table)):
                for value in row:
                    parts.append(bytes(value) if isinstance(value, bytes | memoryview)
                                 else str(value).encode())
    if stack.db.dialect == "sqlite":
        path = Path(stack.db.url.removeprefix("sqlite:///"))
        for file in (path, path.with_name(path.name + "-wal")):
            if file.exists():
                parts.append(file.read_bytes())
    return b"\x00".join(parts)


def p256_pem() -> str:
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*SPKI).decode()


# --- symmetric keys ------------------------------------------------------------------------


def test_symmetric_keys_are_shown_once_and_loaded_decrypted(
        stack: Stack, service: DeviceCredentialService, device: str) -> None:
    new = service.add_symmetric(device, ACTOR)
    primary, secondary = raw(new)
    assert re.fullmatch(r"sk_[0-9a-f]{16}", new.credential_id)
    assert len(primary) == len(secondary) == 32 and primary != secondary
    assert len(new.primary_key) == 44  # Azure's device-key format: base64 of 32 bytes

    secrets = loaded(stack, service, device)
    assert secrets is not None
    assert (secrets.credential_id, secrets.primary, secrets.secondary) == (
        new.credential_id, primary, secondary)
    assert (secrets.primary_version, secrets.secondary_version) == (1, 1)
    assert load_all(stack, service) == {device: secrets}
    # The keys as shown are the keys the data plane checks a SAS against.
    sas = parse_sas(sign_sas(f"hub.example/devices/{device}", primary,
                             int(stack.clock.now().timestamp()) + 600))
    assert check_sas(sas, device, secrets.slots(), now=stack.clock.now().timestamp(),
                     max_validity_seconds=3600) == "primary"


def test_no_key_material_in_the_database_audit_or_reprs(
        stack: Stack, service: DeviceCredentialService, device: str) -> None:
    new = service.add_symmetric(device, ACTOR)
    rotated = service.rotate_symmetric(new.credential_id, "secondary", ACTOR)
    keys = [*raw(new), base64.b64decode(rotated.key)]
    contents = database_contents(stack)
    # Control: the scan sees what is stored (the credential id is in its row).
    assert new.credential_id.encode() in contents
    for key in keys:
        for spelling in spellings(key):
            assert spelling not in contents, "a device key is stored in the clear"
    secrets = loaded(stack, service, device)
    shown = " ".join([repr(new), repr(rotated), repr(secrets), repr(service),
                      json.dumps(service.get(new.credential_id).to_json()),
                      json.dumps([c.to_json() for c in service.list(device)])])
    for key in keys:
        for spelling in spellings(key):
            assert spelling.decode("latin-1") not in shown


def test_gate_caches_what_the_service_loads(stack: Stack, service: DeviceCredentialService,
                                            device: str) -> None:
    assert gate.DeviceSecrets is DeviceSecrets
    loader: gate.SecretsLoader = service  # the data plane's SecretsLoader
    service.add_symmetric(device, ACTOR)
    with stack.db.read() as conn:
        assert isinstance(loader.load_device(conn, device), gate.DeviceSecrets)


def test_changes_are_audited_against_the_device(
        stack: Stack, service: DeviceCredentialService, device: str) -> None:
    new = service.add_symmetric(device, ACTOR)
    service.rotate_symmetric(new.credential_id, "primary", ACTOR)
    public = service.add_public_key(device, p256_pem(), ACTOR)
    service.revoke(public.id, ACTOR, reason="lost")
    added, rotated, revoked = (audit_rows(stack, a) for a in (
        CREDENTIAL_ADDED, CREDENTIAL_ROTATED, CREDENTIAL_REVOKED))
    assert [r["target"] for r in added + rotated + revoked] == [f"device:{device}"] * 4
    assert [json.loads(r["details"])["kind"] for r in added] == ["symmetric_key", "public_key"]
    assert json.loads(rotated[0]["details"]) == {
        "credential_id": new.credential_id, "kind": "symmetric_key", "slot": "primary",
        "version": 2}
    assert json.loads(revoked[0]["details"])["credential_id"] == public.id
    assert all(r["actor"] == ACTOR for r in added + rotated + revoked)


def test_one_live_symmetric_credential_per_device(
        service: DeviceCredentialService, device: str) -> None:
    first = service.add_symmetric(device, ACTOR)
    with pytest.raises(Conflict) as refused:
        service.add_symmetric(device, ACTOR)
    assert "rotate" in refused.value.hint and first.credential_id in refused.value.hint
    service.revoke(first.credential_id, ACTOR)
    assert service.add_symmetric(device, ACTOR).credential_id != first.credential_id


def test_concurrent_adds_give_one_credential(
        stack: Stack, service: DeviceCredentialService, device: str) -> None:
    outcomes: list[object] = []
    barrier = threading.Barrier(4)

    def add() -> None:
        barrier.wait()
        try:
            outcomes.append(service.add_symmetric(device, ACTOR))
        except FleetwardError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(isinstance(o, NewSymmetricCredential) for o in outcomes) == 1, outcomes
    assert sum(isinstance(o, Conflict) for o in outcomes) == 3, outcomes
    with stack.db.read() as conn:
        assert len(conn.execute(select(device_credentials)).all()) == 1


@pytest.mark.parametrize("slot", ["primary", "secondary"])
def test_regenerated_key_replaces_the_old_one(
        stack: Stack, service: DeviceCredentialService, device: str, slot: str) -> None:
    new = service.add_symmetric(device, ACTOR)
    before = dict(zip(("primary", "secondary"), raw(new), strict=True))
    other = "secondary" if slot == "primary" else "primary"

    rotated = service.rotate_symmetric(new.credential_id, slot, ACTOR)
    assert (rotated.slot, rotated.version) == (slot, 2)
    key = base64.b64decode(rotated.key, validate=True)
    secrets = loaded(stack, service, device)
    assert secrets is not None
    keys = {name: k for name, k, _ in secrets.slots()}
    assert keys[slot] == key != before[slot], "the regenerated slot still holds the old key"
    assert before[slot] not in keys.values()
    assert keys[other] == before[other], "the other slot was disturbed"
    assert secrets.version_of(slot) == 2 and secrets.version_of(other) == 1

    assert service.rotate_symmetric(new.credential_id, slot, ACTOR).version == 3
    info = service.get(new.credential_id)
    assert info.rotated_at == stack.clock.now()


def test_revoked_keys_are_no_longer_loaded_and_are_erased(
        stack: Stack, service: DeviceCredentialService, device: str) -> None:
    stack.add_device("dev-b")
    new = service.add_symmetric(device, ACTOR)
    kept = service.add_symmetric("dev-b", ACTOR)
    generation = stack.registry.get_device(device).credential_generation

    info = service.revoke(new.credential_id, ACTOR)
    assert info.revoked and info.revoked_at == stack.clock.now()
    assert loaded(stack, service, device) is None
    assert set(load_all(stack, service)) == {"dev-b"}
    assert loaded(stack, service, "dev-b") is not None
    with stack.db.read() as conn:
        row = conn.execute(select(device_credentials).where(
            device_credentials.c.id == new.credential_id)).one()._mapping
    assert row["primary_ciphertext"] is None and row["secondary_ciphertext"] is None
    # Tokens got with the revoked key die with it (the generation moved on).
    assert stack.registry.get_device(device).credential_generation == generation + 1
    assert stack.registry.get_device("dev-b").credential_generation == 0

    with pytest.raises(Conflict, match="already revoked"):
        service.revoke(new.credential_id, ACTOR)
    with pytest.raises(Conflict, match="revoked"):
        service.rotate_symmetric(new.credential_id, "primary", ACTOR)
    assert service.get(kept.credential_id).revoked is False


def copy_column(stack: Stack, source_id: str, source: str, target_id: str, target: str) -> None:
    with stack.db.transaction() as conn:
        blob = conn.execute(select(device_credentials.c[source]).where(
            device_credentials.c.id == source_id)).scalar_one()
        conn.execute(update(device_credentials).where(device_credentials.c.id == target_id)
                     .values({target: blob}))


def test_key_copied_to_another_device_is_refused(
        stack: Stack, service: DeviceCredentialService, device: str) -> None:
    stack.add_device("dev-b")
    victim = service.add_symmetric(device, ACTOR)
    attacker = service.add_symmetric("dev-b", ACTOR)
    # Control: before the copy, both devices load.
    assert set(load_all(stack, service)) == {device, "dev-b"}
    copy_column(stack, victim.credential_id, "primary_ciphertext", attacker.credential_id,
                "primary_ciphertext")
    assert loaded(stack, service, "dev-b") is None, "a key copied from dev-a works for dev-b"
    assert set(load_all(stack, service)) == {device}  # the rest of the fleet still loads


def test_credential_reassigned_to_another_device_is_refused(
        stack: Stack, service: DeviceCredentialService, device: str) -> None:
    stack.add_device("dev-b")
    victim = service.add_symmetric(device, ACTOR)
    assert loaded(stack, service, device) is not None  # control
    with stack.db.transaction() as conn:
        conn.execute(update(device_credentials).where(
            device_credentials.c.id == victim.credential_id).values(device_id="dev-b"))
    assert loaded(stack, service, "dev-b") is None, "dev-a's keys work for dev-b"
    assert load_all(stack, service) == {}


def test_key_moved_to_the_other_slot_is_refused(
        stack: Stack, service: DeviceCredentialService, device: str) -> None:
    new = service.add_symmetric(device, ACTOR)
    copy_column(stack, new.credential_id, "primary_ciphertext", new.credential_id,
                "secondary_ciphertext")
    assert loaded(stack, service, device) is None


def test_altered_ciphertext_is_refused(
        stack: Stack, service: DeviceCredentialService, device: str) -> None:
    new = service.add_symmetric(device, ACTOR)
    with stack.db.transaction() as conn:
        column = device_credentials.c.secondary_ciphertext
        blob = bytearray(conn.execute(select(column)).scalar_one())
        blob[20] ^= 0x80
        conn.execute(update(device_credentials).values(secondary_ciphertext=bytes(blob)))
    assert loaded(stack, service, device) is None
    assert load_all(stack, service) == {}
    assert service.get(new.credential_id).revoked is False


def test_keys_under_another_data_key_are_refused(
        stack: Stack, service: DeviceCredentialService, device: str, tmp_path: Path) -> None:
    service.add_symmetric(device, ACTOR)
    other_kek = FileKek.load_or_create(tmp_path / "other-kek")
    other = load_data_key(stack.db, other_kek, name="other", clock=stack.clock)
    wrong = DeviceCredentialService(stack.db, stack.audit, stack.clock, other)
    assert loaded(stack, wrong, device) is None


# --- who may get key material --------------------------------------------------------------

ADDS: dict[str, Callable[[DeviceCredentialService, str], object]] = {
    "symmetric": lambda s, d: s.add_symmetric(d, ACTOR),
    "public-key": lambda s, d: s.add_public_key(d, p256_pem(), ACTOR),
}


@pytest.mark.parametrize("state", [LifecycleState.COMPROMISED, LifecycleState.RETIRED])
@pytest.mark.parametrize("add", ADDS.values(), ids=ADDS.keys())
def test_compromised_or_retired_device_gets_no_new_keys(
        stack: Stack, service: DeviceCredentialService, device: str, state: LifecycleState,
        add: Callable[[DeviceCredentialService, str], object]) -> None:
    stack.registry.change_state(device, state, ACTOR)
    with pytest.raises(PolicyViolation) as refused:
        add(service, device)
    assert state.value in refused.value.message and "new device" in refused.value.hint


@pytest.mark.parametrize("state", [LifecycleState.COMPROMISED, LifecycleState.RETIRED])
def test_compromised_or_retired_device_cannot_rotate_but_can_revoke(
        stack: Stack, service: DeviceCredentialService, device: str,
        state: LifecycleState) -> None:
    new = service.add_symmetric(device, ACTOR)
    stack.registry.change_state(device, state, ACTOR)
    with pytest.raises(PolicyViolation):
        service.rotate_symmetric(new.credential_id, "primary", ACTOR)
    assert service.revoke(new.credential_id, ACTOR).revoked


@pytest.mark.parametrize("state", [LifecycleState.DISABLED, LifecycleState.QUARANTINED])
def test_disabled_or_quarantined_device_may_get_keys(
        stack: Stack, service: DeviceCredentialService, device: str,
        state: LifecycleState) -> None:
    stack.registry.change_state(device, LifecycleState.ACTIVE, ACTOR)
    stack.registry.change_state(device, state, ACTOR)
    assert service.add_symmetric(device, ACTOR).credential_id


@pytest.mark.parametrize("add", ADDS.values(), ids=ADDS.keys())
def test_unknown_or_malformed_device_is_refused(
        service: DeviceCredentialService, add: Callable[[DeviceCredentialService, str],
                                                        object]) -> None:
    with pytest.raises(NotFound):
        add(service, "no-such-device")
    with pytest.raises(InvalidInput):
        add(service, "bad/id")


def test_revoke_all_in_revokes_every_live_credential(
        stack: Stack, service: DeviceCredentialService, device: str) -> None:
    symmetric = service.add_symmetric(device, ACTOR)
    public = service.add_public_key(device, p256_pem(), ACTOR)
    old = service.add_public_key(device, p256_pem(), ACTOR)
    service.revoke(old.id, ACTOR)
    with stack.db.transaction() as conn:
        revoked = service.revoke_all_in(conn, device, ACTOR, reason="compromised")
    assert sorted(revoked) == sorted([public.id, symmetric.credential_id])
    assert all(c.revoked for c in service.list(device))
    assert loaded(stack, service, device) is None and service.public_keys(device) == []


@pytest.mark.parametrize(("credential_id", "slot", "error"), [
    ("sk_0123456789abcdef", "primary", NotFound),
    ("sk_0123", "primary", InvalidInput),
    ("'; drop table devices; --", "primary", InvalidInput),
    (None, "tertiary", InvalidInput),
])
def test_rotate_refuses_bad_requests(service: DeviceCredentialService, device: str,
                                     credential_id: str | None, slot: str,
                                     error: type[Exception]) -> None:
    new = service.add_symmetric(device, ACTOR)
    with pytest.raises(error):
        service.rotate_symmetric(credential_id or new.credential_id, slot, ACTOR)


def test_public_key_credentials_have_no_slots(service: DeviceCredentialService,
                                              device: str) -> None:
    public = service.add_public_key(device, p256_pem(), ACTOR)
    with pytest.raises(InvalidInput, match="public_key"):
        service.rotate_symmetric(public.id, "primary", ACTOR)


# --- registered public keys ----------------------------------------------------------------


def test_public_key_is_registered_by_thumbprint(
        stack: Stack, service: DeviceCredentialService, device: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    info = service.add_public_key(device, key.public_bytes(*SPKI).decode(), ACTOR)
    assert re.fullmatch(r"pk_[0-9a-f]{16}", info.id)
    assert info.jkt == key_thumbprint(key)
    assert info.primary_version is None and info.kind == "public_key"
    assert [k.public_numbers() for k in service.public_keys(device)] == [key.public_numbers()]
    assert service.public_keys("dev-unknown") == []
    assert loaded(stack, service, device) is None  # a public key is no symmetric secret
    assert info.to_json()["jkt"] == info.jkt and "BEGIN" not in json.dumps(info.to_json())


def test_duplicate_public_key_is_refused_on_any_device(
        stack: Stack, service: DeviceCredentialService, device: str) -> None:
    stack.add_device("dev-b")
    pem = p256_pem()
    first = service.add_public_key(device, pem, ACTOR)
    with pytest.raises(Conflict, match="this device"):
        service.add_public_key(device, pem, ACTOR)
    with pytest.raises(Conflict, match="dev-a"):
        service.add_public_key("dev-b", pem, ACTOR)
    service.revoke(first.id, ACTOR)
    assert service.public_keys(device) == []
    assert service.add_public_key("dev-b", pem, ACTOR).device_id == "dev-b"


def test_public_keys_per_device_are_bounded(service: DeviceCredentialService,
                                            device: str) -> None:
    for _ in range(MAX_PUBLIC_KEYS_PER_DEVICE):
        service.add_public_key(device, p256_pem(), ACTOR)
    with pytest.raises(PolicyViolation, match="at most"):
        service.add_public_key(device, p256_pem(), ACTOR)
    assert len(service.public_keys(device)) == MAX_PUBLIC_KEYS_PER_DEVICE


def _private_pem() -> str:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()


NOT_A_P256_PUBLIC_KEY: dict[str, Callable[[], Any]] = {
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()).public_key()
    .public_bytes(*SPKI).decode(),
    "rsa": lambda: rsa.generate_private_key(65537, 2048).public_key().public_bytes(*SPKI)
    .decode(),
    "ed25519": lambda: ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(*SPKI)
    .decode(),
    "private-key": _private_pem,
    "two-blocks": lambda: p256_pem() + p256_pem(),
    "garbage-body": lambda: "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    "der-not-pem": lambda: "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE",
    "oversized": lambda: p256_pem() + " " * 5000,
    "non-ascii": lambda: p256_pem().replace("PUBLIC KEY-----\n", "PUBLIC KEY-----\n\u00e9", 1),
    "not-a-string": lambda: b"-----BEGIN PUBLIC KEY-----",
}


@pytest.mark.parametrize("make", NOT_A_P256_PUBLIC_KEY.values(),
                         ids=NOT_A_P256_PUBLIC_KEY.keys())
def test_only_p256_public_keys_are_registered(stack: Stack, service: DeviceCredentialService,
                                              device: str, make: Callable[[], Any]) -> None:
    with pytest.raises(InvalidInput):
        service.add_public_key(device, make(), ACTOR)
    assert service.list(device) == [] and audit_rows(stack, CREDENTIAL_ADDED) == []


# --- reading ----------------------------------------------------------------------------------


def test_get_and_list(stack: Stack, service: DeviceCredentialService, device: str) -> None:
    stack.add_device("dev-b")
    a = service.add_symmetric(device, ACTOR)
    b = service.add_public_key("dev-b", p256_pem(), "operator:other")
    assert [c.id for c in service.list()] == [a.credential_id, b.id]
    assert [c.id for c in service.list("dev-b")] == [b.id]
    assert service.get(b.id).created_by == "operator:other"
    data = service.get(a.credential_id).to_json()
    assert set(data) == {"id", "device_id", "kind", "status", "jkt", "primary_version",
                         "secondary_version", "created_at", "created_by", "rotated_at",
                         "revoked_at"}
    assert data["status"] == "active" and data["primary_version"] == 1
    with pytest.raises(NotFound):
        service.list("dev-unknown")
    with pytest.raises(NotFound):
        service.get("pk_0123456789abcdef")


def test_regenerating_a_key_ends_the_device_tokens(
        stack: Stack, service: DeviceCredentialService, device: str) -> None:
    """A key is regenerated because it may have leaked: tokens minted with it
    (client_secret_jwt) must not outlive it, and a token does not say which key."""
    new = service.add_symmetric(device, ACTOR)
    with stack.db.read() as conn:
        before = device_rows.get_device(conn, device)
    assert before is not None and before.credential_generation == 0  # control
    service.rotate_symmetric(new.credential_id, "primary", ACTOR)
    with stack.db.read() as conn:
        dev = device_rows.get_device(conn, device)
    assert dev is not None and dev.credential_generation == 1


@pytest.fixture
def many_devices(stack: Stack) -> Iterator[list[str]]:
    ids = [f"bulk-{i}" for i in range(20)]
    for device_id in ids:
        stack.add_device(device_id)
    yield ids


def test_load_all_reads_every_device(stack: Stack, service: DeviceCredentialService,
                                     many_devices: list[str]) -> None:
    made = {d: raw(service.add_symmetric(d, ACTOR)) for d in many_devices}
    everything = load_all(stack, service)
    assert {d: (s.primary, s.secondary) for d, s in everything.items()} == made
