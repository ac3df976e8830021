"""Jobs: long work off the request threads (a large dry-run: ``POST /v1/policy/dry-run``
answers 202 with a job, the lab page redirects to the job's page).

Each app has a :class:`JobRunner` (its decision log's jobs, and what runs each kind), and
each process one thread that runs them: it takes the due jobs
(:class:`decisionlog.jobs.JobLog`) one at a time, polling every second, so a job queued by
another worker or replica, or left by a worker that died (its lease ran out), is taken over.
One thread per process, not per app, holding each app's runner weakly: a gunicorn worker has
one app; a test suite's hundreds of apps add no thread and stop being polled once gone.
``GET /v1/jobs/<job_id>`` (admin: a dry-run's result shows decisions and policy text)
answers a job's state, progress, and result or error.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from flask import Blueprint, current_app, jsonify

from decisionlog.jobs import Claim, Job, JobLog
from moderation import ModerationError, NotFound

from .contract import Access, Answer, operation
from .schemas import Job as JobSchema
from .schemas import JobPath

__all__ = ["POLL_S", "Handler", "JobRunner", "JobStopped", "bp", "job_or_404", "runner"]

log = logging.getLogger(__name__)

#: How often the process's thread looks for due jobs (a job submitted here wakes it at once).
POLL_S = 1.0

#: Runs a job's request, reporting ``progress(done, total)`` as it goes; returns the result
#: (JSON-able). A :class:`moderation.ModerationError` it raises is the job's error.
Handler = Callable[[dict[str, Any], Callable[[int, int], None]], dict[str, Any]]

bp = Blueprint("jobs", __name__)


class JobStopped(Exception):
    """Raised through a running job by its progress callback: its runner is closing, or
    another runner took the job over (this one's lease ran out)."""


class JobRunner:
    """An app's jobs: claimed from ``jobs`` and run with the handler of their kind, one at a
    time, by the process's thread once :meth:`start` is called. ``lease_s``: how long a
    claimed job is held without a progress report before another runner may take it over;
    progress is written (and the lease extended) at most every ``progress_s`` seconds."""

    def __init__(self, jobs: JobLog, handlers: Mapping[str, Handler], *,
                 lease_s: float = 60.0, progress_s: float = 0.5,
                 webhook: Callable[[], None] | None = None,
                 notify: frozenset[str] = frozenset()) -> None:
        self.jobs = jobs
        self.handlers = dict(handlers)
        #: with a webhook, the outcome of a job of a kind in ``notify`` is delivered by it
        #: (recorded in the outbox with the outcome); ``webhook`` wakes its sender
        self.webhook = webhook
        self.notify = notify
        self.lease_s = lease_s
        self.progress_s = progress_s
        #: who holds a job this runner runs (two apps in one process are two runners)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._running = threading.Lock()  # held while a job of this runner runs

    def start(self) -> None:
        """Have the process's thread run this runner's jobs (from now on)."""
        self._stop.clear()
        _THREAD.add(self)

    def wake(self) -> None:
        """A job was just submitted: look now rather than at the next poll."""
        _THREAD.wake()

    def close(self, timeout: float = 30) -> None:
        """Take no more jobs; a job in progress is given back to the queue (for another
        worker) at its next progress report, waited for up to ``timeout`` seconds."""
        self._stop.set()
        _THREAD.remove(self)
        if self._running.acquire(timeout=timeout):
            self._running.release()

    def run_once(self) -> bool:
        """Claim one due job and run it; ``False`` when none was due (or closed)."""
        with self._running:
            if self._stop.is_set():
                return False
            claim = self.jobs.claim(
                self.owner, lease_s=self.lease_s,
                webhook_kinds=self.notify if self.webhook is not None else frozenset())
            if claim is None:
                return False
            self._execute(claim)
            return True

    def _execute(self, claim: Claim) -> None:
        handler = self.handlers.get(claim.kind)
        webhook = self.webhook is not None and claim.kind in self.notify
        if handler is None:
            self.jobs.fail(claim.id, self.owner, "unknown_kind",
                           f"this server runs no job of kind {claim.kind!r}; it runs "
                           f"{', '.join(sorted(self.handlers))}")
            return
        written = -float("inf")
        unwritten: tuple[int, int] | None = None

        def write(done: int, total: int) -> None:
            nonlocal written, unwritten
            if not self.jobs.progress(claim.id, self.owner, done, total,
                                      lease_s=self.lease_s):
                raise JobStopped("another runner took the job over")
            written, unwritten = time.monotonic(), None

        def progress(done: int, total: int) -> None:
            nonlocal unwritten
            if self._stop.is_set():
                raise JobStopped("the runner is closing")
            if heartbeat.lost.is_set():
                raise JobStopped("another runner took the job over")
            if time.monotonic() - written < self.progress_s and done < total:
                unwritten = (done, total)  # written with the next, or with the result
                return
            write(done, total)

        log.info("job %s (%s) started, attempt %d", claim.id, claim.kind, claim.attempt)
        heartbeat = _Heartbeat(self.jobs, claim.id, self.owner, self.lease_s)
        try:
            try:
                result = handler(claim.request, progress)
                if unwritten is not None:
                    write(*unwritten)
            except JobStopped as e:
                if self._stop.is_set():
                    self.jobs.release(claim.id, self.owner)
                log.info("job %s stopped here: %s", claim.id, e)
                return
            except ModerationError as e:
                if e.status >= 500:
                    log.error("job %s failed: %s: %s", claim.id, type(e).__name__, e)
                    self._internal(claim, webhook)
                else:
                    self.jobs.fail(claim.id, self.owner, e.code, e.message, e.details(),
                                   webhook=webhook)
                    self._wake_webhook(webhook)
                return
            except Exception:
                log.exception("job %s failed", claim.id)
                self._internal(claim, webhook)
                return
            if not self.jobs.finish(claim.id, self.owner, result, webhook=webhook):
                log.info("job %s finished here after another runner took it over", claim.id)
            self._wake_webhook(webhook)
        finally:
            heartbeat.stop()

    def _internal(self, claim: Claim, webhook: bool) -> None:
        self.jobs.fail(claim.id, self.owner, "internal",
                       "internal error; the server log has the details", webhook=webhook)
        self._wake_webhook(webhook)

    def _wake_webhook(self, webhook: bool) -> None:
        if webhook and self.webhook is not None:
            self.webhook()


class _Heartbeat:
    """While a job runs, its lease is extended every third of it, so that a handler busy in
    one long step (a long video's decision) keeps its job; ``lost`` is set when another
    runner holds it (the lease had run out: this worker was stalled)."""

    def __init__(self, jobs: JobLog, job_id: str, owner: str, lease_s: float) -> None:
        self.lost = threading.Event()
        self._done = threading.Event()

        def run() -> None:
            while not self._done.wait(lease_s / 3):
                try:
                    if not jobs.extend(job_id, owner, lease_s=lease_s):
                        self.lost.set()
                        return
                except Exception:  # the log is down: the next beat tries again
                    log.warning("job %s: could not extend its lease", job_id, exc_info=True)

        self._thread = threading.Thread(target=run, name=f"job-heartbeat-{job_id[:8]}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(10)


class _ProcessThread:
    """The process's job thread: runs the started runners' due jobs, one at a time, and
    looks again every :data:`POLL_S` seconds. Started with the first runner (again after a
    fork); at exit, a job in progress is given back to the queue."""

    def __init__(self) -> None:
        self._runners: weakref.WeakSet[JobRunner] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._exiting = False

    def add(self, runner: JobRunner) -> None:
        with self._lock:
            self._runners.add(runner)
            if self._thread is None or not self._thread.is_alive():
                if self._thread is None:
                    atexit.register(self.close)
                self._thread = threading.Thread(target=self._run, name="job-runner",
                                                daemon=True)
                self._thread.start()
        self.wake()

    def remove(self, runner: JobRunner) -> None:
        with self._lock:
            self._runners.discard(runner)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._exiting:
            self._wake.clear()
            self._run_due()
            self._wake.wait(POLL_S)

    def _run_due(self) -> None:
        """Every started runner's due jobs (a runner held only for this pass)."""
        with self._lock:
            runners = list(self._runners)
        for runner in runners:
            try:
                while not self._exiting and runner.run_once():
                    pass
            except Exception:  # its log is down, say: tried again at the next poll
                log.exception("the job runner %s failed; retrying", runner.owner)

    def close(self) -> None:
        self._exiting = True
        with self._lock:
            runners = list(self._runners)
        for runner in runners:
            runner.close()
        self.wake()
        if self._thread is not None:
            self._thread.join(30)


_THREAD = _ProcessThread()


def runner() -> JobRunner:
    """The runner of the app serving the current request."""
    found: JobRunner = current_app.extensions["jobs"]
    return found


def job_or_404(job_id: str) -> Job:
    found = runner().jobs.get(job_id)
    if found is None:
        raise NotFound(f"no job {job_id!r} (jobs are kept 7 days)")
    return found


@operation(bp, "/v1/jobs/<job_id>", "GET", operation_id="get_job", access=Access.ADMIN,
           summary="A job: its state, progress, and result or error",
           description="Long work answered 202 elsewhere (a large dry-run) runs as a job; "
           "poll this until its state is done (the result) or failed (the error). Jobs are "
           "kept 7 days.", path=JobPath,
           answers=(Answer(200, "The job", {"application/json": JobSchema}),))
def get_job(job_id: str) -> Any:
    return jsonify(job_or_404(job_id).model_dump(mode="json"))
