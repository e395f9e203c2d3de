"""Signers: where a CA key lives and how it signs.

A ``Signer`` hands cryptography's builders an ``EllipticCurvePrivateKey`` (or RSA key)
object. For a file key it is the real key; for a PKCS#11 key it is a proxy whose
``sign()`` calls the token, so the key never leaves the hardware (pyca/cryptography
accepts such custom key objects in its X.509 builders).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
)

from fleetward.errors import ConfigurationError, InvalidInput, KeyUnavailable

PASSPHRASE_ENV = "FLEETWARD_CA_PASSPHRASE"
PASSPHRASE_FILE_ENV = "FLEETWARD_CA_PASSPHRASE_FILE"


class Signer(Protocol):
    """A private key that can sign certificates, CRLs and OCSP responses."""

    @property
    def private_key(self) -> CertificateIssuerPrivateKeyTypes:
        """Object to pass to cryptography's ``*.sign(private_key, algorithm)``."""
        ...

    @property
    def key_ref(self) -> dict[str, str]:
        """How to find this key again (stored with the CA; never contains a secret)."""
        ...

    def public_key(self) -> CertificateIssuerPublicKeyTypes: ...


def signature_hash(public_key: CertificateIssuerPublicKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    """Hash to sign with, matched to the key strength (RFC 5480 §4 for ECDSA)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def generate_private_key(algorithm: str = "ec-p256") -> ec.EllipticCurvePrivateKey:
    curves: dict[str, ec.EllipticCurve] = {"ec-p256": ec.SECP256R1(), "ec-p384": ec.SECP384R1()}
    if algorithm not in curves:
        raise InvalidInput(
            f"unsupported CA key algorithm {algorithm!r}", hint="use ec-p256 or ec-p384"
        )
    return ec.generate_private_key(curves[algorithm])


class FileSigner:
    """A key kept as an encrypted PKCS#8 file (PBES2, AES-256-CBC)."""

    def __init__(self, key: CertificateIssuerPrivateKeyTypes, path: Path) -> None:
        self._key = key
        self._path = path

    @property
    def private_key(self) -> CertificateIssuerPrivateKeyTypes:
        return self._key

    @property
    def key_ref(self) -> dict[str, str]:
        return {"backend": "file", "path": str(self._path)}

    def public_key(self) -> CertificateIssuerPublicKeyTypes:
        return self._key.public_key()

    @classmethod
    def create(cls, path: Path, passphrase: bytes, algorithm: str = "ec-p256") -> FileSigner:
        key = generate_private_key(algorithm)
        write_encrypted_key(path, key, passphrase)
        return cls(key, path)

    @classmethod
    def load(cls, path: Path, passphrase: bytes) -> FileSigner:
        """Load and decrypt a PKCS#8 key file.

        Raises:
            KeyUnavailable: the file is missing or the passphrase is wrong.
        """
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyUnavailable(
                f"CA key file {path} is missing",
                hint="an offline key must be brought back for this operation",
            ) from None
        try:
            key = serialization.load_pem_private_key(data, password=passphrase)
        except (ValueError, TypeError) as exc:
            raise KeyUnavailable(
                f"cannot decrypt {path}: wrong passphrase or not a PEM private key",
                hint=f"set {PASSPHRASE_ENV} or {PASSPHRASE_FILE_ENV} to the CA passphrase",
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise KeyUnavailable(f"{path} holds an unsupported key type for a CA")
        return cls(key, path)


def write_encrypted_key(
    path: Path, key: CertificateIssuerPrivateKeyTypes, passphrase: bytes
) -> None:
    """Write ``key`` as encrypted PKCS#8, created 0600 (never world-readable, not even briefly)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    write_private_file(path, pem)


def write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` 0600; never overwrite (a key is never silently replaced).

    Raises:
        ConfigurationError: the file already exists.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(
            f"{path} already exists and will not be overwritten",
            hint="an earlier init may have stopped half-way: if this data directory holds "
            "nothing you need, remove it and run init again",
        ) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def read_passphrase(env: Mapping[str, str], default_file: Path | None = None) -> bytes:
    """The CA passphrase, from ``FLEETWARD_CA_PASSPHRASE`` or a file; never from argv.

    Raises:
        ConfigurationError: no source is set or the file is empty.
    """
    if env.get(PASSPHRASE_ENV):
        return env[PASSPHRASE_ENV].encode()
    file_name = env.get(PASSPHRASE_FILE_ENV)
    path = Path(file_name) if file_name else default_file
    if path is None or not path.exists():
        raise ConfigurationError(
            "no CA passphrase available",
            hint=f"set {PASSPHRASE_ENV} or {PASSPHRASE_FILE_ENV}",
        )
    value = path.read_bytes().strip()
    if not value:
        raise ConfigurationError(f"passphrase file {path} is empty", hint="write the passphrase")
    return value


def load_signer(key_ref: Mapping[str, Any], passphrase: bytes | None, pin: str | None) -> Signer:
    """Open the signer a stored ``key_ref`` describes.

    Raises:
        KeyUnavailable: the key cannot be opened here.
        ConfigurationError: the reference names an unknown backend.
    """
    backend = key_ref.get("backend")
    if backend == "file":
        if passphrase is None:
            raise KeyUnavailable("a file key needs the CA passphrase")
        return FileSigner.load(Path(key_ref["path"]), passphrase)
    if backend == "pkcs11":
        from fleetward.crypto.pkcs11 import Pkcs11Signer

        if pin is None:
            raise KeyUnavailable(
                "a PKCS#11 key needs the token PIN",
                hint="set FLEETWARD_PKCS11_PIN_FILE or [ca] pkcs11_pin_file",
            )
        return Pkcs11Signer.open(
            module=key_ref["module"],
            token_label=key_ref["token_label"],
            key_label=key_ref["key_label"],
            pin=pin,
        )
    raise ConfigurationError(f"unknown key backend {backend!r}", hint="use 'file' or 'pkcs11'")
