"""Where the device key lives: an encrypted file or a PKCS#11 token.

A keystore holds the *current* key (the one the current certificate certifies) and,
during a renewal, a *pending* key (the next one). Key rotation on renewal (RFC 7030
§4.2.2 allows both; a new key limits what a leaked old key is worth) follows one order
in both backends:

    create_pending → (server issues a certificate for it; cert.pem.new stored)
    → commit_pending (pending becomes current) → cert.pem replaced → finish (old key gone)

so until the new certificate is on disk, the old key and certificate keep working.

- ``FileKeystore``: ``device.key`` is encrypted PKCS#8 (PBES2, AES-256-CBC); the pending
  key is ``device.key.new`` and committing is one ``os.replace``.
- ``NoKeystore``: a device with a symmetric key only (SAS); it has no key pair.
- ``Pkcs11Keystore``: keys are generated ON the token with CKA_SENSITIVE=true and
  CKA_EXTRACTABLE=false (PKCS#11 v2.40 §4.9) by ``Pkcs11Signer.generate`` and never
  leave it; the CSR is signed on the token through cryptography's builders, and TLS runs
  through curl + OpenSSL's pkcs11 engine. Key objects are named by label in agent.toml.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import ObjectClass

from fleetward.agent.errors import AgentStateError
from fleetward.agent.state import (
    AgentConfig,
    StateLayout,
    load_ca_bundle,
    read_secret_file,
    replace_durably,
    save_config,
    with_keystore,
    write_atomic,
)
from fleetward.agent.transport import (
    CurlTransport,
    HttpxTransport,
    Transport,
    client_tls_context,
    openssl_engine_config,
)
from fleetward.crypto.pkcs11 import Pkcs11Signer
from fleetward.crypto.signer import FileSigner, generate_private_key, write_encrypted_key
from fleetward.errors import KeyUnavailable

KEY_ALGORITHM = "ec-p256"  # RFC 7030 §4.5.2 csrattrs of Fleetward: ECDSA P-256 + SHA-256


class Keystore(Protocol):
    """The device's private keys (current and, during a renewal, pending)."""

    @property
    def kind(self) -> str: ...

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The current key (signs CSRs; its private half may be a token proxy)."""
        ...

    def create_pending(self) -> ec.EllipticCurvePrivateKey:
        """Generate the next key and record it as pending (replacing a stale pending one)."""
        ...

    def pending_key(self) -> ec.EllipticCurvePrivateKey | None: ...

    def commit_pending(self) -> None:
        """Make the pending key current (the old one is kept until ``finish``)."""
        ...

    def discard_pending(self) -> None:
        """Forget and destroy the pending key, if any."""
        ...

    def finish(self) -> None:
        """Destroy the key that ``commit_pending`` retired, if any."""
        ...

    def mtls_transport(self, server_url: str) -> Transport:
        """A transport that authenticates with the current certificate and key."""
        ...


def same_public_key(a: ec.EllipticCurvePublicKey | object, b: object) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if not isinstance(a, ec.EllipticCurvePublicKey) or not isinstance(
            b, ec.EllipticCurvePublicKey):
        return False
    return a.public_bytes(*spki) == b.public_bytes(*spki)


def pinned_ca_pem(layout: StateLayout) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode()
                   for c in load_ca_bundle(layout.ca))


# --- encrypted key file ---------------------------------------------------------------------


class FileKeystore:
    """``device.key``: encrypted PKCS#8, 0600; passphrase from ``passphrase_file``."""

    kind = "file"

    def __init__(self, layout: StateLayout, passphrase_file: Path) -> None:
        self._layout = layout
        self._passphrase_file = passphrase_file
        self._passphrase: bytes | None = None

    @classmethod
    def from_config(cls, layout: StateLayout, config: AgentConfig) -> FileKeystore:
        if config.keystore.passphrase_file is None:
            raise AgentStateError("agent.toml names no passphrase_file for the file keystore")
        return cls(layout, Path(config.keystore.passphrase_file))

    def passphrase(self) -> bytes:
        if self._passphrase is None:
            self._passphrase = read_secret_file(self._passphrase_file, "key passphrase")
        return self._passphrase

    def _load(self, path: Path) -> ec.EllipticCurvePrivateKey:
        try:
            key = FileSigner.load(path, self.passphrase()).private_key
        except KeyUnavailable as exc:
            # FileSigner's hint talks about the CA passphrase; this is the device key.
            missing = not path.exists()
            raise KeyUnavailable(
                f"the device key {path} is missing" if missing else
                f"cannot decrypt the device key {path}: wrong passphrase or not a PEM key",
                hint="enroll again into an empty --state-dir" if missing else
                f"check the passphrase file {self._passphrase_file}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyUnavailable(f"{path} does not hold an EC key")
        return key

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return self._load(self._layout.key)

    def create_pending(self) -> ec.EllipticCurvePrivateKey:
        self.discard_pending()
        key = generate_private_key(KEY_ALGORITHM)
        # O_EXCL and 0600 from the first byte; committed later by os.replace.
        write_encrypted_key(self._layout.pending_key, key, self.passphrase())
        return key

    def pending_key(self) -> ec.EllipticCurvePrivateKey | None:
        if not self._layout.pending_key.exists():
            return None
        return self._load(self._layout.pending_key)

    def commit_pending(self) -> None:
        replace_durably(self._layout.pending_key, self._layout.key)

    def discard_pending(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._layout.pending_key.unlink()

    def finish(self) -> None:
        """Nothing to do: ``os.replace`` already dropped the old key file."""

    def mtls_transport(self, server_url: str) -> Transport:
        context = client_tls_context(cadata=pinned_ca_pem(self._layout),
                                     cert_file=self._layout.cert, key_file=self._layout.key,
                                     password=self.passphrase())
        return HttpxTransport(server_url, context)


def key_id_of(signer: Pkcs11Signer) -> bytes:
    """CKA_ID of an agent key pair: SHA-256 of its uncompressed public point."""
    return hashlib.sha256(signer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)).digest()


# --- PKCS#11 token ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenKey:
    """One key pair on the token, for attribute checks."""

    label: str
    private: object  # python-pkcs11 PrivateKey
    public_key: ec.EllipticCurvePublicKey


class Pkcs11Keystore:
    """Keys on a PKCS#11 token; labels (never the PIN) are recorded in agent.toml."""

    kind = "pkcs11"

    def __init__(self, layout: StateLayout, config: AgentConfig) -> None:
        ks = config.keystore
        if ks.module is None or ks.token_label is None or ks.pin_file is None:
            raise AgentStateError("agent.toml lacks the PKCS#11 module, token label or PIN file")
        self._layout = layout
        self._config = config
        self._module = ks.module
        self._token = ks.token_label
        self._pin_file = Path(ks.pin_file)
        self._pin: str | None = None

    @property
    def config(self) -> AgentConfig:
        """agent.toml as this keystore last saved it (labels change on rotation)."""
        return self._config

    @property
    def key_label(self) -> str | None:
        return self._config.keystore.key_label

    def pin(self) -> str:
        if self._pin is None:
            try:
                self._pin = read_secret_file(self._pin_file, "PKCS#11 PIN").decode()
            except UnicodeDecodeError:
                raise AgentStateError(f"the PIN file {self._pin_file} is not UTF-8") from None
        return self._pin

    def _save(self, **changes: str | None) -> None:
        self._config = with_keystore(self._config, **changes)
        save_config(self._layout, self._config)

    def _new_label(self) -> str:
        # Unique per key: a label is how curl's engine and a later run find the object.
        return f"fleetward-{self._config.device_id}-{secrets.token_hex(4)}"

    def _open(self, label: str) -> Pkcs11Signer:
        return Pkcs11Signer.open(module=self._module, token_label=self._token, key_label=label,
                                 pin=self.pin())

    def token_key(self, label: str) -> TokenKey:
        signer = self._open(label)
        return TokenKey(label, signer.token_private_key, signer.public_key())

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        if self.key_label is None:
            raise AgentStateError("agent.toml names no current PKCS#11 key",
                                  hint="the enrollment did not finish; enroll again")
        return self._open(self.key_label).private_key

    def create_pending(self) -> ec.EllipticCurvePrivateKey:
        self.discard_pending()
        label = self._new_label()
        # Recorded first: a crash between here and the certificate must not leave a key
        # on the token that nothing refers to.
        self._save(pending_key_label=label)
        # Sign-only like every Pkcs11Signer key, but left modifiable: CKA_ID is the hash of
        # the public key, so it can only be set once the pair exists (and SoftHSM2 refuses
        # to lock a key later or to make a non-copyable locked copy of it).
        signer = Pkcs11Signer.generate(module=self._module, token_label=self._token,
                                       key_label=label, pin=self.pin(), modifiable=True)
        self._set_key_id(signer, label)
        return signer.private_key

    def _set_key_id(self, signer: Pkcs11Signer, label: str) -> None:
        """Give the new pair its own CKA_ID (SHA-256 of its public key).

        OpenSSL's pkcs11 engine (libp11) finds an EC private key's public point through
        the public key object with the same CKA_ID. Keys without one all share the empty
        ID, so with the current and the pending key on the token it may pair the current
        private key with the pending public key and refuse to load it ("unable to set
        private key"), depending on the token's object order. CKA_ID may be modified
        after creation (PKCS#11 v2.40 §4.7, table 25).
        """
        key_id = key_id_of(signer)
        private = signer.token_private_key
        try:
            public = private.session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
            private[pkcs11.Attribute.ID] = key_id
            public[pkcs11.Attribute.ID] = key_id
        except pkcs11.PKCS11Error as exc:
            raise KeyUnavailable(f"cannot set the ID of key {label!r} on token "
                                 f"{self._token!r}: {exc!r}") from exc

    def pending_key(self) -> ec.EllipticCurvePrivateKey | None:
        label = self._config.keystore.pending_key_label
        if label is None or not self._exists(label):
            return None
        return self._open(label).private_key

    def commit_pending(self) -> None:
        pending = self._config.keystore.pending_key_label
        if pending is None:
            raise AgentStateError("no pending PKCS#11 key to commit")
        self._save(key_label=pending, pending_key_label=None,
                   retired_key_label=self._config.keystore.key_label)

    def discard_pending(self) -> None:
        label = self._config.keystore.pending_key_label
        if label is None:
            return
        self._destroy(label)
        self._save(pending_key_label=None)

    def finish(self) -> None:
        label = self._config.keystore.retired_key_label
        if label is None:
            return
        self._destroy(label)
        self._save(retired_key_label=None)

    def _open_if_present(self, label: str) -> Pkcs11Signer | None:
        """The key labelled ``label``, or None if the token has none (a wrong PIN or a
        missing token still raises)."""
        try:
            return self._open(label)
        except KeyUnavailable as exc:
            if isinstance(exc.__cause__, pkcs11.NoSuchKey):
                return None
            raise

    def _exists(self, label: str) -> bool:
        return self._open_if_present(label) is not None

    def _destroy(self, label: str) -> None:
        """Destroy the private and public key objects labelled ``label`` (if present)."""
        signer = self._open_if_present(label)
        if signer is None:
            return  # never created (crash before generation) or already gone
        private = signer.token_private_key
        session = private.session
        try:
            for obj in list(session.get_objects({pkcs11.Attribute.LABEL: label})):
                if obj.object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                    obj.destroy()
        except pkcs11.PKCS11Error as exc:
            raise KeyUnavailable(f"cannot delete key {label!r} from token {self._token!r}: "
                                 f"{exc!r}") from exc

    def key_uri(self) -> str:
        """RFC 7512 PKCS#11 URI of the current private key (labels percent-encoded)."""
        if self.key_label is None:
            raise AgentStateError("agent.toml names no current PKCS#11 key")
        key_id = "".join(f"%{b:02x}" for b in key_id_of(self._open(self.key_label)))
        return (f"pkcs11:token={quote(self._token, safe='')};"
                f"object={quote(self.key_label, safe='')};id={key_id};type=private")

    def mtls_transport(self, server_url: str) -> Transport:
        write_atomic(self._layout.openssl_conf, openssl_engine_config(self._module).encode(),
                     0o600)
        return CurlTransport(server_url, ca_file=self._layout.ca, cert_file=self._layout.cert,
                             key_uri=self.key_uri(), pin=self.pin().encode(),
                             openssl_conf=self._layout.openssl_conf)


# --- no key pair ----------------------------------------------------------------------------


class NoKeystore:
    """A device that holds only a symmetric key (``auth = "sas"``): there is no key pair,
    so everything that needs one is refused with a hint instead of failing later."""

    kind = "none"

    @staticmethod
    def _refuse() -> AgentStateError:
        return AgentStateError(
            "this device has no key pair: it was set up to authenticate with SAS tokens only",
            hint="generate a key pair with fleetward-agent init --auth token, or enroll "
                 "for a certificate with fleetward-agent enroll")

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        raise self._refuse()

    def create_pending(self) -> ec.EllipticCurvePrivateKey:
        raise self._refuse()

    def pending_key(self) -> ec.EllipticCurvePrivateKey | None:
        return None

    def commit_pending(self) -> None:
        raise self._refuse()

    def discard_pending(self) -> None:
        """Nothing to discard."""

    def finish(self) -> None:
        """Nothing to finish."""

    def mtls_transport(self, server_url: str) -> Transport:
        raise self._refuse()


def open_keystore(layout: StateLayout,
                  config: AgentConfig) -> FileKeystore | Pkcs11Keystore | NoKeystore:
    """The keystore agent.toml describes."""
    if config.keystore.kind == "pkcs11":
        return Pkcs11Keystore(layout, config)
    if config.keystore.kind == "none":
        return NoKeystore()
    return FileKeystore.from_config(layout, config)


__all__ = ["KEY_ALGORITHM", "FileKeystore", "Keystore", "NoKeystore", "Pkcs11Keystore",
           "TokenKey", "open_keystore", "pinned_ca_pem", "same_public_key"]
