"""credentials for every device class: token signing keys, device public and symmetric
keys, API keys, revoked access tokens, wrapped data keys, the device credential
generation

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("credential_generation", sa.Integer(), nullable=False,
                                      server_default="0"))
    op.create_table(
        "token_signing_keys",
        sa.Column("kid", sa.String(length=64), nullable=False),
        sa.Column("algorithm", sa.String(length=16), nullable=False),
        sa.Column("key_ref", sa.JSON(), nullable=False),
        sa.Column("public_jwk", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("kid", name=op.f("pk_token_signing_keys")),
    )
    op.create_table(
        "device_credentials",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("public_key_pem", sa.Text(), nullable=True),
        sa.Column("jkt", sa.String(length=64), nullable=True),
        sa.Column("primary_ciphertext", sa.LargeBinary(), nullable=True),
        sa.Column("secondary_ciphertext", sa.LargeBinary(), nullable=True),
        sa.Column("primary_version", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("secondary_version", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"],
                                name=op.f("fk_device_credentials_device_id_devices")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_credentials")),
    )
    op.create_index("ix_device_credentials_device_id", "device_credentials",
                    ["device_id", "kind"], unique=False)
    op.create_index("ix_device_credentials_jkt", "device_credentials", ["jkt"], unique=False)
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("previous_secret_sha256", sa.String(length=64), nullable=True),
        sa.Column("previous_valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_api_keys")),
    )
    op.create_table(
        "revoked_access_tokens",
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_by", sa.String(length=200), nullable=False),
        sa.Column("forget_after", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("jti", name=op.f("pk_revoked_access_tokens")),
    )
    op.create_index("ix_revoked_access_tokens_forget_after", "revoked_access_tokens",
                    ["forget_after"], unique=False)
    op.create_table(
        "data_keys",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("kek_ref", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_data_keys")),
    )


def downgrade() -> None:
    op.drop_table("data_keys")
    op.drop_index("ix_revoked_access_tokens_forget_after", table_name="revoked_access_tokens")
    op.drop_table("revoked_access_tokens")
    op.drop_table("api_keys")
    op.drop_index("ix_device_credentials_jkt", table_name="device_credentials")
    op.drop_index("ix_device_credentials_device_id", table_name="device_credentials")
    op.drop_table("device_credentials")
    op.drop_table("token_signing_keys")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("credential_generation")
