"""Connecting to the decision log and bringing its schema up to date.

One SQLAlchemy engine per process and URL: SQLite (``sqlite:///path``, WAL, so several
processes read while one writes) or PostgreSQL (``postgresql://…``, through psycopg).
Migrations are Alembic's (``decisionlog/migrations``), applied under a lock so that the
workers and replicas starting at once upgrade the schema once: a PostgreSQL advisory lock, or
a file lock beside a SQLite file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

__all__ = [
    "SchemaError", "connect", "data_dir", "default_database_url", "dispose_all",
    "head_revision", "migrate", "migration_lock", "revision_of",
]

_MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_KEY = 0x6D6F6465  # "mode": the advisory-lock key of this schema's migrations
_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


class SchemaError(RuntimeError):
    """The database cannot be used as a decision log (an unknown revision, pgvector
    missing, …); the message says what to do."""


def data_dir() -> Path:
    """``$XDG_DATA_HOME/moderation``, else ``~/.local/share/moderation``."""
    root = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(root) / "moderation"


def default_database_url() -> str:
    return f"sqlite:///{data_dir() / 'decisions.sqlite3'}"


def _sqlalchemy_url(url: str) -> str:
    if url.startswith("sqlite:///"):
        return url
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    raise ValueError(
        f"unsupported database URL {url!r}: use sqlite:///path/to/file.sqlite3 or "
        "postgresql://user:password@host:port/database"
    )


def connect(url: str) -> Engine:
    """The process's engine for ``url`` (created on first use). Raises ``ValueError`` for
    a URL that is neither SQLite nor PostgreSQL."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is not None:
            return engine
        target = _sqlalchemy_url(url)
        if target.startswith("sqlite"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(target, connect_args={"timeout": 30})
            _sqlite_transactions(engine)
        else:
            engine = sa.create_engine(
                target,
                pool_pre_ping=True,  # a restarted server: reconnect instead of failing once
                connect_args={"connect_timeout": 5},
            )
        _engines[url] = engine
        return engine


def dispose_all() -> None:
    """Close every pooled connection of this process and forget its engines: what a process
    that forks afterwards (gunicorn's master, once it has migrated) must do, since a
    connection carried across a fork is shared by two processes and breaks both."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def _sqlite_transactions(engine: Engine) -> None:
    """WAL, and transactions SQLAlchemy begins itself: a write transaction
    (``execution_options(immediate=True)``) takes the write lock at BEGIN, so two writers
    wait for each other instead of failing."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit BEGIN by the driver
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def _revisions() -> tuple[str, ...]:
    """The migrations' revisions, oldest first (read from their files once per process)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_config())
    return tuple(s.revision for s in script.walk_revisions())[::-1]


def head_revision() -> str:
    return _revisions()[-1]


def revision_of(engine: Engine) -> str | None:
    """The schema revision the database is at (``None``: no decision log yet, or one the
    first release wrote, which had no revisions)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def migration_lock(engine: Engine) -> Iterator[Connection]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": _LOCK_KEY})
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _LOCK_KEY})
                conn.commit()
        return
    import fcntl

    lock_path = f"{engine.url.database}.migrate-lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with engine.connect() as conn:
            yield conn
    finally:
        os.close(fd)  # closing releases the lock


def migrate(url: str, revision: str = "head") -> tuple[str | None, str]:
    """Bring the log at ``url`` to ``revision`` (default: the newest). Safe to call from
    every worker and replica at once: the first does the work, the others find it done.

    A log the first release created (its tables, no revision) is taken as revision 0001.
    Returns (revision before, revision after).
    """
    from alembic import command

    engine = connect(url)
    head = head_revision()
    if revision == "head" and _revision_or_none(engine) == head:
        return head, head  # the usual start: nothing to lock
    with migration_lock(engine) as conn:
        from alembic.runtime.migration import MigrationContext

        before = MigrationContext.configure(conn).get_current_revision()
        if before is None and sa.inspect(conn).has_table("decisions"):
            command.stamp(_config(conn), "0001")
            conn.commit()
        elif before is not None and before not in _revisions():
            raise SchemaError(
                f"the decision log is at schema revision {before!r}, which this release does "
                f"not know (its newest is {head!r}): it was written by a newer "
                "release; run that release, or a log of its own"
            )
        move = command.upgrade if _is_ahead(before, revision) else command.downgrade
        try:
            move(_config(conn), revision)
            conn.commit()
        except sa.exc.OperationalError as e:
            if "vector" in str(e) and engine.dialect.name == "postgresql":
                raise SchemaError(
                    "PostgreSQL has no pgvector extension (needed for the frame embeddings): "
                    "install it (e.g. Debian's postgresql-17-pgvector, or build it: "
                    "github.com/pgvector/pgvector), then start again"
                ) from e
            raise
        after = MigrationContext.configure(conn).get_current_revision()
        return before, after or revision


def _revision_or_none(engine: Engine) -> str | None:
    try:
        return revision_of(engine)
    except sa.exc.DBAPIError:
        return None


def _is_ahead(before: str | None, target: str) -> bool:
    """Whether reaching ``target`` from ``before`` is an upgrade."""
    if target == "head" or before is None:
        return True
    order = _revisions()
    return order.index(target) >= order.index(before)
