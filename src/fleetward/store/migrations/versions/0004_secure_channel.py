"""secure channel: policies and attachments, the SQL message sink, device commands,
the change-feed index on audit events

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_index("ix_audit_events_action_seq", "audit_events", ["action", "seq"],
                    unique=False)
    op.create_table(
        "policies",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_policies")),
    )
    op.create_table(
        "policy_attachments",
        sa.Column("policy_name", sa.String(length=64), nullable=False),
        sa.Column("target_kind", sa.String(length=8), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=False),
        sa.Column("attached_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["policy_name"], ["policies.name"],
                                name=op.f("fk_policy_attachments_policy_name_policies")),
        sa.PrimaryKeyConstraint("policy_name", "target_kind", "target",
                                name=op.f("pk_policy_attachments")),
    )
    op.create_index("ix_policy_attachments_target_kind", "policy_attachments",
                    ["target_kind", "target"], unique=False)
    op.create_table(
        "device_messages",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("device_type", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("message_type", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=8), nullable=False),
        sa.Column("topic", sa.Text(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_messages")),
    )
    op.create_index("ix_device_messages_device_id", "device_messages",
                    ["device_id", "received_at"], unique=False)
    op.create_table(
        "device_commands",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"],
                                name=op.f("fk_device_commands_device_id_devices")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_commands")),
    )
    op.create_index("ix_device_commands_device_id", "device_commands",
                    ["device_id", "status"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_device_commands_device_id", table_name="device_commands")
    op.drop_table("device_commands")
    op.drop_index("ix_device_messages_device_id", table_name="device_messages")
    op.drop_table("device_messages")
    op.drop_index("ix_policy_attachments_target_kind", table_name="policy_attachments")
    op.drop_table("policy_attachments")
    op.drop_table("policies")
    op.drop_index("ix_audit_events_action_seq", table_name="audit_events")
