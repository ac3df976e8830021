"""Synthetic decision logs for the benchmarks: N decisions over the last 30 days, in time order
as a log is written, one in fifty an animation of 4 frames, with the vectors a benchmark asks
for, written straight into the tables (SQLite through SQLAlchemy, PostgreSQL with a binary
COPY: the insert path converts vectors to text, far too slow for millions).

Filling is deterministic in N and the seed: the same log on SQLite and on PostgreSQL, so that
one's exact answers are the other's ground truth."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

DIM = 512
VERSIONS = ["v-aaaaaaaa", "v-bbbbbbbb", "v-cccccccc"]
ACTIONS = ["allow"] * 17 + ["flag", "review", "block"]

#: (random generator, how many) → ndarray of shape (how many, DIM), unit rows
Vectors = Callable[[np.random.Generator, int], np.ndarray]


def decision_id(seed: int, i: int) -> str:
    """Decision i's id: random-looking (as uuid4s are) and the same in every fill."""
    return np.random.default_rng([seed, i]).bytes(16).hex()


def fill(url: str, n: int, vectors: Vectors, *, model: str, seed: int = 0,
         actions: bool = False, block: int | None = None) -> None:
    """Add decisions to the log at ``url`` until it has ``n``. ``actions``: a mix of actions
    (one in twenty flag, review or block) instead of allow only. The frames go in as the
    service leaves them: a row per frame, and blocks of ``block`` decisions (default:
    merged blocks, ``decisionlog.blocks.BLOCK``; a small number: as written per commit,
    before merging)."""
    from decisionlog import DecisionStore
    from decisionlog.blocks import BLOCK, Block
    from decisionlog.tables import decision_frames, decisions, frame_blocks

    store = DecisionStore(url)
    have = store.count()
    if have >= n:
        return
    now = time.time()
    batch = 10_000
    started = time.perf_counter()
    for start in range(have, n, batch):
        size = min(batch, n - start)
        rng = np.random.default_rng([seed, start])
        # decision i of n at i/n of the last 30 days
        times = now - 30 * 86400 * (1 - (start + np.sort(rng.uniform(0, size, size))) / n)
        frames = np.where(rng.random(size) < 0.02, 4, 1)
        made = vectors(rng, int(frames.sum())).astype(np.float16)
        rows: list[dict[str, Any]] = []
        frame_rows: list[tuple[str, int, np.ndarray]] = []
        k = 0
        for i in range(size):
            did = decision_id(seed, start + i)
            action = ACTIONS[int(rng.integers(len(ACTIONS)))] if actions else "allow"
            rows.append({
                "id": did, "created_at": float(times[i]), "hour": int(times[i] // 3600),
                "client_id": f"upload-{start + i}", "image_sha256": "0" * 64, "image_size": 1,
                "policy_name": "default", "policy_version": VERSIONS[i % len(VERSIONS)],
                "model": model, "profile": "default", "action": action, "triggered": "",
                "categories": "{}", "latency_ms": 1.0, "error_code": None, "frame": 0,
                "frames_scored": int(frames[i]),
            })
            for f in range(int(frames[i])):
                frame_rows.append((did, f, made[k]))
                k += 1
        whole = Block(
            ids=[r["id"] for r in rows], created_at=times.astype(np.float64),
            client_ids=[r["client_id"] for r in rows], profiles=["default"] * size,
            actions=[r["action"] for r in rows], frame_counts=frames.astype(np.int64),
            frames=np.concatenate([np.arange(int(c)) for c in frames]),
            halves=made.view(np.uint16),
        )
        with store.engine.begin() as conn:
            conn.execute(decisions.insert(), rows)
            if store.dialect == "postgresql":
                _copy_frames(conn, frame_rows)
            else:  # FrameVector writes the float16 bytes
                conn.execute(decision_frames.insert(), [
                    {"decision_id": d, "frame": f, "embedding": v} for d, f, v in frame_rows
                ])
            conn.execute(frame_blocks.insert(),
                         [part.row(model) for part in whole.split(block or BLOCK)])
        done = start + size
        if done % 100_000 == 0 or done == n:
            print(f"  filled {done} decisions ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)


def _copy_frames(conn: Any, frame_rows: list[tuple[str, int, np.ndarray]]) -> None:
    from pgvector import HalfVector
    from pgvector.psycopg import register_vector

    raw = conn.connection.dbapi_connection
    register_vector(raw)
    with raw.cursor().copy(
            "COPY decision_frames (decision_id, frame, embedding) FROM STDIN "
            "WITH (FORMAT BINARY)") as copy:
        copy.set_types(["text", "int4", "halfvec"])
        for d, f, v in frame_rows:
            copy.write_row((d, f, HalfVector(v)))


def postgres_database(server: str, name: str) -> str:
    """A new, empty database ``name`` on ``server`` (dropped first if it exists)."""
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + f"/{name}"


def high_water_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would also count the parent's
    memory at fork, which Linux carries across exec)."""
    import resource
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
