"""Scores → probabilities: a map per category fitted on the fitting split (scikit-learn's
isotonic regression, or Platt's sigmoid by a logistic regression on the one score), and how
reliable it is on the held-out split (expected calibration error over equal-width bins, and
the bins themselves for the reliability diagram).

The map is written into the policy (:class:`moderation.policy.ProbabilityMap`); the core
applies it without scikit-learn (``np.interp`` or the sigmoid)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

__all__ = ["Method", "Reliability", "fit_map", "reliability"]

Method = Literal["isotonic", "sigmoid"]

#: decimals kept of a knot (scores are cosines: 1e-6 is far below any threshold's meaning)
_DECIMALS = 6


def fit_map(method: Method, scores: np.ndarray, labels: np.ndarray,
            weights: np.ndarray | None = None) -> dict[str, Any]:
    """The map's parameters as the policy stores them (``method`` and ``scores`` +
    ``probabilities``, or ``slope`` + ``intercept``). ``scores``: ndarray (n,), ``labels``:
    ndarray (n,) bool. Raises ``ValueError`` when the labels have one class only, or when the
    sigmoid would fall as the score rises (the scores do not separate the classes)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("the fitting split has images of one class only")
    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(s, y.astype(np.float64), sample_weight=weights)
        knots_x = np.round(np.asarray(iso.X_thresholds_, dtype=np.float64), _DECIMALS)
        knots_y = np.round(np.asarray(iso.y_thresholds_, dtype=np.float64), _DECIMALS)
        # rounding can make neighbours equal: keep each score once, its highest probability
        keep_x: list[float] = []
        keep_y: list[float] = []
        for x, p in zip(knots_x.tolist(), knots_y.tolist(), strict=True):
            if keep_x and x <= keep_x[-1]:
                keep_y[-1] = max(keep_y[-1], p)
            else:
                keep_x.append(x)
                keep_y.append(p)
        keep_y = np.maximum.accumulate(np.clip(keep_y, 0.0, 1.0)).tolist()
        if len(keep_x) > 2000:  # (never met with sklearn's pruned knots; the policy's bound)
            idx = np.unique(np.linspace(0, len(keep_x) - 1, 2000).round().astype(int))
            keep_x = [keep_x[i] for i in idx]
            keep_y = [keep_y[i] for i in idx]
        return {"method": "isotonic", "scores": keep_x, "probabilities": keep_y}
    # fitted on the standardised score (cosines spread over hundredths: raw, the solver's
    # tolerance can stop at a slope of 0), then written back in score units
    centre, spread = float(np.mean(s)), float(np.std(s))
    if spread < 1e-9:  # (rounding leaves ~1e-17 of one repeated score)
        raise ValueError("every image of the fitting split has the same score")
    lr = LogisticRegression(C=1e6, max_iter=1000)
    lr.fit(((s - centre) / spread).reshape(-1, 1), y, sample_weight=weights)
    slope = float(lr.coef_[0, 0]) / spread
    intercept = float(lr.intercept_[0]) - slope * centre
    if slope <= 0:
        raise ValueError("the scores do not rise with the label (the sigmoid's slope is "
                         f"{slope:.3g}): no probability map can be fitted")
    return {"method": "sigmoid", "slope": round(slope, _DECIMALS),
            "intercept": round(intercept, _DECIMALS)}


@dataclass(frozen=True)
class Reliability:
    """Held-out reliability of a map over ``bins`` equal-width bins of probability.

    ``ece``: expected calibration error, sum over bins of (bin weight / total) × |mean
    predicted − observed frequency|; ``predicted``, ``observed``, ``weight``: per non-empty
    bin, for the reliability diagram; ``brier``: mean squared error of the probabilities."""

    ece: float
    brier: float
    bins: int
    edges: list[float]
    predicted: list[float]
    observed: list[float]
    weight: list[float]
    count: list[int]


def reliability(probabilities: np.ndarray, labels: np.ndarray,
                weights: np.ndarray | None = None, bins: int = 10) -> Reliability:
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    total = float(w.sum())
    ece = 0.0
    predicted, observed, weight, count = [], [], [], []
    for b in range(bins):
        inside = which == b
        if not inside.any():
            continue
        wb = float(w[inside].sum())
        mean_p = float(np.average(p[inside], weights=w[inside]))
        freq = float(np.average(y[inside], weights=w[inside]))
        ece += wb / total * abs(mean_p - freq)
        predicted.append(mean_p)
        observed.append(freq)
        weight.append(wb)
        count.append(int(inside.sum()))
    brier = float(np.average((p - y) ** 2, weights=w)) if len(p) else 0.0
    return Reliability(ece=ece, brier=brier, bins=bins, edges=edges.tolist(),
                       predicted=predicted, observed=observed, weight=weight, count=count)
