"""A job's uploads (a long video answered 202) are kept as bytes beside the job, one row each,
instead of as base64 inside its JSON request (a third larger, and parsed whole at every claim).

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_uploads",
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_uploads")
