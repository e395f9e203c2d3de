"""Key-encryption keys and envelope encryption for secrets the server must read back
(devices' symmetric keys: a SAS is checked with the key itself, so a hash will not do).

Two layers (NIST SP 800-57 Part 1 §6.1.1, "key-wrapping key" and "data-encryption key"):

* a **data key** (DEK, AES-256-GCM) encrypts each secret, with associated data that names
  the row and slot it belongs to, so a ciphertext copied into another row fails;
* a **key-encryption key** (KEK) wraps the data key, which is stored wrapped in the
  ``data_keys`` table. The KEK is either a file in ``<data dir>/secrets`` (``FileKek``) or
  an AES key generated on the PKCS#11 token that never leaves it (``Pkcs11Kek``). It is
  used once at start-up, never per secret, and a database dump alone decrypts nothing.

Every node of a cluster must hold the same KEK (the same file, or the same token key):
the first node creates the data key, the others unwrap it.

Blobs are ``nonce (12 bytes) || ciphertext || tag (16 bytes)``. AES-GCM with random
96-bit nonces is safe for 2**32 encryptions under one key (NIST SP 800-38D §8.3); a
data key encrypts two secrets per credential and rotation, far below that.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleetward.crypto.signer import write_private_file
from fleetward.errors import ConfigurationError, KeyUnavailable, StorageError

if TYPE_CHECKING:
    from fleetward.crypto.pkcs11 import Pkcs11AesKey

KEY_BYTES = 32  # AES-256, for KEKs and data keys alike
NONCE_BYTES = 12  # 96-bit GCM nonces (NIST SP 800-38D §5.2.1.1)
TAG_BYTES = 16  # full 128-bit GCM tags (NIST SP 800-38D §5.2.1.2)
# Associated data of every wrap: a KEK-wrapped blob means "a Fleetward data key" and
# cannot be passed off as anything else encrypted under the same KEK.
WRAP_AAD = b"fleetward/kek-wrapped-data-key/v1"
DEVICE_CREDENTIALS_KEY = "device-credentials"  # data_keys.name of the device-key DEK
DEFAULT_PKCS11_KEK_LABEL = "fleetward-credential-kek"
# Permission bits a KEK file must not have: readable or writable by anyone but its owner.
_FOREIGN_ACCESS = 0o077


class KeyEncryptionKey(Protocol):
    """Wraps and unwraps data keys; the key itself is never exposed."""

    @property
    def kek_ref(self) -> dict[str, str]:
        """Where the KEK is (stored next to what it wrapped); never contains a secret."""
        ...

    def wrap(self, key: bytes) -> bytes:
        """Encrypt and authenticate ``key``.

        Raises:
            KeyUnavailable: the KEK cannot be used (token refused).
        """
        ...

    def unwrap(self, wrapped: bytes) -> bytes:
        """The key ``wrap`` was given; never anything else.

        Raises:
            KeyUnavailable: the blob was altered, truncated or wrapped by another KEK.
        """
        ...


class DecryptionRefused(StorageError):
    """A stored ciphertext does not authenticate: altered, moved to another row, or
    encrypted under another data key."""

    problem_type = "ciphertext-refused"
    default_hint = ("A stored secret was altered or copied between rows; restore the "
                    "database from backup or issue the credential again.")


def _unwrap_failed(ref: dict[str, str]) -> KeyUnavailable:
    return KeyUnavailable(
        f"the data key does not unwrap with this key-encryption key ({describe_kek(ref)}): it "
        "was wrapped by another KEK or altered",
        hint="every node must use the same KEK (copy secrets/credential-kek from the node "
             "that created it, or use the same token key); if the KEK is lost, issue the "
             "devices' symmetric keys again")


def describe_kek(ref: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(ref.items()))


class FileKek:
    """A 256-bit KEK kept as hex text in a file only its owner can read (0600)."""

    def __init__(self, key: bytes, path: Path) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigurationError(f"a key-encryption key is {KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        self._path = path

    def __repr__(self) -> str:
        return f"FileKek({str(self._path)!r})"

    @property
    def kek_ref(self) -> dict[str, str]:
        return {"backend": "file", "path": str(self._path)}

    @classmethod
    def load_or_create(cls, path: Path) -> FileKek:
        """Read the KEK file, or create it (0600, random key) if there is none.

        Args:
            path: ``DataDirLayout(data_dir).kek_file``.

        Returns:
            The KEK.

        Raises:
            ConfigurationError: the file is unreadable, readable by other users, or not
                exactly 64 hex characters (one line).
        """
        if not path.exists():
            try:
                write_private_file(path, secrets.token_bytes(KEY_BYTES).hex().encode() + b"\n")
            except ConfigurationError:
                if not path.exists():
                    raise
                # Created by another process between our check and our O_EXCL open: use it.
        return cls(_read_key_file(path), path)

    def wrap(self, key: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, key, WRAP_AAD)

    def unwrap(self, wrapped: bytes) -> bytes:
        if len(wrapped) < NONCE_BYTES + TAG_BYTES:
            raise _unwrap_failed(self.kek_ref)
        try:
            return self._aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], WRAP_AAD)
        except InvalidTag:
            raise _unwrap_failed(self.kek_ref) from None


def _read_key_file(path: Path) -> bytes:
    try:
        info = path.stat()
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the key-encryption key {path}: {exc.strerror}",
                                 hint="run the server as the data directory's owner") from exc
    if stat.S_IMODE(info.st_mode) & _FOREIGN_ACCESS:
        # As ssh does for private keys: a key others could read is no longer secret.
        raise ConfigurationError(f"the key-encryption key {path} is accessible to other users",
                                 hint=f"chmod 600 {path}")
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigurationError(
            f"the key-encryption key {path} is not {KEY_BYTES * 2} hex characters",
            hint="restore it from backup (or from another node of this cluster)")
    return key


class Pkcs11Kek:
    """A KEK that is an AES-256 key generated on a PKCS#11 token: sensitive,
    unextractable, encrypt/decrypt only (``crypto.pkcs11.SECRET_KEY_TEMPLATE``). Data
    keys are wrapped with AES-GCM computed on the token."""

    def __init__(self, key: Pkcs11AesKey) -> None:
        self._key = key

    def __repr__(self) -> str:
        return f"Pkcs11Kek({self._key!r})"

    @property
    def kek_ref(self) -> dict[str, str]:
        return self._key.key_ref

    @property
    def token_key(self) -> Any:
        """The python-pkcs11 key object (for attribute checks)."""
        return self._key.token_key

    @classmethod
    def open_or_create(cls, module: str, token_label: str, pin: str,
                       key_label: str = DEFAULT_PKCS11_KEK_LABEL) -> Pkcs11Kek:
        """Open the token's KEK, or generate it there on first use.

        Args:
            module: path of the PKCS#11 module.
            token_label: the token (the CA's token, usually).
            pin: the user PIN.
            key_label: the AES key's label.

        Returns:
            The KEK.

        Raises:
            KeyUnavailable: no such token, wrong PIN, or the label is ambiguous.
            ConfigurationError: the token lacks AES-GCM, or a key under the label was not
                made as Fleetward makes it (e.g. extractable).
        """
        from fleetward.crypto.pkcs11 import Pkcs11AesKey

        return cls(Pkcs11AesKey.open_or_create(module=module, token_label=token_label,
                                               key_label=key_label, pin=pin))

    def wrap(self, key: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._key.encrypt_gcm(nonce, key, WRAP_AAD)

    def unwrap(self, wrapped: bytes) -> bytes:
        if len(wrapped) < NONCE_BYTES + TAG_BYTES:
            raise _unwrap_failed(self.kek_ref)
        try:
            return self._key.decrypt_gcm(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:],
                                         WRAP_AAD)
        except KeyUnavailable:
            raise _unwrap_failed(self.kek_ref) from None


class DataKey:
    """A data-encryption key: AES-256-GCM with caller-chosen associated data."""

    def __init__(self, key: bytes, name: str = DEVICE_CREDENTIALS_KEY) -> None:
        if len(key) != KEY_BYTES:
            raise KeyUnavailable(f"a data key is {KEY_BYTES} bytes; this one is not",
                                 hint="the data_keys row is damaged; restore it from backup")
        self._aead = AESGCM(key)
        self.name = name

    def __repr__(self) -> str:
        return f"DataKey({self.name!r})"

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """``nonce || ciphertext || tag``, authenticated together with ``aad``.

        Args:
            plaintext: the secret.
            aad: what the secret belongs to (not stored; give the same to ``decrypt``).

        Returns:
            The blob to store.
        """
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext, if ``blob`` is intact and was encrypted with ``aad``.

        Raises:
            DecryptionRefused: altered or truncated blob, other associated data, or
                another data key.
        """
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise DecryptionRefused("a stored ciphertext is truncated")
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag:
            raise DecryptionRefused(
                "a stored ciphertext does not authenticate: altered, copied from another "
                "row, or encrypted under another data key") from None
