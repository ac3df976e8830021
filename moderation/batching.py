"""Shares forward passes between the threads of a server: backend-neutral, on numpy arrays.

Works with any :class:`moderation.backends.ImageEncoder`; the backend only computes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Protocol

import numpy as np
from PIL import Image

from .backends import EncoderBase, ImageTextEncoder

__all__ = ["BatchingEncoder", "Occupancy"]


class Occupancy(Protocol):
    """How many other processes are running the model right now (see service.state)."""

    def enter(self) -> int:
        """Count this process in; return how many others are in."""
        ...

    def leave(self) -> None: ...


class BatchingEncoder(EncoderBase):
    """Shares forward passes between threads: images that callers submit at about the same
    time go through the model together.

    A CPU runs a batch of 8 much faster per image than 8 batches of 1, so a server whose
    requests each carry one image gains by pooling them. Each caller preprocesses its own
    images (in its own thread), then waits for its rows. The batching thread takes the first
    waiting image, then keeps collecting, up to ``max_batch``, while more images are already
    queued or while callers that announced themselves with :meth:`expect` (requests still
    decoding) have yet to submit, for at most ``max_wait`` seconds. A lone request never
    waits. Results are the same as the wrapped encoder's, up to float rounding.
    """

    def __init__(
        self,
        encoder: ImageTextEncoder,
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
        self.device_type = encoder.device_type
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: queue.Queue[tuple[np.ndarray, Future[np.ndarray]]] = queue.Queue()
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

    @property
    def accepts(self) -> tuple[str, ...]:
        return self.encoder.accepts

    def trace_image_tower(self) -> None:
        self.encoder.trace_image_tower()

    def prepare_threads(self, threads: int) -> None:
        self.encoder.prepare_threads(threads)

    def get_threads(self) -> int:
        return self.encoder.get_threads()

    def set_threads(self, threads: int) -> None:
        self.encoder.set_threads(threads)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_texts(texts)

    def preprocess_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encoder.preprocess_images(images)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images → ndarray of shape (n_images, dim), float32, unit rows."""
        if not images:
            self._arrived()
            return np.empty((0, self.dim), dtype=np.float32)
        return self.encode_pixels(self.encoder.preprocess_images(images))

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed images, ndarray of shape (n, 3, size, size) → ndarray of shape
        (n, dim), float32, unit rows: in forward passes shared with other callers."""
        futures: list[Future[np.ndarray]] = []
        for row in pixels:
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
            threads = self.encoder.get_threads()
            others = self.occupancy.enter() if self.occupancy is not None else 0
            lone = (
                self.lone_threads
                if len(batch) == 1 and self._expected <= 0 and others == 0
                else None
            )
            try:
                if lone is not None:
                    self.encoder.set_threads(lone)
                vectors = self.encoder.encode_pixels(np.stack([row for row, _ in batch]))
            except Exception as e:  # every caller of this batch learns why
                for _, future in batch:
                    future.set_exception(e)
                continue
            finally:
                if lone is not None:
                    self.encoder.set_threads(threads)
                if self.occupancy is not None:
                    self.occupancy.leave()
            for (_, future), vector in zip(batch, vectors, strict=True):
                future.set_result(vector)

