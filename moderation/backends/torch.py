"""The PyTorch backend: open_clip models on torch, CPU or CUDA.

The only module of the project that imports torch. Images go in as PIL images or as
preprocessed ndarrays of shape (n, 3, size, size), float32; vectors come out as ndarrays of
shape (n, dim), float32, unit rows: the contract of :class:`moderation.backends.ImageEncoder`
and :class:`moderation.backends.TextEncoder`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ModelError, WeightsUnavailableError
from ..weights import resolve_weights
from . import RandomWeightsWarning

__all__ = ["Encoder"]

RANDOM_SEED = 0


class Encoder:
    """A CLIP model that turns images and texts into unit vectors of the same space.

    Build one with :meth:`Encoder.load`. Outputs are ``float32`` arrays of shape
    ``(n, dim)`` whose rows have unit L2 norm.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        identity: str,
        batch_size: int = 16,
    ) -> None:
        self.model: Any = cast(Any, model.eval())  # open_clip models are untyped
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.identity = identity
        self.batch_size = batch_size
        with torch.inference_mode():
            self.dim = int(self.model.encode_text(self.tokenizer(["x"])).shape[-1])
        size = getattr(model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._visual: Any = self.model.visual

    def trace_image_tower(self) -> None:
        """Replace the image tower by a TorchScript trace of itself.

        Same arithmetic, but one call into C++ per batch instead of hundreds of Python-level
        ops: in a server whose other threads run Python (HTTP parsing, JSON), each of those
        ops had to win the GIL back, which slowed the forward pass several times over.
        TorchScript is deprecated in recent torch; should tracing fail, the eager tower stays
        (same results, slower under load) and a warning says so.
        """
        example = torch.zeros(1, 3, self.image_size, self.image_size)
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated"
                self._visual = torch.jit.trace(self.model.visual, example, check_trace=False)
        except Exception as e:  # any tracing failure leaves the eager tower in place
            warnings.warn(
                f"could not trace the image tower ({e}); using it untraced", stacklevel=2
            )

    @classmethod
    def load(
        cls,
        name: str,
        pretrained: str | None = None,
        *,
        config: str | Path | None = None,
        random_weights: bool = False,
        cache_dir: str | None = None,
        batch_size: int = 16,
        threads: int | None = None,
    ) -> Encoder:
        """Build open_clip architecture ``name`` with weights from ``pretrained``.

        ``pretrained`` is an open_clip tag (used from the cache, or downloaded when the hub can
        be reached) or a checkpoint file. ``config`` registers a custom architecture JSON
        first. ``random_weights=True`` (only ever on explicit request) skips the weights,
        seeding the initialisation so that every run builds the same model. ``threads`` sets
        torch's intra-op thread count for this process (e.g. cores / gunicorn workers).
        """
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        if config is not None:
            open_clip.add_model_config(str(config))
        if name not in open_clip.list_models():
            raise ModelError(
                f"unknown open_clip architecture {name!r}; available: "
                f"{', '.join(open_clip.list_models())}"
            )
        if random_weights:
            warnings.warn(
                f"{name} has RANDOM WEIGHTS: every score is meaningless. Use this only for "
                "benchmarks and smoke tests.",
                RandomWeightsWarning,
                stacklevel=2,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=None, pretrained_text=False
                )
            identity = f"{name}/random-weights-seed{RANDOM_SEED}-torch{torch.__version__}"
        else:
            if not pretrained:
                raise WeightsUnavailableError(
                    f"no weights given for {name}: pass a pretrained tag or a checkpoint "
                    f"file, or --random-weights for a smoke test. Known tags for {name}: "
                    f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or '(none)'}"
                )
            checkpoint, overrides, identity = resolve_weights(name, pretrained, cache_dir)
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name,
                    pretrained=checkpoint,
                    pretrained_text=False,
                    image_mean=overrides.get("mean"),
                    image_std=overrides.get("std"),
                    image_interpolation=overrides.get("interpolation"),
                    image_resize_mode=overrides.get("resize_mode"),
                )
            except Exception as e:  # torch/safetensors raise many types for a bad file
                raise ModelError(
                    f"cannot load weights for {name} from {checkpoint}: {e}. Is it an "
                    f"open_clip checkpoint of the {name} architecture?"
                ) from e
        tokenizer = open_clip.get_tokenizer(name)
        return cls(model, preprocess, tokenizer, identity, batch_size=batch_size)

    def preprocess_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images → ndarray of shape (n, 3, image_size, image_size), float32."""
        return torch.stack([self.preprocess(image) for image in images]).numpy()

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed images, ndarray of shape (n, 3, size, size) → ndarray of shape
        (n, dim), float32, unit rows."""
        with torch.inference_mode():
            features = self._visual(torch.from_numpy(np.ascontiguousarray(pixels)))
            return F.normalize(features.float(), dim=-1).numpy()

    def get_threads(self) -> int:
        """Intra-op threads this process computes with."""
        return int(torch.get_num_threads())

    def set_threads(self, threads: int) -> None:
        torch.set_num_threads(max(1, int(threads)))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images → ndarray of shape (n_images, dim), float32, unit rows."""
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            out[start : start + len(batch)] = self.encode_pixels(self.preprocess_images(batch))
        return out

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → ndarray of shape (n_texts, dim), float32, unit rows."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start : start + self.batch_size])
                features = self.model.encode_text(self.tokenizer(batch))
                out[start : start + len(batch)] = F.normalize(features.float(), dim=-1).numpy()
        return out
