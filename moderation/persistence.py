"""The persistence rule of a video's category: at least k sampled frames within w seconds
cross its threshold (one blurry frame is not a clip). Pure; the scorer applies it."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["persistence_span"]


def persistence_span(
    times: Sequence[float], crossing: Sequence[bool], k: int, window_s: float
) -> tuple[float, float] | None:
    """When a category persists: at least ``k`` sampled frames that cross its threshold within
    ``window_s`` seconds of each other (``k=1``: any crossing frame, the rule for images).

    ``times[i]`` is frame i's time in seconds and ``crossing[i]`` whether it crosses. Returns
    the span (start, end) in seconds of the *first* run that fires: the earliest crossing frame
    that has ``k - 1`` more within ``window_s`` after it (so also the earliest moment the rule
    fires), extended to every crossing frame within ``window_s`` of that first one. ``None``
    when no run fires. Times within 1e-9 s of the window's end count as inside.

    >>> persistence_span([0, 1, 2, 3], [True, True, True, False], k=3, window_s=3)
    (0, 2)
    >>> persistence_span([0, 1, 2, 3, 4], [True, False, False, False, True], k=2, window_s=3)
    """
    if len(times) != len(crossing):
        raise ValueError(f"persistence_span: {len(times)} times but {len(crossing)} crossings")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"persistence_span: k must be a positive integer; got {k!r}")
    if not math.isfinite(window_s) or window_s < 0:
        raise ValueError(f"persistence_span: window_s must be >= 0 seconds; got {window_s!r}")
    hits = sorted(t for t, c in zip(times, crossing, strict=True) if c)
    for i in range(len(hits) - k + 1):
        if hits[i + k - 1] - hits[i] <= window_s + 1e-9:
            end = i + k - 1
            while end + 1 < len(hits) and hits[end + 1] - hits[i] <= window_s + 1e-9:
                end += 1
            return hits[i], hits[end]
    return None
