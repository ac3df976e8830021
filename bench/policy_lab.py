"""How long a policy dry-run takes, and how much memory it needs, for N stored decisions.

Fills a decision log with synthetic decisions (ViT-B-32's 512-dimension unit vectors, stored
as float16; one in fifty an animation of 4 frames; several policy versions; frame blocks as
the service's merger leaves them, or ``--block N``: small blocks of N as written per commit,
before any merge), then dry-runs an edit of policies/default.yaml (a term added, a threshold
lowered) over the whole window, in a fresh process per run, and prints one line per run:

    sqlite decisions=N seconds=S peak_rss_mb=M base_rss_mb=B changed=C blocks=K load=L

``base_rss_mb`` is that process's memory before the dry-run (Python, numpy, SQLAlchemy and
the policy's text embeddings), so ``peak - base`` is what the dry-run itself held; ``blocks``:
the frame blocks the window spans; ``load``: the machine's load averages (1/5/15 min) when
the run ended. Text embeddings are deterministic random unit vectors (no model is loaded:
the dry-run never runs one; encoding a new term is the text cache's business, measured
elsewhere).

    .venv/bin/python bench/policy_lab.py [--decisions 100000 1000000] [--postgres URL]
        [--keep DIR] [--runs 3] [--block N] [--py-spy DIR]

``--postgres``: also on that server (a scratch database per size). ``--keep``: keep (and
reuse) the filled logs: SQLite files in DIR, and the PostgreSQL databases (reused, completed
if a fill was interrupted, instead of filled anew). ``--py-spy DIR``: record each run with
py-spy (raw collapsed stacks, every thread, idle samples included: wall time), for
``bench/profile_split.py``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import synthetic  # noqa: E402
from bench.synthetic import DIM, high_water_mb, load, postgres_database  # noqa: E402

MODEL = "bench/random-unit-vectors"


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


def fill(url: str, n: int, block: int | None = None) -> None:
    """Each vector leans towards one of the policy's categories by a random amount, so that
    scores spread around the thresholds (cosines of about 0 to 0.45) and an edit changes some
    decisions, as on real traffic."""
    from moderation.prompts import embed_policy

    current, _ = policies()
    towards = embed_policy(current, HashedTexts()).categories  # type: ignore[arg-type]

    def leaning(rng: np.random.Generator, count: int) -> np.ndarray:
        noise = rng.normal(size=(count, DIM)) / np.sqrt(DIM)
        lean = rng.uniform(0, 0.5, (count, 1))
        vectors = noise + lean * towards[rng.integers(0, len(towards), count)]
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    synthetic.fill(url, n, leaning, model=MODEL, block=block)


def measure(url: str) -> None:
    """In its own process: one dry-run over everything, then a JSON line of figures."""
    import sqlalchemy as sa

    from decisionlog import DecisionStore
    from decisionlog.lab import dry_run
    from decisionlog.tables import frame_blocks
    from moderation.prompts import embed_policy
    from moderation.scorer import Scorer

    current, proposed = policies()
    encoder = HashedTexts()
    before = Scorer(current, embed_policy(current, encoder))  # type: ignore[arg-type]
    after = Scorer(proposed, embed_policy(proposed, encoder))  # type: ignore[arg-type]
    store = DecisionStore(url)
    with store.engine.connect() as conn:
        blocks = conn.execute(sa.select(sa.func.count()).select_from(frame_blocks)
                              .where(frame_blocks.c.model == MODEL)).scalar()
    base = high_water_mb()
    started = time.perf_counter()
    report = dry_run(store, before, after, model=MODEL, limit=50)
    seconds = time.perf_counter() - started
    peak = high_water_mb()
    print(json.dumps({"decisions": report.decisions, "seconds": seconds, "peak": peak,
                      "base": base, "changed": report.changed_total, "blocks": blocks}))


def run(url: str, label: str, profile: Path | None = None) -> dict[str, float]:
    """One dry-run in a fresh process (``profile``: recorded by py-spy into that file);
    prints its line and returns its figures."""
    command = [sys.executable, __file__, "--measure", url]
    if profile is not None:
        profile.parent.mkdir(parents=True, exist_ok=True)
        command = [str(Path(sys.executable).with_name("py-spy")), "record", "--idle",
                   "--threads", "--format", "raw", "--rate", "200", "-o", str(profile),
                   "--", *command]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    figures = json.loads(next(line for line in reversed(out.strip().splitlines())
                              if line.startswith("{")))
    print(f"{label} decisions={figures['decisions']} seconds={figures['seconds']:.2f} "
          f"peak_rss_mb={figures['peak']:.0f} base_rss_mb={figures['base']:.0f} "
          f"changed={figures['changed']} blocks={figures['blocks']} load={load()}"
          + (f" profile={profile}" if profile else ""), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--postgres", help="a PostgreSQL server URL (scratch databases)")
    parser.add_argument("--keep", type=Path, help="keep and reuse the logs (SQLite: here)")
    parser.add_argument("--runs", type=int, default=3, help="dry-runs per log")
    parser.add_argument("--block", type=int,
                        help="fill with small blocks of this many decisions (as written per "
                             "commit, before merging); default: merged blocks")
    parser.add_argument("--py-spy", type=Path, help="profile each run into this folder")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-lab-"))
    folder.mkdir(parents=True, exist_ok=True)
    suffix = f"-b{args.block}" if args.block else ""

    def profile(label: str, n: int, i: int) -> Path | None:
        return args.py_spy / f"lab-{label}-{n}{suffix}-{i}.txt" if args.py_spy else None

    for n in args.decisions:
        url = f"sqlite:///{folder / f'lab-{n}{suffix}.sqlite3'}"
        fill(url, n, args.block)
        for i in range(args.runs):
            run(url, "sqlite", profile("sqlite", n, i))
        if args.postgres:
            pg = postgres_database(args.postgres, f"bench_lab_{n}{suffix.replace('-', '_')}",
                                   fresh=args.keep is None)
            fill(pg, n, args.block)
            for i in range(args.runs):
                run(pg, "postgresql", profile("postgresql", n, i))


if __name__ == "__main__":
    main()
