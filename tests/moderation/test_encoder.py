"""The real loading and encoding code, on a tiny open_clip architecture with random weights."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moderation import ModelError, WeightsUnavailableError
from moderation.backends import RandomWeightsWarning
from moderation.backends.torch import Encoder
from tests.fakes import TINY_ARCH


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(n)]


def test_outputs_are_unit_float32(tiny_encoder: Encoder) -> None:
    vectors = tiny_encoder.encode_images(images(5))
    texts = tiny_encoder.encode_texts(["a cat", "a dog", "a toy gun"])
    assert vectors.shape == (5, 32) and texts.shape == (3, 32)
    assert vectors.dtype == np.float32 and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert not tiny_encoder.model.training


def test_batching_does_not_change_the_result(tiny_encoder: Encoder) -> None:
    batch = images(6)  # batch_size is 4: one full batch and one partial
    together = tiny_encoder.encode_images(batch)
    alone = np.concatenate([tiny_encoder.encode_images([im]) for im in batch])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_random_weights_are_reproducible_and_announced(tiny_arch_file: Path,
                                                        tiny_encoder: Encoder) -> None:
    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS"):
        again = Encoder.load(TINY_ARCH, random_weights=True)
    assert again.identity == tiny_encoder.identity
    assert "random-weights" in again.identity
    np.testing.assert_allclose(
        again.encode_texts(["a knife"]), tiny_encoder.encode_texts(["a knife"]), atol=1e-6
    )


def test_checkpoint_file_round_trip(tiny_encoder: Encoder, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny_encoder.model.state_dict(), path)
    loaded = Encoder.load(TINY_ARCH, str(path))
    assert loaded.identity.startswith(f"{TINY_ARCH}/sha256:")
    batch = images(3)
    np.testing.assert_allclose(
        loaded.encode_images(batch), tiny_encoder.encode_images(batch), atol=1e-6
    )
    np.testing.assert_allclose(
        loaded.encode_texts(["x"]), tiny_encoder.encode_texts(["x"]), atol=1e-6
    )


def test_identity_follows_checkpoint_content(tiny_encoder: Encoder, tmp_path: Path) -> None:
    state = tiny_encoder.model.state_dict()
    torch.save(state, tmp_path / "a.pt")
    state = {k: v + 1 if k == "logit_scale" else v for k, v in state.items()}
    torch.save(state, tmp_path / "b.pt")
    a = Encoder.load(TINY_ARCH, str(tmp_path / "a.pt"))
    b = Encoder.load(TINY_ARCH, str(tmp_path / "b.pt"))
    assert a.identity != b.identity


def test_checkpoint_of_another_architecture_is_refused(tiny_arch_file: Path,
                                                       tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, path)
    with pytest.raises(ModelError, match=r"cannot load weights for tiny-test-clip from .*\.pt"):
        Encoder.load(TINY_ARCH, str(path))


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(ModelError, match=r"unknown open_clip architecture 'ViT-Z-99'.*ViT-B-32"):
        Encoder.load("ViT-Z-99", "whatever")


def test_unknown_tag_lists_the_known_tags() -> None:
    with pytest.raises(WeightsUnavailableError, match=r"not a known tag.*laion2b_s34b_b79k"):
        Encoder.load("ViT-B-32", "no_such_tag")


def test_missing_checkpoint_path_says_so(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match=r"no checkpoint file at .*gone\.pt"):
        Encoder.load("ViT-B-32", str(tmp_path / "gone.pt"))


def test_no_weights_at_all_needs_an_explicit_choice(tiny_arch_file: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="--random-weights for a smoke test"):
        Encoder.load(TINY_ARCH, None)


@pytest.mark.parametrize("offline", [True, False])
def test_uncached_weights_fail_fast_with_instructions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline: bool
) -> None:
    import moderation.weights as encoder_module

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        reason = "offline mode is set"
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(encoder_module, "_reachable", lambda host, **_: False)
        reason = "huggingface.co cannot be reached"
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        Encoder.load("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path / "hf"))
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "not in the local cache" in message and reason in message
    assert "--pretrained /path/to/checkpoint" in message
    assert "open_clip.create_model('ViT-B-32', pretrained='laion2b_s34b_b79k')" in message


def test_network_probe_gives_up_quickly() -> None:
    from moderation.weights import _reachable

    started = time.monotonic()
    assert _reachable("192.0.2.1", port=9, timeout=0.5) is False  # TEST-NET-1: never answers
    assert time.monotonic() - started < 2


def test_cached_pretrained_tag_is_used_without_network(
    tiny_encoder: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tag whose file is in open_clip's URL cache loads from there, probe or not."""
    import open_clip

    import moderation.weights as encoder_module

    cfg = {"url": "https://example.invalid/weights/tiny.pt"}
    monkeypatch.setattr(
        open_clip, "get_pretrained_cfg",
        lambda name, tag: cfg if (name, tag) == (TINY_ARCH, "cached_tag") else {},
    )
    monkeypatch.setattr(encoder_module, "_reachable", lambda host, **_: pytest.fail("probed"))
    torch.save(tiny_encoder.model.state_dict(), tmp_path / "tiny.pt")
    loaded = Encoder.load(TINY_ARCH, "cached_tag", cache_dir=str(tmp_path))
    assert loaded.identity == f"{TINY_ARCH}/cached_tag"
    np.testing.assert_allclose(
        loaded.encode_texts(["y"]), tiny_encoder.encode_texts(["y"]), atol=1e-6
    )
