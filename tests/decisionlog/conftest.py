"""Decision-log fixtures: every store test runs on SQLite and on PostgreSQL (with pgvector;
skipped when no test server is given), each in a database of its own."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'decisions.sqlite3'}"
    found: str = request.getfixturevalue("postgres_url")
    return found
