"""bootstrap tokens

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "bootstrap_tokens",
        sa.Column("token_id", sa.String(length=32), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=True),
        sa.Column("device_type", sa.String(length=64), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"],
                                name=op.f("fk_bootstrap_tokens_device_id_devices")),
        sa.ForeignKeyConstraint(["device_type"], ["device_types.name"],
                                name=op.f("fk_bootstrap_tokens_device_type_device_types")),
        sa.PrimaryKeyConstraint("token_id", name=op.f("pk_bootstrap_tokens")),
    )
    with op.batch_alter_table("bootstrap_tokens", schema=None) as batch_op:
        batch_op.create_index("ix_bootstrap_tokens_device_id", ["device_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("bootstrap_tokens", schema=None) as batch_op:
        batch_op.drop_index("ix_bootstrap_tokens_device_id")
    op.drop_table("bootstrap_tokens")
