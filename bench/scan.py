"""The bulk scan, local and on Ray Data, over the same photo-like 12-MP JPEGs, in one run:
images/s of each, the ratio, and the rate of one actor (what sizing a cluster multiplies).

    .venv/bin/python bench/scan.py [--images 64] [--actors 1] [--actor-cpus 2] [--rounds 2]

ViT-B-32 with random weights (the arithmetic of real ones), the default policy, batches of 16.
Both drivers read and decode the files themselves (the local scan in 2 threads beside the
model; a Ray actor in ``--actor-cpus`` threads). Ray runs on a local instance with every core
(started once, before the timed rounds: a cluster is up before a backlog is scanned). Rounds
alternate local and Ray; the best of each counts. Ray is timed over the whole run (actors start
included) and once running: the extra images of a run of N over a run of N/2, divided by the
extra time, which is what a backlog of millions sees.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.images import photo_like_jpegs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--actor-cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import ray

    from moderation.backends import EncoderSpec
    from moderation.scan import ScanMapper, ScanSpec, Writer, run_local
    from moderation.scan_ray import ray_scan

    files = photo_like_jpegs(args.images, (4000, 3000))
    inputs = [(str(p), str(p)) for p in files]
    spec = ScanSpec(str(ROOT / "policies" / "default.yaml"), EncoderSpec(
        random_weights=True, cache_dir=str(Path(tempfile.gettempdir()) / "bench-scan-cache")))
    local_mapper = ScanMapper(spec)
    local_mapper.decode_many([inputs[0][1]])  # the model, built before the clock starts
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ray_scan(spec, inputs[:16], Path(tempfile.mkdtemp()) / "warm.jsonl", actors=args.actors,
             actor_cpus=args.actor_cpus)  # the actors' workers and the model cached warm
    local, on_ray, marginal = [], [], []
    try:
        for _ in range(args.rounds):
            out = Path(tempfile.mkdtemp()) / "local.jsonl"
            writer = Writer(out)
            started = time.perf_counter()
            run_local(local_mapper, inputs, writer, spec.encoder.batch_size)
            local.append(len(inputs) / (time.perf_counter() - started))
            writer.close()
            times = []
            for part in (inputs[: len(inputs) // 2], inputs):
                out = Path(tempfile.mkdtemp()) / "ray.jsonl"
                started = time.perf_counter()
                ray_scan(spec, part, out, actors=args.actors, actor_cpus=args.actor_cpus)
                times.append(time.perf_counter() - started)
            on_ray.append(len(inputs) / times[1])
            marginal.append((len(inputs) - len(inputs) // 2) / (times[1] - times[0]))
    finally:
        ray.shutdown()
    best_local, best_ray, best_marginal = max(local), max(on_ray), max(marginal)
    print(f"{len(inputs)} JPEGs of 4000x3000 ({sum(p.stat().st_size for p in files) / 1e6:.0f} "
          f"MB), ViT-B-32 random weights, {os.cpu_count()} cores, best of {args.rounds}")
    print(f"local scan:          {best_local:6.2f} images/s   (rounds: "
          f"{', '.join(f'{x:.2f}' for x in local)})")
    print(f"ray, {args.actors} actor(s) x {args.actor_cpus} CPUs: {best_ray:6.2f} images/s   "
          f"(rounds: {', '.join(f'{x:.2f}' for x in on_ray)}; includes starting the actors)")
    print(f"ray, once running:   {best_marginal:6.2f} images/s   (the images of a run of "
          f"{len(inputs)} beyond a run of {len(inputs) // 2}: the actors' start taken out)")
    print(f"ray / local = {best_ray / best_local:.2f} with the start, "
          f"{best_marginal / best_local:.2f} once running; per actor "
          f"{best_marginal / args.actors:.2f} images/s with {args.actor_cpus} CPUs")


if __name__ == "__main__":
    main()
