"""What merging frame blocks costs, and what unmerged blocks cost a dry-run.

The service writes one small frame block per commit (as many decisions as the commit holds,
a handful to a few dozen), and each worker's merger rewrites small blocks as blocks of 4,096
decisions in time order (``decisionlog.blocks.merge_small``, a transaction of at most 8,192
decisions at a time). This bench fills the policy lab's log (``bench/policy_lab.py``: the
same decisions and vectors) with blocks of ``--block`` decisions (16 by default) as written
per commit, before any merge, then:

* **compaction**: ``decisionlog.blocks.compact`` over the whole log, in a fresh process, on
  a copy of the filled log (SQLite: a copy of the file, in the page cache as a live log is;
  PostgreSQL: ``CREATE DATABASE … TEMPLATE``), ``--compactions`` times: seconds, seconds per
  million decisions, blocks before and after, peak RSS;
* **dry-runs** on the unmerged log and on the compacted copy, alternating (``--runs``
  pairs, each run in a fresh process, the policy lab's dry-run), and each pair's ratio.

    .venv/bin/python bench/blocks.py [--decisions 100000 1000000] [--block 16]
        [--postgres URL] [--keep DIR] [--compactions 1] [--runs 3]

Prints, per database and size:

    sqlite compact decisions=N seconds=S s_per_million=… blocks_before=… blocks_after=… …
    sqlite unmerged decisions=N seconds=S peak_rss_mb=M … blocks=K load=L
    sqlite merged decisions=N seconds=S … blocks=K load=L
    sqlite dry-run unmerged/merged=R,R,R median=R

``--keep``: keep (and reuse) the filled small-block logs (SQLite: files in DIR; PostgreSQL:
databases); the compacted copies are left there too, overwritten by the next run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import policy_lab  # noqa: E402
from bench.synthetic import high_water_mb, load, postgres_database  # noqa: E402


def measure_compaction(url: str) -> None:
    """In its own process: compact the whole log, then a JSON line of figures."""
    import sqlalchemy as sa

    from decisionlog import DecisionStore
    from decisionlog.blocks import SMALL, compact
    from decisionlog.tables import frame_blocks

    store = DecisionStore(url)
    b = frame_blocks.c

    def counts() -> tuple[int, int]:
        with store.engine.connect() as conn:
            return (int(conn.execute(sa.select(sa.func.count()).select_from(frame_blocks))
                        .scalar() or 0),
                    int(conn.execute(sa.select(sa.func.count()).where(b.decisions < SMALL))
                        .scalar() or 0))

    blocks_before, small_before = counts()
    base = high_water_mb()
    started = time.perf_counter()
    moved = compact(store.engine)
    seconds = time.perf_counter() - started
    peak = high_water_mb()
    blocks_after, small_after = counts()
    print(json.dumps({"seconds": seconds, "moved": moved, "blocks_before": blocks_before,
                      "blocks_after": blocks_after, "small_before": small_before,
                      "small_after": small_after, "peak": peak, "base": base}))


def compaction(url: str, label: str, decisions: int) -> None:
    out = subprocess.run([sys.executable, __file__, "--compact", url], check=True,
                         capture_output=True, text=True).stdout
    f = json.loads(out.strip().splitlines()[-1])
    print(f"{label} compact decisions={f['moved']} seconds={f['seconds']:.1f} "
          f"s_per_million={f['seconds'] * 1e6 / max(decisions, 1):.1f} "
          f"blocks_before={f['blocks_before']} blocks_after={f['blocks_after']} "
          f"small_after={f['small_after']} peak_rss_mb={f['peak']:.0f} "
          f"base_rss_mb={f['base']:.0f} load={load()}", flush=True)


def sqlite_copy(source: Path, target: Path) -> None:
    """``target``: a copy of the SQLite log ``source`` (its WAL checkpointed first)."""
    with sqlite3.connect(source) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(source, target)


def dry_runs(unmerged: str, merged: str, label: str, runs: int) -> None:
    ratios = []
    for i in range(runs):
        order = [("unmerged", unmerged), ("merged", merged)]
        figures = {}
        for kind, url in order if i % 2 == 0 else order[::-1]:
            figures[kind] = policy_lab.run(url, f"{label} {kind}")
        ratios.append(figures["unmerged"]["seconds"] / figures["merged"]["seconds"])
    print(f"{label} dry-run unmerged/merged={','.join(f'{r:.2f}' for r in ratios)} "
          f"median={statistics.median(ratios):.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--block", type=int, default=16,
                        help="decisions per block as written (one commit's)")
    parser.add_argument("--postgres", help="a PostgreSQL server URL (scratch databases)")
    parser.add_argument("--keep", type=Path, help="keep and reuse the logs (SQLite: here)")
    parser.add_argument("--compactions", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="pairs of dry-runs")
    parser.add_argument("--compact", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compact:
        measure_compaction(args.compact)
        return
    from decisionlog.database import dispose_all

    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-blocks-"))
    folder.mkdir(parents=True, exist_ok=True)
    for n in args.decisions:
        small = folder / f"lab-{n}-b{args.block}.sqlite3"
        compacted = folder / f"lab-{n}-b{args.block}-compacted.sqlite3"
        policy_lab.fill(f"sqlite:///{small}", n, args.block)
        dispose_all()
        for _ in range(args.compactions):
            sqlite_copy(small, compacted)
            compaction(f"sqlite:///{compacted}", "sqlite", n)
        dry_runs(f"sqlite:///{small}", f"sqlite:///{compacted}", "sqlite", args.runs)
        if args.postgres:
            name = f"bench_lab_{n}_b{args.block}"
            pg = postgres_database(args.postgres, name, fresh=args.keep is None)
            policy_lab.fill(pg, n, args.block)
            dispose_all()  # no session on it: it is the copies' template
            pg_compacted = ""
            for _ in range(args.compactions):
                pg_compacted = postgres_database(args.postgres, f"{name}_compacted",
                                                 template=name)
                compaction(pg_compacted, "postgresql", n)
            if pg_compacted:
                dry_runs(pg, pg_compacted, "postgresql", args.runs)


if __name__ == "__main__":
    main()
