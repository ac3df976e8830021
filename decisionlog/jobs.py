"""Jobs: long work that leaves the request thread (a large dry-run), recorded in the log's
``jobs`` table, where every worker and replica can read its progress and its result.

A job is submitted ``queued``. A worker's runner claims it with a compare-and-set (one
winner across threads, workers and replicas), holding a lease that each progress report
extends, then records its result (``done``) or its error (``failed``). A job whose lease
ran out (its worker died, or stopped) is due again and another runner takes it over; one
that was started :data:`MAX_ATTEMPTS` times without finishing fails with
``job_interrupted``. Only the lease holder's reports count: a worker that lost its lease
learns it from the answer (``False``) and stops. Jobs are kept :data:`KEEP_S` seconds (7
days): each submission deletes older ones.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, Field

from .store import DecisionStore
from .tables import job_uploads, jobs, webhook_outbox

__all__ = ["JOB_INTERRUPTED", "KEEP_S", "MAX_ATTEMPTS", "UPLOADS", "Claim", "Job", "JobError",
           "JobLog", "JobProgress"]

#: A job is started at most this many times; when its lease runs out once more, it fails.
MAX_ATTEMPTS = 3
#: Jobs older than this (seconds) are deleted when another is submitted.
KEEP_S = 7 * 24 * 3600
#: The error of a job whose workers stopped :data:`MAX_ATTEMPTS` times before it finished.
JOB_INTERRUPTED = "job_interrupted"

#: The key under which a claimed job's request carries the uploads submitted with it (bytes,
#: in order; absent when there were none).
UPLOADS = "uploads_bytes"

State = Literal["queued", "running", "done", "failed"]


class JobProgress(BaseModel):
    done: int = Field(description="units of work done (a dry-run: decisions read)")
    total: int | None = Field(description="units in all, once known")


class JobError(BaseModel):
    code: str = Field(description="as the error table of the README has them")
    message: str
    details: dict[str, Any] = Field(default_factory=dict,
                                    description="e.g. the faults of an invalid policy")


class Job(BaseModel):
    """A job as its submitter sees it."""

    id: str
    kind: str = Field(description="what it runs: dry-run")
    state: State
    created_at: float = Field(description="unix seconds")
    started_at: float | None = Field(description="first claimed by a worker")
    finished_at: float | None
    progress: JobProgress
    result: dict[str, Any] | None = Field(description="when done")
    error: JobError | None = Field(description="when failed")


@dataclass(frozen=True)
class Claim:
    """A job a runner holds: what to run, and how many times it was started (this one
    included)."""

    id: str
    kind: str
    request: dict[str, Any]
    attempt: int


class JobLog:
    """The jobs of the decision log of ``store``. Thread-safe; safe across processes."""

    def __init__(self, store: DecisionStore) -> None:
        self.engine = store.engine

    def _write(self) -> Any:
        """A write transaction (on SQLite, it takes the write lock when it begins)."""
        return self.engine.execution_options(immediate=True).begin()

    def submit(self, kind: str, request: dict[str, Any], *, created_by: str | None = None,
               now: float | None = None, uploads: list[bytes] | None = None) -> str:
        """Queue a job of ``kind`` that runs ``request`` (JSON-able) on ``uploads`` (kept as
        bytes beside it until the job is done or failed; the claim gives them back under
        :data:`UPLOADS`); returns its id (32 hex digits). Deletes the jobs created more than
        :data:`KEEP_S` seconds ago."""
        now = time.time() if now is None else now
        job_id = uuid.uuid4().hex
        with self._write() as conn:
            old = sa.select(jobs.c.id).where(jobs.c.created_at < now - KEEP_S)
            conn.execute(job_uploads.delete().where(job_uploads.c.job_id.in_(old)))
            conn.execute(jobs.delete().where(jobs.c.created_at < now - KEEP_S))
            conn.execute(jobs.insert().values(
                id=job_id, kind=kind, state="queued", created_at=now, created_by=created_by,
                request=json.dumps(request), attempts=0, done=0,
            ))
            for position, data in enumerate(uploads or ()):
                conn.execute(job_uploads.insert().values(job_id=job_id, position=position,
                                                         data=data))
        return job_id

    def _with_uploads(self, conn: Any, job_id: str, request: dict[str, Any]) -> dict[str, Any]:
        found = conn.execute(sa.select(job_uploads.c.data)
                             .where(job_uploads.c.job_id == job_id)
                             .order_by(job_uploads.c.position)).scalars().all()
        if found:
            request[UPLOADS] = [bytes(data) for data in found]
        return request

    def claim(self, owner: str, *, lease_s: float, now: float | None = None,
              webhook_kinds: frozenset[str] = frozenset()) -> Claim | None:
        """The oldest job that is due (queued, or running with a lease that ran out), now
        held by ``owner`` for ``lease_s`` seconds; ``None`` when none is due. A due job
        already started :data:`MAX_ATTEMPTS` times fails instead (``job_interrupted``; into
        the webhook outbox too when its kind is in ``webhook_kinds``).
        Reads first, then takes the write lock only to compare and set, so an idle poll
        costs one indexed read."""
        now = time.time() if now is None else now
        j = jobs.c
        due = sa.or_(j.state == "queued", sa.and_(j.state == "running", j.lease_until < now))
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(j.id, j.kind, j.attempts).where(due)
                                 .order_by(j.created_at, j.id).limit(10)).all()
        for row in found:
            # the row as it was read, still due: exactly one claimer changes it
            unchanged = (j.id == row.id, j.attempts == row.attempts, due)
            with self._write() as conn:
                if row.attempts >= MAX_ATTEMPTS:
                    failed = conn.execute(jobs.update().where(*unchanged).values(
                        state="failed", finished_at=now, owner=None, lease_until=None,
                        error=json.dumps(_interrupted(row.attempts)),
                    )).rowcount
                    if failed:
                        conn.execute(job_uploads.delete().where(
                            job_uploads.c.job_id == row.id))
                    if failed and row.kind in webhook_kinds:
                        self._outbox(conn, row.id, "job.failed", now,
                                     error=_interrupted(row.attempts))
                    continue
                won = conn.execute(jobs.update().where(*unchanged).values(
                    state="running", owner=owner, lease_until=now + lease_s,
                    attempts=j.attempts + 1, started_at=sa.func.coalesce(j.started_at, now),
                )).rowcount
                if won:
                    taken = conn.execute(sa.select(j.kind, j.request, j.attempts)
                                         .where(j.id == row.id)).one()
                    break
        else:
            return None
        with self.engine.connect() as conn:  # (the uploads: read after the write lock)
            request = self._with_uploads(conn, row.id, json.loads(taken.request))
        return Claim(id=row.id, kind=taken.kind, request=request, attempt=int(taken.attempts))

    def _held(self, job_id: str, owner: str) -> tuple[Any, ...]:
        return (jobs.c.id == job_id, jobs.c.owner == owner, jobs.c.state == "running")

    def progress(self, job_id: str, owner: str, done: int, total: int | None, *,
                 lease_s: float, now: float | None = None) -> bool:
        """Record ``done`` of ``total`` and extend the lease to ``lease_s`` seconds from now;
        ``False`` (nothing recorded) when ``owner`` no longer holds the job."""
        now = time.time() if now is None else now
        with self._write() as conn:
            return bool(conn.execute(jobs.update().where(*self._held(job_id, owner)).values(
                done=done, total=total, lease_until=now + lease_s)).rowcount)

    def extend(self, job_id: str, owner: str, *, lease_s: float,
               now: float | None = None) -> bool:
        """Extend the lease to ``lease_s`` seconds from now (the worker is still at it);
        ``False`` when ``owner`` no longer holds the job."""
        now = time.time() if now is None else now
        with self._write() as conn:
            return bool(conn.execute(jobs.update().where(*self._held(job_id, owner)).values(
                lease_until=now + lease_s)).rowcount)

    def release(self, job_id: str, owner: str) -> bool:
        """Give a held job back (its worker is stopping): queued again at once, for another
        runner; the start counts as an attempt."""
        with self._write() as conn:
            return bool(conn.execute(jobs.update().where(*self._held(job_id, owner)).values(
                state="queued", owner=None, lease_until=None)).rowcount)

    def finish(self, job_id: str, owner: str, result: dict[str, Any],
               now: float | None = None, *, webhook: bool = False) -> bool:
        """Record the result of a held job (``done``); ``False`` when ``owner`` no longer
        holds it (another runner took it over: its result will count). With ``webhook``, the
        result also goes into the webhook outbox, in the same transaction (event
        ``job.done``)."""
        now = time.time() if now is None else now
        with self._write() as conn:
            held = bool(conn.execute(jobs.update().where(*self._held(job_id, owner)).values(
                state="done", finished_at=now, lease_until=None, result=json.dumps(result),
            )).rowcount)
            if held:  # its uploads are no longer needed: the log keeps no image
                conn.execute(job_uploads.delete().where(job_uploads.c.job_id == job_id))
            if held and webhook:
                self._outbox(conn, job_id, "job.done", now, result=result)
            return held

    def fail(self, job_id: str, owner: str, code: str, message: str,
             details: dict[str, Any] | None = None, now: float | None = None, *,
             webhook: bool = False) -> bool:
        """Record the error of a held job (``failed``); ``False`` when ``owner`` no longer
        holds it. With ``webhook``, the error also goes into the outbox (``job.failed``)."""
        now = time.time() if now is None else now
        error = {"code": code, "message": message, "details": details or {}}
        with self._write() as conn:
            held = bool(conn.execute(jobs.update().where(*self._held(job_id, owner)).values(
                state="failed", finished_at=now, lease_until=None, error=json.dumps(error),
            )).rowcount)
            if held:
                conn.execute(job_uploads.delete().where(job_uploads.c.job_id == job_id))
            if held and webhook:
                self._outbox(conn, job_id, "job.failed", now, error=error)
            return held

    @staticmethod
    def _outbox(conn: Any, job_id: str, event: str, now: float, **body: Any) -> None:
        kind = conn.execute(sa.select(jobs.c.kind).where(jobs.c.id == job_id)).scalar_one()
        payload = {"event": event, "job_id": job_id, "kind": kind, "finished_at": now, **body}
        conn.execute(webhook_outbox.insert().values(
            job_id=job_id, payload=json.dumps(payload, sort_keys=True, allow_nan=False),
            created_at=now, status="pending", attempts=0, next_attempt_at=now))

    def get(self, job_id: str) -> Job | None:
        """The job ``job_id``, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            return None
        return Job(
            id=row.id, kind=row.kind, state=row.state, created_at=row.created_at,
            started_at=row.started_at, finished_at=row.finished_at,
            progress=JobProgress(done=row.done, total=row.total),
            result=json.loads(row.result) if row.result is not None else None,
            error=JobError.model_validate_json(row.error) if row.error is not None else None,
        )

    def created_by(self, job_id: str) -> str | None:
        """Who submitted the job ``job_id`` (as the submitter said), or ``None``."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(jobs.c.created_by)
                                .where(jobs.c.id == job_id)).scalar_one_or_none()

    def request(self, job_id: str) -> dict[str, Any] | None:
        """What the job ``job_id`` runs, as it was submitted (its uploads under
        :data:`UPLOADS`, as a claim gives them), or ``None``."""
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(jobs.c.request).where(jobs.c.id == job_id)).first()
            if found is None:
                return None
            return self._with_uploads(conn, job_id, dict(json.loads(found.request)))


def _interrupted(attempts: int) -> dict[str, Any]:
    return {"code": JOB_INTERRUPTED,
            "message": f"the job was started {attempts} times and each time its worker "
                       "stopped before it finished (a worker that died or was restarted, or "
                       "lost the database): submit it again",
            "details": {"attempts": attempts}}
