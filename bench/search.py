"""How fast the decision log answers a search, and (pgvector) how many true neighbours it finds.

Fills a log with N synthetic 512-dimension unit vectors in clusters (so that neighbours
exist: about 1,000 vectors a cluster, cosine ~0.75 within one), then runs the same queries
(stored vectors, moved as an edited copy would be) through the library's search, top 10 with
the hits' records, and prints one line per index:

    index=exact n=N p50_ms=… p95_ms=…
    index=pgvector n=N build_s=… p50_ms=… p95_ms=… recall_at_10=…

Exact search runs on SQLite (the embedded default); with ``--postgres`` the same log is filled
on that server (a scratch database per size), the HNSW index is built (``build_s``) and
searched, and recall@10 is measured against the exact answers of the SQLite log (the same
decisions and vectors: the fill is deterministic).

    .venv/bin/python bench/search.py [--n 100000 1000000] [--postgres URL] [--keep DIR]
        [--queries 50] [--ef-search 100] [--m 16] [--ef-construction 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import synthetic  # noqa: E402
from bench.synthetic import DIM, postgres_database  # noqa: E402

MODEL = "bench/clustered-unit-vectors"
SEED = 11


def centres(n: int) -> np.ndarray:
    rng = np.random.default_rng([SEED, n])
    c = rng.normal(size=(max(n // 1000, 10), DIM))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def clustered(n: int) -> synthetic.Vectors:
    middle = centres(n)

    def make(rng: np.random.Generator, count: int) -> np.ndarray:
        v = middle[rng.integers(0, len(middle), count)]
        v = v + 0.55 * rng.normal(size=(count, DIM)) / np.sqrt(DIM)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return make


def queries(n: int, count: int) -> np.ndarray:
    """Vectors near stored ones: a cluster's centre moved as far as a stored vector is."""
    rng = np.random.default_rng([SEED, n, 1])
    q = clustered(n)(rng, count)
    q = q + 0.2 * rng.normal(size=q.shape) / np.sqrt(DIM)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def timed(store: object, index: object, qs: np.ndarray) -> tuple[list[float], list[list[str]]]:
    from decisionlog.search import search

    search(store, qs[0], model=MODEL, limit=10, index=index)  # type: ignore[arg-type]  # warm
    millis, answers = [], []
    for q in qs:
        started = time.perf_counter()
        page = search(store, q, model=MODEL, limit=10, index=index)  # type: ignore[arg-type]
        millis.append(1000 * (time.perf_counter() - started))
        answers.append([h.decision_id for h in page.hits])
    return millis, answers


def figures(millis: list[float]) -> str:
    return f"p50_ms={np.percentile(millis, 50):.1f} p95_ms={np.percentile(millis, 95):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--postgres", help="a PostgreSQL server URL (scratch databases)")
    parser.add_argument("--keep", type=Path, help="keep and reuse the SQLite logs here")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--ef-search", type=int, default=100)
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=64)
    args = parser.parse_args()
    from decisionlog import DecisionStore
    from decisionlog.search import ExactIndex, HnswIndex, ensure_hnsw_index

    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-search-"))
    folder.mkdir(parents=True, exist_ok=True)
    for n in args.n:
        url = f"sqlite:///{folder / f'search-{n}.sqlite3'}"
        synthetic.fill(url, n, clustered(n), model=MODEL, seed=SEED, actions=True)
        qs = queries(n, args.queries)
        store = DecisionStore(url)
        millis, exact = timed(store, ExactIndex(store), qs)
        print(f"index=exact n={n} {figures(millis)}", flush=True)
        if not args.postgres:
            continue
        pg_url = postgres_database(args.postgres, f"bench_search_{n}")
        pg = DecisionStore(pg_url)
        with pg.engine.begin() as conn:  # room for the graph while building (this database)
            conn.exec_driver_sql(f"ALTER DATABASE bench_search_{n} SET "
                                 "maintenance_work_mem = '4GB'")
        synthetic.fill(pg_url, n, clustered(n), model=MODEL, seed=SEED, actions=True)
        pg.close()  # new sessions: the setting above
        started = time.perf_counter()
        ensure_hnsw_index(pg.engine, DIM, m=args.m, ef_construction=args.ef_construction)
        build = time.perf_counter() - started
        millis, approximate = timed(pg, HnswIndex(pg, ef_search=args.ef_search), qs)
        recall = np.mean([len(set(a) & set(e)) / max(len(e), 1)
                          for a, e in zip(approximate, exact, strict=True)])
        print(f"index=pgvector n={n} build_s={build:.0f} {figures(millis)} "
              f"recall_at_10={recall:.3f} ef_search={args.ef_search} m={args.m} "
              f"ef_construction={args.ef_construction}", flush=True)


if __name__ == "__main__":
    main()
