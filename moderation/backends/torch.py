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
from . import EncoderBase, RandomWeightsWarning, encode_in_batches

__all__ = ["Encoder", "export_onnx", "resolve_device"]

RANDOM_SEED = 0


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when torch sees a GPU) → the device to use; a clear
    error when CUDA is asked for and absent."""
    if device not in ("cpu", "cuda", "auto"):
        raise ModelError(f"device {device!r}: cpu, cuda or auto")
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise ModelError("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() "
                         "is False: no GPU, or no driver); use --device cpu, or auto")
    return "cuda" if device == "auto" and available else ("cpu" if device == "auto" else device)


class Encoder(EncoderBase):
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
        device: str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.device_type = self.device.type  # cpu or cuda
        #: fp16 on a GPU (twice the throughput, same decisions); fp32 on the CPU
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        model = model.to(self.device, self.dtype) if self.device.type == "cuda" else model
        self.model: Any = cast(Any, model.eval())  # open_clip models are untyped
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.identity = identity
        self.batch_size = batch_size
        with torch.inference_mode():
            self.dim = int(self.model.encode_text(
                self.tokenizer(["x"]).to(self.device)).shape[-1])
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
        example = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device,
                              dtype=self.dtype)
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
        device: str = "cpu",
    ) -> Encoder:
        """Build open_clip architecture ``name`` with weights from ``pretrained``.

        ``pretrained`` is an open_clip tag (used from the cache, or downloaded when the hub can
        be reached) or a checkpoint file. ``config`` registers a custom architecture JSON
        first. ``random_weights=True`` (only ever on explicit request) skips the weights,
        seeding the initialisation so that every run builds the same model. ``threads`` sets
        torch's intra-op thread count for this process (e.g. cores / gunicorn workers).
        ``device``: ``cpu``, ``cuda`` (refused when torch sees no CUDA GPU) or ``auto``.
        """
        device = resolve_device(device)
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
            checkpoint, overrides, identity = resolve_weights(name, pretrained, open_clip,
                                                            cache_dir)
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
        return cls(model, preprocess, tokenizer, identity, batch_size=batch_size, device=device)

    def preprocess_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images → ndarray of shape (n, 3, image_size, image_size), float32."""
        return torch.stack([self.preprocess(image) for image in images]).numpy()

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed images, ndarray of shape (n, 3, size, size) → ndarray of shape
        (n, dim), float32, unit rows."""
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(pixels))
            if self.device.type != "cpu":
                batch = batch.to(self.device, self.dtype, non_blocking=True)
            features = self._visual(batch)
            return F.normalize(features.float(), dim=-1).cpu().numpy()

    def get_threads(self) -> int:
        """Intra-op threads this process computes with."""
        return int(torch.get_num_threads())

    def set_threads(self, threads: int) -> None:
        torch.set_num_threads(max(1, int(threads)))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images → ndarray of shape (n_images, dim), float32, unit rows."""
        return encode_in_batches(self, images, self.batch_size)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → ndarray of shape (n_texts, dim), float32, unit rows."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start : start + self.batch_size])
                features = self.model.encode_text(self.tokenizer(batch).to(self.device))
                out[start : start + len(batch)] = F.normalize(
                    features.float(), dim=-1).cpu().numpy()
        return out


# --- exporting to ONNX (``moderation model export``) -----------------------------------------


class _ImageTower(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model.encode_image(pixels))


class _TextTower(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model.encode_text(tokens))


def _weights_sha256(model: torch.nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_onnx(encoder: Encoder, out: Path, *, precision: str = "fp32",
                images: Sequence[Image.Image], prompts: Sequence[str],
                min_cosine: float = 0.99, opset: int = 17) -> dict[str, Any]:
    """Write both towers of ``encoder``'s model to ``out`` as ONNX (``precision`` fp32, or
    int8: dynamic quantisation of the weights), with the tokenizer's merges file and
    ``model.json``; check the export on ``images`` and ``prompts`` against the torch model.

    An int8 export whose image embeddings fall below ``min_cosine`` (against fp32) on any of
    the images is refused (:class:`ModelError`, with the figure) and nothing is left in
    ``out``. Returns the metadata written."""
    import json
    import shutil
    import tempfile

    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    from .onnx import FORMAT, METADATA, SCORE_TOLERANCE, OnnxEncoder, quantize

    if precision not in ("fp32", "int8"):
        raise ModelError(f"precision {precision!r}: fp32 or int8")
    tokenizer = encoder.tokenizer
    if not isinstance(tokenizer, SimpleTokenizer) or tokenizer.reduction_fn is not None:
        raise ModelError(
            f"{encoder.identity}: only models with CLIP's byte-pair tokenizer can be exported "
            f"(this one uses {type(tokenizer).__name__})")
    clean = {"_clean_lower": "lower", "_clean_whitespace": "whitespace",
             "_clean_canonicalize": "canonicalize"}.get(tokenizer.clean_fn.__name__)
    cfg = getattr(encoder.model.visual, "preprocess_cfg", None)
    if clean is None or not cfg or cfg.get("resize_mode", "shortest") not in (
            "shortest", "squash"):
        raise ModelError(f"{encoder.identity}: its preprocessing or text cleaning cannot be "
                         "reproduced without torch; it cannot be exported")
    size = cfg["size"]
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "architecture": encoder.identity.split("/", 1)[0],
        "source": {"identity": encoder.identity,
                   "weights_sha256": _weights_sha256(encoder.model)},
        "precision": precision,
        "embedding_dim": encoder.dim,
        "image": {"size": size, "mean": list(cfg["mean"]), "std": list(cfg["std"]),
                  "interpolation": cfg.get("interpolation", "bicubic"),
                  "resize_mode": cfg.get("resize_mode", "shortest")},
        "text": {"tokenizer": "clip-bpe", "vocabulary": Path(default_bpe()).name,
                 "context_length": int(tokenizer.context_length), "clean": clean},
        "opset": opset,
        "torch": torch.__version__,
    }
    model = encoder.model.float().eval()
    staging = Path(tempfile.mkdtemp(prefix="moderation-export-"))
    try:
        pixels = torch.zeros(2, 3, size, size)
        tokens = tokenizer(["a photo", "of a thing"])
        # with gradients on: under inference mode, attention takes a fused fast path that the
        # exporter cannot write as ONNX
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer chatter
            for tower, example, name, input_name in (
                    (_ImageTower(model), pixels, "image.onnx", "pixels"),
                    (_TextTower(model), tokens, "text.onnx", "tokens")):
                torch.onnx.export(
                    tower.eval(), (example,), str(staging / name), input_names=[input_name],
                    output_names=["embeddings"], opset_version=opset, dynamo=False,
                    dynamic_axes={input_name: {0: "n"}, "embeddings": {0: "n"}})
        shutil.copy(default_bpe(), staging / metadata["text"]["vocabulary"])
        (staging / METADATA).write_text(json.dumps({**metadata, "precision": "fp32"}))
        fp32 = OnnxEncoder(staging, threads=torch.get_num_threads())
        ours = fp32.preprocess_images(images)
        theirs = encoder.preprocess_images(images)
        if np.abs(ours - theirs).max() > 1e-5:
            raise ModelError(f"{encoder.identity}: the pixels prepared without torch differ "
                             "from open_clip's; this model cannot be exported")
        reference_images = encoder.encode_pixels(theirs)
        reference_texts = encoder.encode_texts(list(prompts))
        difference = max(float(np.abs(fp32.encode_pixels(ours) - reference_images).max()),
                         float(np.abs(fp32.encode_texts(list(prompts)) - reference_texts).max()))
        metadata["checked"] = {"images": len(images), "prompts": len(prompts),
                               "fp32_max_difference": difference}
        metadata["matches_source"] = precision == "fp32" and difference <= SCORE_TOLERANCE
        if precision == "int8":
            for name in ("image.onnx", "text.onnx"):
                quantize(staging / name, staging / f"{name}.int8")
                (staging / f"{name}.int8").replace(staging / name)
            (staging / METADATA).write_text(json.dumps(metadata))
            int8 = OnnxEncoder(staging, threads=torch.get_num_threads())
            image_cos = np.sum(int8.encode_pixels(ours) * reference_images, axis=1)
            text_cos = np.sum(int8.encode_texts(list(prompts)) * reference_texts, axis=1)
            metadata["checked"].update({
                "int8_image_cosine_min": float(image_cos.min()),
                "int8_image_cosine_mean": float(image_cos.mean()),
                "int8_text_cosine_min": float(text_cos.min()),
            })
            if float(image_cos.min()) < min_cosine:
                raise ModelError(
                    f"int8 refused: on {len(images)} images its embeddings reach a cosine of "
                    f"only {float(image_cos.min()):.4f} against fp32 (mean "
                    f"{float(image_cos.mean()):.4f}; the gate is {min_cosine}); serve the fp32 "
                    "export, or pass other images with --images")
        (staging / METADATA).write_text(json.dumps(metadata, indent=2))
        out.mkdir(parents=True, exist_ok=True)
        for path in staging.iterdir():
            shutil.move(str(path), out / path.name)
        return metadata
    finally:
        shutil.rmtree(staging, ignore_errors=True)
