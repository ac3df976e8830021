"""Alembic migrations: a log the first release wrote is upgraded in place and keeps its rows;
workers starting at once migrate once; an older revision can be reached again."""

from __future__ import annotations

import base64
import json
import multiprocessing
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from decisionlog import DeadLetters, DecisionFilters, DecisionStore, replay_dead_letters
from decisionlog.database import connect, dispose_all, head_revision, migrate, revision_of

FIXTURES = Path(__file__).parent / "fixtures"
T0 = 1_790_000_000.0


def _first_release_log(url: str) -> list[dict[str, object]]:
    """Create the first release's tables (its own SQL, copied in the fixture) and write two
    decisions the way it did: a block with its embedding, and an error without one."""
    engine = connect(url)
    blob = "BYTEA" if engine.dialect.name == "postgresql" else "BLOB"
    schema = (FIXTURES / "first_release_schema.sql").read_text().replace("{blob}", blob)
    schema = "\n".join(line for line in schema.splitlines() if not line.startswith("--"))
    statements = [s for s in schema.split(";") if s.strip()]
    categories = {"weapons": {
        "score": 0.31, "similarity": 0.33, "threshold": 0.25, "review_from": None,
        "margin": 0.06, "flagged": True, "action": "block",
        "top_terms": [{"text": "a photo of a rifle", "similarity": 0.33}],
        "closest_exception": None, "frame": 0,
    }}
    rows = [
        {"id": "old-block", "created_at": T0, "hour": int(T0 // 3600), "client_id": "u1",
         "image_sha256": "ab" * 32, "image_size": 1234, "policy_name": "p",
         "policy_version": "v1", "model": "m", "profile": "default", "action": "block",
         "triggered": "weapons", "categories": json.dumps(categories), "latency_ms": 12.5,
         "error_code": None, "embedding": np.arange(8, dtype=np.float16).tobytes()},
        {"id": "old-error", "created_at": T0 + 1, "hour": int(T0 // 3600), "client_id": None,
         "image_sha256": "cd" * 32, "image_size": 7, "policy_name": "p",
         "policy_version": "v1", "model": "m", "profile": "default", "action": "error",
         "triggered": "", "categories": "{}", "latency_ms": 0.4,
         "error_code": "unsupported_format", "embedding": None},
    ]
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
        conn.execute(sa.text(
            "INSERT INTO decisions VALUES (:id, :created_at, :hour, :client_id, :image_sha256, "
            ":image_size, :policy_name, :policy_version, :model, :profile, :action, :triggered, "
            ":categories, :latency_ms, :error_code, :embedding)"), rows)
        conn.execute(sa.text(
            "INSERT INTO decision_flags VALUES ('old-block', :t, :h, 'v1', 'weapons', 'block')"
        ), {"t": T0, "h": int(T0 // 3600)})
    return rows


def test_a_first_release_log_is_upgraded_and_keeps_its_rows(url: str) -> None:
    _first_release_log(url)
    assert revision_of(connect(url)) is None  # no Alembic table: the first release's log
    store = DecisionStore(url)  # opening it migrates
    assert revision_of(store.engine) == head_revision()
    assert store.count() == 2
    block = store.get("old-block")
    assert block is not None
    assert block.action == "block" and block.flagged and block.triggered == ["weapons"]
    assert block.categories["weapons"].top_terms[0].text == "a photo of a rifle"
    assert block.image.sha256 == "ab" * 32 and block.policy.version == "v1"
    assert block.frames == [0] and block.frame is None  # the first release kept no index
    np.testing.assert_array_equal(store.embedding("old-block"), np.arange(8))
    error = store.get("old-error")
    assert error is not None and error.error_code == "unsupported_format"
    assert error.frames == [] and store.embedding("old-error") is None
    assert [b["total"] for b in store.stats(since=T0 - 1)] == [2]
    assert len(store.query(DecisionFilters(category="weapons"))[0]) == 1
    columns = {c["name"] for c in sa.inspect(store.engine).get_columns("decisions")}
    assert "embedding" not in columns and {"frame", "frames_scored"} <= columns


def test_a_dead_letter_the_first_release_set_aside_is_replayed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.sqlite3'}"
    line = {"reason": "database down", "failed_at": T0, "record": {
        "id": "r1", "created_at": T0, "client_id": "c", "image_sha256": "ef" * 32,
        "image_size": 9, "policy_name": "p", "policy_version": "v1", "model": "m",
        "profile": "default", "action": "allow", "triggered": [], "categories": {},
        "latency_ms": 3.0, "error_code": None,
        "embedding": base64.b64encode(np.ones(4, np.float16).tobytes()).decode(),
    }}
    dead = DeadLetters(tmp_path / "dead.jsonl")
    dead.path.write_text(json.dumps(line) + "\n")
    store = DecisionStore(url)
    assert replay_dead_letters(store, dead) == (1, 0, 0)
    np.testing.assert_array_equal(store.embedding("r1"), np.ones(4))


def _open(url: str) -> None:
    DecisionStore(url)


def test_workers_starting_at_once_migrate_once(url: str) -> None:
    _first_release_log(url)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_open, args=(url,)) for _ in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    store = DecisionStore(url)
    assert revision_of(store.engine) == head_revision() and store.count() == 2
    assert store.frame_embeddings("old-block") is not None


def test_down_to_the_first_revision_and_up_again(url: str) -> None:
    _first_release_log(url)
    DecisionStore(url)
    assert migrate(url, "0001") == (head_revision(), "0001")
    with connect(url).connect() as conn:
        blob = conn.execute(sa.text("SELECT embedding FROM decisions WHERE id = 'old-block'"))
        assert np.array_equal(np.frombuffer(bytes(blob.scalar_one()), np.float16), np.arange(8))
    store = DecisionStore(url)
    np.testing.assert_array_equal(store.embedding("old-block"), np.arange(8))
    assert store.count() == 2


def test_the_migrations_build_exactly_the_schema_the_code_queries(url: str) -> None:
    """Alembic's autogenerate comparison of the migrated database with decisionlog.tables
    finds nothing to change."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from decisionlog.tables import metadata

    migrate(url)
    with connect(url).connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []


def test_dispose_all_leaves_no_connection_to_fork_with(url: str) -> None:
    """gunicorn's master migrates, then forks: none of its connections may be inherited."""
    migrate(url)
    engine = connect(url)
    with engine.connect():
        pass
    assert engine.pool.checkedin() >= 1  # type: ignore[attr-defined]
    dispose_all()
    assert engine.pool.checkedin() == 0  # type: ignore[attr-defined]
    assert connect(url) is not engine  # a new engine, with connections of its own
