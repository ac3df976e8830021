"""Through the real app (the tiny model loaded from a policy): the same decisions, scores
within 1e-5, with batching and tracing on as with both off, under concurrent requests."""

from __future__ import annotations

import copy
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from service.app import create_app
from tests.fakes import HAND_POLICY, TINY_ARCH


@pytest.fixture
def tiny_policy(tiny_arch_file: Path, tmp_path: Path) -> Path:
    data = copy.deepcopy(HAND_POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "none", "config": str(tiny_arch_file)}
    # thresholds near the tiny model's scores, so that flags differ between images
    data["categories"]["weapons"]["threshold"] = {"value": -0.09, "review_from": -0.11}
    data["categories"]["alcohol"]["threshold"] = {"value": -0.08}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def run(app: Any, uploads: list[bytes]) -> list[dict[str, Any]]:
    def post(data: bytes) -> dict[str, Any]:
        r = app.test_client().post("/v1/moderate",
                                   data={"image": [(io.BytesIO(data), "x.jpg")]})
        assert r.status_code == 200, r.get_json()
        return r.get_json()["results"][0]

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(post, uploads))


def test_batching_and_tracing_change_no_decision(tiny_policy: Path, tmp_path: Path) -> None:
    common = {"POLICY": str(tiny_policy), "RANDOM_WEIGHTS": True,
              "CACHE_DIR": str(tmp_path / "cache"), "ADMIN_TOKEN": None}
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        plain = create_app({**common, "BATCH_MAX": 1, "TRACE": False})
        batched = create_app({**common, "BATCH_MAX": 16, "BATCH_MAX_WAIT_MS": 50, "TRACE": True})
    uploads = [jpeg(i) for i in range(24)]
    expected, got = run(plain, uploads), run(batched, uploads)
    actions = set()
    for e, g in zip(expected, got, strict=True):
        assert g["action"] == e["action"] and g["triggered"] == e["triggered"]
        actions.add(e["action"])
        for cid, category in e["categories"].items():
            assert g["categories"][cid]["flagged"] == category["flagged"]
            assert g["categories"][cid]["score"] == pytest.approx(category["score"], abs=1e-5)
    assert {"allow", "block"} <= actions  # the comparison covers several outcomes
