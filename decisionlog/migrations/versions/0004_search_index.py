"""Search: on PostgreSQL, an HNSW index (pgvector, cosine) for each dimension of the frame
embeddings already stored. The column holds every model's vectors and an index needs one
dimension, so each is an expression index on ``embedding::halfvec(D)``, partial on
``vector_dims(embedding) = D``; a model with a new dimension gets its index when the service
starts (``decisionlog.search.ensure_hnsw_index``). Nothing changes on SQLite, whose search is
exact.

Building reads every stored vector: minutes for millions (give the server
``maintenance_work_mem`` for the graph before upgrading a large log).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    dims = bind.execute(sa.text(
        "SELECT DISTINCT vector_dims(embedding) FROM decision_frames"
    )).scalars().all()
    for dim in sorted(int(d) for d in dims):
        op.execute(
            f"CREATE INDEX IF NOT EXISTS decision_frames_hnsw_{dim} ON decision_frames "
            f"USING hnsw ((embedding::halfvec({dim})) halfvec_cosine_ops) "
            f"WITH (m = 32, ef_construction = 128) WHERE vector_dims(embedding) = {dim}"
        )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    names = bind.execute(sa.text(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'decision_frames' "
        "AND indexname LIKE 'decision\\_frames\\_hnsw\\_%'"
    )).scalars().all()
    for name in names:
        op.execute(f"DROP INDEX IF EXISTS {name}")
