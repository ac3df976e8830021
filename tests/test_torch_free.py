"""The serving install without torch: a fresh virtual environment with only
``pip install -e '.[onnx]'`` runs the README's main job (a scan of a folder) and serves, on a
model exported here (the tiny test architecture), with the torch backend's scores.

Slow (a venv and an install): runs where MODERATION_TEST_TORCH_FREE=1 (.ci/services sets
it), skipped elsewhere."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from moderation import EncoderSpec, Moderator
from moderation.backends.torch import Encoder, export_onnx
from tests.fakes import HAND_POLICY, TINY_ARCH

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.server, pytest.mark.skipif(
    os.environ.get("MODERATION_TEST_TORCH_FREE") != "1",
    reason="set MODERATION_TEST_TORCH_FREE=1 (.ci/services does) to build a torch-free venv")]


def test_a_torch_free_install_scans_and_serves_an_exported_model(
        tiny_encoder: Encoder, tiny_arch_file: Path, tmp_path: Path) -> None:
    from moderation.cli import sample_images

    export_onnx(tiny_encoder, tmp_path / "exported", images=sample_images(4), prompts=["a"])
    data = copy.deepcopy(HAND_POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "exported", "backend": "onnx"}
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(data, sort_keys=False))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-e", f"{ROOT}[onnx]"],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    for module in ("torch", "torchvision", "open_clip"):
        absent = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"],
                                capture_output=True)
        assert absent.returncode != 0, f"{module} is installed in the [onnx] venv"

    out = tmp_path / "results.jsonl"
    env = {**os.environ, "MODERATION_CACHE_DIR": str(tmp_path / "cache")}
    scan = subprocess.run([str(venv / "bin" / "moderation"), "scan", str(ROOT / "examples"),
                           "--policy", str(policy), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert scan.returncode == 0, scan.stdout + scan.stderr
    scanned = {Path(r["id"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(scanned) == {p.name for p in (ROOT / "examples").iterdir()}

    # the same images through the torch backend: the same scores within the tolerance
    torch_data = copy.deepcopy(data)
    torch_data["model"] = {"name": TINY_ARCH, "pretrained": "none",
                           "config": str(tiny_arch_file)}
    torch_policy = tmp_path / "torch.yaml"
    torch_policy.write_text(yaml.safe_dump(torch_data, sort_keys=False))
    with pytest.warns(UserWarning):
        reference = Moderator.from_policy(
            torch_policy, EncoderSpec(random_weights=True, cache_dir=tmp_path / "torch-cache"))
    for result in reference.moderate(sorted((ROOT / "examples").iterdir()),
                                     ids=sorted(p.name for p in (ROOT / "examples").iterdir())):
        found = scanned[result.id]
        assert found["model"] == f"{tiny_encoder.identity}+onnx-fp32"
        for cid, category in result.decision.categories.items():
            assert abs(found["categories"][cid]["score"] - category.score) <= 1e-4

    # and it serves
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(venv / "bin" / "moderation"), "serve", "--policy", str(policy), "--port", str(port),
         "--workers", "1"],
        env={**env, "MODERATION_DATABASE_URL": f"sqlite:///{tmp_path / 'log.sqlite3'}"},
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        answer = requests.post(f"http://127.0.0.1:{port}/v1/moderate", timeout=30, files={
            "image": ("landscape.jpg", (ROOT / "examples" / "landscape.jpg").read_bytes())})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"].endswith("+onnx-fp32")
    finally:
        server.terminate()
        server.wait(30)
        log.close()
