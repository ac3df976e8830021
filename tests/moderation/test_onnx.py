"""The ONNX Runtime backend on the tiny test architecture (random weights): the export of both
towers, equality with the torch backend (pixels, tokens, scores), the int8 gate, identities
and which calibrated thresholds each accepts, and device selection."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from moderation import EncoderSpec, ModelError, ModelMismatchError, Moderator
from moderation.backends.clip_text import ClipTokenizer
from moderation.backends.onnx import SCORE_TOLERANCE, OnnxEncoder, providers_for
from moderation.backends.pixels import Preprocess
from moderation.backends.torch import Encoder, export_onnx, resolve_device
from moderation.batching import BatchingEncoder
from moderation.cli import main, sample_images
from tests.fakes import HAND_POLICY, TINY_ARCH, image_bytes

TEXTS = ["a photo of a gun", "A Close-Up photo of   brass knuckles!!", "naïve café — déjà vu",
         "&amp;lt;b&amp;gt; html", "日本語のテキスト", "emoji 🔫🍺", "x" * 400, "",
         "it's 12:30, don't", "\u00a0nbsp\tTabs\nnewline", "word " * 90]


def photos(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 50), (64, 64), (31, 90), (300, 200), (17, 17), (1000, 333)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8))
            for i in range(n)]


@pytest.fixture(scope="module")
def exported(tiny_encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny-fp32"
    export_onnx(tiny_encoder, out, images=photos(6), prompts=TEXTS[:4])
    return out


def test_the_tokenizer_gives_open_clips_tokens(tiny_arch_file: Path) -> None:
    from open_clip.tokenizer import default_bpe

    for name, length in (("ViT-B-32", 77), (TINY_ARCH, 16)):
        theirs = open_clip.get_tokenizer(name)
        ours = ClipTokenizer(Path(default_bpe()), length)
        np.testing.assert_array_equal(ours(TEXTS), theirs(TEXTS).numpy())


def test_the_preprocessing_gives_open_clips_pixels() -> None:
    for mode in ("shortest", "squash"):
        for interpolation in ("bicubic", "bilinear"):
            _, _, theirs = open_clip.create_model_and_transforms(
                "ViT-B-32", pretrained=None, image_resize_mode=mode,
                image_interpolation=interpolation)
            ours = Preprocess(224, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD,
                              interpolation, mode)
            for image in photos(6, seed=1):
                np.testing.assert_array_equal(ours.one(image), theirs(image).numpy())
    with pytest.raises(ValueError, match="longest"):
        Preprocess(224, (0, 0, 0), (1, 1, 1), resize_mode="longest")


def test_export_writes_both_towers_and_what_they_need(exported: Path,
                                                      tiny_encoder: Encoder) -> None:
    assert {p.name for p in exported.iterdir()} == {
        "image.onnx", "text.onnx", "model.json", "bpe_simple_vocab_16e6.txt.gz"}
    meta = json.loads((exported / "model.json").read_text())
    assert meta["source"]["identity"] == tiny_encoder.identity
    assert len(meta["source"]["weights_sha256"]) == 64
    assert (meta["precision"], meta["embedding_dim"], meta["matches_source"]) == ("fp32", 32, True)
    assert meta["image"] == {"size": 32, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                             "std": list(open_clip.OPENAI_DATASET_STD),
                             "interpolation": "bicubic", "resize_mode": "shortest"}
    assert meta["text"]["context_length"] == 16 and meta["text"]["clean"] == "lower"
    assert meta["checked"]["fp32_max_difference"] <= SCORE_TOLERANCE


def test_onnx_fp32_encodes_as_torch_does(exported: Path, tiny_encoder: Encoder) -> None:
    onnx = OnnxEncoder.load(exported, threads=1)
    assert onnx.device_type == "cpu"
    batch = photos(7, seed=2)
    np.testing.assert_allclose(onnx.encode_images(batch), tiny_encoder.encode_images(batch),
                               atol=1e-5)
    np.testing.assert_allclose(onnx.encode_texts(TEXTS), tiny_encoder.encode_texts(TEXTS),
                               atol=1e-5)
    onnx.prepare_threads(2)
    assert onnx.get_threads() == 1  # built, not switched to
    onnx.set_threads(2)  # another session for another thread count: the same vectors
    assert onnx.get_threads() == 2
    np.testing.assert_allclose(onnx.encode_images(batch), tiny_encoder.encode_images(batch),
                               atol=1e-5)


def _policy(tmp_path: Path, tiny_arch_file: Path, **model: Any) -> Path:
    data = copy.deepcopy(HAND_POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "none", "config": str(tiny_arch_file),
                     **model}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_scores_are_equal_within_the_tolerance(exported: Path, tiny_arch_file: Path,
                                               tmp_path: Path) -> None:
    path = _policy(tmp_path, tiny_arch_file)
    with pytest.warns(UserWarning):
        torch_moderator = Moderator.from_policy(
            path, EncoderSpec(random_weights=True, cache_dir=tmp_path / "cache"))
    onnx_moderator = Moderator.from_policy(
        path, EncoderSpec(backend="onnx", pretrained=str(exported), cache_dir=tmp_path / "cache"))
    uploads = [image_bytes(c) for c in ((200, 30, 30), (10, 200, 90), (90, 90, 90))]
    for a, b in zip(torch_moderator.moderate(uploads), onnx_moderator.moderate(uploads),
                    strict=True):
        for cid, category in a.decision.categories.items():
            assert abs(category.score - b.decision.categories[cid].score) <= SCORE_TOLERANCE
        assert a.decision.action == b.decision.action
    # the policy can name the exported folder itself, relative to the policy file
    (tmp_path / "sub").mkdir()
    relative = _policy(tmp_path, tiny_arch_file, backend="onnx",
                       pretrained=os.path.relpath(exported, tmp_path / "sub"))
    moved = relative.rename(tmp_path / "sub" / "policy.yaml")
    found = Moderator.from_policy(moved, EncoderSpec(cache_dir=tmp_path / "cache"))
    assert found.encoder.identity.endswith("+onnx-fp32")


def _calibrated_with(path: Path, identity: str) -> Path:
    data = yaml.safe_load(path.read_text())
    data["categories"]["alcohol"]["threshold"] = {"value": 0.5, "provenance": {
        "source": "calibrated", "model": identity, "date": "2026-11-24",
        "dataset": {"fingerprint": "f", "positives": 10, "negatives": 10},
        "target": {"recall": 0.9}, "achieved": {"precision": 0.9, "recall": 0.9}}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_identities_and_which_calibrations_they_accept(
        exported: Path, tiny_encoder: Encoder, tiny_arch_file: Path, tmp_path: Path) -> None:
    int8 = tmp_path / "tiny-int8"
    meta = export_onnx(tiny_encoder, int8, precision="int8", images=photos(6),
                       prompts=TEXTS[:4], min_cosine=0.5)
    assert meta["checked"]["int8_image_cosine_min"] > 0.5
    fp32_encoder, int8_encoder = OnnxEncoder.load(exported), OnnxEncoder.load(int8)
    assert fp32_encoder.identity == f"{tiny_encoder.identity}+onnx-fp32"
    assert int8_encoder.identity == f"{tiny_encoder.identity}+onnx-int8"
    policy = _calibrated_with(_policy(tmp_path, tiny_arch_file), tiny_encoder.identity)
    accepted = Moderator.from_policy(
        policy, EncoderSpec(backend="onnx", pretrained=str(exported), cache_dir=tmp_path / "cache"))
    assert accepted.encoder.accepts == (fp32_encoder.identity, tiny_encoder.identity)
    # the service's batching encoder declares what the encoder it wraps accepts (it had been
    # probed for it, found nothing, and refused the source model's thresholds)
    batching = BatchingEncoder(accepted.encoder)
    assert accepted.with_encoder(batching).encoder.accepts == accepted.encoder.accepts
    with pytest.raises(ModelMismatchError, match="calibrate again"):
        Moderator.from_policy(
            policy, EncoderSpec(backend="onnx", pretrained=str(int8), cache_dir=tmp_path / "cache"))
    own = _calibrated_with(_policy(tmp_path, tiny_arch_file), int8_encoder.identity)
    assert Moderator.from_policy(
        own, EncoderSpec(backend="onnx", pretrained=str(int8),
                         cache_dir=tmp_path / "cache")).encoder is not None


def test_int8_below_the_cosine_gate_is_refused_with_the_figure(tiny_encoder: Encoder,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "refused"
    with pytest.raises(ModelError, match=r"int8 refused: on 6 images .* cosine of only 0\.\d+"):
        export_onnx(tiny_encoder, out, precision="int8", images=photos(6), prompts=TEXTS[:2],
                    min_cosine=1.0)
    assert not out.exists()  # nothing half-written


def test_the_export_command(tiny_arch_file: Path, tmp_path: Path) -> None:
    policy = _policy(tmp_path, tiny_arch_file)
    out = tmp_path / "exported"
    args = ["model", "export", "--policy", str(policy), "--random-weights", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "accepts thresholds calibrated on the source model" in result.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "already holds an exported model" in again.output
    refused = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "int8"), "--precision",
                                        "int8", "--min-cosine", "1"])
    assert refused.exit_code == 1 and "int8 refused" in refused.output
    scored = CliRunner().invoke(main, ["score", "--policy", str(policy), "--backend", "onnx",
                                       "--pretrained", str(out),
                                       "--cache-dir", str(tmp_path / "c"),
                                       str(Path("examples/landscape.jpg"))])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["model"].endswith("+onnx-fp32")
    missing = CliRunner().invoke(main, ["score", "--policy", str(policy), "--backend", "onnx",
                                        "--pretrained", str(tmp_path / "nowhere"),
                                        "examples/landscape.jpg"])
    assert missing.exit_code == 1 and "moderation model export" in missing.output
    assert len(sample_images()) == 16


def test_device_selection_and_the_error_when_cuda_is_absent() -> None:
    assert resolve_device("cpu") == "cpu"
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ModelError, match="cpu, cuda or auto"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda"
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ModelError, match="--device cuda: torch sees no CUDA GPU"):
            resolve_device("cuda")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert providers_for("auto") == ["CPUExecutionProvider"]
        with pytest.raises(ModelError, match="no CUDA provider"):
            providers_for("cuda")


def test_score_says_why_when_cuda_is_asked_for_and_absent(tiny_arch_file: Path,
                                                         tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = CliRunner().invoke(main, ["score", "--policy", str(_policy(tmp_path, tiny_arch_file)),
                                       "--random-weights", "--device", "cuda",
                                       "examples/landscape.jpg"])
    assert result.exit_code == 1 and "torch sees no CUDA GPU" in result.output


@pytest.mark.gpu
def test_the_gpu_gives_the_cpus_vectors(tiny_arch_file: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (run where one is: pytest -m gpu)")
    with pytest.warns(UserWarning):
        cpu = Encoder.load(TINY_ARCH, random_weights=True)
        gpu = Encoder.load(TINY_ARCH, random_weights=True, device="cuda")
    batch = photos(8)
    np.testing.assert_allclose(gpu.encode_images(batch), cpu.encode_images(batch), atol=5e-3)
    np.testing.assert_allclose(gpu.encode_texts(TEXTS), cpu.encode_texts(TEXTS), atol=5e-3)
