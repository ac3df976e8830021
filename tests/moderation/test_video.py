"""Videos: which frames are sampled (checked by their colour: each second of the test clips has
its own), their exact times, the seek and decode-through paths, and hostile files refused fast
with a code and a message naming the limit. Every clip is made here with PyAV, in memory."""

from __future__ import annotations

import bisect
import functools
import io
import logging
import re
import struct
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moderation import ImageError
from moderation.images import MAX_ASPECT
from moderation.video import (
    VideoLimits,
    VideoSampling,
    decode_video,
    is_video,
    persistence_span,
    sample_frame_positions,
)

av = pytest.importorskip("av")

# Generous: the machines are shared and noisy; each hostile file is refused in milliseconds.
SECONDS = 3.0
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (20, 230, 230),
           (230, 20, 230), (240, 240, 240), (10, 10, 10), (128, 128, 128), (240, 128, 10)]
TEN_SECONDS = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 9.9]


def colour_of(image: Image.Image) -> int:
    """Which of :data:`COLOURS` (its index: the second it was shown) ``image`` is."""
    mean = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0)
    return int(np.argmin([np.abs(mean - c).sum() for c in COLOURS]))


def write_clip(target: io.BytesIO | Path, fmt: str, codec: str, *, seconds: int = 10,
               fps: int = 10, size: tuple[int, int] = (320, 240), gop: int | None = None,
               rotation: int | None = None, faststart: bool = False,
               frame: Callable[[int], np.ndarray] | None = None) -> None:
    """A clip whose second s is solid :data:`COLOURS` [s % 10] (or ``frame(i)``)."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(target, "w", format=fmt, options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(seconds * fps):
            if frame is not None:
                pixels = frame(i)
            else:
                pixels = np.empty((size[1], size[0], 3), np.uint8)
                pixels[:] = COLOURS[(i // fps) % len(COLOURS)]
            out = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            out.pts = i
            for packet in stream.encode(out):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@functools.cache
def clip(fmt: str = "mp4", codec: str = "libx264", **kwargs: object) -> bytes:
    """The bytes of :func:`write_clip` (made once per test run)."""
    buffer = io.BytesIO()
    write_clip(buffer, fmt, codec, **kwargs)  # type: ignore[arg-type]
    return buffer.getvalue()


def refused(code: str, data: bytes | Path, match: str | None = None,
            **kwargs: object) -> ImageError:
    """Decoding ``data`` raises ImageError(``code``) matching ``match``, in under SECONDS."""
    started = time.perf_counter()
    with pytest.raises(ImageError, match=match) as caught:
        decode_video(data, **kwargs)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    assert caught.value.code == code, caught.value.message
    assert elapsed < SECONDS, f"refused in {elapsed:.2f} s"
    return caught.value


def still(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


# --- sniffing -----------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "codec"), [("mp4", "libx264"), ("mov", "mpeg4"),
                                            ("webm", "libvpx-vp9"), ("matroska", "libx264")])
def test_videos_are_sniffed(fmt: str, codec: str) -> None:
    assert is_video(clip(fmt, codec, seconds=1))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_images_are_not_videos(fmt: str) -> None:
    assert not is_video(still(Image.new("RGB", (16, 16), (1, 2, 3)), fmt))


def test_other_iso_files_and_noise_are_not_videos() -> None:
    assert not is_video(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")  # a HEIF image
    assert not is_video(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1")  # an AVIF image
    assert is_video(b"\x00\x00\x00\x08wide\x00\x01\x00\x00mdat")  # an old QuickTime file
    assert not is_video(b"")
    assert not is_video(np.random.default_rng(0).bytes(4096))


# --- sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "codec", "name"),
    [("mp4", "libx264", "MP4"), ("webm", "libvpx-vp9", "WEBM"), ("matroska", "libx264", "MKV"),
     ("mov", "mpeg4", "MOV")],
)
def test_one_frame_a_second_and_the_last(fmt: str, codec: str, name: str) -> None:
    decoded = decode_video(clip(fmt, codec))
    assert decoded.frame_times == TEN_SECONDS  # exactly: presentation times, not estimates
    assert decoded.frame_indices == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]
    assert [colour_of(f) for f in decoded.frames] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]
    assert (decoded.format, decoded.n_frames, decoded.width, decoded.height) == (
        name, 100, 320, 240)
    assert all(f.mode == "RGB" and f.size == (320, 240) for f in decoded.frames)


def test_the_cap_spreads_frames_over_the_whole_video_first_and_last_included() -> None:
    decoded = decode_video(clip(), sampling=VideoSampling(max_frames=4))
    assert decoded.frame_indices == [0, 33, 66, 99]
    assert decoded.frame_times == [0.0, 3.3, 6.6, 9.9]
    assert [colour_of(f) for f in decoded.frames] == [0, 3, 6, 9]
    first = decode_video(clip(), sampling=VideoSampling(max_frames=1))
    assert first.frame_times == [0.0] and first.frame_indices == [0]


def test_a_faster_rate() -> None:
    decoded = decode_video(clip(), sampling=VideoSampling(rate_fps=2.5, max_frames=100))
    assert decoded.frame_times == [i * 4 / 10 for i in range(25)] + [9.9]
    assert decoded.frame_indices == [4 * i for i in range(25)] + [99]


def test_sample_frame_positions_by_hand() -> None:
    tenths = [Fraction(i, 10) for i in range(100)]
    assert sample_frame_positions(tenths, VideoSampling()) == [0, 10, 20, 30, 40, 50, 60, 70,
                                                               80, 90, 99]
    # the frame on screen at each time: times 0, 0.4, 1.1, 1.3 sampled at 1 fps → 0 s, 1 s, last
    assert sample_frame_positions([0, 0.4, 1.1, 1.3], VideoSampling()) == [0, 1, 3]
    assert sample_frame_positions([0.0], VideoSampling()) == [0]
    assert sample_frame_positions([], VideoSampling()) == []


def test_sampled_times_may_snap_to_keyframes_by_hand() -> None:
    tenths = [Fraction(i, 10) for i in range(100)]
    snap = VideoSampling(keyframe_snap_s=0.5)
    # keyframes at 0, 2.5, 5 and 7.5 s: 2 s → 2.5 s, 3 s stays (2.5 s is taken), 7 s → 7.5 s;
    # 1, 4, 6, 8 and 9 s have none within 0.5 s; the first and last frames stay
    assert sample_frame_positions(tenths, snap, keyframes=[0, 25, 50, 75]) == [
        0, 10, 25, 30, 40, 50, 60, 75, 80, 90, 99]
    assert sample_frame_positions(tenths, VideoSampling(), keyframes=[0, 25, 50, 75]) == [
        0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]
    assert sample_frame_positions(tenths, snap, keyframes=[99]) == [
        0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]  # the last frame is not a second one


def test_snapping_to_keyframes_decodes_less(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="moderation.video")
    decoded = decode_video(clip(gop=10), sampling=VideoSampling(max_frames=4,
                                                                keyframe_snap_s=0.5))
    assert decoded.frame_times == [0.0, 3.0, 7.0, 9.9]  # 3.3 s and 6.6 s moved to keyframes
    assert [colour_of(f) for f in decoded.frames] == [0, 3, 7, 9]
    [message] = [r.message for r in caplog.records if "seeks" in r.message]
    assert "4 sampled, " in message and int(message.split(" decoded")[0].split()[-1]) < 20


def test_seeking_and_decoding_through_give_the_same_frames(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = clip(gop=10)  # a keyframe every second: each sampled frame is reached by a seek
    caplog.set_level(logging.DEBUG, logger="moderation.video")
    sought = decode_video(data)
    through = decode_video(data, seek=False)
    assert sought.frame_times == through.frame_times == TEN_SECONDS
    assert sought.frame_indices == through.frame_indices
    for a, b in zip(sought.frames, through.frames, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    seeks = [tuple(map(int, re.search(r"(\d+) decoded, (\d+) seeks", r.message).groups()))
             for r in caplog.records if "seeks" in r.message]  # type: ignore[union-attr]
    assert seeks[0][1] >= 9 and seeks[0][0] < 50  # seeks: ~2 frames decoded per sample
    assert seeks[1] == (100, 0)  # through: every frame


def test_a_seek_that_lands_past_the_frame_goes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the demuxer land on a keyframe after the wanted frame, the decoder seeks to
    earlier keyframes until it lands before it: here every planned seek is one keyframe late."""
    import moderation.video as video

    plan = video._plan

    def late(packets: video._Packets, wanted: list[int],
             seek: bool) -> tuple[list[tuple[int, int | None]], int]:
        steps, cost = plan(packets, wanted, seek)
        keys = [pts for pts, _ in packets.keyframes]
        return [(pts, None if key is None else keys[min(bisect.bisect_right(keys, key),
                                                        len(keys) - 1)])
                for pts, key in steps], cost

    data = clip(gop=10)
    expected = decode_video(data, seek=False)
    monkeypatch.setattr(video, "_plan", late)
    decoded = decode_video(data)
    assert decoded.frame_times == TEN_SECONDS
    for a, b in zip(decoded.frames, expected.frames, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_path_is_read_like_bytes(tmp_path: Path) -> None:
    path = tmp_path / "clip.webm"
    path.write_bytes(clip("webm", "libvpx-vp9"))
    assert decode_video(path).frame_times == TEN_SECONDS
    assert decode_video(str(path)).frame_times == TEN_SECONDS


def test_frames_are_prepared_like_images() -> None:
    """Averaged down while the short side stays >= 2 x draft_size, cut to MAX_ASPECT."""
    big = clip(seconds=1, fps=2, size=(1920, 1080))
    assert decode_video(big).frames[0].size == (960, 540)
    assert decode_video(big, draft_size=None).frames[0].size == (1920, 1080)
    wide = decode_video(clip(seconds=1, fps=2, size=(640, 120)))
    assert wide.frames[0].size == (int(120 * MAX_ASPECT), 120)
    assert (wide.width, wide.height) == (640, 120)  # as uploaded


def test_the_display_rotation_is_applied() -> None:
    def left_red(i: int) -> np.ndarray:
        pixels = np.zeros((32, 64, 3), np.uint8)
        pixels[:, :32] = (255, 0, 0)
        return pixels

    decoded = decode_video(clip(seconds=1, fps=2, size=(64, 32), rotation=90, frame=left_red))
    [frame, _] = decoded.frames
    assert frame.size == (32, 64)  # turned a quarter counter-clockwise: the left half below
    assert frame.getpixel((16, 56))[0] > 200 and frame.getpixel((16, 8))[0] < 50


# --- persistence --------------------------------------------------------------------------


def test_persistence_by_hand() -> None:
    seconds = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # three consecutive crossing frames at 1 s spacing fire k=3 within 3 s
    assert persistence_span(seconds, [0, 1, 1, 1, 0, 0, 0], k=3, window_s=3) == (1.0, 3.0)
    # two scattered crossing frames do not
    assert persistence_span(seconds, [1, 0, 0, 0, 0, 0, 1], k=3, window_s=3) is None
    assert persistence_span(seconds, [1, 0, 0, 0, 0, 0, 1], k=2, window_s=3) is None
    # k=1 is any crossing frame (the rule for images); the span: every crossing frame within
    # the window of the first
    assert persistence_span(seconds, [0, 0, 1, 0, 1, 0, 0], k=1, window_s=3) == (2.0, 4.0)
    assert persistence_span(seconds, [0] * 7, k=1, window_s=3) is None
    # the first run that fires: 4, 5 and 6 s (0, 2 and 4 s are not within 2 s)
    assert persistence_span(seconds, [1, 0, 1, 0, 1, 1, 1], k=3, window_s=2) == (4.0, 6.0)
    # extended to every crossing frame within the window of its first: 1 to 3 s, not 4 s
    assert persistence_span(seconds, [0, 1, 1, 1, 1, 0, 0], k=2, window_s=2) == (1.0, 3.0)
    # the window's end counts as inside, within float noise (0.1 + 0.2 != 0.3)
    assert persistence_span([0.1, 0.2, 0.4], [1, 1, 1], k=3, window_s=0.3) == (0.1, 0.4)
    # frames need not come in order
    assert persistence_span([2.0, 0.0, 1.0], [1, 1, 1], k=3, window_s=2) == (0.0, 2.0)


def test_persistence_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="2 times but 1 crossings"):
        persistence_span([0.0, 1.0], [True], k=1, window_s=1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        persistence_span([0.0], [True], k=0, window_s=1)
    with pytest.raises(ValueError, match="window_s must be >= 0"):
        persistence_span([0.0], [True], k=1, window_s=-1)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: VideoLimits(max_pixels=0), "VideoLimits.max_pixels must be a positive integer"),
        (lambda: VideoLimits(max_decoded_pixels=True), "max_decoded_pixels"),
        (lambda: VideoLimits(max_duration_s=float("inf")), "max_duration_s must be a positive"),
        (lambda: VideoLimits(time_budget_s=0), "time_budget_s"),
        (lambda: VideoSampling(rate_fps=-1), "VideoSampling.rate_fps"),
        (lambda: VideoSampling(max_frames=2.5), "VideoSampling.max_frames"),  # type: ignore[arg-type]
        (lambda: VideoSampling(keyframe_snap_s=-0.5), "keyframe_snap_s must be a finite"),
    ],
)
def test_limits_and_sampling_are_validated(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


# --- hostile and broken files -------------------------------------------------------------


def test_not_a_video() -> None:
    refused("unsupported_format", np.random.default_rng(1).bytes(100_000), "accepted: MP4")
    refused("unsupported_format", still(Image.new("RGB", (8, 8)), "PNG"))
    refused("empty", b"")


def test_random_bytes_after_a_video_signature() -> None:
    noise = np.random.default_rng(2).bytes(100_000)
    refused("corrupt_video", b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + noise)
    refused("corrupt_video", b"\x1a\x45\xdf\xa3" + noise)


def test_a_missing_file(tmp_path: Path) -> None:
    refused("unreadable", tmp_path / "nothing.mp4", "cannot read")


def test_truncated_files_without_their_index_are_refused() -> None:
    data = clip()  # the index (moov) at the end, as muxers write it by default
    refused("corrupt_video", data[: len(data) // 2], "corrupt or truncated")
    refused("corrupt_video", data[:1024], "corrupt or truncated")


def test_a_truncated_file_gives_the_frames_before_the_cut(tmp_path: Path) -> None:
    path = tmp_path / "faststart.mp4"
    write_clip(path, "mp4", "libx264", size=(320, 240), faststart=True, gop=10)
    data = path.read_bytes()
    whole = decode_video(data)
    cut = decode_video(data[: len(data) * 2 // 3])
    assert whole.frame_times == TEN_SECONDS
    assert 0 < len(cut.frames) < len(whole.frames) and cut.n_frames < 100
    assert cut.frame_times == TEN_SECONDS[: len(cut.frames) - 1] + cut.frame_times[-1:]
    assert [colour_of(f) for f in cut.frames[:-1]] == list(range(len(cut.frames) - 1))


def _mjpeg_mov(jpegs: list[bytes], size: tuple[int, int]) -> bytes:
    """A MOV of motion-JPEG frames given as JPEG files, at 1 fps (muxed, not encoded)."""
    source = io.BytesIO()
    with av.open(source, "w", format="mov") as container:
        stream = container.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuvj420p"
        for i in range(len(jpegs)):
            frame = av.VideoFrame(16, 16, "yuvj420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = io.BytesIO()
    with av.open(io.BytesIO(source.getvalue())) as src, av.open(out, "w", format="mov") as dst:
        template = src.streams.video[0]
        stream = dst.add_stream_from_template(template, opaque=True)
        stream.width, stream.height = size
        for packet, jpeg in zip((p for p in src.demux(template) if p.size), jpegs, strict=True):
            replaced = av.Packet(jpeg)
            replaced.pts, replaced.dts = packet.pts, packet.dts
            replaced.time_base, replaced.duration = packet.time_base, packet.duration
            replaced.is_keyframe = True
            replaced.stream = stream
            dst.mux(replaced)
    return out.getvalue()


def _jpeg_claiming(side: int) -> bytes:
    """A 16x16 JPEG whose header says it is ``side`` x ``side``."""
    data = bytearray(still(Image.new("RGB", (16, 16), (200, 30, 30)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def test_a_16k_frame_size_is_refused_from_the_header() -> None:
    """16000x16000 (FFmpeg's own check stops just short of 16384x16384): 2 kB of MOV whose
    frames a decoder would allocate at 256 megapixels each."""
    data = _mjpeg_mov([_jpeg_claiming(16000)] * 2, (16000, 16000))
    assert len(data) < 4000
    error = refused("too_many_pixels", data, "16000x16000 = 256,000,000 pixels")
    assert "MODERATION_VIDEO_MAX_PIXELS" in error.message
    refused("too_many_pixels", clip(), "320x240", limits=VideoLimits(max_pixels=320 * 240 - 1))


def _set_mkv_duration(data: bytes, seconds: float) -> bytes:
    """``data`` (a Matroska file from FFmpeg, timestamps in ms) with its header's duration
    replaced."""
    i = data.index(b"\x44\x89\x88")  # Duration, an 8-byte float
    return data[: i + 3] + struct.pack(">d", seconds * 1000) + data[i + 11 :]


def _sparse(fmt: str) -> bytes:
    """Two frames, at 0 and at 20 hours: a few hundred bytes."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for pts in (0, 72_000_000):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            frame.pts = pts
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_a_20_hour_video_is_refused_from_its_header() -> None:
    for fmt in ("mp4", "matroska"):
        error = refused("video_too_long", _sparse(fmt), "header says the video lasts 20:00:0")
        assert "MODERATION_VIDEO_MAX_DURATION_S" in error.message
    refused("video_too_long", clip(), r"lasts 0:00:10.000 \(10.000 s\); the limit is 4.95 s",
            limits=VideoLimits(max_duration_s=4.95))


def test_a_header_that_lies_about_the_duration_is_caught_from_the_packets() -> None:
    lying = _set_mkv_duration(_sparse("matroska"), 1.0)
    refused("video_too_long", lying, "has a frame at 20:00:00")


def test_the_time_budget_refuses_a_tiny_budget() -> None:
    error = refused("video_time_budget", clip(), limits=VideoLimits(time_budget_s=1e-6))
    assert "MODERATION_VIDEO_TIME_BUDGET_S" in error.message


def test_the_time_budget_is_checked_between_packets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock that moves 1 s per look: a 30-s budget runs out part way through the packets."""
    ticks = iter(range(10**6))
    monkeypatch.setattr("moderation.video.time.monotonic", lambda: float(next(ticks)))
    refused("video_time_budget", clip(), limits=VideoLimits(time_budget_s=30))
    assert 30 < next(ticks) < 100  # stopped soon after the budget ran out, not at the end


def test_frames_in_the_stream_are_bounded() -> None:
    limits = VideoLimits(max_stream_frames=99)
    refused("too_many_frames", clip(), "header says the video has 100 frames", limits=limits)
    # Matroska headers do not count frames: the demux pass does
    refused("too_many_frames", clip("matroska"), "more than 99 frames",
            limits=limits)


def test_decoded_pixels_are_bounded_before_decoding() -> None:
    error = refused("video_too_large", clip(), "means decoding",
                    limits=VideoLimits(max_decoded_pixels=320 * 240 * 20), seek=False)
    assert "MODERATION_VIDEO_MAX_DECODED_PIXELS" in error.message


def test_decoded_pixels_are_counted_while_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the estimate fall short, decoding stops at the limit all the same."""
    import moderation.video as video

    plan = video._plan
    monkeypatch.setattr(video, "_plan", lambda *a: (plan(*a)[0], 0))
    refused("video_too_large", clip(), "took 21 frames",
            limits=VideoLimits(max_decoded_pixels=320 * 240 * 20), seek=False)


def test_a_frame_that_does_not_decode_is_refused_unless_it_is_the_last() -> None:
    good = still(Image.new("RGB", (16, 16), (200, 30, 30)), "JPEG")
    broken = np.random.default_rng(3).bytes(len(good))
    refused("corrupt_video", _mjpeg_mov([good, broken, good], (16, 16)), "at 1.000 s")
    decoded = decode_video(_mjpeg_mov([good, good, broken], (16, 16)))
    assert decoded.frame_times == [0.0, 1.0]


def test_files_without_a_single_video_stream(tmp_path: Path) -> None:
    audio = io.BytesIO()
    with av.open(audio, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    refused("unsupported_format", audio.getvalue(), "has no video stream")

    two = io.BytesIO()
    with av.open(two, "w", format="matroska") as container:
        streams = [container.add_stream("mpeg4", rate=1) for _ in range(2)]
        for stream in streams:
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for stream in streams:
            frame = av.VideoFrame(32, 32, "yuv420p")
            frame.pts = 0
            for packet in [*stream.encode(frame), *stream.encode()]:
                container.mux(packet)
    refused("unsupported_format", two.getvalue(), "2 video streams")


def test_codecs_outside_the_list_are_refused() -> None:
    refused("unsupported_format", clip("matroska", "ffv1", seconds=1, fps=1), "coded as ffv1")


def test_without_pyav(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    refused("video_unsupported", clip(), r"pip install 'moderation\[video\]'")


def marker_clip(seconds: int = 3, marked: int = 1, size: tuple[int, int] = (640, 480),
                box: tuple[int, int, int, int] = (500, 340, 620, 460), fps: int = 5) -> bytes:
    """Grey seconds; second ``marked`` has a red square at ``box`` (120 px: under 5 % of the
    frame, about 13 % of the 2x2 crop around it)."""

    def frame(i: int) -> np.ndarray:
        pixels = np.full((size[1], size[0], 3), 128, np.uint8)
        if i // fps == marked:
            x0, y0, x1, y1 = box
            pixels[y0:y1, x0:x1] = (255, 0, 0)
        return pixels

    buffer = io.BytesIO()
    write_clip(buffer, "mp4", "libx264", seconds=seconds, fps=fps, size=size, frame=frame)
    return buffer.getvalue()


def test_a_small_object_in_a_video_frame_is_found_through_the_frames_crops() -> None:
    import copy

    import yaml

    from moderation import Moderator
    from moderation.policy import parse_policy
    from tests.fakes import MARKER_POLICY, MarkerEncoder

    clip = marker_clip()
    whole = copy.deepcopy(MARKER_POLICY)
    whole["video"] = {"rate": 1}
    cropped = {**copy.deepcopy(whole), "views": {"crops": "2x2", "min_side": 64}}
    [plain] = Moderator(parse_policy(yaml.safe_dump(whole)), MarkerEncoder()).moderate([clip])
    [found] = Moderator(parse_policy(yaml.safe_dump(cropped)),
                        MarkerEncoder()).moderate([clip])
    assert plain.decision is not None and found.decision is not None
    assert plain.decision.action.value == "allow"  # whole frames: too small to see
    assert found.decision.action.value == "block"
    marker = found.decision.categories["marker"]
    assert marker.view is not None and marker.view.time == pytest.approx(1.0)
    assert marker.view.box is not None
    x0, y0, x1, y1 = marker.view.box  # the decided crop, in source pixels, holds the marker
    assert x0 <= 500 and y0 <= 340 and x1 >= 620 and y1 >= 460
    assert found.to_dict()["views_scored"] == 4 * 5  # 4 sampled frames, each whole + 2x2


def test_crops_of_a_wide_video_cover_its_edges_not_only_its_middle() -> None:
    """A 3:1 clip: the whole frame is cut to 2:1 for the model (x 240 to 1200), but crops are
    cut from the whole picture (a 3x2 grid: crops near 2:1), so a marker near the right edge,
    outside the whole frame's cut, is found, in a box that holds it."""
    import copy

    import yaml

    from moderation import Moderator
    from moderation.policy import parse_policy
    from tests.fakes import MARKER_POLICY, MarkerEncoder

    clip = marker_clip(size=(1440, 480), box=(1250, 300, 1410, 460))
    data = copy.deepcopy(MARKER_POLICY)
    data["video"] = {"rate": 1}
    data["views"] = {"crops": "3x2", "min_side": 64}
    [found] = Moderator(parse_policy(yaml.safe_dump(data)), MarkerEncoder()).moderate([clip])
    assert found.decision is not None and found.decision.action.value == "block"
    marker = found.decision.categories["marker"]
    assert marker.view is not None and marker.view.box is not None
    x0, y0, x1, y1 = marker.view.box
    assert x0 <= 1250 and y0 <= 300 and x1 >= 1410 and y1 >= 460
    assert x1 == 1440  # the right edge, which the 2:1 cut of the whole frame leaves out
