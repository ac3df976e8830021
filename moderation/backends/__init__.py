"""Inference backends behind one contract: images and texts in, unit vectors out.

One module per runtime (``torch``, ``onnx``), as clip-as-service keeps one executor per
runtime; what is not about a runtime (where weights come from: :mod:`moderation.weights`;
sharing forward passes between requests: :mod:`moderation.batching`) works on numpy arrays
for all. Which model to build, and how it runs, is one value, :class:`EncoderSpec`;
:func:`load_encoder` builds it. Importing this package imports no runtime.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

from ..errors import ModelError, WeightsUnavailableError

if TYPE_CHECKING:
    from ..policy import Policy

__all__ = [
    "EncoderBase", "EncoderSpec", "ImageEncoder", "ImageTextEncoder", "RandomWeightsWarning",
    "TextEncoder", "encode_in_batches", "load_encoder",
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


@dataclass(frozen=True)
class EncoderSpec:
    """Which model encodes, and how it runs: the one value every caller that chooses a model
    passes (the commands' model options, the service's settings, a scan's workers).

    A field left ``None`` takes what the policy's ``model:`` section names;
    :meth:`for_policy` fills them in. Plain values only: a spec is shipped to cluster workers.
    """

    #: open_clip architecture (e.g. ``ViT-B-32``); None: the policy's
    name: str | None = None
    #: open_clip pretrained tag or checkpoint file, or (onnx) a folder that ``moderation model
    #: export`` wrote; None: the policy's, when ``name`` is the policy's
    pretrained: str | None = None
    #: an open_clip architecture JSON for a custom architecture; None: the policy's, when
    #: ``name`` is the policy's
    config: str | None = None
    #: random weights instead of pretrained ones: every score is MEANINGLESS (benchmarks and
    #: smoke tests only; torch)
    random_weights: bool = False
    #: ``torch`` (open_clip) or ``onnx`` (an exported model, without torch); None: the policy's
    backend: str | None = None
    #: where forward passes run: ``cpu``, ``cuda``, or ``auto`` (CUDA when present)
    device: str = "cpu"
    #: images (and texts) per forward pass of ``encode_images`` (and ``encode_texts``)
    batch_size: int = 16
    #: intra-op threads of a forward pass; None: the runtime's choice
    threads: int | None = None
    #: the folder of the text-embedding cache (in its ``embeddings`` folder); None: the
    #: default, :func:`moderation.prompts.default_cache_path`
    cache_dir: str | Path | None = None

    @classmethod
    def for_policy(cls, policy: Policy, overrides: EncoderSpec | None = None) -> EncoderSpec:
        """The model ``policy`` names, with what ``overrides`` sets: ``name`` and ``backend``
        always filled in, ``pretrained`` and ``config`` the policy's for its own
        architecture only."""
        given = overrides or cls()
        named = policy.model
        name = given.name or named.name
        own = name == named.name
        return replace(
            given,
            name=name,
            pretrained=given.pretrained if given.pretrained is not None
            else named.pretrained if own else None,
            config=given.config if given.config is not None else named.config if own else None,
            backend=given.backend or named.backend,
        )


def load_encoder(spec: EncoderSpec) -> ImageTextEncoder:
    """The encoder ``spec`` names, on its backend (``name`` and ``backend`` must be given:
    :meth:`EncoderSpec.for_policy` fills them in). Raises :class:`ModelError`, or
    :class:`WeightsUnavailableError` saying how to provide the weights."""
    if spec.backend == "onnx":
        from .onnx import OnnxEncoder

        if spec.random_weights:
            raise ModelError("--random-weights applies when a model is exported "
                             "('moderation model export --random-weights'), not to an "
                             "exported folder")
        if not spec.pretrained:
            raise WeightsUnavailableError("--backend onnx needs --pretrained DIR, a "
                                          "folder 'moderation model export' wrote")
        return OnnxEncoder.load(spec.pretrained, threads=spec.threads, device=spec.device,
                                batch_size=spec.batch_size)
    if spec.backend == "torch":
        if spec.name is None:
            raise ModelError("no model architecture given (EncoderSpec.for_policy names "
                             "the policy's)")
        try:
            from .torch import Encoder
        except ImportError as e:
            raise ModelError(
                f"the torch backend needs torch and open_clip ({e}): pip install "
                "'moderation[torch]', or serve an exported model with --backend onnx"
            ) from None
        return Encoder.load(spec.name, spec.pretrained, config=spec.config,
                            random_weights=spec.random_weights, batch_size=spec.batch_size,
                            threads=spec.threads, device=spec.device)
    raise ModelError(f"unknown backend {spec.backend!r}: torch or onnx")


def encode_in_batches(encoder: ImageEncoder, images: Sequence[Image.Image],
                      batch_size: int) -> np.ndarray:
    """``encode_images`` for any backend: preprocess and encode ``batch_size`` images at a
    time → ndarray of shape (n_images, dim), float32, unit rows."""
    out = np.empty((len(images), encoder.dim), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        out[start : start + len(batch)] = encoder.encode_pixels(encoder.preprocess_images(batch))
    return out
