"""open_clip's inference preprocessing without torch: the same pixels (tested for equality
against open_clip's transform), with Pillow and numpy.

open_clip (torchvision on PIL images): resize (``shortest``: the short side to ``size``, the
long one to ``int(size * long / short)``; ``squash``: to ``size`` × ``size``) with Pillow's
bicubic or bilinear filter, centre crop (``round((h - size) / 2)`` from the top), RGB, /255,
then ``(x - mean) / std`` per channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["Preprocess"]

FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class Preprocess:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.interpolation not in FILTERS:
            raise ValueError(f"interpolation {self.interpolation!r}: only "
                             f"{', '.join(FILTERS)} are supported")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {self.resize_mode!r}: only "
                             f"{', '.join(RESIZE_MODES)} are supported")

    def one(self, image: Image.Image) -> np.ndarray:
        """An image → ndarray of shape (3, size, size), float32."""
        size, resample = self.size, FILTERS[self.interpolation]
        width, height = image.size
        if self.resize_mode == "squash":
            image = image.resize((size, size), resample)
        else:
            if width <= height:
                new = (size, int(size * height / width))
            else:
                new = (int(size * width / height), size)
            if new != (width, height):
                image = image.resize(new, resample)
            width, height = image.size
            top = int(round((height - size) / 2.0))
            left = int(round((width - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
        if image.mode != "RGB":
            image = image.convert("RGB")
        scaled = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        normalised = ((scaled - np.asarray(self.mean, np.float32))
                      / np.asarray(self.std, np.float32)).astype(np.float32)
        return np.ascontiguousarray(normalised.transpose(2, 0, 1))

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images → ndarray of shape (n, 3, size, size), float32."""
        return np.stack([self.one(image) for image in images])
