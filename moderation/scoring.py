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

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .prompts import PolicyEmbeddings

__all__ = ["Scores", "ScoreColumns", "combine", "float16_dot", "one_blas_thread",
           "score_images"]


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

    score = combine(similarity, exception_similarity)
    return Scores(
        similarity=similarity.astype(np.float32, copy=False),
        exception_similarity=exception_similarity,
        closest_exception=closest,
        score=score.astype(np.float32, copy=False),
        term_similarity=[t.astype(np.float32, copy=False) for t in term_similarity],
    )


def combine(similarity: np.ndarray, exception_similarity: np.ndarray) -> np.ndarray:
    """The score from the category similarity and the closest exception's (NaN: none), by
    the rule above; same shapes in and out."""
    gap = np.nan_to_num(exception_similarity - similarity, nan=0.0)
    return np.clip(similarity - np.maximum(gap, 0.0), -1.0, 1.0)


class ScoreColumns:
    """What several policies' scores need from a product, in one matrix: each category's
    ensemble and its exceptions (not the terms, which only explain), rows shared by the
    policies given once. ``matrix``: ndarray of shape (n_rows, dim). Multiply the images by
    ``matrix.T`` once (:func:`float16_dot` for stored float16 vectors), then :meth:`scores`
    gives each policy's scores from that product."""

    def __init__(self, texts: list[PolicyEmbeddings]) -> None:
        stacked, spans = [], []
        for text in texts:
            blocks = [text.categories, *text.exceptions]
            stacked += blocks
            spans.append([len(b) for b in blocks])
        every = np.concatenate(stacked).astype(np.float32)
        self.matrix, inverse = np.unique(every, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        self._columns: list[tuple[np.ndarray, list[np.ndarray]]] = []
        at = 0
        for lengths in spans:
            n_categories = lengths[0]
            categories = inverse[at:at + n_categories]
            at += n_categories
            exceptions = []
            for n in lengths[1:]:
                exceptions.append(inverse[at:at + n])
                at += n
            self._columns.append((categories, exceptions))

    def scores(self, products: np.ndarray) -> list[np.ndarray]:
        """``products``: ndarray of shape (n_images, n_rows), the images times ``matrix.T``.
        Returns, per policy given, ndarray of shape (n_images, n_categories), float32: the
        same scores :func:`score_images` gives."""
        out = []
        for categories, exceptions in self._columns:
            similarity = products[:, categories]
            exception_similarity = np.full(similarity.shape, np.nan, np.float32)
            for i, columns in enumerate(exceptions):
                if len(columns):
                    exception_similarity[:, i] = products[:, columns].max(axis=1)
            out.append(combine(similarity, exception_similarity).astype(np.float32, copy=False))
        return out


#: float32's exponent bias (127) minus float16's (15): see :func:`float16_dot`.
_BIAS_GAP = np.float32(2.0**112)


def float16_dot(halves: np.ndarray, queries: np.ndarray, block: int = 512) -> np.ndarray:
    """``halves @ queries.T`` for float16 rows (given as their uint16 bit patterns, shape
    (n, dim)) and float32 queries (q, dim), without numpy's slow float16 conversion.

    Each float16 is widened with integer operations: its sign moved to bit 31, its exponent
    and mantissa shifted up by 13 bits. That float32 is the float16's value times 2^-112 (the
    exponent biases differ by 112; float16 subnormals become float32 subnormals of the same
    scaled value), so the queries are scaled by 2^112 instead and the products are exact.
    Works in blocks that stay in cache; about 3× faster than ``astype(float32)`` here.
    Infinities and NaNs (never in a unit vector) are not preserved."""
    n = len(halves)
    out = np.empty((n, len(queries)), np.float32)
    scaled = np.ascontiguousarray((queries.astype(np.float32) * _BIAS_GAP).T)
    widened = np.empty((min(block, n), halves.shape[1]), np.uint32)
    sign = np.empty_like(widened)
    for start in range(0, n, block):
        part = halves[start : start + block]
        w, s = widened[: len(part)], sign[: len(part)]
        np.copyto(w, part)
        np.bitwise_and(w, 0x8000, out=s)
        np.left_shift(s, 16, out=s)
        np.bitwise_and(w, 0x7FFF, out=w)
        np.left_shift(w, 13, out=w)
        np.bitwise_or(w, s, out=w)
        np.matmul(w.view(np.float32), scaled, out=out[start : start + len(part)])
    return out


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limits: Any = None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS on one thread meanwhile (threadpoolctl; the process's limit, restored
    when the last of the overlapping users leaves). For scans of stored blocks: each block's
    product is small, and a reading thread shares the cores; the BLAS's own threads spun
    waiting for work and took a third of a dry-run's time (BENCHMARKS.md)."""
    global _blas_users, _blas_limits
    from threadpoolctl import threadpool_limits

    with _blas_lock:
        if _blas_users == 0:
            _blas_limits = threadpool_limits(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limits.restore_original_limits()
                _blas_limits = None
