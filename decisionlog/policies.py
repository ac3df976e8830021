"""The active policy lives in the log: the full text of every policy that became active
(``policy_versions``), when each became active (``policy_activations``), and the text
embeddings every replica shares (``text_embeddings``).

A reload records an activation; every worker of every replica sharing the database polls
:meth:`PolicyLog.latest_id` (one indexed read) and follows it. The same mechanism serves the
workers of one machine on SQLite and ten replicas on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from moderation.prompts import EmbeddingCache, VectorCache

from .database import connect, migrate
from .tables import policy_activations, policy_versions, text_embeddings

__all__ = ["Activation", "PolicyLog", "PolicyText", "SharedEmbeddingCache"]

_LOCK_KEY = 0x706F6C69  # "poli": serializes activations on PostgreSQL


@dataclass(frozen=True)
class Activation:
    id: int
    version: str
    name: str
    activated_at: float
    reason: str
    host: str


@dataclass(frozen=True)
class PolicyText:
    version: str
    name: str
    source: str
    text: str
    created_at: float


def _activation(row: sa.Row[Any]) -> Activation:
    return Activation(int(row.id), row.version, row.name, float(row.activated_at), row.reason,
                      row.host)


class PolicyLog:
    """Policy versions and activations in the decision log at ``url``."""

    def __init__(self, url: str, *, migrate_schema: bool = True) -> None:
        self.url = url
        self.engine = connect(url)
        if migrate_schema:
            migrate(url)

    def activate(self, *, version: str, name: str, source: str, text: str,
                 reason: str = "reload") -> Activation:
        """Record ``text`` under ``version`` (each distinct text once: a version is a hash
        of what decides, so an edit of comments keeps it) and make it the latest activation."""
        with self._serialized() as conn:
            return self._activate(conn, version, name, source, text, reason)

    def start(self, *, version: str, name: str, source: str,
              text: str) -> tuple[Activation, bool]:
        """What a starting server serves: its policy file when the log has never had that
        version (activated now), else the latest activation (a stale copy of the file does
        not undo a reload made elsewhere). Workers and replicas starting at once agree: the
        decision is made under a lock, so the file is activated once. Returns the activation
        to serve, and whether it is the file's, made now."""
        with self._serialized() as conn:
            latest = conn.execute(self._newest_first().limit(1)).first()
            known = conn.execute(
                sa.select(policy_versions.c.version).where(policy_versions.c.version == version)
            ).first()
            if latest is not None and known is not None:
                return _activation(latest), False
            return self._activate(conn, version, name, source, text, "start"), True

    @contextlib.contextmanager
    def _serialized(self) -> Iterator[sa.Connection]:
        """A write transaction that one process at a time holds (SQLite: BEGIN IMMEDIATE;
        PostgreSQL: a transaction-scoped advisory lock)."""
        with self.engine.execution_options(immediate=True).begin() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            yield conn

    def _activate(self, conn: sa.Connection, version: str, name: str, source: str, text: str,
                  reason: str) -> Activation:
        now = time.time()
        host = socket.gethostname()
        digest = hashlib.sha256(text.encode()).hexdigest()
        v = policy_versions
        known = conn.execute(
            sa.select(v.c.version).where(v.c.version == version, v.c.digest == digest)
        ).first()
        if known is None:
            conn.execute(v.insert().values(
                version=version, digest=digest, name=name, source=source, text=text,
                created_at=now,
            ))
        new_id = conn.execute(
            policy_activations.insert()
            .values(version=version, digest=digest, activated_at=now, reason=reason,
                    host=host)
            .returning(policy_activations.c.id)
        ).scalar_one()
        return Activation(int(new_id), version, name, now, reason, host)

    def latest_id(self) -> int | None:
        """The id of the latest activation (``None``: nothing was ever activated)."""
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(sa.func.max(policy_activations.c.id))).scalar()
        return None if found is None else int(found)

    @staticmethod
    def _newest_first() -> sa.Select[tuple[int, str, str, float, str, str]]:
        a, v = policy_activations, policy_versions
        return (
            sa.select(a.c.id, a.c.version, v.c.name, a.c.activated_at, a.c.reason, a.c.host)
            .join(v, sa.and_(v.c.version == a.c.version, v.c.digest == a.c.digest))
            .order_by(a.c.id.desc())
        )

    def latest(self) -> Activation | None:
        newest = self.history(limit=1)
        return newest[0] if newest else None

    def history(self, limit: int = 100) -> list[Activation]:
        """Activations, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(self._newest_first().limit(limit)).all()
        return [_activation(row) for row in rows]

    def text(self, version: str) -> PolicyText | None:
        """The text ``version`` was last activated with."""
        a, v = policy_activations, policy_versions
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(v.c.version, v.c.name, v.c.source, v.c.text, v.c.created_at)
                .join(a, sa.and_(v.c.version == a.c.version, v.c.digest == a.c.digest))
                .where(v.c.version == version)
                .order_by(a.c.id.desc())
                .limit(1)
            ).first()
        return PolicyText(*row) if row is not None else None


class SharedEmbeddingCache:
    """Text embeddings in the log, in front of a process-local cache (``local``, e.g. the
    core's folder cache): what one replica encoded, the others read instead of encoding.
    Implements the core's ``VectorCache`` protocol (``get``, ``put``)."""

    def __init__(self, url: str, local: VectorCache | None = None) -> None:
        self.engine = connect(url)
        self.local = local

    @classmethod
    def with_folder(cls, url: str, cache_dir: str | Path | None = None
                    ) -> SharedEmbeddingCache:
        """In front of the core's folder cache under ``cache_dir``/embeddings (default: the
        core's default folder), as the service and the commands use it."""
        return cls(url, EmbeddingCache(Path(cache_dir) / "embeddings" if cache_dir else None))

    @staticmethod
    def _digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def get(self, model: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, np.ndarray] = (
            self.local.get(model, keys) if self.local is not None else {}
        )
        missing = {self._digest(k): k for k in keys if k not in found}
        if not missing:
            return found
        t = text_embeddings
        fetched: dict[str, np.ndarray] = {}
        with self.engine.connect() as conn:
            digests = list(missing)
            for start in range(0, len(digests), 500):
                for digest, blob in conn.execute(
                    sa.select(t.c.digest, t.c.vector)
                    .where(t.c.model == model, t.c.digest.in_(digests[start:start + 500]))
                ):
                    fetched[missing[digest]] = np.frombuffer(bytes(blob), dtype=np.float32)
        if fetched and self.local is not None:
            self.local.put(model, fetched)
        found.update(fetched)
        return found

    def put(self, model: str, vectors: dict[str, np.ndarray]) -> None:
        if self.local is not None:
            self.local.put(model, vectors)
        if not vectors:
            return
        rows = {
            self._digest(k): np.asarray(v, dtype=np.float32).tobytes()
            for k, v in vectors.items()
        }
        try:
            self._insert_missing(model, rows)
        except sa.exc.IntegrityError:  # another replica wrote the same vectors meanwhile
            pass

    def _insert_missing(self, model: str, rows: dict[str, bytes]) -> None:
        t = text_embeddings
        with self.engine.execution_options(immediate=True).begin() as conn:
            present = {
                d for (d,) in conn.execute(
                    sa.select(t.c.digest).where(t.c.model == model, t.c.digest.in_(list(rows)))
                )
            }
            fresh = [
                {"model": model, "digest": d, "vector": blob}
                for d, blob in rows.items() if d not in present
            ]
            if fresh:
                conn.execute(t.insert(), fresh)

    def close(self) -> None:
        """Nothing to release: the engine is the process's."""
