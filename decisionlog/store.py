"""The decision log: every moderation result with its policy version, never the image.

SQLite (WAL: several gunicorn workers can write at once) by default, PostgreSQL for several
replicas, chosen by a database URL. One SQL text serves both: ``?`` placeholders become
``%s`` for PostgreSQL, and time buckets are integer columns written at insert time, so no
date function differs between the two.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moderation import ModerationResult

log = logging.getLogger(__name__)

__all__ = [
    "DeadLetters",
    "DecisionRecord",
    "DecisionStore",
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

    try:
        return float(value)
    except ValueError:
        pass
    age = re.fullmatch(r"(\d+(?:\.\d+)?)([mhd])", value.strip())
    if age:
        seconds = float(age.group(1)) * {"m": 60, "h": 3600, "d": 86400}[age.group(2)]
        return (time.time() if now is None else now) - seconds
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
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
class DecisionRecord:
    """One stored decision. ``categories`` holds, per category, what the response said
    (score, similarity, threshold, margin, flagged, action, top terms); ``embedding`` is the
    decided frame's image embedding as float16 bytes (for re-scoring under a new policy)."""

    id: str
    created_at: float
    client_id: str | None
    image_sha256: str
    image_size: int
    policy_name: str
    policy_version: str
    model: str
    profile: str
    action: str  # allow | flag | review | block | error
    triggered: list[str]
    categories: dict[str, Any]
    latency_ms: float
    error_code: str | None = None
    embedding: bytes | None = None

    @classmethod
    def from_result(
        cls,
        result: ModerationResult,
        *,
        image_sha256: str,
        image_size: int,
        latency_ms: float,
        created_at: float | None = None,
        as_dict: dict[str, Any] | None = None,
    ) -> DecisionRecord:
        """``as_dict``: ``result.to_dict()`` when the caller has it already."""
        d = as_dict if as_dict is not None else result.to_dict()
        decision = result.decision
        embedding = (
            np.asarray(result.embedding, dtype=np.float16).tobytes()
            if result.embedding is not None
            else None
        )
        return cls(
            id=uuid.uuid4().hex,
            created_at=time.time() if created_at is None else created_at,
            client_id=result.id,
            image_sha256=image_sha256,
            image_size=image_size,
            policy_name=result.policy,
            policy_version=result.policy_version,
            model=result.model,
            profile=result.profile,
            action=decision.action.value if decision is not None else "error",
            triggered=list(decision.triggered) if decision is not None else [],
            categories=d.get("categories", {}),
            latency_ms=latency_ms,
            error_code=result.error.code if result.error is not None else None,
            embedding=embedding,
        )


_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS decisions (
        id TEXT PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL,
        hour INTEGER NOT NULL,
        client_id TEXT,
        image_sha256 TEXT NOT NULL,
        image_size INTEGER NOT NULL,
        policy_name TEXT NOT NULL,
        policy_version TEXT NOT NULL,
        model TEXT NOT NULL,
        profile TEXT NOT NULL,
        action TEXT NOT NULL,
        triggered TEXT NOT NULL,
        categories TEXT NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        error_code TEXT,
        embedding {blob}
    )""",
    "CREATE INDEX IF NOT EXISTS decisions_time ON decisions (created_at, id)",
    "CREATE INDEX IF NOT EXISTS decisions_version ON decisions (policy_version, created_at)",
    "CREATE INDEX IF NOT EXISTS decisions_client ON decisions (client_id, created_at)",
    """CREATE TABLE IF NOT EXISTS decision_flags (
        decision_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        hour INTEGER NOT NULL,
        policy_version TEXT NOT NULL,
        category TEXT NOT NULL,
        action TEXT NOT NULL,
        PRIMARY KEY (decision_id, category)
    )""",
    "CREATE INDEX IF NOT EXISTS flags_time ON decision_flags (created_at)",
    "CREATE INDEX IF NOT EXISTS flags_category ON decision_flags (category, created_at)",
]

_COLUMNS = (
    "id, created_at, hour, client_id, image_sha256, image_size, policy_name, policy_version, "
    "model, profile, action, triggered, categories, latency_ms, error_code"
)


class DecisionStore:
    """Read and write the decision log. One connection per thread; safe across processes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()
        if url.startswith("sqlite:///"):
            self.dialect = "sqlite"
            self._path = Path(url[len("sqlite:///") :])
            self._path.parent.mkdir(parents=True, exist_ok=True)
        elif url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
        else:
            raise ValueError(
                f"unsupported database URL {url!r}: use sqlite:///path/to/file.sqlite3 or "
                "postgresql://user:password@host:port/database"
            )
        blob = "BLOB" if self.dialect == "sqlite" else "BYTEA"
        with self._transaction() as cur:
            for statement in _SCHEMA:
                cur.execute(statement.format(blob=blob))

    # --- connections ---------------------------------------------------------------------

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.dialect == "sqlite":
                conn = sqlite3.connect(self._path, timeout=30, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            else:
                import psycopg

                conn = psycopg.connect(self.url, autocommit=True)
            self._local.conn = conn
        return conn

    def _sql(self, statement: str) -> str:
        return statement if self.dialect == "sqlite" else statement.replace("?", "%s")

    class _Tx:
        def __init__(self, store: DecisionStore) -> None:
            self.store = store

        def __enter__(self) -> Any:
            conn = self.store._connection()
            self.cur = conn.cursor()
            self.cur.execute("BEGIN IMMEDIATE" if self.store.dialect == "sqlite" else "BEGIN")
            return _Cursor(self.cur, self.store)

        def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
            self.cur.execute("COMMIT" if kind is None else "ROLLBACK")
            self.cur.close()

    def _transaction(self) -> DecisionStore._Tx:
        return DecisionStore._Tx(self)

    def _query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self._connection().cursor()
        try:
            cur.execute(self._sql(statement), tuple(params))
            return list(cur.fetchall())
        finally:
            cur.close()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- writing -------------------------------------------------------------------------

    def add_many(self, records: Sequence[DecisionRecord]) -> None:
        """Insert ``records`` in one transaction (all or none)."""
        if not records:
            return
        rows, flags = [], []
        for r in records:
            hour = int(r.created_at // 3600)
            rows.append((
                r.id, r.created_at, hour, r.client_id, r.image_sha256, r.image_size,
                r.policy_name, r.policy_version, r.model, r.profile, r.action,
                ",".join(r.triggered), json.dumps(r.categories), r.latency_ms, r.error_code,
                r.embedding,
            ))
            for category in r.triggered:
                action = r.categories.get(category, {}).get("action", r.action)
                flags.append((r.id, r.created_at, hour, r.policy_version, category, action))
        with self._transaction() as cur:
            cur.executemany(
                f"INSERT INTO decisions ({_COLUMNS}, embedding) VALUES "
                f"({', '.join('?' * 16)})",
                rows,
            )
            if flags:
                cur.executemany(
                    "INSERT INTO decision_flags (decision_id, created_at, hour, policy_version, "
                    "category, action) VALUES (?, ?, ?, ?, ?, ?)",
                    flags,
                )

    def purge(self, older_than: float) -> int:
        """Delete decisions created before the unix time ``older_than``; returns how many."""
        with self._transaction() as cur:
            cur.execute("DELETE FROM decision_flags WHERE created_at < ?", (older_than,))
            cur.execute("DELETE FROM decisions WHERE created_at < ?", (older_than,))
            return int(cur.rowcount)

    # --- reading -------------------------------------------------------------------------

    @staticmethod
    def _record(row: tuple[Any, ...]) -> dict[str, Any]:
        (id_, created_at, _hour, client_id, sha, size, policy_name, policy_version, model,
         profile, action, triggered, categories, latency_ms, error_code) = row
        return {
            "id": id_,
            "created_at": created_at,
            "client_id": client_id,
            "image": {"sha256": sha, "size": size},
            "policy": {"name": policy_name, "version": policy_version},
            "model": model,
            "profile": profile,
            "action": action,
            "flagged": action not in ("allow", "error"),
            "triggered": [c for c in triggered.split(",") if c],
            "categories": json.loads(categories),
            "latency_ms": latency_ms,
            "error_code": error_code,
        }

    def get(self, decision_id: str) -> dict[str, Any] | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM decisions WHERE id = ?", (decision_id,))
        return self._record(rows[0]) if rows else None

    def embedding(self, decision_id: str) -> np.ndarray | None:
        """The stored image embedding (float32, shape (dim,)), for re-scoring."""
        rows = self._query("SELECT embedding FROM decisions WHERE id = ?", (decision_id,))
        if not rows or rows[0][0] is None:
            return None
        return np.frombuffer(bytes(rows[0][0]), dtype=np.float16).astype(np.float32)

    def query(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        action: str | None = None,
        category: str | None = None,
        policy_version: str | None = None,
        client_id: str | None = None,
        flagged: bool | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first. Returns a page and the cursor of the next one (``None``: no more)."""
        where, params = self._filters(since, until, action, policy_version, client_id)
        if flagged is not None:
            where.append(("" if flagged else "NOT ") + "action IN ('flag', 'review', 'block')")
        if category is not None:
            where.append("id IN (SELECT decision_id FROM decision_flags WHERE category = ?)")
            params.append(category)
        if cursor is not None:
            created_at, last_id = decode_cursor(cursor)
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [created_at, created_at, last_id]
        sql = f"SELECT {_COLUMNS} FROM decisions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        rows = self._query(sql, [*params, limit + 1])
        page = [self._record(r) for r in rows[:limit]]
        next_cursor = (
            encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
        )
        return page, next_cursor

    @staticmethod
    def _filters(
        since: float | None,
        until: float | None,
        action: str | None,
        policy_version: str | None,
        client_id: str | None,
    ) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("created_at >= ?", since),
            ("created_at < ?", until),
            ("action = ?", action),
            ("policy_version = ?", policy_version),
            ("client_id = ?", client_id),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        return where, params

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
        where, params = self._filters(since, until, None, policy_version, None)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        totals = self._query(
            f"SELECT hour / {width}, policy_version, action, COUNT(*) FROM decisions{clause} "
            f"GROUP BY hour / {width}, policy_version, action",
            params,
        )
        flags = self._query(
            f"SELECT hour / {width}, policy_version, category, COUNT(*) FROM decision_flags"
            f"{clause} GROUP BY hour / {width}, policy_version, category",
            params,
        )
        buckets: dict[tuple[int, str], dict[str, Any]] = {}
        for b, version, action, n in totals:
            entry = buckets.setdefault(
                (int(b), version),
                {"start": int(b) * width * 3600, "policy_version": version, "total": 0,
                 "actions": {}, "categories": {}},
            )
            entry["total"] += int(n)
            entry["actions"][action] = int(n)
        for b, version, category, n in flags:
            if (int(b), version) in buckets:
                buckets[int(b), version]["categories"][category] = {"flagged": int(n)}
        for entry in buckets.values():
            for counts in entry["categories"].values():
                counts["rate"] = counts["flagged"] / entry["total"]
        return [buckets[k] for k in sorted(buckets, key=lambda k: (k[0], k[1]))]

    def export(self, since: float | None = None, until: float | None = None
               ) -> Iterator[dict[str, Any]]:
        """Every decision in the range, oldest first, page by page."""
        where, params = self._filters(since, until, None, None, None)
        last: tuple[float, str] | None = None
        while True:
            page_where, page_params = list(where), list(params)
            if last is not None:
                page_where.append("(created_at > ? OR (created_at = ? AND id > ?))")
                page_params += [last[0], last[0], last[1]]
            sql = f"SELECT {_COLUMNS} FROM decisions"
            if page_where:
                sql += " WHERE " + " AND ".join(page_where)
            rows = self._query(sql + " ORDER BY created_at, id LIMIT 1000", page_params)
            if not rows:
                return
            for row in rows:
                yield self._record(row)
            last = (rows[-1][1], rows[-1][0])

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM decisions")[0][0])


class _Cursor:
    """A DB-API cursor that takes ``?`` placeholders in either dialect."""

    def __init__(self, cur: Any, store: DecisionStore) -> None:
        self.cur, self.store = cur, store

    def execute(self, statement: str, params: Sequence[Any] = ()) -> None:
        self.cur.execute(self.store._sql(statement), tuple(params))

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        self.cur.executemany(self.store._sql(statement), rows)

    @property
    def rowcount(self) -> int:
        return int(self.cur.rowcount)


def encode_cursor(created_at: float, decision_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, decision_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, decision_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(created_at), str(decision_id)
    except (ValueError, TypeError) as e:
        raise ValueError(f"invalid cursor {cursor!r}: pass next_cursor as it was given") from e


class DeadLetters:
    """Records the log could not take, set aside with the reason: one JSON line each,
    appended and fsync'ed, so that a decision a client was given is never lost.
    ``moderation decisions replay`` writes them into the log once it can take them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def add(self, records: Sequence[DecisionRecord], reason: str) -> None:
        lines = "".join(
            json.dumps({"reason": reason, "failed_at": time.time(), "record": record_to_json(r)})
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
                    out.append((record_from_json(entry["record"]), str(entry["reason"])))
        return out


def default_dead_letter_path(database_url: str) -> Path:
    """Beside a SQLite log; under the data folder for PostgreSQL."""
    if database_url.startswith("sqlite:///"):
        db = Path(database_url[len("sqlite:///") :])
        return db.with_name(db.name + ".dead-letter.jsonl")
    return _data_dir() / "dead-letter.jsonl"


def record_to_json(r: DecisionRecord) -> dict[str, Any]:
    out = dict(r.__dict__)
    out["embedding"] = base64.b64encode(r.embedding).decode() if r.embedding else None
    return out


def record_from_json(d: dict[str, Any]) -> DecisionRecord:
    d = dict(d)
    d["embedding"] = base64.b64decode(d["embedding"]) if d.get("embedding") else None
    return DecisionRecord(**d)


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
