"""How fast the review queue hands out work, and what /v1/quality costs on a large window.

For each database (SQLite, and PostgreSQL with ``--postgres``) and each number of reviewer
threads: queue ``--items`` review items, then every thread claims, decides and claims again
until the queue is empty (as reviewers do, with no think time: the queue's own ceiling), and
prints the rate and the latency of a claim:

    db=sqlite reviewers=4 items=2000 items_per_s=… claim_p50_ms=… claim_p95_ms=… duplicates=0

Then a window of ``--quality`` decided design items (one in five an audit sample) is written
straight into the tables and ``quality()`` (what GET /v1/quality runs) is timed:

    db=sqlite quality_items=100000 quality_s=…

    .venv/bin/python bench/reviews.py [--items 2000] [--reviewers 1 4 8] [--quality 100000]
        [--postgres URL]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synthetic import postgres_database  # noqa: E402

ACTIONS = {"weapons": "block", "drugs": "flag"}


def queue_items(store, n: int) -> None:  # type: ignore[no-untyped-def]
    from decisionlog import DecisionRecord

    now = time.time()
    records = [DecisionRecord(
        id=uuid.uuid4().hex, created_at=now - 3600 + i * 1e-3, client_id=f"upload-{i}",
        image={"sha256": "0" * 64, "size": 1}, policy={"name": "bench", "version": "v"},
        model="bench", profile="default", action="review", triggered=["weapons"],
        categories={}, latency_ms=1.0, frame=0, frames_scored=1,
    ) for i in range(n)]
    for start in range(0, n, 1000):
        store.add_many(records[start:start + 1000])


def claim_rate(store, items: int, reviewers: int) -> str:  # type: ignore[no-untyped-def]
    from decisionlog.reviews import ReviewQueue

    queue_items(store, items)
    queue = ReviewQueue(store)
    taken: list[int] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while True:
            started = time.perf_counter()
            item = queue.claim(name)
            elapsed = time.perf_counter() - started
            if item is None:
                return
            with lock:
                taken.append(item.item_id)
                latencies.append(elapsed)
            queue.decide(item.item_id, name, ["weapons"], ACTIONS)

    threads = [threading.Thread(target=work, args=(f"r{i}",)) for i in range(reviewers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    p50, p95 = np.percentile(np.asarray(latencies) * 1000, [50, 95])
    return (f"reviewers={reviewers} items={len(taken)} items_per_s={len(taken) / wall:.0f} "
            f"claim_p50_ms={p50:.2f} claim_p95_ms={p95:.2f} "
            f"duplicates={len(taken) - len(set(taken))}")


def quality_time(store, n: int) -> str:  # type: ignore[no-untyped-def]
    from decisionlog.quality import quality
    from decisionlog.tables import review_items, review_verdicts

    rng = np.random.default_rng(0)
    now = time.time()
    items, verdicts = [], []
    for i in range(n):
        audit = i % 5 == 0
        action = "allow" if audit and rng.random() < 0.9 else "review"
        fired = action != "allow"
        violates = rng.random() < (0.7 if fired else 0.02)
        decision = f"q{i}"
        items.append({
            "id": 10_000_000 + i, "decision_id": decision, "reason": "audit" if audit else "review",
            "created_at": now, "decision_created_at": now - 86400 + i * 1e-3,
            "policy_version": "v", "action": action,
            "triggered": "weapons" if fired else "", "sample_probability": 0.01 if audit else 1.0,
            "note": None, "status": "decided", "claimed_by": "ann",
        })
        verdicts.append({
            "item_id": 10_000_000 + i, "decision_id": decision, "reason": items[-1]["reason"],
            "reviewer": "ann", "decided_at": now, "decision_created_at": items[-1][
                "decision_created_at"], "policy_version": "v",
            "violations": "weapons" if violates else "", "action": "block" if violates
            else "allow", "original_action": action, "appeal": None, "note": None,
        })
    with store.engine.begin() as conn:
        for start in range(0, n, 5000):
            conn.execute(review_items.insert(), items[start:start + 5000])
            conn.execute(review_verdicts.insert(), verdicts[start:start + 5000])
    started = time.perf_counter()
    report = quality(store.engine, list(ACTIONS), since=now - 2 * 86400)
    elapsed = time.perf_counter() - started
    assert report.verdicts >= n
    return f"quality_items={n} quality_s={elapsed:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--reviewers", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--quality", type=int, default=100_000)
    parser.add_argument("--postgres", help="a PostgreSQL server URL (a scratch database is made)")
    args = parser.parse_args()

    from decisionlog import DecisionStore

    with tempfile.TemporaryDirectory() as tmp:
        urls = {"sqlite": f"sqlite:///{tmp}/bench.sqlite3"}
        if args.postgres:
            urls["postgresql"] = postgres_database(args.postgres, "bench_reviews")
        for db, url in urls.items():
            store = DecisionStore(url)
            for reviewers in args.reviewers:
                print(f"db={db} " + claim_rate(store, args.items, reviewers), flush=True)
            print(f"db={db} " + quality_time(store, args.quality), flush=True)
            store.close()


if __name__ == "__main__":
    main()
