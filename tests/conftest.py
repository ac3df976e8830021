"""Shared fixtures (as Flask's tutorial keeps them): a tiny real open_clip architecture, a
fake encoder with hand-made vectors, a PostgreSQL database, policy files. The fakes themselves
are in :mod:`tests.fakes`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakes import HAND_COLOURS, HAND_POLICY, HAND_TEXTS, TINY_ARCH, TINY_CONFIG, FakeEncoder


@pytest.fixture(autouse=True, scope="session")
def _hermetic_state(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches and the decision log go to temporary folders, never the user's home."""
    import os

    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data"))
    os.environ["MODERATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _own_decision_log(tmp_path_factory: pytest.TempPathFactory,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own default decision log (and so its own policy activations)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data")))


@pytest.fixture
def postgres_url() -> str:
    """A new, empty database on the test server (MODERATION_TEST_POSTGRES_URL: .ci/run
    starts PostgreSQL with pgvector); the test is skipped without one."""
    import os
    import uuid

    server = os.environ.get("MODERATION_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("MODERATION_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL)")
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def tiny_arch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture's JSON, registered with open_clip under :data:`TINY_ARCH`."""
    import open_clip

    path = tmp_path_factory.mktemp("arch") / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tiny_arch_file: Path) -> Any:
    from moderation.backends import RandomWeightsWarning
    from moderation.backends.torch import Encoder

    with pytest.warns(RandomWeightsWarning):
        return Encoder.load(TINY_ARCH, random_weights=True, batch_size=4)


@pytest.fixture
def write_policy(tmp_path: Path) -> Callable[..., Path]:
    """Write a policy dict (default: :data:`HAND_POLICY`) as YAML and return its path."""

    def write(data: dict[str, Any] | None = None, name: str = "policy.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data if data is not None else HAND_POLICY, sort_keys=False))
        return path

    return write


@pytest.fixture
def fake_encoder() -> FakeEncoder:
    return FakeEncoder(dict(HAND_TEXTS), dict(HAND_COLOURS))
