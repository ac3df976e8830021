"""The active policy of a worker, swapped atomically, and followed across gunicorn workers."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from moderation import Moderator
from moderation.policy import parse_policy

log = logging.getLogger(__name__)

__all__ = ["ModelOccupancy", "PolicyHolder"]


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class PolicyHolder:
    """Holds the moderator a request should use.

    ``current()`` is what a request calls once, at its start: a request in flight keeps the
    moderator (and so the policy) it started with while a reload swaps in a new one.

    With several workers, the worker that reloads encodes the new policy's prompts (into the
    text-embedding cache the workers share), swaps it in, and only then writes the validated
    text to ``snapshot`` (atomically) and answers. Every request first compares the
    snapshot's stamp (one ``stat``) with the one its worker follows; if the snapshot is newer,
    it waits until its worker has switched, so that once a reload has answered, every request
    that starts afterwards, on any worker, is decided with the new policy. Switching takes
    the embeddings from the cache (no encoding) and is normally done before any request needs
    it, by each worker's follower thread (:meth:`follow_in_background`).
    """

    def __init__(
        self, moderator: Moderator, policy_path: str | Path | None, snapshot: Path | None = None
    ) -> None:
        self._moderator = moderator
        self.policy_path = Path(policy_path) if policy_path is not None else None
        self.snapshot = snapshot
        self._lock = threading.Lock()
        # Nothing seen yet: a snapshot that exists already (a reload before this worker
        # started, or before it was restarted) is the server's active policy, and is followed
        # on the first call; the policy file may have been edited since without a reload.
        self._seen: tuple[int, int, int] | None = None

    def current(self) -> Moderator:
        if self.snapshot is not None and _stamp(self.snapshot) != self._seen:
            with self._lock:  # wait for the switch (ours, or the follower thread's)
                stamp = _stamp(self.snapshot)
                if stamp != self._seen:
                    self._follow(stamp)
        return self._moderator

    def follow_in_background(self, interval: float = 0.2) -> threading.Thread:
        """Start a daemon thread that switches to a newer snapshot within ``interval``
        seconds, so that requests seldom wait for it."""

        def run() -> None:
            while True:
                time.sleep(interval)
                try:
                    self.current()
                except Exception:  # never stop following
                    log.exception("following the policy snapshot failed")

        thread = threading.Thread(target=run, name="policy-follower", daemon=True)
        thread.start()
        return thread

    def reload(self) -> Moderator:
        """Read the policy file again; raise (keeping the old policy) if it is not valid."""
        if self.policy_path is None:
            raise RuntimeError("this service was not started from a policy file")
        with self._lock:
            text = self.policy_path.read_text(encoding="utf-8")
            policy = parse_policy(
                text, source=self.policy_path.name, base_dir=self.policy_path.parent
            )
            self._moderator = self._moderator.with_policy(policy)  # encodes new prompts
            if self.snapshot is not None:
                self._write_snapshot(text)
        log.info("policy %s version %s is active", policy.name, policy.version)
        return self._moderator

    def _write_snapshot(self, text: str) -> None:
        assert self.snapshot is not None and self.policy_path is not None
        record: dict[str, Any] = {
            "text": text,
            "source": self.policy_path.name,
            "base_dir": str(self.policy_path.parent),
        }
        fd, tmp = tempfile.mkstemp(dir=self.snapshot.parent, prefix=".snapshot-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, self.snapshot)
        self._seen = _stamp(self.snapshot)

    def _follow(self, stamp: tuple[int, int, int] | None) -> None:
        assert self.snapshot is not None
        try:
            record = json.loads(self.snapshot.read_text(encoding="utf-8"))
            policy = parse_policy(
                record["text"], source=record["source"], base_dir=Path(record["base_dir"])
            )
            self._moderator = self._moderator.with_policy(policy)
            log.info("followed reload: policy version %s is active", policy.version)
        except Exception:  # keep serving the policy we have
            log.exception("could not follow the policy snapshot %s", self.snapshot)
        self._seen = stamp


class ModelOccupancy:
    """How many of a server's workers are running the model: a counter in a small file that
    all of them share, changed under ``flock`` (a few microseconds per forward pass).

    A worker that dies while counted in leaves the count high: the only effect is that lone
    batches keep to their worker's share of threads, never a wrong result.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._fd = fd

    def _add(self, delta: int) -> int:
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(self._fd, 8, 0)
            count = max(0, int.from_bytes(raw, "little") if len(raw) == 8 else 0) + delta
            os.pwrite(self._fd, max(0, count).to_bytes(8, "little"), 0)
            return count
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def enter(self) -> int:
        return self._add(1) - 1

    def leave(self) -> None:
        self._add(-1)
