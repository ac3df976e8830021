"""Untrusted image bytes → RGB frames the encoder can take.

Handles EXIF orientation, every common mode (palette, alpha, CMYK, 16-bit, greyscale),
animations (up to ``max_frames`` frames sampled evenly), and decodes JPEGs at reduced size
(Pillow's draft mode) since the model sees 224 px anyway. Refuses, with an
:class:`~moderation.errors.ImageError`, what is empty, not an image, truncated, or too large.

Every image costs a bounded amount of work (:class:`ImageLimits`), checked from the header
before anything expensive is decoded: pixels per frame, frames × canvas pixels for an
animation (a GIF frame can only be reached by compositing every frame before it), and the
number of scans of a progressive JPEG (each scan is a pass over all the coefficients). Frames
are cut to their central part of at most :data:`MAX_ASPECT` : 1 before the encoder resizes
them, so a 20000×1 image never becomes a 4,480,000×224 intermediate.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import ImageError
from .views import CropGrid, View, crop_boxes, cut, draft_size_for

__all__ = [
    "ACCEPTED_FORMATS",
    "Crop",
    "DecodedImage",
    "ImageLimits",
    "check_pixels",
    "decode_image",
    "prepare_frame",
    "to_rgb",
]

#: Formats we decode (JPEG includes MPO). Others (PSD, EPS, …) are refused, not parsed.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_FRAMES = 8
#: Frames are cut to their central part of at most this aspect ratio before resizing. The
#: model sees the central square (open_clip resizes the short side, then centre-crops), which
#: lies inside that part, so what it sees does not change; the resize stays small.
MAX_ASPECT = 2.0
#: Formats whose frame k can only be decoded by decoding (and compositing) every frame before
#: it: their whole animation counts against ``max_animation_pixels``.
SEQUENTIAL_FORMATS = ("GIF", "PNG", "WEBP")
#: Background that transparent pixels are composited onto.
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class ImageLimits:
    """The work one image may cost; past a limit it is refused before it is decoded.

    Each field is also a service setting: ``MODERATION_`` + its name in capitals.
    """

    #: pixels of one frame (width × height)
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: frames of an animation that are scored, sampled evenly (first and last included)
    max_frames: int = DEFAULT_MAX_FRAMES
    #: frames an animation may have at all
    max_animation_frames: int = 10_000
    #: frames that must be decoded × canvas pixels, for an animation (GIF, APNG, WebP: every
    #: frame up to the last sampled one; TIFF, MPO: the sampled frames)
    max_animation_pixels: int = 256_000_000
    #: scans of a progressive JPEG (libjpeg writes 10; each scan is a pass over the image)
    max_jpeg_scans: int = 100

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_frames", "max_animation_frames",
                     "max_animation_pixels", "max_jpeg_scans"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ImageLimits.{name} must be a positive integer; got {value!r}")


def _refuse(code: str, what: str, limit: int, setting: str) -> ImageError:
    return ImageError(
        code,
        f"{what}; the limit is {limit:,} (setting {setting}, "
        f"MODERATION_{setting.upper()} in the service)",
    )


ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.init()  # registers every plugin, so that formats= can name MPO, WEBP, …


@dataclass(frozen=True)
class DecodedImage:
    """The frames of one image, ready for the encoder.

    ``frames`` are RGB images; ``frame_indices[i]`` is the index of ``frames[i]`` in the
    original file (always ``[0]`` for a still image). ``n_frames`` is the file's frame count.
    ``frame_times[i]``: the time of ``frames[i]`` in seconds from the start, for a video
    (``None`` for images and animations).
    """

    frames: list[Image.Image]
    frame_indices: list[int]
    n_frames: int
    format: str
    width: int
    height: int
    frame_times: list[float] | None = None
    #: crops of the frames (the policy's grid), each from ``frames[crop.position]``
    crops: tuple[Crop, ...] = ()
    #: what ``hasher`` made of each frame (upright, RGB, before the aspect cut), in the
    #: order of ``frames``: the PDQ hashes for hash banks (:mod:`moderation.hashing`)
    hashes: tuple[Any, ...] = ()
    #: the SHA-256 of the upload's bytes (hex), where the decoder had them
    sha256: str | None = None

    def views(self) -> list[View]:
        """Every view, in the order their images are encoded: the frames whole, then the
        crops."""
        times: list[float | None] = (list(self.frame_times) if self.frame_times is not None
                                     else [None] * len(self.frames))
        return [View(i, t) for i, t in zip(self.frame_indices, times, strict=True)] + [
            View(self.frame_indices[c.position], times[c.position], c.box) for c in self.crops
        ]

    def view_images(self) -> list[Image.Image]:
        """The images of :meth:`views`, in the same order."""
        return [*self.frames, *(c.image for c in self.crops)]


@dataclass(frozen=True)
class Crop:
    """A crop of ``frames[position]``: ``box`` in source pixels (upright), ready to encode."""

    position: int
    box: tuple[int, int, int, int]
    image: Image.Image


def sample_frame_indices(n_frames: int, max_frames: int) -> list[int]:
    """Up to ``max_frames`` indices spread evenly over ``range(n_frames)``, first and last in."""
    if n_frames <= max_frames:
        return list(range(n_frames))
    return sorted({int(round(i)) for i in np.linspace(0, n_frames - 1, max_frames)})


def to_rgb(frame: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB, transparency composited onto :data:`BACKGROUND`."""
    if frame.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: Pillow's convert() clips to 0..255 rather than rescaling.
        values = np.asarray(frame, dtype=np.float32)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        values *= 255.0 / top
        frame = Image.fromarray(np.clip(values, 0, 255, out=values).astype(np.uint8), "L")
    if frame.mode == "P":
        frame = frame.convert("RGBA" if "transparency" in frame.info else "RGB")
    if frame.mode in ("LA", "La", "PA", "RGBa"):
        frame = frame.convert("RGBA")
    if frame.mode == "RGBA":
        background = Image.new("RGB", frame.size, BACKGROUND)
        background.paste(frame, mask=frame.getchannel("A"))
        return background
    return frame.convert("RGB") if frame.mode != "RGB" else frame


#: Modes whose pixels can be averaged (Image.reduce): not palette indices, not 1-bit.
_REDUCIBLE = ("L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "F")
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def shrink(frame: Image.Image, size: int) -> Image.Image:
    """``frame`` averaged down by a whole factor (a box filter: cheap, in C) while its short
    side stays at least twice ``size``; unchanged when it is already small.

    Converting and copying a full 64-megapixel frame (alpha compositing, 16-bit rescaling,
    EXIF rotation) costs gigabytes; the model only looks at ``size`` pixels, so everything
    after decoding works on the reduced frame. For JPEGs, draft mode already did this.
    """
    factor = min(frame.size) // (2 * size)
    if factor < 2:
        return frame
    if frame.mode not in _REDUCIBLE:
        target = {"P": "RGBA" if "transparency" in frame.info else "RGB", "PA": "RGBA",
                  "1": "L", "I;16": "I", "I;16B": "I", "I;16L": "I"}.get(frame.mode, "RGB")
        frame = frame.convert(target)
    return frame.reduce(factor)


def orient(frame: Image.Image, orientation: int | None) -> Image.Image:
    """``frame`` turned upright by its EXIF orientation (1 to 8; anything else: as it is)."""
    method = _ORIENTATIONS.get(orientation or 1)
    return frame.transpose(method) if method is not None else frame


def prepare_frame(
    frame: Image.Image, size: int | None, orientation: int | None = None
) -> Image.Image:
    """A decoded frame → what the encoder takes: averaged down while it stays at least twice
    ``size`` (``None``: kept whole), turned upright, RGB, cut to :data:`MAX_ASPECT`."""
    if size is not None:
        frame = shrink(frame, size)
    return crop_aspect(to_rgb(orient(frame, orientation)))


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Raise ``ImageError("too_many_pixels")`` for an image over ``max_pixels``."""
    if width * height > max_pixels:
        raise _refuse(
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height:,} pixels",
            max_pixels,
            "max_pixels",
        )


def crop_aspect(frame: Image.Image, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """The central part of ``frame`` whose long side is at most ``max_aspect`` × its short
    side (``frame`` itself when it is already within)."""
    width, height = frame.size
    short = max(1, min(width, height))
    long_side = max(1, int(short * max_aspect))
    if width > long_side:
        left = (width - long_side) // 2
        return frame.crop((left, 0, left + long_side, height))
    if height > long_side:
        top = (height - long_side) // 2
        return frame.crop((0, top, width, top + long_side))
    return frame


def count_jpeg_scans(data: bytes) -> int:
    """How many scans (SOS markers) a JPEG has, without decoding it.

    Marker segments before the first scan are skipped by their lengths (so that bytes inside
    EXIF or ICC data are not mistaken for markers). After it, ``FF DA`` is counted where it
    occurs: inside entropy-coded data every ``FF`` byte is followed by ``00`` or a restart
    marker, so only a table segment between scans could add a spurious count, which can only
    make a crafted file look worse.
    """
    i = 2  # after SOI
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return 0  # not a marker: corrupt, the decoder will say so
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:
            return data.count(b"\xff\xda", i)
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return 0


def decode_image(
    source: bytes | str | Path,
    *,
    limits: ImageLimits | None = None,
    draft_size: int | None = 224,
    crops: CropGrid | None = None,
    hasher: Callable[[Image.Image], Any] | None = None,
    hash_size: int = 256,
) -> DecodedImage:
    """Decode one image from bytes or a file path, within ``limits`` (default: the defaults).

    ``draft_size`` lets JPEGs decode at a reduced scale that keeps both sides at least this
    many pixels (``None`` decodes at full size). ``crops``: also cut this grid from each
    frame, from the decoded image before any resize (a JPEG is decoded at the scale that
    keeps each crop ``draft_size`` wide). ``hasher``: called on each frame upright and RGB,
    before its cut to :data:`MAX_ASPECT`, decoded at ``hash_size`` or more (a perceptual hash
    of the whole picture); its results are the image's ``hashes``. Raises
    :class:`ImageError`.
    """
    limits = limits or ImageLimits()
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

    try:
        decoded = _decode_opened(image, data, limits, draft_size, crops, hasher, hash_size)
        return replace(decoded, sha256=hashlib.sha256(data).hexdigest())
    finally:
        image.close()


def _decode_opened(
    image: Image.Image, data: bytes, limits: ImageLimits, draft_size: int | None,
    grid: CropGrid | None = None, hasher: Callable[[Image.Image], Any] | None = None,
    hash_size: int = 256,
) -> DecodedImage:
    width, height = image.size
    check_pixels(width, height, limits.max_pixels)
    fmt = image.format or "unknown"
    if fmt in ("JPEG", "MPO"):
        scans = count_jpeg_scans(data)
        if scans > limits.max_jpeg_scans:
            raise _refuse(
                "too_many_scans",
                f"the progressive JPEG has {scans:,} scans (each one a pass over all "
                "its pixels)",
                limits.max_jpeg_scans,
                "max_jpeg_scans",
            )
    try:
        n_frames = getattr(image, "n_frames", 1)  # reads frame headers only, decodes nothing
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError("corrupt_image", f"the {fmt} image is truncated or corrupt: {e}") from e
    if n_frames > limits.max_animation_frames:
        raise _refuse(
            "too_many_frames",
            f"the animation has {n_frames:,} frames",
            limits.max_animation_frames,
            "max_animation_frames",
        )
    indices = sample_frame_indices(n_frames, limits.max_frames)
    if n_frames > 1:
        decoded_frames = indices[-1] + 1 if fmt in SEQUENTIAL_FORMATS else len(indices)
        work = decoded_frames * width * height
        if work > limits.max_animation_pixels:
            raise _refuse(
                "animation_too_large",
                f"the animation needs {decoded_frames:,} frames of {width}x{height} decoded "
                f"= {work:,} pixels",
                limits.max_animation_pixels,
                "max_animation_pixels",
            )
    try:
        orientation = image.getexif().get(0x0112)
        upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        boxes = crop_boxes(*upright, grid) if grid is not None else []
        crop_size = draft_size_for(draft_size, grid) if draft_size and boxes else draft_size
        if hasher is not None and crop_size is not None:
            crop_size = max(crop_size, hash_size)
        crops: list[Crop] = []
        hashes: list[Any] = []

        def views_of(frame: Image.Image, position: int) -> Image.Image:
            """The whole frame to encode; its crops into ``crops``, its hash into ``hashes``."""
            if not boxes and hasher is None:
                return prepare_frame(frame, draft_size, orientation)
            whole = to_rgb(orient(shrink(frame, crop_size) if crop_size else frame,
                                  orientation))
            if hasher is not None:
                hashes.append(hasher(whole))
            for box, part in zip(boxes, cut(whole, boxes, upright), strict=True):
                crops.append(Crop(position, box, prepare_frame(part, draft_size)))
            return prepare_frame(whole, draft_size)

        if n_frames == 1:
            if crop_size is not None and fmt in ("JPEG", "MPO"):
                image.draft("RGB", (crop_size, crop_size))
            image.load()
            frame = views_of(image, 0)
            if frame is image:  # ``image`` is closed on return: keep a copy of its pixels
                frame = image.copy()
            frames = [frame]
        else:
            frames = []
            for position, index in enumerate(indices):  # increasing: seeks move forward
                image.seek(index)
                frames.append(views_of(image.convert("RGBA"), position))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(
            "corrupt_image", f"the {fmt} image is truncated or corrupt: {e}"
        ) from e
    return DecodedImage(frames, indices, n_frames, fmt, width, height, crops=tuple(crops),
                        hashes=tuple(hashes))


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
