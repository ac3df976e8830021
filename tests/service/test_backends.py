"""The service on the ONNX backend (an export of the tiny test architecture), and the serve
command's early checks of the backend and device."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from moderation.backends.torch import Encoder, export_onnx
from moderation.cli import main, sample_images
from service.app import create_app
from service.settings import SettingsError, load_settings
from tests.fakes import HAND_POLICY, TINY_ARCH, image_bytes


@pytest.fixture
def onnx_policy(tiny_encoder: Encoder, tmp_path: Path) -> Path:
    export_onnx(tiny_encoder, tmp_path / "exported", images=sample_images(4), prompts=["a"])
    data = copy.deepcopy(HAND_POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "exported", "backend": "onnx"}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_service_moderates_with_an_exported_model(onnx_policy: Path, tmp_path: Path,
                                                      tiny_encoder: Encoder) -> None:
    app = create_app({"POLICY": str(onnx_policy), "CACHE_DIR": str(tmp_path / "cache"),
                      "DATABASE_URL": f"sqlite:///{tmp_path / 'log.sqlite3'}"})
    client = app.test_client()
    ready = client.get("/readyz").get_json()
    assert ready["model"] == f"{tiny_encoder.identity}+onnx-fp32"
    import io

    answer = client.post("/v1/moderate", data={"image": [(io.BytesIO(image_bytes((200, 0, 0))),
                                                          "a.png")]})
    assert answer.status_code == 200 and answer.get_json()["results"][0]["action"]


def test_backend_and_device_settings_are_checked() -> None:
    assert load_settings({"backend": "onnx", "device": "auto"}).device == "auto"
    for bad in ({"backend": "tensorflow"}, {"device": "tpu"}):
        with pytest.raises(SettingsError):
            load_settings(bad)


def test_serve_stops_at_once_without_the_exported_model(onnx_policy: Path,
                                                       tmp_path: Path) -> None:
    saved = dict(os.environ)  # serve sets its workers' MODERATION_* variables here
    try:
        result = CliRunner().invoke(main, ["serve", "--policy", str(onnx_policy),
                                           "--pretrained", str(tmp_path / "nowhere")])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert result.exit_code == 1 and "moderation model export" in result.output
