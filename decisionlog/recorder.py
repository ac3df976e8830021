"""Writing decisions without losing one: the :class:`Recorder` (a background thread that
group-commits each request's records and makes the request wait for its own), and the
:class:`DeadLetters` file where a record the log cannot take is set aside, to be written later
by :func:`replay_dead_letters` (``moderation decisions replay``)."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .blocks import merge_due
from .database import data_dir
from .records import DecisionRecord
from .store import DecisionStore

log = logging.getLogger(__name__)

__all__ = ["DeadLetters", "Recorder", "default_dead_letter_path", "replay_dead_letters"]


class DeadLetters:
    """Records the log could not take, set aside with the reason: one JSON line each,
    appended and fsync'ed, so that a decision a client was given is never lost.
    ``moderation decisions replay`` writes them into the log once it can take them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def add(self, records: Sequence[DecisionRecord], reason: str) -> None:
        lines = "".join(
            json.dumps({"reason": reason, "failed_at": time.time(), "record": r.to_json()})
            + "\n"
            for r in records
        )
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one write() per batch with O_APPEND: lines of several workers never interleave
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, lines.encode("ascii"))  # json.dumps escapes everything else
                os.fsync(fd)
            finally:
                os.close(fd)
        for r in records:
            log.error("decision %s set aside in %s: %s", r.id, self.path, reason)

    def read(self) -> list[tuple[DecisionRecord, str]]:
        if not self.path.exists():
            return []
        out = []
        with self.path.open(encoding="ascii") as f:
            for line in f:
                if line.strip():
                    entry = json.loads(line)
                    out.append((DecisionRecord.from_json(entry["record"]), str(entry["reason"])))
        return out


def default_dead_letter_path(database_url: str) -> Path:
    """Beside a SQLite log; under the data folder for PostgreSQL."""
    if database_url.startswith("sqlite:///"):
        db = Path(database_url[len("sqlite:///") :])
        return db.with_name(db.name + ".dead-letter.jsonl")
    return data_dir() / "dead-letter.jsonl"


class _Batch:
    """Records of one request, and the event its thread waits on until they are written."""

    def __init__(self, records: Sequence[DecisionRecord]) -> None:
        self.records = list(records)
        self.done = threading.Event()


class Recorder:
    """Writes decisions from a background thread, and makes each request wait until its own
    records are committed (or set aside): a decision a client is given survives the worker
    being killed right after.

    The waiting is a group commit: while one transaction is written, the records of every
    request that finishes meanwhile queue up and go into the next one, so a busy worker writes
    a few transactions a second, not one per request, and a quiet one adds one commit (well
    under a millisecond on SQLite) to a request.

    A batch that fails is tried again, then record by record: a record that cannot be written
    alone (or not within ``timeout`` seconds) goes to ``dead_letters`` with the reason, and
    never blocks or drops the records around it.

    Every write adds a small frame block; when nothing waits to be written and ``merge_every``
    seconds have passed since the last look, the same thread merges them
    (:func:`decisionlog.blocks.merge_due`): no thread of its own, no request waiting behind
    a merge it could have skipped (``None``: never; ``moderation decisions compact`` does).
    """

    def __init__(self, store: DecisionStore, dead_letters: DeadLetters | None = None,
                 batch: int = 512, timeout: float = 10.0,
                 merge_every: float | None = 5.0) -> None:
        self.store = store
        self.merge_every = merge_every
        self._written_since_merge = False
        self._next_merge = time.monotonic() + (merge_every or 0)
        self.dead_letters = dead_letters or DeadLetters(default_dead_letter_path(store.url))
        self.batch = batch
        self.timeout = timeout
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="decision-recorder", daemon=True)
        self._thread.start()

    def record(self, records: Sequence[DecisionRecord]) -> None:
        """Return once ``records`` are in the log (or, failing that, in the dead-letter
        file)."""
        if not records:
            return
        pending = _Batch(records)
        if not self._thread.is_alive():
            self.dead_letters.add(pending.records, "the recorder has stopped")
            return
        self._queue.put(pending)
        if not pending.done.wait(self.timeout):
            # The database is stuck. The records go to the dead-letter file now; should the
            # stuck write still succeed, replaying them later skips what the log already has.
            self.dead_letters.add(pending.records, f"not written within {self.timeout:g} s")

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self.merge_every)
            except queue.Empty:
                self._merge_if_due()
                continue
            taken = [first]
            count = len(first.records) if first is not None else 0
            while first is not None and count < self.batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                taken.append(more)
                if more is None:
                    break
                count += len(more.records)
            batches = [b for b in taken if b is not None]
            try:
                self._write([r for b in batches for r in b.records])
            except Exception:  # never let the thread die: every waiter must be released
                log.exception("the decision recorder failed")
            finally:
                for b in batches:
                    b.done.set()
            if any(b is None for b in taken):
                return
            if self._queue.empty():
                self._merge_if_due()

    def _merge_if_due(self) -> None:
        if (self.merge_every is None or not self._written_since_merge
                or time.monotonic() < self._next_merge):
            return
        self._next_merge = time.monotonic() + self.merge_every
        self._written_since_merge = False
        try:
            merge_due(self.store.engine)
        except Exception:  # merged next time, or by `moderation decisions compact`
            log.exception("merging frame blocks failed")

    def _write(self, records: list[DecisionRecord]) -> None:
        if not records:
            return
        for attempt in range(2):
            try:
                self.store.add_many(records)
                self._written_since_merge = True
                return
            except Exception as e:
                log.warning("writing %d decisions failed (%s)%s", len(records), e,
                            "; retrying" if attempt == 0 else "; writing them one by one")
                if attempt == 0:
                    time.sleep(0.1)
        for r in records:
            try:
                self.store.add_many([r])
                self._written_since_merge = True
            except Exception as e:
                self.dead_letters.add([r], f"{type(e).__name__}: {e}")

    def flush(self) -> None:
        """Wait until everything queued so far is written."""
        if not self._thread.is_alive():
            return
        marker = _Batch([])
        self._queue.put(marker)
        marker.done.wait()

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(self.timeout + 5)


def replay_dead_letters(store: DecisionStore, dead_letters: DeadLetters) -> tuple[int, int, int]:
    """Write the set-aside records into the log, skipping those it already has; the ones
    that still fail stay in the file. Returns (written, already there, still failing)."""
    written = present = 0
    failing: list[tuple[DecisionRecord, str]] = []
    for record, reason in dead_letters.read():
        if store.get(record.id) is not None:
            present += 1
            continue
        try:
            store.add_many([record])
            written += 1
        except Exception as e:
            failing.append((record, f"{type(e).__name__}: {e} (first: {reason})"))
    tmp = dead_letters.path.with_name(dead_letters.path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    rest = DeadLetters(tmp)
    for record, reason in failing:
        rest.add([record], reason)
    if failing:
        os.replace(tmp, dead_letters.path)
    else:
        dead_letters.path.unlink(missing_ok=True)
    return written, present, len(failing)
