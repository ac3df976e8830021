"""Which stored 256-bit hashes (PDQ) lie within a Hamming distance of a query, at bank size.

Multi-index hashing (Norouzi, Punjani & Fleet, 2012): a hash is cut into 16 chunks of 16 bits.
Two hashes within distance ``d`` differ in at most ``d // 16`` bits of at least one chunk
(pigeonhole: 16 chunks of ``d // 16 + 1`` bits or more would make more than ``d``). So a query
looks up, in each chunk's table, its own chunk value and every value within ``d // 16`` bits
of it (for the usual ``d`` ≤ 31: itself and its 16 one-bit neighbours, 17 look-ups a chunk),
and only the hashes found there are compared, exactly, by popcount. On a million random
hashes that is a few thousand candidates instead of a million.

Each chunk's table is the rows sorted by that chunk's value (a stable radix sort) and, for
each of the 65,536 values, where its run starts: a look-up is two reads, no search. Hashes
added later go to a tail that is compared in full until it grows past ``max_tail`` rows, then
everything is indexed again; removed hashes are marked and skipped, and dropped at the next
rebuild (when they outnumber a quarter of the rows, or the tail is full).

``match`` may run in several threads while one thread adds or removes: a writer builds new
arrays and publishes them by replacing one attribute; rows a reader can see are never
written again (removal only clears their flag).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np

__all__ = ["CHUNK_BITS", "CHUNKS", "HASH_BYTES", "HashIndex"]

HASH_BYTES = 32
CHUNKS = 16
CHUNK_BITS = 16
_VALUES = 1 << CHUNK_BITS
#: Beyond this many bits per chunk the neighbour look-ups (697 a chunk at 3) cost more than a
#: comparison of every row; wider searches (``max_distance`` ≥ 48) compare every row.
_MAX_PROBE_RADIUS = 2


def _popcount_rows(x: np.ndarray) -> np.ndarray:
    """Bits set in each row of a uint8 array of shape (n, 32) → int array of shape (n,)."""
    if hasattr(np, "bitwise_count"):  # numpy ≥ 2.0
        return np.bitwise_count(x.view(np.uint64)).sum(axis=1, dtype=np.int64)
    return _BYTE_BITS[x].sum(axis=1, dtype=np.int64)


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _probe_masks(radius: int) -> np.ndarray:
    """Every 16-bit value with at most ``radius`` bits set (0 first), as uint16."""
    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in bits) for bits in combinations(range(CHUNK_BITS), r)]
    return np.array(masks, np.uint16)


_MASKS = [_probe_masks(r) for r in range(_MAX_PROBE_RADIUS + 1)]


def _chunk_values(hashes: np.ndarray) -> np.ndarray:
    """uint8 array of shape (n, 32) → its 16-bit chunks, uint16 array of shape (n, 16)
    (chunk ``c`` is bytes ``2c`` and ``2c + 1``, big-endian)."""
    return np.ascontiguousarray(hashes).view(">u2").astype(np.uint16)


@dataclass(frozen=True)
class _State:
    """One published view of the index. ``hashes``, ``ids`` and ``alive`` are buffers of
    which rows ``[0, rows)`` are in use; rows ``[0, indexed)`` are in ``postings``."""

    hashes: np.ndarray  # (capacity, 32) uint8
    ids: np.ndarray  # (capacity,) int64
    alive: np.ndarray  # (capacity,) bool
    rows: int
    indexed: int
    live: int
    #: (16, indexed) int32: row numbers, sorted by their value of each chunk
    postings: np.ndarray
    #: (16, 65537) int64: postings[c, offsets[c, v]:offsets[c, v + 1]] have value v in chunk c
    offsets: np.ndarray


def _empty_state() -> _State:
    return _State(np.zeros((0, HASH_BYTES), np.uint8), np.zeros(0, np.int64),
                  np.zeros(0, bool), 0, 0, 0, np.zeros((CHUNKS, 0), np.int32),
                  np.zeros((CHUNKS, _VALUES + 1), np.int64))


def _build(hashes: np.ndarray, ids: np.ndarray) -> _State:
    """Index every row of ``hashes`` (n, 32) with ``ids`` (n,)."""
    n = len(hashes)
    values = _chunk_values(hashes)
    postings = np.empty((CHUNKS, n), np.int32)
    offsets = np.zeros((CHUNKS, _VALUES + 1), np.int64)
    for c in range(CHUNKS):
        column = np.ascontiguousarray(values[:, c])
        postings[c] = np.argsort(column, kind="stable")  # a radix sort for 16-bit keys
        np.cumsum(np.bincount(column, minlength=_VALUES), out=offsets[c, 1:])
    return _State(hashes, ids, np.ones(n, bool), n, n, n, postings, offsets)


class HashIndex:
    """Ids of 256-bit hashes within a Hamming distance of a query, without comparing every
    stored hash (see the module's docstring).

    An id may be added with several hashes (a bank entry's frames, its flips); ``match``
    reports it once, at its smallest distance, and ``remove`` removes all of them.
    ``max_tail``: how many rows added since the last build are compared in full before
    everything is indexed again (more: cheaper adds, slower matches in between).
    """

    def __init__(self, max_tail: int = 16_384) -> None:
        if max_tail < 0:
            raise ValueError(f"HashIndex max_tail must be 0 or more; got {max_tail!r}")
        self.max_tail = max_tail
        self._state = _empty_state()
        self._write = threading.Lock()

    def __len__(self) -> int:
        """How many hashes the index holds (removed ones not counted)."""
        return self._state.live

    @property
    def nbytes(self) -> int:
        """Bytes held by the index's arrays (buffers included)."""
        s = self._state
        return sum(a.nbytes for a in (s.hashes, s.ids, s.alive, s.postings, s.offsets))

    def add(self, ids: Sequence[int] | np.ndarray, hashes: np.ndarray) -> None:
        """Add hashes, ndarray of shape (n, 32), uint8 (packed bits, as
        :func:`moderation.hashing.pdq_to_bits` gives them), with their ids (n integers)."""
        ids_array = np.asarray(ids)
        if ids_array.size == 0:
            ids_array = ids_array.astype(np.int64)
        if ids_array.ndim != 1 or not np.issubdtype(ids_array.dtype, np.integer):
            raise ValueError(f"HashIndex.add: ids must be a sequence of integers; got "
                             f"{ids_array.dtype} of shape {ids_array.shape}")
        if hashes.dtype != np.uint8 or hashes.ndim != 2 or hashes.shape[1] != HASH_BYTES:
            raise ValueError(f"HashIndex.add: hashes must be a uint8 array of shape "
                             f"(n, {HASH_BYTES}); got {hashes.dtype} {hashes.shape}")
        if len(ids_array) != len(hashes):
            raise ValueError(f"HashIndex.add: {len(ids_array)} ids for {len(hashes)} hashes")
        n = len(hashes)
        if n == 0:
            return
        with self._write:
            s = self._state
            rows = s.rows + n
            if rows - s.indexed > self.max_tail:
                self._state = _build(*self._compacted(s, hashes, ids_array))
                return
            if rows <= len(s.hashes):  # room in the buffers: write past what readers see
                buffers = s.hashes, s.ids, s.alive
            else:
                # the tail stays within max_tail rows: one allocation per build
                capacity = max(rows, s.indexed + self.max_tail)
                buffers = (np.empty((capacity, HASH_BYTES), np.uint8),
                           np.empty(capacity, np.int64), np.zeros(capacity, bool))
                for new, old in zip(buffers, (s.hashes, s.ids, s.alive), strict=True):
                    new[: s.rows] = old[: s.rows]
            buffers[0][s.rows : rows] = hashes
            buffers[1][s.rows : rows] = ids_array
            buffers[2][s.rows : rows] = True
            self._state = replace(s, hashes=buffers[0], ids=buffers[1], alive=buffers[2],
                                  rows=rows, live=s.live + n)

    def remove(self, ids: Sequence[int] | np.ndarray) -> None:
        """Remove every hash of these ids (ids not in the index are ignored)."""
        wanted = np.asarray(ids, np.int64).ravel()
        if wanted.size == 0:
            return
        with self._write:
            s = self._state
            hit = np.flatnonzero(np.isin(s.ids[: s.rows], wanted) & s.alive[: s.rows])
            if hit.size == 0:
                return
            s.alive[hit] = False  # readers see a row go; none sees a row half-written
            s = self._state = replace(s, live=s.live - hit.size)
            dead = s.rows - s.live
            if dead > max(self.max_tail, s.rows // 4):
                self._state = _build(*self._compacted(s))

    def match(self, hash_bits: np.ndarray, max_distance: int = 31) -> list[tuple[int, int]]:
        """``(id, distance)`` of every id with a hash within ``max_distance`` bits of
        ``hash_bits`` (packed bits, ndarray of shape (32,), uint8), nearest first (then by
        id)."""
        if hash_bits.dtype != np.uint8 or hash_bits.shape != (HASH_BYTES,):
            raise ValueError(f"HashIndex.match: hash_bits must be a uint8 array of shape "
                             f"({HASH_BYTES},); got {hash_bits.dtype} {hash_bits.shape}")
        if (isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer))
                or not 0 <= max_distance <= 8 * HASH_BYTES):
            raise ValueError(f"HashIndex.match: max_distance must be an integer in 0..256; "
                             f"got {max_distance!r}")
        s = self._state  # one consistent view, whatever a writer does meanwhile
        radius = int(max_distance) // CHUNKS
        if radius > _MAX_PROBE_RADIUS:
            rows = np.arange(s.rows)
        else:
            rows = np.concatenate([self._candidates(s, hash_bits, radius),
                                   np.arange(s.indexed, s.rows)])
        rows = rows[s.alive[rows]]
        distances = _popcount_rows(s.hashes[rows] ^ hash_bits)
        near = distances <= max_distance
        ids, distances = s.ids[rows[near]], distances[near]
        order = np.lexsort((ids, distances))  # nearest first: an id's first row is its nearest
        ids, distances = ids[order], distances[order]
        _, first = np.unique(ids, return_index=True)
        first.sort()
        return [(int(i), int(d)) for i, d in zip(ids[first], distances[first], strict=True)]

    @staticmethod
    def _candidates(s: _State, hash_bits: np.ndarray, radius: int) -> np.ndarray:
        """Indexed rows that share, in some chunk, a value within ``radius`` bits of the
        query's (each row once)."""
        if s.indexed == 0:
            return np.zeros(0, np.int64)
        probes = _chunk_values(hash_bits[None])[0][:, None] ^ _MASKS[radius][None, :]
        chunk = np.arange(CHUNKS)[:, None]
        starts = s.offsets[chunk, probes].ravel()
        counts = s.offsets[chunk, probes.astype(np.int64) + 1].ravel() - starts
        total = int(counts.sum())
        if total == 0:
            return np.zeros(0, np.int64)
        # positions in postings.ravel(): each run [start, start + count) of chunk c, shifted
        # by c * indexed, laid end to end
        starts = starts + np.repeat(np.arange(CHUNKS) * s.indexed, probes.shape[1])
        ends = np.cumsum(counts)
        positions = np.arange(total) + np.repeat(starts - (ends - counts), counts)
        return np.unique(s.postings.ravel()[positions]).astype(np.int64)

    @staticmethod
    def _compacted(s: _State, hashes: np.ndarray | None = None,
                   ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The live rows of ``s``, then ``hashes`` and ``ids`` if given: fresh arrays."""
        keep = s.alive[: s.rows]
        all_hashes = [s.hashes[: s.rows][keep]]
        all_ids = [s.ids[: s.rows][keep]]
        if hashes is not None and ids is not None:
            all_hashes.append(hashes)
            all_ids.append(ids.astype(np.int64))
        return np.concatenate(all_hashes), np.concatenate(all_ids)
