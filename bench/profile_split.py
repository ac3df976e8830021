"""Where a profiled dry-run's or search's seconds go: py-spy's raw stacks, split by thread and
by part of the work.

    .venv/bin/python bench/profile_split.py PROFILE.txt [...] [--rate 200] [--top 12]

A profile is what ``bench/policy_lab.py --py-spy DIR`` or ``bench/search.py --py-spy DIR``
record: ``py-spy record --idle --threads --format raw --rate R``, so every thread is sampled R
times a second whether it runs or waits, and a thread's samples divided by R are its wall
seconds. Each sample is put in the first part (below) that its stack names, innermost frame
first: reading blocks from the database (the driver, under ``decisionlog.blocks.scan``),
decoding (``Block.of_row``: the JSON meta, the arrays), the product (float16 to float32 and
the BLAS product: ``SharedProduct.scores``, ``float16_dot``), the scores (exceptions, maximum
over frames), thresholds, the tally or best-k, waiting (the consumer for the next block, the
reader for room in the queue), and the rest. The threads that read blocks (the dry-run's
read-ahead thread, exact search's readers, which also compare) are summed as "reader
threads". Then, per role, the innermost lines of the project's own code that took most.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

#: (part, pattern a frame matches), tried on each frame from the innermost out
PARTS: list[tuple[str, str]] = [
    ("decode: json meta", r"^(loads|JSONDecoder\.\w+) \(json/"),
    ("decode: arrays", r"^(Block\.of_row|_Row\.\w+) \("),
    ("decode: cut blocks", r"^Block\.(take|split|in_time_order) \("),
    ("scores (exceptions, max over frames)",
     r"^(_max_over_frames|ScoreColumns\.scores|combine) \("),
    ("product (float16 to float32, BLAS)", r"^(float16_dot|SharedProduct\.scores) \("),
    ("thresholds", r"^(Scorer\.judge|category_severities|ThresholdTable\.\w+|_Side\.spread) \("),
    ("tally", r"^_Tally\.add \("),
    ("best k", r"^(_Best\.\w+|_OfFrames\.\w+) \("),
    ("waiting: for the next block", r"^read_ahead \(decisionlog/lab\.py"),
    ("waiting: reader, queue full", r"^read_ahead\.<locals>\.(put|produce) \("),
    ("read: blocks from the database", r"^(scan|_raw_rows|_binary_rows) \(decisionlog/blocks\.py"),
    ("counts (window_of)", r"^window_of \("),
    ("top changes: decided again, with words", r"^_Side\.decide \("),
    ("top changes' frames (frames_of)", r"^DecisionStore\.frames_of \("),
    ("search: hits' records", r"^_hits \(decisionlog/search\.py"),
    ("search: per block (filters, max over queries, owners)",
     r"^ExactIndex\.nearest\.<locals>\.part \("),
    ("search: waiting for the readers, merging", r"^ExactIndex\.nearest \("),
    ("dry-run: rest", r"^dry_run \(decisionlog/lab\.py"),
    ("search: rest", r"^search \(decisionlog/search\.py"),
]
COMPILED = [(part, re.compile(pattern)) for part, pattern in PARTS]
OUTSIDE = "outside the timed call (start-up, imports)"
PROJECT = re.compile(r"\((decisionlog|moderation|bench)/")


def parse(path: Path) -> dict[str, list[tuple[list[str], int]]]:
    """Thread id → [(frames outermost first, samples)]."""
    threads: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        tid = re.match(r"thread \((\w+)\)", frames[0])
        threads[tid.group(1) if tid else "?"].append((frames[1:], int(count)))
    return threads


def role(stacks: list[tuple[list[str], int]]) -> str:
    text = " ".join(f for frames, _ in stacks for f in frames)
    if ("read_ahead.<locals>.produce (decisionlog/lab.py" in text
            or "ExactIndex.nearest.<locals>.part (decisionlog/search.py" in text):
        return "reader thread"
    if "<module> (bench/" in text:
        return "main thread"
    return "other thread"


def timed(frames: list[str]) -> bool:
    return any(f.startswith(("dry_run (decisionlog/lab.py", "timed (bench/search.py",
                             "read_ahead.<locals>.produce (decisionlog/lab.py",
                             "ExactIndex.nearest.<locals>.part (decisionlog/search.py",
                             "compact (decisionlog/blocks.py")) for f in frames)


def part_of(frames: list[str]) -> str:
    if not timed(frames):
        return OUTSIDE
    for frame in reversed(frames):
        for part, pattern in COMPILED:
            if pattern.search(frame):
                return part
    return "other"


def innermost_own(frames: list[str]) -> str:
    for frame in reversed(frames):
        if PROJECT.search(frame):
            return frame
    return frames[-1] if frames else "(idle, no Python frame)"


def report(path: Path, rate: float, top: int) -> None:
    """Per role (the main thread; the reader threads, one per scan, summed)."""
    by_role: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    threads: Counter[str] = Counter()
    for stacks in parse(path).values():
        r = role(stacks)
        by_role[r] += stacks
        threads[r] += 1
    print(f"== {path}")
    for r in ("main thread", "reader thread", "other thread"):
        parts: Counter[str] = Counter()
        lines: Counter[str] = Counter()
        for frames, count in by_role.get(r, []):
            part = part_of(frames)
            parts[part] += count
            if part != OUTSIDE:
                lines[innermost_own(frames)] += count
        inside = sum(c for p, c in parts.items() if p != OUTSIDE)
        if not inside:
            continue
        print(f"  {r}{'s' if threads[r] > 1 else ''} ({threads[r]}): {inside / rate:.2f} s "
              "in the timed call")
        for part, count in parts.most_common():
            if part != OUTSIDE:
                print(f"    {count / rate:7.2f} s {100 * count / inside:5.1f}%  {part}")
        print("    innermost own lines:")
        for frame, count in lines.most_common(top):
            print(f"    {count / rate:7.2f} s  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", type=Path, nargs="+")
    parser.add_argument("--rate", type=float, default=200, help="py-spy's samples a second")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    for path in args.profiles:
        report(path, args.rate, args.top)


if __name__ == "__main__":
    main()
