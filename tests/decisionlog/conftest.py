"""Decision-log fixtures: every store test runs on SQLite and on PostgreSQL (with pgvector;
skipped when no test server is given), each in a database of its own."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from decisionlog import DecisionRecord, DecisionStore
from tests.fakes import FakeEncoder

MODEL = FakeEncoder.identity


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'decisions.sqlite3'}"
    found: str = request.getfixturevalue("postgres_url")
    return found


def put(store: DecisionStore, images: Sequence[np.ndarray], *, at: float | None = None,
        model: str = MODEL, profile: str = "default", frames: Sequence[int] | None = None,
        error: bool = False, stored: bool = True, action: str = "allow",
        triggered: Sequence[str] = (), version: str = "v",
        client_ids: Sequence[str] | None = None) -> list[str]:
    """Store one decision per image (ndarray of shape (frames, dim)), a millisecond apart
    from ``at``; returns their ids. ``triggered`` categories get one top term each, named
    ``<category> term``."""
    at = time.time() - 3600 if at is None else at
    records = []
    for i, vectors in enumerate(images):
        indices = list(frames) if frames is not None else list(range(len(vectors)))
        records.append(DecisionRecord(
            id=uuid.uuid4().hex, created_at=at + i * 1e-3,
            client_id=client_ids[i] if client_ids is not None else f"client-{i}",
            image={"sha256": "0" * 64, "size": 10}, policy={"name": "hand", "version": version},
            model=model, profile=profile, action="error" if error else action,
            triggered=[] if error else list(triggered),
            categories={} if error else {c: {
                "score": 0.3, "similarity": 0.3, "threshold": 0.2, "margin": 0.1,
                "flagged": True, "action": action, "frame": indices[0],
                "top_terms": [{"text": f"{c} term", "similarity": 0.3}],
            } for c in triggered},
            latency_ms=1.0, error_code="undecodable" if error else None,
            frame=None if error else indices[0], frames_scored=len(indices),
            frames=indices if stored and not error else [],
            embeddings=np.asarray(vectors, np.float16) if stored and not error else None,
        ))
    store.add_many(records)
    return [r.id for r in records]


@pytest.fixture
def store(url: str) -> DecisionStore:
    return DecisionStore(url)
