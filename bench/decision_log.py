"""What recording decisions costs: end-to-end throughput with the decision log on and off.

    .venv/bin/python bench/decision_log.py

Two servers run side by side (ViT-B-32, random weights, serve's defaults), one recording
decisions to SQLite and one not; they are loaded in alternating rounds (8 clients, 512-px
and 12-MP JPEGs), so that the machine's drift hits both alike. Only one is loaded at a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.images import photo_like_jpegs, thumbnails  # noqa: E402
from bench.throughput import load, multipart, start_server, stop_server  # noqa: E402

WORKERS = min(os.cpu_count() or 1, 4)  # as `moderation serve` defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64, help="per round and server")
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    large = photo_like_jpegs(32, (4000, 3000))
    bodies = {
        "512-px": [multipart(p.read_bytes(), p.name) for p in thumbnails(large)],
        "12-MP": [multipart(p.read_bytes(), p.name) for p in large],
    }
    servers = {
        "off": start_server(WORKERS, 4, {"RECORD_DECISIONS": "false"}),
        "on": start_server(WORKERS, 4, {"RECORD_DECISIONS": "true"}),
    }
    totals = {(kind, rec): [0, 0.0] for kind in bodies for rec in servers}
    per_round: dict[str, list[float]] = {kind: [] for kind in bodies}
    failed = 0
    try:
        for _, port, _ in servers.values():
            load(port, bodies["512-px"], 32, args.clients)  # warm-up
        for round_ in range(args.rounds):
            order = ["off", "on"] if round_ % 2 == 0 else ["on", "off"]
            for kind, kind_bodies in bodies.items():
                n = args.requests if kind == "512-px" else args.requests // 2
                rate = {}
                for rec in order:
                    ok, bad, seconds, _ = load(servers[rec][1], kind_bodies, n, args.clients)
                    totals[kind, rec][0] += ok
                    totals[kind, rec][1] += seconds
                    rate[rec] = ok / seconds
                    failed += bad
                per_round[kind].append(rate["on"] / rate["off"])
    finally:
        for server, _, log in servers.values():
            stop_server(server, log)
    print(f"{args.rounds} alternating rounds, {args.clients} clients, {WORKERS} worker(s) x 4 "
          "threads each (the serve defaults)")
    for kind in bodies:
        off = totals[kind, "off"][0] / totals[kind, "off"][1]
        on = totals[kind, "on"][0] / totals[kind, "on"][1]
        rounds = ", ".join(f"{x:.2f}" for x in per_round[kind])
        print(f"{kind:>7}: recording off {off:6.2f} images/s, on {on:6.2f} images/s: "
              f"on/off = {on / off:.3f} ({100 * (1 - on / off):+.1f}% cost); per round: "
              f"{rounds}; median {statistics.median(per_round[kind]):.3f}")
    print(f"failed requests: {failed}")


if __name__ == "__main__":
    main()
