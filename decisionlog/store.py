"""The decision log: every moderation result with its policy version and the embeddings of
its sampled frames, never the image.

SQLite (WAL: several gunicorn workers can write at once) by default, PostgreSQL for several
replicas, chosen by a database URL; the schema and the queries are SQLAlchemy Core
(:mod:`decisionlog.schema`), so one query serves both. Time buckets are integer columns
written at insert time, so no date function differs between the two.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from .database import connect, migrate
from .records import DecisionRecord, ImageRef, PolicyRef
from .reviews import AuditSampler, queue_rows
from .schema import (
    FrameVector,
    decision_flags,
    decision_frames,
    decisions,
    rescored_decisions,
    review_items,
)

log = logging.getLogger(__name__)

__all__ = [
    "DeadLetters",
    "DecisionFilters",
    "DecisionStore",
    "StoredFrames",
    "Recorder",
    "default_database_url",
    "default_dead_letter_path",
    "replay_dead_letters",
]

BUCKETS = {"hour": 1, "day": 24}  # bucket width in hours


def parse_time(value: str, now: float | None = None) -> float:
    """Unix seconds, ISO 8601 (``2026-11-23T10:00:00Z``; no zone means UTC), or an age such
    as ``36h`` or ``7d`` (that long before ``now``). Raises ``ValueError``."""
    import datetime as dt
    import re

    if re.fullmatch(r"-?\d+(?:\.\d+)?", value.strip()):
        found = float(value)
        if math.isfinite(found):
            return found
    age = re.fullmatch(r"(\d+(?:\.\d+)?)([mhd])", value.strip())
    if age:
        seconds = float(age.group(1)) * {"m": 60, "h": 3600, "d": 86400}[age.group(2)]
        if math.isfinite(seconds):
            return (time.time() if now is None else now) - seconds
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise ValueError(
            f"{value!r} is not a time: give unix seconds, ISO 8601 (2026-11-23T10:00:00Z) "
            "or an age (36h, 7d)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


def _data_dir() -> Path:
    """``$XDG_DATA_HOME/moderation``, else ``~/.local/share/moderation``."""
    root = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(root) / "moderation"


def default_database_url() -> str:
    return f"sqlite:///{_data_dir() / 'decisions.sqlite3'}"


@dataclass(frozen=True)
class StoredFrames:
    """A chunk of stored decisions with the embeddings of all their stored frames, oldest
    first: what re-deciding past traffic reads.

    ``ids``, ``client_ids``, ``profiles``, ``actions`` (as logged): one entry per decision;
    ``created_at``: ndarray of
    shape (n,), unix seconds; ``frame_counts``: ndarray of shape (n,), each decision's
    number of stored frames (at least 1); ``frames``: ndarray of shape (n_frames,), each
    frame's index in its file; ``vectors``: ndarray of shape (n_frames, dim), float32 (from
    float16), each decision's frames contiguous and in file order. ``without_frames``: how
    many decisions of the chunk had no stored embedding (they are not in it).
    """

    ids: list[str]
    created_at: np.ndarray
    client_ids: list[str | None]
    profiles: list[str]
    actions: list[str]
    frame_counts: np.ndarray
    frames: np.ndarray
    vectors: np.ndarray
    without_frames: int


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
        """Insert ``records`` with their frames in one transaction (all or none), and queue
        for review the ones that go there (:func:`decisionlog.reviews.queue_rows`)."""
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
            frames=[int(f) for f in row.frames.split(",")] if row.frames else [],
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
                    until: float | None = None, chunk: int = 4096) -> Iterator[StoredFrames]:
        """The decisions of ``model`` in the window that were made (no error), about
        ``chunk`` at a time, oldest first, with every stored frame: memory stays flat in the
        window's size.

        SQLite: one statement for the whole window, read as it runs (the time index, then each
        decision's frames by primary key). PostgreSQL: a page of decisions at a time (keyset
        on the time index, where its planner keeps index lookups), joined to their frames.
        Vectors are read as bytes and decoded with one numpy call per chunk."""
        d, f = decisions, decision_frames
        where = self._filters(since, until, None, None, None)
        where += [d.c.model == model, d.c.error_code.is_(None)]
        raw = FrameVector.raw(f.c.embedding, self.dialect)
        if self.dialect == "sqlite":
            statement = (
                sa.select(d.c.id, d.c.created_at, d.c.client_id, d.c.profile, d.c.action,
                          f.c.frame, raw)
                .select_from(d.outerjoin(f, f.c.decision_id == d.c.id))
                .where(*where).order_by(d.c.created_at, d.c.id)
            )
            with self.engine.connect() as conn:
                result = conn.execution_options(stream_results=True).execute(statement)
                held: list[Any] = []
                while True:
                    rows = result.fetchmany(chunk)
                    if not rows:
                        break
                    rows = held + list(rows)
                    # the last decision's frames may go on in the next rows: hold it back
                    last = len(rows) - 1
                    while last > 0 and rows[last - 1][0] == rows[-1][0]:
                        last -= 1
                    held = rows[last:]
                    if last:
                        yield self._frames_of_rows(rows[:last])
                if held:
                    yield self._frames_of_rows(held)
            return
        last_key: tuple[float, str] | None = None
        while True:
            page_where = list(where)
            if last_key is not None:
                page_where.append(sa.tuple_(d.c.created_at, d.c.id) > sa.tuple_(*last_key))
            page = (
                sa.select(d.c.id, d.c.created_at, d.c.client_id, d.c.profile, d.c.action)
                .where(*page_where).order_by(d.c.created_at, d.c.id).limit(chunk).subquery()
            )
            rows = self._rows(
                sa.select(page.c.id, page.c.created_at, page.c.client_id, page.c.profile,
                          page.c.action, f.c.frame, raw)
                .select_from(page.outerjoin(f, f.c.decision_id == page.c.id))
                .order_by(page.c.created_at, page.c.id)
            )
            if not rows:
                return
            yield self._frames_of_rows(rows)
            last_key = (rows[-1][1], rows[-1][0])
            if len({r[0] for r in rows}) < chunk:
                return

    def _frames_of_rows(self, rows: Sequence[Any]) -> StoredFrames:
        """Rows of (id, created_at, client_id, profile, action, frame, vector bytes), in
        decision time order, each decision's rows together (its frames in any order; one row
        with no frame for a decision without any)."""
        ids, created, clients, profiles, actions, frames, blobs = zip(*rows, strict=True)
        n_rows = len(ids)
        first = np.ones(n_rows, bool)  # where a decision's rows begin
        first[1:] = np.asarray(ids[1:], object) != np.asarray(ids[:-1], object)
        owner = np.cumsum(first) - 1
        has_frame = np.fromiter((b is not None for b in blobs), bool, n_rows)
        heads = np.flatnonzero(first)
        counts = np.bincount(owner[has_frame], minlength=len(heads))
        kept = heads[counts > 0]
        frame = np.asarray([x if x is not None else -1 for x in frames], np.int64)
        order = np.flatnonzero(has_frame)
        order = order[np.lexsort((frame[order], owner[order]))]
        return StoredFrames(
            ids=[ids[i] for i in kept],
            created_at=np.asarray([created[i] for i in kept], np.float64),
            client_ids=[clients[i] for i in kept],
            profiles=[profiles[i] for i in kept],
            actions=[actions[i] for i in kept],
            frame_counts=counts[counts > 0],
            frames=frame[order],
            vectors=FrameVector.decode_many([blobs[i] for i in order], self.dialect),
            without_frames=int((counts == 0).sum()),
        )

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


def encode_cursor(created_at: float, decision_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, decision_id]).encode()).decode()


#: A cursor this log gives is well under this many characters.
MAX_CURSOR_LENGTH = 200


def decode_cursor(cursor: str) -> tuple[float, str]:
    """``(created_at, decision_id)`` of a cursor :func:`encode_cursor` made; a ``ValueError``
    for anything else (too long, not base64, not a [finite time, id] pair)."""
    shown = cursor if len(cursor) <= 40 else cursor[:39] + "…"
    problem = ValueError(f"invalid cursor {shown!r}: pass next_cursor as it was given")
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise problem
    try:
        found = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, TypeError, RecursionError):
        raise problem from None
    if not (isinstance(found, list) and len(found) == 2
            and isinstance(found[0], (int, float)) and not isinstance(found[0], bool)
            and isinstance(found[1], str)):
        raise problem
    try:
        created_at = float(found[0])
    except OverflowError:
        raise problem from None
    if not math.isfinite(created_at):
        raise problem
    return created_at, found[1]


class DeadLetters:
    """Records the log could not take, set aside with the reason: one JSON line each,
    appended and fsync'ed, so that a decision a client was given is never lost.
    ``moderation decisions replay`` writes them into the log once it can take them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def add(self, records: Sequence[DecisionRecord], reason: str) -> None:
        lines = "".join(
            json.dumps({"reason": reason, "failed_at": time.time(), "record": r.to_json()})
            + "\n"
            for r in records
        )
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one write() per batch with O_APPEND: lines of several workers never interleave
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, lines.encode("ascii"))  # json.dumps escapes everything else
                os.fsync(fd)
            finally:
                os.close(fd)
        for r in records:
            log.error("decision %s set aside in %s: %s", r.id, self.path, reason)

    def read(self) -> list[tuple[DecisionRecord, str]]:
        if not self.path.exists():
            return []
        out = []
        with self.path.open(encoding="ascii") as f:
            for line in f:
                if line.strip():
                    entry = json.loads(line)
                    out.append((DecisionRecord.from_json(entry["record"]), str(entry["reason"])))
        return out


def default_dead_letter_path(database_url: str) -> Path:
    """Beside a SQLite log; under the data folder for PostgreSQL."""
    if database_url.startswith("sqlite:///"):
        db = Path(database_url[len("sqlite:///") :])
        return db.with_name(db.name + ".dead-letter.jsonl")
    return _data_dir() / "dead-letter.jsonl"


class _Batch:
    """Records of one request, and the event its thread waits on until they are written."""

    def __init__(self, records: Sequence[DecisionRecord]) -> None:
        self.records = list(records)
        self.done = threading.Event()


class Recorder:
    """Writes decisions from a background thread, and makes each request wait until its own
    records are committed (or set aside): a decision a client is given survives the worker
    being killed right after.

    The waiting is a group commit: while one transaction is written, the records of every
    request that finishes meanwhile queue up and go into the next one, so a busy worker writes
    a few transactions a second, not one per request, and a quiet one adds one commit (well
    under a millisecond on SQLite) to a request.

    A batch that fails is tried again, then record by record: a record that cannot be written
    alone (or not within ``timeout`` seconds) goes to ``dead_letters`` with the reason, and
    never blocks or drops the records around it.
    """

    def __init__(self, store: DecisionStore, dead_letters: DeadLetters | None = None,
                 batch: int = 512, timeout: float = 10.0) -> None:
        self.store = store
        self.dead_letters = dead_letters or DeadLetters(default_dead_letter_path(store.url))
        self.batch = batch
        self.timeout = timeout
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="decision-recorder", daemon=True)
        self._thread.start()

    def record(self, records: Sequence[DecisionRecord]) -> None:
        """Return once ``records`` are in the log (or, failing that, in the dead-letter
        file)."""
        if not records:
            return
        pending = _Batch(records)
        if not self._thread.is_alive():
            self.dead_letters.add(pending.records, "the recorder has stopped")
            return
        self._queue.put(pending)
        if not pending.done.wait(self.timeout):
            # The database is stuck. The records go to the dead-letter file now; should the
            # stuck write still succeed, replaying them later skips what the log already has.
            self.dead_letters.add(pending.records, f"not written within {self.timeout:g} s")

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            taken = [first]
            count = len(first.records) if first is not None else 0
            while first is not None and count < self.batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                taken.append(more)
                if more is None:
                    break
                count += len(more.records)
            batches = [b for b in taken if b is not None]
            try:
                self._write([r for b in batches for r in b.records])
            except Exception:  # never let the thread die: every waiter must be released
                log.exception("the decision recorder failed")
            finally:
                for b in batches:
                    b.done.set()
            if any(b is None for b in taken):
                return

    def _write(self, records: list[DecisionRecord]) -> None:
        if not records:
            return
        for attempt in range(2):
            try:
                self.store.add_many(records)
                return
            except Exception as e:
                log.warning("writing %d decisions failed (%s)%s", len(records), e,
                            "; retrying" if attempt == 0 else "; writing them one by one")
                if attempt == 0:
                    time.sleep(0.1)
        for r in records:
            try:
                self.store.add_many([r])
            except Exception as e:
                self.dead_letters.add([r], f"{type(e).__name__}: {e}")

    def flush(self) -> None:
        """Wait until everything queued so far is written."""
        if not self._thread.is_alive():
            return
        marker = _Batch([])
        self._queue.put(marker)
        marker.done.wait()

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(self.timeout + 5)


def replay_dead_letters(store: DecisionStore, dead_letters: DeadLetters) -> tuple[int, int, int]:
    """Write the set-aside records into the log, skipping those it already has; the ones
    that still fail stay in the file. Returns (written, already there, still failing)."""
    written = present = 0
    failing: list[tuple[DecisionRecord, str]] = []
    for record, reason in dead_letters.read():
        if store.get(record.id) is not None:
            present += 1
            continue
        try:
            store.add_many([record])
            written += 1
        except Exception as e:
            failing.append((record, f"{type(e).__name__}: {e} (first: {reason})"))
    tmp = dead_letters.path.with_name(dead_letters.path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    rest = DeadLetters(tmp)
    for record, reason in failing:
        rest.add([record], reason)
    if failing:
        os.replace(tmp, dead_letters.path)
    else:
        dead_letters.path.unlink(missing_ok=True)
    return written, present, len(failing)
