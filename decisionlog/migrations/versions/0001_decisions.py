"""The decision log as the first release wrote it: decisions (with the decided frame's
embedding) and the flags per category.

A log written by that release (which created these tables itself, without Alembic) is stamped
with this revision and upgraded from here: see decisionlog.database.migrate.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    double = sa.Float(precision=53)
    op.create_table(
        "decisions",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("created_at", double, nullable=False),
        sa.Column("hour", sa.Integer, nullable=False),
        sa.Column("client_id", sa.Text),
        sa.Column("image_sha256", sa.Text, nullable=False),
        sa.Column("image_size", sa.Integer, nullable=False),
        sa.Column("policy_name", sa.Text, nullable=False),
        sa.Column("policy_version", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("profile", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("triggered", sa.Text, nullable=False),
        sa.Column("categories", sa.Text, nullable=False),
        sa.Column("latency_ms", double, nullable=False),
        sa.Column("error_code", sa.Text),
        sa.Column("embedding", sa.LargeBinary),
    )
    op.create_index("decisions_time", "decisions", ["created_at", "id"])
    op.create_index("decisions_version", "decisions", ["policy_version", "created_at"])
    op.create_index("decisions_client", "decisions", ["client_id", "created_at"])
    op.create_table(
        "decision_flags",
        sa.Column("decision_id", sa.Text, primary_key=True),
        sa.Column("created_at", double, nullable=False),
        sa.Column("hour", sa.Integer, nullable=False),
        sa.Column("policy_version", sa.Text, nullable=False),
        sa.Column("category", sa.Text, primary_key=True),
        sa.Column("action", sa.Text, nullable=False),
    )
    op.create_index("flags_time", "decision_flags", ["created_at"])
    op.create_index("flags_category", "decision_flags", ["category", "created_at"])


def downgrade() -> None:
    op.drop_table("decision_flags")
    op.drop_table("decisions")
