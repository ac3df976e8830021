"""Policy-engine benchmark: prompt encoding, policy load (cold/warm cache), scan vs bare model.

    .venv/bin/python bench/policy_engine.py            # ViT-B-32, random weights
    .venv/bin/python bench/policy_engine.py --images 16 --model ViT-B-32

All figures come from one run on one machine; compare them as ratios. Random weights cost
exactly what real weights cost (same architecture, same arithmetic).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.images import photo_like_jpegs  # noqa: E402
from moderation.backends import RandomWeightsWarning  # noqa: E402
from moderation.backends.torch import Encoder  # noqa: E402
from moderation.cli import run_scan  # noqa: E402
from moderation.moderator import Moderator  # noqa: E402
from moderation.policy import load_policy  # noqa: E402
from moderation.prompts import EmbeddingCache  # noqa: E402


def timed(fn, repeat: int = 1) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--policy", default=str(ROOT / "policies" / "default.yaml"))
    parser.add_argument("--images", type=int, default=32, help="12-MP JPEGs to scan")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--data", default=str(ROOT / "bench" / "out"))
    args = parser.parse_args()

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        started = time.perf_counter()
        encoder = Encoder.load(args.model, random_weights=True, batch_size=args.batch_size)
        print(f"model load (random weights):      {time.perf_counter() - started:8.2f} s")

    prompts = [f"a photo of benchmark prompt number {i}." for i in range(args.prompts)]
    encoder.encode_texts(prompts[:4])  # warm-up
    seconds = timed(lambda: encoder.encode_texts(prompts), repeat=2)
    print(f"prompt encoding:                  {len(prompts) / seconds:8.1f} prompts/s "
          f"({1000 * seconds / len(prompts):.1f} ms each, batches of {args.batch_size})")

    policy = load_policy(args.policy)
    n_prompts = sum(
        len(policy.templates_for(cid)) * (len(c.terms) + len(c.exceptions))
        for cid, c in policy.categories.items()
    )
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(Path(tmp) / "e")
        cold = timed(lambda: Moderator(policy, encoder, cache))
        warm = timed(lambda: Moderator(policy, encoder, EmbeddingCache(cache.path)), repeat=3)
    print(f"policy load, cold cache:          {cold:8.2f} s  ({n_prompts} prompts)")
    print(f"policy load, warm cache:          {warm * 1000:8.1f} ms  "
          f"(cold/warm = {cold / warm:.0f}x)")

    files = photo_like_jpegs(args.images, (4000, 3000), folder=Path(args.data))
    mb = np.mean([f.stat().st_size for f in files]) / 1e6
    moderator = Moderator(policy, encoder, None)

    # The bare model: batched forward on already preprocessed tensors.
    rng = np.random.default_rng(0)
    size = encoder.image_size
    pixels = rng.standard_normal((args.batch_size, 3, size, size), np.float32)
    encoder.encode_pixels(pixels)  # warm-up
    forward = timed(lambda: encoder.encode_pixels(pixels), repeat=3)
    bare = args.batch_size / forward

    one = pixels[:1]
    encoder.encode_pixels(one)
    batch1 = timed(lambda: encoder.encode_pixels(one), repeat=5)

    decode = timed(lambda: moderator.decode(files[0]), repeat=3)
    full = timed(lambda: Image.open(files[0]).convert("RGB"), repeat=2)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scan.jsonl"
        run_scan(moderator, files[: args.batch_size], out, args.batch_size)  # warm-up
        out.unlink()
        scan_seconds = timed(lambda: run_scan(moderator, files, out, args.batch_size))
    scan = len(files) / scan_seconds

    print(f"12-MP JPEG ({mb:.1f} MB avg) full decode:   {full * 1000:8.1f} ms")
    print(f"12-MP JPEG draft decode + RGB:    {decode * 1000:8.1f} ms  "
          f"(full/draft = {full / decode:.1f}x)")
    print(f"bare model, batch 1:              {batch1 * 1000:8.1f} ms/image")
    print(f"bare model, batch {args.batch_size:<3d}:            {bare:8.1f} images/s "
          f"({1000 / bare:.1f} ms/image)")
    print(f"scan, {len(files)} x 12-MP JPEG:          {scan:8.1f} images/s "
          f"({1000 / scan:.1f} ms/image)")
    print(f"scan / bare model:                {scan / bare:8.2f}")


if __name__ == "__main__":
    main()
