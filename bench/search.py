"""How fast the decision log answers a search, and (pgvector) how many true neighbours it finds.

Fills a log with N synthetic 512-dimension unit vectors in clusters (so that neighbours
exist: topics of ~1,000 uploads, scenes of ~20 in each; ``--flat``: topics only), then runs the
same queries (another copy of a stored scene) through the library's search, top 10 with the
hits' records, and prints one line per index (and per ``--ef-search`` value):

    index=exact n=N data=… p50_ms=… p95_ms=… load=…
    index=exact-postgresql n=N data=… p50_ms=… p95_ms=… recall_at_10=… load=…
    index=pgvector n=N data=… build_s=… p50_ms=… p95_ms=… recall_at_10=… ef_search=… load=…

Exact search runs on SQLite (the embedded default; ``--repeat``: that many lines, each its own
set of queries timed); with ``--postgres`` the same log is filled on that server (a scratch
database per size), exact search runs there too (``--postgres-exact``: as many lines as on
SQLite; it reads the same frame blocks), the HNSW index is built (``build_s``) and searched,
and recall@10 is measured against the exact answers of the SQLite log (the same decisions and
vectors: the fill is deterministic). ``load``: the machine's load averages (1/5/15 min) as the
line is printed. Logs are filled with merged frame blocks (as the service's merger leaves
them) and, on PostgreSQL, the frame rows by COPY (HNSW indexes those).

``--py-spy DIR``: the first exact search line of each log is recorded by py-spy (raw stacks,
every thread, idle samples: wall time), for ``bench/profile_split.py``.

    .venv/bin/python bench/search.py [--n 100000 1000000] [--postgres URL] [--keep DIR]
        [--queries 50] [--warm 50] [--ef-search 40 100 200] [--m 32] [--ef-construction 128]
        [--flat] [--reuse] [--repeat 1] [--postgres-exact] [--py-spy DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import synthetic  # noqa: E402
from bench.synthetic import DIM, load, postgres_database  # noqa: E402

MODEL = "bench/clustered-unit-vectors"
SEED = 11


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def scenes(n: int, flat: bool) -> np.ndarray:
    """Where the uploads are: topics of ~1,000 uploads, and in each, scenes of ~20 (the same
    picture re-uploaded, edited, shot again: more than the 10 asked for, so that a query's
    true top 10 are its scene's, not a near-tie among the topic). ``flat``: topics only,
    every upload of a topic as far from the others (the hardest case for an index)."""
    rng = np.random.default_rng([SEED, n])
    topics = _unit(rng.normal(size=(max(n // 1000, 10), DIM)))
    if flat:
        return topics
    per_topic = topics[rng.integers(0, len(topics), max(n // 20, 10))]
    return _unit(per_topic + 0.8 * rng.normal(size=per_topic.shape) / np.sqrt(DIM))


def clustered(n: int, flat: bool = False) -> synthetic.Vectors:
    middle = scenes(n, flat)
    spread = 0.55 if flat else 0.35  # cosine to the centre ~0.77 (flat), ~0.89 (a scene)

    def make(rng: np.random.Generator, count: int) -> np.ndarray:
        v = middle[rng.integers(0, len(middle), count)]
        return _unit(v + spread * rng.normal(size=(count, DIM)) / np.sqrt(DIM))

    return make


def queries(n: int, count: int, flat: bool = False, batch: int = 1) -> np.ndarray:
    """Uploads like the stored ones (another copy of a stored scene), moved a little more;
    ``batch``: another set of the same kind (the warm-up's)."""
    rng = np.random.default_rng([SEED, n, batch])
    q = clustered(n, flat)(rng, count)
    return _unit(q + 0.2 * rng.normal(size=q.shape) / np.sqrt(DIM))


def timed(store: object, index: object, qs: np.ndarray,
          warm: np.ndarray) -> tuple[list[float], list[list[str]]]:
    """Each query's time and answer, after ``warm`` (other queries of the same kind) ran
    untimed: the index's upper layers in the cache, as in a service that has been up."""
    from decisionlog.search import search

    for q in warm:
        search(store, q, model=MODEL, limit=10, index=index)  # type: ignore[arg-type]
    millis, answers = [], []
    for q in qs:
        started = time.perf_counter()
        page = search(store, q, model=MODEL, limit=10, index=index)  # type: ignore[arg-type]
        millis.append(1000 * (time.perf_counter() - started))
        answers.append([h.decision_id for h in page.hits])
    return millis, answers


def figures(millis: list[float]) -> str:
    return f"p50_ms={np.percentile(millis, 50):.1f} p95_ms={np.percentile(millis, 95):.1f}"


def recall(found: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(e)) / max(len(e), 1)
                          for a, e in zip(found, exact, strict=True)]))


@contextlib.contextmanager
def profiled(out: Path | None) -> Iterator[None]:
    """py-spy records this process meanwhile (``out``: None, nothing)."""
    if out is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [str(Path(sys.executable).with_name("py-spy")), "record", "--idle", "--threads",
         "--format", "raw", "--rate", "200", "-o", str(out), "--pid", str(os.getpid())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--postgres", help="a PostgreSQL server URL (scratch databases)")
    parser.add_argument("--keep", type=Path, help="keep and reuse the SQLite logs here")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--warm", type=int, default=50,
                        help="pgvector: other queries run untimed first (exact search: one)")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[40, 100, 200],
                        help="pgvector: one line per value (the same index)")
    parser.add_argument("--flat", action="store_true",
                        help="topics only, no scenes: no neighbours closer than the rest")
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=128)
    parser.add_argument("--reuse", action="store_true",
                        help="PostgreSQL: search the database (and index) a previous run with "
                             "the same --n, --m and --ef-construction left (build_s=nan)")
    parser.add_argument("--repeat", type=int, default=1, help="exact search lines per log")
    parser.add_argument("--postgres-exact", action="store_true",
                        help="exact search on the PostgreSQL log too (--repeat lines)")
    parser.add_argument("--py-spy", type=Path, help="profile the first exact search line of "
                                                    "each log into this folder")
    args = parser.parse_args()
    from decisionlog import DecisionStore
    from decisionlog.search import ExactIndex, HnswIndex, ensure_hnsw_index

    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-search-"))
    folder.mkdir(parents=True, exist_ok=True)
    shape = "flat" if args.flat else "scenes"
    for n in args.n:
        url = f"sqlite:///{folder / f'search-{shape}-{n}.sqlite3'}"
        synthetic.fill(url, n, clustered(n, args.flat), model=MODEL, seed=SEED, actions=True)
        qs = queries(n, args.queries, args.flat)
        warm = queries(n, args.warm, args.flat, batch=2)
        store = DecisionStore(url)
        for i in range(args.repeat):
            out = args.py_spy / f"search-sqlite-{n}.txt" if args.py_spy and i == 0 else None
            with profiled(out):
                millis, exact = timed(store, ExactIndex(store), qs, warm[:1])
            print(f"index=exact n={n} data={shape} {figures(millis)} load={load()}"
                  + (f" profile={out}" if out else ""), flush=True)
        if not args.postgres:
            continue
        name = f"bench_search_{shape}_{n}_m{args.m}_efc{args.ef_construction}"
        if args.reuse:  # the database a previous run filled and indexed
            pg_url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
            pg, build = DecisionStore(pg_url), float("nan")
        else:
            pg_url = postgres_database(args.postgres, name)
            pg = DecisionStore(pg_url)
            with pg.engine.begin() as conn:  # room for the graph while building
                conn.exec_driver_sql(f"ALTER DATABASE {name} SET maintenance_work_mem = '4GB'")
            synthetic.fill(pg_url, n, clustered(n, args.flat), model=MODEL, seed=SEED,
                           actions=True)
            pg.close()  # new sessions: the setting above
            started = time.perf_counter()
            ensure_hnsw_index(pg.engine, DIM, m=args.m, ef_construction=args.ef_construction)
            build = time.perf_counter() - started
        for i in range(args.repeat if args.postgres_exact else 0):
            out = args.py_spy / f"search-postgresql-{n}.txt" if args.py_spy and i == 0 else None
            with profiled(out):
                millis, found = timed(pg, ExactIndex(pg), qs, warm[:1])
            print(f"index=exact-postgresql n={n} data={shape} {figures(millis)} "
                  f"recall_at_10={recall(found, exact):.3f} load={load()}"
                  + (f" profile={out}" if out else ""), flush=True)
        for ef_search in args.ef_search:
            millis, approximate = timed(pg, HnswIndex(pg, ef_search=ef_search), qs, warm)
            print(f"index=pgvector n={n} data={shape} build_s={build:.0f} {figures(millis)} "
                  f"recall_at_10={recall(approximate, exact):.3f} ef_search={ef_search} "
                  f"m={args.m} ef_construction={args.ef_construction} load={load()}",
                  flush=True)


if __name__ == "__main__":
    main()
