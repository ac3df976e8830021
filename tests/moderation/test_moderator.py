from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from PIL import Image

from moderation import EncoderSpec, ModelMismatchError, Moderator, load_policy
from moderation.images import ImageLimits
from moderation.policy import parse_policy
from tests.fakes import (
    BLUE,
    GREEN,
    GREY,
    HAND_POLICY,
    PURPLE,
    RED,
    TINY_ARCH,
    FakeEncoder,
    animation_bytes,
    image_bytes,
)


@pytest.fixture
def moderator(fake_encoder: FakeEncoder) -> Moderator:
    return Moderator(parse_policy(yaml.safe_dump(HAND_POLICY, sort_keys=False)), fake_encoder)


def test_one_result_per_input_in_order(moderator: Moderator, tmp_path: Path) -> None:
    path = tmp_path / "green.png"
    path.write_bytes(image_bytes(GREEN))
    results = moderator.moderate(
        [image_bytes(RED), Image.new("RGB", (8, 8), BLUE), path, image_bytes(PURPLE, "JPEG")],
        ids=["r", "b", "g", "p"],
    )
    assert [r.id for r in results] == ["r", "b", "g", "p"]
    assert [r.to_dict()["action"] for r in results] == ["block", "allow", "flag", "review"]
    first = results[0].to_dict()
    assert first["policy"] == {"name": "hand", "version": moderator.policy.version,
                               "scores_version": moderator.policy.scores_version}
    assert first["model"] == "fake/hand-made"
    assert first["triggered"] == ["weapons"] and first["flagged"] is True
    assert first["categories"]["weapons"]["top_terms"][0]["text"] == "rifle"


def test_a_bad_image_does_not_cost_the_others(moderator: Moderator,
                                              fake_encoder: FakeEncoder) -> None:
    results = moderator.moderate([image_bytes(RED), b"not an image", b"", image_bytes(GREY)])
    assert [r.ok for r in results] == [True, False, False, True]
    assert results[1].to_dict()["error"]["code"] == "unsupported_format"
    assert results[2].to_dict()["error"] == {
        "code": "empty", "message": "the image is empty (0 bytes)",
    }
    assert results[3].to_dict()["action"] == "allow"
    assert fake_encoder.image_calls == 1  # the good ones still went through in one batch


def test_an_animation_is_decided_per_category_over_its_frames(moderator: Moderator) -> None:
    """A rifle in frame 2 and a beer in frame 1: both categories fire, each naming its frame
    (before: only the single worst frame was reported, and alcohol was lost)."""
    [result] = moderator.moderate([animation_bytes(GREY, GREEN, RED, PURPLE, GREY)])
    out = result.to_dict()
    assert out["action"] == "block" and out["frame"] == 2
    assert out["triggered"] == ["weapons", "alcohol"]
    assert out["categories"]["weapons"]["frame"] == 2
    assert out["categories"]["alcohol"]["frame"] == 1
    assert out["frames_scored"] == 5 and out["image"]["frames"] == 5


def test_too_large_pil_image_is_refused(fake_encoder: FakeEncoder) -> None:
    policy = parse_policy(yaml.safe_dump(HAND_POLICY, sort_keys=False))
    small = Moderator(policy, fake_encoder, limits=ImageLimits(max_pixels=100))
    [result] = small.moderate([Image.new("RGB", (20, 20))])
    assert result.error is not None and result.error.code == "too_many_pixels"


def test_ids_must_match_images(moderator: Moderator) -> None:
    with pytest.raises(ValueError, match="got 1 images but 2 ids"):
        moderator.moderate([image_bytes(RED)], ids=["a", "b"])


def calibrated(model: str) -> dict:  # type: ignore[type-arg]
    data = copy.deepcopy(HAND_POLICY)
    data["categories"]["weapons"]["threshold"]["provenance"] = {
        "source": "calibrated",
        "model": model,
        "date": "2026-11-20",
        "dataset": {"fingerprint": "abc", "positives": 40, "negatives": 400},
        "target": {"precision": 0.95},
        "achieved": {"precision": 0.96, "recall": 0.7},
    }
    return data


def test_thresholds_calibrated_for_another_model_are_refused(fake_encoder: FakeEncoder) -> None:
    policy = parse_policy(yaml.safe_dump(calibrated("ViT-B-32/laion2b_s34b_b79k")))
    with pytest.raises(
        ModelMismatchError,
        match=r"calibrated with another model than 'fake/hand-made': weapons \(calibrated "
        r"with 'ViT-B-32/laion2b_s34b_b79k'\)",
    ):
        Moderator(policy, fake_encoder)
    Moderator(parse_policy(yaml.safe_dump(calibrated("fake/hand-made"))), fake_encoder)


def test_with_policy_reuses_the_encoder(moderator: Moderator, fake_encoder: FakeEncoder) -> None:
    data = copy.deepcopy(HAND_POLICY)
    data["categories"]["weapons"]["threshold"] = {"value": 0.99}
    other = moderator.with_policy(parse_policy(yaml.safe_dump(data, sort_keys=False)))
    assert other.encoder is fake_encoder
    assert other.moderate([image_bytes(RED)])[0].to_dict()["action"] == "allow"
    assert other.policy.version != moderator.policy.version


def test_an_encoder_spec_takes_what_the_policy_names_unless_overridden() -> None:
    policy = parse_policy(yaml.safe_dump(HAND_POLICY))  # model: fake/hand-made
    assert EncoderSpec.for_policy(policy) == EncoderSpec(
        name="fake", pretrained="hand-made", backend="torch")
    faster = EncoderSpec(device="auto", batch_size=4, threads=2, cache_dir="c")
    assert EncoderSpec.for_policy(policy, faster) == EncoderSpec(
        name="fake", pretrained="hand-made", backend="torch", device="auto", batch_size=4,
        threads=2, cache_dir="c")
    # the policy's weights (and architecture file) belong to its own architecture only
    other = EncoderSpec.for_policy(policy, EncoderSpec(name="ViT-B-32"))
    assert (other.name, other.pretrained, other.config) == ("ViT-B-32", None, None)
    exported = EncoderSpec.for_policy(policy, EncoderSpec(backend="onnx", pretrained="dir"))
    assert (exported.name, exported.pretrained, exported.backend) == ("fake", "dir", "onnx")


def test_an_encoder_without_capabilities_declares_their_defaults(
        fake_encoder: FakeEncoder) -> None:
    assert fake_encoder.accepts == ("fake/hand-made",)
    assert fake_encoder.device_type == "cpu"
    with fake_encoder.expect():
        fake_encoder.trace_image_tower()
        fake_encoder.prepare_threads(4)


def test_from_policy_with_the_real_tiny_model(tiny_arch_file: Path, tmp_path: Path) -> None:
    data = copy.deepcopy(HAND_POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "none", "config": str(tiny_arch_file)}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert load_policy(path).model.config == str(tiny_arch_file)
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        moderator = Moderator.from_policy(
            path, EncoderSpec(random_weights=True, cache_dir=tmp_path / "c"))
    results = moderator.moderate([image_bytes(RED, "JPEG", size=(300, 200)), b"junk"])
    out = results[0].to_dict()
    assert set(out["categories"]) == {"weapons", "alcohol"}
    assert out["action"] in {"allow", "flag", "review", "block"}
    assert -1 <= out["categories"]["weapons"]["score"] <= 1
    assert results[1].to_dict()["error"]["code"] == "unsupported_format"
    assert any((tmp_path / "c" / "embeddings").rglob("*.npy"))


def test_a_request_can_pick_a_calibration_profile(fake_encoder: FakeEncoder) -> None:
    data = copy.deepcopy(HAND_POLICY)
    data["profiles"] = {"kids": {"weapons": {"value": 0.5}}}
    moderator = Moderator(parse_policy(yaml.safe_dump(data, sort_keys=False)), fake_encoder)
    # PURPLE scores 0.6345 on weapons: review by default, block under the stricter profile
    [default] = moderator.moderate([image_bytes(PURPLE)])
    [kids] = moderator.moderate([image_bytes(PURPLE)], profile="kids")
    assert default.to_dict()["action"] == "review" and default.to_dict()["profile"] == "default"
    assert kids.to_dict()["action"] == "block" and kids.to_dict()["profile"] == "kids"
    assert kids.to_dict()["categories"]["weapons"]["threshold"] == 0.5
    with pytest.raises(ValueError, match="unknown calibration profile 'teens'"):
        moderator.moderate([image_bytes(PURPLE)], profile="teens")
