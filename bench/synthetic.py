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
import sqlalchemy as sa

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
    merged blocks, ``decisionlog.blocks.BLOCK``, all full but the last; a small number: as
    written per commit, before merging).

    The decisions are made 10,000 at a time, whatever ``block``: logs of the same ``n`` and
    ``seed`` hold the same decisions and vectors however their blocks are cut. Each
    transaction writes whole blocks; the decisions past the last whole one wait for the next
    transaction (the last writes them as a short block). A fill interrupted meanwhile is
    completed where it stopped: the decisions stored without a block get theirs."""
    from decisionlog import DecisionStore
    from decisionlog.blocks import BLOCK, Block
    from decisionlog.tables import decision_frames, decisions, frame_blocks

    size_of_block = block or BLOCK
    store = DecisionStore(url)
    have = store.count()
    with store.engine.connect() as conn:
        blocked = int(conn.execute(sa.select(sa.func.coalesce(
            sa.func.sum(frame_blocks.c.decisions), 0)).where(
                frame_blocks.c.model == model)).scalar() or 0)
    if have >= n and blocked >= have:
        return
    now = time.time()
    batch = 10_000
    started = time.perf_counter()
    pending: list[Block] = []  # made, stored as decisions, not yet in a block
    first = min(have, blocked) // batch * batch
    for start in range(first, max(n, have), batch):
        size = min(batch, max(n, have) - start)
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
        # a resumed fill: the decisions already stored are not written again, those already
        # in a block not blocked again (their blocks' times are this run's: off by the time
        # between the runs, as the decisions written now are)
        new_rows = max(have - start, 0)
        if blocked > start:
            whole = whole.take(np.arange(min(blocked - start, size), size))
        pending.append(whole)
        ready = Block.concat(pending)
        last = start + size >= max(n, have)
        cut = len(ready) if last else len(ready) // size_of_block * size_of_block
        pending = [ready.take(np.arange(cut, len(ready)))] if cut < len(ready) else []
        with store.engine.begin() as conn:
            if new_rows < size:
                written = {r["id"] for r in rows[new_rows:]}
                conn.execute(decisions.insert(), rows[new_rows:])
                frame_rows = [fr for fr in frame_rows if fr[0] in written]
                if store.dialect == "postgresql":
                    _copy_frames(conn, frame_rows)
                else:  # FrameVector writes the float16 bytes
                    conn.execute(decision_frames.insert(), [
                        {"decision_id": d, "frame": f, "embedding": v}
                        for d, f, v in frame_rows
                    ])
            if cut:
                conn.execute(frame_blocks.insert(), [
                    part.row(model)
                    for part in ready.take(np.arange(cut)).split(size_of_block)])
        done = start + size
        if done // 100_000 != start // 100_000 or last:
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


def postgres_database(server: str, name: str, *, fresh: bool = True,
                      template: str | None = None) -> str:
    """Database ``name`` on ``server``: a new, empty one (dropped first if it exists), or
    (``fresh`` false) the one a previous run left, created empty if there is none (a fill
    then completes it). ``template``: a copy of that database instead of an empty one."""
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              (name,)).fetchone()
        if fresh or not exists:
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
            conn.execute(f"CREATE DATABASE {name}"
                         + (f" TEMPLATE {template}" if template else ""))
    return server.rsplit("/", 1)[0] + f"/{name}"


def load() -> str:
    """The machine's load averages (1, 5, 15 min), as ``uptime`` shows them."""
    from pathlib import Path

    return "/".join(Path("/proc/loadavg").read_text().split()[:3])


def high_water_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would also count the parent's
    memory at fork, which Linux carries across exec)."""
    import resource
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_encoder(model: str) -> Any:
    """The torch encoder of ``model`` with random weights (a real model's compute), its
    warning silenced: for benchmarks."""
    import warnings

    from moderation.backends import RandomWeightsWarning
    from moderation.backends.torch import Encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return Encoder.load(model, random_weights=True)


def default_policy_data(model: str) -> dict[str, Any]:
    """policies/default.yaml as data, for ``model`` with random weights (no threshold
    claims a calibration with another model)."""
    from pathlib import Path

    import yaml

    data: dict[str, Any] = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "policies" / "default.yaml").read_text())
    data["model"] = {"name": model, "pretrained": "random"}
    for category in data["categories"].values():
        category["threshold"].pop("provenance", None)
    return data
