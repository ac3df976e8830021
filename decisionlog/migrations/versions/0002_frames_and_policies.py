"""Every sampled frame's embedding (decision_frames: pgvector halfvec on PostgreSQL), the
decided frame per decision, the policy texts and their activations, and the text embeddings
shared by replicas.

The embedding column of decisions moves to decision_frames. The first release kept only the
decided frame's embedding and not that frame's index: such a row becomes frame 0 (the only
frame of a still image, which most are).

Revision ID: 0002
Revises: 0001
"""

import numpy as np
import sqlalchemy as sa
from alembic import op

from decisionlog.tables import FrameVector

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("frame", sa.Integer))
        batch.add_column(sa.Column("frames_scored", sa.Integer))
    frames = op.create_table(
        "decision_frames",
        sa.Column("decision_id", sa.Text, primary_key=True),
        sa.Column("frame", sa.Integer, primary_key=True),
        sa.Column("embedding", FrameVector, nullable=False),
    )
    old = sa.table("decisions", sa.column("id", sa.Text), sa.column("embedding", sa.LargeBinary))
    last = ""
    while True:  # in pages, so that a large log is never held in memory at once
        rows = bind.execute(
            sa.select(old.c.id, old.c.embedding)
            .where(old.c.embedding.is_not(None), old.c.id > last)
            .order_by(old.c.id)
            .limit(1000)
        ).all()
        if not rows:
            break
        bind.execute(frames.insert(), [
            {"decision_id": i, "frame": 0,
             "embedding": np.frombuffer(bytes(blob), dtype=np.float16)}
            for i, blob in rows
        ])
        last = rows[-1][0]
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("embedding")
    double = sa.Float(precision=53)
    op.create_table(
        "policy_versions",
        sa.Column("version", sa.Text, primary_key=True),
        sa.Column("digest", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("created_at", double, nullable=False),
    )
    op.create_table(
        "policy_activations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("version", sa.Text, nullable=False),
    sa.Column("digest", sa.Text, nullable=False),
    sa.ForeignKeyConstraint(
        ["version", "digest"], ["policy_versions.version", "policy_versions.digest"]
    ),
        sa.Column("activated_at", double, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("host", sa.Text, nullable=False),
    )
    op.create_table(
        "text_embeddings",
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("digest", sa.Text, primary_key=True),
        sa.Column("vector", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    """Back to 0001: the decided frame's embedding (frame 0 for older rows) returns to
    decisions; the other frames, the policy texts and the shared text embeddings are lost."""
    bind = op.get_bind()
    op.drop_table("text_embeddings")
    op.drop_table("policy_activations")
    op.drop_table("policy_versions")
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("embedding", sa.LargeBinary))
    frames = sa.table(
        "decision_frames",
        sa.column("decision_id", sa.Text),
        sa.column("frame", sa.Integer),
        sa.column("embedding", FrameVector),
    )
    old = sa.table(
        "decisions",
        sa.column("id", sa.Text),
        sa.column("frame", sa.Integer),
        sa.column("embedding", sa.LargeBinary),
    )
    chosen = bind.execute(
        sa.select(frames.c.decision_id, frames.c.embedding)
        .select_from(frames.join(old, old.c.id == frames.c.decision_id))
        .where(frames.c.frame == sa.func.coalesce(old.c.frame, 0))
    ).all()
    for decision_id, vector in chosen:
        bind.execute(
            old.update().where(old.c.id == decision_id)
            .values(embedding=np.asarray(vector, dtype=np.float16).tobytes())
        )
    op.drop_table("decision_frames")
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("frames_scored")
        batch.drop_column("frame")
