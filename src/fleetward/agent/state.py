"""The agent's state directory: what is stored where, written atomically.

Layout (the directory itself is 0700)::

    agent.toml          server URL, device id, MQTT URL, how the device authenticates
                        (``auth``: mtls | token | sas), keystore settings (never a PIN,
                        passphrase or key)
    ca.pem              the pinned CA certificates (RFC 7030 §4.1.1 explicit trust anchor)
    cert.pem            the device certificate (absent for a device set up by ``init``
                        that authenticates with access tokens or SAS only)
    device.key          encrypted PKCS#8 private key (file keystore only), 0600
    key-passphrase      generated passphrase of device.key, 0600 (unless the user gave a file)
    symmetric-key       the device's symmetric key for SAS tokens, base64 (sas only), 0600
    access-token.json   what ``run`` last obtained from the token endpoint, for ``status``:
                        binding, scope, expiry, jti (never the token itself), 0600
    openssl-pkcs11.cnf  OpenSSL engine configuration for curl (PKCS#11 keystore only), 0600
    agent.lock          held while a command changes the state

Every file is written to a temporary file in the same directory and renamed over the
old one (``os.replace`` is atomic on POSIX), so a crash leaves either the old or the
new file, never half of one. ``cert.pem.new`` and ``device.key.new`` exist only in the
middle of a renewal; ``recover_interrupted`` in ``renewal`` finishes or undoes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import stat
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from fleetward.agent.errors import AgentStateError
from fleetward.errors import InvalidInput
from fleetward.model import validate_device_id

# "none": a device that holds only a symmetric key (SAS) and no key pair at all.
KEYSTORE_KINDS = ("file", "pkcs11", "none")
# How the device authenticates on its channels (docs/credentials.md):
# mtls  - its certificate in the TLS handshake (what `enroll` sets up);
# token - short-lived access tokens from the token endpoint (/oauth2/token), bound to the
#         certificate (cnf x5t#S256) or to the device key (DPoP, cnf jkt);
# sas   - SAS tokens signed with the device's symmetric key.
AUTH_MODES = ("mtls", "token", "sas")
# What a token is bound to: auto = the certificate when the device has one and Python's
# TLS can present it (file keystore), else the key (private_key_jwt + DPoP).
TOKEN_BINDINGS = ("auto", "certificate", "key")
PASSPHRASE_BYTES = 32  # 256 bits from the OS CSPRNG, hex-encoded in the file


@dataclass(frozen=True, slots=True)
class StateLayout:
    """Names every file in a state directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "agent.toml"

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.root / "cert.pem"

    @property
    def pending_cert(self) -> Path:
        return self.root / "cert.pem.new"

    @property
    def key(self) -> Path:
        return self.root / "device.key"

    @property
    def pending_key(self) -> Path:
        return self.root / "device.key.new"

    @property
    def passphrase(self) -> Path:
        return self.root / "key-passphrase"

    @property
    def symmetric_key(self) -> Path:
        return self.root / "symmetric-key"

    @property
    def token_status(self) -> Path:
        return self.root / "access-token.json"

    @property
    def openssl_conf(self) -> Path:
        return self.root / "openssl-pkcs11.cnf"

    @property
    def lock(self) -> Path:
        return self.root / "agent.lock"


@dataclass(frozen=True, slots=True)
class KeystoreConfig:
    """Where the device key lives. References only: no PIN, no passphrase."""

    kind: str  # file | pkcs11
    passphrase_file: str | None = None  # file: the file holding device.key's passphrase
    module: str | None = None  # pkcs11: path of the PKCS#11 module
    token_label: str | None = None
    pin_file: str | None = None  # pkcs11: file holding the user PIN
    key_label: str | None = None  # pkcs11: the current key object
    # pkcs11: a key generated for a renewal still in flight, recorded before the request
    # so a crash never leaves an unreferenced key on the token.
    pending_key_label: str | None = None
    # pkcs11: the previous key, destroyed once the new certificate is in place.
    retired_key_label: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KEYSTORE_KINDS:
            raise AgentStateError(f"unknown keystore kind {self.kind!r}",
                                  hint="use 'file' or 'pkcs11'")
        if self.kind == "file" and not self.passphrase_file:
            raise AgentStateError("the file keystore needs passphrase_file")
        if self.kind == "none" and any(getattr(self, f.name) is not None
                                       for f in fields(self) if f.name != "kind"):
            raise AgentStateError("the keystore of kind none takes no other settings")
        if self.kind == "pkcs11":
            missing = [n for n in ("module", "token_label", "pin_file") if not getattr(self, n)]
            if missing:
                raise AgentStateError(f"the pkcs11 keystore needs {', '.join(missing)}")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """``agent.toml``."""

    server_url: str
    device_id: str
    keystore: KeystoreConfig
    est_label: str | None = None  # RFC 7030 §3.2.2 optional label path segment
    # The MQTT listener, mqtts://host[:port]; None: the server URL's host, port 8883.
    mqtt_url: str | None = None
    auth: str = "mtls"  # AUTH_MODES
    token_binding: str = "auto"  # TOKEN_BINDINGS (auth = token only)

    def __post_init__(self) -> None:
        validate_server_url(self.server_url)
        validate_device_id(self.device_id)
        if self.est_label is not None:
            validate_est_label(self.est_label)
        if self.mqtt_url is not None:
            validate_mqtt_url(self.mqtt_url)
        validate_auth_mode(self.auth)
        validate_token_binding(self.token_binding)
        if self.keystore.kind == "none" and self.auth != "sas":
            raise AgentStateError(
                f"auth {self.auth!r} needs a key pair, and this device has none (it was set "
                "up for SAS only)",
                hint="generate one: fleetward-agent init --auth token --state-dir DIR …")

    def effective_mqtt_url(self) -> str:
        """``mqtt_url``, or the EST server's host on the IANA MQTT-over-TLS port 8883."""
        if self.mqtt_url is not None:
            return self.mqtt_url
        host = urlsplit(self.server_url).hostname or ""
        return f"mqtts://{'[' + host + ']' if ':' in host else host}:{DEFAULT_MQTT_PORT}"


def validate_server_url(url: str) -> str:
    """An ``https://host[:port]`` base URL: EST is only defined over TLS (RFC 7030 §3.3).

    Raises:
        InvalidInput: another scheme, credentials, a query or a fragment.
    """
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidInput(f"server URL {url!r} is not an https:// URL",
                           hint="e.g. --server https://fleetward.example:8443")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise InvalidInput("the server URL must not carry credentials, a query or a fragment",
                           hint="pass the token with --token-file or FLEETWARD_BOOTSTRAP_TOKEN")
    return url.rstrip("/")


DEFAULT_MQTT_PORT = 8883  # IANA "secure-mqtt"


def validate_mqtt_url(url: str) -> str:
    """An ``mqtts://host[:port]`` URL: the agent speaks MQTT over TLS only (the device
    certificate is its credential; MQTT 5.0 §5.4.9, 3.1.1 §5.4.9 recommend TLS).

    Raises:
        InvalidInput: another scheme, credentials, a path, a query or a fragment.
    """
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme != "mqtts" or not parts.hostname or port == -1 or port == 0:
        raise InvalidInput(f"MQTT URL {url!r} is not an mqtts://host[:port] URL",
                           hint="e.g. --mqtt-url mqtts://fleetward.example:8883 (plain mqtt:// "
                                "is not supported: the certificate is the credential)")
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query \
            or parts.fragment:
        raise InvalidInput("the MQTT URL must be mqtts://host[:port] and nothing else",
                           hint="no credentials, path, query or fragment")
    return url.rstrip("/")


def validate_auth_mode(mode: str) -> str:
    """Raises: InvalidInput unless ``mode`` is one of ``AUTH_MODES``."""
    if mode not in AUTH_MODES:
        raise InvalidInput(f"unknown authentication mode {mode!r}",
                           hint="use --auth mtls, --auth token or --auth sas")
    return mode


def validate_token_binding(binding: str) -> str:
    """Raises: InvalidInput unless ``binding`` is one of ``TOKEN_BINDINGS``."""
    if binding not in TOKEN_BINDINGS:
        raise InvalidInput(f"unknown token binding {binding!r}",
                           hint="use --token-binding auto, certificate or key")
    return binding


def validate_est_label(label: str) -> str:
    """RFC 7030 §3.2.2 label: one path segment (the server accepts [a-z][a-z0-9_-]{0,31})."""
    if not label or len(label) > 32 or not label[0].islower() or not all(
            c.islower() or c.isdigit() or c in "_-" for c in label):
        raise InvalidInput(f"invalid EST label {label!r}",
                           hint="labels are profile names such as 'device' or 'gateway'")
    return label


# --- files ------------------------------------------------------------------------------


def ensure_state_dir(root: Path) -> StateLayout:
    """Create the state directory 0700, or tighten an existing one we own to 0700.

    Raises:
        AgentStateError: it exists but is not a directory, or belongs to another user.
    """
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = root.stat()
    except OSError as exc:
        raise AgentStateError(f"cannot create the state directory {root}: {exc.strerror}",
                              hint="choose a directory this user can write") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise AgentStateError(f"{root} is not a directory", hint="choose another --state-dir")
    if info.st_uid != os.geteuid():
        raise AgentStateError(f"the state directory {root} belongs to another user",
                              hint="run the agent as the directory's owner")
    if stat.S_IMODE(info.st_mode) != 0o700:
        root.chmod(0o700)
    return StateLayout(root)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``.

    The temporary file is created with ``O_EXCL`` and ``mode`` from the start (a secret
    is never world-readable, not even briefly) and fsynced before the rename, and the
    directory after it, so the new content survives a power cut once this returns.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def replace_durably(src: Path, dst: Path) -> None:
    """``os.replace`` followed by an fsync of the directory (the rename is then durable)."""
    os.replace(src, dst)
    fsync_dir(dst.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_secret_file(path: Path, what: str) -> bytes:
    """The first line of a secret file that only its owner can read.

    Raises:
        AgentStateError: missing, empty, or readable by group or others (as ssh does for
            private keys: a secret others could read is no longer a secret).
    """
    try:
        info = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise AgentStateError(f"cannot read the {what} file {path}: {exc.strerror}",
                              hint=f"create it with the {what} on one line, mode 0600") from exc
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise AgentStateError(f"the {what} file {path} is readable by other users",
                              hint=f"chmod 600 {path}")
    value = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not value:
        raise AgentStateError(f"the {what} file {path} is empty",
                              hint=f"write the {what} on its first line")
    return value


def generate_passphrase_file(path: Path) -> None:
    """A fresh random passphrase in ``path`` (0600), unless the file already exists."""
    if path.exists():
        return
    write_atomic(path, secrets.token_hex(PASSPHRASE_BYTES).encode() + b"\n", 0o600)


@contextlib.contextmanager
def state_lock(layout: StateLayout) -> Iterator[None]:
    """Exclusive lock on the state directory (``run`` and a manual ``renew`` never
    change it at the same time).

    Raises:
        AgentStateError: another agent process holds it.
    """
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AgentStateError(
                f"another fleetward-agent is changing {layout.root} right now",
                hint="wait for it to finish and try again") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --- agent.toml ---------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    # JSON string escapes (\" \\ \n \t \uXXXX) are a subset of TOML basic-string escapes.
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"unsupported TOML value {value!r}")


def dump_config(config: AgentConfig) -> bytes:
    lines = ["# fleetward-agent state; written by the agent, do not edit while it runs",
             f"server_url = {_toml_value(config.server_url)}",
             f"device_id = {_toml_value(config.device_id)}"]
    if config.est_label is not None:
        lines.append(f"est_label = {_toml_value(config.est_label)}")
    if config.mqtt_url is not None:
        lines.append(f"mqtt_url = {_toml_value(config.mqtt_url)}")
    # Defaults are left out: the file of an agent that never changed them stays as it was.
    if config.auth != "mtls":
        lines.append(f"auth = {_toml_value(config.auth)}")
    if config.token_binding != "auto":
        lines.append(f"token_binding = {_toml_value(config.token_binding)}")
    lines.append("")
    lines.append("[keystore]")
    for field in fields(KeystoreConfig):
        value = getattr(config.keystore, field.name)
        if value is not None:
            lines.append(f"{field.name} = {_toml_value(value)}")
    return ("\n".join(lines) + "\n").encode()


def save_config(layout: StateLayout, config: AgentConfig) -> None:
    write_atomic(layout.config, dump_config(config), 0o600)


def load_config(layout: StateLayout) -> AgentConfig:
    """Read ``agent.toml``; unknown keys are errors (a typo must not be ignored).

    Raises:
        AgentStateError: missing, unreadable or invalid.
    """
    try:
        raw = tomllib.loads(layout.config.read_text())
    except FileNotFoundError:
        raise AgentStateError(f"{layout.config} does not exist: this device is not enrolled",
                              hint="enroll first: fleetward-agent enroll --state-dir "
                                   f"{layout.root} …") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AgentStateError(f"cannot read {layout.config}: {exc}") from exc
    keystore_raw = raw.pop("keystore", None)
    top = {"server_url", "device_id", "est_label", "mqtt_url", "auth", "token_binding"}
    known = {f.name for f in fields(KeystoreConfig)}
    if not isinstance(keystore_raw, dict) or set(raw) - top or set(keystore_raw) - known:
        unknown = sorted((set(raw) - top) | (set(keystore_raw or {}) - known))
        raise AgentStateError(f"{layout.config} has unknown or missing entries: "
                              f"{', '.join(unknown) or '[keystore]'}")
    values = [*raw.values(), *keystore_raw.values()]
    if not all(isinstance(v, str) for v in values):
        raise AgentStateError(f"{layout.config}: every value must be a string")
    try:
        return AgentConfig(server_url=raw["server_url"], device_id=raw["device_id"],
                           est_label=raw.get("est_label"), mqtt_url=raw.get("mqtt_url"),
                           auth=raw.get("auth", "mtls"),
                           token_binding=raw.get("token_binding", "auto"),
                           keystore=KeystoreConfig(**keystore_raw))
    except KeyError as exc:
        raise AgentStateError(f"{layout.config} lacks {exc.args[0]}") from None
    except TypeError:
        raise AgentStateError(f"{layout.config}: [keystore] lacks kind") from None
    except InvalidInput as exc:
        raise AgentStateError(f"{layout.config}: {exc.message}", hint=exc.hint) from None


def with_keystore(config: AgentConfig, **changes: str | None) -> AgentConfig:
    """``config`` with some optional keystore fields (labels, files) changed."""
    if "kind" in changes:
        raise ValueError("the keystore kind never changes")
    updated: Any = replace  # dataclasses.replace: the field names are checked at runtime
    return replace(config, keystore=updated(config.keystore, **changes))


# --- certificates --------------------------------------------------------------------------


def load_certificate_file(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file.

    Raises:
        AgentStateError: missing or not a PEM certificate.
    """
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise AgentStateError(f"{path} does not exist: this device has no certificate",
                              hint="enroll first with `fleetward-agent enroll`") from None
    except ValueError as exc:
        raise AgentStateError(f"{path} is not a PEM certificate: {exc}") from exc


def load_ca_bundle(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError:
        raise AgentStateError(f"{path} does not exist: no pinned CA",
                              hint="enroll first with `fleetward-agent enroll`") from None
    except ValueError as exc:
        raise AgentStateError(f"{path} is not a PEM bundle: {exc}") from exc
    return certs


__all__ = ["AUTH_MODES", "TOKEN_BINDINGS", "AgentConfig", "KeystoreConfig", "StateLayout",
           "dump_config", "ensure_state_dir",
           "generate_passphrase_file", "load_ca_bundle", "load_certificate_file",
           "load_config", "read_secret_file", "replace_durably", "save_config", "state_lock",
           "validate_auth_mode", "validate_est_label", "validate_mqtt_url",
           "validate_server_url", "validate_token_binding", "with_keystore", "write_atomic"]
