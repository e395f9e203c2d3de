"""The SQL schema (SQLAlchemy Core). Alembic migrations create it; this is its mirror.

Times are stored as UTC; serials as lower-case hex text because 128-bit serials do not
fit a BIGINT, and uniqueness is the database's job (a unique constraint, not a check).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use fleetward.clock")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


cas = Table(
    "cas",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),  # root | issuing | oem
    Column("parent_name", String(64), ForeignKey("cas.name"), nullable=True),
    Column("subject", Text, nullable=False),
    Column("cert_pem", Text, nullable=False),
    Column("fingerprint_sha256", String(64), nullable=False, unique=True),
    Column("key_ref", JSON, nullable=True),  # None for OEM CAs: we hold no key
    Column("device_type", String(64), nullable=True),  # OEM CA → type of devices it makes
    Column("imported", Boolean, nullable=False, default=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("crl_number", Integer, nullable=False, default=0),
    Column("crl_der", LargeBinary, nullable=True),
    Column("crl_this_update", UTCDateTime, nullable=True),
    Column("crl_next_update", UTCDateTime, nullable=True),
    # OEM CAs: hold devices registered on first contact until an operator approves them.
    Column("enrollment_approval", Boolean, nullable=False, default=False),
)

device_types = Table(
    "device_types",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("description", Text, nullable=False, default=""),
    Column("message_types", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # Certificate profiles devices of this type may enroll for (EST label); NULL = device.
    Column("enrollment_profiles", JSON, nullable=True),
)

devices = Table(
    "devices",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("type", String(64), ForeignKey("device_types.name"), nullable=False),
    Column("owner", String(128), nullable=False),
    Column("labels", JSON, nullable=False),
    Column("state", String(16), nullable=False),
    Column("firmware_version", String(64), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("last_seen_at", UTCDateTime, nullable=True),
    # +1 whenever the device's outstanding access tokens must die (disabled,
    # quarantined, compromised, retired, a certificate revoked): tokens carry the value
    # they were issued under (claim fw_gen) and are refused once it moved on.
    Column("credential_generation", Integer, nullable=False, default=0),
    Index("ix_devices_state", "state"),
    Index("ix_devices_type", "type"),
    Index("ix_devices_owner", "owner"),
)

certificates = Table(
    "certificates",
    metadata,
    Column("serial", String(40), primary_key=True),  # hex; unique by this constraint
    Column("fingerprint_sha256", String(64), nullable=False, unique=True),
    Column("ca_name", String(64), ForeignKey("cas.name"), nullable=False),
    Column("device_id", String(128), ForeignKey("devices.id"), nullable=True),
    Column("profile", String(32), nullable=False),
    Column("subject", Text, nullable=False),
    Column("not_before", UTCDateTime, nullable=False),
    Column("not_after", UTCDateTime, nullable=False),
    Column("pem", Text, nullable=False),
    Column("issued_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("revocation_reason", String(32), nullable=True),
    Column("spki_sha256", String(64), nullable=True),  # finds a certificate by its key
    Column("csr_sha256", String(64), nullable=True),  # makes factory signing idempotent
    # Re-enrollment: the newer certificate, and when this one is revoked as superseded.
    Column("superseded_by", String(40), nullable=True),
    Column("revoke_after", UTCDateTime, nullable=True),
    Index("ix_certificates_device_id", "device_id"),
    Index("ix_certificates_spki_sha256", "spki_sha256"),
    Index("ix_certificates_csr_sha256", "csr_sha256"),
    Index("ix_certificates_revoke_after", "revoke_after"),
    Index("ix_certificates_ca_name_revoked_at", "ca_name", "revoked_at"),
)

operator_tokens = Table(
    "operator_tokens",
    metadata,
    Column("token_id", String(32), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("secret_sha256", String(64), nullable=False),  # never the token itself
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at", UTCDateTime, nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(300), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("details", Text, nullable=False),  # canonical JSON, exactly what was hashed
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("mac", String(64), nullable=False),  # HMAC-SHA256 with a key kept off the DB
    Index("ix_audit_events_action", "action"),
    # The data plane's change feed: "rows of these actions after seq N" (store/channel.py).
    Index("ix_audit_events_action_seq", "action", "seq"),
)

# One row: the newest sequence number and hash, MACed with a key kept outside the
# database, so that cutting rows off the end of the chain is detected too.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("mac", String(64), nullable=False),
)


# One-time enrollment credentials (RFC 7030 §3.2.3 HTTP-based client authentication).
# Bound to one device (max_uses = 1) or to a claim batch of a device type (max_uses = N).
bootstrap_tokens = Table(
    "bootstrap_tokens",
    metadata,
    Column("token_id", String(32), primary_key=True),
    Column("secret_sha256", String(64), nullable=False),  # never the token itself
    Column("device_id", String(128), ForeignKey("devices.id"), nullable=True),
    Column("device_type", String(64), ForeignKey("device_types.name"), nullable=False),
    Column("max_uses", Integer, nullable=False),
    Column("uses", Integer, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("owner", String(128), nullable=True),  # owner of devices a batch registers
    Index("ix_bootstrap_tokens_device_id", "device_id"),
)

# A device registered from a manufacturer certificate (IEEE 802.1AR IDevID): which
# IDevID and OEM CA it came from, and whether an operator must approve it first.
oem_bindings = Table(
    "oem_bindings",
    metadata,
    Column("idevid_sha256", String(64), primary_key=True),
    Column("device_id", String(128), ForeignKey("devices.id"), nullable=False, unique=True),
    Column("ca_name", String(64), ForeignKey("cas.name"), nullable=False),
    Column("idevid_subject", Text, nullable=False),
    Column("approval", String(16), nullable=False),  # none | pending | approved | rejected
    Column("created_at", UTCDateTime, nullable=False),
    Column("decided_at", UTCDateTime, nullable=True),
    Column("decided_by", String(200), nullable=True),
    Index("ix_oem_bindings_approval", "approval"),
)

# --- secure channel (issue 4) ---------------------------------------------------------

# Policy documents (AWS-IoT-style statements), attached to device types and devices.
policies = Table(
    "policies",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("document", JSON, nullable=False),  # the validated document, as stored
    Column("version", Integer, nullable=False),  # +1 on every put
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

policy_attachments = Table(
    "policy_attachments",
    metadata,
    Column("policy_name", String(64), ForeignKey("policies.name"), primary_key=True),
    Column("target_kind", String(8), primary_key=True),  # type | device
    Column("target", String(128), primary_key=True),  # type name or device id
    Column("attached_at", UTCDateTime, nullable=False),
    Index("ix_policy_attachments_target_kind", "target_kind", "target"),
)

# The SQL sink: accepted telemetry and events, one row per message.
device_messages = Table(
    "device_messages",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("device_id", String(128), nullable=False),
    Column("device_type", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # telemetry | event
    Column("message_type", String(64), nullable=False),
    Column("channel", String(8), nullable=False),  # mqtt | https
    Column("topic", Text, nullable=True),  # MQTT topic, when it came over MQTT
    Column("payload", JSON, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Index("ix_device_messages_device_id", "device_id", "received_at"),
)

# Commands to devices: queued by operators, delivered over MQTT or the HTTPS long-poll.
device_commands = Table(
    "device_commands",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("device_id", String(128), ForeignKey("devices.id"), nullable=False),
    Column("name", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("status", String(16), nullable=False),  # pending|delivered|succeeded|failed|expired
    Column("created_by", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("delivered_at", UTCDateTime, nullable=True),
    Column("completed_at", UTCDateTime, nullable=True),
    Column("result", JSON, nullable=True),
    Index("ix_device_commands_device_id", "device_id", "status"),
)

# --- credentials for every device class (issue 11) ----------------------------------------

# Keys that sign access tokens (ES256). One is active; retired ones stay in the JWKS until
# the tokens they signed have expired, then they are dropped.
token_signing_keys = Table(
    "token_signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("algorithm", String(16), nullable=False),  # ES256
    Column("key_ref", JSON, nullable=False),  # where the private key is (never the key)
    Column("public_jwk", JSON, nullable=False),  # RFC 7517, as published in the JWKS
    Column("created_at", UTCDateTime, nullable=False),
    Column("retired_at", UTCDateTime, nullable=True),  # stopped signing
    Column("expires_at", UTCDateTime, nullable=True),  # leaves the JWKS; refused after
)

# Credentials a device holds besides certificates: raw public keys (for TLS-less
# devices' client assertions) and symmetric keys (SAS tokens, client_secret_jwt).
# Symmetric keys are stored only encrypted (AES-256-GCM under the credential KEK,
# associated data = credential id, device id and slot).
device_credentials = Table(
    "device_credentials",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("device_id", String(128), ForeignKey("devices.id"), nullable=False),
    Column("kind", String(16), nullable=False),  # public_key | symmetric_key
    Column("public_key_pem", Text, nullable=True),
    Column("jkt", String(64), nullable=True),  # RFC 7638 thumbprint of the public key
    Column("primary_ciphertext", LargeBinary, nullable=True),
    Column("secondary_ciphertext", LargeBinary, nullable=True),
    # Bumped when a slot's key is regenerated: SAS sessions signed with the old key end.
    Column("primary_version", Integer, nullable=False, default=0),
    Column("secondary_version", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("rotated_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Index("ix_device_credentials_device_id", "device_id", "kind"),
    Index("ix_device_credentials_jkt", "jkt"),
)

# Keys for gateways, back-office integrations and resource servers: fwk_<id>.<secret>,
# stored as SHA-256 only; a rotation keeps the previous secret valid for a grace period.
api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("previous_secret_sha256", String(64), nullable=True),
    Column("previous_valid_until", UTCDateTime, nullable=True),
    Column("scopes", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("rotated_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
)

# Access tokens revoked one by one (by jti). Kept until the longest token they could
# name has expired; every node holds the live ones in memory.
revoked_access_tokens = Table(
    "revoked_access_tokens",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("device_id", String(128), nullable=True),
    Column("revoked_at", UTCDateTime, nullable=False),
    Column("revoked_by", String(200), nullable=False),
    Column("forget_after", UTCDateTime, nullable=False),
    Index("ix_revoked_access_tokens_forget_after", "forget_after"),
)

# Data-encryption keys, stored only wrapped by the key-encryption key (a file in
# secrets/ or an AES key on the PKCS#11 token): envelope encryption, so the KEK is used
# once at start-up and never per secret.
data_keys = Table(
    "data_keys",
    metadata,
    Column("name", String(64), primary_key=True),  # e.g. "device-credentials"
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("kek_ref", JSON, nullable=False),  # which KEK wrapped it (never the KEK)
    Column("created_at", UTCDateTime, nullable=False),
)
