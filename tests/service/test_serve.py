"""The real `moderation serve` (gunicorn, 2 workers, the tiny test architecture) on loopback:
multipart and JSON requests while valid and invalid policies are reloaded."""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import GREEN, HAND_POLICY, RED, TINY_ARCH, image_bytes

TOKEN = "integration-admin-token"
READER = "integration-reader-token"
MAX_REQUESTS = 400  # the load is bounded in count...
MAX_SECONDS = 60  # ...and in time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def policy(arch: Path, weapons_threshold: float) -> str:
    data = copy.deepcopy(HAND_POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "none", "config": str(arch)}
    data["categories"]["weapons"]["threshold"] = {"value": weapons_threshold}
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture
def server(tiny_arch_file: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(policy(tiny_arch_file, 0.5))
    port = free_port()
    env = dict(os.environ, MODERATION_ADMIN_TOKEN=TOKEN, MODERATION_READER_TOKEN=READER,
               MODERATION_CACHE_DIR=str(tmp_path / "cache"),
               MODERATION_DATABASE_URL=f"sqlite:///{tmp_path / 'decisions.sqlite3'}")
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "moderation.cli", "serve", "--policy", str(policy_path),
         "--port", str(port), "--workers", "2", "--threads", "4", "--random-weights"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail("server exited:\n" + (tmp_path / "server.log").read_text())
            try:
                if requests.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # workers still loading
                pass
            if time.monotonic() > deadline:
                pytest.fail("server not ready:\n" + (tmp_path / "server.log").read_text())
            time.sleep(0.3)
        yield base, policy_path
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


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
        policy_path.write_text(policy(tiny_arch_file, 0.9))
        r = reload(base)
        assert r.status_code == 200, r.text
        threshold_of[r.json()["version"]] = 0.9
        time.sleep(1.0)

        policy_path.write_text("name: broken\ncategories: {}\n")
        r = reload(base)
        assert r.status_code == 422
        assert "policy.yaml: model: missing key" in r.json()["error"]["faults"]
        time.sleep(1.0)

        policy_path.write_text(policy(tiny_arch_file, -0.9))
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
    deadline = time.monotonic() + 30
    while True:
        stored, cursor = {}, None
        while True:
            page = requests.get(f"{base}/v1/decisions", headers=headers, timeout=10,
                                params={"limit": 500, **({"cursor": cursor} if cursor else {})})
            assert page.status_code == 200, page.text
            for d in page.json()["decisions"]:
                stored[d["id"]] = (d["policy"]["version"], d["client_id"])
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
        if set(expected) <= set(stored) or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # recording is asynchronous: give the writers a moment
    assert {k: stored.get(k) for k in expected} == expected
    one = next(iter(expected))
    found = requests.get(f"{base}/v1/decisions/{one}", headers=headers, timeout=10).json()
    assert found["policy"]["version"] == expected[one][0]
