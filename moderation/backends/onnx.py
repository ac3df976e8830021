"""The ONNX Runtime backend: a model exported by ``moderation model export`` (both towers as
ONNX, fp32 or int8), run without torch.

An exported folder holds ``image.onnx``, ``text.onnx``, the tokenizer's merges file and
``model.json``: where the weights came from (the source model's identity and a checksum of its
weights), the precision, the embedding size, and the preprocessing and tokenisation open_clip
applies for that model, which :mod:`moderation.backends.pixels` and
:mod:`moderation.backends.clip_text` reproduce exactly.

Identity: the source's, plus ``+onnx-fp32`` or ``+onnx-int8``. An fp32 export whose scores
matched the source within :data:`SCORE_TOLERANCE` when it was exported also accepts
thresholds calibrated on the source model; an int8 export is a model of its own and must be
calibrated with itself.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ModelError, WeightsUnavailableError
from . import EncoderBase, encode_in_batches
from .clip_text import ClipTokenizer
from .pixels import Preprocess

__all__ = ["FORMAT", "SCORE_TOLERANCE", "OnnxEncoder", "providers_for", "quantize"]

FORMAT = "moderation-onnx/1"
#: an fp32 export whose embeddings differ from the source's by no more than this (in any
#: component; scores, dot products of unit vectors, move by about as much) accepts the
#: source's calibrated thresholds
SCORE_TOLERANCE = 1e-4
METADATA = "model.json"


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(
            "the ONNX backend needs ONNX Runtime: pip install 'moderation[onnx]'"
        ) from None
    return onnxruntime


def providers_for(device: str) -> list[str]:
    """ONNX Runtime's execution providers for ``device`` (cpu, cuda, auto)."""
    available = _ort().get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ModelError(
            "--device cuda: ONNX Runtime has no CUDA provider here (providers: "
            f"{', '.join(available)}); install onnxruntime-gpu on a machine with a CUDA GPU, "
            "or use --device cpu")
    return ["CPUExecutionProvider"]  # auto, no GPU


def read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{folder} is not an exported model (no {METADATA}): make one with "
            "'moderation model export --out DIR' (needs torch), then pass --backend onnx "
            "--pretrained DIR")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ModelError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}; "
                         "export the model again with this version")
    return data


class OnnxEncoder(EncoderBase):
    """Images and texts → unit vectors with ONNX Runtime: the contract of
    :class:`moderation.backends.ImageEncoder` and :class:`moderation.backends.TextEncoder`.

    ``threads``: intra-op threads of a forward pass (``set_threads`` keeps one image session
    per thread count asked for, at most two: the worker's share and all cores)."""

    def __init__(self, folder: Path, *, threads: int | None = None, device: str = "cpu",
                 batch_size: int = 16) -> None:
        self.folder = folder
        self.metadata = meta = read_metadata(folder)
        self.precision: str = meta["precision"]
        source = meta["source"]["identity"]
        self.identity = f"{source}+onnx-{self.precision}"
        self._accepts = (self.identity, source) if meta.get("matches_source") else (
            self.identity,)
        self.dim = int(meta["embedding_dim"])
        image = meta["image"]
        self.image_size = int(image["size"])
        mean, std = image["mean"], image["std"]
        self.preprocess = Preprocess(self.image_size, (mean[0], mean[1], mean[2]),
                                     (std[0], std[1], std[2]), image["interpolation"],
                                     image["resize_mode"])
        text = meta["text"]
        self.tokenizer = ClipTokenizer(folder / text["vocabulary"], int(text["context_length"]),
                                       text["clean"])
        self.batch_size = batch_size
        self.device = device
        self._providers = providers_for(device)
        self.device_type = "cuda" if self._providers[0] == "CUDAExecutionProvider" else "cpu"
        self._threads = max(1, int(threads)) if threads else _default_threads()
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._text = self._session("text.onnx", self._threads)
        self._image_threads = self._threads
        self._image = self._image_session(self._threads)

    @property
    def accepts(self) -> tuple[str, ...]:
        """Its own identity, and the source model's when this is an fp32 export whose scores
        matched the source's (:data:`SCORE_TOLERANCE`)."""
        return self._accepts

    @classmethod
    def load(cls, folder: str | Path, **kwargs: Any) -> OnnxEncoder:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise WeightsUnavailableError(
                f"no exported model at {path}: make one with 'moderation model export --out "
                f"{path}' (needs torch)")
        return cls(path, **kwargs)

    def _session(self, name: str, threads: int) -> Any:
        ort = _ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(self.folder / name), sess_options=options,
                                    providers=self._providers)

    def _image_session(self, threads: int) -> Any:
        with self._lock:
            found = self._sessions.get(threads)
            if found is None:
                if len(self._sessions) >= 2:  # keep the worker's share and one other
                    for key in [k for k in self._sessions if k != self._threads][:1]:
                        del self._sessions[key]
                found = self._sessions[threads] = self._session("image.onnx", threads)
            return found

    def preprocess_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images → ndarray of shape (n, 3, image_size, image_size), float32."""
        return self.preprocess(images)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        out = self._image.run(None, {"pixels": np.ascontiguousarray(pixels, np.float32)})[0]
        return _unit(out)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images → ndarray of shape (n_images, dim), float32, unit rows."""
        return encode_in_batches(self, images, self.batch_size)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            vectors = self._text.run(None, {"tokens": self.tokenizer(batch)})[0]
            out[start : start + len(batch)] = _unit(vectors)
        return out

    def get_threads(self) -> int:
        return self._image_threads

    def set_threads(self, threads: int) -> None:
        self._image_threads = max(1, int(threads))
        self._image = self._image_session(self._image_threads)

    def prepare_threads(self, threads: int) -> None:
        """Build the image session for ``threads`` now (a server's lone requests use all
        cores), so that the first such request does not pay for it."""
        self._image_session(max(1, int(threads)))


def _default_threads() -> int:
    import os

    return os.cpu_count() or 1


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def quantize(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of an exported fp32 ONNX file's weights (activations are
    quantised at run time): ONNX Runtime's ``quantize_dynamic``."""
    _ort()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
