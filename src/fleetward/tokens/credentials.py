"""Device credentials besides certificates (docs/credentials.md):

* a **symmetric credential** (``sk_<16 hex>``): two 32-byte keys, primary and secondary,
  for SAS tokens and ``client_secret_jwt``. Shown once, as base64 (Azure IoT Hub's device
  key format); stored only encrypted under the data key (crypto/kek.py) with associated
  data ``<credential id>|<device id>|<slot>``, so a ciphertext copied into another row or
  slot does not decrypt. Each slot has a version, +1 when it is regenerated: SAS sessions
  signed with the old key end (edge/gate.py compares versions). One live symmetric
  credential per device: a leaked key is replaced by rotating its slot.
* a **registered public key** (``pk_<16 hex>``): an EC P-256 public key for
  ``private_key_jwt`` client assertions (RFC 7523 §2.2), found by its RFC 7638 thumbprint.

Every change is audited in its own transaction with target ``device:<id>``: the data
plane reads the audit log as its change feed and reloads that device and its keys. No
key material ever reaches the audit log, a log line, an exception or a ``repr``.
"""

from __future__ import annotations

import base64
import builtins
import datetime as dt
import re
import secrets
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Connection

from fleetward.audit import AuditLog
from fleetward.clock import Clock
from fleetward.crypto.jose import key_thumbprint
from fleetward.crypto.kek import (
    DEVICE_CREDENTIALS_KEY,
    KEY_BYTES,
    DataKey,
    DecryptionRefused,
    KeyEncryptionKey,
    describe_kek,
)
from fleetward.errors import (
    Conflict,
    InvalidInput,
    KeyUnavailable,
    NotFound,
    PolicyViolation,
    StorageError,
)
from fleetward.model import AuditEvent, Device, LifecycleState, validate_device_id
from fleetward.store import Database
from fleetward.store import device_credentials as credential_rows
from fleetward.store import devices as device_rows
from fleetward.store.device_credentials import PUBLIC_KEY, SLOTS, SYMMETRIC_KEY, CredentialRow

log = structlog.get_logger("fleetward.tokens")

CREDENTIAL_ADDED = "credential.added"
CREDENTIAL_ROTATED = "credential.rotated"
CREDENTIAL_REVOKED = "credential.revoked"
KINDS = (PUBLIC_KEY, SYMMETRIC_KEY)

SYMMETRIC_KEY_BYTES = 32  # per slot: 256 bits, as Azure IoT Hub generates device keys
CREDENTIAL_ID_BYTES = 8  # 16 hex characters after the prefix
SYMMETRIC_PREFIX = "sk_"
PUBLIC_KEY_PREFIX = "pk_"
CREDENTIAL_ID_PATTERN = re.compile(r"(sk|pk)_[0-9a-f]{16}")
FIRST_VERSION = 1
# Every registered key is a candidate for each client assertion of the device, and
# rotating keys needs at most old + new (+ a spare): more would only widen the door.
MAX_PUBLIC_KEYS_PER_DEVICE = 4
MAX_PUBLIC_KEY_PEM_CHARS = 4096  # a P-256 SubjectPublicKeyInfo PEM is ≈ 180 characters
# States from which no device gets new key material (lifecycle: terminal or lost).
NO_NEW_CREDENTIALS = frozenset({LifecycleState.COMPROMISED, LifecycleState.RETIRED})


@dataclass(frozen=True, slots=True)
class DeviceSecrets:
    """A device's two symmetric keys (primary and secondary, so one can be replaced
    while devices use the other), decrypted, with the version of each slot: a session
    signed with a slot's older version ends when the slot is regenerated."""

    credential_id: str
    primary: bytes
    secondary: bytes
    primary_version: int
    secondary_version: int

    def slots(self) -> tuple[tuple[str, bytes, int], ...]:
        return (("primary", self.primary, self.primary_version),
                ("secondary", self.secondary, self.secondary_version))

    def version_of(self, slot: str) -> int:
        return self.primary_version if slot == "primary" else self.secondary_version

    def __repr__(self) -> str:  # never the keys
        return (f"DeviceSecrets({self.credential_id!r}, primary v{self.primary_version}, "
                f"secondary v{self.secondary_version})")


@dataclass(frozen=True, slots=True)
class CredentialInfo:
    """What may be shown about a credential: never key material (the public key's
    thumbprint identifies it)."""

    id: str
    device_id: str
    kind: str  # public_key | symmetric_key
    jkt: str | None  # public keys: RFC 7638 thumbprint
    primary_version: int | None  # symmetric keys only
    secondary_version: int | None
    created_at: dt.datetime
    created_by: str
    rotated_at: dt.datetime | None
    revoked_at: dt.datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "device_id": self.device_id,
            "kind": self.kind,
            "status": "revoked" if self.revoked else "active",
            "jkt": self.jkt,
            "primary_version": self.primary_version,
            "secondary_version": self.secondary_version,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "rotated_at": self.rotated_at.isoformat() if self.rotated_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


@dataclass(frozen=True, slots=True)
class NewSymmetricCredential:
    """A new symmetric credential with its two keys (base64): shown once, never again."""

    info: CredentialInfo
    primary_key: str
    secondary_key: str

    @property
    def credential_id(self) -> str:
        return self.info.id

    def to_json(self) -> dict[str, Any]:
        """The one answer that carries the keys (to the operator who created them)."""
        return {**self.info.to_json(), "primary_key": self.primary_key,
                "secondary_key": self.secondary_key}

    def __repr__(self) -> str:  # never the keys
        return f"NewSymmetricCredential({self.info.id!r}, device={self.info.device_id!r})"


@dataclass(frozen=True, slots=True)
class NewKey:
    """A regenerated slot's key (base64): shown once, never again."""

    credential_id: str
    device_id: str
    slot: str
    version: int
    key: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.credential_id, "device_id": self.device_id, "slot": self.slot,
                "version": self.version, "key": self.key}

    def __repr__(self) -> str:  # never the key
        return f"NewKey({self.credential_id!r}, {self.slot} v{self.version})"


def key_aad(credential_id: str, device_id: str, slot: str) -> bytes:
    """Associated data binding an encrypted key to its row and slot."""
    return f"{credential_id}|{device_id}|{slot}".encode()


class DeviceCredentialService:
    """Adds, rotates, revokes and reads devices' symmetric keys and public keys.

    Implements ``fleetward.edge.gate.SecretsLoader`` (``load_all``, ``load_device``).
    """

    def __init__(self, db: Database, audit: AuditLog, clock: Clock, data_key: DataKey) -> None:
        self._db = db
        self._audit = audit
        self._clock = clock
        self._data_key = data_key

    def __repr__(self) -> str:
        return f"DeviceCredentialService({self._data_key!r})"

    # --- changes -----------------------------------------------------------------------

    def add_symmetric(self, device_id: str, actor: str) -> NewSymmetricCredential:
        """Give a device its symmetric credential: two fresh random keys.

        Args:
            device_id: the device.
            actor: who asks (``operator:<name>``).

        Returns:
            The credential and its keys (base64), which are never shown again.

        Raises:
            InvalidInput: malformed device id.
            NotFound: no such device.
            PolicyViolation: the device is compromised or retired.
            Conflict: it already has a live symmetric credential.
        """
        validate_device_id(device_id)
        with self._db.transaction() as conn:
            self._device_for_new_material(conn, device_id)
            live = credential_rows.live_credentials(conn, device_id, SYMMETRIC_KEY)
            if live:
                raise Conflict(
                    f"device {device_id!r} already has a symmetric credential ({live[0].id})",
                    hint=f"regenerate one of its keys instead: fleetward credential rotate "
                         f"{live[0].id} --slot secondary (or revoke it first)")
            now = self._clock.now()
            credential_id = _new_id(SYMMETRIC_PREFIX)
            keys = {slot: secrets.token_bytes(SYMMETRIC_KEY_BYTES) for slot in SLOTS}
            row = CredentialRow(
                id=credential_id, device_id=device_id, kind=SYMMETRIC_KEY,
                public_key_pem=None, jkt=None,
                primary_ciphertext=self._encrypt(keys["primary"], credential_id, device_id,
                                                 "primary"),
                secondary_ciphertext=self._encrypt(keys["secondary"], credential_id,
                                                   device_id, "secondary"),
                primary_version=FIRST_VERSION, secondary_version=FIRST_VERSION,
                created_at=now, created_by=actor, rotated_at=None, revoked_at=None)
            credential_rows.insert_credential(conn, row)
            self._audit.append(conn, AuditEvent(
                action=CREDENTIAL_ADDED, actor=actor, target=f"device:{device_id}",
                details={"credential_id": credential_id, "kind": SYMMETRIC_KEY,
                         "primary_version": FIRST_VERSION,
                         "secondary_version": FIRST_VERSION}))
        log.info("symmetric credential added", device=device_id, credential=credential_id)
        return NewSymmetricCredential(_info(row), _b64(keys["primary"]), _b64(keys["secondary"]))

    def rotate_symmetric(self, credential_id: str, slot: str, actor: str) -> NewKey:
        """Regenerate one slot's key; the slot's version moves on, so sessions signed
        with the old key end, and so do the device's access tokens (one minted with the
        old key cannot be told apart). SAS sessions on the other slot are not disturbed.

        Args:
            credential_id: an ``sk_`` credential.
            slot: ``primary`` or ``secondary``.
            actor: who asks.

        Returns:
            The slot's new key (base64) and version, never shown again.

        Raises:
            InvalidInput: unknown slot, malformed id, or not a symmetric credential.
            NotFound: no such credential.
            Conflict: it is revoked, or the slot was regenerated concurrently.
            PolicyViolation: the device is compromised or retired.
        """
        if slot not in SLOTS:
            raise InvalidInput(f"unknown slot {slot!r}", hint="use primary or secondary")
        with self._db.transaction() as conn:
            row = self._require(conn, credential_id)
            if row.kind != SYMMETRIC_KEY:
                raise InvalidInput(f"{credential_id} is a {row.kind} credential; only "
                                   "symmetric credentials have slots to rotate",
                                   hint="register a new public key and revoke the old one")
            if row.revoked_at is not None:
                raise Conflict(f"credential {credential_id} is revoked",
                               hint=f"add a new one: fleetward credential add --device "
                                    f"{row.device_id} --kind symmetric")
            self._device_for_new_material(conn, row.device_id)
            old_version = row.primary_version if slot == "primary" else row.secondary_version
            key = secrets.token_bytes(SYMMETRIC_KEY_BYTES)
            now = self._clock.now()
            if not credential_rows.replace_slot(
                    conn, credential_id, slot, self._encrypt(key, row.id, row.device_id, slot),
                    old_version, now):
                raise Conflict(f"credential {credential_id} changed while its {slot} key was "
                               "regenerated", hint="list it and try again")
            version = old_version + 1
            # Tokens minted with the old key (client_secret_jwt) end too: a key is
            # regenerated because it may have leaked, and a token does not say which key
            # got it. Devices fetch new tokens; SAS sessions on the other slot go on.
            device_rows.bump_credential_generation(conn, row.device_id)
            self._audit.append(conn, AuditEvent(
                action=CREDENTIAL_ROTATED, actor=actor, target=f"device:{row.device_id}",
                details={"credential_id": credential_id, "kind": SYMMETRIC_KEY, "slot": slot,
                         "version": version}))
        log.info("symmetric key regenerated", device=row.device_id, credential=credential_id,
                 slot=slot, version=version)
        return NewKey(credential_id, row.device_id, slot, version, _b64(key))

    def add_public_key(self, device_id: str, public_key_pem: str, actor: str) -> CredentialInfo:
        """Register a raw EC P-256 public key for the device's client assertions.

        A key identifies one device: a key already live on this or another device is
        refused (two devices with one key could each pass as the other).

        Args:
            device_id: the device.
            public_key_pem: a PEM SubjectPublicKeyInfo (``-----BEGIN PUBLIC KEY-----``).
            actor: who asks.

        Returns:
            The new credential.

        Raises:
            InvalidInput: malformed device id, or not a single PEM EC P-256 public key.
            NotFound: no such device.
            PolicyViolation: the device is compromised or retired, or already has
                ``MAX_PUBLIC_KEYS_PER_DEVICE`` live keys.
            Conflict: the key is already registered.
        """
        validate_device_id(device_id)
        key = parse_public_key(public_key_pem)
        jkt = key_thumbprint(key)
        canonical_pem = key.public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
        with self._db.transaction() as conn:
            self._device_for_new_material(conn, device_id)
            for existing in credential_rows.live_by_jkt(conn, jkt):
                where = ("this device" if existing.device_id == device_id
                         else f"device {existing.device_id!r}")
                raise Conflict(f"this public key is already registered for {where} "
                               f"({existing.id})",
                               hint="a key pair identifies one device: generate a new one")
            live = credential_rows.live_credentials(conn, device_id, PUBLIC_KEY)
            if len(live) >= MAX_PUBLIC_KEYS_PER_DEVICE:
                raise PolicyViolation(
                    f"device {device_id!r} already has {len(live)} public keys (at most "
                    f"{MAX_PUBLIC_KEYS_PER_DEVICE})",
                    hint="revoke one it no longer uses: fleetward credential revoke ID")
            row = CredentialRow(
                id=_new_id(PUBLIC_KEY_PREFIX), device_id=device_id, kind=PUBLIC_KEY,
                public_key_pem=canonical_pem.decode("ascii"), jkt=jkt,
                primary_ciphertext=None, secondary_ciphertext=None,
                primary_version=0, secondary_version=0, created_at=self._clock.now(),
                created_by=actor, rotated_at=None, revoked_at=None)
            credential_rows.insert_credential(conn, row)
            self._audit.append(conn, AuditEvent(
                action=CREDENTIAL_ADDED, actor=actor, target=f"device:{device_id}",
                details={"credential_id": row.id, "kind": PUBLIC_KEY, "jkt": jkt}))
        log.info("public key registered", device=device_id, credential=row.id, jkt=jkt)
        return _info(row)

    def revoke(self, credential_id: str, actor: str, reason: str = "") -> CredentialInfo:
        """Revoke a credential at once, on every node.

        A symmetric credential's encrypted keys are deleted. The device's credential
        generation also moves on: access tokens obtained with this credential (and,
        since a token does not say which credential got it, every other token of the
        device) are refused from now on (docs/credentials.md, Revocation).

        Args:
            credential_id: the credential.
            actor: who asks.
            reason: free text for the audit log.

        Returns:
            The revoked credential.

        Raises:
            InvalidInput: malformed id.
            NotFound: no such credential.
            Conflict: already revoked.
        """
        with self._db.transaction() as conn:
            row = self._require(conn, credential_id)
            # Lock the device row first: adds and rotations of this device queue behind us.
            device_rows.get_device(conn, row.device_id, for_update=True)
            self._revoke_in(conn, row, actor, reason)
            device_rows.bump_credential_generation(conn, row.device_id)
            revoked = self._require(conn, credential_id)
        log.info("credential revoked", device=row.device_id, credential=credential_id)
        return _info(revoked)

    def revoke_all_in(self, conn: Connection, device_id: str, actor: str,
                      reason: str = "") -> builtins.list[str]:
        """Revoke every live credential of a device inside the caller's transaction (a
        lifecycle change to compromised or retired, which moves the credential
        generation on itself).

        Args:
            conn: the caller's transaction.
            device_id: the device.
            actor: who asks.
            reason: free text for the audit log.

        Returns:
            The ids revoked.
        """
        revoked: builtins.list[str] = []
        for kind in KINDS:
            for row in credential_rows.live_credentials(conn, device_id, kind):
                self._revoke_in(conn, row, actor, reason)
                revoked.append(row.id)
        return revoked

    def _revoke_in(self, conn: Connection, row: CredentialRow, actor: str, reason: str) -> None:
        if not credential_rows.revoke_credential(conn, row.id, self._clock.now()):
            raise Conflict(f"credential {row.id} is already revoked", hint="nothing to do")
        self._audit.append(conn, AuditEvent(
            action=CREDENTIAL_REVOKED, actor=actor, target=f"device:{row.device_id}",
            details={"credential_id": row.id, "kind": row.kind, "reason": reason}))

    # --- reading -----------------------------------------------------------------------

    def get(self, credential_id: str) -> CredentialInfo:
        """One credential, revoked or not.

        Raises:
            InvalidInput: malformed id.
            NotFound: no such credential.
        """
        with self._db.read() as conn:
            return _info(self._require(conn, credential_id))

    def list(self, device_id: str | None = None) -> builtins.list[CredentialInfo]:
        """Credentials (revoked ones too) of one device, or of every device.

        Raises:
            InvalidInput: malformed device id.
            NotFound: no such device.
        """
        with self._db.read() as conn:
            if device_id is not None:
                validate_device_id(device_id)
                if device_rows.get_device(conn, device_id) is None:
                    raise NotFound(f"device {device_id!r} does not exist")
            return [_info(r) for r in credential_rows.list_credentials(conn, device_id)]

    def public_keys(self, device_id: str) -> builtins.list[ec.EllipticCurvePublicKey]:
        """The device's live registered public keys (candidates for its client
        assertions); empty for an unknown or malformed device id."""
        with self._db.read() as conn:
            rows = credential_rows.live_credentials(conn, device_id, PUBLIC_KEY)
        keys: builtins.list[ec.EllipticCurvePublicKey] = []
        for row in rows:
            try:
                keys.append(parse_public_key(row.public_key_pem or ""))
            except InvalidInput:
                # Stored by us, so only an edited row gets here: leave that key out.
                log.error("stored public key unreadable; ignored", device=device_id,
                          credential=row.id)
        return keys

    # --- SecretsLoader (the data plane's cache of symmetric keys) ------------------------

    def load_all(self, conn: Connection) -> dict[str, DeviceSecrets]:
        """Every device's live symmetric keys, decrypted (the gate's start-up fill).

        A credential whose ciphertext does not authenticate is left out and logged: that
        device cannot use its keys (fail closed) while the rest of the fleet can.
        """
        loaded: dict[str, DeviceSecrets] = {}
        for row in credential_rows.live_symmetric_credentials(conn):
            decrypted = self._decrypt_row(row)
            if decrypted is not None:
                loaded[row.device_id] = decrypted  # oldest first: a newer one wins
        return loaded

    def load_device(self, conn: Connection, device_id: str) -> DeviceSecrets | None:
        """One device's live symmetric keys, decrypted; None if it has none (or they
        do not decrypt)."""
        rows = credential_rows.live_credentials(conn, device_id, SYMMETRIC_KEY)
        return self._decrypt_row(rows[-1]) if rows else None

    # --- helpers -------------------------------------------------------------------------

    def _encrypt(self, key: bytes, credential_id: str, device_id: str, slot: str) -> bytes:
        return self._data_key.encrypt(key, key_aad(credential_id, device_id, slot))

    def _decrypt_row(self, row: CredentialRow) -> DeviceSecrets | None:
        try:
            primary, secondary = (
                self._data_key.decrypt(blob or b"", key_aad(row.id, row.device_id, slot))
                for slot, blob in zip(SLOTS, (row.primary_ciphertext, row.secondary_ciphertext),
                                      strict=True))
        except DecryptionRefused:
            log.error("symmetric key does not decrypt (altered or moved row); the device "
                      "cannot use it", device=row.device_id, credential=row.id)
            return None
        return DeviceSecrets(row.id, primary, secondary, row.primary_version,
                             row.secondary_version)

    def _require(self, conn: Connection, credential_id: str) -> CredentialRow:
        if not isinstance(credential_id, str) or not CREDENTIAL_ID_PATTERN.fullmatch(
                credential_id):
            raise InvalidInput(f"invalid credential id {credential_id!r}",
                               hint="sk_ or pk_ and 16 hex digits: fleetward credential list "
                                    "--device ID")
        row = credential_rows.get_credential(conn, credential_id)
        if row is None:
            raise NotFound(f"credential {credential_id} does not exist")
        return row

    def _device_for_new_material(self, conn: Connection, device_id: str) -> Device:
        # FOR UPDATE on PostgreSQL (SQLite's BEGIN IMMEDIATE already serialises writers):
        # two concurrent adds for one device queue, so "one live symmetric credential"
        # and the public-key limit hold.
        device = device_rows.get_device(conn, device_id, for_update=True)
        if device is None:
            raise NotFound(f"device {device_id!r} does not exist",
                           hint="register it first: fleetward device add ID --type T")
        if device.state in NO_NEW_CREDENTIALS:
            raise PolicyViolation(
                f"device {device_id!r} is {device.state.value}: it gets no new credentials",
                hint="a compromised or retired device stays locked out; register the "
                     "replacement hardware as a new device")
        return device


def parse_public_key(pem: str) -> ec.EllipticCurvePublicKey:
    """One PEM SubjectPublicKeyInfo holding an EC P-256 public key.

    Raises:
        InvalidInput: too long, not exactly one ``PUBLIC KEY`` PEM block, unparsable, or
            another key type or curve.
    """
    hint = ("a PEM public key (-----BEGIN PUBLIC KEY-----) of an EC P-256 key, e.g. "
            "openssl ec -in device.key -pubout")
    if not isinstance(pem, str) or len(pem) > MAX_PUBLIC_KEY_PEM_CHARS:
        raise InvalidInput(f"a public key is a PEM text of at most {MAX_PUBLIC_KEY_PEM_CHARS} "
                           "characters", hint=hint)
    if pem.count("-----BEGIN ") != 1 or "-----BEGIN PUBLIC KEY-----" not in pem:
        raise InvalidInput("expected exactly one PEM block of type PUBLIC KEY", hint=hint)
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm):
        raise InvalidInput("the public key cannot be parsed", hint=hint) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                        ec.SECP256R1):
        raise InvalidInput("only EC P-256 public keys can be registered (ES256)", hint=hint)
    return key


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(CREDENTIAL_ID_BYTES)


def _b64(key: bytes) -> str:
    # Standard base64 with padding: how Azure IoT Hub shows device keys, and what its
    # SDKs decode before signing (docs/credentials.md, SAS tokens).
    return base64.b64encode(key).decode("ascii")


def _info(row: CredentialRow) -> CredentialInfo:
    symmetric = row.kind == SYMMETRIC_KEY
    return CredentialInfo(
        id=row.id, device_id=row.device_id, kind=row.kind, jkt=row.jkt,
        primary_version=row.primary_version if symmetric else None,
        secondary_version=row.secondary_version if symmetric else None,
        created_at=row.created_at, created_by=row.created_by, rotated_at=row.rotated_at,
        revoked_at=row.revoked_at)


def load_data_key(db: Database, kek: KeyEncryptionKey, name: str = DEVICE_CREDENTIALS_KEY,
                  *, clock: Clock) -> DataKey:
    """The data key called ``name``, unwrapped; created (and stored wrapped) on first use.

    Nodes starting together may both create one: the database keeps the first insert
    (primary key), and a node whose insert conflicts uses the winner's key, so there is
    only ever one data key per name. The KEK is called outside any transaction (a token
    round-trip never holds the SQLite write lock).

    Args:
        db: the database.
        kek: this node's key-encryption key.
        name: the data key's name.
        clock: for the row's creation time.

    Returns:
        The data key.

    Raises:
        KeyUnavailable: the stored key does not unwrap with ``kek`` (another KEK, or
            altered), or the KEK cannot be used.
        StorageError: the database failed.
    """
    with db.read() as conn:
        row = credential_rows.get_data_key(conn, name)
    if row is None:
        fresh = secrets.token_bytes(KEY_BYTES)
        candidate = credential_rows.DataKeyRow(name, kek.wrap(fresh), kek.kek_ref, clock.now())
        with db.transaction() as conn:
            if credential_rows.insert_data_key(conn, candidate):
                return DataKey(fresh, name)
            row = credential_rows.get_data_key(conn, name)
        if row is None:  # conflicted, yet gone: someone deleted it meanwhile
            raise StorageError(f"the data key {name!r} vanished while being created")
    try:
        key = kek.unwrap(row.wrapped_key)
    except KeyUnavailable as exc:
        raise KeyUnavailable(
            f"{exc.message} (data key {name!r}, wrapped by {describe_kek(row.kek_ref)})",
            hint=exc.hint) from None
    return DataKey(key, name)
