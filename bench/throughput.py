"""End-to-end throughput of `moderation serve` on loopback, next to the bare model's speed.

    .venv/bin/python bench/throughput.py
    .venv/bin/python bench/throughput.py --workers 1 --threads 8 --max-batch 16 --max-wait-ms 5
    .venv/bin/python bench/throughput.py --backend onnx --pretrained DIR   # an exported model

In one run, on one machine, with ViT-B-32 and --random-weights (same compute as real weights):
  R        the bare torch model's batched forward (images/s) on preprocessed tensors, fp32,
           whatever backend the server runs (--backend onnx --pretrained DIR: a folder
           `moderation model export --random-weights` wrote from the same model)
  T_large  server throughput for distinct 12-MP JPEG uploads (2-4 MB), N concurrent clients
  T_small  the same with 512-px thumbnails
           each for the clients --connection names: keep-alive (one connection per client,
           reused), close (a new connection per request, sent with `Connection: close`: the
           server answers and closes) or new (a new connection per request that the client
           hangs up after the answer, as `requests.post` without a Session or curl do);
           by default all three, each phase between two measurements of R;
           --hang-up-after-ms makes close and new clients hang up late (by a timer)
  other    the CPU other processes used meanwhile: a shared machine's runs with more
           than 0.2 core of it are flagged suspect
  latency  p50/p95 of one client sending one 12-MP image at a time, next to the bare
           batch-1 forward + draft decode measured here too
  memory   peak RSS of the server's processes
The load generator sends only to 127.0.0.1, is bounded in requests and seconds, and stops.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.images import OUT, photo_like_jpegs, thumbnails  # noqa: E402

MAX_SECONDS = 120  # per load phase, whatever the request count
#: How the load's clients use connections (see the module docstring).
CONNECTIONS = ("keep-alive", "close", "new")


def multipart(data: bytes, filename: str) -> tuple[bytes, str]:
    boundary = f"bench{os.urandom(8).hex()}"
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
        f"filename=\"{filename}\"\r\nContent-Type: image/jpeg\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load(port: int, bodies: list[tuple[bytes, str]], total: int, clients: int,
         connection: str = "keep-alive", hang_up_after: float = 0.0
         ) -> tuple[int, int, float, list[float]]:
    """Send ``total`` requests from ``clients`` threads; returns (ok, failed, seconds,
    latencies). ``connection``: keep-alive (each client reuses one connection), close (a new
    connection per request, asking the server to close it) or new (a new connection per
    request, closed by the client once the answer has arrived). ``hang_up_after`` (close and
    new): the socket is really closed that many seconds after the answer, by a timer, while
    the client goes on with its next request (a client busy elsewhere, or one that closes
    its sockets when it gets round to it)."""
    if connection not in CONNECTIONS:
        raise ValueError(f"connection: one of {CONNECTIONS}")
    fresh = connection != "keep-alive"
    extra = {"Connection": "close"} if connection == "close" else {}
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "failed": 0}
    latencies: list[float] = []
    deadline = time.monotonic() + MAX_SECONDS

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        held: socket.socket | None = None  # the connection's socket, for a late hang-up
        while time.monotonic() < deadline:
            with lock:
                i = state["next"]
                if i >= total:
                    break
                state["next"] += 1
            body, content_type = bodies[i % len(bodies)]
            started = time.perf_counter()
            try:
                if fresh:  # connect() is timed too: it is part of what such a client pays
                    conn.connect()
                    if hang_up_after and conn.sock is not None:
                        held = conn.sock.dup()
                conn.request("POST", "/v1/moderate", body,
                             {"Content-Type": content_type, **extra})
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            if fresh:
                conn.close()
            if held is not None:
                closer = threading.Timer(hang_up_after if ok else 0.0, held.close)
                closer.daemon = True
                closer.start()
                held = None
            elapsed = time.perf_counter() - started
            with lock:
                state["ok" if ok else "failed"] += 1
                if ok:
                    latencies.append(elapsed)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return state["ok"], state["failed"], time.perf_counter() - started, latencies


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children so far."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


class OtherLoad:
    """How many cores the rest of the machine kept busy (everything but this process and the
    server's) between two moments: on a shared machine, a phase with other load is suspect
    (R, which uses every core, suffers more from it than the server does)."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.start = self._now()

    def _now(self) -> tuple[float, float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")
        own = sum(os.times()[:2])
        return time.monotonic(), busy, own + cpu_seconds(self.server_pid)

    def cores(self) -> float:
        """Since the last call (or construction)."""
        now = self._now()
        (t0, busy0, ours0), (t1, busy1, ours1) = self.start, now
        self.start = now
        return max(0.0, (busy1 - busy0) - (ours1 - ours0)) / max(t1 - t0, 1e-9)


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process and its children, in MB."""
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    total = 0.0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def best_of(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


class BareModel:
    """The model alone, in this process, with torch's default threads (all cores)."""

    def __init__(self, model: str) -> None:
        from moderation.backends import RandomWeightsWarning
        from moderation.backends.torch import Encoder

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            self.encoder = Encoder.load(model, random_weights=True)

    def images_per_second(self, batch: int = 16) -> float:
        """R: batched forward on preprocessed tensors."""
        size = self.encoder.image_size
        pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size), np.float32)
        self.encoder.encode_pixels(pixels)
        return batch / best_of(lambda: self.encoder.encode_pixels(pixels), 3)

    def batch1_seconds(self) -> float:
        size = self.encoder.image_size
        one = np.random.default_rng(1).standard_normal((1, 3, size, size), np.float32)
        self.encoder.encode_pixels(one)
        return statistics.median(
            [best_of(lambda: self.encoder.encode_pixels(one), 1) for _ in range(7)]
        )

    def decode_seconds(self, data: bytes) -> float:
        from moderation.images import decode_image

        return statistics.median(
            [best_of(lambda: decode_image(data, draft_size=self.encoder.image_size), 1)
             for _ in range(5)]
        )


def start_server(workers: int, threads: int, settings: dict[str, object],
                 model: list[str] | None = None, python: str = sys.executable,
                 root: Path | None = None, policy: Path | None = None,
                 ) -> tuple[subprocess.Popen[bytes], int, Any]:
    """`moderation serve` (default policy, ViT-B-32, random weights) on a free loopback port,
    with MODERATION_<key> settings; returns once it answers /readyz. ``root``: serve the code
    of another checkout (e.g. a git worktree of an older commit) instead of this one."""
    port = free_port()
    env = dict(os.environ, MODERATION_CACHE_DIR=str(OUT / "cache"),
               MODERATION_DATABASE_URL=f"sqlite:///{tempfile.mkdtemp(prefix='bench-db-')}"
                                       "/decisions.sqlite3")
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root),
                                                          env.get("PYTHONPATH")]))
    env.update({f"MODERATION_{k}": str(v) for k, v in settings.items() if v is not None})
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-serve-", suffix=".log", delete=False)
    server = subprocess.Popen(
        [python, "-m", "moderation.cli", "serve", *(model or ["--random-weights"]),
         "--policy", str(policy or ROOT / "policies" / "default.yaml"), "--port", str(port),
         "--workers", str(workers), "--threads", str(threads)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            stop_server(server, log)
            sys.exit("server did not start:\n" + log.read())
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return server, port, log
        except (OSError, http.client.HTTPException):
            time.sleep(0.5)


def stop_server(server: subprocess.Popen[bytes], log: Any) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()
    os.unlink(log.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                        help="default: as `moderation serve`")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--torch-threads", type=int, help="per worker (default: cores/workers)")
    parser.add_argument("--max-batch", type=int, help="server batcher (MODERATION_BATCH_MAX)")
    parser.add_argument("--max-wait-ms", type=float, help="server batcher wait")
    parser.add_argument("--trace", choices=["true", "false"], help="MODERATION_TRACE")
    parser.add_argument("--switch-interval", type=float, help="MODERATION_GIL_SWITCH_INTERVAL")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--connection", choices=CONNECTIONS, action="append",
                        help="how the clients connect, repeatable: keep-alive (one connection "
                             "per client), close (a new connection per request with "
                             "`Connection: close`), new (a new connection per request, hung "
                             "up by the client); default: all three. The latency phase uses "
                             "the first")
    parser.add_argument("--hang-up-after-ms", type=float, default=0.0,
                        help="close and new clients: hang up this long after each answer "
                             "(by a timer, without waiting for it)")
    parser.add_argument("--large", type=int, default=96, help="12-MP requests")
    parser.add_argument("--small", type=int, default=160, help="512-px requests")
    parser.add_argument("--latency", type=int, default=25, help="sequential 12-MP requests")
    parser.add_argument("--images", type=int, default=32, help="distinct images per size")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                        help="the server's backend (R stays the bare torch model)")
    parser.add_argument("--pretrained", type=Path,
                        help="--backend onnx: the exported folder (made with --random-weights)")
    parser.add_argument("--server-python", default=sys.executable,
                        help="the server's interpreter, e.g. a torch-free venv's "
                             "(.venv-onnx/bin/python); this process keeps torch for R")
    parser.add_argument("--server-root", type=Path,
                        help="serve the code of this checkout (e.g. `git worktree add "
                             "/tmp/old COMMIT`), on PYTHONPATH and as the working directory")
    args = parser.parse_args()
    connections = list(dict.fromkeys(args.connection or CONNECTIONS))
    if args.backend == "onnx" and args.pretrained is None:
        parser.error("--backend onnx needs --pretrained DIR (moderation model export "
                     "--random-weights --out DIR)")

    large = photo_like_jpegs(args.images, (4000, 3000))
    small = thumbnails(large)
    large_bodies = [multipart(p.read_bytes(), p.name) for p in large]
    small_bodies = [multipart(p.read_bytes(), p.name) for p in small]
    mb = statistics.mean(len(b) for b, _ in large_bodies) / 1e6

    bare = BareModel(args.model)

    settings = {"TORCH_THREADS": args.torch_threads, "BATCH_MAX": args.max_batch,
                "BATCH_MAX_WAIT_MS": args.max_wait_ms, "TRACE": args.trace,
                "GIL_SWITCH_INTERVAL": args.switch_interval}
    served = (["--backend", "onnx", "--pretrained", str(args.pretrained)]
              if args.backend == "onnx" else None)
    server, port, log = start_server(args.workers, args.threads, settings, served,
                                     args.server_python, args.server_root)
    phases: list[dict[str, Any]] = []
    try:
        # every worker warm: a few rounds of concurrent requests
        for connection in connections:
            load(port, small_bodies, 4 * args.workers * args.clients // 2, args.clients,
                 connection)

        # R is measured right before and after each load phase (the server idle meanwhile):
        # the machine is shared and drifts, so each ratio uses the R of its own moment
        other = OtherLoad(server.pid)
        r_samples = [bare.images_per_second()]
        r_other = [other.cores()]
        for size, bodies, total in (("large", large_bodies, args.large),
                                    ("small", small_bodies, args.small)):
            for connection in connections:
                other.cores()
                ok, bad, sec, _ = load(port, bodies, total, args.clients, connection,
                                       args.hang_up_after_ms / 1000)
                load_other = other.cores()
                r_samples.append(bare.images_per_second())
                r_other.append(other.cores())
                r_around = (r_samples[-2] + r_samples[-1]) / 2
                phases.append({"size": size, "connection": connection, "ok": ok,
                               "failed": bad, "seconds": sec, "T": ok / sec,
                               "R_around": r_around, "T/R": ok / sec / r_around,
                               "other_cores": load_other,
                               "other_cores_R": max(r_other[-2:])})
        batch1 = bare.batch1_seconds()
        decode = bare.decode_seconds(large[0].read_bytes())
        ok_1, bad_1, _, lat = load(port, large_bodies, args.latency, 1, connections[0])
        peak = peak_rss_mb(server.pid)
    finally:
        stop_server(server, log)

    r = statistics.mean(r_samples)
    first = {p["size"]: p for p in phases if p["connection"] == connections[0]}
    p50 = statistics.median(lat)
    p95 = sorted(lat)[max(0, int(round(0.95 * len(lat))) - 1)]
    reference = batch1 + decode
    figures = {
        "backend": args.backend if args.backend == "torch" else f"onnx {args.pretrained}",
        "server_python": args.server_python,
        "config": {k: getattr(args, k) for k in ("workers", "threads", "torch_threads",
                                                 "max_batch", "max_wait_ms", "trace",
                                                 "switch_interval", "clients",
                                                 "hang_up_after_ms")},
        "cores": os.cpu_count(),
        "connections": connections, "phases": phases,
        "R_samples": r_samples, "R": r, "other_cores_R": r_other,
        # the first connection mode's, as before the modes
        "T_large": first["large"]["T"], "T_small": first["small"]["T"],
        "T_large/R": first["large"]["T/R"], "T_small/R": first["small"]["T/R"],
        "p50_ms": 1000 * p50, "p95_ms": 1000 * p95,
        "batch1_forward_ms": 1000 * batch1, "draft_decode_ms": 1000 * decode,
        "p50/(batch1+decode)": p50 / reference,
        "failed": sum(p["failed"] for p in phases) + bad_1, "peak_rss_mb": peak,
    }
    print(f"backend: {figures['backend']}; server interpreter {args.server_python}")
    print(f"machine: {os.cpu_count()} cores; server: {args.workers} worker(s) x "
          f"{args.threads} threads, torch threads {args.torch_threads or 'cores/workers'}, "
          f"batcher max {args.max_batch or 'default'} wait {args.max_wait_ms or 'default'} ms, "
          f"trace {args.trace or 'default'}, GIL switch {args.switch_interval or 'default'}")
    print(f"R  bare model, batch 16:         {r:7.2f} images/s   (measured before, between "
          f"and after the load phases: {', '.join(f'{x:.2f}' for x in r_samples)})")
    if max(r_other + [p["other_cores"] for p in phases]) > 0.2:
        print("   other processes kept cores busy meanwhile (below): those ratios are suspect")
    for p in phases:
        name = (f"T_large  12-MP ({mb:.1f} MB)" if p["size"] == "large" else "T_small  512-px")
        late = (f" (hang-up +{args.hang_up_after_ms:g} ms)"
                if args.hang_up_after_ms and p["connection"] != "keep-alive" else "")
        label = f"{name}, {args.clients} clients, {p['connection']}{late}:"
        print(f"{label:<50}{p['T']:6.2f} images/s   T_{p['size']}/R = {p['T/R']:.2f}   "
              f"(R around it {p['R_around']:.2f}; {p['ok']} ok, {p['failed']} failed; "
              f"other load {p['other_cores']:.2f} cores, {p['other_cores_R']:.2f} during R)")
    print(f"latency  1 client, 12-MP, {connections[0]}:  p50 {1000 * p50:6.1f} ms  "
          f"p95 {1000 * p95:6.1f} ms   ({ok_1} ok, {bad_1} failed)")
    print(f"reference  batch-1 forward {1000 * batch1:.1f} ms + draft decode "
          f"{1000 * decode:.1f} ms = {1000 * reference:.1f} ms;  p50/reference = "
          f"{p50 / reference:.2f}")
    print(f"peak RSS of the server processes: {peak:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
