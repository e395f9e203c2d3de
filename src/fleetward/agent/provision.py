"""``fleetward-agent init``: set up a device that authenticates with access tokens or SAS
tokens instead of (or beside) a certificate, without enrollment.

1. Trust: pin the server's CA, either by fingerprint exactly as ``enroll`` does
   (``/cacerts`` fetched without server authentication, accepted only if a CA in it has
   the pinned SHA-256, fetched again over TLS verified against it), or from a PEM file
   obtained out of band (``--ca-file``: no request is made; the first ``run`` checks the
   server against it).
2. ``agent.toml``: server URL, device id, MQTT URL, ``auth`` and the keystore.
3. The credential:

   - ``token``: a key pair in the keystore (encrypted file or PKCS#11 token, generated
     on the token and never leaving it). Its public key is returned for the operator to
     register (``fleetward credential add --device ID --kind public-key``); assertions
     and DPoP proofs are then signed by it.
   - ``sas``: the device's symmetric key, read from a 0600 file (never argv) and stored
     0600 in the state directory.

Run again on the same state directory (same device and server), ``init`` keeps what is
there — an existing key pair or certificate — and changes the mode: an enrolled device
switches to tokens this way and its certificate key signs the assertions and proofs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path

import structlog
from cryptography import x509

from fleetward.agent.enroll import Pkcs11Options, fetch_pinned_trust
from fleetward.agent.errors import AgentStateError, TrustBootstrapFailed
from fleetward.agent.est_client import certs_to_pem
from fleetward.agent.keystore import FileKeystore, Pkcs11Keystore, open_keystore
from fleetward.agent.state import (
    AgentConfig,
    KeystoreConfig,
    StateLayout,
    ensure_state_dir,
    generate_passphrase_file,
    load_config,
    read_secret_file,
    save_config,
    state_lock,
    validate_mqtt_url,
    validate_server_url,
    validate_token_binding,
    write_atomic,
)
from fleetward.agent.tokens import parse_symmetric_key, public_key_pem
from fleetward.clock import Clock, SystemClock
from fleetward.errors import Conflict, InvalidInput
from fleetward.model import validate_device_id

log = structlog.get_logger("fleetward.agent")

INIT_MODES = ("token", "sas")  # mtls comes from `enroll`


@dataclass(frozen=True, slots=True)
class InitOptions:
    server_url: str
    device_id: str
    state_dir: Path
    auth: str  # token | sas
    ca_fingerprint: bytes | None = None  # SHA-256 of the CA to pin (as enroll)
    ca_file: Path | None = None  # or: the CA certificates, PEM, obtained out of band
    mqtt_url: str | None = None  # None: kept, or the server's host on port 8883
    key_file: Path | None = None  # sas: the file holding the base64 symmetric key (0600)
    token_binding: str = "auto"
    passphrase_file: Path | None = None  # file keystore: None = generate one in state_dir
    pkcs11: Pkcs11Options | None = None  # token: the key lives on this PKCS#11 token


@dataclass(frozen=True, slots=True)
class InitResult:
    config: AgentConfig
    public_key_pem: bytes | None  # token: what the operator registers
    created_key: bool  # token: a key pair was generated now (not kept from before)


def load_ca_file(path: Path, now: dt.datetime) -> list[x509.Certificate]:
    """The CA certificates of a PEM file given with ``--ca-file``.

    Raises:
        TrustBootstrapFailed: unreadable, no certificate, a certificate that is not a
            CA, or one that is not valid now.
    """
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise TrustBootstrapFailed(f"cannot read the CA file {path}: {exc.strerror}",
                                   hint="pass the server's CA chain (chain.pem) as a file "
                                        "this user can read") from exc
    except ValueError as exc:
        raise TrustBootstrapFailed(f"{path} holds no PEM certificates",
                                   hint="pass the server's CA chain (chain.pem)") from exc
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise TrustBootstrapFailed(
                f"{path} holds a certificate that is not a CA: {cert.subject.rfc4514_string()}",
                hint="pin the CA certificates (root and issuing CA), not a server or device "
                     "certificate")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise TrustBootstrapFailed(f"the CA {cert.subject.rfc4514_string()} in {path} is "
                                       "not valid now",
                                       hint="check the device clock and the CA file")
    return certs


def _check_options(options: InitOptions, existing: AgentConfig | None) -> str:
    """Validate everything that needs no I/O; returns the server URL, normalised.

    Raises:
        InvalidInput: a bad or missing option.
        Conflict: the state directory belongs to another device or server.
    """
    server_url = validate_server_url(options.server_url)
    validate_device_id(options.device_id)
    validate_token_binding(options.token_binding)
    if options.mqtt_url is not None:
        validate_mqtt_url(options.mqtt_url)
    if options.auth not in INIT_MODES:
        raise InvalidInput(f"init sets up --auth token or --auth sas, not {options.auth!r}",
                           hint="a device with a certificate is set up by "
                                "fleetward-agent enroll")
    if options.ca_fingerprint is not None and options.ca_file is not None:
        raise InvalidInput("give the CA once", hint="use --ca-fingerprint or --ca-file")
    if options.ca_fingerprint is None and options.ca_file is None and existing is None:
        raise InvalidInput("the server's CA must be pinned",
                           hint="pass --ca-fingerprint HEX (obtained out of band) or "
                                "--ca-file chain.pem")
    if options.auth == "sas":
        if options.key_file is None:
            raise InvalidInput("--auth sas needs --key-file",
                               hint="a file (mode 0600) holding the primary_key the server "
                                    "showed, base64, on one line")
        if options.pkcs11 is not None or options.passphrase_file is not None:
            raise InvalidInput("--auth sas uses no key pair",
                               hint="leave out the keystore options")
    elif options.key_file is not None:
        raise InvalidInput("--key-file is the symmetric key of --auth sas",
                           hint="--auth token generates a key pair instead")
    if options.pkcs11 is not None and options.passphrase_file is not None:
        raise InvalidInput("--key-passphrase-file is for the file keystore only",
                           hint="a token key is protected by the token PIN")
    if existing is not None:
        if existing.device_id != options.device_id or existing.server_url != server_url:
            raise Conflict(f"{options.state_dir} belongs to device {existing.device_id} at "
                           f"{existing.server_url}",
                           hint="use another --state-dir for another device or server")
        has_keys = existing.keystore.kind != "none"
        if has_keys and (options.pkcs11 is not None or options.passphrase_file is not None):
            raise InvalidInput("this state directory already has its keystore",
                               hint="leave out the keystore options to keep its key")
    return server_url


def _keystore_config(options: InitOptions, layout: StateLayout) -> KeystoreConfig:
    if options.auth == "sas":
        return KeystoreConfig(kind="none")
    if options.pkcs11 is not None:
        return KeystoreConfig(kind="pkcs11", module=options.pkcs11.module,
                              token_label=options.pkcs11.token_label,
                              pin_file=str(options.pkcs11.pin_file.resolve()))
    passphrase_file = options.passphrase_file or layout.passphrase
    if options.passphrase_file is None:
        generate_passphrase_file(layout.passphrase)
    return KeystoreConfig(kind="file", passphrase_file=str(passphrase_file.resolve()))


def _has_current_key(layout: StateLayout, config: AgentConfig) -> bool:
    # Decided from the state, never by trying to load the key: a wrong passphrase must
    # not look like "no key" and get the key overwritten.
    if config.keystore.kind == "file":
        return layout.key.exists()
    if config.keystore.kind == "pkcs11":
        return config.keystore.key_label is not None
    return False


def init_device(options: InitOptions, *, clock: Clock | None = None) -> InitResult:
    """Set up ``options.state_dir`` for token or SAS authentication.

    Args:
        options: what ``fleetward-agent init`` was told.
        clock: "now" for the CA checks.

    Returns:
        The saved configuration and, for tokens, the public key to register.

    Raises:
        InvalidInput: a bad or missing option.
        Conflict: the state directory belongs to another device or server.
        TrustBootstrapFailed: the CA cannot be pinned (nothing written).
        ServerUnreachable, ServerRefused: the CA fingerprint cannot be checked.
        AgentStateError, KeyUnavailable: a secret file, the PIN or the key cannot be used.
    """
    clock = clock or SystemClock()
    layout = StateLayout(options.state_dir)
    existing = load_config(layout) if layout.config.exists() else None
    server_url = _check_options(options, existing)
    # Secrets are checked before anything is written or the server is asked.
    symmetric_line = None
    if options.key_file is not None:
        symmetric_line = read_secret_file(options.key_file, "symmetric key").strip()
        parse_symmetric_key(symmetric_line)
    if options.pkcs11 is not None:
        read_secret_file(options.pkcs11.pin_file, "PKCS#11 PIN")
    elif options.passphrase_file is not None:
        read_secret_file(options.passphrase_file, "key passphrase")

    trusted: list[x509.Certificate] | None = None
    if options.ca_fingerprint is not None:
        trusted = fetch_pinned_trust(server_url, options.ca_fingerprint, est_label=None,
                                     clock=clock)
    elif options.ca_file is not None:
        trusted = load_ca_file(options.ca_file, clock.now())

    ensure_state_dir(layout.root)
    with state_lock(layout):
        existing = load_config(layout) if layout.config.exists() else None
        if existing is not None:
            _check_options(options, existing)
        if trusted is not None:
            write_atomic(layout.ca, certs_to_pem(trusted), 0o644)
        elif not layout.ca.exists():
            raise AgentStateError(f"{layout.root} has no pinned CA",
                                  hint="pass --ca-fingerprint HEX or --ca-file chain.pem")
        if existing is not None and existing.keystore.kind != "none":
            keystore_config = existing.keystore
        else:
            keystore_config = _keystore_config(options, layout)
        config = AgentConfig(
            server_url=server_url, device_id=options.device_id, keystore=keystore_config,
            est_label=existing.est_label if existing is not None else None,
            mqtt_url=options.mqtt_url or (existing.mqtt_url if existing is not None else None),
            auth=options.auth, token_binding=options.token_binding)
        # Recorded explicitly, so agent.toml says where the device connects.
        config = replace(config, mqtt_url=config.effective_mqtt_url())
        public_pem = None
        created = False
        if symmetric_line is not None:  # sas (_check_options demands --key-file)
            write_atomic(layout.symmetric_key, symmetric_line + b"\n", 0o600)
            save_config(layout, config)
        else:
            save_config(layout, config)
            keystore = open_keystore(layout, config)
            if not _has_current_key(layout, config):
                keystore.discard_pending()
                keystore.create_pending()
                keystore.commit_pending()
                keystore.finish()
                created = True
            if isinstance(keystore, Pkcs11Keystore):
                config = keystore.config  # the key's label was recorded
            elif not isinstance(keystore, FileKeystore):
                raise AgentStateError("access tokens need a key pair")
            public_pem = public_key_pem(keystore.private_key())
    log.info("device set up", device=options.device_id, auth=options.auth,
             key_generated=created)
    return InitResult(config, public_pem, created)


__all__ = ["INIT_MODES", "InitOptions", "InitResult", "init_device", "load_ca_file"]
