"""The real `moderation serve` (gunicorn, 2 workers, the tiny test architecture) on loopback:
multipart and JSON requests while valid and invalid policies are reloaded."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.fakes import GREEN, RED, image_bytes
from tests.service.conftest import READER, TOKEN, tiny_policy_text

# starts a real server (gunicorn, nginx or Ray): left out of the quick loop
pytestmark = pytest.mark.server

MAX_REQUESTS = 400  # the load is bounded in count...
MAX_SECONDS = 60  # ...and in time


def reload(base: str) -> requests.Response:
    return requests.post(f"{base}/v1/policy/reload",
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


def test_reloads_under_load_drop_nothing(server: tuple[str, Path], tiny_arch_file: Path) -> None:
    base, policy_path = server
    red, green = image_bytes(RED, "JPEG", size=(320, 240)), image_bytes(GREEN)
    threshold_of = {requests.get(f"{base}/v1/policy", timeout=10).json()["version"]: 0.5}
    responses: list[tuple[int, dict[str, Any]]] = []
    failures: list[str] = []
    stop = threading.Event()
    started = time.monotonic()
    lock = threading.Lock()

    def client(n: int) -> None:
        session = requests.Session()
        while not stop.is_set() and time.monotonic() - started < MAX_SECONDS:
            with lock:
                if len(responses) + len(failures) >= MAX_REQUESTS:
                    return
            try:
                if n % 2:
                    r = session.post(f"{base}/v1/moderate", timeout=30,
                                     files=[("image", ("r.jpg", red)), ("image", ("g.png", green))],
                                     data={"id": ["r", "g"]})
                else:
                    r = session.post(f"{base}/v1/moderate", timeout=30, json={"images": [
                        {"id": "r", "data": base64.b64encode(red).decode()}]})
                with lock:
                    responses.append((r.status_code, r.json()))
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                with lock:
                    failures.append(repr(e))

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for c in clients:
        c.start()
    try:
        time.sleep(1.0)
        policy_path.write_text(tiny_policy_text(tiny_arch_file, 0.9))
        r = reload(base)
        assert r.status_code == 200, r.text
        threshold_of[r.json()["version"]] = 0.9
        time.sleep(1.0)

        policy_path.write_text("name: broken\ncategories: {}\n")
        r = reload(base)
        assert r.status_code == 422
        assert "policy.yaml: model: missing key" in r.json()["error"]["faults"]
        time.sleep(1.0)

        policy_path.write_text(tiny_policy_text(tiny_arch_file, -0.9))
        r = reload(base)
        assert r.status_code == 200, r.text
        final = r.json()["version"]
        threshold_of[final] = -0.9
        time.sleep(1.0)
    finally:
        stop.set()
        for c in clients:
            c.join(MAX_SECONDS)

    assert not failures, failures[:5]
    assert len(responses) >= 20
    assert {status for status, _ in responses} == {200}
    seen = set()
    for _, body in responses:
        version = body["policy"]["version"]
        seen.add(version)
        assert version in threshold_of, json.dumps(body)[:300]
        for result in body["results"]:
            # the decision was made with that version's thresholds
            assert result["categories"]["weapons"]["threshold"] == threshold_of[version]
    assert len(seen) >= 2

    # after the last reload every worker serves the final policy
    for _ in range(10):
        body = requests.post(f"{base}/v1/moderate", timeout=30,
                             files=[("image", ("g.png", green))]).json()
        assert body["policy"]["version"] == final
        assert body["results"][0]["categories"]["weapons"]["action"] == "block"

    metrics = requests.get(f"{base}/metrics", timeout=10).text
    assert "moderation_images_total" in metrics

    # every decision was recorded, by whichever worker made it, with its policy version
    headers = {"Authorization": f"Bearer {READER}"}
    expected = {r["decision_id"]: (body["policy"]["version"], r["id"])
                for _, body in responses for r in body["results"]}
    stored, cursor = {}, None  # no waiting: a decision is committed before it is answered
    while True:
        page = requests.get(f"{base}/v1/decisions", headers=headers, timeout=10,
                            params={"limit": 500, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        for d in page.json()["decisions"]:
            stored[d["id"]] = (d["policy"]["version"], d["client_id"])
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert {k: stored.get(k) for k in expected} == expected
    one = next(iter(expected))
    found = requests.get(f"{base}/v1/decisions/{one}", headers=headers, timeout=10).json()
    assert found["policy"]["version"] == expected[one][0]
