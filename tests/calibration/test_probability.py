"""Score → probability maps: fitted monotone, reliable on held-out data where the labels were
drawn with known probabilities, written into the policy with their provenance, reported
(expected calibration error, a reliability diagram), and given beside every score."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from calibration.probability import fit_map, reliability
from calibration.report import write_report
from calibration.run import calibrate, threshold_diff, write_policy
from moderation import Moderator, load_policy
from moderation.policy import ProbabilityMap
from tests.fakes import FakeEncoder, image_bytes, unit


def true_probability(score: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-12.0 * (np.asarray(score) - 0.6)))


@pytest.mark.parametrize("method", ["isotonic", "sigmoid"])
def test_a_fitted_map_never_falls_and_is_reliable_where_labels_follow_known_odds(
        method: Any) -> None:
    rng = np.random.default_rng(0)
    fit_s, test_s = rng.uniform(0, 1, 4000), rng.uniform(0, 1, 4000)
    fit_y = rng.random(4000) < true_probability(fit_s)
    test_y = rng.random(4000) < true_probability(test_s)
    fitted = fit_map(method, fit_s, fit_y)
    p = ProbabilityMap.model_construct(**fitted)
    grid = np.linspace(-1, 1, 2001)
    assert np.all(np.diff(p.of(grid)) >= 0), "the map falls somewhere"
    assert np.all((p.of(grid) >= 0) & (p.of(grid) <= 1))
    assert np.abs(p.of(np.array([0.3, 0.6, 0.9])) - true_probability(
        np.array([0.3, 0.6, 0.9]))).max() < 0.1
    held_out = reliability(p.of(test_s), test_y)
    assert held_out.ece < 0.05
    # and ECE tells a miscalibrated map from a calibrated one on the same data
    assert reliability(p.of(test_s) ** 3, test_y).ece > 3 * held_out.ece


def test_ece_by_hand() -> None:
    # two bins used: [0.1, 0.1] observed 0/2 → |0.1 - 0| ; [0.9, 0.9] observed 1/2 → 0.4
    r = reliability(np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 0, 1, 0], bool))
    assert r.ece == pytest.approx(0.5 * 0.1 + 0.5 * 0.4)
    assert r.count == [2, 2] and r.observed == [0.0, 0.5]


def test_a_map_cannot_be_fitted_on_one_class_or_scores_that_fall() -> None:
    with pytest.raises(ValueError, match="one class"):
        fit_map("isotonic", np.array([0.1, 0.2]), np.array([True, True]))
    with pytest.raises(ValueError, match="do not rise"):
        fit_map("sigmoid", np.linspace(0, 1, 50), np.linspace(0, 1, 50) < 0.5)


def test_the_policy_refuses_a_map_that_falls_or_is_half_given() -> None:
    base = {"method": "isotonic", "model": "m", "date": "2026-01-01", "ece": 0.01,
            "dataset": {"fingerprint": "f", "positives": 1, "negatives": 1}}
    ProbabilityMap.model_validate({**base, "scores": [0.1, 0.2], "probabilities": [0.1, 0.9]})
    with pytest.raises(ValueError, match="never fall"):
        ProbabilityMap.model_validate({**base, "scores": [0.1, 0.2],
                                       "probabilities": [0.9, 0.1]})
    with pytest.raises(ValueError, match="rise strictly"):
        ProbabilityMap.model_validate({**base, "scores": [0.2, 0.2],
                                       "probabilities": [0.1, 0.2]})
    with pytest.raises(ValueError, match="slope"):
        ProbabilityMap.model_validate({**base, "method": "sigmoid", "slope": 1.0})
    with pytest.raises(ValueError):
        ProbabilityMap.model_validate({**base, "method": "sigmoid", "slope": -1.0,
                                       "intercept": 0.0})


N = 400


def colour(k: int) -> tuple[int, int, int]:
    return (k % 200, 40 * (k // 200), 0)


def angle(k: int) -> float:
    return k * (math.pi / 2) / N


TEXTS = {"gun": unit(1, 0, 0), "beer": unit(0, 1, 0), "toy": unit(0, 0, 1)}
COLOURS = {colour(k): unit(math.cos(angle(k)), math.sin(angle(k)), 0) for k in range(N)}
POLICY = {
    "name": "probabilities",
    "model": {"name": "fake", "pretrained": "hand-made"},
    "templates": ["{}"],
    "categories": {
        "weapons": {"description": "d", "terms": ["gun"], "exceptions": ["toy"],
                    "action": "block", "threshold": {"value": 0.5},
                    "target": {"precision": 0.8}},
        "alcohol": {"description": "d", "terms": ["beer"], "action": "flag",
                    "threshold": {"value": 0.5}},
    },
}


@pytest.fixture
def noisy_set(tmp_path: Path) -> tuple[Path, Path]:
    """400 images; image k scores cos(angle(k)) for weapons, and is labelled weapons with a
    known probability of that score (so no threshold separates them)."""
    rng = np.random.default_rng(7)
    root = tmp_path / "labelled"
    for k in range(N):
        score = math.cos(angle(k))
        folder = root / ("weapons" if rng.random() < true_probability(np.array(score))
                         else "none")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{k:03d}.png").write_bytes(image_bytes(colour(k)))
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY, sort_keys=False))
    return root, policy


def moderator_of(policy: Path) -> Moderator:
    return Moderator(load_policy(policy), FakeEncoder(dict(TEXTS), dict(COLOURS)))


@pytest.mark.parametrize("method", ["isotonic", "sigmoid"])
def test_calibrate_writes_a_monotone_map_reports_its_reliability_and_results_give_it(
        noisy_set: tuple[Path, Path], tmp_path: Path, method: Any) -> None:
    labels, policy = noisy_set
    result = calibrate(policy, labels, load_moderator=lambda: moderator_of(policy),
                       min_positives=5, n_boot=50, probabilities=method)
    weapons, alcohol = result.outcomes
    assert weapons.probability is not None and weapons.reliability is not None
    assert alcohol.probability is None and "not fitted" in (alcohol.probability_message or "")
    assert weapons.reliability.ece < 0.15  # 120 held-out images: a loose bound
    assert any("expected calibration error" in line for line in threshold_diff(result))

    out = tmp_path / "calibrated.yaml"
    write_policy(result, policy, out)
    written = yaml.safe_load(out.read_text())["categories"]["weapons"]["probability"]
    assert written["method"] == method and written["model"] == "fake/hand-made"
    assert written["ece"] == pytest.approx(weapons.reliability.ece, abs=1e-4)
    assert written["dataset"]["positives"] == weapons.fit_positives
    new = load_policy(out)
    fitted = new.categories["weapons"].probability
    assert fitted is not None and new.categories["alcohol"].probability is None
    assert np.all(np.diff(fitted.of(np.linspace(-1, 1, 500))) >= 0)
    assert new.version != load_policy(policy).version  # probabilities are in the answers

    report = tmp_path / "report"
    write_report(result, report)
    summary = json.loads((report / "summary.json").read_text())["categories"]
    assert summary["weapons"]["probability"]["held_out"]["ece"] == pytest.approx(
        weapons.reliability.ece)
    assert sum(summary["weapons"]["probability"]["held_out"]["count"]) == (
        weapons.test_positives + weapons.test_negatives)
    assert summary["alcohol"]["probability"] is None
    assert (report / "weapons_reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (report / "alcohol_reliability.png").exists()
    assert "weapons_reliability.png" in (report / "index.html").read_text()

    # every result gives the probability beside the score, and says when there is none
    [moderated] = moderator_of(out).moderate([image_bytes(colour(0))], ids=["x"])
    assert moderated.decision is not None
    answer = moderated.to_dict()["categories"]
    assert answer["weapons"]["probability"] == pytest.approx(
        fitted(answer["weapons"]["score"]), abs=1e-5)
    assert answer["alcohol"]["probability"] == "uncalibrated"


def test_a_map_fitted_for_another_model_is_refused(noisy_set: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    from moderation import ModelMismatchError

    labels, policy = noisy_set
    result = calibrate(policy, labels, load_moderator=lambda: moderator_of(policy),
                       min_positives=5, n_boot=20, probabilities="isotonic")
    out = tmp_path / "calibrated.yaml"
    write_policy(result, policy, out)
    data = yaml.safe_load(out.read_text())
    data["categories"]["weapons"]["threshold"] = {"value": 0.5}  # only the map is fitted
    data["categories"]["weapons"]["probability"]["model"] = "another-model"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ModelMismatchError, match="weapons probability"):
        moderator_of(out)


def test_a_sigmoid_fits_scores_that_differ_by_a_hair() -> None:
    """Separated by 0.0002 (cosines of near-identical prompts): the fit finds the rise."""
    s = np.array([0.2999] * 50 + [0.3001] * 50)
    y = np.array([False] * 50 + [True] * 50)
    fitted = fit_map("sigmoid", s, y)
    p = ProbabilityMap.model_construct(**fitted)
    assert p(0.2999) < 0.5 < p(0.3001)
    with pytest.raises(ValueError, match="same score"):
        fit_map("sigmoid", np.full(10, 0.3), np.arange(10) < 5)
