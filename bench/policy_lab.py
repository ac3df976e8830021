"""How long a policy dry-run takes, and how much memory it needs, for N stored decisions.

Fills a decision log with synthetic decisions (ViT-B-32's 512-dimension unit vectors, stored
as float16; one in fifty an animation of 4 frames; several policy versions), then dry-runs an
edit of policies/default.yaml (a term added, a threshold lowered) over the whole window, in a
fresh process per run, and prints one line per run:

    decisions=N seconds=S peak_rss_mb=M base_rss_mb=B

``base_rss_mb`` is that process's memory before the dry-run (Python, numpy, SQLAlchemy and
the policy's text embeddings), so ``peak - base`` is what the dry-run itself held. Text
embeddings are deterministic random unit vectors (no model is loaded: the dry-run never runs
one; encoding a new term is the text cache's business, measured elsewhere).

    .venv/bin/python bench/policy_lab.py [--decisions 100000 1000000] [--postgres URL]
        [--keep DIR]

``--postgres``: also on that server (a scratch database is created per size). ``--keep``:
keep (and reuse) the filled SQLite logs in DIR.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 512
MODEL = "bench/random-unit-vectors"
VERSIONS = ["v-aaaaaaaa", "v-bbbbbbbb", "v-cccccccc"]


class HashedTexts:
    """A text encoder whose vectors are random unit vectors seeded by the text."""

    identity = MODEL

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).normal(size=DIM)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, np.float32)


def policies() -> tuple[object, object]:
    from moderation.policy import load_policy, parse_policy

    current = load_policy(ROOT / "policies" / "default.yaml")
    data = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
    edited = copy.deepcopy(data)
    first = next(iter(edited["categories"]))
    edited["categories"][first]["terms"].append("a machete")
    edited["categories"][first]["threshold"]["value"] -= 0.02
    return current, parse_policy(yaml.safe_dump(edited), base_dir=ROOT / "policies")


def fill(url: str, n: int) -> None:
    """n decisions over the last 30 days, with their frames. Each vector leans towards one of
    the policy's categories by a random amount, so that scores spread around the thresholds
    (cosines of about 0 to 0.45) and an edit changes some decisions, as on real traffic."""
    from decisionlog import DecisionStore
    from decisionlog.schema import decision_frames, decisions
    from moderation.prompts import embed_policy

    current, _ = policies()
    towards = embed_policy(current, HashedTexts()).categories  # type: ignore[arg-type]
    store = DecisionStore(url)
    have = store.count()
    if have >= n:
        return
    rng = np.random.default_rng(have)
    now = time.time()
    dialect = store.dialect
    batch = 10_000
    started = time.perf_counter()
    for start in range(have, n, batch):
        size = min(batch, n - start)
        # in time order, as a log is written: decision i of n at i/n of the last 30 days
        times = now - 30 * 86400 * (1 - (start + np.sort(rng.uniform(0, size, size))) / n)
        frames = np.where(rng.random(size) < 0.02, 4, 1)
        noise = rng.normal(size=(int(frames.sum()), DIM)) / np.sqrt(DIM)
        lean = rng.uniform(0, 0.5, (len(noise), 1))
        vectors = (noise + lean * towards[rng.integers(0, len(towards), len(noise))])
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        rows, frame_rows, k = [], [], 0
        for i in range(size):
            decision_id = uuid.uuid4().hex
            rows.append({
                "id": decision_id, "created_at": float(times[i]), "hour": int(times[i] // 3600),
                "client_id": f"upload-{start + i}", "image_sha256": "0" * 64, "image_size": 1,
                "policy_name": "default", "policy_version": VERSIONS[i % len(VERSIONS)],
                "model": MODEL, "profile": "default", "action": "allow", "triggered": "",
                "categories": "{}", "latency_ms": 1.0, "error_code": None, "frame": 0,
                "frames_scored": int(frames[i]),
            })
            for f in range(int(frames[i])):
                frame_rows.append({"decision_id": decision_id, "frame": f,
                                   "embedding": vectors[k]})
                k += 1
        with store.engine.begin() as conn:
            conn.execute(decisions.insert(), rows)
            if dialect == "postgresql":  # COPY: the insert path converts vectors to text
                raw = conn.connection.dbapi_connection
                assert raw is not None
                with raw.cursor().copy(  # type: ignore[attr-defined]
                        "COPY decision_frames (decision_id, frame, embedding) FROM STDIN") as cp:
                    for r in frame_rows:
                        cp.write_row((r["decision_id"], r["frame"],
                                      "[" + ",".join(f"{x:.5g}" for x in
                                                     r["embedding"].astype(np.float16)) + "]"))
            else:  # FrameVector writes the float16 bytes
                conn.execute(decision_frames.insert(), frame_rows)
        done = start + size
        if done % 100_000 == 0 or done == n:
            print(f"  filled {done} decisions ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr)


def high_water_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would also count the parent's
    memory at fork, which Linux carries across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(url: str) -> None:
    """In its own process: one dry-run over everything, then a JSON line of figures."""
    from decisionlog import DecisionStore
    from decisionlog.lab import dry_run
    from moderation.prompts import embed_policy
    from moderation.scorer import Scorer

    current, proposed = policies()
    encoder = HashedTexts()
    before = Scorer(current, embed_policy(current, encoder))  # type: ignore[arg-type]
    after = Scorer(proposed, embed_policy(proposed, encoder))  # type: ignore[arg-type]
    store = DecisionStore(url)
    base = high_water_mb()
    started = time.perf_counter()
    report = dry_run(store, before, after, model=MODEL, limit=50)
    seconds = time.perf_counter() - started
    peak = high_water_mb()
    print(json.dumps({"decisions": report.decisions, "seconds": seconds, "peak": peak,
                      "base": base, "changed": report.changed_total}))


def run(url: str, label: str) -> None:
    out = subprocess.run([sys.executable, __file__, "--measure", url], check=True,
                         capture_output=True, text=True).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    print(f"{label} decisions={figures['decisions']} seconds={figures['seconds']:.2f} "
          f"peak_rss_mb={figures['peak']:.0f} base_rss_mb={figures['base']:.0f} "
          f"changed={figures['changed']}", flush=True)


def postgres_database(server: str, n: int) -> str:
    import psycopg

    name = f"bench_lab_{n}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + f"/{name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--postgres", help="a PostgreSQL server URL (scratch databases)")
    parser.add_argument("--keep", type=Path, help="keep and reuse the SQLite logs here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-lab-"))
    folder.mkdir(parents=True, exist_ok=True)
    for n in args.decisions:
        url = f"sqlite:///{folder / f'lab-{n}.sqlite3'}"
        fill(url, n)
        run(url, "sqlite")
        if args.postgres:
            pg = postgres_database(args.postgres, n)
            fill(pg, n)
            run(pg, "postgresql")


if __name__ == "__main__":
    main()
