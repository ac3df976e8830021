"""The review loop through the real `moderation serve` (gunicorn, 2 workers, the tiny model
with random weights): uploads, every one queued (audit rate 1), two reviewers claiming at
once until the queue is empty, verdicts, /v1/quality, then `moderation calibrate
--from-reviews` on the server's log."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from click.testing import CliRunner

from moderation.cli import main
from tests.fakes import image_bytes
from tests.service.conftest import READER, Server

# starts a real server (gunicorn, nginx or Ray): left out of the quick loop
pytestmark = pytest.mark.server


def test_two_reviewers_empty_the_queue_and_calibration_reads_their_verdicts(
        start_server: Callable[..., Server], tmp_path: Path) -> None:
    server = start_server(MODERATION_REVIEWERS="ann:ann-token,bob:bob-token",
                          MODERATION_AUDIT_RATE="1")
    rng = np.random.default_rng(3)
    colours = [tuple(int(x) for x in rng.integers(0, 256, 3)) for _ in range(36)]
    for start in range(0, len(colours), 12):
        files = [("image", (f"{start + i}.png", image_bytes(c)))
                 for i, c in enumerate(colours[start:start + 12])]
        assert requests.post(f"{server.base}/v1/moderate", files=files,
                             timeout=60).status_code == 200
    taken: dict[str, list[int]] = {"ann": [], "bob": []}

    def review(name: str) -> None:
        headers = {"Authorization": f"Bearer {name}-token"}
        while True:
            claim = requests.post(f"{server.base}/v1/reviews/claim", headers=headers,
                                  timeout=30)
            if claim.status_code == 204:
                return
            item = claim.json()
            taken[name].append(item["item_id"])
            n = int(item["decision"]["client_id"].split(".")[0])
            answer = requests.post(f"{server.base}/v1/reviews/{item['item_id']}",
                                   headers=headers, timeout=30,
                                   json={"violations": ["weapons"] if n % 3 == 0 else []})
            assert answer.status_code == 201, answer.text

    reviewers = [threading.Thread(target=review, args=(n,)) for n in taken]
    for t in reviewers:
        t.start()
    for t in reviewers:
        t.join()
    every = Counter(taken["ann"] + taken["bob"])
    assert len(every) == len(colours) and set(every.values()) == {1}  # each item once
    assert taken["ann"] and taken["bob"]
    reader = {"Authorization": f"Bearer {READER}"}
    quality = requests.get(f"{server.base}/v1/quality", headers=reader, timeout=30).json()
    assert quality["verdicts"] == len(colours)
    recall = quality["categories"]["weapons"]["recall"]
    assert recall["verdicts"] == 12  # the images reviewers found violating weapons

    out, report = tmp_path / "calibrated.yaml", tmp_path / "report"
    result = CliRunner().invoke(main, [
        "calibrate", "--policy", str(server.policy_path), "--from-reviews",
        "--database-url", f"sqlite:///{server.database}", "--out", str(out),
        "--report", str(report), "--target-recall", "0.8", "--min-positives", "3",
        "--random-weights", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code in (0, 3), result.output  # alcohol: no verdict says it
    provenance = yaml.safe_load(out.read_text())["categories"]["weapons"]["threshold"][
        "provenance"]
    assert provenance["dataset"]["name"].startswith("reviews ")
    assert f": {len(colours)} verdicts (" in provenance["dataset"]["name"]
