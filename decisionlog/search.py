"""Searching the decision log by meaning: the stored decisions whose frame embeddings are
nearest to query vectors (a text's, an uploaded image's, a stored decision's frames), each
decision once, by its best frame, best first. No image is needed: the log holds vectors.

Two indexes behind one small interface (:class:`VectorIndex`):

* :class:`ExactIndex`, the embedded default (SQLite): the window's frame blocks
  (:mod:`decisionlog.blocks`) are read one after another and compared with the queries, the
  decisions the other filters leave out (found in SQL) skipped. Exact, and the reference the
  approximate index is tested against. It runs on PostgreSQL too.
* :class:`HnswIndex` (PostgreSQL): pgvector's HNSW index on the ``halfvec`` column, cosine
  distance. The column holds the vectors of every model the log has seen, and an index needs
  one dimension, so there is one index per dimension (an expression index on
  ``embedding::halfvec(D)``, partial on ``vector_dims(embedding) = D``): migration 0004 builds
  them for the vectors already stored, :func:`ensure_hnsw_index` for a model's new dimension
  at start-up. Queries set ``hnsw.ef_search`` and use iterative scans (pgvector 0.8), so that
  a filtered query still returns ``k`` hits when the nearest frames are filtered out.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import numpy as np
import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlalchemy.engine import Engine

from moderation import ModerationError, NotFound
from moderation.scoring import float16_dot, one_blas_thread

from .records import spreadsheet_safe
from .store import DecisionFilters, DecisionStore
from .tables import decision_frames, decisions

log = logging.getLogger(__name__)

__all__ = [
    "ExactIndex",
    "HnswIndex",
    "Neighbour",
    "NoEmbedding",
    "SearchFilters",
    "SearchHit",
    "SearchPage",
    "UnknownDecision",
    "VectorIndex",
    "ensure_hnsw_index",
    "float16_dot",
    "frames_like",
    "hnsw_index_name",
    "index_for",
    "search",
    "write_csv",
]

#: The deepest page a search can reach (offset + limit): an index walks every hit before it.
MAX_DEPTH = 10_000


@dataclass(frozen=True)
class SearchFilters(DecisionFilters):
    """Which decisions a search may return: those the filters let through, never an error
    (it has no vector), never one of ``exclude`` (a query decision itself)."""

    exclude: tuple[str, ...] = ()

    def search_clauses(self, model: str) -> list[Any]:
        where = self.clauses()
        where.append(decisions.c.model == model)
        if self.exclude:
            where.append(decisions.c.id.not_in(self.exclude))
        return where


@dataclass(frozen=True)
class Neighbour:
    """A decision found by an index: its best frame, and that frame's cosine to the query."""

    decision_id: str
    frame: int
    similarity: float


class VectorIndex(Protocol):
    name: str

    def nearest(self, queries: np.ndarray, *, model: str, filters: SearchFilters,
                k: int) -> list[Neighbour]:
        """The ``k`` decisions of ``model`` that ``filters`` let through whose frames are most
        similar to any of ``queries`` (ndarray of shape (q, dim), unit rows), each by its
        best frame, best first."""
        ...


class _Best:
    """The best ``k`` decisions seen so far, each by its best frame."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.found: dict[str, tuple[float, int]] = {}

    def add(self, ids: Sequence[str] | np.ndarray, frames: Sequence[int] | np.ndarray,
            similarity: np.ndarray) -> None:
        """One chunk of frame rows. A decision in the overall top k is in its own chunk's top
        k (every decision above it there is above it overall), so only those are kept."""
        n = len(ids)
        wide = min(n, 4 * self.k)
        order = (np.argsort(-similarity, kind="stable") if wide == n
                 else np.argpartition(-similarity, wide - 1)[:wide])
        if wide < n:
            order = order[np.argsort(-similarity[order], kind="stable")]
        taken: set[str] = set()
        for i in order:
            decision_id = ids[i]
            if decision_id in taken:
                continue
            taken.add(decision_id)
            self._offer(decision_id, float(similarity[i]), int(frames[i]))
            if len(taken) == self.k:
                break
        else:
            if wide < n:  # the 4k best rows held fewer than k decisions: look at them all
                self.add_all(ids, frames, similarity)
        if len(self.found) > 4 * self.k:
            self.found = dict(self._ranked()[: self.k])

    def floor(self) -> float:
        """What a decision must beat to enter the best ``k`` (-inf: fewer found yet)."""
        if len(self.found) < self.k:
            return -np.inf
        return self._ranked()[self.k - 1][1][0]

    def add_all(self, ids: Sequence[str] | np.ndarray, frames: Sequence[int] | np.ndarray,
                similarity: np.ndarray) -> None:
        for decision_id, frame, s in zip(ids, frames, similarity.tolist(), strict=True):
            self._offer(decision_id, s, int(frame))

    def _offer(self, decision_id: str, similarity: float, frame: int) -> None:
        held = self.found.get(decision_id)
        if held is None or similarity > held[0]:
            self.found[decision_id] = (similarity, frame)

    def _ranked(self) -> list[tuple[str, tuple[float, int]]]:
        return sorted(self.found.items(), key=lambda kv: (-kv[1][0], kv[0]))

    def result(self) -> list[Neighbour]:
        return [Neighbour(i, frame, s) for i, (s, frame) in self._ranked()[: self.k]]


# --- exact search ------------------------------------------------------------------------


class _OfFrames(Sequence[str]):
    """Each frame's decision id, looked up when asked for (most never are)."""

    def __init__(self, ids: Sequence[str], owner: np.ndarray) -> None:
        self.ids, self.owner = ids, owner

    def __len__(self) -> int:
        return len(self.owner)

    def __getitem__(self, i: Any) -> Any:
        return self.ids[int(self.owner[i])]

class ExactIndex:
    """Every stored frame of the window compared with the queries (see the module)."""

    name = "exact"

    def __init__(self, store: DecisionStore, chunk: int = 8192,
                 readers: int | None = None) -> None:
        self.store = store
        self.chunk = chunk
        #: blocks read and compared in parallel, one connection each (default: one per core,
        #: at most 4). With numpy's BLAS on one thread meanwhile, two readers took a million
        #: decisions from 1.3 s to 0.88 s on 2 cores (BENCHMARKS.md)
        self.readers = max(1, readers if readers is not None else min(4, os.cpu_count() or 1))

    def nearest(self, queries: np.ndarray, *, model: str, filters: SearchFilters,
                k: int) -> list[Neighbour]:
        from concurrent.futures import ThreadPoolExecutor

        allowed = self._allowed(model, filters)
        excluded = set(filters.exclude)

        def part(shard: tuple[int, int]) -> _Best:
            """The best of one reader's share of the blocks (numpy and the database
            drivers release the interpreter lock: readers run on every core)."""
            best = _Best(k)
            for block in self.store.scan_frames(model=model, since=filters.since,
                                                until=filters.until, chunk=self.chunk,
                                                shard=shard):
                if allowed is not None or excluded:
                    keep = [n for n, i in enumerate(block.ids)
                            if i not in excluded and (allowed is None or i in allowed)]
                    if not keep:
                        continue
                    block = block.take(np.asarray(keep))
                similarity = float16_dot(block.halves, queries).max(axis=1)
                if similarity.max() < best.floor():
                    continue  # nothing here beats the k found: its ids are never decoded
                owner = np.repeat(np.arange(len(block)), block.frame_counts)
                best.add(_OfFrames(block.ids, owner), block.frames, similarity)
            return best

        readers = self.readers
        with one_blas_thread(), ThreadPoolExecutor(
                readers, thread_name_prefix="exact-search") as pool:
            parts = list(pool.map(part, [(i, readers) for i in range(readers)]))
        merged = _Best(k)
        for found in parts:
            for decision_id, (similarity, frame) in found.found.items():
                merged._offer(decision_id, similarity, frame)
        return merged.result()

    def _allowed(self, model: str, filters: SearchFilters) -> set[str] | None:
        """The decisions the filters other than time let through (``None``: all): the same
        SQL as everywhere else, on the decisions table's indexes."""
        if all(getattr(filters, name) is None for name in
               ("action", "category", "policy_version", "client_id", "flagged")):
            return None
        where = DecisionFilters.clauses(filters)
        with self.store.engine.connect() as conn:
            return set(conn.execute(sa.select(decisions.c.id)
                                    .where(*where, decisions.c.model == model)).scalars())


# --- pgvector ----------------------------------------------------------------------------


def hnsw_index_name(dim: int) -> str:
    return f"decision_frames_hnsw_{dim}"


def ensure_hnsw_index(engine: Engine, dim: int, *, m: int = 32,
                      ef_construction: int = 128) -> bool:
    """Create the HNSW index of ``dim``-dimension vectors unless it exists (PostgreSQL only;
    under the migration lock, so that workers starting at once build it once). Building it
    reads every stored vector of that dimension: instant on a new model's, minutes for
    millions (give the server ``maintenance_work_mem`` for the graph). Returns whether it
    was built now."""
    from .database import migration_lock

    if engine.dialect.name != "postgresql":
        return False
    name = hnsw_index_name(dim)
    with migration_lock(engine) as conn:
        if sa.inspect(conn).has_index("decision_frames", name):
            return False
        log.info("building the search index %s (m=%d, ef_construction=%d)", name, m,
                 ef_construction)
        conn.execute(sa.text(
            f"CREATE INDEX IF NOT EXISTS {name} ON decision_frames USING hnsw "
            f"((embedding::halfvec({int(dim)})) halfvec_cosine_ops) "
            f"WITH (m = {int(m)}, ef_construction = {int(ef_construction)}) "
            f"WHERE vector_dims(embedding) = {int(dim)}"
        ))
        conn.commit()
        return True


class HnswIndex:
    """pgvector's HNSW index (see the module). ``ef_search``: candidates kept per layer while
    searching (more: better recall, slower)."""

    name = "pgvector"

    def __init__(self, store: DecisionStore, ef_search: int = 100) -> None:
        if store.dialect != "postgresql":
            raise ValueError("the pgvector index needs a PostgreSQL decision log")
        self.store = store
        self.ef_search = ef_search

    def nearest(self, queries: np.ndarray, *, model: str, filters: SearchFilters,
                k: int) -> list[Neighbour]:
        best = _Best(k)
        for query in queries:  # an animation's frames: one index search each, merged
            for n in self._nearest_one(query, model, filters, k):
                best._offer(n.decision_id, n.similarity, n.frame)
        return best.result()

    def _nearest_one(self, query: np.ndarray, model: str, filters: SearchFilters,
                     k: int) -> list[Neighbour]:
        from pgvector.sqlalchemy import HALFVEC

        d, f = decisions, decision_frames
        dim = len(query)
        distance = sa.cast(f.c.embedding, HALFVEC(dim)).cosine_distance(
            np.asarray(query, np.float32))
        where = [sa.func.vector_dims(f.c.embedding) == dim, *filters.search_clauses(model)]
        fetch = max(2 * k, 20)
        while True:  # frames, not decisions: an animation can take several rows
            with self.store.engine.connect() as conn, conn.begin():
                conn.execute(sa.select(
                    sa.func.set_config("hnsw.ef_search", str(max(self.ef_search, 1)), True),
                    sa.func.set_config("hnsw.iterative_scan", "strict_order", True),
                ))
                rows = conn.execute(
                    sa.select(f.c.decision_id, f.c.frame, distance.label("distance"))
                    .select_from(f.join(d, d.c.id == f.c.decision_id))
                    .where(*where).order_by(distance).limit(fetch)
                ).all()
            found: dict[str, Neighbour] = {}
            for decision_id, frame, dist in rows:
                if decision_id not in found:
                    found[decision_id] = Neighbour(decision_id, int(frame), 1.0 - float(dist))
            if len(found) >= k or len(rows) < fetch:
                return list(found.values())[:k]
            fetch *= 4


class UnknownDecision(NotFound):
    """``like=`` a decision the log does not have."""


class NoEmbedding(ModerationError, LookupError):
    """``like=`` a decision with no stored embedding (an error result)."""

    code = "no_embedding"
    status = 422


def frames_like(store: DecisionStore, decision_id: str) -> tuple[str, np.ndarray]:
    """A stored decision as a query: its model, and its frames' vectors (frames, dim)."""
    found = store.get(decision_id)
    if found is None:
        raise UnknownDecision(f"no decision with id {decision_id!r}")
    stored = store.frame_embeddings(decision_id)
    if stored is None:
        raise NoEmbedding(f"decision {decision_id!r} has no stored embedding (it is an error "
                          "result, or was recorded without one): there is nothing to compare "
                          "with")
    return found.model, stored[1]


def index_for(store: DecisionStore, *, ef_search: int = 100) -> VectorIndex:
    """The log's index: pgvector's on PostgreSQL, exact search on SQLite."""
    if store.dialect == "postgresql":
        return HnswIndex(store, ef_search=ef_search)
    return ExactIndex(store)


# --- the answer --------------------------------------------------------------------------


class SearchHit(BaseModel):
    """One decision found: what the API, the CLI's JSON lines and CSV and the dashboard show."""

    decision_id: str
    similarity: float = Field(description="cosine between the query and the best frame")
    frame: int = Field(description="the frame of the image that matched best")
    created_at: float = Field(description="unix seconds")
    client_id: str | None
    action: str
    triggered: list[str]
    top_terms: dict[str, list[str]] = Field(
        description="per triggered category, its terms that scored highest"
    )
    policy_version: str

    def csv_row(self) -> dict[str, Any]:
        """The CSV view, by :data:`CSV_COLUMNS`; no text cell starts a formula."""
        row = self.model_dump(mode="json")
        row["triggered"] = ",".join(self.triggered)
        row["top_terms"] = "; ".join(f"{c}: {', '.join(t)}" for c, t in self.top_terms.items())
        return {k: spreadsheet_safe(v) for k, v in row.items()}


CSV_COLUMNS = list(SearchHit.model_fields)


def write_csv(hits: Sequence[SearchHit], out: TextIO) -> None:
    """A header, then one row per hit (the CLI's and the dashboard's CSV). Lines end in CRLF
    (RFC 4180): a cell holding a CR or an LF is then quoted, where with LF alone a CR went
    out bare and broke the row."""
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(h.csv_row() for h in hits)


@dataclass(frozen=True)
class SearchPage:
    hits: list[SearchHit]
    next_offset: int | None
    index: str
    model: str
    filters: SearchFilters = field(default_factory=SearchFilters)


def search(
    store: DecisionStore,
    queries: np.ndarray,
    *,
    model: str,
    filters: SearchFilters | None = None,
    limit: int = 20,
    offset: int = 0,
    min_similarity: float | None = None,
    index: VectorIndex | None = None,
) -> SearchPage:
    """A page of the decisions most like ``queries`` (ndarray of shape (q, dim) or (dim,),
    made unit length here), best first: ``limit`` hits from ``offset``, none below
    ``min_similarity``. ``next_offset`` is where the next page starts (``None``: no more)."""
    if offset + limit > MAX_DEPTH:
        raise ValueError(f"offset + limit must be at most {MAX_DEPTH}; got {offset + limit}")
    filters = filters or SearchFilters()
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    if not np.all(np.isfinite(queries)) or np.any(norms == 0):
        raise ValueError("a query vector is zero or not finite")
    index = index or index_for(store)
    found = index.nearest(queries / norms, model=model, filters=filters, k=offset + limit + 1)
    if min_similarity is not None:
        found = [n for n in found if n.similarity >= min_similarity]
    page = found[offset : offset + limit]
    return SearchPage(
        hits=_hits(store, page),
        next_offset=offset + limit if len(found) > offset + limit else None,
        index=index.name,
        model=model,
        filters=filters,
    )


def _hits(store: DecisionStore, found: list[Neighbour]) -> list[SearchHit]:
    import json

    if not found:
        return []
    d = decisions
    rows = {
        r.id: r for r in store._rows(
            sa.select(d.c.id, d.c.created_at, d.c.client_id, d.c.action, d.c.triggered,
                      d.c.categories, d.c.policy_version)
            .where(d.c.id.in_([n.decision_id for n in found]))
        )
    }
    hits = []
    for n in found:
        row = rows.get(n.decision_id)
        if row is None:  # purged between the index and this read
            continue
        triggered = [c for c in row.triggered.split(",") if c]
        outcomes = json.loads(row.categories)
        hits.append(SearchHit(
            decision_id=n.decision_id,
            similarity=round(n.similarity, 6),
            frame=n.frame,
            created_at=row.created_at,
            client_id=row.client_id,
            action=row.action,
            triggered=triggered,
            top_terms={c: [t["text"] for t in outcomes.get(c, {}).get("top_terms", [])]
                       for c in triggered},
            policy_version=row.policy_version,
        ))
    return hits
