"""Jobs: long work that leaves the request thread (a large dry-run), with its progress and
result where every worker and replica can read them.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float(precision=53), nullable=False),
        sa.Column("created_by", sa.Text),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float(precision=53)),
        sa.Column("finished_at", sa.Float(precision=53)),
        sa.Column("owner", sa.Text),
        sa.Column("lease_until", sa.Float(precision=53)),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("done", sa.Integer, nullable=False),
        sa.Column("total", sa.Integer),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
    )
    op.create_index("jobs_due", "jobs", ["state", "lease_until"])
    op.create_index("jobs_time", "jobs", ["created_at"])


def downgrade() -> None:
    op.drop_index("jobs_time", "jobs")
    op.drop_index("jobs_due", "jobs")
    op.drop_table("jobs")
