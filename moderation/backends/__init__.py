"""Inference backends behind one contract: images and texts in, unit vectors out.

One module per runtime (``torch``, ``onnx``), as clip-as-service keeps one executor per
runtime; what is not about a runtime (where weights come from: :mod:`moderation.weights`;
sharing forward passes between requests: :mod:`moderation.batching`) works on numpy arrays
for all. Importing this package imports no runtime.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np
from PIL import Image

__all__ = [
    "EncoderBase", "ImageEncoder", "ImageTextEncoder", "RandomWeightsWarning", "TextEncoder",
    "encode_in_batches",
]


class RandomWeightsWarning(UserWarning):
    """The model has random weights: its scores mean nothing."""


class TextEncoder(Protocol):
    """Texts → ndarray of shape (n_texts, dim), float32, unit rows."""

    identity: str

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


class ImageEncoder(Protocol):
    """Images → unit vectors, in two steps that a batcher can separate: ``preprocess_images``
    (in the caller's thread) and ``encode_pixels`` (one forward pass for many callers).

    The last five members are capabilities that only some encoders have; every encoder
    declares them, :class:`EncoderBase` with the answer of one that has none of them."""

    identity: str
    #: the side of the square the model looks at, in pixels
    image_size: int
    dim: int

    def preprocess_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images → ndarray of shape (n, 3, image_size, image_size), float32."""
        ...

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """ndarray of shape (n, 3, image_size, image_size) → ndarray of shape (n, dim),
        float32, unit rows."""
        ...

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def get_threads(self) -> int:
        """Threads one forward pass uses in this process."""
        ...

    def set_threads(self, threads: int) -> None: ...

    #: where forward passes run: ``cpu`` or ``cuda``
    device_type: str

    @property
    def accepts(self) -> tuple[str, ...]:
        """The model identities whose calibrated thresholds hold for this encoder."""
        ...

    def expect(self) -> AbstractContextManager[None]:
        """Announce a caller that will encode images soon (a request still decoding)."""
        ...

    def trace_image_tower(self) -> None:
        """Make the image tower cheaper to call from a busy server, where the runtime can."""
        ...

    def prepare_threads(self, threads: int) -> None:
        """Get ready now to run forward passes with ``threads`` threads."""
        ...


class ImageTextEncoder(ImageEncoder, TextEncoder, Protocol):
    """Both towers of one model: what a :class:`~moderation.Moderator` holds."""


class EncoderBase:
    """The capabilities of :class:`ImageEncoder`, answered as an encoder that has none of them
    does. Every encoder inherits this and overrides what its runtime offers (torch:
    ``trace_image_tower``; ONNX Runtime: ``accepts``, ``prepare_threads``; the batching
    encoder: ``expect``), so that callers call them plainly, never probe for them."""

    identity: str
    #: where forward passes run: ``cpu`` or ``cuda``
    device_type: str = "cpu"

    @property
    def accepts(self) -> tuple[str, ...]:
        """The model identities whose calibrated thresholds hold for this encoder: its own
        (an fp32 ONNX export also accepts its source model's)."""
        return (self.identity,)

    def expect(self) -> AbstractContextManager[None]:
        """Announce a caller that will encode images soon (a request still decoding), so that
        a batch being formed waits for it: nothing to do without batching."""
        return contextlib.nullcontext()

    def trace_image_tower(self) -> None:
        """Make the image tower cheaper to call from a busy server (torch: a TorchScript
        trace); nothing to do elsewhere."""

    def prepare_threads(self, threads: int) -> None:
        """Get ready now to run forward passes with ``threads`` threads (ONNX Runtime builds
        a session per thread count); nothing to do elsewhere."""


def encode_in_batches(encoder: ImageEncoder, images: Sequence[Image.Image],
                      batch_size: int) -> np.ndarray:
    """``encode_images`` for any backend: preprocess and encode ``batch_size`` images at a
    time → ndarray of shape (n_images, dim), float32, unit rows."""
    out = np.empty((len(images), encoder.dim), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        out[start : start + len(batch)] = encoder.encode_pixels(encoder.preprocess_images(batch))
    return out
