"""open_clip models: loading (pretrained tag, checkpoint file, or explicit random weights),
preprocessing, and batched encoding to unit-normalised float32 vectors.

This is the only module of the package that imports torch.
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ModelError, WeightsUnavailableError

__all__ = ["BatchingEncoder", "Encoder", "RandomWeightsWarning"]

#: How long we wait to learn whether the model hub can be reached at all.
NETWORK_PROBE_SECONDS = 3.0
RANDOM_SEED = 0


class RandomWeightsWarning(UserWarning):
    """The model has random weights: its scores mean nothing."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _offline_requested() -> bool:
    return any(
        os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "MODERATION_OFFLINE")
    )


def _reachable(host: str, port: int = 443, timeout: float = NETWORK_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _cached_checkpoint(cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The local path of a pretrained tag's weights if already downloaded, without network."""
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hf_hub)
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        if filename == "open_clip_pytorch_model.bin":
            candidates.insert(0, "open_clip_model.safetensors")
        for name in candidates:
            path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(path, str) and os.path.isfile(path):
                return path
    url = cfg.get("url", "")
    if url:
        root = cache_dir or os.path.expanduser("~/.cache/clip")
        path = os.path.join(root, os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def _hub_host(cfg: dict[str, Any]) -> str:
    if cfg.get("hf_hub"):
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    return urlparse(cfg.get("url", "")).hostname or "huggingface.co"


def _how_to_provide(name: str, tag: str) -> str:
    return (
        "To provide them, either:\n"
        "  1. on a machine with internet access, run\n"
        f"       python -c \"import open_clip; open_clip.create_model('{name}', "
        f"pretrained='{tag}')\"\n"
        "     then copy ~/.cache/huggingface (and ~/.cache/clip, if present) to this machine "
        "(or point HF_HOME at the copy); or\n"
        "  2. give a checkpoint file instead of the tag: --pretrained /path/to/checkpoint "
        "(.safetensors, .bin or .pt), or model.pretrained in the policy.\n"
        "For a smoke test or benchmark without real weights, pass --random-weights "
        "(scores are then meaningless)."
    )


def resolve_weights(
    name: str, pretrained: str, cache_dir: str | None = None
) -> tuple[str, dict[str, Any], str]:
    """Find the checkpoint for ``pretrained`` (a tag or a file path) without hanging.

    Returns ``(checkpoint_path, preprocess_overrides, identity)``. Raises
    :class:`WeightsUnavailableError` within seconds when the weights are neither a file, nor
    cached, nor downloadable because the hub cannot be reached.
    """
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), {}, f"{name}/sha256:{_sha256_file(path)[:16]}"
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        looks_like_path = os.sep in pretrained or pretrained.endswith(
            (".pt", ".pth", ".bin", ".safetensors")
        )
        what = f"no checkpoint file at {path}" if looks_like_path else "not a known tag"
        raise WeightsUnavailableError(
            f"pretrained={pretrained!r} for model {name!r}: {what}. Known tags for {name}: "
            f"{', '.join(tags) if tags else '(none)'}; or give the path of a checkpoint file."
        )
    overrides = {
        key: cfg[key]
        for key in ("mean", "std", "interpolation", "resize_mode")
        if cfg.get(key) is not None
    }
    identity = f"{name}/{pretrained}"
    cached = _cached_checkpoint(cfg, cache_dir)
    if cached:
        return cached, overrides, identity
    host = _hub_host(cfg)
    if _offline_requested() or not _reachable(host):
        reason = (
            "offline mode is set (HF_HUB_OFFLINE or MODERATION_OFFLINE)"
            if _offline_requested()
            else f"{host} cannot be reached"
        )
        raise WeightsUnavailableError(
            f"Pretrained weights for {name} '{pretrained}' are not in the local cache and "
            f"{reason}.\n{_how_to_provide(name, pretrained)}"
        )
    try:
        downloaded = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as e:  # network failures come in many types
        raise WeightsUnavailableError(
            f"Downloading weights for {name} '{pretrained}' failed: {e}\n"
            f"{_how_to_provide(name, pretrained)}"
        ) from e
    return downloaded, overrides, identity


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

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images → a float tensor of shape (n, 3, image_size, image_size)."""
        return torch.stack([self.preprocess(image) for image in images])

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Preprocessed images → ndarray of shape (n, dim), float32, unit rows."""
        with torch.inference_mode():
            features = self._visual(pixels)
            return F.normalize(features.float(), dim=-1).numpy()

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



class Occupancy(Protocol):
    """How many other processes are running the model right now (see service.state)."""

    def enter(self) -> int:
        """Count this process in; return how many others are in."""
        ...

    def leave(self) -> None: ...


class BatchingEncoder:
    """Shares forward passes between threads: images that callers submit at about the same
    time go through the model together.

    A CPU runs a batch of 8 much faster per image than 8 batches of 1, so a server whose
    requests each carry one image gains by pooling them. Each caller preprocesses its own
    images (in its own thread), then waits for its rows. The batching thread takes the first
    waiting image, then keeps collecting, up to ``max_batch``, while more images are already
    queued or while callers that announced themselves with :meth:`expect` (requests still
    decoding) have yet to submit, for at most ``max_wait`` seconds. A lone request never
    waits. Results are the same as :class:`Encoder`'s, up to float rounding.
    """

    def __init__(
        self,
        encoder: Encoder,
        max_batch: int = 16,
        max_wait: float = 0.02,
        lone_threads: int | None = None,
        occupancy: Occupancy | None = None,
    ) -> None:
        self.encoder = encoder
        # A batch of one, when no other request is on its way here and no other process
        # (``occupancy``: e.g. the other gunicorn workers) is running the model, may use more
        # threads (all cores) than this worker's share: the machine is quiet, latency counts.
        self.lone_threads = lone_threads
        self.occupancy = occupancy
        self.identity = encoder.identity
        self.image_size = encoder.image_size
        self.dim = encoder.dim
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: queue.Queue[tuple[torch.Tensor, Future[np.ndarray]]] = queue.Queue()
        self._expected = 0  # announced callers that have not submitted yet
        self._lock = threading.Lock()
        self._local = threading.local()  # per thread: has it announced itself, unsubmitted?
        self._thread = threading.Thread(target=self._run, name="moderation-batcher", daemon=True)
        self._thread.start()

    @contextmanager
    def expect(self) -> Iterator[None]:
        """Announce a caller that will call :meth:`encode_images` soon (a request that is
        still decoding), so that the batch being formed waits for it."""
        with self._lock:
            self._expected += 1
        self._local.announced = True
        try:
            yield
        finally:
            self._arrived()  # a no-op if it submitted; else (every image was bad) withdraw

    def _arrived(self) -> None:
        if getattr(self._local, "announced", False):
            self._local.announced = False
            with self._lock:
                self._expected -= 1

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_texts(texts)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images → ndarray of shape (n_images, dim), float32, unit rows."""
        pixels = self.encoder.preprocess_images(images) if images else None
        futures: list[Future[np.ndarray]] = []
        for row in pixels if pixels is not None else []:
            future: Future[np.ndarray] = Future()
            self._queue.put((row, future))
            futures.append(future)
        self._arrived()
        if not futures:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.stack([f.result() for f in futures])

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except queue.Empty:
                    pass
                left = deadline - time.monotonic()
                if self._expected <= 0 or left <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=min(left, 0.001)))
                except queue.Empty:
                    continue
            threads = torch.get_num_threads()
            others = self.occupancy.enter() if self.occupancy is not None else 0
            lone = (
                self.lone_threads
                if len(batch) == 1 and self._expected <= 0 and others == 0
                else None
            )
            try:
                if lone is not None:
                    torch.set_num_threads(lone)
                vectors = self.encoder.encode_pixels(torch.stack([row for row, _ in batch]))
            except Exception as e:  # every caller of this batch learns why
                for _, future in batch:
                    future.set_exception(e)
                continue
            finally:
                if lone is not None:
                    torch.set_num_threads(threads)
                if self.occupancy is not None:
                    self.occupancy.leave()
            for (_, future), vector in zip(batch, vectors, strict=True):
                future.set_result(vector)

