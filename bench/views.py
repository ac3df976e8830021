"""What crops cost: images/s with a 2x2 grid of crops over without, same model, same uploads,
in one process, alternating, and the latency of one 12-MP upload with and without crops.

ViT-B-32 with --random-weights (the compute of real weights), on the torch backend, through
``Moderator.moderate`` (decode, crops, one encoder batch per request, the scorer), batches of
``--batch`` distinct generated photos. Prints one line per run:

    views crops=none images=N batch=B images_per_s=… load=…
    views crops=2x2 images=N batch=B images_per_s=… ratio=… load=…
    latency crops=none p50_ms=… p95_ms=… decode_p50_ms=…
    latency crops=2x2 p50_ms=… p95_ms=… decode_p50_ms=…

``ratio``: crops' images/s over the run's images/s without, measured back to back (a 2x2 grid
is 5 encodings per frame: 0.2 if nothing else cost anything; decoding and batching move it).

    .venv/bin/python bench/views.py [--images 32] [--batch 8] [--runs 2] [--model ViT-B-32]
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synthetic import default_policy_data, load, random_encoder  # noqa: E402


def photo(seed: int, size: tuple[int, int]) -> bytes:
    """A noisy JPEG photo (not trivially compressible), ``size`` pixels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--latency", type=int, default=9, help="12-MP uploads timed one by one")
    args = parser.parse_args()

    from moderation import Moderator
    from moderation.images import decode_image
    from moderation.policy import parse_policy

    encoder = random_encoder(args.model)
    base = default_policy_data(args.model)
    cropped = copy.deepcopy(base)
    cropped["views"] = {"crops": "2x2", "overlap": 0.2, "min_side": 256}
    moderators = {
        "none": Moderator(parse_policy(yaml.safe_dump(base)), encoder),
        "2x2": Moderator(parse_policy(yaml.safe_dump(cropped)), encoder),
    }
    photos = [photo(i, (1600, 1200)) for i in range(args.images)]  # 2 MP
    moderators["none"].moderate(photos[:2])  # warm

    for _ in range(args.runs):
        rates = {}
        for name, moderator in moderators.items():
            started = time.perf_counter()
            for start in range(0, len(photos), args.batch):
                results = moderator.moderate(photos[start:start + args.batch])
                assert all(r.ok for r in results)
            rates[name] = len(photos) / (time.perf_counter() - started)
            ratio = f" ratio={rates[name] / rates['none']:.3f}" if name != "none" else ""
            print(f"views crops={name} images={len(photos)} batch={args.batch} "
                  f"images_per_s={rates[name]:.2f}{ratio} load={load()}", flush=True)

    big = [photo(1000 + i, (4000, 3000)) for i in range(args.latency)]  # 12 MP
    for name, moderator in moderators.items():
        grid = moderator.policy.crop_grid
        took, decoding = [], []
        for data in big:
            started = time.perf_counter()
            decode_image(data, draft_size=encoder.image_size, crops=grid)
            decoding.append(time.perf_counter() - started)
            started = time.perf_counter()
            [result] = moderator.moderate([data])
            took.append(time.perf_counter() - started)
            assert result.ok
        print(f"latency crops={name} p50_ms={statistics.median(took) * 1000:.0f} "
              f"p95_ms={np.percentile(took, 95) * 1000:.0f} "
              f"decode_p50_ms={statistics.median(decoding) * 1000:.0f} load={load()}",
              flush=True)


if __name__ == "__main__":
    main()
