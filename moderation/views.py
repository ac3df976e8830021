"""An upload is a set of views: each sampled frame whole, and crops of it when the policy asks.

A CLIP embedding describes the whole picture at 224 px: an object that fills a twentieth of a
photo barely moves it. Crops (a grid of overlapping tiles, each encoded on its own) are how a
small object is found. Each view is named in every result: the frame it belongs to (its index
in the file), its time in seconds (a video's frames), and its box in source pixels (a crop;
``None`` for the whole frame), in the upright image (after EXIF orientation), as a reviewer
sees it.

A stored embedding is keyed by a number: a whole frame's index in the file (0, 1, …), or
``-1 - k`` for the k-th crop of the upload (its frame and box are in the decision's ``views``).
So a stored vector's kind is its key's sign, and every decision stored before crops existed
keeps its meaning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

__all__ = ["CropGrid", "View", "crop_boxes", "crop_key", "draft_size_for", "keyed_views"]

_GRID = re.compile(r"^\s*([1-4])\s*[x×]\s*([1-4])\s*$")


@dataclass(frozen=True)
class View:
    """One view of an upload: frame ``frame`` of the file (at ``time`` seconds for a video),
    whole (``box`` None) or the crop ``box`` = (left, top, right, bottom) in source pixels."""

    frame: int
    time: float | None = None
    box: tuple[int, int, int, int] | None = None

    @property
    def is_crop(self) -> bool:
        return self.box is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "frame": self.frame,
            "time": None if self.time is None else round(self.time, 6),
            "box": None if self.box is None else list(self.box),
        }

    @classmethod
    def of_dict(cls, d: dict[str, Any]) -> View:
        box = d.get("box")
        return cls(int(d["frame"]), d.get("time"), tuple(box) if box else None)


def crop_key(k: int) -> int:
    """The stored key of an upload's k-th crop (whole frames are keyed by their index)."""
    return -1 - k


def keyed_views(views: list[View]) -> dict[int, View]:
    """An upload's views (frames whole and crops, in the order they were scored) by their
    stored keys."""
    crops = 0
    keyed = {}
    for view in views:
        if view.is_crop:
            keyed[crop_key(crops)] = view
            crops += 1
        else:
            keyed[view.frame] = view
    return keyed


@dataclass(frozen=True)
class CropGrid:
    """Crops of each frame: ``columns`` × ``rows`` tiles, neighbours sharing ``overlap`` of a
    tile's side, none cut when a tile would be narrower than ``min_side`` source pixels (a
    thumbnail cut into mush finds nothing)."""

    columns: int
    rows: int
    overlap: float = 0.2
    min_side: int = 256

    @classmethod
    def parse(cls, grid: str, overlap: float = 0.2, min_side: int = 256) -> CropGrid:
        """``"2x2"`` (columns x rows, each 1 to 4) → a grid. Raises ``ValueError``."""
        match = _GRID.match(grid)
        if match is None:
            raise ValueError(
                f"crops must be a grid of columns x rows, each 1 to 4, such as 2x2 or 3x2; "
                f"got {grid!r}"
            )
        return cls(int(match[1]), int(match[2]), overlap, min_side)

    @property
    def tiles(self) -> int:
        return self.columns * self.rows

    def __str__(self) -> str:
        return f"{self.columns}x{self.rows}"


def _spans(length: int, parts: int, overlap: float) -> list[tuple[int, int]]:
    """``parts`` spans covering ``[0, length)``, neighbours sharing ``overlap`` of a span."""
    if parts == 1:
        return [(0, length)]
    side = length / (parts - overlap * (parts - 1))
    step = side * (1 - overlap)
    spans = []
    for i in range(parts):
        start = int(round(i * step))
        end = length if i == parts - 1 else int(round(i * step + side))
        spans.append((start, min(end, length)))
    return spans


def crop_boxes(width: int, height: int, grid: CropGrid) -> list[tuple[int, int, int, int]]:
    """The grid's boxes over a ``width`` × ``height`` frame, row by row (left to right, top to
    bottom), in its pixels; none when a tile's shorter side would be under ``min_side`` (or
    the grid is 1x1: the whole frame is always a view)."""
    if grid.tiles <= 1:
        return []
    xs = _spans(width, grid.columns, grid.overlap)
    ys = _spans(height, grid.rows, grid.overlap)
    if min(min(b - a for a, b in xs), min(b - a for a, b in ys)) < grid.min_side:
        return []
    return [(x0, y0, x1, y1) for y0, y1 in ys for x0, x1 in xs]


def draft_size_for(size: int, grid: CropGrid | None) -> int:
    """The side a JPEG must keep when it is decoded at reduced scale (draft mode) so that
    each crop of ``grid`` still has ``size`` pixels on its shorter side."""
    if grid is None or grid.tiles <= 1:
        return size
    return size * max(grid.columns, grid.rows)


def cut(frame: Image.Image, boxes: list[tuple[int, int, int, int]],
        source: tuple[int, int]) -> list[Image.Image]:
    """The crops ``boxes`` (in source pixels, ``source`` = (width, height)) of ``frame``
    (that source, possibly decoded at a reduced scale)."""
    sx, sy = frame.width / source[0], frame.height / source[1]
    return [frame.crop((round(a * sx), round(b * sy), round(c * sx), round(d * sy)))
            for a, b, c, d in boxes]
