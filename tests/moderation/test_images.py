from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moderation import ImageError
from moderation.images import (
    ACCEPTED_FORMATS,
    ImageLimits,
    decode_image,
    sample_frame_indices,
)
from tests.fakes import image_bytes


def encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def only_frame(data: bytes, **kwargs: object) -> Image.Image:
    decoded = decode_image(data, **kwargs)  # type: ignore[arg-type]
    assert len(decoded.frames) == 1
    frame = decoded.frames[0]
    assert frame.mode == "RGB"
    return frame


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    frame = only_frame(encode(image, "JPEG", exif=exif, quality=95))
    assert frame.size == (20, 40)
    assert frame.getpixel((10, 5))[2] > 200  # the blue half is now on top


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 128, (128, 128, 128)),
        ("1", 1, (255, 255, 255)),
        ("P", 0, None),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 32896, (128, 128, 128)),  # 16-bit is rescaled, not clipped
    ],
)
def test_modes_become_rgb(mode: str, value: object, expected: tuple[int, int, int] | None) -> None:
    image = Image.new(mode, (8, 8), value)  # type: ignore[arg-type]
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    frame = only_frame(encode(image, fmt))
    if expected is not None:
        assert frame.getpixel((0, 0)) == pytest.approx(expected, abs=2)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparency_is_composited_onto_white(mode: str) -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 4, 8))
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "PA":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = image.getpixel((6, 0))
    frame = only_frame(encode(image, "PNG"))
    assert frame.getpixel((6, 0)) == (255, 255, 255)
    assert frame.getpixel((1, 0)) != (255, 255, 255)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_frames_are_sampled_evenly(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), (i * 10, 0, 0)) for i in range(20)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    decoded = decode_image(data, limits=ImageLimits(max_frames=4))
    assert decoded.n_frames == 20
    assert decoded.frame_indices == [0, 6, 13, 19]
    reds = [f.getpixel((8, 8))[0] for f in decoded.frames]
    assert reds == pytest.approx([0, 60, 130, 190], abs=8)


def test_frame_sampling_keeps_short_animations_whole() -> None:
    assert sample_frame_indices(3, 8) == [0, 1, 2]
    assert sample_frame_indices(100, 2) == [0, 99]
    assert sample_frame_indices(1, 8) == [0]


def test_jpeg_is_decoded_at_reduced_size_but_not_below_the_model_input() -> None:
    data = image_bytes((10, 200, 10), "JPEG", size=(4000, 3000))
    decoded = decode_image(data, draft_size=224)
    width, height = decoded.frames[0].size
    assert (decoded.width, decoded.height) == (4000, 3000)  # reported as uploaded
    assert min(width, height) >= 224
    assert width <= 4000 // 8 * 2  # at least 4x smaller on a side than full decode
    assert decode_image(data, draft_size=None).frames[0].size == (4000, 3000)


def test_too_many_pixels_is_refused_before_decoding() -> None:
    data = image_bytes((0, 0, 0), "PNG", size=(200, 100))
    with pytest.raises(ImageError, match=r"200x100 = 20,000 pixels; the limit is 19,999") as e:
        decode_image(data, limits=ImageLimits(max_pixels=19_999))
    assert e.value.code == "too_many_pixels"


def test_decompression_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = image_bytes((0, 0, 0), "PNG", size=(100, 100))
    with pytest.raises(ImageError, match="decompression bomb") as e:
        decode_image(data)
    assert e.value.code == "too_many_pixels"


def test_truncated_image_is_refused() -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = encode(noisy, "JPEG")
    with pytest.raises(ImageError, match="JPEG image is truncated or corrupt") as e:
        decode_image(data[: len(data) // 2])
    assert e.value.code == "corrupt_image"


@pytest.mark.parametrize(
    ("data", "code", "message"),
    [
        (b"", "empty", r"the image is empty \(0 bytes\)"),
        (b"hello, I am text", "unsupported_format", "not an image in a supported format"),
        (encode(Image.new("RGB", (4, 4)), "PCX"), "unsupported_format",
         "accepted: " + ", ".join(ACCEPTED_FORMATS)),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "corrupt_image", "starts like a PNG but is corrupt"),
        (b"GIF89a" + b"\1" * 40, "corrupt_image", "starts like a GIF but is corrupt"),
    ],
)
def test_not_an_image(data: bytes, code: str, message: str) -> None:
    with pytest.raises(ImageError, match=message) as e:
        decode_image(data)
    assert e.value.code == code


def test_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"cannot read .*missing\.jpg") as e:
        decode_image(tmp_path / "missing.jpg")
    assert e.value.code == "unreadable"
