"""What known-image hash banks cost: PDQ of an upload next to the model, and matching a PDQ
hash against a bank of a million.

PDQ: a 12-megapixel photo-like JPEG (``bench/images.py``) decoded as the service decodes it
for hashing (draft mode at ``--draft-size``, default ``PDQ_MIN_SIDE`` = 512; the model's own
224 with ``--draft-size 224``), then :func:`moderation.hashing.pdq_of` on that frame, the
median of ``--repeat`` runs; next to it the model: ViT-B-32 with random weights (the same
compute as real ones), one preprocessed image at a time (``--no-model``: PDQ alone), and PDQ
of the full-resolution decode, for comparison. Bank: ``--hashes`` random 256-bit hashes plus,
for each of ``--queries`` queries, one hash planted at exactly ``--distance`` bits (half with
the bits spread out, half packed two to a 16-bit chunk, the worst case of the index's
look-ups); the index built from scratch, then each query matched alone, and each checked to
find its planted hash. One line per figure:

    pdq_12mp_ms=P frame=WxH model_ms=M model_share=P/M load=L
    pdq_12mp_full_decode_ms=F frame=4000x3000 load=L
    build_1m_s=B load=L
    index_mb=X build_peak_mb=Y load=L
    match_1m_p50_ms=A p95_ms=B max_ms=C found=200/200 load=L
    import_1m_s=I rows=N added=N sqlite_mb=S process_peak_mb=P load=L
    matcher_build_1m_s=M hashes=N found=1/1 matcher_mb=H load=L
    matcher_append_ms=A matcher_rebuild_1m_s=R load=L

The store (``--parts store``): ``--hashes`` random PDQ hashes as HMA writes a bank
(``hash,id,timestamp,tags``, no header) imported with ``BankStore.import_csv`` into a fresh
SQLite bank (all or nothing: every row checked, then written in one transaction);
``matcher_build_1m_s``: a ``BankMatcher`` built from that log (read, convert, index);
``matcher_append_ms``: its refresh after one hash is added (appended to the index);
``matcher_rebuild_1m_s``: after one is removed (the bank read and indexed again);
``matcher_mb``: the arrays the matcher holds (ids, bits, index).
``process_peak_mb``: this process's peak resident memory so far (VmHWM).

``load``: the machine's load averages (1/5/15 min) when the line was printed; a shared
machine's figures are only as good as that. ``index_mb``: the index's arrays;
``build_peak_mb``: the most numpy held at once while building (traced in a second build).

    .venv/bin/python bench/banks.py [--hashes 1000000] [--queries 200] [--distance 31]
        [--draft-size 512] [--repeat 21] [--no-model] [--seed 0] [--parts pdq,index,store]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.images import photo_like_jpegs  # noqa: E402
from bench.synthetic import high_water_mb, load  # noqa: E402


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def model_batch1_ms(model: str, repeat: int) -> float:
    """One preprocessed image through the image tower, torch's default threads."""
    from moderation.backends import RandomWeightsWarning
    from moderation.backends.torch import Encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        encoder = Encoder.load(model, random_weights=True)
    size = encoder.image_size
    one = np.random.default_rng(1).standard_normal((1, 3, size, size), np.float32)
    for _ in range(3):  # the first calls set up torch's kernels
        encoder.encode_pixels(one)
    return median_ms(lambda: encoder.encode_pixels(one), repeat)


def pdq_lines(args: argparse.Namespace) -> None:
    import pdqhash
    from PIL import Image

    from moderation.hashing import pdq_of
    from moderation.images import decode_image

    [path] = photo_like_jpegs(1, (4000, 3000), seed=args.seed)
    data = path.read_bytes()
    [frame] = decode_image(data, draft_size=args.draft_size).frames
    pdq_ms = median_ms(lambda: pdq_of(frame), args.repeat)
    line = f"pdq_12mp_ms={pdq_ms:.2f} frame={frame.width}x{frame.height}"
    if not args.no_model:
        model_ms = model_batch1_ms(args.model, args.repeat)
        line += f" model_ms={model_ms:.1f} model_share={pdq_ms / model_ms:.3f}"
    print(f"{line} load={load()}", flush=True)
    full = np.asarray(Image.open(path).convert("RGB"))
    full_ms = median_ms(lambda: pdqhash.compute(full), 3)
    print(f"pdq_12mp_full_decode_ms={full_ms:.1f} frame={full.shape[1]}x{full.shape[0]} "
          f"load={load()}", flush=True)


def planted_bank(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, hashes, queries): random hashes, then one per query at ``distance`` from it."""
    rng = np.random.default_rng(args.seed)
    hashes = rng.integers(0, 256, (args.hashes, 32), dtype=np.uint8)
    queries = rng.integers(0, 256, (args.queries, 32), dtype=np.uint8)
    planted = np.unpackbits(queries, axis=1)
    for k in range(args.queries):
        if k % 2 and args.distance <= 32:  # packed: two bits in each chunk
            bits = [16 * (i // 2) + 5 * (i % 2) for i in range(args.distance)]
        else:
            bits = list(rng.choice(256, args.distance, replace=False))
        planted[k, bits] ^= 1
    hashes = np.concatenate([hashes, np.packbits(planted, axis=1)])
    return np.arange(len(hashes), dtype=np.int64), hashes, queries


def bank_lines(args: argparse.Namespace) -> None:
    from moderation.hashindex import HashIndex

    ids, hashes, queries = planted_bank(args)
    started = time.perf_counter()
    index = HashIndex()
    index.add(ids, hashes)
    build_s = time.perf_counter() - started
    print(f"build_1m_s={build_s:.2f} hashes={len(index)} load={load()}", flush=True)

    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    HashIndex().add(ids, hashes)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"index_mb={index.nbytes / 1e6:.1f} build_peak_mb={peak / 1e6:.1f} "
          f"load={load()}", flush=True)

    times, found = [], 0
    for k, query in enumerate(queries):
        started = time.perf_counter()
        matches = index.match(query, args.distance)
        times.append(time.perf_counter() - started)
        found += (args.hashes + k, args.distance) in matches
    ms = np.array(times) * 1e3
    print(f"match_1m_p50_ms={np.percentile(ms, 50):.3f} p95_ms={np.percentile(ms, 95):.3f} "
          f"max_ms={ms.max():.3f} found={found}/{len(queries)} load={load()}", flush=True)


def store_lines(args: argparse.Namespace) -> None:
    import tempfile

    from decisionlog.banks import BankMatcher, BankStore, HashEntry
    from moderation.hashing import FrameHash, UploadHashes

    rng = np.random.default_rng(args.seed + 1)
    hexes = rng.integers(0, 256, (args.hashes, 32), dtype=np.uint8).tobytes().hex()
    tags = "media_priority_pdq_samples disputed media_type_photo"
    text = "".join(f"{hexes[64 * i:64 * i + 64]},{2_880_742_865_368_386 + i},"
                   f"2020-07-31T18:47:52+0000,{tags}\n" for i in range(args.hashes))
    del hexes
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "banks.sqlite3"
        store = BankStore(f"sqlite:///{path}")
        store.create_bank("big", "block")
        started = time.perf_counter()
        added, present = store.import_csv("big", text, added_by="bench")
        import_s = time.perf_counter() - started
        size_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
        print(f"import_1m_s={import_s:.1f} rows={args.hashes} added={added} "
              f"present={present} sqlite_mb={size_mb:.0f} "
              f"process_peak_mb={high_water_mb():.0f} load={load()}", flush=True)
        probe = text.split(",", 1)[0]  # the first row's hash
        del text
        started = time.perf_counter()
        matcher = BankMatcher(store, follow_s=None)
        build_s = time.perf_counter() - started
        found = len(matcher.match(UploadHashes("0" * 64, [FrameHash(probe, 100)]), [0]))
        held_mb = sum(b.index.nbytes + b.ids.nbytes + b.bits.nbytes
                      for b in matcher._state.banks) / 1e6
        print(f"matcher_build_1m_s={build_s:.2f} hashes={len(matcher)} found={found}/1 "
              f"matcher_mb={held_mb:.0f} load={load()}", flush=True)
        extra = rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex()
        store.add_hashes("big", [HashEntry("pdq", extra)])
        started = time.perf_counter()
        matcher.refresh()
        append_ms = 1e3 * (time.perf_counter() - started)
        store.remove_hashes("big", [extra])
        started = time.perf_counter()
        matcher.refresh()
        rebuild_s = time.perf_counter() - started
        print(f"matcher_append_ms={append_ms:.1f} matcher_rebuild_1m_s={rebuild_s:.2f} "
              f"load={load()}", flush=True)


def throughput_lines(args: argparse.Namespace) -> None:
    """Moderation with banks on (every upload hashed, matched against a bank of
    ``--bank-hashes`` in the decision log) and off (no hashing: only the SHA-256 of the bytes
    that the service records with every decision either way, computed as
    ``service.moderate.respond`` does without the decoder's), same model, same uploads (2-MP
    and 12-MP photo-like JPEGs, requests of 8), alternating, in this process:

        throughput banks=off images_per_s=… / banks=on images_per_s=… ratio=… load=L
    """
    import tempfile

    import yaml

    from bench.synthetic import default_policy_data, random_encoder
    from decisionlog.banks import BankMatcher, BankStore
    from moderation import Moderator
    from moderation.policy import parse_policy

    encoder = random_encoder(args.model)
    policy = parse_policy(yaml.safe_dump(default_policy_data(args.model)))
    off = Moderator(policy, encoder, hashes=False)
    on = Moderator(policy, encoder, hashes=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-banks-"))
    store = BankStore(f"sqlite:///{folder / 'log.sqlite3'}")
    store.create_bank("bench", "block")
    rng = np.random.default_rng(args.seed)
    rows = "".join(bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() + "\n"
                   for _ in range(args.bank_hashes))
    store.import_csv("bench", rows)
    matcher = BankMatcher(store, follow_s=None)
    for size, count in (("2mp", 24), ("12mp", 8)):
        uploads = [p.read_bytes() for p in  # in memory, as a request's uploads are
                   photo_like_jpegs(count, (1600, 1200) if size == "2mp" else (4000, 3000))]
        off.moderate(uploads[:2])
        for _ in range(args.rounds):
            rates = {}
            for name, moderator, banks in (("off", off, None), ("on", on, matcher)):
                started = time.perf_counter()
                for start in range(0, len(uploads), 8):
                    batch = uploads[start:start + 8]
                    results = moderator.moderate(batch, banks=banks)
                    assert all(r.ok for r in results)
                    if banks is None:  # the record's SHA-256, as the service computes it
                        for upload in batch:
                            hashlib.sha256(upload).hexdigest()
                rates[name] = len(uploads) / (time.perf_counter() - started)
            print(f"throughput {size} banks=off images_per_s={rates['off']:.2f} banks=on "
                  f"images_per_s={rates['on']:.2f} ratio={rates['on'] / rates['off']:.3f} "
                  f"bank_hashes={args.bank_hashes} load={load()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--distance", type=int, default=31)
    parser.add_argument("--draft-size", type=int, default=None,
                        help="JPEG draft size of the decode hashed (default: PDQ_MIN_SIDE)")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--no-model", action="store_true", help="PDQ time only")
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bank-hashes", type=int, default=100_000,
                        help="throughput: the bank's size")
    parser.add_argument("--rounds", type=int, default=3, help="throughput: on/off pairs")
    parser.add_argument("--parts", default="pdq,index,store",
                        help="which lines: pdq (hashing), index (HashIndex), store (the "
                             "decision log's banks: import, matcher), throughput "
                             "(moderation with banks on and off)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if args.draft_size is None:
        from moderation.hashing import PDQ_MIN_SIDE

        args.draft_size = PDQ_MIN_SIDE
    if "pdq" in parts:
        pdq_lines(args)
    if "index" in parts:
        bank_lines(args)
    if "store" in parts:
        store_lines(args)
    if "throughput" in parts:
        throughput_lines(args)


if __name__ == "__main__":
    main()
