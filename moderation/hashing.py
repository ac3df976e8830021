"""Hashes of uploads for known-image hash banks: SHA-256 of the bytes, PDQ of each frame.

PDQ is Meta's perceptual hash (256 bits; two pictures are "the same" within a Hamming distance
of about 31). Its hex strings here are laid out as Meta's ThreatExchange and HMA write them:
64 lower-case hex digits, bit 255 first (the first digit's high bit), so that hashes from a
bank and hashes made here compare directly.

**Which pixels are hashed.** The frames the upload is decoded into for the model
(:func:`moderation.images.decode_image`), upright and RGB, but *before* their cut to
:data:`~moderation.images.MAX_ASPECT`: a hash is of the whole picture (a 2.2:1 banner hashed
after the cut is 36 bits from itself, a 3:1 one over 100). JPEGs decode in draft mode; PDQ
blurs and samples a frame down to 64×64, but from a frame of 250 to 400 pixels (the model's
draft size, 224) it lands up to 14 bits (median 10) from PDQ of the full decode of 6 and 12
megapixel JPEGs, and from one decoded at a draft size of :data:`PDQ_MIN_SIDE` (256) up to 8
(median 4; 6, median 3, at 512, for several times the cost). Against Meta's reference hashes
(``../shared/pdq-reference``, accepted within 16 by its own tests): at most 14 bits at 224,
12 at 256, 10 at 512. So a caller that hashes decodes JPEGs at a draft size of at least
:data:`PDQ_MIN_SIDE`; a 12-megapixel JPEG then costs about 3 ms of PDQ on top of its decode
for the model (15 to 60 ms in the runs here at 512, which decodes at twice the scale; 500 ms
from the full decode, which itself takes 100 ms).

:func:`pdq_of` averages a larger frame down by whole factors per axis while each side stays
at least :data:`PDQ_MIN_SIDE` (a box filter, in C): a caller's full-size photo or a 16000×250
strip costs a few milliseconds, not hundreds, 2 to 4 bits from PDQ of every pixel.

EXIF orientation is applied (frames are upright); Meta's tools hash the stored pixels. For a
file with an orientation tag the two differ by a rotation or flip, which PDQ does not absorb.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pdqhash
from PIL import Image

from .images import to_rgb

__all__ = [
    "MIN_QUALITY",
    "PDQ_BITS",
    "PDQ_BYTES",
    "PDQ_HEX_DIGITS",
    "PDQ_MIN_SIDE",
    "FrameHash",
    "UploadHashes",
    "bits_to_pdq",
    "hamming",
    "hashes_of",
    "parse_pdq",
    "pdq_of",
    "pdq_to_bits",
    "pdqs_to_bits",
]

PDQ_BITS = 256
PDQ_BYTES = PDQ_BITS // 8
PDQ_HEX_DIGITS = PDQ_BITS // 4
#: Below this quality (0 to 100, PDQ's count of strong gradients) Meta advises not to match on
#: a hash: a blank or nearly uniform frame hashes close to every other one.
MIN_QUALITY = 50
#: The side JPEGs should be decoded to (at least) for PDQ, and the side :func:`pdq_of`
#: averages larger frames down to (at least). PDQ samples 64×64 after a blur whose window is
#: 1/128 of each side: from 256 pixels on, the hash moves little with the size (up to 8 bits
#: from the full decode's, against 6 at 512, which costs several times more: see the module).
PDQ_MIN_SIDE = 256

_HEX = re.compile(r"[0-9a-fA-F]*")
_ACCEPTED = (
    f"a PDQ hash is {PDQ_HEX_DIGITS} hex digits (0-9, a-f, either case; {PDQ_BITS} bits, "
    "as ThreatExchange and HMA write it); whitespace around it is ignored"
)


@dataclass(frozen=True)
class FrameHash:
    """The PDQ hash of one frame: ``pdq``, 64 lower-case hex digits; ``quality``, 0 to 100
    (below :data:`MIN_QUALITY`: too featureless to match on)."""

    pdq: str
    quality: int

    def __post_init__(self) -> None:
        if len(self.pdq) != PDQ_HEX_DIGITS or not _HEX.fullmatch(self.pdq) or (
                self.pdq != self.pdq.lower()):
            raise ValueError(f"FrameHash.pdq must be {PDQ_HEX_DIGITS} lower-case hex digits; "
                             f"got {self.pdq!r} (parse_pdq() normalises user input)")
        if not 0 <= self.quality <= 100:
            raise ValueError(f"FrameHash.quality must be in 0..100; got {self.quality!r}")


@dataclass(frozen=True)
class UploadHashes:
    """An upload's hashes: ``sha256``, 64 hex digits of its bytes (an exact copy), and
    ``frames``, the PDQ of each sampled frame, in the order of the decoded frames."""

    sha256: str
    frames: list[FrameHash]


def pdq_of(frame: Image.Image) -> FrameHash:
    """The PDQ hash of one frame (any mode; RGB as :func:`moderation.images.to_rgb` makes it).

    Pass the frame as decoded (JPEGs at a draft size of at least :data:`PDQ_MIN_SIDE`) but
    before its cut to the maximum aspect ratio (see the module's docstring); a side of 2 ×
    :data:`PDQ_MIN_SIDE` or more is first averaged down by a whole factor.
    """
    factors = (max(1, frame.width // PDQ_MIN_SIDE), max(1, frame.height // PDQ_MIN_SIDE))
    if factors != (1, 1):
        if frame.mode not in ("RGB", "L"):
            frame = to_rgb(frame)  # alpha composited before averaging, as the model sees it
        frame = frame.reduce(factors)
    if frame.mode != "RGB":
        frame = to_rgb(frame)
    bits, quality = pdqhash.compute(np.asarray(frame, dtype=np.uint8))
    # pdqhash gives bit 255 first, as the reference's hex strings are written
    return FrameHash(bits_to_pdq(np.packbits(bits.astype(np.uint8))), int(quality))


def hashes_of(data: bytes, frames: Sequence[Image.Image]) -> UploadHashes:
    """The SHA-256 of an upload's ``data`` and the PDQ of each of its ``frames``."""
    return UploadHashes(hashlib.sha256(data).hexdigest(), [pdq_of(f) for f in frames])


def parse_pdq(text: str) -> str:
    """A PDQ hash as a user wrote it → 64 lower-case hex digits. Raises ``ValueError`` that
    says what is wrong with it."""
    if not isinstance(text, str):
        raise ValueError(f"{_ACCEPTED}; got {type(text).__name__} {text!r}, not a string")
    value = text.strip()
    if len(value) == PDQ_HEX_DIGITS and _HEX.fullmatch(value):
        return value.lower()
    shown = repr(value if len(value) <= 80 else value[:77] + "...")
    if value[:2].lower() == "0x" and _HEX.fullmatch(value[2:]):
        raise ValueError(f"{_ACCEPTED}, without a '0x' prefix; got {shown}")
    bad = next((i for i, c in enumerate(value) if c not in "0123456789abcdefABCDEF"), None)
    if bad is not None:
        raise ValueError(f"{_ACCEPTED}; got {value[bad]!r} at position {bad + 1} of {shown}")
    raise ValueError(f"{_ACCEPTED}; got {len(value)} digits: {shown}")


def pdq_to_bits(pdq: str) -> np.ndarray:
    """A PDQ hex string → its 256 bits packed as ndarray of shape (32,), uint8 (first byte: the
    first two hex digits). Raises ``ValueError`` as :func:`parse_pdq` does."""
    return np.frombuffer(bytes.fromhex(parse_pdq(pdq)), np.uint8).copy()


def pdqs_to_bits(pdqs: Iterable[str]) -> np.ndarray:
    """Many PDQ hex strings (exactly 64 hex digits each, as stored) → ndarray of shape
    (n, 32), uint8, in one pass (a bank of a million loads in a fraction of a second).
    Raises ``ValueError`` naming the first malformed one."""
    hexes = list(pdqs)
    joined = "".join(hexes)
    try:
        packed = bytes.fromhex(joined) if len(joined) == PDQ_HEX_DIGITS * len(hexes) else b""
    except ValueError:
        packed = b""
    # fromhex skips whitespace: all 64n characters were hex digits only if it made 32n bytes
    if len(packed) != PDQ_BYTES * len(hexes) or any(len(h) != PDQ_HEX_DIGITS for h in hexes):
        for i, h in enumerate(hexes):
            try:
                if parse_pdq(h) != h.lower():
                    raise ValueError(f"{_ACCEPTED}, with no whitespace here; got {h!r}")
            except ValueError as e:
                raise ValueError(f"PDQ hash {i + 1} of {len(hexes)}: {e}") from e
    return np.frombuffer(packed, np.uint8).reshape(len(hexes), PDQ_BYTES).copy()


def bits_to_pdq(bits: np.ndarray) -> str:
    """Packed bits, ndarray of shape (32,), uint8 → the PDQ hex string."""
    if bits.shape != (PDQ_BYTES,) or bits.dtype != np.uint8:
        raise ValueError(f"packed PDQ bits must be a uint8 array of shape ({PDQ_BYTES},); "
                         f"got {bits.dtype} {bits.shape}")
    return bits.tobytes().hex()


def hamming(a: str, b: str) -> int:
    """The number of bits two PDQ hex strings differ in, 0 to 256 (validated as
    :func:`parse_pdq` does)."""
    return (int(parse_pdq(a), 16) ^ int(parse_pdq(b), 16)).bit_count()
