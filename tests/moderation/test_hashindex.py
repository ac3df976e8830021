"""The multi-index hash index against a brute-force scan: random hashes, hashes planted at the
distances where the pigeonhole bound turns (15/16, 31/32), removals, incremental adds."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from moderation.hashindex import HashIndex

PLANTED = (0, 1, 15, 16, 31, 32)


def flipped(bits: np.ndarray, n: int, rng: np.random.Generator,
            spread: bool = True) -> np.ndarray:
    """``bits`` (32,) with ``n`` bits flipped: anywhere (``spread``), or packed into as few
    16-bit chunks as possible, two a chunk first (the case a one-bit probe must still find)."""
    if spread:
        positions = rng.choice(256, n, replace=False)
    else:  # 2 bits in each of the first n // 2 chunks, then one more
        positions = np.array([16 * (i // 2) + (3 if i % 2 else 9) for i in range(n)], int)
    unpacked = np.unpackbits(bits)
    unpacked[positions] ^= 1
    return np.packbits(unpacked)


def brute(ids: np.ndarray, hashes: np.ndarray, query: np.ndarray,
          max_distance: int) -> list[tuple[int, int]]:
    """Every id within ``max_distance``, at its smallest distance, nearest first then by id."""
    distances = np.unpackbits(hashes ^ query, axis=1).sum(axis=1)
    best: dict[int, int] = {}
    for i, d in zip(ids.tolist(), distances.tolist(), strict=True):
        if d <= max_distance and d < best.get(i, 999):
            best[i] = d
    return sorted(best.items(), key=lambda item: (item[1], item[0]))


def bank(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` random hashes with ids, plus queries, each planted in the bank at every distance
    of :data:`PLANTED` (half spread out, half packed two bits a chunk)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    queries = rng.integers(0, 256, (8, 32), dtype=np.uint8)
    planted = [flipped(q, d, rng, spread=k % 2 == 0)
               for k, q in enumerate(queries) for d in PLANTED]
    hashes = np.concatenate([hashes, np.array(planted)])
    ids = rng.permutation(len(hashes)).astype(np.int64) + 1000
    return ids, hashes, queries, rng.integers(0, 256, (4, 32), dtype=np.uint8)


def check(index: HashIndex, ids: np.ndarray, hashes: np.ndarray, queries: np.ndarray,
          max_distances: tuple[int, ...] = (0, 1, 15, 16, 31, 32, 47, 60)) -> None:
    for query in queries:
        for d in max_distances:
            assert index.match(query, d) == brute(ids, hashes, query, d), (d, query)


@pytest.mark.parametrize("max_tail", [0, 16_384])  # indexed, and all in the scanned tail
def test_matches_equal_a_brute_force_scan(max_tail: int) -> None:
    ids, hashes, queries, strangers = bank(20_000)
    index = HashIndex(max_tail=max_tail)
    index.add(ids, hashes)
    assert len(index) == len(hashes)
    check(index, ids, hashes, np.concatenate([queries, strangers]))
    found = index.match(queries[0])
    assert [d for _, d in found] == [0, 1, 15, 16, 31]  # 32 is just out


def test_remove_and_incremental_add() -> None:
    ids, hashes, queries, _ = bank(5_000, seed=1)
    index = HashIndex(max_tail=3_000)
    index.add(ids[:4_000], hashes[:4_000])  # indexed (more than max_tail)
    for start in range(4_000, len(ids), 500):  # then into the tail, until it is rebuilt
        index.add(ids[start:start + 500], hashes[start:start + 500])
        kept = slice(0, start + 500)
        check(index, ids[kept], hashes[kept], queries, (16, 31))
    gone = ids[::3]
    index.remove(gone.tolist() + [-5])  # an unknown id is ignored
    keep = ~np.isin(ids, gone)
    assert len(index) == int(keep.sum())
    check(index, ids[keep], hashes[keep], queries)
    index.remove(ids[1::3])  # past a quarter of the rows: compacted
    keep &= ~np.isin(ids, ids[1::3])
    assert len(index) == int(keep.sum())
    check(index, ids[keep], hashes[keep], queries)
    index.add(ids[:10], hashes[:10])  # back again
    keep[:10] = True
    check(index, ids[keep], hashes[keep], queries)


def test_an_id_with_several_hashes_is_reported_once_at_its_nearest() -> None:
    rng = np.random.default_rng(2)
    query = rng.integers(0, 256, 32, dtype=np.uint8)
    hashes = np.stack([flipped(query, 20, rng), flipped(query, 3, rng), flipped(query, 9, rng)])
    index = HashIndex(max_tail=0)
    index.add([7, 7, 8], hashes)
    assert index.match(query) == [(7, 3), (8, 9)]
    index.remove([7])
    assert index.match(query) == [(8, 9)]
    assert len(index) == 1


def test_empty_index_and_empty_calls() -> None:
    index = HashIndex()
    query = np.zeros(32, np.uint8)
    assert index.match(query) == [] and len(index) == 0
    index.add([], np.zeros((0, 32), np.uint8))
    index.remove([])
    assert index.match(query, 256) == []


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda i: i.add([1], np.zeros((1, 31), np.uint8)), r"shape \(n, 32\)"),
        (lambda i: i.add([1], np.zeros((1, 32), np.int64)), r"uint8 array"),
        (lambda i: i.add([1, 2], np.zeros((1, 32), np.uint8)), r"2 ids for 1 hashes"),
        (lambda i: i.add(["a"], np.zeros((1, 32), np.uint8)), r"sequence of integers"),
        (lambda i: i.match(np.zeros(16, np.uint8)), r"shape \(32,\)"),
        (lambda i: i.match(np.zeros(32, np.uint8), 257), r"integer in 0\.\.256; got 257"),
        (lambda i: i.match(np.zeros(32, np.uint8), -1), r"integer in 0\.\.256"),
        (lambda i: HashIndex(max_tail=-1), r"max_tail must be 0 or more"),
    ],
)
def test_bad_arguments_are_refused(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(HashIndex())  # type: ignore[operator]


def test_matching_while_another_thread_adds_and_removes() -> None:
    """Readers always see a consistent index: what was there before the writer started and
    is not removed is always found, at its distance."""
    ids, hashes, queries, _ = bank(3_000, seed=3)
    index = HashIndex(max_tail=700)
    index.add(ids, hashes)
    expected = [index.match(q) for q in queries]
    extra = np.random.default_rng(4).integers(0, 256, (6_000, 32), dtype=np.uint8)
    failures: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            for q, want in zip(queries, expected, strict=True):
                got = index.match(q)
                if not set(want) <= set(got):
                    failures.append(f"{want} not in {got}")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for k in range(0, len(extra), 200):  # adds, rebuilds, removals and compactions
            index.add(np.arange(k, k + 200) + 10**6, extra[k:k + 200])
            index.remove(np.arange(k, k + 100) + 10**6)
    finally:
        done.set()
        reader.join()
    assert not failures, failures[:3]
    assert len(index) == len(ids) + len(extra) // 2
