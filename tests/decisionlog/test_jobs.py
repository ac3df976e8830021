"""The job log: a job is held by one runner at a time, taken over when its runner's lease
runs out, and fails after :data:`MAX_ATTEMPTS` starts (on SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import time
from collections import Counter

from decisionlog import DecisionStore
from decisionlog.jobs import JOB_INTERRUPTED, KEEP_S, MAX_ATTEMPTS, Claim, JobLog

LEASE = 60.0


def test_a_job_is_queued_run_and_done(store: DecisionStore) -> None:
    log = JobLog(store)
    job_id = log.submit("dry-run", {"policy": "x", "limit": 3}, created_by="admin")
    assert len(job_id) == 32 and int(job_id, 16) >= 0
    job = log.get(job_id)
    assert job is not None and job.state == "queued" and job.started_at is None
    assert (job.progress.done, job.progress.total, job.result, job.error) == (0, None, None, None)
    assert log.request(job_id) == {"policy": "x", "limit": 3}

    claim = log.claim("w1", lease_s=LEASE)
    assert claim == Claim(id=job_id, kind="dry-run", request={"policy": "x", "limit": 3},
                          attempt=1)
    assert log.claim("w2", lease_s=LEASE) is None  # held
    assert log.progress(job_id, "w1", 10, 40, lease_s=LEASE)
    running = log.get(job_id)
    assert running is not None and running.state == "running" and running.started_at
    assert (running.progress.done, running.progress.total) == (10, 40)
    assert log.finish(job_id, "w1", {"decisions": 40})
    done = log.get(job_id)
    assert done is not None and done.state == "done" and done.result == {"decisions": 40}
    assert done.finished_at is not None and done.finished_at >= done.started_at  # type: ignore[operator]
    assert log.claim("w2", lease_s=LEASE) is None
    assert log.get("0" * 32) is None and log.request("0" * 32) is None


def test_a_failed_job_keeps_its_error(store: DecisionStore) -> None:
    log = JobLog(store)
    job_id = log.submit("dry-run", {})
    assert log.claim("w1", lease_s=LEASE) is not None
    assert not log.fail(job_id, "w2", "x", "not the holder")
    assert log.fail(job_id, "w1", "invalid_policy", "the proposed policy is not valid",
                    {"faults": ["a: b"]})
    job = log.get(job_id)
    assert job is not None and job.state == "failed" and job.result is None
    assert job.error is not None and job.error.model_dump() == {
        "code": "invalid_policy", "message": "the proposed policy is not valid",
        "details": {"faults": ["a: b"]}}
    assert not log.finish(job_id, "w1", {})  # over: nothing changes it


def test_two_threads_claiming_at_once_take_every_job_once(store: DecisionStore) -> None:
    log = JobLog(store)
    ids = [log.submit("dry-run", {"n": i}) for i in range(30)]
    start = threading.Barrier(4)
    taken: dict[str, list[str]] = {}

    def claim_all(owner: str) -> None:
        start.wait()
        mine = taken.setdefault(owner, [])
        while (claim := log.claim(owner, lease_s=LEASE)) is not None:
            mine.append(claim.id)

    threads = [threading.Thread(target=claim_all, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    counts = Counter(i for claims in taken.values() for i in claims)
    assert set(counts) == set(ids) and set(counts.values()) == {1}


def _claim_at_once(log: JobLog, owners: list[str]) -> dict[str, Claim | None]:
    """Each owner claims in a thread of its own, all at the same moment."""
    start = threading.Barrier(len(owners))
    won: dict[str, Claim | None] = {}

    def claim(owner: str) -> None:
        start.wait()
        won[owner] = log.claim(owner, lease_s=LEASE)

    threads = [threading.Thread(target=claim, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won


def test_one_job_two_claimers_one_winner(store: DecisionStore) -> None:
    log = JobLog(store)
    for _ in range(10):
        job_id = log.submit("dry-run", {})
        won = _claim_at_once(log, ["a", "b"])
        winners = {o: c.id for o, c in won.items() if c is not None}
        assert list(winners.values()) == [job_id]
        assert log.finish(job_id, next(iter(winners)), {})


def test_an_expired_lease_is_taken_over_and_the_job_finishes_once(store: DecisionStore) -> None:
    log = JobLog(store)
    job_id = log.submit("dry-run", {})
    now = time.time()
    first = log.claim("dead", lease_s=LEASE, now=now)
    assert first is not None and first.attempt == 1
    # progress extends the lease: still held past the first lease's end
    assert log.progress(job_id, "dead", 5, 50, lease_s=LEASE, now=now + 50)
    assert log.claim("w2", lease_s=LEASE, now=now + LEASE + 1) is None
    second = log.claim("w2", lease_s=LEASE, now=now + 50 + LEASE + 1)
    assert second is not None and (second.id, second.attempt) == (job_id, 2)
    # the first runner learns it lost the job: its reports and result do not count
    assert not log.progress(job_id, "dead", 6, 50, lease_s=LEASE)
    assert not log.finish(job_id, "dead", {"by": "dead"})
    assert log.finish(job_id, "w2", {"by": "w2"})
    assert not log.fail(job_id, "dead", "internal", "late")
    job = log.get(job_id)
    assert job is not None and job.state == "done" and job.result == {"by": "w2"}
    assert job.started_at is not None and job.started_at <= now + 1  # the first start
    assert log.claim("w3", lease_s=LEASE, now=now + 10 * LEASE) is None


def test_after_three_attempts_a_job_fails_interrupted(store: DecisionStore) -> None:
    log = JobLog(store)
    job_id = log.submit("dry-run", {})
    now = time.time()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        claim = log.claim(f"w{attempt}", lease_s=LEASE, now=now + (attempt - 1) * (LEASE + 1))
        assert claim is not None and claim.attempt == attempt
    assert log.claim("last", lease_s=LEASE, now=now + MAX_ATTEMPTS * (LEASE + 1)) is None
    job = log.get(job_id)
    assert job is not None and job.state == "failed" and job.error is not None
    assert job.error.code == JOB_INTERRUPTED and f"started {MAX_ATTEMPTS} times" in \
        job.error.message
    assert not log.finish(job_id, f"w{MAX_ATTEMPTS}", {})


def test_an_interrupted_job_of_a_notified_kind_goes_to_the_webhook(
        store: DecisionStore) -> None:
    import json

    import sqlalchemy as sa

    from decisionlog.tables import webhook_outbox

    log = JobLog(store)
    notified, quiet = log.submit("moderate", {}), log.submit("dry-run", {})
    now = time.time()
    for attempt in range(MAX_ATTEMPTS):
        for _ in range(2):
            assert log.claim(f"w{attempt}", lease_s=LEASE, now=now + attempt * (LEASE + 1),
                             webhook_kinds=frozenset({"moderate"})) is not None
    assert log.claim("last", lease_s=LEASE, now=now + MAX_ATTEMPTS * (LEASE + 1),
                     webhook_kinds=frozenset({"moderate"})) is None
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(webhook_outbox.c.job_id, webhook_outbox.c.payload)).all()
    assert [r.job_id for r in rows] == [notified]  # the dry-run's kind is not notified
    payload = json.loads(rows[0].payload)
    assert (payload["event"], payload["kind"], payload["error"]["code"]) == (
        "job.failed", "moderate", JOB_INTERRUPTED)
    assert log.get(quiet).state == "failed"  # type: ignore[union-attr]


def test_a_released_job_is_queued_again_at_once(store: DecisionStore) -> None:
    log = JobLog(store)
    job_id = log.submit("dry-run", {})
    assert log.claim("closing", lease_s=LEASE) is not None
    assert not log.release(job_id, "other")
    assert log.release(job_id, "closing")
    job = log.get(job_id)
    assert job is not None and job.state == "queued"
    again = log.claim("w2", lease_s=LEASE)
    assert again is not None and again.attempt == 2  # a stop counts as an attempt


def test_jobs_older_than_seven_days_go_when_another_is_submitted(store: DecisionStore) -> None:
    log = JobLog(store)
    now = time.time()
    old = log.submit("dry-run", {}, now=now - KEEP_S - 60)
    recent = log.submit("dry-run", {}, now=now - KEEP_S + 3600)
    assert log.get(old) is not None
    log.submit("dry-run", {}, now=now)
    assert log.get(old) is None and log.get(recent) is not None
