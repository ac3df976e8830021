"""Scores + thresholds → decisions, with the words that drove them. No torch, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .policy import Action, Policy
from .prompts import PolicyEmbeddings
from .scoring import Scores
from .views import View

if TYPE_CHECKING:
    from .banks import BankMatch

__all__ = [
    "UNCALIBRATED",
    "CategoryDecision",
    "Decision",
    "TermMatch",
    "ThresholdTable",
    "assemble",
    "category_severities",
    "decide",
]


#: what a result says for a category's probability when the policy has no fitted map for it
UNCALIBRATED = "uncalibrated"


@dataclass(frozen=True)
class TermMatch:
    """A term (or exception) and its cosine similarity to the image."""

    text: str
    similarity: float

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "similarity": round(self.similarity, 6)}


@dataclass(frozen=True)
class CategoryDecision:
    """One image against one category.

    ``margin = score - threshold``: positive means the score is over the category threshold
    by that much. Scores in ``[review_from, threshold)`` are flagged for review. ``frame`` is
    the index (in the file) of the frame the score came from: an animation's category score
    is its maximum over the sampled frames; 0 for a still image.
    """

    score: float
    similarity: float
    threshold: float
    review_from: float | None
    margin: float
    flagged: bool
    action: Action
    top_terms: list[TermMatch]
    closest_exception: TermMatch | None
    frame: int = 0
    #: the view the score came from (the frame, its time, a crop's box)
    view: View | None = None
    #: a video's persistence rule held over these seconds (start, end of the frames that
    #: crossed); ``None`` without a rule or for images
    span: tuple[float, float] | None = None
    #: the score as a probability, by the category's fitted map (``None``: it has none)
    probability: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": round(self.score, 6),
            "probability": (UNCALIBRATED if self.probability is None
                            else round(self.probability, 6)),
            "similarity": round(self.similarity, 6),
            "threshold": self.threshold,
            "review_from": self.review_from,
            "margin": round(self.margin, 6),
            "flagged": self.flagged,
            "action": self.action.value,
            "top_terms": [t.to_dict() for t in self.top_terms],
            "closest_exception": (
                self.closest_exception.to_dict() if self.closest_exception else None
            ),
            "frame": self.frame,
            "view": (self.view or View(self.frame)).to_dict(),
            "span": None if self.span is None else [round(t, 6) for t in self.span],
        }


@dataclass(frozen=True)
class Decision:
    """One image (or one frame) against a whole policy.

    ``action`` is the most severe action any category triggered (``allow`` when none did);
    ``triggered`` lists the categories that fired, most severe and largest margin first.
    """

    action: Action
    categories: dict[str, CategoryDecision]
    triggered: list[str] = field(default_factory=list)
    #: the hash-bank entries the upload matched (:mod:`moderation.banks`), which joined the
    #: classifier's action into ``action``
    matches: list[BankMatch] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return self.action is not Action.ALLOW

    @property
    def frame(self) -> int:
        """The frame of the most severe triggered category (of the highest margin when none
        triggered): the one frame to show a reviewer."""
        if self.triggered:
            return self.categories[self.triggered[0]].frame
        return max(self.categories.values(), key=lambda c: c.margin).frame


@dataclass(frozen=True)
class ThresholdTable:
    """A policy's thresholds under one profile, as arrays over ``category_ids``.

    ``value``, ``review_from``: ndarray of shape (n_categories,), float64, in score units
    (``review_from`` NaN where a category has no review band). ``severity``: ndarray of shape
    (n_categories,), int8, the severity of each category's configured action.
    """

    category_ids: list[str]
    value: np.ndarray
    review_from: np.ndarray
    severity: np.ndarray

    @classmethod
    def of(cls, policy: Policy, category_ids: list[str], profile: str | None = None
           ) -> ThresholdTable:
        thresholds = [policy.threshold_for(cid, profile) for cid in category_ids]
        return cls(
            category_ids=list(category_ids),
            value=np.array([t.value for t in thresholds], dtype=np.float64),
            review_from=np.array(
                [np.nan if t.review_from is None else t.review_from for t in thresholds],
                dtype=np.float64,
            ),
            severity=np.array(
                [Action(policy.categories[cid].action).severity for cid in category_ids],
                dtype=np.int8,
            ),
        )


def category_severities(score: np.ndarray, table: ThresholdTable) -> np.ndarray:
    """The rule that turns scores into category actions, for every score at once.

    ``score``: ndarray of shape (n, n_categories). A category takes its configured action
    when ``score >= value``, ``review`` when ``review_from <= score < value``, else
    ``allow``. Compared in float64, as Python floats would be. Returns ndarray of shape
    (n, n_categories), int8: the severity of each action (see :attr:`Action.severity`).
    """
    s = np.asarray(score, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        in_band = s >= table.review_from  # NaN (no band) compares False
    return np.where(
        s >= table.value, table.severity,
        np.where(in_band, np.int8(Action.REVIEW.severity), np.int8(0)),
    ).astype(np.int8)


def decide(
    scores: Scores, text: PolicyEmbeddings, policy: Policy, profile: str | None = None
) -> list[Decision]:
    """One :class:`Decision` per row of ``scores``, with the thresholds of ``profile``."""
    table = ThresholdTable.of(policy, text.category_ids, profile)
    severities = category_severities(scores.score, table)
    maps = [policy.categories[cid].probability for cid in text.category_ids]
    probabilities = [None if m is None else m.of(scores.score[:, col])
                     for col, m in enumerate(maps)]
    decisions = []
    for row in range(scores.score.shape[0]):
        categories: dict[str, CategoryDecision] = {}
        for col, cid in enumerate(text.category_ids):
            score = float(scores.score[row, col])
            action = Action.of_severity(severities[row, col])
            value = float(table.value[col])
            band = None if np.isnan(table.review_from[col]) else float(table.review_from[col])
            term_sims = scores.term_similarity[col][row]
            order = np.argsort(-term_sims, kind="stable")[: policy.top_terms]
            exception_index = int(scores.closest_exception[row, col])
            fitted = probabilities[col]
            categories[cid] = CategoryDecision(
                score=score,
                probability=None if fitted is None else float(fitted[row]),
                similarity=float(scores.similarity[row, col]),
                threshold=value,
                review_from=band,
                margin=score - value,
                flagged=action is not Action.ALLOW,
                action=action,
                top_terms=[
                    TermMatch(text.term_texts[col][i], float(term_sims[i])) for i in order
                ],
                closest_exception=(
                    TermMatch(
                        text.exception_texts[col][exception_index],
                        float(scores.exception_similarity[row, col]),
                    )
                    if exception_index >= 0
                    else None
                ),
            )
        decisions.append(assemble(categories))
    return decisions


def assemble(categories: dict[str, CategoryDecision]) -> Decision:
    """The decision of an image from its category decisions: the categories that fired, most
    severe and largest margin first, and the most severe action among them."""
    triggered = sorted(
        (cid for cid, c in categories.items() if c.flagged),
        key=lambda cid: (-categories[cid].action.severity, -categories[cid].margin),
    )
    overall = categories[triggered[0]].action if triggered else Action.ALLOW
    return Decision(overall, categories, triggered)
