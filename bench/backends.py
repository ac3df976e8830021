"""Every inference backend available here, in one process and one run: images/s at batch 1 and
batch 16 on preprocessed tensors, and the image-embedding cosine against torch fp32 on the same
images (ViT-B-32, random weights: the same arithmetic as real ones).

    .venv/bin/python bench/backends.py [--model ViT-B-32] [--fp32 DIR] [--int8 DIR]
        [--rounds 3]

``--fp32``/``--int8``: folders ``moderation model export`` wrote from the same model (random
weights); missing ones are exported first (into a temporary folder). Backends run in turns, a
round of each, ``--rounds`` times, and the best round counts: the machine is shared and
drifts, so the ratios between backends measured in one round are what to read.

    backend=torch-eager  batch1_ms=…  batch16_ms_per_image=…  images_per_s=…  cosine_min=1.0000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.throughput import best_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--fp32", type=Path)
    parser.add_argument("--int8", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from moderation.backends import RandomWeightsWarning
    from moderation.backends.onnx import OnnxEncoder
    from moderation.backends.torch import Encoder, export_onnx
    from moderation.cli import sample_images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        eager = Encoder.load(args.model, random_weights=True)
        traced = Encoder.load(args.model, random_weights=True)
    traced.trace_image_tower()
    folders = {"fp32": args.fp32, "int8": args.int8}
    scratch = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    for precision, folder in folders.items():
        if folder is None or not (folder / "model.json").is_file():
            folder = folders[precision] = scratch / precision
            print(f"exporting {args.model} ({precision}) to {folder} …", flush=True)
            export_onnx(eager, folder, precision=precision, images=sample_images(),
                        prompts=["a photo of a dog"], min_cosine=0.0)
    encoders = {"torch-eager": eager, "torch-traced": traced}
    for precision, folder in folders.items():
        assert folder is not None
        encoders[f"onnx-{precision}"] = OnnxEncoder.load(folder)

    images = sample_images(32, size=400)
    pixels = eager.preprocess_images(images)
    reference = eager.encode_pixels(pixels)
    one, sixteen = pixels[:1], pixels[:16]
    results: dict[str, dict[str, list[float]]] = {name: {"b1": [], "b16": []}
                                                 for name in encoders}
    for _ in range(args.rounds):
        for name, encoder in encoders.items():
            encoder.encode_pixels(sixteen)  # warm
            results[name]["b1"].append(statistics.median(
                [best_of(lambda e=encoder: e.encode_pixels(one), 1) for _ in range(7)]))
            results[name]["b16"].append(best_of(lambda e=encoder: e.encode_pixels(sixteen), 3) / 16)
    base = min(results["torch-eager"]["b16"])
    print(f"model {args.model} (random weights); {len(images)} images for the cosine; best of "
          f"{args.rounds} rounds")
    for name, encoder in encoders.items():
        vectors = encoder.encode_pixels(pixels)
        cosine = np.sum(vectors * reference, axis=1)
        b1, b16 = min(results[name]["b1"]), min(results[name]["b16"])
        print(f"backend={name:<13} batch1_ms={1000 * b1:6.1f}  batch16_ms_per_image="
              f"{1000 * b16:5.1f}  images_per_s={1 / b16:5.1f}  vs_torch={base / b16:4.2f}x  "
              f"cosine_min={cosine.min():.4f}  cosine_mean={cosine.mean():.4f}", flush=True)


if __name__ == "__main__":
    main()
