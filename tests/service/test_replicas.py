"""Two replicas (two `moderation serve`, each with its own port, workers, policy file and
text-embedding folder, as on two machines) sharing one PostgreSQL log: a reload on one is
served by every worker of the other within 2 seconds, and both list the same history with
each version's text, byte for byte."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from tests.fakes import RED, image_bytes

from .conftest import READER, TOKEN, Server

# starts a real server (gunicorn, nginx or Ray): left out of the quick loop
pytestmark = pytest.mark.server


def _version(base: str) -> str:
    r = requests.post(f"{base}/v1/moderate", files={"image": ("r.png", image_bytes(RED))},
                      timeout=30)
    assert r.status_code == 200, r.text
    version: str = r.json()["policy"]["version"]
    return version


def _history(base: str) -> list[dict[str, object]]:
    r = requests.get(f"{base}/v1/policy/versions",
                     headers={"Authorization": f"Bearer {READER}"}, timeout=10)
    assert r.status_code == 200, r.text
    versions: list[dict[str, object]] = r.json()["versions"]
    return versions


def test_a_reload_on_one_replica_reaches_the_other(
    start_server: Callable[..., Server], postgres_url: str
) -> None:
    a = start_server(workers=2, MODERATION_DATABASE_URL=postgres_url)
    b = start_server(workers=2, MODERATION_DATABASE_URL=postgres_url)
    first = _version(a.base)
    assert _version(b.base) == first  # b's copy of the file is the same: no new activation

    data = yaml.safe_load(a.policy_path.read_text())
    data["categories"]["weapons"]["terms"].append("a crossbow")
    edited = "# edited on replica a only\n" + yaml.safe_dump(data, sort_keys=False)
    a.policy_path.write_bytes(edited.encode())
    r = requests.post(f"{a.base}/v1/policy/reload",
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert r.status_code == 200, r.text
    new = r.json()["version"]
    assert new != first
    answered = time.monotonic()

    # every worker of b: requests at once, until all of them answer with the new version
    with ThreadPoolExecutor(8) as pool:
        while True:
            seen = set(pool.map(lambda _: _version(b.base), range(8)))
            if seen == {new}:
                break
            assert time.monotonic() - answered < 2, f"b still serves {seen} after 2 s"
    assert time.monotonic() - answered < 2
    assert b.policy_path.read_text() != edited  # b's own file never changed

    for base in (a.base, b.base):
        history = _history(base)
        assert [(v["version"], v["reason"]) for v in history] == [
            (new, "reload"), (first, "start")]
        assert all(v["name"] == "hand" and isinstance(v["activated_at"], float)
                   for v in history)
        r = requests.get(f"{base}/v1/policy/versions/{new}",
                         headers={"Authorization": f"Bearer {READER}"}, timeout=10)
        assert r.status_code == 200 and r.json()["text"] == edited
        raw = requests.get(f"{base}/v1/policy/versions/{new}", timeout=10, headers={
            "Authorization": f"Bearer {READER}", "Accept": "application/yaml"})
        assert raw.content == a.policy_path.read_bytes()
        assert raw.headers["Content-Type"].startswith("application/yaml")
