"""Small files made to cost seconds or gigabytes: each is decided or refused within a bounded
amount of work, with an error code and a message naming the limit and its setting."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import pytest
from PIL import Image

from moderation import ImageError
from moderation.images import MAX_ASPECT, ImageLimits, count_jpeg_scans, decode_image
from tests.hostile import big_canvas_gif, extreme_aspect_gif, extreme_aspect_png, many_scan_jpeg

# Generous bounds: these machines are shared and noisy. Before the limits, the same files
# took 16 to 64 s and up to 4 GB.
SECONDS = 3.0


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (extreme_aspect_png(20000, 1), (20000, 1)),
        (extreme_aspect_png(1, 20000), (1, 20000)),
        (extreme_aspect_gif(10799, 1), (10799, 1)),
        (extreme_aspect_png(9000, 3000), (9000, 3000)),
    ],
)
def test_extreme_aspect_ratios_are_cut_to_the_central_part(
    data: bytes, size: tuple[int, int]
) -> None:
    decoded = decode_image(data)
    assert (decoded.width, decoded.height) == size  # reported as uploaded
    [frame] = decoded.frames
    assert max(frame.size) <= MAX_ASPECT * min(frame.size)
    # large frames are also averaged down, keeping the short side >= 2 x 224
    assert min(frame.size) == (min(size) if min(size) < 2 * 2 * 224 else min(size) // 6)


def test_frames_at_the_pixel_limit_stay_cheap_through_conversion() -> None:
    """A 141 kB 16-bit PNG of 8000x8000 went through float64 at full size: 4.5 s and +1.7 GB.
    Frames are now averaged down before any conversion or rotation."""
    script = """
import io, json, resource, time
from PIL import Image
from moderation.images import decode_image
files = []
for mode, value in (("I;16", 40000), ("RGB", (1, 2, 3)), ("P", 3)):
    buffer = io.BytesIO()
    Image.new(mode, (8000, 8000), value).save(buffer, "PNG")
    files.append(buffer.getvalue())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
sizes = [decode_image(d).frames[0].size for d in files]
print(json.dumps({"sizes": sizes, "seconds": time.perf_counter() - started,
                  "grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["sizes"] == [[471, 471]] * 3  # 8000 / 17, rounded up: short side >= 448
    assert figures["seconds"] < 3 * SECONDS
    assert figures["grew_mb"] < 600  # the decoded frame itself (192-256 MB), and no copies


def test_shrinking_keeps_colours_and_orientation() -> None:
    """Palette images are converted before averaging (averaging palette indices would invent
    colours), and the EXIF orientation of the original is applied to the reduced frame."""
    image = Image.new("P", (2000, 1000), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 1000, 1000))  # left half blue, right half red
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    [frame] = decode_image(buffer.getvalue()).frames
    assert frame.size == (1000, 500)
    assert frame.getpixel((10, 10)) == (0, 0, 255) and frame.getpixel((990, 10)) == (255, 0, 0)

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: turn 90 degrees clockwise to view
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 1000), (0, 200, 0)).save(buffer, "JPEG", exif=exif.tobytes())
    decoded = decode_image(buffer.getvalue(), draft_size=100)  # JPEG draft, then shrink
    assert decoded.frames[0].size[1] > decoded.frames[0].size[0]  # upright: portrait


def test_the_cut_keeps_what_the_model_sees() -> None:
    """The model sees the central square; the cut keeps it, pixel for pixel."""
    image = Image.new("RGB", (900, 100), (255, 0, 0))
    image.paste((0, 255, 0), (400, 0, 500, 100))  # the central square is green
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    [frame] = decode_image(buffer.getvalue()).frames
    assert frame.size == (200, 100)
    assert frame.crop((50, 0, 150, 100)).getcolors() == [(100 * 100, (0, 255, 0))]


def test_extreme_aspect_ratios_stay_small_through_the_real_preprocessing() -> None:
    """open_clip's ViT-B-32 preprocessing (no weights needed) in a fresh process: peak memory
    and time stay flat. Before the cut, the 20000x1 PNG grew a worker by 4 GB in 16 s."""
    script = """
import json, resource, sys, time
import open_clip
from moderation.images import decode_image
from tests.hostile import extreme_aspect_gif, extreme_aspect_png
preprocess = open_clip.image_transform(224, is_train=False)
files = [extreme_aspect_png(20000, 1), extreme_aspect_png(1, 20000), extreme_aspect_gif(10799, 1)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
shapes = [tuple(preprocess(f).shape) for d in files for f in decode_image(d).frames]
print(json.dumps({"shapes": shapes, "seconds": time.perf_counter() - started,
                  "grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["shapes"] == [[3, 224, 224]] * 3
    assert figures["seconds"] < SECONDS
    assert figures["grew_mb"] < 100


def test_jpeg_scans_are_counted_without_decoding() -> None:
    def jpeg(**save: object) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "JPEG", **save)
        return buffer.getvalue()

    assert count_jpeg_scans(jpeg()) == 1
    assert count_jpeg_scans(jpeg(progressive=True)) == 10
    # marker-like bytes inside an APP segment (EXIF, ICC) are skipped, not counted
    exif = Image.Exif()
    exif[0x010E] = "\xff\xda" * 50  # ImageDescription
    assert count_jpeg_scans(jpeg(exif=exif.tobytes())) == 1
    assert count_jpeg_scans(many_scan_jpeg(64, 250)) == 250


def test_many_scan_progressive_jpeg_is_refused_before_decoding() -> None:
    data = many_scan_jpeg(7999, 1600)  # ~400 kB; 64 s of CPU before the limit
    started = time.perf_counter()
    with pytest.raises(ImageError, match=(
        r"the progressive JPEG has 1,600 scans .*; the limit is 100 "
        r"\(setting max_jpeg_scans, MODERATION_MAX_JPEG_SCANS in the service\)"
    )) as e:
        decode_image(data)
    assert e.value.code == "too_many_scans"
    assert time.perf_counter() - started < SECONDS


def test_progressive_jpeg_within_the_scan_limit_is_decoded() -> None:
    decoded = decode_image(many_scan_jpeg(300, 40))
    assert decoded.format == "JPEG" and decoded.frames[0].size[0] >= 224
    with pytest.raises(ImageError) as e:
        decode_image(many_scan_jpeg(300, 40), limits=ImageLimits(max_jpeg_scans=39))
    assert e.value.code == "too_many_scans"


def test_big_canvas_animation_is_refused_before_decoding() -> None:
    data = big_canvas_gif(4000, 600)  # 14 kB; 47 s and +600 MB before the budget
    started = time.perf_counter()
    with pytest.raises(ImageError, match=(
        r"the animation needs 600 frames of 4000x4000 decoded = 9,600,000,000 pixels; "
        r"the limit is 256,000,000 \(setting max_animation_pixels, "
        r"MODERATION_MAX_ANIMATION_PIXELS in the service\)"
    )) as e:
        decode_image(data)
    assert e.value.code == "animation_too_large"
    assert time.perf_counter() - started < SECONDS


def test_animation_within_the_budget_is_decoded_once_in_order() -> None:
    data = big_canvas_gif(400, 600)  # 96 M pixel-frames: within the default budget
    started = time.perf_counter()
    decoded = decode_image(data)
    assert decoded.n_frames == 600 and len(decoded.frames) == 8
    assert decoded.frame_indices == sorted(decoded.frame_indices)
    assert time.perf_counter() - started < SECONDS
    with pytest.raises(ImageError) as e:
        decode_image(data, limits=ImageLimits(max_animation_pixels=400 * 400 * 599))
    assert e.value.code == "animation_too_large"


def test_too_many_frames_names_its_setting() -> None:
    with pytest.raises(ImageError, match=r"600 frames; the limit is 100 \(setting "
                       r"max_animation_frames") as e:
        decode_image(big_canvas_gif(16, 600), limits=ImageLimits(max_animation_frames=100))
    assert e.value.code == "too_many_frames"


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="ImageLimits.max_jpeg_scans must be a positive"):
        ImageLimits(max_jpeg_scans=0)
