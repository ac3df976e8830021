"""Thresholds from labelled scores, and honest estimates of how they perform. No torch.

Built on :func:`sklearn.metrics.precision_recall_curve`: its ``precision`` and ``recall`` have
one more entry than ``thresholds`` (the last point, precision 1 at recall 0, has no threshold),
so only the first ``len(thresholds)`` points are candidates. An image is predicted positive when
``score >= threshold``, as the service decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import precision_recall_curve

from moderation.policy import Goal

__all__ = ["Evaluation", "OperatingPoint", "ThresholdFitter", "evaluate"]

MIN_POSITIVES = 10
MIN_NEGATIVES = 10


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    precision: float
    recall: float


def _goal_text(goal: Goal) -> str:
    return f"precision >= {goal.precision}" if goal.precision is not None else (
        f"recall >= {goal.recall}"
    )


class ThresholdFitter:
    """Fit one category's threshold to a goal, scikit-learn style.

    ``fit(scores, labels)`` sets ``threshold_`` (``None`` when the goal cannot be met or the
    data cannot tell), ``status_`` (``ok``, ``unreachable``, ``too_few_positives``,
    ``too_few_negatives``), ``message_`` (what happened, in a sentence), ``point_`` (the
    chosen operating point on the fitting data) and ``best_`` (when unreachable: the best
    value of the goal's metric that was reachable, and where).
    """

    def __init__(
        self, goal: Goal, min_positives: int = MIN_POSITIVES, min_negatives: int = MIN_NEGATIVES
    ) -> None:
        self.goal = goal
        self.min_positives = min_positives
        self.min_negatives = min_negatives

    def fit(self, scores: np.ndarray, labels: np.ndarray,
            weights: np.ndarray | None = None) -> ThresholdFitter:
        """``scores``: ndarray of shape (n_images,); ``labels``: same shape, bool;
        ``weights``: same shape, how many images of the population each one stands for (the
        inverse of its sampling probability; default 1). The minimum counts are of images,
        unweighted."""
        scores = np.asarray(scores, dtype=np.float64)
        labels = np.asarray(labels, dtype=bool)
        n_pos, n_neg = int(labels.sum()), int((~labels).sum())
        self.threshold_: float | None = None
        self.point_: OperatingPoint | None = None
        self.best_: OperatingPoint | None = None
        if n_pos < self.min_positives:
            self.status_ = "too_few_positives"
            self.message_ = (
                f"only {n_pos} positive images (at least {self.min_positives} are needed to "
                "estimate a threshold); not calibrated"
            )
            return self
        if n_neg < self.min_negatives:
            self.status_ = "too_few_negatives"
            self.message_ = (
                f"only {n_neg} negative images (at least {self.min_negatives} are needed); "
                "not calibrated"
            )
            return self

        precision, recall, thresholds = precision_recall_curve(labels, scores,
                                                               sample_weight=weights)
        precision, recall = precision[:-1], recall[:-1]  # aligned with thresholds now
        if self.goal.precision is not None:
            ok = precision >= self.goal.precision
            primary, secondary = recall, precision
            metric, target = "precision", self.goal.precision
            best_index = int(np.lexsort((recall, precision))[-1])  # max precision, then recall
        else:
            assert self.goal.recall is not None
            ok = recall >= self.goal.recall
            primary, secondary = precision, recall
            metric, target = "recall", self.goal.recall
            best_index = int(np.lexsort((precision, recall))[-1])
        if not ok.any():
            best = OperatingPoint(
                float(thresholds[best_index]),
                float(precision[best_index]),
                float(recall[best_index]),
            )
            self.status_ = "unreachable"
            self.best_ = best
            other = "recall" if metric == "precision" else "precision"
            self.message_ = (
                f"{metric} >= {target} cannot be reached on this data: the best {metric} is "
                f"{getattr(best, metric):.3f} (at {other} {getattr(best, other):.3f}, threshold "
                f"{best.threshold:.4f}); not calibrated"
            )
            return self
        candidates = np.flatnonzero(ok)
        # maximise the other metric; ties go to the metric we constrain, then the higher
        # threshold (fewer images flagged for the same result)
        order = np.lexsort((thresholds[candidates], secondary[candidates], primary[candidates]))
        chosen = int(candidates[order[-1]])
        self.threshold_ = float(thresholds[chosen])
        self.point_ = OperatingPoint(
            self.threshold_, float(precision[chosen]), float(recall[chosen])
        )
        self.status_ = "ok"
        self.message_ = (
            f"{_goal_text(self.goal)} met at threshold {self.threshold_:.4f} (precision "
            f"{self.point_.precision:.3f}, recall {self.point_.recall:.3f} on the fitting split)"
        )
        return self


@dataclass(frozen=True)
class Evaluation:
    """A threshold on held-out data: the point, bootstrap intervals, the confusion matrix."""

    threshold: float
    precision: float
    recall: float
    precision_interval: tuple[float, float]
    recall_interval: tuple[float, float]
    tp: int
    fp: int
    fn: int
    tn: int


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def evaluate(
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> Evaluation:
    """Precision and recall of ``score >= threshold``, with percentile-bootstrap intervals
    (images resampled with replacement, ``n_boot`` times, fixed ``seed``). Precision with no
    predicted positive, or recall with no positive, is NaN. With ``weights`` (each image's
    inverse sampling probability), precision and recall are weighted ratios, estimates for
    the population the images were sampled from; the confusion counts stay counts."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    predicted = scores >= threshold
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    tn = int((~predicted & ~labels).sum())
    rng = np.random.default_rng(seed)
    n = len(scores)
    idx = rng.integers(0, n, size=(n_boot, n))
    p_b, l_b, w_b = predicted[idx], labels[idx], w[idx]
    tp_b = (w_b * (p_b & l_b)).sum(axis=1)
    precision_b = _ratio(tp_b, (w_b * p_b).sum(axis=1))
    recall_b = _ratio(tp_b, (w_b * l_b).sum(axis=1))
    w_tp = float((w * (predicted & labels)).sum())
    tail = 100 * (1 - confidence) / 2

    def interval(values: np.ndarray) -> tuple[float, float]:
        if np.all(np.isnan(values)):
            return (float("nan"), float("nan"))
        lo, hi = np.nanpercentile(values, [tail, 100 - tail])
        return float(lo), float(hi)

    return Evaluation(
        threshold=threshold,
        precision=float(_ratio(np.array(w_tp), np.array((w * predicted).sum()))),
        recall=float(_ratio(np.array(w_tp), np.array((w * labels).sum()))),
        precision_interval=interval(precision_b),
        recall_interval=interval(recall_b),
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
    )
