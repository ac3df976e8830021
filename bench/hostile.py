"""What hostile inputs cost `moderation serve`: seconds, worker memory, stalls, lost decisions.

    .venv/bin/python bench/hostile.py                      # this checkout
    .venv/bin/python bench/hostile.py --repo /tmp/before   # another checkout (same venv)

One server (ViT-B-32, random weights, 2 workers x 4 threads, the default policy) on loopback:
  files     each hostile file posted alone: seconds to the answer, status and error code, and
            how much the workers' peak RSS (VmHWM, reset before each file) grew
  stall     24 connections (3 per thread) that send headers and part of a declared body, then
            wait: how many of 5 health checks sent meanwhile are answered
  kill      6 clients while a worker is killed with SIGKILL: answered decisions missing
  poison    a JSON id with a lone surrogate, then 20 ordinary requests: how many answered
            decisions are missing from the log
  reload    a reload, then 16 requests at once: how many were decided with the old version
Every request has a timeout (60 s); a phase that times out says so.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.hostile import (  # noqa: E402
    big_canvas_gif,
    extreme_aspect_gif,
    extreme_aspect_png,
    many_scan_jpeg,
)

TOKEN = "bench-admin"
TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(out)


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux: clear_refs 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Server:
    def __init__(self, repo: Path, folder: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.policy = folder / "policy.yaml"
        self.policy.write_text((repo / "policies" / "default.yaml").read_text())
        self.database = folder / "decisions.sqlite3"
        env = dict(os.environ, PYTHONPATH=str(repo), MODERATION_ADMIN_TOKEN=TOKEN,
                   MODERATION_DATABASE_URL=f"sqlite:///{self.database}")
        self.log = (folder / "server.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moderation.cli", "serve", "--policy", str(self.policy),
             "--port", str(self.port), "--workers", "2", "--threads", "4", "--random-weights"],
            cwd=repo, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # it could not start: say why, do not wait
                raise SystemExit(f"the server exited ({self.process.returncode}); its log: "
                                 f"{folder / 'server.log'}")
            try:
                if requests.get(f"{self.base}/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            raise SystemExit(f"the server was not ready in 300 s; its log: "
                             f"{folder / 'server.log'}")
        while len(children(self.process.pid)) < 2:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited ({self.process.returncode}); its log: "
                                 f"{folder / 'server.log'}")
            time.sleep(0.2)
        time.sleep(1)

    def logged(self, ids: list[str]) -> int:
        time.sleep(0.5)  # what an async recorder had not written yet is lost on a kill anyway
        with sqlite3.connect(self.database) as db:
            return sum(
                1 for i in ids
                if db.execute("SELECT 1 FROM decisions WHERE id = ?", (i,)).fetchone()
            )

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(40)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def post_file(server: Server, name: str, data: bytes) -> tuple[float, str]:
    started = time.monotonic()
    try:
        r = requests.post(f"{server.base}/v1/moderate", files={"image": (name, data)},
                          timeout=TIMEOUT)
        body = r.json()
        what = f"{r.status_code} {body.get('error', {}).get('code', 'decided')}"
    except requests.RequestException as e:
        what = f"failed: {type(e).__name__}"
    return time.monotonic() - started, what


def files_phase(server: Server) -> None:
    cases = [
        ("20000x1 PNG", extreme_aspect_png(20000, 1)),
        ("1x20000 PNG", extreme_aspect_png(1, 20000)),
        ("10799x1 GIF", extreme_aspect_gif(10799, 1)),
        ("7999x7999 JPEG, 1,600 scans", many_scan_jpeg(7999, 1600)),
        ("4000x4000 GIF, 600 frames", big_canvas_gif(4000, 600)),
    ]
    print(f"{'file':<30} {'bytes':>8} {'seconds':>8} {'worker MB':>10}  answer")
    for name, data in cases:
        for pid in children(server.process.pid):
            reset_peak(pid)
        before = {pid: peak_mb(pid) for pid in children(server.process.pid)}
        seconds, what = post_file(server, name.replace(" ", "_"), data)
        grew = max(peak_mb(pid) - mb for pid, mb in before.items())
        print(f"{name:<30} {len(data):>8,} {seconds:>8.2f} {grew:>+10.0f}  {what}")


def stall_phase(server: Server) -> None:
    stalled = []
    for _ in range(24):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        s.sendall(b"POST /v1/moderate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{\"images\": [")
        stalled.append(s)
    time.sleep(0.5)
    slowest, unanswered = 0.0, 0
    for _ in range(5):
        started = time.monotonic()
        try:
            requests.get(f"{server.base}/healthz", timeout=15)
            slowest = max(slowest, time.monotonic() - started)
        except requests.RequestException:
            unanswered += 1
    for s in stalled:
        s.close()
    print(f"stall: 5 health checks with 24 stalled bodies open: {unanswered} unanswered within "
          f"15 s, the slowest answered one took {slowest:.2f} s")


def moderate_json(server: Server, item_id: str) -> list[str]:
    png = base64.b64encode(extreme_aspect_png(64, 64)).decode()
    r = requests.post(f"{server.base}/v1/moderate", timeout=TIMEOUT,
                      data=json.dumps({"images": [{"data": png, "id": item_id}]}),
                      headers={"Content-Type": "application/json"})
    if r.status_code != 200:
        return []
    return [item["decision_id"] for item in r.json()["results"] if "decision_id" in item]


def poison_phase(server: Server) -> None:
    r = requests.post(f"{server.base}/v1/moderate", timeout=TIMEOUT,
                      data=b'{"images": [{"data": "' + base64.b64encode(
                          extreme_aspect_png(64, 64)) + b'", "id": "x\\ud800y"}]}',
                      headers={"Content-Type": "application/json"})
    answered = [d for i in range(20) for d in moderate_json(server, f"after-{i}")]
    print(f"poison: lone-surrogate id answered {r.status_code}; then {len(answered)} decisions "
          f"answered, {len(answered) - server.logged(answered)} of them missing from the log")


def kill_phase(server: Server) -> None:
    answered: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        while not stop.is_set():
            try:
                answered.extend(moderate_json(server, f"k{n}"))
            except requests.RequestException:
                pass

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)
    os.kill(children(server.process.pid)[0], signal.SIGKILL)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(TIMEOUT)
    missing = len(answered) - server.logged(answered)
    print(f"kill: SIGKILL of a worker under load: {missing} of {len(answered)} answered "
          "decisions missing from the log")


def reload_phase(server: Server) -> None:
    text = server.policy.read_text()
    stale = total = 0
    for trial in range(3):
        server.policy.write_text(text.replace("name: default", f"name: trial{trial}", 1))
        r = requests.post(f"{server.base}/v1/policy/reload", timeout=TIMEOUT,
                          headers={"Authorization": f"Bearer {TOKEN}"})
        version = r.json()["version"]
        seen: list[str] = []

        def one(seen: list[str] = seen) -> None:
            png = extreme_aspect_png(64, 64)
            body = requests.post(f"{server.base}/v1/moderate", timeout=TIMEOUT,
                                 files={"image": ("a.png", png)}).json()
            seen.append(body["policy"]["version"])

        threads = [threading.Thread(target=one) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        stale += sum(v != version for v in seen)
        total += len(seen)
    print(f"reload: {stale} of {total} requests sent right after a reload answered used the "
          "old version")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout to serve")
    parser.add_argument("--phases", default="files,stall,kill,poison,reload",
                        help="comma-separated, in this order (kill before poison: a poisoned "
                        "recorder loses decisions by itself)")
    args = parser.parse_args()
    phases = {"files": files_phase, "stall": stall_phase, "kill": kill_phase,
              "poison": poison_phase, "reload": reload_phase}
    with tempfile.TemporaryDirectory() as folder:
        server = Server(args.repo.resolve(), Path(folder))
        print(f"server from {args.repo}: ViT-B-32, random weights, 2 workers x 4 threads")
        try:
            for name in args.phases.split(","):
                phases[name](server)
        finally:
            started = time.monotonic()
            server.stop()
            print(f"graceful stop: {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
