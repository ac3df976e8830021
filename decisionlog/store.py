"""The decision log's queries: :class:`DecisionStore` writes decisions (with the embeddings of
their sampled frames, never the image) and reads them back: pages, filters, stats, exports,
and the stored frames that re-deciding past traffic reads.

SQLite (WAL: several gunicorn workers can write at once) by default, PostgreSQL for several
replicas, chosen by a database URL; the tables and the queries are SQLAlchemy Core
(:mod:`decisionlog.tables`), so one query serves both. Time buckets are integer columns
written at insert time, so no date function differs between the two. Writing without losing
a decision is :mod:`decisionlog.recorder`'s; times and cursors are
:mod:`decisionlog.windows`'.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa

from moderation.views import View, keyed_views

from . import blocks
from .blocks import Block
from .database import connect, migrate
from .records import DecisionRecord, ImageRef, PolicyRef
from .reviews import AuditSampler, queue_rows
from .tables import (
    decision_flags,
    decision_frames,
    decisions,
    rescored_decisions,
    review_items,
)
from .windows import decode_cursor, encode_cursor

__all__ = ["DecisionFilters", "DecisionStore"]

BUCKETS = {"hour": 1, "day": 24}  # bucket width in hours


@dataclass(frozen=True)
class DecisionFilters:
    """Which decisions the API's and the CLI's filters let through (``category``: that
    category fired; ``flagged``: the action was flag, review or block, or was not)."""

    since: float | None = None
    until: float | None = None
    action: str | None = None
    category: str | None = None
    policy_version: str | None = None
    client_id: str | None = None
    flagged: bool | None = None

    def clauses(self) -> list[Any]:
        """The WHERE clauses on ``decisions``."""
        where = DecisionStore._filters(self.since, self.until, self.action,
                                       self.policy_version, self.client_id)
        if self.flagged is not None:
            is_flagged = decisions.c.action.in_(("flag", "review", "block"))
            where.append(is_flagged if self.flagged else sa.not_(is_flagged))
        if self.category is not None:
            where.append(decisions.c.id.in_(
                sa.select(decision_flags.c.decision_id)
                .where(decision_flags.c.category == self.category)
            ))
        return where


class DecisionStore:
    """Read and write the decision log (SQLAlchemy Core: the same queries on SQLite and
    PostgreSQL). Opening it brings the schema up to date (:func:`decisionlog.database.migrate`,
    once across the processes that open it at once). Thread-safe; safe across processes."""

    def __init__(self, url: str, *, migrate_schema: bool = True,
                 audit: AuditSampler | None = None) -> None:
        self.url = url
        #: draws decisions into the review queue's audit sample as they are recorded
        self.audit = audit
        self.engine = connect(url)
        self.dialect = self.engine.dialect.name
        if migrate_schema:
            migrate(url)

    def close(self) -> None:
        """Close this process's pooled connections (they reopen on next use)."""
        self.engine.dispose()

    def _write(self) -> Any:
        """A write transaction (on SQLite, it takes the write lock when it begins)."""
        return self.engine.execution_options(immediate=True).begin()

    # --- writing -------------------------------------------------------------------------

    def add_many(self, records: Sequence[DecisionRecord]) -> None:
        """Insert ``records`` with their frames in one transaction (all or none): a row per
        frame (point reads, pgvector's index) and a small block per model (scans:
        :mod:`decisionlog.blocks`); and queue for review the ones that go there
        (:func:`decisionlog.reviews.queue_rows`)."""
        if not records:
            return
        rows, flags, frames = [], [], []
        for r in records:
            hour = int(r.created_at // 3600)
            rows.append({
                "id": r.id, "created_at": r.created_at, "hour": hour, "client_id": r.client_id,
                "image_sha256": r.image.sha256, "image_size": r.image.size,
                "policy_name": r.policy.name, "policy_version": r.policy.version,
                "model": r.model, "profile": r.profile, "action": r.action,
                "triggered": ",".join(r.triggered),
                "categories": json.dumps(
                    {k: v.model_dump(mode="json") for k, v in r.categories.items()}
                ),
                "latency_ms": r.latency_ms, "error_code": r.error_code, "frame": r.frame,
                "frames_scored": r.frames_scored,
                "views": json.dumps([v.model_dump(mode="json") for v in r.views])
                if r.views else None,
                "pdq": json.dumps([h.model_dump(mode="json") for h in r.pdq]) if r.pdq else None,
                "matches": json.dumps([m.model_dump(mode="json") for m in r.matches])
                if r.matches else None,
            })
            for category in r.triggered:
                outcome = r.categories.get(category)
                flags.append({
                    "decision_id": r.id, "created_at": r.created_at, "hour": hour,
                    "policy_version": r.policy.version, "category": category,
                    "action": outcome.action if outcome is not None else r.action,
                })
            if r.embeddings is not None:
                frames += [
                    {"decision_id": r.id, "frame": index, "embedding": vector}
                    for index, vector in zip(r.frames, r.embeddings, strict=True)
                ]
        with self._write() as conn:
            conn.execute(decisions.insert(), rows)
            if flags:
                conn.execute(decision_flags.insert(), flags)
            if frames:
                conn.execute(decision_frames.insert(), frames)
                blocks.insert(conn, Block.of_records(records))
            queued = queue_rows(records, self.audit, time.time())
            if queued:
                conn.execute(review_items.insert(), queued)

    def purge(self, older_than: float) -> int:
        """Delete decisions created before the unix time ``older_than`` (with their flags,
        frames, re-scored versions and the review items nobody decided: there is nothing
        left to show a reviewer); returns how many. Verdicts are kept: they measure quality."""
        old = sa.select(decisions.c.id).where(decisions.c.created_at < older_than)
        with self._write() as conn:
            conn.execute(rescored_decisions.delete()
                         .where(rescored_decisions.c.created_at < older_than))
            conn.execute(decision_frames.delete().where(decision_frames.c.decision_id.in_(old)))
            blocks.purge(conn, older_than)
            conn.execute(decision_flags.delete().where(decision_flags.c.created_at < older_than))
            conn.execute(review_items.delete().where(
                review_items.c.decision_created_at < older_than,
                review_items.c.status != "decided"))
            removed = conn.execute(decisions.delete().where(decisions.c.created_at < older_than))
            return int(removed.rowcount)

    # --- reading -------------------------------------------------------------------------

    def _rows(self, statement: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(statement).all())

    @staticmethod
    def _record(row: Any) -> DecisionRecord:
        return DecisionRecord(
            id=row.id,
            created_at=row.created_at,
            client_id=row.client_id,
            image=ImageRef(sha256=row.image_sha256, size=row.image_size),
            policy=PolicyRef(name=row.policy_name, version=row.policy_version),
            model=row.model,
            profile=row.profile,
            action=row.action,
            triggered=[c for c in row.triggered.split(",") if c],
            categories=json.loads(row.categories),
            latency_ms=row.latency_ms,
            error_code=row.error_code,
            frame=row.frame,
            frames_scored=row.frames_scored,
            frames=sorted(int(f) for f in row.frames.split(",")) if row.frames else [],
            views=json.loads(row.views) if row.views else [],
            pdq=json.loads(row.pdq) if row.pdq else [],
            matches=json.loads(row.matches) if row.matches else [],
        )

    def _select(self) -> Any:
        """Decisions with the indices of their stored frames (comma-separated)."""
        stored = (
            sa.select(sa.func.group_concat(decision_frames.c.frame)
                      if self.dialect == "sqlite"
                      else sa.func.string_agg(sa.cast(decision_frames.c.frame, sa.Text), ","))
            .where(decision_frames.c.decision_id == decisions.c.id)
            .scalar_subquery()
        )
        columns = [c for c in decisions.c if c.name != "hour"]
        return sa.select(*columns, stored.label("frames"))

    def get(self, decision_id: str) -> DecisionRecord | None:
        rows = self._rows(self._select().where(decisions.c.id == decision_id))
        return self._record(rows[0]) if rows else None

    def frame_embeddings(self, decision_id: str) -> tuple[list[int], np.ndarray] | None:
        """Every stored frame of a decision: (frame indices, float32 array of shape
        (frames, dim)), for re-scoring; ``None`` when none is stored."""
        return self.frames_of([decision_id]).get(decision_id)

    def embedding(self, decision_id: str) -> np.ndarray | None:
        """The decided frame's image embedding (float32, shape (dim,))."""
        stored = self.frame_embeddings(decision_id)
        if stored is None:
            return None
        frames, vectors = stored
        decided = self._rows(sa.select(decisions.c.frame).where(decisions.c.id == decision_id))
        frame = decided[0].frame if decided and decided[0].frame is not None else frames[0]
        return vectors[frames.index(frame)] if frame in frames else None

    def query(self, filters: DecisionFilters | None = None, *, limit: int = 50,
              cursor: str | None = None) -> tuple[list[DecisionRecord], str | None]:
        """Newest first. Returns a page and the cursor of the next one (``None``: no more)."""
        where = (filters or DecisionFilters()).clauses()
        if cursor is not None:
            created_at, last_id = decode_cursor(cursor)
            where.append(sa.or_(
                decisions.c.created_at < created_at,
                sa.and_(decisions.c.created_at == created_at, decisions.c.id < last_id),
            ))
        rows = self._rows(
            self._select().where(*where)
            .order_by(decisions.c.created_at.desc(), decisions.c.id.desc())
            .limit(limit + 1)
        )
        page = [self._record(r) for r in rows[:limit]]
        next_cursor = (
            encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
        )
        return page, next_cursor

    @staticmethod
    def _filters(
        since: float | None,
        until: float | None,
        action: str | None,
        policy_version: str | None,
        client_id: str | None,
        table: sa.Table = decisions,
    ) -> list[Any]:
        c = table.c
        where: list[Any] = []
        if since is not None:
            where.append(c.created_at >= since)
        if until is not None:
            where.append(c.created_at < until)
        if action is not None:
            where.append(c.action == action)
        if policy_version is not None:
            where.append(c.policy_version == policy_version)
        if client_id is not None:
            where.append(c.client_id == client_id)
        return where

    def stats(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        bucket: str = "hour",
        policy_version: str | None = None,
    ) -> list[dict[str, Any]]:
        """Per time bucket and policy version: decisions by action, flags per category and
        the flag rate (flagged decisions of that category / decisions). Oldest first."""
        width = BUCKETS[bucket]

        def grouped(table: sa.Table, key: Any) -> list[Any]:
            b = table.c.hour // width
            where = self._filters(since, until, None, policy_version, None, table)
            return self._rows(
                sa.select(b, table.c.policy_version, key, sa.func.count())
                .where(*where).group_by(b, table.c.policy_version, key)
            )

        buckets: dict[tuple[int, str], dict[str, Any]] = {}
        for b, version, action, n in grouped(decisions, decisions.c.action):
            entry = buckets.setdefault(
                (int(b), version),
                {"start": int(b) * width * 3600, "policy_version": version, "total": 0,
                 "actions": {}, "categories": {}},
            )
            entry["total"] += int(n)
            entry["actions"][action] = int(n)
        for b, version, category, n in grouped(decision_flags, decision_flags.c.category):
            if (int(b), version) in buckets:
                buckets[int(b), version]["categories"][category] = {"flagged": int(n)}
        for entry in buckets.values():
            for counts in entry["categories"].values():
                counts["rate"] = counts["flagged"] / entry["total"]
        return [buckets[k] for k in sorted(buckets, key=lambda k: (k[0], k[1]))]

    def flag_counts(self, since: float | None = None, until: float | None = None
                    ) -> tuple[int, dict[str, int]]:
        """Decisions made in the window (errors aside), and how many each category flagged."""
        where = self._filters(since, until, None, None, None)
        total = self._rows(sa.select(sa.func.count()).select_from(decisions)
                           .where(*where, decisions.c.error_code.is_(None)))[0][0]
        flags = self._rows(
            sa.select(decision_flags.c.category, sa.func.count())
            .where(*self._filters(since, until, None, None, None, decision_flags))
            .group_by(decision_flags.c.category)
        )
        return int(total), {str(c): int(n) for c, n in flags}

    def export(self, since: float | None = None, until: float | None = None
               ) -> Iterator[DecisionRecord]:
        """Every decision in the range, oldest first, page by page."""
        where = self._filters(since, until, None, None, None)
        last: tuple[float, str] | None = None
        while True:
            page_where = list(where)
            if last is not None:
                page_where.append(sa.or_(
                    decisions.c.created_at > last[0],
                    sa.and_(decisions.c.created_at == last[0], decisions.c.id > last[1]),
                ))
            rows = self._rows(
                self._select().where(*page_where)
                .order_by(decisions.c.created_at, decisions.c.id).limit(1000)
            )
            if not rows:
                return
            for row in rows:
                yield self._record(row)
            last = (rows[-1].created_at, rows[-1].id)

    def count(self) -> int:
        return int(self._rows(sa.select(sa.func.count()).select_from(decisions))[0][0])

    # --- re-deciding past traffic --------------------------------------------------------

    def window_counts(self, since: float | None = None, until: float | None = None
                      ) -> list[tuple[str, bool, int]]:
        """Decisions in the window per model, errors apart: (model, is an error, count)."""
        is_error = decisions.c.error_code.is_not(None).label("is_error")
        rows = self._rows(
            sa.select(decisions.c.model, is_error, sa.func.count())
            .where(*self._filters(since, until, None, None, None))
            .group_by(decisions.c.model, is_error)
        )
        return [(str(m), bool(e), int(n)) for m, e, n in rows]

    def scan_frames(self, *, model: str, since: float | None = None,
                    until: float | None = None, chunk: int = blocks.BLOCK,
                    shard: tuple[int, int] | None = None) -> Iterator[Block]:
        """The decisions of ``model`` in the window that have stored frames (errors have
        none), a block of at most ``chunk`` at a time, with every frame's vector: memory
        stays flat in the window's size (:func:`decisionlog.blocks.scan`)."""
        return blocks.scan(self.engine, model=model, since=since, until=until, chunk=chunk,
                           shard=shard)

    def compact(self, model: str | None = None) -> int:
        """Merge the small frame blocks (:func:`decisionlog.blocks.compact`); returns how
        many decisions moved."""
        return blocks.compact(self.engine, model=model)

    def frames_of(self, decision_ids: Sequence[str]) -> dict[str, tuple[list[int], np.ndarray]]:
        """Every stored frame of each decision: id → (frame indices, ndarray of shape
        (frames, dim), float32). Decisions without any are absent."""
        found: dict[str, tuple[list[int], np.ndarray]] = {}
        ids = list(decision_ids)
        for start in range(0, len(ids), 500):
            rows = self._rows(
                sa.select(decision_frames.c.decision_id, decision_frames.c.frame,
                          decision_frames.c.embedding)
                .where(decision_frames.c.decision_id.in_(ids[start:start + 500]))
                .order_by(decision_frames.c.decision_id, decision_frames.c.frame)
            )
            grouped: dict[str, list[Any]] = {}
            for r in rows:
                grouped.setdefault(r.decision_id, []).append(r)
            for decision_id, mine in grouped.items():
                found[decision_id] = ([int(r.frame) for r in mine],
                                      np.stack([r.embedding for r in mine]))
        return found

    def views_of(self, decision_ids: Sequence[str]) -> dict[str, dict[int, View]]:
        """What each stored key of each decision is (:mod:`moderation.views`), for the
        decisions that had crops or were videos (the others' keys are frame indices)."""
        found: dict[str, dict[int, View]] = {}
        ids = list(decision_ids)
        for start in range(0, len(ids), 500):
            for row in self._rows(sa.select(decisions.c.id, decisions.c.views).where(
                    decisions.c.id.in_(ids[start:start + 500]), decisions.c.views.is_not(None))):
                found[row.id] = keyed_views([View.of_dict(v) for v in json.loads(row.views)])
        return found
