"""Thresholds on synthetic score distributions where the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from calibration.fitting import ThresholdFitter, evaluate
from moderation.policy import Goal

POS, NEG = (0.30, 0.03), (0.22, 0.03)  # score ~ Normal(mean, sd) for positives, negatives
PREVALENCE = 0.1


def draw(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < PREVALENCE
    scores = np.where(labels, rng.normal(*POS, n), rng.normal(*NEG, n))
    return scores, labels


def true_precision(t: float) -> float:
    tp = PREVALENCE * norm.sf(t, *POS)
    fp = (1 - PREVALENCE) * norm.sf(t, *NEG)
    return float(tp / (tp + fp))


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_precision_target_holds_on_a_large_held_out_sample(target: float) -> None:
    scores, labels = draw(20_000, seed=1)  # 2,000 positives to fit on
    fitter = ThresholdFitter(Goal(precision=target)).fit(scores, labels)
    assert fitter.status_ == "ok" and fitter.threshold_ is not None
    held_scores, held_labels = draw(1_000_000, seed=2)
    held = evaluate(held_scores, held_labels, fitter.threshold_, n_boot=10)
    # The fitted precision estimate carries sampling error: with ~1,000 flagged images its
    # standard error is below 0.013, so the held-out precision may fall short by 0.03 at most.
    assert held.precision >= target - 0.03
    assert true_precision(fitter.threshold_) >= target - 0.03
    # and recall is maximised: a threshold 0.01 lower would break the target for real
    assert true_precision(fitter.threshold_ - 0.01) < target + 0.02


def test_recall_target_maximises_precision() -> None:
    scores, labels = draw(20_000, seed=3)
    fitter = ThresholdFitter(Goal(recall=0.9)).fit(scores, labels)
    assert fitter.status_ == "ok" and fitter.point_ is not None
    assert fitter.point_.recall >= 0.9
    # the recall of Normal(0.30, 0.03) above t is 0.9 at t = 0.30 - 1.2816 * 0.03
    assert fitter.threshold_ == pytest.approx(0.30 - 1.2816 * 0.03, abs=0.005)
    held = evaluate(*draw(500_000, seed=4), fitter.threshold_, n_boot=10)
    assert held.recall == pytest.approx(0.9, abs=0.02)


def test_exact_small_case_by_hand() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    labels = np.array([False, False, True, False, True, True])
    # threshold 0.5 → precision 2/2, recall 2/3; 0.3 → 3/4, recall 1
    fitter = ThresholdFitter(Goal(precision=1.0), min_positives=1, min_negatives=1)
    assert fitter.fit(scores, labels).threshold_ == 0.5
    fitter = ThresholdFitter(Goal(precision=0.75), min_positives=1, min_negatives=1)
    assert fitter.fit(scores, labels).threshold_ == 0.3
    fitter = ThresholdFitter(Goal(recall=1.0), min_positives=1, min_negatives=1)
    assert fitter.fit(scores, labels).threshold_ == 0.3  # the best precision with all found
    e = evaluate(scores, labels, 0.3)
    assert (e.tp, e.fp, e.fn, e.tn) == (3, 1, 0, 2)
    assert e.precision == 0.75 and e.recall == 1.0


def test_unreachable_target_says_what_was_reachable() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6] * 5)
    labels = np.array([False, True, False, True] * 5)
    fitter = ThresholdFitter(Goal(precision=0.9), min_positives=5, min_negatives=5)
    fitter.fit(scores, labels)
    assert fitter.status_ == "unreachable" and fitter.threshold_ is None
    assert fitter.best_ is not None and fitter.best_.precision == pytest.approx(0.5)
    assert fitter.message_ == (
        "precision >= 0.9 cannot be reached on this data: the best precision is 0.500 (at "
        "recall 1.000, threshold 0.6000); not calibrated"
    )


def test_too_few_positives_or_negatives() -> None:
    scores, labels = np.linspace(0, 1, 50), np.zeros(50, bool)
    labels[-4:] = True
    fitter = ThresholdFitter(Goal(precision=0.9)).fit(scores, labels)
    assert fitter.status_ == "too_few_positives" and fitter.threshold_ is None
    assert fitter.message_.startswith("only 4 positive images (at least 10 are needed")
    fitter = ThresholdFitter(Goal(precision=0.9)).fit(scores, ~labels)
    assert fitter.status_ == "too_few_negatives"
    assert fitter.message_.startswith("only 4 negative images")


def test_bootstrap_interval_covers_the_truth_and_shrinks_with_data() -> None:
    t, truth = 0.28, true_precision(0.28)
    # a 95% interval should cover the truth in about 95 of 100 independent samples; the
    # binomial spread of that count (sd ~2.2) makes 88..100 a safe band
    covered = 0
    for seed in range(100):
        e = evaluate(*draw(2_000, seed=100 + seed), t, n_boot=300, seed=seed)
        covered += e.precision_interval[0] <= truth <= e.precision_interval[1]
    assert 88 <= covered <= 100
    small = evaluate(*draw(2_000, seed=5), t)
    large = evaluate(*draw(50_000, seed=6), t)
    width = lambda e: e.precision_interval[1] - e.precision_interval[0]  # noqa: E731
    assert width(large) < width(small) / 2


def test_goal_needs_exactly_one_metric() -> None:
    with pytest.raises(ValueError, match="exactly one of precision or recall"):
        Goal(precision=0.9, recall=0.9)
    with pytest.raises(ValueError, match="exactly one of precision or recall"):
        Goal()
