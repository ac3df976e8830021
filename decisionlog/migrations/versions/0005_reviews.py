"""The review queue: items (review actions, audit samples, appeals) with their leases,
reviewers' verdicts, and the webhook outbox that delivers them.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "review_items",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("decision_id", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float(precision=53), nullable=False),
        sa.Column("decision_created_at", sa.Float(precision=53), nullable=False),
        sa.Column("policy_version", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("triggered", sa.Text, nullable=False),
        sa.Column("sample_probability", sa.Float(precision=53)),
        sa.Column("note", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("claimed_by", sa.Text),
        sa.Column("claimed_at", sa.Float(precision=53)),
        sa.Column("lease_until", sa.Float(precision=53)),
        sa.UniqueConstraint("decision_id", "reason", name="review_items_once"),
    )
    op.create_index("review_items_waiting", "review_items",
                    ["status", "reason", "created_at", "id"])
    op.create_index("review_items_decision_time", "review_items", ["decision_created_at"])
    op.create_table(
        "review_verdicts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("review_items.id"), nullable=False,
                  unique=True),
        sa.Column("decision_id", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("reviewer", sa.Text, nullable=False),
        sa.Column("decided_at", sa.Float(precision=53), nullable=False),
        sa.Column("decision_created_at", sa.Float(precision=53), nullable=False),
        sa.Column("policy_version", sa.Text, nullable=False),
        sa.Column("violations", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("original_action", sa.Text, nullable=False),
        sa.Column("appeal", sa.Text),
        sa.Column("note", sa.Text),
    )
    op.create_index("review_verdicts_time", "review_verdicts", ["decided_at", "id"])
    op.create_index("review_verdicts_decision", "review_verdicts", ["decision_id"])
    op.create_table(
        "webhook_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("verdict_id", sa.Integer, sa.ForeignKey("review_verdicts.id"), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float(precision=53), nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float(precision=53), nullable=False),
        sa.Column("delivered_at", sa.Float(precision=53)),
        sa.Column("last_error", sa.Text),
    )
    op.create_index("webhook_outbox_due", "webhook_outbox", ["status", "next_attempt_at"])
    op.create_index("webhook_outbox_verdict", "webhook_outbox", ["verdict_id"])


def downgrade() -> None:
    op.drop_table("webhook_outbox")
    op.drop_table("review_verdicts")
    op.drop_table("review_items")
