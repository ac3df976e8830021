"""What following the log's active policy costs a request: the one indexed read every
request makes (``PolicyLog.latest_id``), against a bare ``SELECT 1`` on the same engine in the
same run, on SQLite and (with ``--postgres URL``) PostgreSQL.

    .venv/bin/python bench/policy_follow.py [--postgres postgresql://…] [--checks 5000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decisionlog import PolicyLog  # noqa: E402


def per_call(fn: object, n: int) -> float:
    call = fn  # type: ignore[assignment]
    for _ in range(50):  # warm the pool
        call()  # type: ignore[operator]
    started = time.perf_counter()
    for _ in range(n):
        call()  # type: ignore[operator]
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", help="a PostgreSQL URL (a scratch database: it is "
                        "migrated and gets activations)")
    parser.add_argument("--checks", type=int, default=5000)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-follow-")
    urls = [("sqlite", f"sqlite:///{folder}/decisions.sqlite3")]
    if args.postgres:
        urls.append(("postgresql", args.postgres))
    print(f"{'database':<11} {'latest_id() µs':>15} {'SELECT 1 µs':>12} {'ratio':>6}")
    for name, url in urls:
        log = PolicyLog(url)
        for i in range(100):  # a long history: the read must not grow with it
            log.activate(version=f"v{i:04d}", name="bench", source="p.yaml",
                         text=f"name: bench\n# {i}\n", reason="reload")

        def select_one(engine: sa.Engine = log.engine) -> None:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1")).scalar()

        check = per_call(log.latest_id, args.checks)
        bare = per_call(select_one, args.checks)
        print(f"{name:<11} {check * 1e6:>15.1f} {bare * 1e6:>12.1f} {check / bare:>6.2f}")


if __name__ == "__main__":
    main()
