"""The webhook outbox also delivers jobs' results (a long video's moderation answer): a row is
a verdict's delivery (``verdict_id``) or a job's (``job_id``).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_outbox") as batch:  # SQLite rebuilds the table
        batch.alter_column("verdict_id", existing_type=sa.Integer, nullable=True)
        batch.add_column(sa.Column("job_id", sa.Text))
        batch.create_index("webhook_outbox_job", ["job_id"])


def downgrade() -> None:
    op.execute("DELETE FROM webhook_outbox WHERE verdict_id IS NULL")
    with op.batch_alter_table("webhook_outbox") as batch:
        batch.drop_index("webhook_outbox_job")
        batch.drop_column("job_id")
        batch.alter_column("verdict_id", existing_type=sa.Integer, nullable=False)
