"""enrollment: OEM bindings and approvals, superseded certificates, key and CSR digests

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("cas", schema=None) as batch_op:
        batch_op.add_column(sa.Column("enrollment_approval", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
    with op.batch_alter_table("device_types", schema=None) as batch_op:
        batch_op.add_column(sa.Column("enrollment_profiles", sa.JSON(), nullable=True))
    with op.batch_alter_table("bootstrap_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=128), nullable=True))
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spki_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("csr_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("superseded_by", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("revoke_after", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.create_index("ix_certificates_spki_sha256", ["spki_sha256"], unique=False)
        batch_op.create_index("ix_certificates_csr_sha256", ["csr_sha256"], unique=False)
        batch_op.create_index("ix_certificates_revoke_after", ["revoke_after"], unique=False)
    op.create_table(
        "oem_bindings",
        sa.Column("idevid_sha256", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("ca_name", sa.String(length=64), nullable=False),
        sa.Column("idevid_subject", sa.Text(), nullable=False),
        sa.Column("approval", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"],
                                name=op.f("fk_oem_bindings_device_id_devices")),
        sa.ForeignKeyConstraint(["ca_name"], ["cas.name"],
                                name=op.f("fk_oem_bindings_ca_name_cas")),
        sa.PrimaryKeyConstraint("idevid_sha256", name=op.f("pk_oem_bindings")),
        sa.UniqueConstraint("device_id", name=op.f("uq_oem_bindings_device_id")),
    )
    with op.batch_alter_table("oem_bindings", schema=None) as batch_op:
        batch_op.create_index("ix_oem_bindings_approval", ["approval"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("oem_bindings", schema=None) as batch_op:
        batch_op.drop_index("ix_oem_bindings_approval")
    op.drop_table("oem_bindings")
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index("ix_certificates_revoke_after")
        batch_op.drop_index("ix_certificates_csr_sha256")
        batch_op.drop_index("ix_certificates_spki_sha256")
        for column in ("revoke_after", "superseded_by", "csr_sha256", "spki_sha256"):
            batch_op.drop_column(column)
    with op.batch_alter_table("bootstrap_tokens", schema=None) as batch_op:
        batch_op.drop_column("owner")
    with op.batch_alter_table("device_types", schema=None) as batch_op:
        batch_op.drop_column("enrollment_profiles")
    with op.batch_alter_table("cas", schema=None) as batch_op:
        batch_op.drop_column("enrollment_approval")
