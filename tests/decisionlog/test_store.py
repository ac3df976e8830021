"""The decision store on SQLite and, when MODERATION_TEST_POSTGRES_URL is set (.ci/run starts a
real server), on PostgreSQL: the same tests for both."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from decisionlog import (
    DeadLetters,
    DecisionFilters,
    DecisionRecord,
    DecisionStore,
    Recorder,
    replay_dead_letters,
)


def record(t: float, action: str = "allow", triggered: tuple[str, ...] = (),
           version: str = "v1", client: str | None = None,
           frames: tuple[int, ...] = (0,)) -> DecisionRecord:
    categories = {
        c: {"score": 0.3, "similarity": 0.31, "threshold": 0.28, "margin": 0.02,
            "flagged": c in triggered, "action": action if c in triggered else "allow",
            "top_terms": [{"text": f"{c} term", "similarity": 0.31}], "frame": frames[-1]}
        for c in ("weapons", "drugs")
    }
    return DecisionRecord(
        id=uuid.uuid4().hex, created_at=t, client_id=client,
        image={"sha256": "ab" * 32, "size": 1234}, policy={"name": "p", "version": version},
        model="m", profile="default", action=action,
        triggered=list(triggered), categories=categories, latency_ms=12.5,
        frame=frames[-1], frames_scored=len(frames), frames=list(frames),
        embeddings=np.arange(4 * len(frames), dtype=np.float16).reshape(len(frames), 4),
    )


T0 = 1_790_000_000.0  # a fixed hour boundary region, so buckets are predictable


def test_round_trip_and_embedding(url: str) -> None:
    store = DecisionStore(url)
    r = record(T0, "block", ("weapons",), client="upload-1")
    store.add_many([r])
    stored = store.get(r.id)
    assert stored is not None and stored == r.model_copy(update={"embeddings": None})
    got = stored.view()
    assert got["action"] == "block" and got["flagged"] and got["triggered"] == ["weapons"]
    assert got["policy"] == {"name": "p", "version": "v1"} and got["client_id"] == "upload-1"
    assert got["categories"]["weapons"]["top_terms"][0]["text"] == "weapons term"
    assert got["image"] == {"sha256": "ab" * 32, "size": 1234}
    assert "embeddings" not in got and got["frames"] == [0]
    np.testing.assert_array_equal(store.embedding(r.id), [0, 1, 2, 3])
    assert store.get("missing") is None


def test_every_sampled_frame_is_stored(url: str) -> None:
    """An animation: each sampled frame's float16 embedding (a halfvec on PostgreSQL),
    in frame order; the decided frame's is the one ``embedding`` gives."""
    store = DecisionStore(url)
    r = record(T0, "block", ("weapons",), frames=(0, 3, 7))
    assert r.embeddings is not None
    store.add_many([r])
    got = store.get(r.id)
    assert got is not None and got.frames == [0, 3, 7] and got.frame == 7
    frames, vectors = store.frame_embeddings(r.id)  # type: ignore[misc]
    assert frames == [0, 3, 7] and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, r.embeddings.astype(np.float32))
    np.testing.assert_array_equal(store.embedding(r.id), r.embeddings[2])
    if store.dialect == "postgresql":
        with store.engine.connect() as conn:
            kind = conn.exec_driver_sql(
                "SELECT pg_typeof(embedding)::text FROM decision_frames LIMIT 1").scalar()
        assert kind == "halfvec"
    assert store.purge(older_than=T0 + 1) == 1 and store.frame_embeddings(r.id) is None


def test_filters_and_cursor_pagination(url: str) -> None:
    store = DecisionStore(url)
    records = [record(T0 + i, "block" if i % 3 == 0 else "allow",
                      ("weapons",) if i % 3 == 0 else (), "v1" if i < 10 else "v2",
                      client=f"c{i % 2}") for i in range(20)]
    store.add_many(records)
    seen, cursor = [], None
    while True:
        page, cursor = store.query(limit=7, cursor=cursor)
        seen += [d.id for d in page]
        if cursor is None:
            break
    assert seen == [r.id for r in sorted(records, key=lambda r: -r.created_at)]
    assert len(store.query(DecisionFilters(action="block"), limit=100)[0]) == 7
    assert len(store.query(DecisionFilters(category="weapons"), limit=100)[0]) == 7
    assert len(store.query(DecisionFilters(category="drugs"), limit=100)[0]) == 0
    assert len(store.query(DecisionFilters(policy_version="v2"), limit=100)[0]) == 10
    assert len(store.query(DecisionFilters(client_id="c1"), limit=100)[0]) == 10
    assert len(store.query(DecisionFilters(since=T0 + 5, until=T0 + 8), limit=100)[0]) == 3
    assert len(store.query(DecisionFilters(flagged=True), limit=100)[0]) == 7
    with pytest.raises(ValueError, match="invalid cursor"):
        store.query(cursor="garbage!")


def test_stats_per_bucket_and_version(url: str) -> None:
    store = DecisionStore(url)
    hour = 3600 * (int(T0) // 3600)
    store.add_many([
        record(hour + 1, "block", ("weapons",), "v1"),
        record(hour + 2, "allow", (), "v1"),
        record(hour + 3, "review", ("weapons", "drugs"), "v1"),
        record(hour + 3601, "allow", (), "v2"),
        record(hour + 3602, "flag", ("drugs",), "v2"),
    ])
    buckets = store.stats(since=hour, bucket="hour")
    assert [(b["start"], b["policy_version"], b["total"]) for b in buckets] == [
        (hour, "v1", 3), (hour + 3600, "v2", 2)]
    assert buckets[0]["actions"] == {"block": 1, "allow": 1, "review": 1}
    assert buckets[0]["categories"]["weapons"] == {"flagged": 2, "rate": pytest.approx(2 / 3)}
    assert buckets[1]["categories"] == {"drugs": {"flagged": 1, "rate": 0.5}}
    day = store.stats(since=hour, bucket="day")
    assert sum(b["total"] for b in day) == 5
    assert store.stats(policy_version="v2")[0]["total"] == 2


def test_purge_and_export(url: str) -> None:
    store = DecisionStore(url)
    store.add_many([record(T0 + i, "block", ("weapons",)) for i in range(5)])
    exported = list(store.export(since=T0 + 1))
    assert [d.created_at for d in exported] == [T0 + 1, T0 + 2, T0 + 3, T0 + 4]
    assert store.purge(older_than=T0 + 3) == 3
    assert store.count() == 2
    assert store.query(DecisionFilters(category="weapons"), limit=10)[0][0].created_at == T0 + 4


def test_recorder_returns_once_the_records_are_committed(url: str, tmp_path: Path) -> None:
    store = DecisionStore(url)
    recorder = Recorder(store, DeadLetters(tmp_path / "dead.jsonl"), batch=8)
    recorder.record([record(T0 + i) for i in range(50)])
    # no flush: another connection (another process, after a SIGKILL) already sees them all
    assert DecisionStore(url).count() == 50
    recorder.close()
    assert not (tmp_path / "dead.jsonl").exists()


def test_concurrent_requests_share_commits(url: str, tmp_path: Path) -> None:
    store = DecisionStore(url)
    transactions: list[int] = []
    add_many = store.add_many

    def counting(records: Any) -> None:
        transactions.append(len(records))
        add_many(records)

    store.add_many = counting  # type: ignore[method-assign]
    recorder = Recorder(store, DeadLetters(tmp_path / "dead.jsonl"))

    def requests() -> None:
        for _ in range(20):
            recorder.record([record(T0)])

    threads = [threading.Thread(target=requests) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(transactions) == 160 and store.count() == 160
    assert len(transactions) < 160  # waiting requests were written together
    recorder.close()


def test_a_record_that_cannot_be_written_is_set_aside_not_retried_forever(
    url: str, tmp_path: Path
) -> None:
    """A lone surrogate cannot be encoded by any database driver. Before: the recorder
    retried that batch forever and its worker never logged another decision."""
    store = DecisionStore(url)
    dead = DeadLetters(tmp_path / "dead.jsonl")
    recorder = Recorder(store, dead)
    poison = record(T0, client="x\ud800y")
    good = [record(T0 + i, client=f"c{i}") for i in range(1, 21)]
    threads = [threading.Thread(target=recorder.record, args=([r],)) for r in [poison, *good]]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorder.record([record(T0 + 30, client="after")])
    assert time.monotonic() - started < 5
    assert store.count() == 21  # every good record, before and after, is in the log
    assert store.get(poison.id) is None
    [(kept, reason)] = dead.read()
    assert kept == poison and "UnicodeEncodeError" in reason
    started = time.monotonic()
    recorder.close()
    assert time.monotonic() - started < 2  # before: 32 s, and its queue dropped


def test_a_stuck_database_does_not_hold_requests_or_lose_records(
    url: str, tmp_path: Path
) -> None:
    store = DecisionStore(url)
    release = threading.Event()
    add_many = store.add_many

    def stuck(records: Any) -> None:
        release.wait()
        add_many(records)

    store.add_many = stuck  # type: ignore[method-assign]
    dead = DeadLetters(tmp_path / "dead.jsonl")
    recorder = Recorder(store, dead, timeout=0.5)
    late = record(T0, client="late")
    started = time.monotonic()
    recorder.record([late])
    assert 0.4 < time.monotonic() - started < 3
    [(kept, reason)] = dead.read()
    assert kept == late and reason == "not written within 0.5 s"
    release.set()  # the stuck write goes through after all: replaying skips it
    recorder.flush()
    store.add_many = add_many  # type: ignore[method-assign]
    assert replay_dead_letters(store, dead) == (0, 1, 0)
    assert store.count() == 1 and not dead.path.exists()
    recorder.close()


def test_replay_writes_set_aside_records_and_keeps_the_unwritable(
    url: str, tmp_path: Path
) -> None:
    store = DecisionStore(url)
    dead = DeadLetters(tmp_path / "dead.jsonl")
    fine, poison = record(T0, client="fine"), record(T0 + 1, client="x\udfffy")
    dead.add([fine, poison], "the database was down")
    assert replay_dead_letters(store, dead) == (1, 0, 1)
    assert store.get(fine.id) is not None and store.embedding(fine.id) is not None
    [(kept, reason)] = dead.read()
    assert kept == poison and "(first: the database was down)" in reason


def _writer(url: str, worker: int, n: int) -> None:
    store = DecisionStore(url)
    for start in range(0, n, 10):
        store.add_many([record(T0 + worker * 10_000 + start + i, client=f"w{worker}")
                        for i in range(10)])


def test_concurrent_writers_from_several_processes(url: str) -> None:
    DecisionStore(url)  # schema first
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(url, w, 200)) for w in range(4)]
    started = time.monotonic()
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    assert time.monotonic() - started < 120
    store = DecisionStore(url)
    assert store.count() == 800
    ids = [d.id for d in store.export()]
    assert len(ids) == len(set(ids)) == 800
    for w in range(4):
        assert len(store.query(DecisionFilters(client_id=f"w{w}"), limit=500)[0]) == 200


def test_unsupported_url() -> None:
    with pytest.raises(ValueError, match="unsupported database URL 'mysql://x'"):
        DecisionStore("mysql://x")


def test_parse_time_forms() -> None:
    from decisionlog import parse_time

    assert parse_time("1790000000") == 1_790_000_000.0
    assert parse_time("2026-11-23T10:00:00Z") == parse_time("2026-11-23T10:00:00")
    assert parse_time("2026-11-23T11:00:00+01:00") == parse_time("2026-11-23T10:00:00Z")
    assert parse_time("36h", now=100_000.0) == 100_000.0 - 36 * 3600
    assert parse_time("7d", now=1e6) == 1e6 - 7 * 86400
    with pytest.raises(ValueError, match="'soon' is not a time"):
        parse_time("soon")


def test_export_and_purge_cli(tmp_path: Path) -> None:
    import csv
    import io
    import json

    from click.testing import CliRunner

    from moderation.cli import main

    url = f"sqlite:///{tmp_path / 'd.sqlite3'}"
    now = time.time()
    store = DecisionStore(url)
    store.add_many([record(now - 10 * 86400, "block", ("weapons",), client="old"),
                    record(now - 3600, "allow", client="new")])
    runner = CliRunner()
    out = runner.invoke(main, ["decisions", "export", "--database-url", url])
    assert out.exit_code == 0, out.output
    assert [json.loads(line)["client_id"] for line in out.stdout.splitlines()] == ["old", "new"]
    out = runner.invoke(main, ["decisions", "export", "--database-url", url, "--since", "2d",
                               "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["client_id"] for r in rows] == ["new"] and rows[0]["action"] == "allow"
    assert json.loads(rows[0]["categories"])["weapons"]["score"] == 0.3
    out = runner.invoke(main, ["decisions", "export", "--database-url", url, "--since", "x"])
    assert out.exit_code == 2 and "'x' is not a time" in out.output
    out = runner.invoke(main, ["decisions", "purge", "--database-url", url,
                               "--older-than-days", "7"])
    assert out.exit_code == 0 and "purged 1 decisions older than 7 days" in out.stdout
    assert store.count() == 1
    out = runner.invoke(main, ["decisions", "export", "--database-url", "mysql://x"])
    assert out.exit_code == 1 and "unsupported database URL" in out.output
