"""Scan results into the decision log (``moderation scan --record``): the ``log`` entry of the
``moderation.sinks`` entry points, so that the core's scan never imports the log. Each batch
of rows (see :mod:`moderation.scan`) is one transaction, with every sampled frame's embedding:
dry-runs, re-scores and search cover the backlog as they cover live traffic. A record is built
from the row's typed result, as the service builds one (:meth:`DecisionRecord.from_result`),
never from the JSON the scan writes."""

from __future__ import annotations

import time
from typing import Any

from moderation.scan import TYPED_RESULT

from . import blocks
from .database import default_database_url
from .records import DecisionRecord
from .store import DecisionStore

__all__ = ["LogSink"]


class LogSink:
    def __init__(self, database_url: str | None = None) -> None:
        self.store = DecisionStore(database_url or default_database_url())

    def write(self, rows: dict[str, list[Any]]) -> None:
        """Record a batch of scan rows: their typed results, with each file's SHA-256 and
        size (none for a file that could not be read) and the batch's latency per image."""
        now = time.time()
        self.store.add_many([
            DecisionRecord.from_result(
                result, image_sha256=sha256 or "0" * 64, image_size=int(size or 0),
                latency_ms=float(latency or 0.0), created_at=now,
            )
            for result, sha256, size, latency in zip(
                rows[TYPED_RESULT], rows["image_sha256"], rows["image_size"],
                rows["latency_ms"], strict=True)
        ])
        # each batch wrote a small frame block: merge them as the service's merger would
        if sum(blocks.small_blocks(self.store.engine).values()) >= blocks.MERGE_AT:
            blocks.compact(self.store.engine)
