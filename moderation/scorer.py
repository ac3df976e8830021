"""The one way to decide from vectors: image frames' embeddings → one decision per image.

The service, ``scan``, calibration and everything that re-scores stored embeddings go through
:class:`Scorer`, so one rule holds everywhere: a category fires when any sampled frame of the
image crosses its threshold (the category's score is its maximum over the frames, and the
frame it came from is named per category), and the image's action is the most severe category
action. A still image is an animation of one frame. No torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from .decision import (
    CategoryDecision,
    Decision,
    ThresholdTable,
    assemble,
    category_severities,
    decide,
)
from .persistence import persistence_span
from .policy import Action, Policy
from .prompts import PolicyEmbeddings
from .scoring import ScoreColumns, score_images
from .views import View

__all__ = ["Assessment", "Scorer", "SharedProduct"]

R = TypeVar("R", np.ndarray, list[Decision])


def _per_image(rows: R, frames: Sequence[np.ndarray]) -> list[R]:
    """Rows of all frames, concatenated, split back into each image's rows."""
    bounds = np.cumsum([0] + [len(f) for f in frames]).tolist()
    return [rows[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@dataclass(frozen=True)
class Assessment:
    """What :meth:`Scorer.decide` decides for n images, as arrays, without the words (top
    terms, closest exceptions, frames): for re-deciding many stored images at once.

    ``score``: ndarray of shape (n_images, n_categories), float32, each category's maximum
    over the image's frames. ``margin``: same shape, float64, ``score - threshold``.
    ``severity``: same shape, int8, each category's action as its severity (0 allow, 1 flag,
    2 review, 3 block). ``action``: ndarray of shape (n_images,), int8, the image's action
    (the most severe of its categories').
    """

    category_ids: list[str]
    score: np.ndarray
    margin: np.ndarray
    severity: np.ndarray
    action: np.ndarray


def _max_over_frames(rows: np.ndarray, frame_counts: np.ndarray,
                     crop_rows: np.ndarray | None = None,
                     whole_only: np.ndarray | None = None) -> np.ndarray:
    """Rows of all views (images' views contiguous) → each image's column-wise maximum.
    ``crop_rows`` (bool per row) and ``whole_only`` (bool per column): the columns of
    categories that take no crops ignore the crops' rows (every image has a whole frame)."""
    starts = np.concatenate([[0], np.cumsum(frame_counts)[:-1]]).astype(np.intp)
    if crop_rows is not None and whole_only is not None and crop_rows.any() and whole_only.any():
        rows = rows.copy()
        rows[np.ix_(crop_rows, whole_only)] = -np.inf
    return np.maximum.reduceat(rows, starts, axis=0)


def _as_views(items: Sequence[View | int]) -> list[View]:
    """Views, or stored keys: a whole frame's index (``>= 0``), a crop's ``-1 - k`` (named
    as a crop of an unknown box when the caller has no description of it)."""
    return [v if isinstance(v, View) else View(v) if v >= 0 else View(0, None, UNKNOWN_BOX)
            for v in items]


#: the box of a stored crop whose description was not kept
UNKNOWN_BOX = (0, 0, 0, 0)


class Scorer:
    """Decides images from the embeddings of their sampled frames.

    ``policy`` and ``text`` (its embeddings, from :func:`moderation.prompts.embed_policy`)
    must belong together; ``profile`` picks a calibration profile (default: the categories'
    own thresholds).
    """

    def __init__(self, policy: Policy, text: PolicyEmbeddings, profile: str | None = None) -> None:
        policy.check_profile(profile)
        self.policy = policy
        self.text = text
        self.profile = profile

    @property
    def whole_only(self) -> np.ndarray:
        """Per category (in ``text.category_ids`` order): whether its score ignores crops."""
        return np.array([not self.policy.uses_crops(c) for c in self.text.category_ids], bool)

    def scores(self, frames: Sequence[np.ndarray],
               views: Sequence[Sequence[View | int]] | None = None) -> np.ndarray:
        """Each image's score per category, the maximum over the views it takes.

        ``frames[i]``: ndarray of shape (n_views_i, dim), unit rows; ``views[i]``: what each
        row is (a :class:`View`, or a stored key: negative for a crop; default: whole frames).
        Returns ndarray of shape (n_images, n_categories), float32: what calibration fits
        thresholds on, and what :meth:`decide` compares with them.
        """
        if not frames:
            return np.zeros((0, len(self.text.category_ids)), np.float32)
        score = score_images(np.concatenate(frames), self.text).score
        crops = None if views is None else np.array(
            [v.is_crop for image in views for v in _as_views(image)], bool)
        return _max_over_frames(score, np.array([len(f) for f in frames]), crops,
                                self.whole_only)

    def assess(self, vectors: np.ndarray, frame_counts: np.ndarray,
               profile: str | None = None, keys: np.ndarray | None = None) -> Assessment:
        """Decide many images at once, by the rule of :meth:`decide` (the same scores, the
        same thresholds), as arrays.

        ``vectors``: ndarray of shape (n_frames, dim), unit rows, each image's frames
        contiguous; ``frame_counts``: ndarray of shape (n_images,), each image's number of
        frames (at least 1). ``profile`` overrides the scorer's. ``keys``: each row's stored
        key (negative: a crop; default: all whole frames).
        """
        counts = np.asarray(frame_counts)
        ids = self.text.category_ids
        if len(counts) == 0:
            empty = np.zeros((0, len(ids)))
            return Assessment(ids, empty.astype(np.float32), empty, empty.astype(np.int8),
                              np.zeros(0, np.int8))
        if counts.min() < 1 or counts.sum() != len(vectors):
            raise ValueError(
                f"frame_counts must be positive and add up to the {len(vectors)} vectors; "
                f"they add up to {int(counts.sum())}"
            )
        score = _max_over_frames(score_images(vectors, self.text).score, counts,
                                 None if keys is None else np.asarray(keys) < 0,
                                 self.whole_only)
        return self.judge(score, profile)

    def judge(self, score: np.ndarray, profile: str | None = None) -> Assessment:
        """Images' scores (ndarray of shape (n_images, n_categories), each the maximum over
        the image's frames) against the thresholds of ``profile`` (default: the scorer's)."""
        ids = self.text.category_ids
        table = ThresholdTable.of(self.policy, ids, profile or self.profile)
        severity = category_severities(score, table)
        return Assessment(ids, score, score.astype(np.float64) - table.value, severity,
                          severity.max(axis=1))

    def decide(
        self,
        frames: Sequence[np.ndarray],
        frame_indices: Sequence[Sequence[View | int]] | None = None,
    ) -> list[Decision]:
        """One :class:`Decision` per image.

        ``frames[i]``: ndarray of shape (n_views_i, dim) with unit rows, at least one.
        ``frame_indices[i][k]`` is what row k is: a :class:`View` (a frame, whole or a crop),
        or a stored key (a frame's index in the file; negative: a crop); default: frames 0,
        1, …. A category's score is its maximum over the views it takes (crops only when
        the policy gives it crops); its decision names the view (and frame) it came from.
        """
        if not frames:
            return []
        if any(len(f) == 0 for f in frames):
            raise ValueError("every image needs at least one frame embedding")
        per_frame = decide(
            score_images(np.concatenate(frames), self.text), self.text, self.policy,
            self.profile,
        )
        decisions = []
        for i, mine in enumerate(_per_image(per_frame, frames)):
            views = _as_views(frame_indices[i]) if frame_indices is not None else [
                View(k) for k in range(len(mine))]
            whole = [k for k, v in enumerate(views) if not v.is_crop]
            categories = {}
            for cid in self.text.category_ids:
                taken = range(len(mine)) if self.policy.uses_crops(cid) else whole
                # the view with the highest score (the first among equals)
                best = max(taken, key=lambda k: (mine[k].categories[cid].score, -k))
                categories[cid] = self._persisting(
                    cid, replace(mine[best].categories[cid], frame=views[best].frame,
                                 view=views[best]),
                    [(views[k], mine[k].categories[cid].score) for k in taken])
            decisions.append(assemble(categories))
        return decisions

    def _persisting(self, cid: str, decided: CategoryDecision,
                    scored: list[tuple[View, float]]) -> CategoryDecision:
        """A video's category under its persistence rule: it keeps its action only when at
        least k sampled frames within w seconds cross the threshold (a frame crosses when
        any view of it that the category takes does); else it is decided as a score below
        the threshold (review in a review band, else allow). ``span``: the seconds of the
        frames that fired. Images and animations (no times) keep the any-frame rule."""
        rule = self.policy.persistence_of(cid)
        if rule is None or not decided.flagged or decided.score < decided.threshold or any(
                view.time is None for view, _ in scored):
            return decided
        crossing: dict[float, bool] = {}
        for view, score in scored:
            assert view.time is not None
            crossing[view.time] = crossing.get(view.time, False) or score >= decided.threshold
        times = sorted(crossing)
        span = persistence_span(times, [crossing[t] for t in times], rule.frames, rule.within_s)
        if span is not None:
            return replace(decided, span=span)
        in_band = decided.review_from is not None and decided.score >= decided.review_from
        action = Action.REVIEW if in_band else Action.ALLOW
        return replace(decided, action=action, flagged=action is not Action.ALLOW)



class SharedProduct:
    """Several policies' scores for the same stored images, from one matrix product: the
    text vectors they need (:class:`moderation.scoring.ScoreColumns`), those the policies
    share (an edit leaves most alone) once."""

    def __init__(self, scorers: Sequence[Scorer]) -> None:
        self.scorers = list(scorers)
        self.columns = ScoreColumns([s.text for s in self.scorers])
        self._widened: np.ndarray | None = None

    def scores(self, halves: np.ndarray, frame_counts: np.ndarray,
               keys: np.ndarray | None = None) -> list[np.ndarray]:
        """``halves``: ndarray of shape (n_frames, dim), float16 vectors as their uint16 bit
        patterns (as the decision log stores them), each image's frames contiguous;
        ``frame_counts``: each image's frames. Returns, per scorer, ndarray of shape
        (n_images, n_categories): each category's score, the maximum over the image's
        frames, for :meth:`Scorer.judge`."""
        counts = np.asarray(frame_counts)
        if len(counts) == 0:
            return [np.zeros((0, len(s.text.category_ids)), np.float32) for s in self.scorers]
        n = len(halves)
        if self._widened is None or len(self._widened) < n or (
                self._widened.shape[1] != halves.shape[1]):
            self._widened = np.empty((n, halves.shape[1]), np.float32)
        # into memory this product reuses: a new array per block costs as much again in
        # page faults as the conversion (float16_dot pays off for a few columns, not dozens)
        widened = self._widened[:n]
        np.copyto(widened, halves.view(np.float16))
        products = widened @ self.columns.matrix.T
        crops = None if keys is None else np.asarray(keys) < 0
        return [_max_over_frames(score, counts, crops, scorer.whole_only)
                for scorer, score in zip(self.scorers, self.columns.scores(products),
                                         strict=True)]
