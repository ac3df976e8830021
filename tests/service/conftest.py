from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient

from moderation import Moderator
from moderation.policy import parse_policy
from service.app import create_app
from tests.conftest import HAND_POLICY, FakeEncoder

ADMIN = "admin-secret"
READER = "reader-secret"


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(HAND_POLICY, sort_keys=False))
    return path


@pytest.fixture
def make_app(fake_encoder: FakeEncoder, policy_path: Path) -> Callable[..., Flask]:
    def make(**config: Any) -> Flask:
        moderator = Moderator(parse_policy(policy_path.read_text()), fake_encoder)
        return create_app(
            {"POLICY": str(policy_path), "ADMIN_TOKEN": ADMIN, "READER_TOKEN": READER,
             "DATABASE_URL": f"sqlite:///{policy_path.parent / 'decisions.sqlite3'}", **config},
            moderator=moderator,
        )

    return make


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
