"""The one way to decide from vectors: image frames' embeddings → one decision per image.

The service, ``scan``, calibration and everything that re-scores stored embeddings go through
:class:`Scorer`, so one rule holds everywhere: a category fires when any sampled frame of the
image crosses its threshold (the category's score is its maximum over the frames, and the
frame it came from is named per category), and the image's action is the most severe category
action. A still image is an animation of one frame. No torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

import numpy as np

from .decision import Decision, assemble, decide
from .policy import Policy
from .prompts import PolicyEmbeddings
from .scoring import score_images

__all__ = ["Scorer"]

R = TypeVar("R", np.ndarray, list[Decision])


def _per_image(rows: R, frames: Sequence[np.ndarray]) -> list[R]:
    """Rows of all frames, concatenated, split back into each image's rows."""
    bounds = np.cumsum([0] + [len(f) for f in frames]).tolist()
    return [rows[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


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

    def scores(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """Each image's score per category, the maximum over its frames.

        ``frames[i]``: ndarray of shape (n_frames_i, dim), unit rows. Returns ndarray of shape
        (n_images, n_categories), float32: what calibration fits thresholds on, and what
        :meth:`decide` compares with them.
        """
        if not frames:
            return np.zeros((0, len(self.text.category_ids)), np.float32)
        score = score_images(np.concatenate(frames), self.text).score
        return np.stack([part.max(axis=0) for part in _per_image(score, frames)])

    def decide(
        self,
        frames: Sequence[np.ndarray],
        frame_indices: Sequence[Sequence[int]] | None = None,
    ) -> list[Decision]:
        """One :class:`Decision` per image.

        ``frames[i]``: ndarray of shape (n_frames_i, dim) with unit rows, at least one frame.
        ``frame_indices[i][k]`` is the index in the file of frame k (default: 0, 1, …); each
        category's decision names the frame its score came from.
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
            names = list(frame_indices[i]) if frame_indices is not None else list(
                range(len(mine))
            )
            categories = {}
            for cid in self.text.category_ids:
                # the frame with the highest score (the first among equals)
                best = max(range(len(mine)), key=lambda k: (mine[k].categories[cid].score, -k))
                categories[cid] = replace(mine[best].categories[cid], frame=names[best])
            decisions.append(assemble(categories))
        return decisions
