"""Untrusted image bytes → RGB frames the encoder can take.

Handles EXIF orientation, every common mode (palette, alpha, CMYK, 16-bit, greyscale),
animations (up to ``max_frames`` frames sampled evenly), and decodes JPEGs at reduced size
(Pillow's draft mode) since the model sees 224 px anyway. Refuses, with an
:class:`~moderation.errors.ImageError`, what is empty, not an image, truncated, or too large.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError

__all__ = ["ACCEPTED_FORMATS", "DecodedImage", "check_pixels", "decode_image", "to_rgb"]

#: Formats we decode (JPEG includes MPO). Others (PSD, EPS, …) are refused, not parsed.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_FRAMES = 8
#: Animations longer than this are refused: seeking far into one is quadratic work for GIF.
MAX_ANIMATION_FRAMES = 10_000
#: Background that transparent pixels are composited onto.
BACKGROUND = (255, 255, 255)

ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.init()  # registers every plugin, so that formats= can name MPO, WEBP, …


@dataclass(frozen=True)
class DecodedImage:
    """The frames of one image, ready for the encoder.

    ``frames`` are RGB images; ``frame_indices[i]`` is the index of ``frames[i]`` in the
    original file (always ``[0]`` for a still image). ``n_frames`` is the file's frame count.
    """

    frames: list[Image.Image]
    frame_indices: list[int]
    n_frames: int
    format: str
    width: int
    height: int


def sample_frame_indices(n_frames: int, max_frames: int) -> list[int]:
    """Up to ``max_frames`` indices spread evenly over ``range(n_frames)``, first and last in."""
    if n_frames <= max_frames:
        return list(range(n_frames))
    return sorted({int(round(i)) for i in np.linspace(0, n_frames - 1, max_frames)})


def to_rgb(frame: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB, transparency composited onto :data:`BACKGROUND`."""
    if frame.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: Pillow's convert() clips to 0..255 rather than rescaling.
        values = np.asarray(frame, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        frame = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8), "L")
    if frame.mode == "P":
        frame = frame.convert("RGBA" if "transparency" in frame.info else "RGB")
    if frame.mode in ("LA", "La", "PA", "RGBa"):
        frame = frame.convert("RGBA")
    if frame.mode == "RGBA":
        background = Image.new("RGB", frame.size, BACKGROUND)
        background.paste(frame, mask=frame.getchannel("A"))
        return background
    return frame.convert("RGB") if frame.mode != "RGB" else frame


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Raise ``ImageError("too_many_pixels")`` for an image over ``max_pixels``."""
    if width * height > max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,}",
        )


def decode_image(
    source: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    draft_size: int | None = 224,
) -> DecodedImage:
    """Decode one image from bytes or a file path.

    ``draft_size`` lets JPEGs decode at a reduced scale that keeps both sides at least this
    many pixels (``None`` decodes at full size). Raises :class:`ImageError`.
    """
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise ImageError("unreadable", f"cannot read {source}: {e.strerror or e}") from e
    else:
        data = source
    if not data:
        raise ImageError("empty", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as e:
        if _guess(data) != "image":
            raise ImageError(
                "corrupt_image", f"the data starts like a {_guess(data)} but is corrupt"
            ) from e
        raise ImageError(
            "unsupported_format",
            f"not an image in a supported format; accepted: {', '.join(ACCEPTED_FORMATS)}",
        ) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_many_pixels", f"refused as a decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError("corrupt_image", f"the {_guess(data)} data is corrupt: {e}") from e

    width, height = image.size
    check_pixels(width, height, max_pixels)
    n_frames = getattr(image, "n_frames", 1)
    if n_frames > MAX_ANIMATION_FRAMES:
        raise ImageError(
            "too_many_frames",
            f"the animation has {n_frames:,} frames; the limit is {MAX_ANIMATION_FRAMES:,}",
        )
    fmt = image.format or "unknown"
    try:
        if n_frames == 1:
            if draft_size is not None and fmt in ("JPEG", "MPO"):
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            frames = [to_rgb(ImageOps.exif_transpose(image))]
            indices = [0]
        else:
            indices = sample_frame_indices(n_frames, max_frames)
            frames = []
            for index in indices:
                image.seek(index)
                frames.append(to_rgb(ImageOps.exif_transpose(image.convert("RGBA"))))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(
            "corrupt_image", f"the {fmt} image is truncated or corrupt: {e}"
        ) from e
    finally:
        image.close()
    return DecodedImage(frames, indices, n_frames, fmt, width, height)


_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _guess(data: bytes) -> str:
    """The accepted format whose signature ``data`` starts with, else ``"image"``."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in _SIGNATURES.items():
        if data.startswith(signature):
            return name
    return "image"
