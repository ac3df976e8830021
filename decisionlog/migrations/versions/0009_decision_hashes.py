"""Decisions keep each sampled frame's PDQ hash and the hash-bank entries they matched (JSON;
NULL for every earlier decision).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("decisions", sa.Column("pdq", sa.Text))
    op.add_column("decisions", sa.Column("matches", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:  # SQLite rebuilds the table
        batch.drop_column("matches")
        batch.drop_column("pdq")
