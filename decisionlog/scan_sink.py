"""Scan results into the decision log (``moderation scan --record``): the ``log`` entry of the
``moderation.sinks`` entry points, so that the core's scan never imports the log. Each batch
of rows (see :mod:`moderation.scan`) is one transaction, with every sampled frame's embedding:
dry-runs, re-scores and search cover the backlog as they cover live traffic."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import numpy as np

from .database import default_database_url
from .records import DecisionRecord, ImageRef, PolicyRef
from .store import DecisionStore

__all__ = ["LogSink"]


class LogSink:
    def __init__(self, database_url: str | None = None) -> None:
        self.store = DecisionStore(database_url or default_database_url())

    def write(self, rows: dict[str, list[Any]]) -> None:
        records = []
        now = time.time()
        for n, raw in enumerate(rows["result"]):
            result = json.loads(raw)
            ok = "error" not in result
            frames = [int(f) for f in str(rows["frames"][n] or "").split(",") if f]
            blob = rows["embeddings"][n]
            vectors = (np.frombuffer(blob, np.float16).reshape(len(frames), -1)
                       if ok and blob is not None and frames else None)
            records.append(DecisionRecord(
                id=uuid.uuid4().hex, created_at=now, client_id=result["id"],
                image=ImageRef(sha256=rows["image_sha256"][n] or "0" * 64,
                               size=int(rows["image_size"][n] or 0)),
                policy=PolicyRef(name=result["policy"]["name"],
                                 version=result["policy"]["version"]),
                model=result["model"], profile=result.get("profile", "default"),
                action=result["action"] if ok else "error",
                triggered=result.get("triggered", []) if ok else [],
                categories=result.get("categories", {}) if ok else {},
                latency_ms=float(rows["latency_ms"][n] or 0.0),
                error_code=None if ok else result["error"]["code"],
                frame=result.get("frame") if ok else None,
                frames_scored=result.get("frames_scored") if ok else None,
                frames=frames if vectors is not None else [],
                embeddings=vectors,
            ))
        self.store.add_many(records)
