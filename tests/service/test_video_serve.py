"""Videos through the app: sampled at the policy's rate, decided by the one scorer with the
persistence rule, the decided time and the span that crossed in the response and the log;
hostile videos refused with their code in the documented error shape."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask.testing import FlaskClient

from moderation import Moderator
from moderation.policy import parse_policy
from moderation.video import VideoLimits
from service.app import create_app
from tests.fakes import MARKER_POLICY, MarkerEncoder, video_bytes
from tests.service.conftest import ADMIN, READER

pytest.importorskip("av")

READER_H = {"Authorization": f"Bearer {READER}"}
GREY, RED = (128, 128, 128), (255, 0, 0)


def video_policy(persistence: bool = True) -> dict[str, Any]:
    data = copy.deepcopy(MARKER_POLICY)
    data["video"] = {"rate": 1.0, "max_frames": 32}
    if persistence:
        data["categories"]["marker"]["persistence"] = {"frames": 3, "within_s": 2.0}
    return data


def make_client(tmp_path: Path, limits: VideoLimits | None = None, persistence: bool = True,
                **settings: Any) -> tuple[Any, FlaskClient]:
    data = video_policy(persistence)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    app = create_app(
        {"POLICY": str(path), "ADMIN_TOKEN": ADMIN, "READER_TOKEN": READER,
         "DATABASE_URL": f"sqlite:///{tmp_path / 'decisions.sqlite3'}", **settings},
        moderator=Moderator(parse_policy(path.read_text()), MarkerEncoder(),
                            video_limits=limits),
    )
    return app, app.test_client()


def upload(client: FlaskClient, data: bytes, name: str) -> Any:
    return client.post("/v1/moderate", data={"image": [(io.BytesIO(data), name)],
                                             "id": [name]},
                       content_type="multipart/form-data")


def test_three_seconds_of_marker_fire_and_two_scattered_ones_do_not(tmp_path: Path) -> None:
    app, client = make_client(tmp_path)
    steady = video_bytes([GREY, GREY, GREY, RED, RED, RED, GREY, GREY])
    scattered = video_bytes([GREY, RED, GREY, GREY, GREY, GREY, RED, GREY])

    r = upload(client, steady, "steady.mp4")
    assert r.status_code == 200, r.get_data(as_text=True)
    [result] = r.get_json()["results"]
    assert result["action"] == "block" and result["image"]["format"] == "MP4"
    assert result["frames_scored"] == 9  # 0 … 7 s and the last frame
    marker = result["categories"]["marker"]
    assert marker["view"]["time"] == pytest.approx(3.0) and marker["view"]["box"] is None
    assert marker["span"] == pytest.approx([3.0, 5.0])

    r = upload(client, scattered, "scattered.mp4")
    [result] = r.get_json()["results"]
    assert result["action"] == "allow", result
    assert result["categories"]["marker"]["span"] is None
    assert result["categories"]["marker"]["score"] > 0.9  # crossed, but not for long

    app.extensions["decisions"][1].flush()
    page = client.get("/v1/decisions", headers=READER_H,
                      query_string={"client_id": "steady.mp4"}).get_json()
    [record] = page["decisions"]
    assert record["categories"]["marker"]["span"] == pytest.approx([3.0, 5.0])
    assert [v["time"] for v in record["views"]][:4] == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert len(record["frames"]) == 9


@pytest.mark.parametrize(("name", "make", "code", "status"), [
    ("truncated.mp4", lambda: video_bytes([GREY] * 4)[:700], "corrupt_video", 400),
    ("noise.mp4", lambda: b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8,
     "corrupt_video", 400),
])
def test_a_hostile_video_gets_its_code_in_the_error_shape(tmp_path: Path, name: str, make: Any,
                                                          code: str, status: int) -> None:
    _, client = make_client(tmp_path)
    r = upload(client, make(), name)
    assert r.status_code == status, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == code and error["message"]


def test_a_video_over_the_duration_setting_is_refused_with_413(tmp_path: Path) -> None:
    _, client = make_client(tmp_path, VideoLimits(max_duration_s=3.0))
    r = upload(client, video_bytes([GREY] * 6), "long.mp4")
    assert r.status_code == 413, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == "video_too_long" and "MODERATION_VIDEO_MAX_DURATION_S" in (
        error["message"])


def test_the_dry_run_applies_a_proposed_persistence_rule_to_stored_videos(
        tmp_path: Path) -> None:
    """Both clips are blocked without a rule; the lab, trying one (3 frames within 2 s), says
    the scattered one would be allowed and the steady one stays blocked: the service's
    rule, from the frames' stored times."""
    app, client = make_client(tmp_path, persistence=False)
    steady = video_bytes([GREY, GREY, GREY, RED, RED, RED, GREY, GREY])
    scattered = video_bytes([GREY, RED, GREY, GREY, GREY, GREY, RED, GREY])
    for data, name in ((steady, "steady.mp4"), (scattered, "scattered.mp4")):
        [result] = upload(client, data, name).get_json()["results"]
        assert result["action"] == "block", result
    app.extensions["decisions"][1].flush()
    r = client.post("/v1/policy/dry-run", data=yaml.safe_dump(video_policy(True)),
                    content_type="application/yaml",
                    headers={"Authorization": f"Bearer {ADMIN}"}, query_string={"limit": 10})
    assert r.status_code == 200, r.get_data(as_text=True)
    report = r.get_json()
    assert report["decisions"] == 2
    [changed] = report["changed"]
    assert changed["client_id"] == "scattered.mp4"
    assert changed["before"]["action"] == "block" and changed["after"]["action"] == "allow"
    assert report["actions"]["block"]["before"] == 2 and report["actions"]["block"]["after"] == 1


def wait_done(client: FlaskClient, location: str, seconds: float = 30.0,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The job at ``location`` once done (read as the uploader reads it: no admin token)."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        job = client.get(location, headers=headers or {}).get_json()
        if job["state"] in ("done", "failed") or time.monotonic() > deadline:
            return dict(job)
        time.sleep(0.1)


def test_a_long_video_is_answered_as_a_job_and_recorded_once(tmp_path: Path) -> None:
    """A video longer than MODERATION_VIDEO_INLINE_MAX_S gets 202 and a job; the job's result
    is the moderation answer, its decision is in the log under the id the job fixed, and
    running the job's request again (a worker that died after recording) records nothing
    twice."""
    from decisionlog.jobs import JobLog
    from service.moderate import moderate_handler

    app, client = make_client(tmp_path, VIDEO_INLINE_MAX_S="4")
    short = video_bytes([GREY, GREY, GREY])
    assert upload(client, short, "short.mp4").status_code == 200  # 3 s: inline
    runner = app.extensions["jobs"]
    runner.close()  # (the job waits: it is run by hand first, as a worker that died would)
    steady = video_bytes([GREY, GREY, GREY, RED, RED, RED, GREY, GREY])
    r = upload(client, steady, "steady.mp4")
    assert r.status_code == 202, r.get_data(as_text=True)
    store = app.extensions["decisions"][0]
    request = JobLog(store).request(r.get_json()["id"])
    assert request is not None
    first = moderate_handler(app)(request, lambda done, total: None)  # recorded, then died
    again = moderate_handler(app)(request, lambda done, total: None)  # the same job, rerun
    assert again["results"][0]["decision_id"] == first["results"][0]["decision_id"]
    runner.start()  # and a worker takes the job and finishes it
    job = wait_done(client, r.headers["Location"])
    assert job["state"] == "done", job
    [result] = job["result"]["results"]
    assert result["decision_id"] == first["results"][0]["decision_id"]
    assert result["action"] == "block" and result["categories"]["marker"]["span"] == [3.0, 5.0]
    record = store.get(result["decision_id"])
    assert record is not None and record.action == "block" and record.client_id == "steady.mp4"
    page = client.get("/v1/decisions", headers=READER_H,
                      query_string={"client_id": "steady.mp4"}).get_json()
    assert len(page["decisions"]) == 1  # recorded once


def test_async_true_queues_an_image_too(tmp_path: Path) -> None:
    _, client = make_client(tmp_path)
    r = client.post("/v1/moderate?async=true", data={"image": [(io.BytesIO(
        video_bytes([RED])), "one.mp4")]}, content_type="multipart/form-data")
    assert r.status_code == 202 and r.headers["Location"].startswith("/v1/moderate/jobs/")
    job = wait_done(client, r.headers["Location"])
    assert job["state"] == "done" and job["result"]["results"][0]["action"] in (
        "block", "allow")


def test_a_jobs_answer_is_also_posted_to_the_webhook_signed_and_once(tmp_path: Path) -> None:
    import hashlib
    import hmac
    import json
    import time

    from tests.service.conftest import free_port
    from tests.service.test_reviews import Receiver

    port = free_port()
    receiver = Receiver(port, failures=1)  # its first answer is a 503: retried
    app, client = make_client(tmp_path, VIDEO_INLINE_MAX_S="4",
                              WEBHOOK_URL=f"http://127.0.0.1:{port}/hook",
                              WEBHOOK_SECRET="s3cret", WEBHOOK_BACKOFF_S="0.05")
    try:
        steady = video_bytes([GREY, GREY, GREY, RED, RED, RED, GREY, GREY])
        r = upload(client, steady, "steady.mp4")
        assert r.status_code == 202
        job = wait_done(client, r.headers["Location"])
        assert job["state"] == "done"
        deadline = time.monotonic() + 20
        while len(receiver.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(receiver.received) == 2, "not delivered after a 503"
        headers, body = receiver.received[-1]
        expected = hmac.new(b"s3cret", headers["X-Moderation-Timestamp"].encode() + b"." + body,
                            hashlib.sha256).hexdigest()
        assert headers["X-Moderation-Signature"] == f"sha256={expected}"
        payload = json.loads(body)
        assert (payload["event"], payload["job_id"], payload["kind"]) == (
            "job.done", job["id"], "moderate")
        assert payload["result"] == job["result"]  # the answer the job's Location gives
        # the delivery is marked delivered (once the receiver's 200 is read) in the stats the
        # review queue gives, with the verdicts' deliveries
        def delivered() -> int:
            stats = client.get("/v1/reviews/queue", headers=READER_H).get_json()
            return int(stats["deliveries"].get("delivered", 0))

        deadline = time.monotonic() + 10
        while delivered() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert delivered() == 1
        time.sleep(0.3)
        assert len(receiver.received) == 2  # delivered: never sent again
    finally:
        receiver.close()
        app.extensions["webhook"].stop()


@pytest.mark.server
def test_a_video_job_is_done_once_across_a_worker_sigkill(start_server: Any) -> None:
    """A real server with one worker: the worker running a long video's job is SIGKILLed;
    gunicorn starts another, which takes the job over when the lease runs out, and the video
    is decided and recorded once."""
    import os
    import signal
    import sqlite3
    import time

    import requests

    from tests.service.conftest import TOKEN

    server = start_server(workers=1, MODERATION_JOB_LEASE_S="2",
                          MODERATION_VIDEO_INLINE_MAX_S="1")
    admin = {"Authorization": f"Bearer {TOKEN}"}
    data = yaml.safe_load(server.policy_path.read_text())
    data["video"] = {"rate": 5, "max_frames": 256}  # 256 frames: a job that takes a while
    server.policy_path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert requests.post(f"{server.base}/v1/policy/reload", headers=admin, timeout=60).ok
    clip = video_bytes([GREY, RED] * 30, fps=5, size=(320, 240))  # 60 s

    def job_of(location: str) -> dict[str, Any]:
        found: dict[str, Any] = requests.get(f"{server.base}{location}", headers=admin,
                                             timeout=10).json()
        return found

    killed = None
    for attempt in range(4):  # until the kill lands while the job runs
        name = f"long-{attempt}.mp4"
        r = requests.post(f"{server.base}/v1/moderate", files={"image": (name, clip)},
                          headers=admin, timeout=60)
        assert r.status_code == 202, r.text
        location = r.headers["Location"]
        deadline = time.monotonic() + 30
        while (state := job_of(location)["state"]) == "queued":
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.01)
        if state != "running":
            continue  # it finished before the kill: try again
        [worker] = server.workers()
        os.kill(worker, signal.SIGKILL)
        killed = (name, location, worker)
        break
    assert killed is not None, "the job always finished before the worker could be killed"
    name, location, worker = killed

    deadline = time.monotonic() + 90
    while (job := job_of_when_up(job_of, location))["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["state"] == "done", job
    assert server.workers() and server.workers() != [worker]  # a new worker did it
    [result] = job["result"]["results"]
    assert result["frames_scored"] == 256
    with sqlite3.connect(server.database) as db:
        [(attempts,)] = db.execute("SELECT attempts FROM jobs WHERE id = ?",
                                   (job["id"],)).fetchall()
        recorded = db.execute("SELECT id FROM decisions WHERE client_id = ?",
                              (name,)).fetchall()
    assert attempts >= 2  # started, killed, taken over
    assert recorded == [(result["decision_id"],)]  # decided and recorded once


def job_of_when_up(job_of: Any, location: str) -> dict[str, Any]:
    """The job, asked until a worker answers (the killed one's successor may be loading)."""
    import time

    import requests

    deadline = time.monotonic() + 90
    while True:
        try:
            return job_of(location)  # type: ignore[no-any-return]
        except requests.ConnectionError:
            assert time.monotonic() < deadline, "no worker came back"
            time.sleep(0.3)


def test_the_uploader_reads_its_job_with_its_api_key_and_no_other_job(tmp_path: Path) -> None:
    app, client = make_client(tmp_path, API_KEYS="pipeline-key, other-key",
                              VIDEO_INLINE_MAX_S="1")
    key = {"Authorization": "Bearer pipeline-key"}
    r = client.post("/v1/moderate", data={"image": [(io.BytesIO(video_bytes([GREY, RED, GREY])),
                                                     "clip.mp4")]},
                    content_type="multipart/form-data", headers=key)
    assert r.status_code == 202
    location = r.headers["Location"]
    assert client.get(location).status_code == 401  # the key is needed
    job = wait_done(client, location, headers=key)
    assert job["state"] == "done" and job["result"]["results"][0]["id"] == "clip.mp4"
    assert client.get(f"/v1/jobs/{job['id']}", headers=key).status_code == 401  # admin's
    other_key = {"Authorization": "Bearer other-key"}  # another key's: not found
    assert client.get(location, headers=other_key).status_code == 404
    # a dry-run's job is not a moderation job, whoever asks
    from decisionlog.jobs import JobLog

    other = JobLog(app.extensions["decisions"][0]).submit("dry-run", {"policy": "x"})
    assert client.get(f"/v1/moderate/jobs/{other}", headers=key).status_code == 404


def test_uploads_are_kept_as_bytes_beside_the_job_and_old_base64_jobs_still_run(
        tmp_path: Path) -> None:
    import base64
    import sqlite3

    from decisionlog.jobs import UPLOADS, JobLog
    from service.moderate import moderate_handler

    app, client = make_client(tmp_path, VIDEO_INLINE_MAX_S="1")
    app.extensions["jobs"].close()  # queued until started again
    clip = video_bytes([GREY, RED, GREY])
    r = upload(client, clip, "new.mp4")
    assert r.status_code == 202
    job_id = r.get_json()["id"]

    def stored() -> list[tuple[str, bytes]]:
        with sqlite3.connect(tmp_path / "decisions.sqlite3") as db:
            return db.execute("SELECT request, data FROM jobs JOIN job_uploads ON "
                              "job_uploads.job_id = jobs.id WHERE jobs.id = ?",
                              (job_id,)).fetchall()

    [(request, data)] = stored()
    assert data == clip and len(request) < 1000  # the bytes beside, not inside, the request
    log = JobLog(app.extensions["decisions"][0])
    assert log.request(job_id)[UPLOADS] == [clip]  # type: ignore[index]
    app.extensions["jobs"].start()
    job = wait_done(client, r.headers["Location"])
    assert job["state"] == "done"
    assert stored() == []  # done: the upload is gone (the log keeps no image)

    # a job queued before the uploads were kept apart: base64 inside its request
    old = {"profile": None, "uploads": [{"id": "old.mp4", "data": base64.b64encode(clip).decode(),
                                         "error": None, "decision_id": "d" * 32}]}
    answer = moderate_handler(app)(old, lambda done, total: None)
    assert answer["results"][0]["decision_id"] == "d" * 32
    assert answer["results"][0]["action"] == job["result"]["results"][0]["action"]
