"""Batching and tracing change no decision: the real tiny model, many threads at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from moderation.backends import EncoderBase
from moderation.backends.torch import Encoder
from moderation.batching import BatchingEncoder


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)) for _ in range(n)]


def test_traced_image_tower_gives_the_same_vectors(tiny_encoder: Encoder) -> None:
    batch = images(5)
    eager = tiny_encoder.encode_images(batch)
    traced = Encoder(tiny_encoder.model, tiny_encoder.preprocess, tiny_encoder.tokenizer,
                     tiny_encoder.identity, batch_size=3)
    traced.trace_image_tower()
    assert isinstance(traced._visual, torch.jit.ScriptModule)
    np.testing.assert_allclose(traced.encode_images(batch), eager, atol=1e-5)
    np.testing.assert_allclose(traced.encode_images(batch[:1]), eager[:1], atol=1e-5)


def test_concurrent_callers_share_batches_and_get_their_own_rows(tiny_encoder: Encoder) -> None:
    batcher = BatchingEncoder(tiny_encoder, max_batch=8, max_wait=0.05)
    sizes: list[int] = []
    real = tiny_encoder.encode_pixels

    def counting(pixels: torch.Tensor) -> np.ndarray:
        sizes.append(len(pixels))
        return real(pixels)

    tiny_encoder.encode_pixels = counting  # type: ignore[method-assign]
    try:
        work = [images(1 + i % 3, seed=i) for i in range(24)]
        expected = [real(tiny_encoder.preprocess_images(w)) for w in work]
        start = threading.Barrier(12)

        def call(w: list[Image.Image]) -> np.ndarray:
            with batcher.expect():
                try:
                    start.wait(timeout=5)
                except threading.BrokenBarrierError:
                    pass
                return batcher.encode_images(w)

        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(call, work))
    finally:
        del tiny_encoder.encode_pixels
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)
    assert sum(sizes) == sum(len(w) for w in work)
    assert max(sizes) > 1  # batches were shared
    assert batcher._expected == 0


def test_a_failed_forward_reaches_every_caller_of_its_batch(tiny_encoder: Encoder) -> None:
    class Broken(EncoderBase):
        identity, image_size, dim = "broken", 32, 32
        preprocess_images = staticmethod(tiny_encoder.preprocess_images)

        def encode_pixels(self, pixels: Any) -> Any:
            raise RuntimeError("out of memory")

        def get_threads(self) -> int:
            return 1

        def set_threads(self, threads: int) -> None:
            pass

    batcher = BatchingEncoder(Broken(), max_batch=4)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="out of memory"):
        batcher.encode_images(images(2))
    # and the batcher thread is still alive for the next caller
    with pytest.raises(RuntimeError, match="out of memory"):
        batcher.encode_images(images(1))


def test_an_announced_caller_that_never_submits_is_withdrawn(tiny_encoder: Encoder) -> None:
    batcher = BatchingEncoder(tiny_encoder)
    with batcher.expect():
        assert batcher._expected == 1
    assert batcher._expected == 0
    with batcher.expect():
        batcher.encode_images([])
        assert batcher._expected == 0
    assert batcher._expected == 0


def test_a_lone_batch_may_use_more_threads_and_they_are_restored(tiny_encoder: Encoder) -> None:
    seen: list[int] = []
    real = tiny_encoder.encode_pixels

    def spy(pixels: torch.Tensor) -> np.ndarray:
        seen.append(torch.get_num_threads())
        return real(pixels)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tiny_encoder.encode_pixels = spy  # type: ignore[method-assign]
    try:
        batcher = BatchingEncoder(tiny_encoder, lone_threads=2)
        batcher.encode_images(images(1))
        assert seen == [2] and torch.get_num_threads() == 1
        plain = BatchingEncoder(tiny_encoder)
        plain.encode_images(images(1))
        assert seen[-1] == 1
    finally:
        del tiny_encoder.encode_pixels
        torch.set_num_threads(before)


def test_no_extra_threads_while_another_process_runs_the_model(tiny_encoder: Encoder,
                                                               tmp_path: Any) -> None:
    from service.state import ModelOccupancy

    seen: list[int] = []
    real = tiny_encoder.encode_pixels

    def spy(pixels: torch.Tensor) -> np.ndarray:
        seen.append(torch.get_num_threads())
        return real(pixels)

    other = ModelOccupancy(tmp_path / "occupancy")  # another worker, sharing the file
    mine = ModelOccupancy(tmp_path / "occupancy")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tiny_encoder.encode_pixels = spy  # type: ignore[method-assign]
    try:
        batcher = BatchingEncoder(tiny_encoder, lone_threads=2, occupancy=mine)
        assert other.enter() == 0
        batcher.encode_images(images(1))
        other.leave()
        batcher.encode_images(images(1))
        assert seen == [1, 2]
        assert mine.enter() == 0  # every enter was matched by a leave
        mine.leave()
    finally:
        del tiny_encoder.encode_pixels
        torch.set_num_threads(before)
