"""The fakes the tests share: a hand-made encoder whose every vector can be checked on
paper (:class:`FakeEncoder`, :data:`HAND_POLICY` and its texts and colours), a tiny real
open_clip architecture's configuration, and solid-colour test images. Fixtures that use them
are in ``conftest.py``."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from moderation.backends import EncoderBase

TINY_ARCH = "tiny-test-clip"
# vision head_width must be <= width; a 32-px image in 8-px patches keeps it fast.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


class FakeEncoder(EncoderBase):  # the capabilities an encoder without them declares
    """Hand-made vectors: texts by exact lookup, solid-colour images by their nearest colour.

    Counts every text it is asked to encode, so tests can prove what the cache saved.
    """

    identity = "fake/hand-made"
    image_size = 8

    def __init__(
        self,
        texts: dict[str, np.ndarray],
        colours: dict[tuple[int, int, int], np.ndarray] | None = None,
    ) -> None:
        self.texts = texts
        self.colours = colours or {}
        self.encoded_texts: list[str] = []
        self.image_calls = 0

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.encoded_texts += list(texts)
        return np.stack([self.texts[t] for t in texts]).astype(np.float32)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.image_calls += 1
        out = []
        for image in images:
            pixel = np.asarray(image.convert("RGB").getpixel((0, 0)), dtype=float)
            colour = min(self.colours, key=lambda c: float(np.sum((np.array(c) - pixel) ** 2)))
            out.append(self.colours[colour])
        return np.stack(out).astype(np.float32)


# A two-category policy whose every score can be worked out on paper (see test_scoring.py).
HAND_POLICY: dict[str, Any] = {
    "name": "hand",
    "model": {"name": "fake", "pretrained": "hand-made"},
    "templates": ["a {}", "the {}"],
    "top_terms": 2,
    "categories": {
        "weapons": {
            "description": "guns",
            "terms": ["gun", "rifle"],
            "exceptions": ["toy gun"],
            "action": "block",
            "threshold": {"value": 0.8, "review_from": 0.6},
        },
        "alcohol": {
            "description": "drinks",
            "terms": ["beer"],
            "action": "flag",
            "threshold": {"value": 0.5},
        },
    },
}
HAND_TEXTS = {
    "a gun": unit(1, 0, 0),
    "the gun": unit(0, 1, 0),
    "a rifle": unit(1, 0, 0),
    "the rifle": unit(1, 0, 0),
    "a toy gun": unit(0, 0, 1),
    "the toy gun": unit(0, 0, 1),
    "a beer": unit(0, 1, 0),
    "the beer": unit(0, 1, 0),
}
RED, BLUE, PURPLE, GREEN, GREY = (255, 0, 0), (0, 0, 255), (128, 0, 128), (0, 255, 0), (90, 90, 90)
HAND_COLOURS = {
    RED: unit(1, 0, 0),  # a rifle: weapons blocks
    BLUE: unit(0, 0, 1),  # a toy gun: the exception wins
    PURPLE: unit(1, 0, 1),  # between a gun and a toy gun: review band
    GREEN: unit(0, 1, 0),  # a beer: alcohol flags
    GREY: unit(-1, -1, -1),  # nothing at all
}
# the same vectors by what they show, for tests that store or score vectors directly
RIFLE, TOY, BETWEEN, BEER, NOTHING = (HAND_COLOURS[c] for c in (RED, BLUE, PURPLE, GREEN, GREY))


def animation_bytes(*colours: tuple[int, int, int], duration: int = 40) -> bytes:
    """An animated GIF of 16-px solid-colour frames, one per colour."""
    frames = [Image.new("RGB", (16, 16), c) for c in colours]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=duration)
    return buffer.getvalue()


def image_bytes(colour: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (16, 16),
                **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt, **save)
    return buffer.getvalue()


class MarkerEncoder(FakeEncoder):
    """Hand-made vectors for small objects: an image's vector is ``unit(r, 1 - r, 0)`` where
    ``r`` is its share of red (the mean of ``(R - (G + B) / 2) / 255``, clipped at 0: grey is
    0, pure red is 1). Linear in the pixels, so averaging an image down keeps it, and a red
    marker that fills a twentieth of a photo fills four times more of a 2x2 crop around it.
    With the texts of :data:`MARKER_TEXTS` ("a marker" = (1, 0, 0)), an image's similarity to
    the marker category is ``r / sqrt(r² + (1 - r)²)``."""

    identity = "fake/marker"

    def __init__(self) -> None:
        super().__init__(dict(MARKER_TEXTS))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.image_calls += 1
        out = []
        for image in images:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
            r = float(np.clip((rgb[..., 0] - (rgb[..., 1] + rgb[..., 2]) / 2) / 255, 0, 1).mean())
            out.append(unit(r, 1 - r, 0))
        return np.stack(out).astype(np.float32)


MARKER_TEXTS = {"a marker": unit(1, 0, 0), "a grey wall": unit(0, 1, 0)}
MARKER_POLICY: dict[str, Any] = {
    "name": "markers",
    "model": {"name": "fake", "pretrained": "marker"},
    "templates": ["a {}"],
    "categories": {
        "marker": {"description": "a small red marker", "terms": ["marker"],
                   "action": "block", "threshold": {"value": 0.07}},
    },
}


def marker_photo(size: tuple[int, int] = (1200, 900), box: tuple[int, int, int, int] = (
        900, 600, 1060, 760), fmt: str = "JPEG") -> bytes:
    """A grey photo with a red square marker at ``box`` (a 160-px square fills 2.4 % of a
    1200x900 photo: ``r`` ≈ 0.024 whole, ≈ 0.1 in a 2x2 crop around it)."""
    image = Image.new("RGB", size, (128, 128, 128))
    image.paste((255, 0, 0), box)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def video_bytes(seconds: Sequence[tuple[int, int, int]], fps: int = 5,
                size: tuple[int, int] = (64, 48), fmt: str = "mp4",
                codec: str = "libx264") -> bytes:
    """A clip (PyAV, made here: never downloaded) whose second s is solid ``seconds[s]``."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(len(seconds) * fps):
            pixels = np.empty((size[1], size[0], 3), np.uint8)
            pixels[:] = seconds[i // fps]
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
