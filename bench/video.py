"""How long decoding a video's sampled frames takes, and how much memory it needs, on a 60-s
(or ``--minutes``) 1080p H.264 clip; with ``--encode``, what share of decode + encode the
decoding is (ViT-B-32's image tower, random weights: the same arithmetic as real ones).

The clip: 30 fps, libx264 (preset veryfast, CRF 23, a keyframe every 2 s as phones and
streaming encoders write them), a smooth colour field panning under a moving square, with
sensor-like noise, so that it is not trivially compressible (13 MB a minute). It is made once
and kept in ``--keep`` (default ``bench/out/``): a 60-s clip takes one to four minutes to make
on two shared cores. A longer clip (a whole number of minutes) is the 60-s one repeated, its
packets copied with shifted timestamps (each GOP starts with an IDR frame: the stream is valid,
and costs what a clip encoded at that length costs to decode). Each run is a fresh process,
and prints a line:

    clip=60s-1080p sampled=N seconds=S demux_s=D decoded=F seeks=K decoded_gpx=G
        decode_share=… peak_rss_mb=M base_rss_mb=B … load=L

``seconds``: :func:`moderation.video.decode_video` (demux pass, decoding, conversion to RGB
images of 960x540), ``demux_s`` the part of it that reads every packet without decoding;
``decoded`` frames the decoder produced to reach the sampled ones, ``seeks`` the seeks it made,
``decoded_gpx`` their pixels in billions (marked when over the default
``VideoLimits.max_decoded_pixels``: the bench lifts that limit and the time budget, to measure
what decoding costs); ``base_rss_mb`` the process before decoding (Python, PyAV; torch and the
model with ``--encode``), ``load`` the machine's load averages (1/5/15 min) when the run ended.

    .venv/bin/python bench/video.py [--minutes 1] [--keep DIR] [--runs 3] [--encode]
        [--rate 1.0] [--max-frames 32] [--snap 0 [1 …]] [--through]

``--service``: instead, through a real `moderation serve` (ViT-B-32, random weights, the
default policy, 1 worker, recording into a fresh SQLite log, requests up to 256 MiB): the
clip posted to ``POST /v1/moderate``; up to ``MODERATION_VIDEO_INLINE_MAX_S`` (60 s) it is
answered inline, a longer one (``--minutes 10``) as a job, polled until done. One line per
run:

    service clip=… answered=inline|job seconds=S processing_ms=P frames_scored=N
        worker_peak_rss_mb=M load=L

``seconds``: from the request to the answer (the job's result); ``processing_ms`` what the
server measured for the decision (decode, encode, record); the worker's peak RSS is its
``VmHWM``.

``--max-frames``: the cap (the service's default: 32; a 60-s clip at 1 fps has 61 frames to
sample, so pass 61 or more for exactly one a second). ``--snap S``: sampled times may move up
to S seconds to a keyframe (``VideoSampling.keyframe_snap_s``; several values: ``--runs`` runs
of each). ``--through``: decode through from the start instead of seeking to keyframes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synthetic import high_water_mb, load  # noqa: E402

OUT = ROOT / "bench" / "out"
SIZE = (1920, 1080)
FPS = 30
GOP = 2 * FPS


def make_clip(path: Path, seconds: int) -> None:
    """The benchmark clip (see the module's docstring), written to ``path`` via a temporary
    file, so that an interrupted run leaves no half clip behind."""
    import av
    from PIL import Image

    width, height = SIZE
    rng = np.random.default_rng(0)
    # a colour field twice the frame's size, panned across; noise from a bank of 8 frames
    coarse = rng.integers(0, 256, (18, 32, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((2 * width, 2 * height),
                                                      Image.Resampling.BICUBIC))
    noise = rng.normal(0, 5, (8, height, width, 3)).astype(np.int16)
    partial = path.with_suffix(".partial.mp4")
    started = time.perf_counter()
    with av.open(str(partial), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = GOP
        stream.codec_context.options = {"preset": "veryfast", "crf": "23"}
        for i in range(seconds * FPS):
            t = i / FPS
            x = int((width / 2) * (1 + np.sin(2 * np.pi * t / 17)))
            y = int((height / 2) * (1 + np.sin(2 * np.pi * t / 23)))
            pixels = field[y : y + height, x : x + width].astype(np.int16) + noise[i % 8]
            sx = int((width - 200) * (0.5 + 0.5 * np.sin(2 * np.pi * t / 5)))
            pixels[400:600, sx : sx + 200] = (255 * (i // FPS % 2), 40, 200)
            frame = av.VideoFrame.from_ndarray(np.clip(pixels, 0, 255).astype(np.uint8),
                                               format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
            if i % (10 * FPS) == 0:
                print(f"  making {path.name}: {t:.0f}/{seconds} s "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        for packet in stream.encode():
            out.mux(packet)
    partial.rename(path)


def repeat_clip(source: Path, path: Path, times: int) -> None:
    """``source`` ``times`` over, one after the other, as one clip (packets copied)."""
    import av

    partial = path.with_suffix(".partial.mp4")
    with av.open(str(source)) as src:
        stream = src.streams.video[0]
        length = max(p.pts + p.duration for p in src.demux(stream) if p.pts is not None)
        with av.open(str(partial), "w", format="mp4") as out:
            copy = out.add_stream_from_template(stream, opaque=True)
            for i in range(times):  # muxing takes each packet's data: demuxed anew each time
                src.seek(0)
                for packet in src.demux(stream):
                    if packet.size and packet.pts is not None and packet.dts is not None:
                        packet.pts += i * length
                        packet.dts += i * length
                        packet.stream = copy
                        out.mux(packet)
    partial.rename(path)


def measure(path: Path, rate: float, max_frames: int, snap: float, seek: bool,
            encode: bool) -> None:
    """In its own process: one decode (and encode), then a JSON line of figures."""
    import warnings

    import moderation.video as video

    counts: dict[str, float] = {"demux_s": 0.0, "decoded": 0, "seeks": 0}
    demux = video._demux

    def timed_demux(*args, **kwargs):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return demux(*args, **kwargs)
        finally:
            counts["demux_s"] += time.perf_counter() - started

    class CountingDecoder(video._Decoder):
        def run(self, steps):  # type: ignore[no-untyped-def]
            try:
                return super().run(steps)
            finally:
                counts["decoded"], counts["seeks"] = self.decoded, self.seeks

    video._demux = timed_demux  # type: ignore[assignment]
    video._Decoder = CountingDecoder  # type: ignore[misc]
    import av  # noqa: F401  (imported before the base is measured, as a service has it)

    encoder = None
    if encode:
        from PIL import Image

        from moderation.backends import RandomWeightsWarning
        from moderation.backends.torch import Encoder

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            encoder = Encoder.load("ViT-B-32", random_weights=True)
        encoder.encode_images([Image.new("RGB", (224, 224))] * 16)  # warm, as a service's is
    base = high_water_mb()
    sampling = video.VideoSampling(rate_fps=rate, max_frames=max_frames, keyframe_snap_s=snap)
    # what decoding costs, whatever the limits say (the line compares it with the default)
    limits = video.VideoLimits(time_budget_s=3600.0, max_decoded_pixels=10**15)
    started = time.perf_counter()
    decoded = video.decode_video(path, sampling=sampling, limits=limits, seek=seek)
    seconds = time.perf_counter() - started
    encode_s = None
    if encoder is not None:
        started = time.perf_counter()
        encoder.encode_images(decoded.frames)
        encode_s = time.perf_counter() - started
    print(json.dumps({"sampled": len(decoded.frames), "seconds": seconds, "encode_s": encode_s,
                      "peak": high_water_mb(), "base": base,
                      "pixels": decoded.width * decoded.height * counts["decoded"],
                      "limit": video.VideoLimits().max_decoded_pixels, **counts}))


def run(path: Path, label: str, args: argparse.Namespace, snap: float) -> None:
    """One measurement in a fresh process; prints its line."""
    command = [sys.executable, __file__, "--measure", str(path), "--rate", str(args.rate),
               "--max-frames", str(args.max_frames), "--snap", str(snap)]
    command += ["--through"] if args.through else []
    command += ["--encode"] if args.encode else []
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    f = json.loads(next(line for line in reversed(out.strip().splitlines())
                        if line.startswith("{")))
    share = ("n/a" if f["encode_s"] is None
             else f"{f['seconds'] / (f['seconds'] + f['encode_s']):.2f}")
    encode = "" if f["encode_s"] is None else f" encode_s={f['encode_s']:.2f}"
    over = " (over the default limit)" if f["pixels"] > f["limit"] else ""
    print(f"clip={label} sampled={f['sampled']} seconds={f['seconds']:.2f} "
          f"demux_s={f['demux_s']:.3f} decoded={int(f['decoded'])} seeks={int(f['seeks'])} "
          f"decoded_gpx={f['pixels'] / 1e9:.2f}{over}{encode} decode_share={share} "
          f"peak_rss_mb={f['peak']:.0f} base_rss_mb={f['base']:.0f} "
          f"seek={'off' if args.through else 'on'} rate={args.rate:g} "
          f"max_frames={args.max_frames} snap={snap:g} load={load()}", flush=True)


def through_service(path: Path, label: str, runs: int, snap: float | None = None) -> None:
    """The clip through a real server (see the module); prints a line per run. ``snap``:
    the default policy with this ``video.keyframe_snap_s`` instead of its own."""
    import http.client
    import tempfile
    import uuid

    import yaml

    from bench.throughput import start_server, stop_server

    policy = None
    if snap is not None:
        data = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
        data["video"] = {**data.get("video", {}), "keyframe_snap_s": snap}
        policy = Path(tempfile.mkdtemp(prefix="bench-video-")) / "policy.yaml"
        policy.write_text(yaml.safe_dump(data, sort_keys=False))
    server, port, log = start_server(1, 4, {"MAX_CONTENT_LENGTH": 256 * 2**20}, policy=policy)
    try:
        workers = [int(p.name) for p in Path("/proc").glob("[0-9]*")
                   if (p / "stat").exists()
                   and (p / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(server.pid)]
        data = path.read_bytes()
        for run_ in range(runs):
            boundary = uuid.uuid4().hex
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                    f"filename=\"clip-{run_}.mp4\"\r\nContent-Type: video/mp4\r\n\r\n"
                    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
            started = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            conn.request("POST", "/v1/moderate", body, {
                "Content-Type": f"multipart/form-data; boundary={boundary}"})
            response = conn.getresponse()
            answer = json.loads(response.read())
            how = "inline"
            if response.status == 202:
                how = "job"
                location = response.getheader("Location") or ""
                while True:
                    time.sleep(0.2)
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    conn.request("GET", location)  # the uploader's (no API keys here)
                    job = json.loads(conn.getresponse().read())
                    if "state" not in job:
                        sys.exit(f"GET {location}: {job}")
                    if job["state"] in ("done", "failed"):
                        break
                if job["state"] != "done":
                    sys.exit(f"the job failed: {job['error']}")
                answer = job["result"]
            elif response.status != 200:
                sys.exit(f"the server answered {response.status}: {answer}")
            seconds = time.perf_counter() - started
            [result] = answer["results"]
            peak = max(int(line.split()[1]) for pid in workers
                       for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("VmHWM")) / 1024
            print(f"service clip={label} snap={'policy' if snap is None else f'{snap:g}'} "
                  f"answered={how} seconds={seconds:.2f} "
                  f"processing_ms={result['processing_ms']:.0f} "
                  f"frames_scored={result['frames_scored']} worker_peak_rss_mb={peak:.0f} "
                  f"load={load()}", flush=True)
    finally:
        stop_server(server, log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="the clip's length")
    parser.add_argument("--keep", type=Path, default=OUT, help="where the clip is kept")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--encode", action="store_true",
                        help="also encode the sampled frames (ViT-B-32, random weights)")
    parser.add_argument("--rate", type=float, default=1.0, help="frames a second sampled")
    parser.add_argument("--max-frames", type=int, default=32, help="sampled frames at most")
    parser.add_argument("--snap", type=float, nargs="+", default=[0.0],
                        help="seconds a sampled time may move to a keyframe")
    parser.add_argument("--through", action="store_true", help="decode through, no seeking")
    parser.add_argument("--service", action="store_true",
                        help="through a real moderation serve: inline, or as a job")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.snap_given = any(a == "--snap" or a.startswith("--snap=") for a in sys.argv[1:])
    if args.measure:
        measure(args.measure, args.rate, args.max_frames, args.snap[0], not args.through,
                args.encode)
        return
    seconds = round(args.minutes * 60)
    args.keep.mkdir(parents=True, exist_ok=True)
    path = args.keep / f"clip-{seconds}s-1080p{FPS}-gop{GOP}.mp4"
    if not path.exists():
        if seconds > 60 and seconds % 60 == 0:
            minute = args.keep / f"clip-60s-1080p{FPS}-gop{GOP}.mp4"
            if not minute.exists():
                make_clip(minute, 60)
            repeat_clip(minute, path, seconds // 60)
        else:
            make_clip(path, seconds)
    print(f"# {path.name}: {path.stat().st_size / 1e6:.1f} MB", flush=True)
    if args.service:  # --snap given: the default policy with each; else the policy's own
        for snap in (args.snap if args.snap_given else [None]):
            through_service(path, f"{seconds}s-1080p", args.runs, snap)
        return
    for snap in args.snap:
        for _ in range(args.runs):
            run(path, f"{seconds}s-1080p", args, snap)


if __name__ == "__main__":
    main()
