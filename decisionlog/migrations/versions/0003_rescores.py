"""Re-score runs: what every stored decision of a window would get under another policy, in
tables of their own (the original decisions are never modified).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rescore_runs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("created_at", sa.Float(precision=53), nullable=False),
        sa.Column("finished_at", sa.Float(precision=53)),
        sa.Column("policy_name", sa.Text, nullable=False),
        sa.Column("policy_version", sa.Text, nullable=False),
        sa.Column("policy_source", sa.Text, nullable=False),
        sa.Column("policy_text", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("since", sa.Float(precision=53)),
        sa.Column("until", sa.Float(precision=53)),
        sa.Column("decisions", sa.Integer, nullable=False),
        sa.Column("changed", sa.Integer, nullable=False),
        sa.Column("left_out", sa.Integer, nullable=False),
    )
    op.create_table(
        "rescored_decisions",
        sa.Column("run_id", sa.Text, sa.ForeignKey("rescore_runs.id"), primary_key=True),
        sa.Column("decision_id", sa.Text, primary_key=True),
        sa.Column("created_at", sa.Float(precision=53), nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("triggered", sa.Text, nullable=False),
        sa.Column("categories", sa.Text, nullable=False),
        sa.Column("frame", sa.Integer, nullable=False),
        sa.Column("original_action", sa.Text, nullable=False),
        sa.Index("rescored_time", "run_id", "created_at", "decision_id"),
    )


def downgrade() -> None:
    """Back to 0002: the re-score runs are lost (the decisions are untouched)."""
    op.drop_table("rescored_decisions")
    op.drop_table("rescore_runs")
