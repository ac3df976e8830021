"""Frame blocks (``decisionlog/blocks.py``) on SQLite and on PostgreSQL: what ``add_many`` wrote
comes back from ``scan_frames`` byte for byte, each decision once, whatever the window, the
chunk, the merges, the purges, concurrent writers and mergers (threads, processes), and a
merger killed at any moment. ``decision_frames`` (a row per frame) is the reference the
blocks are compared with, and both with the float16 bit patterns the records carried."""

from __future__ import annotations

import multiprocessing
import queue
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from decisionlog import DeadLetters, DecisionRecord, DecisionStore, Recorder, blocks
from decisionlog.blocks import Block
from decisionlog.tables import FrameVector, decision_frames, decisions, frame_blocks
from tests.fakes import FakeEncoder

T0 = 1_790_000_000.0
#: model → dimension: two models, two dimensions (the fake encoder's identity is one)
MODELS = {FakeEncoder.identity: 24, "open_clip/ViT-B-32": 40}
#: sampled frames: stills, and animations (frames 0, 7, 14, …)
FRAME_SETS = ([0], [0], [0], [0, 7, 14], [0, 3], [0, 7, 14, 21, 28])
#: float16 bit patterns a round trip through float32, text or another byte order could
#: change: -0, subnormals (smallest, largest, negative), the largest finite values, the
#: smallest normal
SPECIALS = np.array([0x8000, 0x0001, 0x03FF, 0x8001, 0x7BFF, 0xFBFF, 0x0400], np.uint16)
#: small block sizes, so that a few hundred decisions make several merged blocks
SIZES = (64, 32, 160)  # BLOCK, SMALL, MERGE_DECISIONS


# --- decisions, as the store tests build them ---------------------------------------------


def halves(rng: np.random.Generator, frames: int, dim: int, specials: bool) -> np.ndarray:
    """Vectors of about unit length as float16 (frames, dim); with ``specials``, a third of
    the frames also carry :data:`SPECIALS` somewhere."""
    v = (rng.standard_normal((frames, dim)) / np.sqrt(dim)).astype(np.float16)
    if specials:
        bits = v.view(np.uint16)
        for row in bits:
            if rng.random() < 1 / 3:
                row[rng.choice(dim, len(SPECIALS), replace=False)] = SPECIALS
    return v


def make_records(rng: np.random.Generator, n: int, *, prefix: str, t0: float = T0,
                 span: float = 600.0, models: dict[str, int] | None = None,
                 errors: float = 0.05, bare: float = 0.05,
                 specials: bool = True) -> list[DecisionRecord]:
    """``n`` decisions at random times in [t0, t0 + span) (a tie now and then), of random
    models: stills and animations, ``errors`` of them errors (no frames), ``bare`` decided but
    stored without embeddings. Deterministic in ``rng``'s seed (ids included)."""
    models = models or MODELS
    names = sorted(models)
    out: list[DecisionRecord] = []
    last_at: float | None = None
    for i in range(n):
        model = names[int(rng.integers(len(names)))]
        u = rng.random()
        error, stored = u < errors, u >= errors + bare
        indices = list(FRAME_SETS[int(rng.integers(len(FRAME_SETS)))])
        tie = last_at is not None and rng.random() < 0.05
        created_at = last_at if tie and last_at is not None else round(
            t0 + rng.uniform(0, span), 6)
        last_at = created_at
        action = "error" if error else ("allow", "flag", "review", "block")[
            int(rng.integers(4))]
        triggered = [] if action in ("allow", "error") else ["weapons"]
        out.append(DecisionRecord.model_validate({  # as the store tests' put() builds them
            "id": f"{prefix}{i:05d}-{int(rng.integers(2**32)):08x}", "created_at": created_at,
            "client_id": None if i % 7 == 0 else f"client-{i}",
            "image": {"sha256": "0" * 64, "size": 10},
            "policy": {"name": "hand", "version": "v"},
            "model": model, "profile": ("default", "strict")[i % 2], "action": action,
            "triggered": triggered,
            "categories": {c: {
                "score": 0.3, "similarity": 0.3, "threshold": 0.2, "margin": 0.1,
                "flagged": True, "action": action, "frame": indices[-1],
                "top_terms": [{"text": f"{c} term", "similarity": 0.3}],
            } for c in triggered},
            "latency_ms": 1.0, "error_code": "undecodable" if error else None,
            "frame": None if error else indices[-1],
            "frames_scored": None if error else len(indices),
            "frames": indices if stored else [],
            "embeddings": halves(rng, len(indices), models[model], specials) if stored
            else None,
        }))
    return out


def batches(records: Sequence[DecisionRecord], rng: np.random.Generator, smallest: int,
            largest: int) -> Iterator[list[DecisionRecord]]:
    """``records`` in consecutive batches of random sizes (several models in a batch)."""
    start = 0
    while start < len(records):
        size = int(rng.integers(smallest, largest + 1))
        yield list(records[start:start + size])
        start += size


# --- what is stored -------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """One decision's stored frames: its model, frame indices, float16 bit patterns."""

    model: str
    frames: list[int]
    bits: np.ndarray  # uint16, (frames, dim)


def written(records: Sequence[DecisionRecord]) -> dict[str, Stored]:
    """What ``records`` carried: the decisions with stored frames."""
    return {r.id: Stored(r.model, list(r.frames),
                         np.asarray(r.embeddings, np.float16).view(np.uint16))
            for r in records if r.embeddings is not None and r.frames}


def in_blocks(store: DecisionStore) -> dict[str, Stored]:
    """Every decision of every block, read with ``scan_frames`` model by model; fails when a
    decision is in the blocks more than once, or a block is inconsistent."""
    with store.engine.connect() as conn:
        models = conn.execute(sa.select(frame_blocks.c.model).distinct()).scalars().all()
        in_table = conn.execute(sa.select(sa.func.coalesce(
            sa.func.sum(frame_blocks.c.decisions), 0))).scalar()
    seen: Counter[str] = Counter()
    found: dict[str, Stored] = {}
    for model in models:
        for block in store.scan_frames(model=model):
            check_block(block)
            for i, decision_id in enumerate(block.ids):
                seen[decision_id] += 1
                start, end = block.bounds[i], block.bounds[i + 1]
                found[decision_id] = Stored(model, block.frames[start:end].tolist(),
                                            block.halves[start:end])
    twice = sorted(i for i, n in seen.items() if n > 1)
    assert not twice, f"{len(twice)} decisions are in the blocks more than once: {twice[:5]}"
    assert in_table == len(found)
    return found


def in_rows(store: DecisionStore) -> dict[str, Stored]:
    """Every decision's frames in ``decision_frames`` (their raw float16 bytes)."""
    f, d = decision_frames, decisions
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(f.c.decision_id, d.c.model, f.c.frame,
                      FrameVector.raw(f.c.embedding, store.dialect))
            .select_from(f.join(d, d.c.id == f.c.decision_id))
            .order_by(f.c.decision_id, f.c.frame)).all()
    grouped: dict[str, list[Any]] = {}
    for row in rows:
        grouped.setdefault(row[0], []).append(row)
    postgres = store.dialect == "postgresql"  # halfvec_send: a 4-byte header, big-endian
    found = {}
    for decision_id, mine in grouped.items():
        joined = b"".join(bytes(r[3])[4:] if postgres else bytes(r[3]) for r in mine)
        bits = np.frombuffer(joined, ">u2" if postgres else "<u2").astype(np.uint16)
        found[decision_id] = Stored(mine[0][1], [int(r[2]) for r in mine],
                                    bits.reshape(len(mine), -1))
    return found


def check_block(block: Block) -> None:
    """A block's arrays agree with each other."""
    n = len(block)
    assert n > 0
    assert len(block.created_at) == len(block.client_ids) == len(block.profiles) == n
    assert len(block.actions) == len(block.frame_counts) == n
    assert np.all(block.frame_counts >= 1)
    assert int(block.frame_counts.sum()) == len(block.frames) == block.halves.shape[0]
    assert block.halves.dtype == np.uint16


def assert_same(got: dict[str, Stored], want: dict[str, Stored], what: str) -> None:
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    assert not missing and not extra, (
        f"{what}: {len(missing)} decisions missing ({missing[:3]}), "
        f"{len(extra)} not expected ({extra[:3]})")
    for decision_id, w in want.items():
        g = got[decision_id]
        assert g.model == w.model and g.frames == w.frames, (what, decision_id, g, w)
        assert g.bits.shape == w.bits.shape and g.bits.tobytes() == w.bits.tobytes(), (
            f"{what}: decision {decision_id}'s vectors differ")


def assert_intact(store: DecisionStore, want: dict[str, Stored]) -> None:
    """The blocks hold exactly ``want``, and so does ``decision_frames``."""
    assert_same(in_blocks(store), want, "frame_blocks")
    assert_same(in_rows(store), want, "decision_frames")


def block_sizes(store: DecisionStore) -> list[tuple[str, int, float, float]]:
    b = frame_blocks.c
    with store.engine.connect() as conn:
        return [(str(m), int(n), float(f), float(la)) for m, n, f, la in conn.execute(
            sa.select(b.model, b.decisions, b.first_at, b.last_at).order_by(b.id))]


def assert_compacted(store: DecisionStore) -> None:
    """No model has two small blocks left, and each block is in time order."""
    small = Counter(m for m, n, _, _ in block_sizes(store) if n < blocks.SMALL)
    assert all(n <= 1 for n in small.values()), small
    for model in {m for m, _, _, _ in block_sizes(store)}:
        for block in store.scan_frames(model=model, chunk=10**9):
            order = np.lexsort((np.array(block.ids), block.created_at))
            assert np.array_equal(order, np.arange(len(block)))


@pytest.fixture
def small_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of :data:`SIZES` (the module reads them at each call)."""
    for name, value in zip(("BLOCK", "SMALL", "MERGE_DECISIONS"), SIZES, strict=True):
        monkeypatch.setattr(blocks, name, value)


# --- 1. round trip, windows, chunks, purge --------------------------------------------


def check_windows(store: DecisionStore, records: Sequence[DecisionRecord],
                  rng: np.random.Generator) -> None:
    """Windows [since, until) at decisions' exact times (ties included), between them, inside
    a block and across blocks, empty or outside everything: each gives exactly the decisions
    of its model made in it, once, with their bytes and their logged fields."""
    want = written(records)
    by_id = {r.id: r for r in records}
    times = sorted({r.created_at for r in records if r.id in want})
    windows: list[tuple[float | None, float | None]] = [
        (None, None), (times[0], None), (None, times[-1]), (None, times[0]),
        (times[-1], times[-1]), (T0 - 100, T0 - 50), (times[-1] + 1, None),
    ]
    for _ in range(12):
        a, b = sorted(rng.choice(len(times), 2, replace=False))
        windows.append((times[a], times[b]))
        windows.append((times[a] + 1e-4, times[b] - 1e-4))
    for since, until in windows:
        for model in MODELS:
            chosen = {i for i, s in want.items() if s.model == model
                      and (since is None or by_id[i].created_at >= since)
                      and (until is None or by_id[i].created_at < until)}
            seen: Counter[str] = Counter()
            got = {}
            for block in store.scan_frames(model=model, since=since, until=until):
                check_block(block)
                for i, decision_id in enumerate(block.ids):
                    seen[decision_id] += 1
                    r = by_id[decision_id]
                    assert (block.created_at[i], block.client_ids[i], block.profiles[i],
                            block.actions[i]) == (r.created_at, r.client_id, r.profile,
                                                  r.action)
                    start, end = block.bounds[i], block.bounds[i + 1]
                    got[decision_id] = Stored(model, block.frames[start:end].tolist(),
                                              block.halves[start:end])
            assert max(seen.values(), default=1) == 1, (since, until)
            assert_same(got, {i: want[i] for i in chosen}, f"window [{since}, {until})")


def test_what_add_many_wrote_comes_back_byte_identical(url: str, small_sizes: None) -> None:
    """Written in small batches (a block per model each), then merged, then purged at a time
    inside a merged block: the blocks always hold exactly what the records carried, as
    ``decision_frames`` does, and every window and chunk size reads it right."""
    store = DecisionStore(url)
    rng = np.random.default_rng(1)
    records = make_records(rng, 420, prefix="r")
    written_blocks = 0
    for batch in batches(records, rng, 1, 12):
        store.add_many(batch)
        written_blocks += len({r.model for r in batch if r.embeddings is not None})
    want = written(records)
    assert {s.model for s in want.values()} == set(MODELS)
    assert sum(len(s.frames) > 1 for s in want.values()) > 50  # animations
    assert len(block_sizes(store)) == written_blocks  # one small block per model and commit
    assert_intact(store, want)
    check_windows(store, records, rng)

    assert store.compact() > 0
    sizes = block_sizes(store)
    assert sum(n == blocks.BLOCK for _, n, _, _ in sizes) >= 4  # several merged blocks
    assert_compacted(store)
    assert_intact(store, want)
    check_windows(store, records, rng)

    # chunks: a block is cut into parts of at most `chunk` decisions, frames kept together
    for chunk in (1, 5, 64, 1000):
        for model in MODELS:
            parts = list(store.scan_frames(model=model, chunk=chunk))
            assert all(0 < len(p) <= chunk for p in parts)
            got = {}
            for p in parts:
                check_block(p)
                for i, decision_id in enumerate(p.ids):
                    got[decision_id] = Stored(model, p.frames[p.bounds[i]:p.bounds[i + 1]]
                                              .tolist(), p.halves[p.bounds[i]:p.bounds[i + 1]])
            assert_same(got, {i: s for i, s in want.items() if s.model == model},
                         f"chunk {chunk}")
    # a window inside one merged block, read in chunks
    model, n, first_at, last_at = next(s for s in sizes if s[1] == blocks.BLOCK)
    inside = [r for r in records if r.id in want and want[r.id].model == model
              and first_at < r.created_at < last_at]
    since, until = inside[5].created_at, inside[-5].created_at
    got_ids = [i for p in store.scan_frames(model=model, since=since, until=until, chunk=3)
               for i in p.ids]
    assert sorted(got_ids) == sorted(
        r.id for r in records if r.id in want and want[r.id].model == model
        and since <= r.created_at < until)

    # purge at a decision's exact time inside a merged block: it stays, the older ones go
    straddled = [s for s in sizes if s[2] < since <= s[3]]
    assert straddled, "the cut-off must fall inside a block"
    cutoff = since
    assert store.purge(cutoff) == sum(r.created_at < cutoff for r in records)
    kept = {r.id for r in records if r.created_at >= cutoff}
    want = {i: s for i, s in want.items() if i in kept}
    assert want and store.count() == len(kept)
    assert_intact(store, want)
    assert all(first >= cutoff for _, _, first, _ in block_sizes(store))
    check_windows(store, [r for r in records if r.id in kept], rng)
    # and what is written after a purge merges with what it kept
    later = make_records(rng, 120, prefix="later", t0=T0 + 300)
    for batch in batches(later, rng, 1, 8):
        store.add_many(batch)
    store.compact()
    assert_compacted(store)
    assert_intact(store, want | written(later))


def test_blocks_of_the_real_size(url: str) -> None:
    """With the real sizes: 5000 decisions of one model written in a few commits merge into
    blocks of BLOCK decisions and one remainder, read back in chunks."""
    store = DecisionStore(url)
    rng = np.random.default_rng(5)
    model = {"m": 8}
    records = make_records(rng, 5000, prefix="big", models=model, errors=0, bare=0)
    for batch in batches(records, rng, 300, 700):
        store.add_many(batch)
    store.compact()
    assert sorted(n for _, n, _, _ in block_sizes(store)) == [5000 - blocks.BLOCK, blocks.BLOCK]
    assert_intact(store, written(records))
    assert sum(len(b) for b in store.scan_frames(model="m", chunk=1000)) == 5000


# --- 2. concurrent writers and mergers ------------------------------------------------


def test_threads_writing_while_others_merge_and_scan(url: str, small_sizes: None,
                                                    tmp_path: Path) -> None:
    """Three threads call add_many in small batches and a fourth writes through a Recorder
    (which merges when idle: merge_due), times out of order between them, while one thread
    merges and compacts, another runs merge_due, and another scans. Each add_many writer waits
    half-way for a merge to have happened, so merges and writes interleave. Every scan sees
    each decision once, with its bytes, and at least every decision committed before it
    began; at the end nothing is lost or doubled."""
    store = DecisionStore(url)
    per_writer = [make_records(np.random.default_rng(10 + w), 150, prefix=f"t{w}-")
                  for w in range(4)]
    want = written([r for rs in per_writer for r in rs])
    committed: set[str] = set()
    committed_lock = threading.Lock()
    merged_once = threading.Event()
    writers_done = threading.Event()
    turns = Counter[str]()
    dead = DeadLetters(tmp_path / "dead.jsonl")
    recorder = Recorder(store, dead, batch=4, timeout=120, merge_every=0.001)

    def write(w: int) -> None:
        rng = np.random.default_rng(20 + w)
        parts = list(batches(per_writer[w], rng, 1, 6))
        for i, batch in enumerate(parts):
            if w < 3:
                if i == len(parts) // 2:
                    assert merged_once.wait(60), "no merge happened"
                store.add_many(batch)
            else:
                recorder.record(batch)
            with committed_lock:
                committed.update(r.id for r in batch if r.id in want)

    def merge() -> None:
        while not writers_done.is_set():
            turns["merge"] += 1
            moved = (store.compact() if turns["merge"] % 4 == 0
                     else blocks.merge_small(store.engine))
            if moved:
                turns["merged"] += 1
                merged_once.set()
            else:
                writers_done.wait(0.002)  # nothing to merge yet: let writers write

    def merge_due() -> None:
        while not writers_done.is_set():
            if not blocks.merge_due(store.engine, at=2):
                writers_done.wait(0.002)

    def scan() -> None:
        while not writers_done.is_set():
            with committed_lock:
                before = set(committed)
            seen: Counter[str] = Counter()
            for model in MODELS:
                for block in store.scan_frames(model=model, chunk=50):
                    check_block(block)
                    for i, decision_id in enumerate(block.ids):
                        seen[decision_id] += 1
                        w = want[decision_id]
                        assert w.model == model and w.frames == block.frames[
                            block.bounds[i]:block.bounds[i + 1]].tolist()
                        assert np.array_equal(
                            w.bits, block.halves[block.bounds[i]:block.bounds[i + 1]])
            assert max(seen.values(), default=1) == 1, "a scan saw a decision twice"
            assert before <= seen.keys(), f"a scan missed {len(before - seen.keys())}"
            turns["scans"] += 1

    try:
        with ThreadPoolExecutor(7) as pool:
            others = [pool.submit(merge), pool.submit(merge_due), pool.submit(scan)]
            writers = [pool.submit(write, w) for w in range(4)]
            try:
                for f in writers:
                    f.result(timeout=120)
            finally:
                writers_done.set()
            for f in others:
                f.result(timeout=60)
    finally:
        recorder.close()
    assert not dead.path.exists()
    assert turns["merged"] >= 2 and turns["scans"] >= 1
    store.compact()
    assert_compacted(store)
    assert_intact(store, want)


def _process_writer(url: str, worker: int, n: int, sizes: tuple[int, int, int],
                    dead_letters: str, start: Any, results: Any) -> None:
    """A worker process: two request threads write its decisions in small batches through
    its Recorder (which merges when idle), while its main thread merges (merge_due and
    merge_small, waiting or not); the other process does the same."""
    blocks.BLOCK, blocks.SMALL, blocks.MERGE_DECISIONS = sizes
    store = DecisionStore(url)
    recorder = Recorder(store, DeadLetters(Path(dead_letters)), batch=4, timeout=120,
                        merge_every=0.001)
    records = make_records(np.random.default_rng(100 + worker), n, prefix=f"p{worker}-")
    rng = np.random.default_rng(200 + worker)
    parts = list(batches(records, rng, 1, 6))

    def requests(share: list[list[DecisionRecord]]) -> None:
        for batch in share:
            recorder.record(batch)

    threads = [threading.Thread(target=requests, args=(parts[k::2],)) for k in range(2)]
    start.wait(60)
    for t in threads:
        t.start()
    moved, turn = 0, 0
    while any(t.is_alive() for t in threads):
        turn += 1
        now = (blocks.merge_due(store.engine, at=2) if turn % 2
               else blocks.merge_small(store.engine, wait=turn % 4 == 0))
        moved += now
        if not now:
            threads[turn % 2].join(0.002)  # nothing to merge yet: let the requests write
    for t in threads:
        t.join()
    recorder.close()
    results.put((worker, moved))


def test_processes_writing_and_merging_at_once(url: str, tmp_path: Path) -> None:
    """Two processes (spawned), each writing through its Recorder and each merging at the same
    time: every decision once, with its bytes, none set aside."""
    DecisionStore(url)  # schema first
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_process_writer, args=(
        url, w, 250, SIZES, str(tmp_path / f"dead-{w}.jsonl"), start, results))
        for w in range(2)]
    for p in workers:
        p.start()
    start.set()
    moved: dict[int, int] = {}
    deadline = time.monotonic() + 120
    while len(moved) < len(workers):
        try:
            worker, n = results.get(timeout=0.5)
            moved[worker] = n
        except queue.Empty:
            failed = [p.exitcode for p in workers if p.exitcode not in (None, 0)]
            assert not failed and time.monotonic() < deadline, f"a writer failed: {failed}"
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    assert sum(moved.values()) > 0  # their own merges moved decisions while both wrote
    assert not list(tmp_path.glob("dead-*"))
    store = DecisionStore(url)
    store.compact()
    assert_compacted(store)
    assert_intact(store, written([
        r for w in range(2)
        for r in make_records(np.random.default_rng(100 + w), 250, prefix=f"p{w}-")]))


# --- 3. a merger killed at any moment ------------------------------------------------

#: The merger a test kills: merges at the sizes given until nothing is left, saying when each
#: merge begins and ends. With a stop point, it says so and waits to be killed when its
#: ``nth`` merge reaches that point: after the merged blocks are inserted (the old ones still
#: there), after the old ones are deleted, or just before the commit.
MERGER = r"""
import sys, threading
import sqlalchemy as sa
from decisionlog import blocks
from decisionlog.database import connect

url, stop, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
blocks.BLOCK, blocks.SMALL, blocks.MERGE_DECISIONS = map(int, sys.argv[4:7])
engine = connect(url)
statements = {"insert": "INSERT INTO frame_blocks", "delete": "DELETE FROM frame_blocks"}
merge = 0

def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

def stopped():
    if merge == nth:
        say("stopped " + stop)
        threading.Event().wait()  # until killed

@sa.event.listens_for(engine, "after_cursor_execute")
def after(conn, cursor, statement, parameters, context, executemany):
    if stop in statements and statement.startswith(statements[stop]):
        stopped()

@sa.event.listens_for(engine, "commit")
def commit(conn):
    if stop == "commit":
        stopped()

while True:
    say(f"begin {merge}")
    moved = blocks.merge_small(engine)
    say(f"end {merge}")
    if not moved:
        break
    merge += 1
say("done")
threading.Event().wait()
"""


def fragment(store: DecisionStore, rng: np.random.Generator, largest: int) -> int:
    """Rewrite every block as small blocks of 1..``largest`` decisions in random order (as
    writers in several processes leave them), in one transaction; returns how many."""
    rows = []
    with store.engine.begin() as conn:
        stored = conn.execute(sa.select(frame_blocks)).all()
        for model in {r.model for r in stored}:
            block = Block.concat([Block.of_row(r) for r in stored if r.model == model])
            block = block.take(rng.permutation(len(block)))
            start = 0
            while start < len(block):
                end = start + int(rng.integers(1, largest + 1))
                rows.append(block.take(np.arange(start, min(end, len(block)))).row(model))
                start = end
        conn.execute(frame_blocks.delete())
        conn.execute(frame_blocks.insert(), rows)
    return len(rows)


def test_a_merger_killed_at_any_moment_loses_nothing(url: str) -> None:
    """Thousands of decisions in small blocks; a merger process (merging at small sizes, so
    that a round is a dozen merges) is killed with SIGKILL: at points chosen inside a
    merge's transaction, and at random moments (after a random number of merges, a random
    part of a merge's duration later), until two of those have landed inside a merge.
    After each kill the log is sound and every decision is there once with its bytes; a
    final compact works."""
    store = DecisionStore(url)
    rng = np.random.default_rng(3)
    records = make_records(rng, 3000, prefix="k")
    for batch in batches(records, rng, 100, 300):
        store.add_many(batch)
    want = written(records)
    assert_intact(store, want)  # merges never touch decision_frames: checked here and last
    chooser = random.Random(3)
    stops = ["insert", "delete", "commit"]
    chooser.shuffle(stops)
    stops += ["random"] * 8
    inside = Counter[str]()
    for stop in stops:
        if stop == "random" and inside["random"] == 2:
            break
        if sum(n < 48 for _, n, _, _ in block_sizes(store)) < 500:
            fragment(store, rng, largest=4)
        nth = chooser.randrange(4)
        merger = subprocess.Popen(
            [sys.executable, "-c", MERGER, url, stop, str(nth), "96", "48", "240"],
            stdout=subprocess.PIPE, text=True)
        try:
            assert merger.stdout is not None
            if stop == "random":
                began = []
                while (line := merger.stdout.readline()) != f"begin {nth}\n":
                    assert line and line != "done\n", "too few merges to kill one"
                    if line.startswith("begin"):
                        began.append(time.monotonic())
                began.append(time.monotonic())
                took = (began[-1] - began[0]) / (len(began) - 1) if nth else 0.05
                time.sleep(chooser.uniform(0, 1.5 * took))  # a random part of a merge
            else:
                while (line := merger.stdout.readline()) != f"stopped {stop}\n":
                    assert line and line != "done\n", f"never stopped at {stop}"
        finally:
            merger.kill()
            rest = merger.communicate(timeout=30)[0].splitlines()
        if stop != "random" or (rest and rest[-1].startswith("begin")):
            inside[stop] += 1
        store.close()  # the log opened anew, as a restarted worker opens it
        if store.dialect == "sqlite":
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalars().all() == ["ok"]
        assert_same(in_blocks(store), want, f"frame_blocks, killed at {stop}")
    assert inside == {"insert": 1, "delete": 1, "commit": 1, "random": 2}, inside
    assert store.compact() > 0
    assert_compacted(store)
    assert_intact(store, want)
