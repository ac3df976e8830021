"""Known-image hash banks: ``banks`` (what a match does, how near a PDQ must be),
``bank_hashes`` (PDQ or SHA-256, one row per hash) and ``bank_changes`` (one counter row the
matchers of every worker and replica poll).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "banks",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("distance", sa.Integer, nullable=False, server_default=sa.text("31")),
        sa.Column("min_quality", sa.Integer, nullable=False, server_default=sa.text("50")),
        sa.Column("description", sa.Text),
        sa.Column("created_at", sa.Float(precision=53), nullable=False),
        sa.Column("updated_at", sa.Float(precision=53), nullable=False),
        sa.CheckConstraint("action IN ('allow', 'flag', 'review', 'block')",
                           name="banks_action"),
        sa.CheckConstraint("distance BETWEEN 0 AND 128", name="banks_distance"),
        sa.CheckConstraint("min_quality BETWEEN 0 AND 100", name="banks_min_quality"),
    )
    op.create_table(
        "bank_hashes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("bank", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("hash", sa.Text, nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("source", sa.Text),
        sa.Column("added_at", sa.Float(precision=53), nullable=False),
        sa.Column("added_by", sa.Text),
        sa.UniqueConstraint("bank", "kind", "hash", name="bank_hashes_once"),
    )
    op.create_index("bank_hashes_bank", "bank_hashes", ["bank", "id"])
    changes = op.create_table(
        "bank_changes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.bulk_insert(changes, [{"id": 1, "version": 0}])


def downgrade() -> None:
    op.drop_table("bank_changes")
    op.drop_table("bank_hashes")
    op.drop_table("banks")
