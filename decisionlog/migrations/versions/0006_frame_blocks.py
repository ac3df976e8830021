"""Frame vectors stored for scans: ``frame_blocks`` (see ``decisionlog/blocks.py``), filled
from the frames already stored, one row per frame, which stay (a decision's frames in one
lookup; pgvector's index). Each model's decisions are read once in time order and written as
blocks of 4096 decisions; the vectors keep their float16 bytes (on PostgreSQL, pgvector's
big-endian ``halfvec`` values become little-endian bytes). A million decisions take a minute
or so. Downgrading drops the blocks: every vector is still in ``decision_frames``.

Revision ID: 0006
Revises: 0005
"""

import json
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BLOCK = 4096


def upgrade() -> None:
    op.create_table(
        "frame_blocks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("first_at", sa.Float(precision=53), nullable=False),
        sa.Column("last_at", sa.Float(precision=53), nullable=False),
        sa.Column("decisions", sa.Integer, nullable=False),
        sa.Column("frames", sa.Integer, nullable=False),
        sa.Column("meta", sa.Text, nullable=False),
        sa.Column("created_at", sa.LargeBinary, nullable=False),
        sa.Column("frame_counts", sa.LargeBinary, nullable=False),
        sa.Column("frame_index", sa.LargeBinary, nullable=False),
        sa.Column("vectors", sa.LargeBinary, nullable=False),
    )
    op.create_index("frame_blocks_time", "frame_blocks", ["model", "first_at"])
    op.create_index("frame_blocks_size", "frame_blocks", ["decisions"])
    _fill(op.get_bind())


def downgrade() -> None:
    op.drop_index("frame_blocks_size", "frame_blocks")
    op.drop_index("frame_blocks_time", "frame_blocks")
    op.drop_table("frame_blocks")


def _fill(bind: Any) -> None:
    postgres = bind.dialect.name == "postgresql"
    vector = "halfvec_send(f.embedding)" if postgres else "f.embedding"
    blocks = sa.table(
        "frame_blocks", *(sa.column(c) for c in (
            "model", "dim", "first_at", "last_at", "decisions", "frames", "meta",
            "created_at", "frame_counts", "frame_index", "vectors")))
    models = bind.execute(sa.text(
        "SELECT DISTINCT model FROM decisions WHERE error_code IS NULL")).scalars().all()
    for model in models:
        last: tuple[float, str] | None = None
        while True:  # a page of decisions at a time, with their frames
            after = "AND (d.created_at > :t OR (d.created_at = :t AND d.id > :i))" if last else ""
            rows = bind.execute(sa.text(
                f"SELECT d.id, d.created_at, d.client_id, d.profile, d.action, f.frame, {vector} "
                "FROM (SELECT id, created_at, client_id, profile, action FROM decisions d "
                f"      WHERE model = :m AND error_code IS NULL {after} "
                "      ORDER BY created_at, id LIMIT :n) d "
                "JOIN decision_frames f ON f.decision_id = d.id "
                "ORDER BY d.created_at, d.id, f.frame"
            ), {"m": model, "n": BLOCK, "t": last[0] if last else 0,
                "i": last[1] if last else ""}).all()
            if not rows:
                # the page may have held only decisions without frames: look further
                more = bind.execute(sa.text(
                    "SELECT created_at, id FROM decisions d WHERE model = :m AND error_code "
                    f"IS NULL {after} ORDER BY created_at, id LIMIT 1 OFFSET :n"
                ), {"m": model, "n": BLOCK - 1, "t": last[0] if last else 0,
                    "i": last[1] if last else ""}).all()
                if not more:
                    break
                last = (float(more[0][0]), str(more[0][1]))
                continue
            bind.execute(blocks.insert(), [_block(model, rows, postgres)])
            last = (float(rows[-1][1]), str(rows[-1][0]))


def _block(model: str, rows: list[Any], postgres: bool) -> dict[str, Any]:
    ids: list[str] = []
    created, clients, profiles, actions, counts = [], [], [], [], []
    for decision_id, created_at, client_id, profile, action, _, _ in rows:
        if not ids or ids[-1] != decision_id:
            ids.append(decision_id)
            created.append(created_at)
            clients.append(client_id)
            profiles.append(profile)
            actions.append(action)
            counts.append(0)
        counts[-1] += 1
    blobs = [bytes(r[6]) for r in rows]
    if postgres:  # halfvec_send: a 4-byte header, then big-endian float16
        joined = np.frombuffer(b"".join(blobs), np.uint8).reshape(len(blobs), -1)[:, 4:]
        halves = joined.copy().view(">u2").astype("<u2")
    else:
        halves = np.frombuffer(b"".join(blobs), "<u2").reshape(len(blobs), -1)
    return {
        "model": model, "dim": int(halves.shape[1]),
        "first_at": float(min(created)), "last_at": float(max(created)),
        "decisions": len(ids), "frames": len(rows),
        "meta": json.dumps({"ids": ids, "client_ids": clients, "profiles": profiles,
                            "actions": actions}),
        "created_at": np.asarray(created, "<f8").tobytes(),
        "frame_counts": np.asarray(counts, "<i4").tobytes(),
        "frame_index": np.asarray([r[5] for r in rows], "<i4").tobytes(),
        "vectors": halves.tobytes(),
    }
