"""Untrusted video bytes → sampled RGB frames the encoder can take (MP4, MOV, WebM, MKV).

Frames are sampled at :attr:`VideoSampling.rate_fps` (first and last frame included), at most
:attr:`VideoSampling.max_frames` of them (then spread evenly over the whole video), and each is
prepared as an image's frame is (:func:`moderation.images.prepare_frame`). Every video costs a
bounded amount of work (:class:`VideoLimits`), checked before anything is decoded wherever the
file says enough, and again while decoding in case it lied: the declared duration and frame
size from the header, then every packet's timestamp and the frames that decoding the sampled
ones needs (read from the packets, without decoding them), then each decoded frame, with a
wall-clock budget checked between packets.

How a video is read, in two passes over the same bytes:

1. **Demux** (no decoding): every packet of the video stream, its timestamp and whether it is
   a keyframe. This gives the exact presentation time of every frame, which frames to sample,
   and where to seek; a timestamp past the duration limit refuses the video here.
2. **Decode** the sampled frames in presentation order: from the previous frame when no
   keyframe lies between (decoding through), else from the keyframe before the wanted frame
   (a seek, which skips everything in between).

``frame_indices`` are positions in presentation order, counted from the packets (frame 0 is
the first frame shown), not estimated from the frame rate, and ``frame_times`` are the exact
presentation times of the frames decoded, in seconds from the stream's start time.

Only the MP4/MOV (QuickTime) and Matroska/WebM demuxers are ever used, chosen from the first
bytes (:func:`is_video`): FFmpeg's format probing is never run on uploads, so a playlist (HLS,
concat) that would make FFmpeg open other files or URLs is refused unread. The decoders are
limited to :data:`ACCEPTED_CODECS`.

A file cut short (an interrupted upload) gives the frames before the cut when its index is
there (an MP4 written for streaming, index first; a WebM/MKV): what a player can show of it is
what is moderated. Its ``n_frames`` and times cover the part that is there. An MP4 whose index
was at the cut-off end, a file with no readable frame, or a frame decoded on the way to a
sampled one that does not decode (before the last packet) is refused (``corrupt_video``): a
decoder error is not a way to hide what follows it.

:attr:`VideoSampling.keyframe_snap_s` lets a sampled time move to a nearby keyframe, which
decodes alone: on a 60-s 1080p clip with a keyframe every 2 s, 60 frames decoded instead of
1,375 for 32 samples (about 4x faster, bench/video.py). Off by default: times are exact.

PyAV (the ``[video]`` extra) is imported when a video is decoded, so this module imports in the
base install; without it, :func:`decode_video` raises ``ImageError("video_unsupported")``.
"""

from __future__ import annotations

import bisect
import io
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO, TYPE_CHECKING

from PIL import Image

from .errors import ImageError
from .images import Crop, DecodedImage, orient, prepare_frame, shrink, to_rgb
from .persistence import persistence_span  # re-exported: the rule lives there
from .views import CropGrid, crop_boxes, cut, draft_size_for

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

__all__ = [
    "ACCEPTED_CODECS",
    "VideoLimits",
    "VideoSampling",
    "declared_duration",
    "decode_video",
    "is_video",
    "persistence_span",
    "sample_frame_positions",
]

log = logging.getLogger(__name__)

#: Video codecs we decode (FFmpeg's names). Others are refused before a decoder is opened.
ACCEPTED_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg2video", "mjpeg",
                   "prores")

#: Box types an ISO base media file (MP4, MOV) can start with; ``ftyp`` in all recent files,
#: the others in QuickTime files older than it.
_ISO_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")
#: ``ftyp`` major brands of HEIF/AVIF *images* (and image sequences): ISO files, not videos.
_IMAGE_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs",
                 b"mif1", b"msf1", b"avif", b"avis", b"avio")
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"

#: Options for opening an upload. ``probesize``/``analyzeduration``: how much FFmpeg may read
#: and decode to find the streams' parameters (the containers we open carry them in their
#: header, so little is needed). ``skip_frame``: while probing, decoders parse headers only,
#: so that a frame is never decoded before its size has been checked. ``enable_drefs``: a MOV
#: may not make FFmpeg open files it references (off by default; said here on purpose).
_OPEN_OPTIONS = {
    "probesize": str(2_000_000),
    "analyzeduration": str(2_000_000),
    "skip_frame": "all",
    "enable_drefs": "0",
}

#: PyAV's frame rotation (degrees counter-clockwise to display it) → EXIF orientation.
_ORIENTATION_BY_ROTATION = {90: 8, 180: 3, 270: 6}


@dataclass(frozen=True)
class VideoLimits:
    """The work one video may cost; past a limit it is refused, before decoding wherever the
    header or the packets show it.

    Each field is also a service setting: ``MODERATION_VIDEO_`` + its name in capitals.
    """

    #: seconds the video may last (from its header, then from every packet's timestamp)
    max_duration_s: float = 600.0
    #: pixels of one frame (width × height), from the stream's header
    max_pixels: int = 16_777_216
    #: frames decoded × their pixels, in all: the sampled frames and every frame decoded to
    #: reach them (from the keyframe before each, or from the previous sampled frame). 32
    #: frames of a 1080p60 phone video with a keyframe every 2 s: 32 × 120 × 1920 × 1080 ≈ 8e9
    #: (about 8 s of H.264 decoding on one 2-core machine, bench/video.py)
    max_decoded_pixels: int = 10_000_000_000
    #: wall-clock seconds for opening, reading and decoding one video
    time_budget_s: float = 20.0
    #: frames the video stream may have at all (600 s at 120 fps): the demux pass keeps a few
    #: numbers per frame, and a stream of tiny frames costs time per frame even unsampled
    max_stream_frames: int = 72_000

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_decoded_pixels", "max_stream_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VideoLimits.{name} must be a positive integer; got {value!r}")
        for name in ("max_duration_s", "time_budget_s"):
            _check_positive_number(f"VideoLimits.{name}", getattr(self, name))


@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a video are scored.

    Each field is also a service setting: ``MODERATION_VIDEO_`` + its name in capitals.
    """

    #: frames a second sampled (at 0, 1/rate, 2/rate, … seconds), the last frame included
    rate_fps: float = 1.0
    #: frames scored at most; a longer video has this many spread evenly over its whole
    #: length, first and last frame included (1: the first frame only)
    max_frames: int = 32
    #: seconds a sampled time may move to reach a keyframe (0: exact times). A keyframe
    #: decodes alone; any other frame needs every frame from the keyframe before it (on a
    #: phone video with a keyframe every 2 s, about 30 of them). The first and last frames
    #: stay where they are; a keyframe already sampled is not sampled twice.
    keyframe_snap_s: float = 0.0

    def __post_init__(self) -> None:
        _check_positive_number("VideoSampling.rate_fps", self.rate_fps)
        snap = self.keyframe_snap_s
        if (not isinstance(snap, (int, float)) or isinstance(snap, bool)
                or not math.isfinite(snap) or snap < 0):
            raise ValueError(
                f"VideoSampling.keyframe_snap_s must be a finite number >= 0; got {snap!r}")
        value = self.max_frames
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"VideoSampling.max_frames must be a positive integer; got {value!r}")


def _check_positive_number(name: str, value: object) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")


def _refuse(code: str, what: str, limit: str, setting: str) -> ImageError:
    return ImageError(
        code,
        f"{what}; the limit is {limit} (setting {setting}, MODERATION_{setting.upper()} in "
        "the service)",
    )


def is_video(data: bytes) -> bool:
    """Whether ``data`` starts like a video we decode: an MP4/MOV (an ISO base media box at
    offset 0, other than a HEIF/AVIF image's) or a WebM/MKV (EBML). Never true for JPEG, PNG,
    GIF, WebP, BMP or TIFF. Looks at the first bytes only: true does not mean it decodes."""
    return _container(data) is not None


def _container(data: bytes) -> tuple[str, str] | None:
    """(FFmpeg demuxer, format name to report) for the start of ``data``, else ``None``."""
    if data[:4] == _EBML_MAGIC:
        return "matroska", "WEBM" if _ebml_doctype(data) == b"webm" else "MKV"
    if len(data) < 12:
        return None
    size = int.from_bytes(data[:4], "big")
    kind = data[4:8]
    if kind not in _ISO_FIRST_BOXES or not (size in (0, 1) or size >= 8):
        return None
    if kind != b"ftyp":
        return "mov", "MOV"  # QuickTime before ftyp existed
    brand = data[8:12]
    if brand in _IMAGE_BRANDS:
        return None
    return "mov", "MOV" if brand == b"qt  " else "MP4"


def _ebml_doctype(data: bytes) -> bytes:
    """The DocType (``webm``, ``matroska``) in an EBML header, from its first bytes."""
    i = data.find(b"\x42\x82", 4, 64)  # DocType element id
    if i < 0 or i + 3 > len(data):
        return b""
    length = data[i + 2]
    if not length & 0x80:  # a one-byte size, as every muxer writes it here
        return b""
    length &= 0x7F
    return data[i + 3 : i + 3 + length]


def sample_frame_positions(
    times: Sequence[Fraction | float], sampling: VideoSampling, keyframes: Sequence[int] = ()
) -> list[int]:
    """Which frames to sample, as positions in ``times`` (each frame's presentation time in
    seconds, in increasing order).

    The frame on screen at each of 0, 1/rate, 2/rate, … seconds from the first frame, then
    the last frame; when that is more than ``max_frames``, the frames on screen at
    ``max_frames`` times spread evenly from the first frame to the last instead. With
    ``sampling.keyframe_snap_s``, each time but the first and last takes the nearest of
    ``keyframes`` (positions in ``times``, increasing) within that many seconds instead, if
    it is not sampled already. Exact when ``times`` are :class:`~fractions.Fraction`.
    """
    if not times:
        return []
    first, last = Fraction(times[0]), Fraction(times[-1])
    rate = Fraction(sampling.rate_fps)
    count = math.floor((last - first) * rate) + 1
    on_rate = first + (count - 1) / rate == last
    if count + (0 if on_rate else 1) <= sampling.max_frames:
        targets = [first + j / rate for j in range(count)]
        if not on_rate:
            targets.append(last)
    elif sampling.max_frames == 1:
        targets = [first]
    else:
        n = sampling.max_frames
        targets = [first + (last - first) * j / (n - 1) for j in range(n)]
    exact = [max(0, bisect.bisect_right(times, t) - 1) for t in targets]
    snap = Fraction(sampling.keyframe_snap_s)
    if snap == 0 or not keyframes or len(exact) < 3:
        return sorted(set(exact))
    key_times = [Fraction(times[k]) for k in keyframes]
    chosen = {exact[0], exact[-1]}
    for t, position in zip(targets[1:-1], exact[1:-1], strict=True):
        i = bisect.bisect_left(key_times, t)
        near = min((k for k in (i - 1, i) if 0 <= k < len(keyframes)),
                   key=lambda k: abs(key_times[k] - t))
        snapped = keyframes[near]
        within = abs(key_times[near] - t) <= snap
        chosen.add(snapped if within and snapped not in chosen else position)
    return sorted(chosen)


# --- decoding -----------------------------------------------------------------------------
#
# PyAV is imported inside each function: decode_video checks first that it is there.


@dataclass
class _Packets:
    """What the demux pass learnt about the video stream, without decoding."""

    #: presentation timestamps (stream time base) in decode order; ``None``: no timestamp
    decode_order: list[int | None] = field(default_factory=list)
    #: presentation timestamps of the frames shown (not discarded), sorted
    shown: list[int] = field(default_factory=list)
    #: (timestamp, decode position) of each keyframe, sorted by timestamp
    keyframes: list[tuple[int, int]] = field(default_factory=list)
    #: decode position of each timestamp (its first packet)
    position: dict[int, int] = field(default_factory=dict)
    truncated: bool = False


def decode_video(
    source: bytes | str | Path,
    *,
    limits: VideoLimits | None = None,
    sampling: VideoSampling | None = None,
    draft_size: int | None = 224,
    seek: bool = True,
    crops: CropGrid | None = None,
) -> DecodedImage:
    """Decode the sampled frames of one video from bytes or a file path, within ``limits``.
    ``crops``: also cut this grid from each sampled frame (frames are then decoded at the
    size the crops need), as an image's are.

    ``draft_size``: frames are averaged down (by swscale, before they become RGB images) while
    their short side stays at least twice this (``None``: full size), then prepared as image
    frames are. ``seek=False`` decodes from the start through every frame up to the last
    sampled one instead of seeking to keyframes (the same frames, more work). Returns a
    :class:`~moderation.images.DecodedImage` with ``frame_times``. Raises :class:`ImageError`.
    """
    limits = limits or VideoLimits()
    sampling = sampling or VideoSampling()
    deadline = time.monotonic() + limits.time_budget_s
    if isinstance(source, (str, Path)):
        try:
            with open(source, "rb") as f:
                head = f.read(64)
        except OSError as e:
            raise ImageError("unreadable", f"cannot read {source}: {e.strerror or e}") from e
    else:
        head = source[:64]
    if not head:
        raise ImageError("empty", "the video is empty (0 bytes)")
    kind = _container(head)
    if kind is None:
        raise ImageError(
            "unsupported_format",
            "not a video in a supported format; accepted: MP4, MOV, WebM, MKV",
        )
    demuxer, fmt = kind
    try:
        import av  # noqa: F401
    except ImportError as e:
        raise ImageError(
            "video_unsupported",
            "videos cannot be decoded here: PyAV is not installed. Install the [video] "
            "extra: pip install 'moderation[video]'",
        ) from e

    started = time.monotonic()
    with _opened(source, demuxer, fmt, deadline, limits) as container:
        stream = _video_stream(container, fmt)
        width, height = _check_header(container, stream, fmt, limits)
        packets = _demux(container, stream, fmt, deadline, limits)
        tb = stream.time_base or Fraction(1, 1)  # (read while the container is open)
        start = packets.shown[0]
        if stream.start_time is not None:
            start = min(start, stream.start_time)
    times = [(pts - start) * tb for pts in packets.shown]
    shown_keyframes = {pts for pts, _ in packets.keyframes}.intersection(packets.shown)
    keyframes = [bisect.bisect_left(packets.shown, pts) for pts in sorted(shown_keyframes)]
    wanted = [packets.shown[i] for i in sample_frame_positions(times, sampling, keyframes)]
    steps, cost = _plan(packets, wanted, seek)
    if cost * width * height > limits.max_decoded_pixels:
        raise _refuse(
            "video_too_large",
            f"sampling {len(wanted)} frames of the {width}x{height} {fmt} video means decoding "
            f"{cost:,} frames = {cost * width * height:,} pixels",
            f"{limits.max_decoded_pixels:,} pixels",
            "video_max_decoded_pixels",
        )
    frame_size = draft_size_for(draft_size, crops) if draft_size and crops else draft_size
    with _opened(source, demuxer, fmt, deadline, limits) as container:
        stream = _video_stream(container, fmt)
        decoder = _Decoder(container, stream, fmt, packets, start, deadline, limits, frame_size,
                           whole=crops is not None)
        taken = decoder.run(steps)
    if not taken:
        raise ImageError("corrupt_video", f"no frame of the {fmt} video could be decoded")
    log.debug(
        "%s %dx%d: %d frames, %d sampled, %d decoded, %d seeks%s, %.3f s",
        fmt, width, height, len(packets.shown), len(taken), decoder.decoded, decoder.seeks,
        " (truncated)" if packets.truncated else "", time.monotonic() - started,
    )
    # the crops' boxes in upright source pixels (a frame turned by its display matrix is
    # upright already: its sides are the source's, swapped)
    first = taken[0][1]
    upright = (height, width) if (first.width > first.height) != (width > height) else (
        width, height)
    boxes = crop_boxes(*upright, crops) if crops is not None else []
    cut_from: list[Crop] = []
    frames = []
    for position, (_, image) in enumerate(taken):
        for box, part in zip(boxes, cut(image, boxes, upright), strict=True):
            cut_from.append(Crop(position, box, prepare_frame(part, draft_size)))
        frames.append(prepare_frame(image, draft_size) if crops is not None else image)
    return DecodedImage(
        frames=frames,
        crops=tuple(cut_from),
        frame_indices=[bisect.bisect_left(packets.shown, pts) for pts, _ in taken],
        n_frames=len(packets.shown),
        format=fmt,
        width=width,
        height=height,
        frame_times=[float((pts - start) * tb) for pts, _ in taken],
    )


@contextmanager
def _opened(source: bytes | str | Path, demuxer: str, fmt: str, deadline: float,
            limits: VideoLimits) -> Iterator[InputContainer]:
    """The upload opened with ``demuxer`` and :data:`_OPEN_OPTIONS`; errors as ImageErrors."""
    import av

    file: IO[bytes]
    if isinstance(source, (str, Path)):
        # a file object, never the path: FFmpeg would read "concat:…" or "http://…" as a URL
        file = open(source, "rb")  # closed below
    else:
        file = io.BytesIO(source)
    with file:
        remaining = _remaining(deadline, limits)
        try:
            container = av.open(file, mode="r", format=demuxer, options=dict(_OPEN_OPTIONS),
                                timeout=(remaining, remaining))
        except av.error.ExitError as e:  # interrupted by the timeout
            raise _over_budget(limits) from e
        except (av.FFmpegError, OSError, ValueError) as e:
            raise ImageError(
                "corrupt_video", f"the {fmt} data is corrupt or truncated: {e}") from e
        with container:
            yield container


def _remaining(deadline: float, limits: VideoLimits) -> float:
    """Seconds left before ``deadline``; refuses the video when there are none."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _over_budget(limits)
    return remaining


def _over_budget(limits: VideoLimits) -> ImageError:
    return _refuse(
        "video_time_budget",
        "decoding the video took longer than its time budget",
        f"{limits.time_budget_s:g} s",
        "video_time_budget_s",
    )


def _video_stream(container: InputContainer, fmt: str) -> VideoStream:
    """The one video stream (cover art aside); refused when there is none, or several, or
    its codec is not one of :data:`ACCEPTED_CODECS`."""
    from av.stream import Disposition

    streams = [s for s in container.streams.video
               if not s.disposition & Disposition.attached_pic]
    if not streams:
        raise ImageError("unsupported_format", f"the {fmt} file has no video stream")
    if len(streams) > 1:
        raise ImageError(
            "unsupported_format",
            f"the {fmt} file has {len(streams)} video streams; one is accepted (a player may "
            "show any of them, so each would need moderating)",
        )
    stream = streams[0]
    context = stream.codec_context
    name = context.codec.canonical_name if context is not None else "(no decoder)"
    if name not in ACCEPTED_CODECS:
        raise ImageError(
            "unsupported_format",
            f"the {fmt} video is coded as {name}; accepted: {', '.join(ACCEPTED_CODECS)}",
        )
    return stream


def _check_header(container: InputContainer, stream: VideoStream, fmt: str,
                  limits: VideoLimits) -> tuple[int, int]:
    """The frame size and declared duration, checked against ``limits`` before anything is
    read past the header. Returns (width, height)."""
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise ImageError("corrupt_video", f"the {fmt} header gives no frame size")
    if width * height > limits.max_pixels:
        raise _refuse(
            "too_many_pixels",
            f"the {fmt} video's frames are {width}x{height} = {width * height:,} pixels",
            f"{limits.max_pixels:,}",
            "video_max_pixels",
        )
    declared = []
    if stream.duration is not None and stream.time_base is not None:
        declared.append(float(stream.duration * stream.time_base))
    if container.duration is not None:
        declared.append(container.duration / 1_000_000)  # in AV_TIME_BASE units
    if stream.frames > limits.max_stream_frames:
        raise _refuse(
            "too_many_frames",
            f"the {fmt} header says the video has {stream.frames:,} frames",
            f"{limits.max_stream_frames:,}",
            "video_max_stream_frames",
        )
    if declared and max(declared) > limits.max_duration_s:
        raise _refuse(
            "video_too_long",
            f"the {fmt} header says the video lasts {_clock(max(declared))}",
            f"{limits.max_duration_s:g} s",
            "video_max_duration_s",
        )
    return width, height


def declared_duration(data: bytes, limits: VideoLimits | None = None) -> float | None:
    """The duration a video's header declares, in seconds (``None``: it declares none, or
    this is no video we read), from the header alone: how a request decides whether a video
    is answered inline or as a job. Cheap and bounded (the demuxer's probe only)."""
    container_kind = _container(data[:64])
    if container_kind is None:
        return None
    limits = limits or VideoLimits()
    try:
        with _opened(data, *container_kind, time.monotonic() + limits.time_budget_s,
                     limits) as container:
            stream = _video_stream(container, container_kind[1])
            declared = []
            if stream.duration is not None and stream.time_base is not None:
                declared.append(float(stream.duration * stream.time_base))
            if container.duration is not None:
                declared.append(container.duration / 1_000_000)
            return max(declared) if declared else None
    except ImageError:
        return None  # decoding will say what is wrong with it


def _clock(seconds: float) -> str:
    """``h:mm:ss.sss (N s)``."""
    minutes, s = divmod(seconds, 60)
    return f"{int(minutes // 60)}:{int(minutes % 60):02d}:{s:06.3f} ({seconds:,.3f} s)"


def _demux(container: InputContainer, stream: VideoStream, fmt: str, deadline: float,
           limits: VideoLimits) -> _Packets:
    """Every packet's timestamp and keyframe flag, without decoding; refuses a timestamp past
    the duration limit. A read error after the first frame ends the stream (truncated)."""
    import av

    out = _Packets()
    tb = stream.time_base or Fraction(1, 1)
    origin = stream.start_time
    limit = Fraction(limits.max_duration_s)
    packets = container.demux(stream)
    while True:
        _remaining(deadline, limits)
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.error.ExitError as e:
            raise _over_budget(limits) from e
        except (av.FFmpegError, OSError, ValueError) as e:
            if not out.shown:
                raise ImageError(
                    "corrupt_video", f"the {fmt} data is corrupt or truncated: {e}") from e
            out.truncated = True
            log.info("the %s video ends after %d packets: %s", fmt, len(out.decode_order), e)
            break
        if packet.size == 0:  # the flush packet at the end
            continue
        pts = packet.pts if packet.pts is not None else packet.dts
        position = len(out.decode_order)
        if position >= limits.max_stream_frames:
            raise _refuse(
                "too_many_frames",
                f"the {fmt} video has more than {limits.max_stream_frames:,} frames",
                f"{limits.max_stream_frames:,}",
                "video_max_stream_frames",
            )
        out.decode_order.append(pts)
        if pts is None:
            continue
        if origin is None:
            origin = pts
        if (pts - origin) * tb > limit:
            raise _refuse(
                "video_too_long",
                f"the {fmt} video has a frame at {_clock(float((pts - origin) * tb))}",
                f"{limits.max_duration_s:g} s",
                "video_max_duration_s",
            )
        out.position.setdefault(pts, position)
        if not packet.is_discard:
            out.shown.append(pts)
        if packet.is_keyframe:
            out.keyframes.append((pts, position))
    if not out.shown:
        raise ImageError("corrupt_video", f"the {fmt} video has no frames")
    out.shown.sort()
    out.keyframes.sort()
    return out


def _keyframe_before(packets: _Packets, pts: int) -> tuple[int, int] | None:
    """(timestamp, decode position) of the last keyframe shown at or before ``pts``."""
    i = bisect.bisect_right(packets.keyframes, (pts, math.inf)) - 1
    return packets.keyframes[i] if i >= 0 else None


def _plan(packets: _Packets, wanted: list[int],
          seek: bool) -> tuple[list[tuple[int, int | None]], int]:
    """For each wanted timestamp, the keyframe to seek to first (``None``: decode on from
    where the decoder is), and about how many packets decoding all of it takes.

    A seek is planned when a keyframe lies between the decoder's position and the wanted
    frame: decoding from it skips every packet before it, and a seek costs next to nothing
    beside one packet's decoding (an index lookup in MP4, a cue lookup in Matroska)."""
    steps: list[tuple[int, int | None]] = []
    fed = -1  # decode position of the last packet decoded
    cost = 0
    for pts in wanted:
        target = packets.position[pts]
        key = _keyframe_before(packets, pts) if seek else None
        if key is not None and key[1] > fed + 1:
            steps.append((pts, key[0]))
            cost += target - key[1] + 1
        else:
            steps.append((pts, None))
            cost += max(0, target - fed)
        fed = max(fed, target)
    return steps, cost


class _Decoder:
    """The decode pass: follows a plan's steps and keeps the wanted frames as prepared images."""

    #: seeks tried for one frame (the planned keyframe, then earlier ones) when the demuxer
    #: lands past the frame wanted
    SEEK_TRIES = 4

    def __init__(self, container: InputContainer, stream: VideoStream, fmt: str,
                 packets: _Packets, start: int, deadline: float, limits: VideoLimits,
                 draft_size: int | None, whole: bool = False) -> None:
        self.container, self.stream, self.fmt = container, stream, fmt
        self.packets, self.start, self.deadline, self.limits = packets, start, deadline, limits
        self.draft_size = draft_size
        self.whole = whole  # keep frames uncut (crops are cut from them, then the frame)
        self.tb = stream.time_base or Fraction(1, 1)
        self.last_packet = next((p for p in reversed(packets.decode_order) if p is not None),
                                None)
        self.fed = -1  # decode position of the last packet sent to the decoder
        self.decoded = 0  # frames
        self.decoded_pixels = 0
        self.seeks = 0
        context = stream.codec_context
        context.thread_type = "AUTO"
        # a frame bigger than the header said is refused by the decoder, before it is allocated
        context.options = {"max_pixels": str(limits.max_pixels)}

    def run(self, steps: list[tuple[int, int | None]]) -> list[tuple[int, Image.Image]]:
        """(timestamp, image) of each frame taken, in presentation order."""
        taken: list[tuple[int, Image.Image]] = []
        frames: Iterator[VideoFrame] | None = None
        for pts, key in steps:
            if taken and taken[-1][0] >= pts:
                continue  # its frame was not shown; the next one, taken already, stands for it
            frame: VideoFrame | None
            if key is not None and self.packets.position[key] > self.fed + 1:
                frame, frames = self._seek_to(pts, key)
            else:
                if frames is None:
                    frames = self._frames()
                frame = _first_at(frames, pts)
            if frame is None or frame.pts is None:
                break  # the stream ended (truncated)
            # converted at once: a decoded 4K frame is 12 MB, its prepared image 1 MB
            taken.append((frame.pts, _to_image(frame, self.stream, self.draft_size,
                                               whole=self.whole)))
        return taken

    def _seek_to(self, pts: int, key: int) -> tuple[VideoFrame | None, Iterator[VideoFrame]]:
        """Seek to keyframe ``key`` (to earlier ones while the demuxer lands past ``pts``) and
        decode up to the frame at ``pts``."""
        import av

        tries = 0
        while True:
            try:
                self.container.seek(key, stream=self.stream, backward=True)
            except av.FFmpegError as e:
                raise ImageError("corrupt_video",
                                 f"cannot seek in the {self.fmt} video: {e}") from e
            self.seeks += 1
            tries += 1
            frames = self._frames()
            first = _first_at(frames, None)
            if first is not None and first.pts is not None and first.pts <= pts:
                return (first if first.pts == pts else _first_at(frames, pts)), frames
            earlier = _keyframe_before(self.packets, key - 1)  # landed past it: further back
            if earlier is None or tries == self.SEEK_TRIES:
                return first, frames  # the nearest frame after it (None: none after)
            key = earlier[0]

    def _frames(self) -> Iterator[VideoFrame]:
        """Decoded frames from the demuxer's position on, each checked against the limits."""
        import av

        packets = self.container.demux(self.stream)
        while True:
            _remaining(self.deadline, self.limits)
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.ExitError as e:
                raise _over_budget(self.limits) from e
            except (av.FFmpegError, OSError, ValueError):
                return  # cut short: the demux pass ended there too
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is not None and pts in self.packets.position:
                self.fed = self.packets.position[pts]
            try:
                decoded = self.stream.decode(packet)
            except av.error.ExitError as e:
                raise _over_budget(self.limits) from e
            except (av.FFmpegError, ValueError) as e:
                if packet.size == 0 or pts == self.last_packet:
                    return  # the last packet, cut short
                at = float(((pts or 0) - self.start) * self.tb)
                raise ImageError(
                    "corrupt_video",
                    f"the {self.fmt} video has a frame that does not decode (at {at:.3f} s): {e}",
                ) from e
            for frame in decoded:
                self._check(frame)
                yield frame

    def _check(self, frame: VideoFrame) -> None:
        limits = self.limits
        pixels = frame.width * frame.height
        if pixels > limits.max_pixels:
            raise _refuse(
                "too_many_pixels",
                f"the {self.fmt} video has a {frame.width}x{frame.height} frame = "
                f"{pixels:,} pixels",
                f"{limits.max_pixels:,}",
                "video_max_pixels",
            )
        self.decoded += 1
        self.decoded_pixels += pixels
        if self.decoded_pixels > limits.max_decoded_pixels:
            raise _refuse(
                "video_too_large",
                f"decoding the {self.fmt} video took {self.decoded:,} frames = "
                f"{self.decoded_pixels:,} pixels, and more were needed",
                f"{limits.max_decoded_pixels:,} pixels",
                "video_max_decoded_pixels",
            )
        if frame.pts is not None:
            seconds = (frame.pts - self.start) * self.tb
            if seconds > limits.max_duration_s:
                raise _refuse(
                    "video_too_long",
                    f"the {self.fmt} video has a frame at {_clock(float(seconds))}",
                    f"{limits.max_duration_s:g} s",
                    "video_max_duration_s",
                )


def _first_at(frames: Iterator[VideoFrame], pts: int | None) -> VideoFrame | None:
    """The next frame of ``frames`` shown at or after ``pts`` (``None``: any with a time)."""
    for frame in frames:
        if frame.pts is not None and (pts is None or frame.pts >= pts):
            return frame
    return None


def _to_image(frame: VideoFrame, stream: VideoStream, size: int | None, *,
              whole: bool = False) -> Image.Image:
    """A decoded frame → an RGB image prepared as image frames are: averaged down by a whole
    factor while its short side stays at least twice ``size`` (by swscale, while converting to
    RGB, as draft mode does for JPEGs), at its display aspect ratio, turned upright by its
    display matrix, cut to :data:`~moderation.images.MAX_ASPECT` (not with ``whole``: crops
    are cut from the whole picture first)."""
    width, height = frame.width, frame.height
    aspect = stream.sample_aspect_ratio
    shown_width = width
    if aspect is not None and aspect > 0 and aspect != 1:
        shown_width = max(1, round(width * aspect))
    factor = max(1, min(shown_width, height) // (2 * size)) if size is not None else 1
    if factor == 1 and shown_width == width:
        image = frame.to_image()
    else:
        image = frame.to_image(width=max(1, shown_width // factor),
                               height=max(1, height // factor), interpolation="AREA")
    orientation = _ORIENTATION_BY_ROTATION.get(round(frame.rotation) % 360)
    if whole:
        return to_rgb(orient(shrink(image, size) if size is not None else image, orientation))
    return prepare_frame(image, size, orientation)
