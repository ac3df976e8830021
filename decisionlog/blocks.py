"""Frame vectors stored for scans: blocks of decisions (``frame_blocks``).

Every frame's vector is also kept one row per frame (``decision_frames``: a decision's frames
in one indexed lookup, and pgvector's HNSW index on PostgreSQL, which needs a row per vector).
Reading a window that way costs one index lookup per frame, ~6 µs each: 6 s a million. So the
same vectors are kept a second time, for scans: a block holds the decisions of one model, each
decision's frames contiguous, the vectors as one little-endian float16 array (bytes on SQLite,
``bytea`` on PostgreSQL: the same bytes on both), with the ids, times, client ids, profiles and
actions a scan needs. A window is then a handful of sequential reads of a few megabytes, each
decoded with one numpy call.

* **Written with the decisions.** :meth:`DecisionStore.add_many` writes one small block per
  model in the transaction that writes the decisions: a decision's frames are committed before
  its answer, as before.
* **Merged in the background.** :func:`merge_small` takes small blocks (fewer than
  :data:`SMALL` decisions), oldest first, and rewrites them as blocks of :data:`BLOCK`
  decisions in time order, in one transaction: it deletes exactly the blocks it read, so a
  block written meanwhile is left for the next merge, and a merge killed half-way leaves the
  old blocks as they were. Mergers exclude each other (SQLite's write lock; a transaction
  advisory lock on PostgreSQL, also taken by :func:`purge`), and writers never wait on one for
  longer than a transaction of :data:`MERGE_DECISIONS` decisions.
* **Scanned a block at a time** (:func:`scan`), the rows of a block outside the window masked
  out: memory stays flat in the window's size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .tables import frame_blocks

if TYPE_CHECKING:
    from .records import DecisionRecord

log = logging.getLogger(__name__)

__all__ = [
    "BLOCK",
    "MERGE_AT",
    "SMALL",
    "Block",
    "compact",
    "merge_due",
    "merge_small",
    "purge",
    "scan",
    "small_blocks",
]

#: Decisions in a merged block (~4 MB of 512-dimension vectors).
BLOCK = 4096
#: A block with fewer decisions is merged with others.
SMALL = BLOCK // 2
#: Decisions one merge transaction reads at most (it holds SQLite's write lock meanwhile).
MERGE_DECISIONS = 2 * BLOCK
#: Small blocks of a model before the background merger merges them.
MERGE_AT = 32
#: PostgreSQL: the transaction advisory lock that merges and purges take.
_MERGE_LOCK = 0x626C6B73  # "blks"


class _Meta:
    """A stored block's ``meta`` JSON, decoded on first use: a search reads the ids of the
    few blocks that hold a candidate only."""

    __slots__ = ("_decoded", "_text")

    def __init__(self, text: str) -> None:
        self._text = text
        self._decoded: dict[str, list[Any]] | None = None

    def get(self, key: str) -> list[Any]:
        if self._decoded is None:
            self._decoded = json.loads(self._text)
        return self._decoded[key]


class _Column(Sequence[Any]):
    """One list of a block's :class:`_Meta`, as a sequence of known length."""

    __slots__ = ("_key", "_meta", "_n")

    def __init__(self, meta: _Meta, key: str, n: int) -> None:
        self._meta, self._key, self._n = meta, key, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        return self._meta.get(self._key)[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._meta.get(self._key))


@dataclass(frozen=True)
class Block:
    """Stored decisions of one model with their frames' vectors, in the order they are kept.

    ``ids``, ``client_ids``, ``profiles``, ``actions`` (as logged): one entry per decision;
    ``created_at``: ndarray of shape (n,), unix seconds; ``frame_counts``: ndarray of shape
    (n,), each decision's frames (at least 1); ``frames``: ndarray of shape (n_frames,), each
    frame's index in its file; ``halves``: ndarray of shape (n_frames, dim), the float16
    vectors as their uint16 bit patterns (:func:`moderation.scoring.float16_dot` multiplies
    them without a conversion), each decision's frames contiguous and in file order.
    ``vectors``: the same as float32.
    """

    ids: Sequence[str]
    created_at: np.ndarray
    client_ids: Sequence[str | None]
    profiles: Sequence[str]
    actions: Sequence[str]
    frame_counts: np.ndarray
    frames: np.ndarray
    halves: np.ndarray

    def __len__(self) -> int:
        return len(self.created_at)

    @property
    def dim(self) -> int:
        return int(self.halves.shape[1])

    @cached_property
    def vectors(self) -> np.ndarray:
        return self.halves.view(np.float16).astype(np.float32)

    @cached_property
    def bounds(self) -> np.ndarray:
        """Where each decision's frames begin (and, last, where the last one's end)."""
        return np.concatenate([[0], np.cumsum(self.frame_counts)]).astype(np.int64)

    def frames_of(self, i: int) -> tuple[list[int], np.ndarray]:
        """Decision ``i``'s frame indices and float32 vectors."""
        start, end = self.bounds[i], self.bounds[i + 1]
        return self.frames[start:end].tolist(), self.vectors[start:end]

    # --- building -------------------------------------------------------------------------

    @classmethod
    def of_records(cls, records: Sequence[DecisionRecord]) -> dict[str, Block]:
        """The records that carry embeddings, one block per model, in time order (as a
        merged block is: a small block no merge ever rewrites is in order too)."""
        mine: dict[str, list[DecisionRecord]] = {}
        for r in records:
            if r.embeddings is not None and len(r.frames):
                mine.setdefault(r.model, []).append(r)
        blocks = {}
        for model, rs in mine.items():
            rs.sort(key=lambda r: (r.created_at, r.id))
            blocks[model] = cls(
                ids=[r.id for r in rs],
                created_at=np.array([r.created_at for r in rs], np.float64),
                client_ids=[r.client_id for r in rs],
                profiles=[r.profile for r in rs],
                actions=[r.action for r in rs],
                frame_counts=np.array([len(r.frames) for r in rs], np.int32),
                frames=np.array([f for r in rs for f in r.frames], np.int32),
                halves=np.concatenate([np.asarray(r.embeddings, np.float16).reshape(
                    len(r.frames), -1) for r in rs]).view(np.uint16),
            )
        return blocks

    @classmethod
    def concat(cls, blocks: Sequence[Block]) -> Block:
        return cls(
            ids=[i for b in blocks for i in b.ids],
            created_at=np.concatenate([b.created_at for b in blocks]),
            client_ids=[c for b in blocks for c in b.client_ids],
            profiles=[p for b in blocks for p in b.profiles],
            actions=[a for b in blocks for a in b.actions],
            frame_counts=np.concatenate([b.frame_counts for b in blocks]),
            frames=np.concatenate([b.frames for b in blocks]),
            halves=np.concatenate([b.halves for b in blocks]),
        )

    def take(self, rows: np.ndarray) -> Block:
        """The decisions at ``rows`` (indices, in the order given)."""
        rows = np.asarray(rows, np.int64)
        if len(rows) == len(self) and np.array_equal(rows, np.arange(len(self))):
            return self
        starts, counts = self.bounds[rows], self.frame_counts[rows].astype(np.int64)
        # each taken decision's frame positions, in order
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        positions = offsets + np.arange(int(counts.sum()))
        return Block(
            ids=[self.ids[i] for i in rows],
            created_at=self.created_at[rows],
            client_ids=[self.client_ids[i] for i in rows],
            profiles=[self.profiles[i] for i in rows],
            actions=[self.actions[i] for i in rows],
            frame_counts=self.frame_counts[rows],
            frames=self.frames[positions],
            halves=self.halves[positions],
        )

    def in_time_order(self) -> Block:
        return self.take(np.lexsort((np.array(self.ids), self.created_at)))

    def split(self, size: int) -> list[Block]:
        return [self.take(np.arange(s, min(s + size, len(self))))
                for s in range(0, len(self), size)]

    # --- stored form ----------------------------------------------------------------------

    def row(self, model: str) -> dict[str, Any]:
        return {
            "model": model, "dim": self.dim,
            "first_at": float(self.created_at.min()), "last_at": float(self.created_at.max()),
            "decisions": len(self), "frames": len(self.frames),
            "meta": json.dumps({"ids": list(self.ids), "client_ids": list(self.client_ids),
                                "profiles": list(self.profiles),
                                "actions": list(self.actions)}),
            "created_at": self.created_at.astype("<f8").tobytes(),
            "frame_counts": self.frame_counts.astype("<i4").tobytes(),
            "frame_index": self.frames.astype("<i4").tobytes(),
            "vectors": self.halves.astype("<u2").tobytes(),
        }

    @classmethod
    def of_row(cls, row: Any) -> Block:
        meta, n = _Meta(row.meta), int(row.decisions)
        return cls(
            ids=_Column(meta, "ids", n),
            created_at=np.frombuffer(bytes(row.created_at), "<f8").astype(np.float64),
            client_ids=_Column(meta, "client_ids", n),
            profiles=_Column(meta, "profiles", n),
            actions=_Column(meta, "actions", n),
            frame_counts=np.frombuffer(bytes(row.frame_counts), "<i4").astype(np.int64),
            frames=np.frombuffer(bytes(row.frame_index), "<i4").astype(np.int64),
            halves=np.frombuffer(bytes(row.vectors), "<u2").reshape(int(row.frames),
                                                                    int(row.dim)),
        )


def insert(conn: Connection, blocks: dict[str, Block]) -> None:
    """Write ``blocks`` (model → block) in the caller's transaction."""
    rows = [b.row(model) for model, b in blocks.items() if len(b)]
    if rows:
        conn.execute(frame_blocks.insert(), rows)


# --- scanning --------------------------------------------------------------------------------


def scan(engine: Engine, *, model: str, since: float | None = None,
         until: float | None = None, chunk: int = BLOCK,
         shard: tuple[int, int] | None = None) -> Iterator[Block]:
    """The stored decisions of ``model`` made in ``[since, until)``, a block at a time (at
    most ``chunk`` decisions: a larger block is cut), roughly oldest first (blocks are
    clustered by time, not ordered across), only the window's decisions of each. One
    statement, read as it runs (a server-side cursor on PostgreSQL). ``shard=(i, n)``: only
    the blocks whose id is ``i`` modulo ``n``, for ``n`` readers in parallel."""
    b = frame_blocks.c
    where = [b.model == model]
    if shard is not None:
        where.append(b.id % shard[1] == shard[0])
    if since is not None:
        where.append(b.last_at >= since)
    if until is not None:
        where.append(b.first_at < until)
    statement = sa.select(frame_blocks).where(*where).order_by(b.first_at, b.id)
    for row in _raw_rows(engine, statement):
        block = Block.of_row(row)
        if (since is not None and row.first_at < since) or (
                until is not None and row.last_at >= until):
            t = block.created_at
            inside = np.ones(len(t), bool)
            if since is not None:
                inside &= t >= since
            if until is not None:
                inside &= t < until
            block = block.take(np.flatnonzero(inside))
        if len(block) > chunk:
            yield from block.split(chunk)
        elif len(block):
            yield block


class _Row:
    """A driver's row tuple, by column name."""

    __slots__ = ("_row",)
    _index = {c.name: i for i, c in enumerate(frame_blocks.c)}

    def __init__(self, row: tuple[Any, ...]) -> None:
        self._row = row

    def __getattr__(self, name: str) -> Any:
        return self._row[self._index[name]]


def _raw_rows(engine: Engine, statement: Any) -> Iterator[_Row]:
    """The statement's rows as the driver gives them, read as they come (a server-side
    cursor on PostgreSQL): SQLAlchemy's result processing cost as much again as reading a
    window's blocks, and held the interpreter lock while the scorer waited for it."""
    with engine.connect() as conn:
        compiled = statement.compile(dialect=conn.dialect,
                                     compile_kwargs={"render_postcompile": True})
        params = compiled.construct_params()
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cursor = (raw.cursor(name="frame_blocks_scan", binary=True)
                  if conn.dialect.name == "postgresql" else raw.cursor())
        try:
            if compiled.positiontup is not None:  # SQLite: ? placeholders
                cursor.execute(str(compiled), [params[k] for k in compiled.positiontup])
            else:
                cursor.execute(str(compiled), params)
            while rows := cursor.fetchmany(4):
                for row in rows:
                    yield _Row(row)
        finally:
            cursor.close()


# --- merging ---------------------------------------------------------------------------------


def _exclusive(conn: Connection, wait: bool) -> bool:
    """PostgreSQL: take the merge lock for this transaction (``wait``: until it is free;
    otherwise only if it is). SQLite: the write transaction already excludes every writer."""
    if conn.dialect.name != "postgresql":
        return True
    if wait:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MERGE_LOCK)))
        return True
    return bool(conn.execute(sa.select(sa.func.pg_try_advisory_xact_lock(_MERGE_LOCK)))
                .scalar())


def small_blocks(engine: Engine) -> dict[str, int]:
    """Small blocks per model (what merging would take)."""
    b = frame_blocks.c
    with engine.connect() as conn:
        rows = conn.execute(sa.select(b.model, sa.func.count()).where(b.decisions < SMALL)
                            .group_by(b.model)).all()
    return {str(m): int(n) for m, n in rows}


def merge_small(engine: Engine, *, model: str | None = None, wait: bool = True) -> int:
    """One merge: the oldest small blocks of a model (``None``: the model with most), up to
    :data:`MERGE_DECISIONS` decisions, rewritten as blocks of :data:`BLOCK` in time order, in
    one transaction. Returns how many decisions moved (0: fewer than two small blocks, or,
    ``wait`` false, another merge is running)."""
    b = frame_blocks.c
    with engine.execution_options(immediate=True).begin() as conn:
        if not _exclusive(conn, wait):
            return 0
        if model is None:
            counts = conn.execute(
                sa.select(b.model, sa.func.count()).where(b.decisions < SMALL)
                .group_by(b.model).order_by(sa.func.count().desc()).limit(1)).all()
            if not counts:
                return 0
            model = str(counts[0][0])
        candidates = conn.execute(
            sa.select(b.id, b.decisions).where(b.model == model, b.decisions < SMALL)
            .order_by(b.first_at, b.id).limit(MERGE_DECISIONS)).all()
        taken: list[int] = []
        total = 0
        for block_id, n in candidates:
            if taken and total + n > MERGE_DECISIONS:
                break
            taken.append(block_id)
            total += n
        if len(taken) < 2:
            return 0
        rows = conn.execute(sa.select(frame_blocks).where(b.id.in_(taken))).all()
        merged = Block.concat([Block.of_row(r) for r in rows]).in_time_order()
        conn.execute(frame_blocks.insert(), [part.row(model) for part in merged.split(BLOCK)])
        conn.execute(frame_blocks.delete().where(b.id.in_(taken)))
        return len(merged)


def compact(engine: Engine, *, model: str | None = None) -> int:
    """Merge until no model has two small blocks; returns how many decisions moved."""
    moved = 0
    while (n := merge_small(engine, model=model)) > 0:
        moved += n
    return moved


def purge(conn: Connection, older_than: float) -> None:
    """In the purge's transaction: drop the blocks whose decisions are all older than
    ``older_than``, and rewrite those that hold some older and some newer."""
    b = frame_blocks.c
    _exclusive(conn, wait=True)
    conn.execute(frame_blocks.delete().where(b.last_at < older_than))
    straddling = conn.execute(sa.select(frame_blocks).where(b.first_at < older_than)).all()
    for row in straddling:
        block = Block.of_row(row)
        kept = block.take(np.flatnonzero(block.created_at >= older_than))
        if len(kept):
            conn.execute(frame_blocks.insert(), [kept.row(row.model)])
        conn.execute(frame_blocks.delete().where(b.id == row.id))


def merge_due(engine: Engine, *, at: int = MERGE_AT) -> int:
    """The background merge: for each model with ``at`` small blocks or more, merge until it
    has fewer, one transaction of at most :data:`MERGE_DECISIONS` decisions at a time. On
    PostgreSQL, nothing when another process is merging (it skips its turn); on SQLite it
    waits for the write lock, as any write does, for one such transaction at most. Returns
    how many decisions moved."""
    moved = 0
    for model, n in small_blocks(engine).items():
        while n >= at:
            done = merge_small(engine, model=model, wait=False)
            if not done:
                break
            moved += done
            n = small_blocks(engine).get(model, 0)
    return moved
