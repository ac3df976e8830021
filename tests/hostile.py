"""Hostile inputs, made by hand: small files that cost a naive decoder seconds or gigabytes.

Each function returns the bytes of one file; none is stored in the repository.
"""

from __future__ import annotations

import io
import struct

from PIL import Image


def extreme_aspect_png(width: int, height: int) -> bytes:
    """A solid 1-bit PNG of ``width`` × ``height`` (20000×1 is 144 bytes): resizing its short
    side to 224 px first builds a 4,480,000×224 image."""
    buffer = io.BytesIO()
    Image.new("1", (width, height), 1).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def extreme_aspect_gif(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (width, height), 0).save(buffer, "GIF")
    return buffer.getvalue()


def _jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """A JPEG as (marker, bytes) segments after SOI; a scan carries its entropy-coded data."""
    out: list[tuple[int, bytes]] = []
    i = 2
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            out.append((marker, data[i : i + 2]))
            break
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
        out.append((marker, data[i:end]))
        i = end
    return out


def many_scan_jpeg(size: int, scans: int) -> bytes:
    """A progressive JPEG of ``size``×``size`` with ``scans`` scans: libjpeg's own ten, then
    its smallest refinement scan repeated (libjpeg only warns about the repeats and decodes
    every one: the classic progressive-JPEG CPU bomb)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 130, 140)).save(
        buffer, "JPEG", progressive=True, quality=90
    )
    data = buffer.getvalue()
    segments = _jpeg_segments(data)
    sos = [k for k, (marker, _) in enumerate(segments) if marker == 0xDA]
    if scans < len(sos):
        raise ValueError(f"libjpeg already writes {len(sos)} scans")
    smallest = min(sos[1:], key=lambda k: len(segments[k][1]))
    extra = [segments[smallest]] * (scans - len(sos))
    segments = segments[: sos[-1] + 1] + extra + segments[sos[-1] + 1 :]
    return data[:2] + b"".join(segment for _, segment in segments)


def big_canvas_gif(canvas: int, frames: int) -> bytes:
    """An animated GIF whose ``frames`` frames are 1×1 pixel on a ``canvas``×``canvas``
    screen (4000 and 600: 5 kB). Reaching frame k composites every earlier frame onto the
    full canvas, so sampling the last frame costs frames × canvas² pixel operations."""
    out = bytearray(b"GIF89a")
    out += struct.pack("<HHBBB", canvas, canvas, 0x80, 0, 0)  # 2-colour global table
    out += b"\x00\x00\x00\xff\xff\xff"
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop forever
    for _ in range(frames):
        out += b"\x21\xf9\x04\x00\x02\x00\x00\x00"  # graphic control: 20 ms, no disposal
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)  # 1x1 at (0, 0)
        out += b"\x02\x02\x44\x01\x00"  # LZW (min code size 2): clear, 0, end
    out += b"\x3b"
    return bytes(out)
