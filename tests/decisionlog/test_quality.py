"""The weighted precision/recall estimators, checked against a simulation where the truth is
known: a population of decisions, the review queue's design drawn from it many times."""

from __future__ import annotations

from typing import Any

import numpy as np

from decisionlog.quality import estimate_ratio

RATES = np.array([0.03, 0.2, 1.0, 0.2])  # audit rates of allow, flag, block; review: always
DECIDED = np.array([0.8, 0.8, 0.6, 0.8])  # the share of each stratum reviewers got through


def _population(rng: np.random.Generator, n: int = 20_000) -> tuple[np.ndarray, ...]:
    actions = rng.choice(4, size=n, p=[0.85, 0.05, 0.05, 0.05])  # allow flag review block
    fired = actions > 0
    truth = np.where(fired, rng.random(n) < 0.7, rng.random(n) < 0.03)
    return actions, fired, truth


def _draw(rng: np.random.Generator, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One queue: Poisson sampling at each action's rate, then reviewers decide a share of
    each stratum. Returns the decided units and their inclusion probabilities, as
    :func:`decisionlog.quality.design_sample` computes them (rate x decided share)."""
    queued = rng.random(len(actions)) < RATES[actions]
    decided = np.zeros(len(actions), bool)
    share = np.zeros(4)
    for a in range(4):
        members = np.flatnonzero(queued & (actions == a))
        k = int(round(DECIDED[a] * len(members)))
        decided[rng.choice(members, k, replace=False)] = True
        share[a] = k / max(len(members), 1)
    units = np.flatnonzero(decided)
    return units, RATES[actions[units]] * share[actions[units]]


def test_weighted_estimates_are_unbiased_within_their_stated_error() -> None:
    rng = np.random.default_rng(20261124)
    actions, fired, truth = _population(rng)
    true_precision = (fired & truth).sum() / fired.sum()
    true_recall = (fired & truth).sum() / truth.sum()
    draws: dict[str, list[Any]] = {"precision": [], "recall": [], "naive_recall": []}
    for _ in range(300):
        units, pi = _draw(rng, actions)
        f, y = fired[units], truth[units]
        precision = estimate_ratio(f & y, f, pi)
        recall = estimate_ratio(f & y, y, pi)
        assert precision is not None and recall is not None
        draws["precision"].append((precision.value, precision.standard_error,
                                   precision.interval[0] <= true_precision
                                   <= precision.interval[1]))
        draws["recall"].append((recall.value, recall.standard_error,
                                recall.interval[0] <= true_recall <= recall.interval[1]))
        draws["naive_recall"].append((f & y).sum() / y.sum())
    for name, truth_value in (("precision", true_precision), ("recall", true_recall)):
        values, errors, covered = (np.asarray(x, float) for x in zip(*draws[name], strict=True))
        bias = values.mean() - truth_value
        stated = errors.mean()
        assert abs(bias) < stated / 2, (name, bias, stated)  # bias well inside the error
        assert 0.8 < values.std() / stated < 1.25, (name, values.std(), stated)  # honest error
        assert 0.9 <= covered.mean() <= 0.99, (name, covered.mean())  # 95% intervals cover
    # without the weights, recall is badly off: flagged images are over-sampled
    naive = np.mean(draws["naive_recall"]) - true_recall
    recall_error = np.mean([e for _, e, _ in draws["recall"]])
    assert naive > 3 * recall_error


def test_a_census_is_exact_and_no_unit_in_the_denominator_is_no_estimate() -> None:
    ones = np.ones(5)
    census = estimate_ratio(np.array([1, 1, 0, 1, 0]), ones, ones)
    assert census is not None
    assert (census.value, census.standard_error, census.interval) == (0.6, 0.0, (0.6, 0.6))
    assert estimate_ratio(np.zeros(3), np.zeros(3), np.full(3, 0.5)) is None


def test_all_agreeing_verdicts_still_get_an_interval() -> None:
    """p = 1 from a sample: no variance by linearisation, but Wilson's interval is not [1,1]."""
    found = estimate_ratio(np.ones(20), np.ones(20), np.full(20, 0.1))
    assert found is not None and found.value == 1.0
    low, high = found.interval
    assert high == 1.0 and 0.8 < low < 0.9
