"""Views: what each stored key of a decision is (frame, time, crop box), for uploads cut
into crops and videos. NULL for every earlier decision: their keys are frame indices.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("decisions", sa.Column("views", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:  # SQLite rebuilds the table
        batch.drop_column("views")
