"""calibrate() end to end on hand-made vectors, the CLI on the tiny real model, and the report."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from calibration.labels import LabelError, load_labels
from calibration.report import write_report
from calibration.run import calibrate, threshold_diff, write_policy
from moderation import EncoderSpec, ModelMismatchError, Moderator, load_policy
from moderation.cli import main
from moderation.policy import Goal
from tests.fakes import TINY_ARCH, FakeEncoder, animation_bytes, image_bytes, unit

N = 60


def colour(k: int) -> tuple[int, int, int]:
    return (k * 4, 0, 0)


def angle(k: int) -> float:
    return k * (math.pi / 2) / N


# weapons = e1: the image k scores cos(angle(k)), highest for k = 0
TEXTS = {"gun": unit(1, 0, 0), "beer": unit(0, 1, 0), "toy": unit(0, 0, 1)}
COLOURS = {colour(k): unit(math.cos(angle(k)), math.sin(angle(k)), 0) for k in range(N)}
POLICY = {
    "name": "cal",
    "model": {"name": "fake", "pretrained": "hand-made"},
    "templates": ["{}"],
    "categories": {
        "weapons": {"description": "d", "terms": ["gun"], "exceptions": ["toy"],
                    "action": "block", "threshold": {"value": 0.5, "review_from": 0.4},
                    "target": {"precision": 0.9}},
        "alcohol": {"description": "d", "terms": ["beer"], "action": "flag",
                    "threshold": {"value": 0.5}},
    },
}


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    """Folder per category: the 24 images nearest the weapons vector are weapons."""
    root = tmp_path / "labelled"
    for k in range(N):
        folder = root / ("weapons" if k < 24 else "none")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{k:02d}.png").write_bytes(image_bytes(colour(k)))
    policy = tmp_path / "policy.yaml"
    policy.write_text("# keep me\n" + yaml.safe_dump(POLICY, sort_keys=False))
    return root, policy


def fake_moderator(policy: Path, cache: Any = None) -> Any:
    encoder = FakeEncoder(dict(TEXTS), dict(COLOURS))
    return lambda: Moderator(load_policy(policy), encoder, cache)


def test_calibrate_fits_reports_and_writes_provenance(dataset: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    labels, policy = dataset
    result = calibrate(policy, labels, load_moderator=fake_moderator(policy), min_positives=5)
    weapons, alcohol = result.outcomes
    assert weapons.status == "ok" and weapons.goal == Goal(precision=0.9)
    # perfectly separated: the lowest-scoring weapons image of the fitting split, which is
    # cos(angle(k)) for one of the 24 weapons images
    assert weapons.fit_scores is not None and weapons.fit_labels is not None
    assert weapons.value == pytest.approx(float(weapons.fit_scores[weapons.fit_labels].min()))
    assert any(weapons.value == pytest.approx(math.cos(angle(k)), abs=1e-6) for k in range(24))
    assert weapons.held_out is not None and weapons.held_out.precision == 1.0
    assert weapons.fit_positives + weapons.test_positives == 24
    assert weapons.fit_negatives + weapons.test_negatives == 36
    assert weapons.review_from is None  # the old, uncalibrated band is not carried over
    assert weapons.review_message is not None and "is dropped" in weapons.review_message
    assert alcohol.status == "no_target" and "set target in the policy" in alcohol.message
    assert "stratified by label set, 30% held out, seed 0" in result.split

    out = tmp_path / "out" / "new.yaml"
    write_policy(result, policy, out)
    text = out.read_text()
    assert text.startswith("# keep me")
    new = load_policy(out)
    provenance = new.categories["weapons"].threshold.provenance
    assert provenance.source == "calibrated"
    assert provenance.model == "fake/hand-made"  # type: ignore[union-attr]
    assert provenance.dataset.positives == weapons.fit_positives  # type: ignore[union-attr]
    assert provenance.dataset.fingerprint.startswith("sha256:")  # type: ignore[union-attr]
    assert provenance.target.precision == 0.9  # type: ignore[union-attr]
    assert provenance.achieved.precision == 1.0  # type: ignore[union-attr]
    assert new.categories["alcohol"].threshold.value == 0.5  # untouched
    assert new.version == result.new_policy.version != result.policy.version

    lines = threshold_diff(result)
    assert lines[1].startswith("  weapons  0.5000 (review from 0.4000) -> ")
    assert "held-out precision 1.000" in lines[1]
    assert "alcohol  0.5000 unchanged: no target" in lines[2]


def test_the_report_contains_the_numbers_it_claims(dataset: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    labels, policy = dataset
    result = calibrate(policy, labels, load_moderator=fake_moderator(policy), min_positives=5,
                       goal=Goal(recall=0.9))
    index = write_report(result, tmp_path / "report")
    for name in ("weapons_pr.png", "weapons_hist.png", "alcohol_pr.png", "alcohol_hist.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    weapons = result.outcomes[0]
    assert weapons.held_out is not None
    held = summary["categories"]["weapons"]["held_out"]
    assert held["precision"] == weapons.held_out.precision
    assert held["confusion"] == {"tp": weapons.held_out.tp, "fp": weapons.held_out.fp,
                                 "fn": weapons.held_out.fn, "tn": weapons.held_out.tn}
    assert summary["categories"]["weapons"]["new"]["value"] == weapons.value
    assert summary["split"] == result.split and summary["model"] == "fake/hand-made"
    page = index.read_text()
    assert "weapons_pr.png" in page and "weapons_hist.png" in page
    assert f"{weapons.held_out.recall:.3f}" in page and result.fingerprint in page
    assert f"{weapons.held_out.tp} (TP)" in page


def test_unreachable_and_too_few_are_reported_not_hidden(dataset: tuple[Path, Path]) -> None:
    labels, policy = dataset
    result = calibrate(policy, labels, load_moderator=fake_moderator(policy), min_positives=50)
    weapons = result.outcomes[0]
    assert weapons.status == "too_few_positives" and weapons.value is None
    assert weapons.message.startswith("only ")
    assert result.failed == [weapons]
    assert result.new_policy.categories["weapons"].threshold.value == 0.5


def test_a_given_test_set_is_the_held_out_split(dataset: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    labels, policy = dataset
    manifest = tmp_path / "test.csv"
    rows = ["path,labels"] + [
        f"labelled/{'weapons' if k < 24 else 'none'}/{k:02d}.png,"
        f"{'weapons' if k < 24 else 'none'}" for k in range(0, N, 2)
    ]
    manifest.write_text("\n".join(rows) + "\n")
    result = calibrate(policy, labels, test=manifest, load_moderator=fake_moderator(policy),
                       min_positives=5)
    weapons = result.outcomes[0]
    assert (weapons.fit_positives, weapons.test_positives) == (24, 12)
    assert "reported on test.csv (given by the user)" in result.split


def test_image_embeddings_are_cached(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    from moderation.prompts import EmbeddingCache

    labels, policy = dataset
    cache = EmbeddingCache(tmp_path / "cache")
    encoder = FakeEncoder(dict(TEXTS), dict(COLOURS))
    calibrate(policy, labels, min_positives=5,
              load_moderator=lambda: Moderator(load_policy(policy), encoder, cache))
    assert encoder.image_calls == N
    again = FakeEncoder(dict(TEXTS), dict(COLOURS))
    calibrate(policy, labels, min_positives=5,
              load_moderator=lambda: Moderator(load_policy(policy), again, cache))
    assert again.image_calls == 0


def test_scores_from_a_scan_output(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    from moderation.cli import run_scan

    labels, policy = dataset
    moderator = fake_moderator(policy)()
    files = sorted(labels.rglob("*.png"))
    scan = tmp_path / "scan.jsonl"
    run_scan(moderator, files, scan, 16)
    direct = calibrate(policy, labels, load_moderator=fake_moderator(policy), min_positives=5)
    joined = calibrate(policy, labels, scan=scan, min_positives=5)
    assert joined.outcomes[0].value == pytest.approx(direct.outcomes[0].value, abs=1e-5)

    data = copy.deepcopy(POLICY)
    data["categories"]["weapons"]["terms"] = ["gun", "beer"]
    policy.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(LabelError, match="scores_version .* run 'moderation scan' again"):
        calibrate(policy, labels, scan=scan, min_positives=5)


def test_profile_thresholds_go_into_the_profile(dataset: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    labels, policy = dataset
    result = calibrate(policy, labels, load_moderator=fake_moderator(policy), min_positives=5,
                       profile="marketplace")
    out = tmp_path / "p.yaml"
    write_policy(result, policy, out)
    new = load_policy(out)
    assert new.categories["weapons"].threshold.value == 0.5
    assert new.threshold_for("weapons", "marketplace").value == result.outcomes[0].value


def test_calibrated_policy_refuses_another_model(dataset: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    labels, policy = dataset
    result = calibrate(policy, labels, load_moderator=fake_moderator(policy), min_positives=5)
    out = tmp_path / "new.yaml"
    write_policy(result, policy, out)
    other = FakeEncoder(dict(TEXTS), dict(COLOURS))
    other.identity = "fake/another"
    with pytest.raises(ModelMismatchError, match=r"weapons \(calibrated with 'fake/hand-made'\)"):
        Moderator(load_policy(out), other)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("a.png,guns\n", r"line 1: unknown categories \['guns'\]"),
        ("a.png\n", r"line 1: expected 'path,labels'"),
        ("a.png,none;weapons\n", r"'none' cannot be combined"),
        ("path,labels\n", r"no labelled images found"),
    ],
)
def test_bad_manifests(tmp_path: Path, rows: str, message: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(rows)
    with pytest.raises(LabelError, match=message):
        load_labels(manifest, {"weapons"})


def test_manifest_multi_labels_and_bad_folder(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,labels\nimgs/a.png,weapons;drugs\nimgs/b.png,none\n")
    items = load_labels(manifest, {"weapons", "drugs"})
    assert items[0].labels == {"weapons", "drugs"} and items[1].labels == set()
    assert items[0].path == (tmp_path / "imgs" / "a.png").resolve()
    (tmp_path / "folders" / "guns").mkdir(parents=True)
    with pytest.raises(LabelError, match=r"folders \['guns'\] are not categories"):
        load_labels(tmp_path / "folders", {"weapons"})


def test_calibrate_cli_end_to_end_with_the_tiny_model(tiny_arch_file: Path,
                                                      tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    from PIL import Image

    root = tmp_path / "labelled"
    for name, base in (("weapons", (200, 40, 40)), ("alcohol", (40, 200, 40)),
                       ("none", (40, 40, 200))):
        (root / name).mkdir(parents=True)
        for i in range(20):
            pixels = np.clip(np.array(base) + rng.normal(0, 50, (40, 40, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    (root / "none" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    data = copy.deepcopy(POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "none", "config": str(tiny_arch_file)}
    data["templates"] = ["a photo of {}."]
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(data, sort_keys=False))
    out, report = tmp_path / "calibrated.yaml", tmp_path / "report"
    args = ["calibrate", "--policy", str(policy), "--labels", str(root), "--out", str(out),
            "--report", str(report), "--target-recall", "0.9", "--min-positives", "3",
            "--random-weights", "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "weapons  0.5000 (review from 0.4000) -> " in result.stdout
    assert "left out: " in result.stderr and "broken.png" in result.stderr
    assert (report / "index.html").is_file() and (report / "summary.json").is_file()

    # the written policy loads, carries provenance, and serves with the same model
    with pytest.warns(UserWarning):
        moderator = Moderator.from_policy(
            out, EncoderSpec(random_weights=True, cache_dir=tmp_path / "cache"))
    for cid in ("weapons", "alcohol"):
        provenance = moderator.policy.categories[cid].threshold.provenance
        assert provenance.source == "calibrated"
        assert provenance.model == moderator.encoder.identity  # type: ignore[union-attr]
        assert provenance.target.recall == 0.9  # type: ignore[union-attr]
    assert moderator.moderate([image_bytes((200, 40, 40))])[0].ok


def test_calibrate_cli_exits_3_when_a_target_cannot_be_met(tiny_arch_file: Path,
                                                           tmp_path: Path,
                                                           dataset: tuple[Path, Path]) -> None:
    labels, _ = dataset
    data = copy.deepcopy(POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "none", "config": str(tiny_arch_file)}
    policy = tmp_path / "tiny.yaml"
    policy.write_text(yaml.safe_dump(data, sort_keys=False))
    args = ["calibrate", "--policy", str(policy), "--labels", str(labels), "--out",
            str(tmp_path / "o.yaml"), "--report", str(tmp_path / "r"), "--random-weights",
            "--min-positives", "1000", "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3
    assert "NOT CALIBRATED: weapons" in result.stderr
    assert (tmp_path / "o.yaml").is_file() and (tmp_path / "r" / "index.html").is_file()


def test_calibration_fits_on_the_scores_the_service_decides_with(
    fake_encoder: FakeEncoder, tmp_path: Path
) -> None:
    """Stills and animations: calibration's per-category score of an image is exactly the
    score the moderator (the service, scan) compares with the threshold, because both go
    through one scorer (before: serving decided an animation by its single worst frame)."""


    from calibration.labels import LabelledImage
    from calibration.run import image_scores
    from moderation.policy import parse_policy
    from tests.fakes import BLUE, GREEN, GREY, HAND_POLICY, PURPLE, RED

    moderator = Moderator(parse_policy(yaml.safe_dump(HAND_POLICY, sort_keys=False)),
                          fake_encoder)
    files = []
    for i, colours in enumerate([(RED,), (GREY, GREEN, PURPLE), (BLUE, GREY), (GREEN,)]):
        path = tmp_path / f"{i}.{'png' if len(colours) == 1 else 'gif'}"
        path.write_bytes(image_bytes(colours[0], size=(16, 16)) if len(colours) == 1
                         else animation_bytes(*colours))
        files.append(path)
    scores, kept, left_out = image_scores(
        moderator, [LabelledImage(p, frozenset()) for p in files]
    )
    assert kept == [0, 1, 2, 3] and left_out == []
    served = moderator.moderate(files)
    for row, result in zip(scores, served, strict=True):
        assert result.decision is not None
        assert row.tolist() == [result.decision.categories[c].score for c in ("weapons",
                                                                              "alcohol")]
    # the animation with a beer and a between-frame: both categories, each from its frame
    animation = served[1].decision
    assert animation is not None and animation.triggered == ["weapons", "alcohol"]
    assert animation.categories["weapons"].frame == 2
    assert animation.categories["alcohol"].frame == 1
