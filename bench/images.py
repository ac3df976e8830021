"""Reproducible, distinct, photo-like JPEGs for the benchmarks (cached under bench/out/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def photo_like_jpegs(count: int, size: tuple[int, int], seed: int = 0,
                     folder: Path = OUT) -> list[Path]:
    """Smooth colour fields plus sensor-like noise: a 12-MP one is 2-4 MB, like a phone photo."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"photo_{size[0]}x{size[1]}_{seed}_{i:03d}.jpg"
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # drawn even when cached
        if not path.exists():
            field = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC))
            noise = np.random.default_rng([seed, i]).normal(0, 6, field.shape).astype(np.int16)
            pixels = np.clip(field.astype(np.int16) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, "JPEG", quality=92)
        paths.append(path)
    return paths


def thumbnails(sources: list[Path], side: int = 512, folder: Path = OUT) -> list[Path]:
    """``side``-px (longest side) JPEG thumbnails of ``sources``."""
    paths = []
    for source in sources:
        path = folder / f"{source.stem}_thumb{side}.jpg"
        if not path.exists():
            with Image.open(source) as image:
                image.draft("RGB", (side, side))
                image.thumbnail((side, side), Image.Resampling.LANCZOS)
                image.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths
