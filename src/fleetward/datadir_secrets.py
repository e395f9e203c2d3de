"""The secrets a data directory holds, read the same way by every server-host command
(``serve``, ``init``, offline ``audit verify``, ``ca reissue-server-cert``): the CA key
passphrase, the audit MAC key and the PKCS#11 PIN. Environment variables win over files,
so a secret manager can supply them without anything on disk."""

from __future__ import annotations

import os
from pathlib import Path

from fleetward.config import PIN_ENV, PIN_FILE_ENV, DataDirLayout, Settings
from fleetward.crypto.signer import read_passphrase
from fleetward.errors import ConfigurationError


def pkcs11_pin(settings: Settings) -> str | None:
    """The token PIN from ``FLEETWARD_PKCS11_PIN``, its file variable, or the configured
    PIN file; None for file keys.

    Raises:
        ConfigurationError: the PIN file cannot be read.
    """
    if os.environ.get(PIN_ENV):
        return os.environ[PIN_ENV]
    path = os.environ.get(PIN_FILE_ENV) or settings.ca.pkcs11_pin_file
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the PKCS#11 PIN file {path}: {exc}") from exc
    return None


def ca_passphrase(layout: DataDirLayout) -> bytes:
    return read_passphrase(os.environ, layout.passphrase_file)


def audit_key(layout: DataDirLayout) -> bytes:
    """The audit log's MAC key (hex text in ``secrets/audit.key``).

    Raises:
        ConfigurationError: missing or not hex.
    """
    try:
        key = layout.audit_key_file.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"audit key {layout.audit_key_file} is missing",
                                 hint="restore it from backup; without it the audit log "
                                      "cannot be extended or verified") from None
    try:
        return bytes.fromhex(key.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ConfigurationError(f"audit key {layout.audit_key_file} is not hex text",
                                 hint="restore the file from backup") from None
