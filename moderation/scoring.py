"""Similarities → category scores. Pure array maths, checkable by hand.

For an image embedding ``x`` and a category (all vectors unit length):

* ``similarity = x · c``, the cosine between the image and the category ensemble ``c``;
* ``exception_similarity = max_e x · e`` over the category's exception embeddings (NaN when
  the category has none);
* ``score = similarity - max(0, exception_similarity - similarity)``, clipped to [-1, 1].

So the score **is the cosine similarity to the category**, unless the image is closer to one of
the category's exceptions: then it loses twice the gap, and lands as far below the category
similarity as the exception is above it. An image closer to an exception than to the category
always scores lower than its similarity; one closer to the category is untouched. A score is in
cosine units, in [-1, 1], and a threshold is in the same units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .prompts import PolicyEmbeddings

__all__ = ["Scores", "score_images"]


@dataclass(frozen=True)
class Scores:
    """Scores of n images against a policy's categories.

    ``similarity``, ``exception_similarity``, ``score``: ndarray of shape
    (n_images, n_categories), float32. ``closest_exception``: same shape, int, the index of the
    closest exception (-1 where the category has none). ``term_similarity[i]``: ndarray of
    shape (n_images, n_terms_i), the cosine between each image and each term of category i.
    """

    similarity: np.ndarray
    exception_similarity: np.ndarray
    closest_exception: np.ndarray
    score: np.ndarray
    term_similarity: list[np.ndarray]


def score_images(images: np.ndarray, text: PolicyEmbeddings) -> Scores:
    """Score image embeddings, ndarray of shape (n_images, dim) with unit rows."""
    if images.ndim != 2 or images.shape[1] != text.categories.shape[1]:
        raise ValueError(
            f"image embeddings must have shape (n_images, {text.categories.shape[1]}); "
            f"got {images.shape}"
        )
    n_categories = len(text.category_ids)
    # One matrix product for every text vector of the policy, then slice it.
    blocks = [text.categories, *text.terms, *text.exceptions]
    all_similarities = images @ np.concatenate(blocks).T
    bounds = np.cumsum([0] + [len(b) for b in blocks])
    column = [all_similarities[:, bounds[i] : bounds[i + 1]] for i in range(len(blocks))]

    similarity = column[0]
    term_similarity = column[1 : 1 + n_categories]
    exception_blocks = column[1 + n_categories :]

    n_images = images.shape[0]
    exception_similarity = np.full((n_images, n_categories), np.nan, dtype=np.float32)
    closest = np.full((n_images, n_categories), -1, dtype=np.int64)
    for i, block in enumerate(exception_blocks):
        if block.shape[1]:
            closest[:, i] = block.argmax(axis=1)
            exception_similarity[:, i] = block.max(axis=1)

    gap = np.nan_to_num(exception_similarity - similarity, nan=0.0)
    score = np.clip(similarity - np.maximum(gap, 0.0), -1.0, 1.0)
    return Scores(
        similarity=similarity.astype(np.float32, copy=False),
        exception_similarity=exception_similarity,
        closest_exception=closest,
        score=score.astype(np.float32, copy=False),
        term_similarity=[t.astype(np.float32, copy=False) for t in term_similarity],
    )
