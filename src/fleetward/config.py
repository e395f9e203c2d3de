"""Frozen configuration, one dataclass per subsystem; units in the field names.

Sources, later wins: defaults → ``<data dir>/fleetward.toml`` → ``FLEETWARD_*`` env.
Secrets (CA passphrase, PKCS#11 PIN) are never config values: only the *path* of the
file that holds them, or the name of the env var, is.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetward.errors import ConfigurationError

CONFIG_FILE_NAME = "fleetward.toml"
# Where secrets come from: environment variables naming the secret or its file.
PIN_ENV = "FLEETWARD_PKCS11_PIN"
PIN_FILE_ENV = "FLEETWARD_PKCS11_PIN_FILE"
IMPORT_PASSPHRASE_ENV = "FLEETWARD_IMPORT_KEY_PASSPHRASE"


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    host: str = "127.0.0.1"
    public_port: int = 8080  # plain HTTP: CRL, OCSP, CA certificates (RFC 5280 §4.2.1.13)
    admin_port: int = 9443  # HTTPS: admin REST API
    device_port: int = 8443  # HTTPS: device API (mTLS or token)
    mqtt_port: int = 8883  # MQTT over TLS
    # Base URL written into CDP and AIA extensions; devices must be able to reach it.
    public_url: str = "http://localhost:8080"


@dataclass(frozen=True, slots=True)
class CAConfig:
    device_validity_days: int = 365
    gateway_validity_days: int = 365
    server_validity_days: int = 397  # CA/B Forum limit for TLS server certificates
    bootstrap_validity_days: int = 30
    root_validity_days: int = 7300
    issuing_validity_days: int = 3650
    crl_validity_hours: int = 24  # nextUpdate - thisUpdate (RFC 5280 §5.1.2.5)
    crl_refresh_margin_hours: int = 12  # re-sign when less than this is left
    ocsp_validity_hours: int = 4  # nextUpdate of OCSP responses (RFC 6960 §2.4)
    backdate_seconds: int = 300  # notBefore slack for device clocks that run behind
    # Default key backend for new CA keys: "file" (encrypted PKCS#8) or "pkcs11".
    key_backend: str = "file"
    pkcs11_module: str = ""
    pkcs11_token_label: str = ""
    pkcs11_pin_file: str = ""  # path; the PIN itself is never a config value


@dataclass(frozen=True, slots=True)
class EnrollConfig:
    # After simplereenroll the old certificate stays valid this long (devices switch over
    # gracefully), then it is revoked as superseded (RFC 5280 §5.3.1 reason 4).
    reenroll_overlap_seconds: int = 86400
    # A device whose certificate expired may re-enroll this long after notAfter, with a
    # CSR signed by the same key (no mTLS: the handshake refuses an expired certificate).
    expired_grace_days: int = 30
    # Retry-After of a 202 while an OEM enrollment waits for approval (RFC 7030 §4.2.3).
    approval_retry_after_seconds: int = 60
    # How often superseded certificates past their overlap are revoked.
    supersede_sweep_seconds: int = 30
    # Owner of devices registered on first contact when nothing names one.
    jit_owner: str = "unassigned"

    def __post_init__(self) -> None:
        for name in ("reenroll_overlap_seconds", "expired_grace_days",
                     "approval_retry_after_seconds", "supersede_sweep_seconds"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"[enroll] {name} must not be negative",
                                         hint="use 0 to switch the delay off")
        if self.supersede_sweep_seconds == 0:
            raise ConfigurationError("[enroll] supersede_sweep_seconds must be at least 1",
                                     hint="the default is 30")


@dataclass(frozen=True, slots=True)
class MqttConfig:
    # Larger packets are refused (MQTT 5 §3.1.2.11.4 Maximum Packet Size; DISCONNECT 0x95).
    max_packet_size_bytes: int = 262144
    # AWS IoT Core allows 256 bytes; the spec allows 65535. Longer topics are malformed.
    max_topic_bytes: int = 1024
    max_topic_levels: int = 16
    # Keep Alive above this is lowered with Server Keep Alive (MQTT 5 §3.2.2.3.14).
    max_keepalive_seconds: int = 1200
    max_session_expiry_seconds: int = 604800  # a week of offline QoS 1 messages at most
    # Receive Maximum we announce and the in-flight QoS 1 window we use towards clients.
    max_inflight_messages: int = 64
    max_queued_messages: int = 1000  # per session; beyond it QoS 1 messages are dropped
    max_subscriptions_per_session: int = 64
    max_retained_messages: int = 100000  # whole server; beyond it new retains are refused
    # Payload bytes of all retained messages together: without it 100,000 messages of
    # the maximum packet size would be 25 GiB of memory.
    max_retained_bytes: int = 67108864
    connect_timeout_seconds: int = 10  # TLS, then CONNECT, must each finish within this
    # Beyond these, new TCP connections are reset before any TLS work: memory stays
    # bounded, and clients that never finish a handshake cannot hold more than
    # max_pending_handshakes slots for connect_timeout_seconds each. The lowest limit
    # that applies binds (a pending budget above max_connections is simply not reached).
    max_connections: int = 20000
    max_pending_handshakes: int = 1000
    # One address's share of the pending budget (a NAT gateway in front of many devices
    # that reconnect at once sees resets and retries with its backoff).
    max_pending_handshakes_per_source: int = 100
    # "optional": TLS also accepts clients without a certificate, which must then
    # authenticate in CONNECT (an access token or a SAS token, docs/credentials.md);
    # "required": mutual TLS only, certificate-less clients fail the handshake.
    client_certificate: str = "optional"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and value <= 0:
                raise ConfigurationError(f"[mqtt] {f.name} must be positive",
                                         hint="remove the key to use the default")
        if self.client_certificate not in ("optional", "required"):
            raise ConfigurationError(
                f"[mqtt] client_certificate {self.client_certificate!r} is unknown",
                hint='use "optional" (tokens and SAS too) or "required" (mTLS only)')


@dataclass(frozen=True, slots=True)
class DeviceApiConfig:
    max_message_bytes: int = 65536  # one telemetry record or event, JSON text
    long_poll_max_seconds: int = 30  # GET /v1/commands?wait= is capped at this
    command_ttl_seconds: int = 86400  # undelivered commands expire after this
    max_pending_commands: int = 100  # per device; more are refused (HTTP 429)
    # The device HTTPS listener's budgets (see [mqtt] max_connections).
    max_connections: int = 5000
    max_pending_handshakes: int = 1000
    max_pending_handshakes_per_source: int = 100
    # A connection with no request in flight is closed after this: clients without a
    # certificate (EST with a bootstrap token) must not hold a connection slot for long.
    idle_timeout_seconds: int = 60

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ConfigurationError(f"[device_api] {f.name} must be positive",
                                         hint="remove the key to use the default")


@dataclass(frozen=True, slots=True)
class SinkConfig:
    sql: bool = True  # the device_messages table
    nats_url: str = ""  # e.g. nats://127.0.0.1:4222; empty = no NATS JetStream sink
    nats_stream: str = "FLEETWARD_MESSAGES"
    nats_subject_prefix: str = "fleetward"
    # Messages are written in batches; a QoS 1 PUBACK waits for its batch.
    batch_max_messages: int = 500
    batch_max_delay_ms: int = 20


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    # How often each node reads control-plane changes (revocations, state changes,
    # policy edits) written by other nodes; the local node applies its own at once.
    change_poll_ms: int = 250
    # Refusals of the same peer/device are audited at most once per this window.
    refusal_audit_window_seconds: int = 60


@dataclass(frozen=True, slots=True)
class TokensConfig:
    """The OAuth 2.0 token service and the credentials devices use without (or beside)
    a certificate: access tokens (RFC 9068 JWTs), DPoP proofs (RFC 9449), client
    assertions (RFC 7523), SAS tokens and API keys."""

    # The "iss" of every access token and the base of the RFC 8414 metadata URL. Empty:
    # https://<host of [listeners] public_url>:<device_port>, the device listener.
    issuer: str = ""
    # Lifetimes of access tokens: the default, the most a device may ask for, and the
    # shorter one of unbound bearer tokens (devices without a key pair, RFC 6750 §5.3).
    access_token_lifetime_seconds: int = 900
    max_access_token_lifetime_seconds: int = 3600
    unbound_token_lifetime_seconds: int = 300
    # Tolerated difference between a device's clock and ours (RFC 8725 §3.10; RFC 7519
    # §4.1.4 "some small leeway").
    clock_skew_seconds: int = 60
    # A client assertion (RFC 7523 §3) must expire within this of now; its jti is
    # remembered that long, so it is used once.
    max_assertion_lifetime_seconds: int = 300
    # A DPoP proof (RFC 9449 §11.1) or an MQTT CONNECT proof is accepted this long after
    # its iat (plus the clock skew); its jti is remembered as long.
    proof_max_age_seconds: int = 60
    # Proof and assertion jtis remembered at once; beyond it new proofs are refused
    # (fail closed) until old ones age out.
    replay_cache_entries: int = 200000
    # Revoked jtis (fleetward credential revoke --jti) remembered in memory, each until
    # the longest token it could name has expired; beyond it single revocations are
    # refused (revoke the device's tokens instead), never forgotten early.
    max_revoked_tokens: int = 100000
    # A new signing key every this many days; the previous one stays in the JWKS until
    # the tokens it signed have expired (max lifetime + clock skew).
    signing_key_rotation_days: int = 30
    # A SAS token's se may be at most this far in the future when it is presented.
    max_sas_validity_seconds: int = 86400
    # Where symmetric device keys are encrypted: "file" (a key in secrets/) or "pkcs11"
    # (an AES key generated on the CA's token).
    kek_backend: str = "file"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and value <= 0:
                raise ConfigurationError(f"[tokens] {f.name} must be positive",
                                         hint="remove the key to use the default")
        if self.access_token_lifetime_seconds > self.max_access_token_lifetime_seconds:
            raise ConfigurationError(
                "[tokens] access_token_lifetime_seconds is above "
                "max_access_token_lifetime_seconds", hint="lower the default lifetime")
        if self.unbound_token_lifetime_seconds > self.access_token_lifetime_seconds:
            raise ConfigurationError(
                "[tokens] unbound_token_lifetime_seconds is above "
                "access_token_lifetime_seconds",
                hint="unbound bearer tokens must not live longer than bound ones")
        if self.kek_backend not in ("file", "pkcs11"):
            raise ConfigurationError(f"[tokens] kek_backend {self.kek_backend!r} is unknown",
                                     hint='use "file" or "pkcs11"')
        if self.issuer and not self.issuer.startswith("https://"):
            raise ConfigurationError("[tokens] issuer must be an https URL (RFC 8414 §2)",
                                     hint='e.g. issuer = "https://iot.example.com:8443"')


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    url: str = ""  # empty = SQLite file in the data dir
    # True when the URL carries a password: it then lives only in FLEETWARD_DATABASE_URL.
    url_from_env: bool = False


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path
    listeners: ListenerConfig = field(default_factory=ListenerConfig)
    ca: CAConfig = field(default_factory=CAConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    enroll: EnrollConfig = field(default_factory=EnrollConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    device_api: DeviceApiConfig = field(default_factory=DeviceApiConfig)
    sinks: SinkConfig = field(default_factory=SinkConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)

    @property
    def issuer(self) -> str:
        """The token issuer: ``[tokens] issuer``, or the device listener under the public
        URL's host name (the name devices already reach us by)."""
        if self.tokens.issuer:
            return self.tokens.issuer.rstrip("/")
        host = urllib.parse.urlsplit(self.listeners.public_url).hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal (RFC 3986 §3.2.2)
        return f"https://{host}:{self.listeners.device_port}"

    @property
    def database_url(self) -> str:
        """The database to use.

        Raises:
            ConfigurationError: the URL is meant to come from the environment and does not.
        """
        if self.database.url:
            return self.database.url
        if self.database.url_from_env:
            raise ConfigurationError(
                "this installation keeps its database URL in the environment, and it is not set",
                hint="set FLEETWARD_DATABASE_URL=postgresql://user:password@host/db",
            )
        return f"sqlite:///{self.data_dir / 'fleetward.db'}"


_SECTIONS: dict[str, type[Any]] = {
    "listeners": ListenerConfig,
    "ca": CAConfig,
    "database": DatabaseConfig,
    "enroll": EnrollConfig,
    "mqtt": MqttConfig,
    "device_api": DeviceApiConfig,
    "sinks": SinkConfig,
    "channel": ChannelConfig,
    "tokens": TokensConfig,
}

# Environment overrides that operators expect by name.
_ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "FLEETWARD_DATABASE_URL": ("database", "url"),
    "FLEETWARD_PUBLIC_URL": ("listeners", "public_url"),
    "FLEETWARD_HOST": ("listeners", "host"),
    "FLEETWARD_NATS_URL": ("sinks", "nats_url"),
}


def load_settings(data_dir: Path, env: dict[str, str] | None = None) -> Settings:
    """Read ``fleetward.toml`` in ``data_dir`` (if present) and apply env overrides.

    Raises:
        ConfigurationError: unknown section or key, or a value of the wrong type.
    """
    env = dict(os.environ) if env is None else env
    raw: dict[str, dict[str, Any]] = {}
    path = data_dir / CONFIG_FILE_NAME
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(
                f"{path} is not valid TOML: {exc}", hint="fix the file or re-run init"
            ) from exc
    for var, (section, key) in _ENV_OVERRIDES.items():
        if env.get(var):
            raw.setdefault(section, {})[key] = env[var]
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        cls = _SECTIONS.get(section)
        if cls is None:
            raise ConfigurationError(
                f"unknown section [{section}] in {path}",
                hint=f"known sections: {', '.join(_SECTIONS)}",
            )
        sections[section] = _build(cls, values, f"[{section}]")
    return Settings(data_dir=data_dir, **sections)


def _build(cls: type[Any], values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigurationError(
                f"unknown key {key!r} in {where}", hint=f"known keys: {', '.join(fields)}"
            )
        expected = type(getattr(cls(), key))
        if expected is int and isinstance(value, str) and value.isdigit():
            value = int(value)
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise ConfigurationError(
                f"{where} {key} must be {expected.__name__}, got {value!r}",
                hint="fix the value in fleetward.toml or the environment",
            )
        kwargs[key] = value
    return cls(**kwargs)


def render_settings(settings: Settings) -> str:
    """TOML text for ``settings`` (only the sections a data dir persists)."""
    lines: list[str] = ["# Fleetward configuration; FLEETWARD_* environment variables override it."]
    for name in _SECTIONS:
        obj = getattr(settings, name)
        lines.append(f"\n[{name}]")
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, str):
                escaped = value.replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{f.name} = "{escaped}"')
            else:
                lines.append(
                    f"{f.name} = {str(value).lower() if isinstance(value, bool) else value}"
                )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class DataDirLayout:
    """Where everything lives inside a data directory."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE_NAME

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def passphrase_file(self) -> Path:
        return self.secrets / "ca-passphrase"

    @property
    def audit_key_file(self) -> Path:
        return self.secrets / "audit.key"

    @property
    def admin_token_file(self) -> Path:
        return self.secrets / "admin-token"

    @property
    def admin_url_file(self) -> Path:
        return self.root / "admin-url"

    @property
    def chain_file(self) -> Path:
        return self.certs / "chain.pem"

    @property
    def server_cert_file(self) -> Path:
        return self.certs / "server.pem"

    @property
    def server_key_file(self) -> Path:
        return self.keys / "server.key"

    def ca_key_file(self, ca_name: str) -> Path:
        return self.keys / f"{ca_name}-ca.key"

    def token_key_file(self, kid: str) -> Path:
        return self.keys / f"token-{kid}.key"

    @property
    def kek_file(self) -> Path:
        """The key-encryption key of symmetric device keys (kek_backend = "file")."""
        return self.secrets / "credential-kek"
