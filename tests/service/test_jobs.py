"""Dry-runs as jobs: ``async=true`` or a large window answers 202 and runs off the request
thread, with the inline dry-run's result; what a dry-run would refuse is refused at once; a
job left by a worker that died is taken over; the lab page follows its job."""

from __future__ import annotations

import copy
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import yaml
from flask import Flask
from flask.testing import FlaskClient
from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIResponse

from decisionlog import DecisionStore
from decisionlog.jobs import JobLog
from decisionlog.tables import jobs as jobs_table
from moderation import PolicyError
from service.jobs import JobRunner, JobStopped
from tests.fakes import (
    BLUE,
    GREEN,
    GREY,
    HAND_POLICY,
    PURPLE,
    RED,
    FakeEncoder,
    animation_bytes,
    image_bytes,
    unit,
)
from tests.service.conftest import ADMIN, READER, described, moderate_images

ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
READER_H = {"Authorization": f"Bearer {READER}"}
SAME_ORIGIN = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}
IMAGES = {
    "rifle": image_bytes(RED), "toy": image_bytes(BLUE), "between": image_bytes(PURPLE),
    "beer": image_bytes(GREEN), "nothing": image_bytes(GREY),
    "clip": animation_bytes(GREY, GREEN, RED),
}
#: a fixed start: an inline dry-run and a job's read the same window
SINCE = "1000000000"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The app's decision log: SQLite, or PostgreSQL (skipped without a test server)."""
    if request.param == "sqlite":
        return {"DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.sqlite3'}"}
    return {"DATABASE_URL": request.getfixturevalue("postgres_url")}


def proposal(**weapons: Any) -> dict[str, Any]:
    data = copy.deepcopy(HAND_POLICY)
    data["categories"]["weapons"].update(weapons)
    return data


EDITED = yaml.safe_dump(proposal(threshold={"value": -1.0}), sort_keys=False)


def post_dry_run(client: FlaskClient, text: str = EDITED, **query: Any) -> Any:
    return client.post("/v1/policy/dry-run", data=text, content_type="application/yaml",
                       headers=ADMIN_H, query_string={"since": SINCE, "limit": 500, **query})


def wait_for_job(client: FlaskClient, location: str, timeout: float = 60) -> dict[str, Any]:
    """Poll the job until it is done or failed."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(location, headers=ADMIN_H)
        assert r.status_code == 200, r.get_data(as_text=True)
        job: dict[str, Any] = r.get_json()
        if job["state"] in ("done", "failed"):
            return job
        assert time.monotonic() < deadline, f"the job is still {job['state']}"
        time.sleep(0.1)


def without_seconds(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "seconds"}


def job_rows(app: Flask) -> int:
    with app.extensions["decisions"][0].engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(jobs_table)).scalar_one())


def test_an_async_dry_run_is_a_job_with_the_inline_result(
        make_app: Callable[..., Flask], database: dict[str, str]) -> None:
    app = make_app(**database)
    client = app.test_client()
    spec = OpenAPI.from_dict(client.get("/openapi.json").get_json())
    moderate_images(client, app, IMAGES)
    inline = post_dry_run(client)
    assert inline.status_code == 200 and inline.get_json()["changed_total"] > 0

    started = post_dry_run(client, **{"async": "true"})
    assert started.status_code == 202, started.get_data(as_text=True)
    spec.validate_response(described(started), WerkzeugOpenAPIResponse(started))
    job = started.get_json()
    assert started.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["kind"] == "dry-run" and job["state"] in ("queued", "running", "done")
    assert job["error"] is None

    done = wait_for_job(client, started.headers["Location"])
    assert done["state"] == "done", done["error"]
    assert without_seconds(done["result"]) == without_seconds(inline.get_json())
    assert done["progress"] == {"done": len(IMAGES), "total": len(IMAGES)}
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= \
        done["started_at"]
    answer = client.get(started.headers["Location"], headers=ADMIN_H)
    spec.validate_response(described(answer), WerkzeugOpenAPIResponse(answer))
    # the JSON form takes the query's async too
    r = client.post("/v1/policy/dry-run?async=1", json={"policy": EDITED, "since": SINCE},
                    headers=ADMIN_H)
    assert r.status_code == 202
    assert wait_for_job(client, r.headers["Location"])["state"] == "done"


def test_a_large_window_runs_as_a_job_without_asking(make_app: Callable[..., Flask]) -> None:
    small = make_app(DRY_RUN_INLINE_MAX_DECISIONS=len(IMAGES))
    client = small.test_client()
    moderate_images(client, small, IMAGES)
    assert post_dry_run(client).status_code == 200  # as many as allowed: inline
    large = make_app(DRY_RUN_INLINE_MAX_DECISIONS=len(IMAGES) - 1)
    client = large.test_client()
    r = post_dry_run(client)
    assert r.status_code == 202 and r.headers["Location"].startswith("/v1/jobs/")
    assert wait_for_job(client, r.headers["Location"])["state"] == "done"
    assert post_dry_run(client, **{"async": "false"}).status_code == 202  # not a way out
    # a window without decisions is small, whatever the setting
    zero = make_app(DRY_RUN_INLINE_MAX_DECISIONS=0)
    assert post_dry_run(zero.test_client(), since="2100-01-01").status_code == 200


def calibrated_for(model: str) -> dict[str, Any]:
    data = copy.deepcopy(HAND_POLICY)
    data["categories"]["weapons"]["threshold"]["provenance"] = {
        "source": "calibrated", "model": model, "date": "2026-11-20",
        "dataset": {"fingerprint": "abc", "positives": 40, "negatives": 400},
        "target": {"precision": 0.95}, "achieved": {"precision": 0.96, "recall": 0.7},
    }
    return data


REFUSED = {
    "invalid policy": ({"data": "name: x\n"}, 422, "invalid_policy"),
    "another model": ({"data": yaml.safe_dump(dict(HAND_POLICY, model={
        "name": "RN50", "pretrained": "openai"}))}, 422, "model_mismatch"),
    "calibrated with another model": ({"data": yaml.safe_dump(calibrated_for("RN50/openai"))},
                                      422, "model_mismatch"),
    "unknown against": ({"data": yaml.safe_dump(HAND_POLICY), "against": "nope"}, 404,
                        "not_found"),
    "201 categories": ({"data": yaml.safe_dump(dict(HAND_POLICY, categories={
        f"c{i}": {} for i in range(201)}))}, 422, "policy_too_large"),
    "checkpoint outside the folder": ({"data": yaml.safe_dump(dict(HAND_POLICY, model={
        "name": "fake", "pretrained": "../../etc/passwd"}))}, 422, "invalid_policy"),
    "bad time": ({"data": yaml.safe_dump(HAND_POLICY), "since": "yesterday"}, 400,
                 "invalid_field"),
}


@pytest.mark.parametrize(("given", "status", "code"), REFUSED.values(), ids=REFUSED.keys())
def test_what_a_dry_run_refuses_is_refused_at_once_never_a_failed_job(
        client: FlaskClient, app: Flask, given: dict[str, Any], status: int, code: str
        ) -> None:
    query = {k: v for k, v in given.items() if k != "data"}
    inline = client.post("/v1/policy/dry-run", data=given["data"],
                         content_type="application/yaml", headers=ADMIN_H, query_string=query)
    started = client.post("/v1/policy/dry-run", data=given["data"],
                          content_type="application/yaml", headers=ADMIN_H,
                          query_string={**query, "async": "true"})
    assert (started.status_code, started.get_json()["error"]["code"]) == (status, code)
    assert started.get_json() == inline.get_json()  # the same answer, word for word
    assert job_rows(app) == 0


def test_a_window_of_another_model_is_refused_at_once(client: FlaskClient, app: Flask) -> None:
    from tests.decisionlog.conftest import put

    put(app.extensions["decisions"][0], [unit(1, 0, 0)[None]], model="RN50/openai")
    inline = post_dry_run(client, since="2h")
    started = post_dry_run(client, since="2h", **{"async": "true"})
    assert started.status_code == 422 and started.get_json()["error"]["code"] == \
        "model_mismatch"
    assert started.get_json() == inline.get_json() and job_rows(app) == 0


def test_too_many_new_prompts_are_refused_at_once(
        fake_encoder: FakeEncoder, policy_path: Path, tmp_path: Path) -> None:
    """With the shared text cache a server has, only a proposal's new prompts count."""
    from decisionlog import SharedEmbeddingCache, migrate
    from moderation import Moderator
    from moderation.policy import parse_policy
    from service.app import create_app

    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    migrate(url)
    moderator = Moderator(parse_policy(policy_path.read_text()), fake_encoder,
                          SharedEmbeddingCache.with_folder(url, tmp_path / "cache"))
    app = create_app({"POLICY": str(policy_path), "ADMIN_TOKEN": ADMIN, "DATABASE_URL": url,
                      "POLICY_MAX_NEW_PROMPTS": 2}, moderator=moderator)
    client = app.test_client()
    moderate_images(client, app, IMAGES)
    fake_encoder.texts.update({"a knife": unit(0, -1, 1), "the knife": unit(-1, 1, 1),
                               "a sword": unit(1, 1, 0), "the sword": unit(1, 0, 1)})
    knife = yaml.safe_dump(proposal(terms=["gun", "rifle", "knife"]), sort_keys=False)
    fake_encoder.encoded_texts.clear()
    r = post_dry_run(client, knife, **{"async": "true"})  # 2 new prompts: allowed
    assert r.status_code == 202
    assert wait_for_job(client, r.headers["Location"])["state"] == "done"
    both = yaml.safe_dump(proposal(terms=["gun", "knife", "sword"]), sort_keys=False)
    inline = post_dry_run(client, both)
    started = post_dry_run(client, both, **{"async": "true"})
    for answer in (inline, started):
        assert answer.status_code == 422
        assert answer.get_json()["error"]["code"] == "policy_too_large"
    assert "4 prompts" in started.get_json()["error"]["message"]
    assert "the limit is 2" in started.get_json()["error"]["message"]
    assert fake_encoder.encoded_texts == ["a knife", "the knife"]  # the job's; none since
    assert job_rows(app) == 1


def test_an_unknown_job_is_a_404(client: FlaskClient, spec: OpenAPI) -> None:
    for job_id in ("0" * 32, "nope", "A" * 32):
        r = client.get(f"/v1/jobs/{job_id}", headers=ADMIN_H)
        assert r.status_code == 404 and r.mimetype == "application/json"
        error = r.get_json()["error"]
        assert error["code"] == "not_found" and job_id in error["message"]
        spec.validate_response(described(r), WerkzeugOpenAPIResponse(r))


def test_jobs_are_the_admin_s(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    client = app.test_client()
    r = post_dry_run(client, **{"async": "true"})
    location = r.headers["Location"]
    for headers in (READER_H, {}):
        r = client.get(location, headers=headers)
        assert r.status_code == 401 and r.get_json()["error"]["code"] == "unauthorized"
        r = client.post("/v1/policy/dry-run?async=true", data=EDITED,
                        content_type="application/yaml", headers=headers)
        assert r.status_code == 401
    # a reader's page token does not open the job's page either
    r = client.get(f"/dashboard/lab/jobs/{location.rsplit('/', 1)[1]}?token={READER}")
    assert r.status_code == 401
    disabled = make_app(ADMIN_TOKEN=None).test_client()
    r = disabled.get(location, headers=READER_H)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "admin_disabled"


def test_a_job_left_by_a_dead_worker_is_taken_over(
        make_app: Callable[..., Flask], database: dict[str, str]) -> None:
    app = make_app(**database)
    client = app.test_client()
    moderate_images(client, app, IMAGES)
    inline = post_dry_run(client).get_json()
    runner: JobRunner = app.extensions["jobs"]
    runner.close()  # this worker takes nothing for now
    started = post_dry_run(client, **{"async": "true"})
    location, job_id = started.headers["Location"], started.get_json()["id"]
    # another worker took it, reported some progress, and died: its lease has run out
    long_ago = time.time() - 600
    claim = runner.jobs.claim("dead-worker", lease_s=60, now=long_ago)
    assert claim is not None and claim.id == job_id
    assert runner.jobs.progress(job_id, "dead-worker", 2, len(IMAGES), lease_s=60,
                                now=long_ago)
    job = client.get(location, headers=ADMIN_H).get_json()
    assert job["state"] == "running" and job["progress"] == {"done": 2, "total": len(IMAGES)}
    runner.start()
    done = wait_for_job(client, location)
    assert done["state"] == "done" and without_seconds(done["result"]) == \
        without_seconds(inline)
    assert not runner.jobs.finish(job_id, "dead-worker", {})  # it lost the job for good


# --- the runner itself ----------------------------------------------------------------------


class CountingLog(JobLog):
    """A job log that counts the progress reports written."""

    writes = 0

    def progress(self, *args: Any, **kwargs: Any) -> bool:
        self.writes += 1
        return super().progress(*args, **kwargs)


@pytest.fixture
def job_log(tmp_path: Path) -> CountingLog:
    return CountingLog(DecisionStore(f"sqlite:///{tmp_path / 'runner.sqlite3'}"))


def test_progress_is_written_at_most_twice_a_second(job_log: CountingLog) -> None:
    def count(request: dict[str, Any], progress: Callable[[int, int], None]) -> dict[str, Any]:
        for i in range(300):
            progress(i, request["n"])
            time.sleep(0.001)
        return {"counted": 300}

    runner = JobRunner(job_log, {"count": count})
    job_id = job_log.submit("count", {"n": 310})  # (10 left out, say: never all read)
    assert runner.run_once() and not runner.run_once()
    job = job_log.get(job_id)
    assert job is not None and job.state == "done" and job.result == {"counted": 300}
    # the last report is written with the result, however soon after the one before
    assert job.progress.model_dump() == {"done": 299, "total": 310}
    assert 2 <= job_log.writes <= 4
    # a report that reaches the total is written at once
    def two(request: dict[str, Any], progress: Callable[[int, int], None]) -> dict[str, Any]:
        progress(1, 2)
        progress(2, 2)
        return {}

    job_log.writes = 0
    runner.handlers["count"] = two
    job_log.submit("count", {})
    assert runner.run_once() and job_log.writes == 2


def test_a_job_s_error_is_its_answer(job_log: CountingLog) -> None:
    def refuse(request: dict[str, Any], progress: Callable[[int, int], None]) -> dict[str, Any]:
        raise PolicyError("the proposed policy is not valid", faults=["a: b"])

    def crash(request: dict[str, Any], progress: Callable[[int, int], None]) -> dict[str, Any]:
        raise RuntimeError("a secret path /srv/x")

    runner = JobRunner(job_log, {"refuse": refuse, "crash": crash})
    ids = [job_log.submit(kind, {}) for kind in ("refuse", "crash", "other")]
    while runner.run_once():
        pass
    errors = [job_log.get(i).error for i in ids]  # type: ignore[union-attr]
    assert [e.code if e else None for e in errors] == ["invalid_policy", "internal",
                                                       "unknown_kind"]
    assert errors[0] is not None and errors[0].details == {"faults": ["a: b"]}
    assert errors[1] is not None and "secret" not in errors[1].message


def test_a_closing_runner_gives_its_job_back(job_log: CountingLog) -> None:
    running = threading.Event()

    def forever(request: dict[str, Any], progress: Callable[[int, int], None]
                ) -> dict[str, Any]:
        running.set()
        while True:
            progress(1, 10)
            time.sleep(0.01)

    runner = JobRunner(job_log, {"forever": forever})
    job_id = job_log.submit("forever", {})
    runner.start()
    assert running.wait(30)
    runner.close()
    job = job_log.get(job_id)
    assert job is not None and job.state == "queued"
    again = job_log.claim("next-worker", lease_s=60)
    assert again is not None and again.id == job_id and again.attempt == 2


def test_a_runner_that_lost_its_job_stops_it(job_log: CountingLog) -> None:
    stopped: list[BaseException] = []

    def slow(request: dict[str, Any], progress: Callable[[int, int], None]) -> dict[str, Any]:
        progress(0, 10)
        # meanwhile, its lease ran out and another runner took the job over
        assert job_log.claim("other", lease_s=60, now=time.time() + 3600) is not None
        try:
            progress(10, 10)
        except JobStopped as e:
            stopped.append(e)
            raise
        return {}

    runner = JobRunner(job_log, {"slow": slow})
    job_id = job_log.submit("slow", {})
    assert runner.run_once()
    assert stopped and "took the job over" in str(stopped[0])
    job = job_log.get(job_id)
    assert job is not None and job.state == "running"  # the other runner's now
    assert job_log.finish(job_id, "other", {"by": "other"})


def test_a_long_step_keeps_its_job_the_lease_is_renewed_while_it_runs(
        job_log: CountingLog) -> None:
    """A handler busy in one step for several leases (a long video's decision reports no
    progress meanwhile) keeps its job: no other runner can claim it, and it is done once."""
    stolen: list[object] = []

    def one_long_step(request: dict[str, Any], progress: Callable[[int, int], None]
                      ) -> dict[str, Any]:
        progress(0, 1)
        deadline = time.monotonic() + 2.0  # four leases of 0.5 s
        while time.monotonic() < deadline:
            stolen.append(job_log.claim("other", lease_s=60))
            time.sleep(0.1)
        progress(1, 1)
        return {"done": True}

    runner = JobRunner(job_log, {"long": one_long_step}, lease_s=0.5)
    job_id = job_log.submit("long", {})
    assert runner.run_once()
    assert stolen and all(c is None for c in stolen), "another runner took a running job"
    job = job_log.get(job_id)
    assert job is not None and job.state == "done" and job.result == {"done": True}


# --- the lab page ---------------------------------------------------------------------------


def page_of(client: FlaskClient, location: str) -> str:
    r = client.get(location)
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    return r.get_data(as_text=True)


def test_a_large_lab_dry_run_redirects_to_its_job_page(
        make_app: Callable[..., Flask], database: dict[str, str]) -> None:
    app = make_app(DRY_RUN_INLINE_MAX_DECISIONS=0, **database)
    client = app.test_client()
    moderate_images(client, app, IMAGES)
    runner: JobRunner = app.extensions["jobs"]
    runner.close()  # the job waits until this test lets it run
    assert client.get(f"/dashboard/lab?token={ADMIN}").status_code == 200  # the cookie
    r = client.post("/dashboard/lab", data={"policy": EDITED, "since": SINCE, "limit": "20"},
                    headers=SAME_ORIGIN)
    assert r.status_code == 303, r.get_data(as_text=True)[:500]
    location = r.headers["Location"]
    assert re.fullmatch(r"/dashboard/lab/jobs/[0-9a-f]{32}", location)
    job_id = location.rsplit("/", 1)[1]

    waiting = page_of(client, location)
    assert '<meta http-equiv="refresh" content="2">' in waiting
    assert "waits for a worker" in waiting and 'id="result"' not in waiting
    assert "threshold:\n      value: -1.0" in waiting  # the form keeps the proposal
    assert 'value="2001-09-09T01:46:40Z"' in waiting  # its window, fixed when it was asked
    # a worker starts it and reports progress, then dies (its lease has run out)
    long_ago = time.time() - 600
    assert runner.jobs.claim("dead-worker", lease_s=60, now=long_ago) is not None
    runner.jobs.progress(job_id, "dead-worker", 3, len(IMAGES), lease_s=60, now=long_ago)
    running = page_of(client, location)
    assert f'decisions read <b id="done">3</b> of <b id="total">{len(IMAGES)}</b>' in running
    assert '<meta http-equiv="refresh"' in running

    runner.start()  # this worker takes it over
    deadline = time.monotonic() + 60
    while 'id="result"' not in (shown := page_of(client, location)):
        assert time.monotonic() < deadline, "no result on the job's page"
        time.sleep(0.1)
    assert "http-equiv" not in shown and 'id="job"' not in shown
    assert f"{len(IMAGES)} decisions re-decided" in shown
    assert "weapons: threshold 0.8 → -1 (flags more)" in shown  # the diff, as inline


def test_a_failed_lab_job_shows_its_error(make_app: Callable[..., Flask]) -> None:
    app = make_app(DRY_RUN_INLINE_MAX_DECISIONS=0)
    client = app.test_client()
    moderate_images(client, app, {"rifle": image_bytes(RED)})
    runner: JobRunner = app.extensions["jobs"]
    runner.close()
    client.get(f"/dashboard/lab?token={ADMIN}")
    r = client.post("/dashboard/lab", data={"policy": EDITED, "since": "", "limit": "5"},
                    headers=SAME_ORIGIN)
    location = r.headers["Location"]
    job_id = location.rsplit("/", 1)[1]
    assert runner.jobs.claim("w", lease_s=60) is not None
    assert runner.jobs.fail(job_id, "w", "invalid_policy", "stored policy version 'v' no "
                            "longer validates on this server", {"faults": ["x: gone"]})
    shown = page_of(client, location)
    assert "invalid_policy" in shown and "<li>x: gone</li>" in shown
    assert "http-equiv" not in shown and 'id="result"' not in shown
    assert 'name="since" value=""' in shown
    # a bad proposal in the lab is refused at once, on the lab's own page
    r = client.post("/dashboard/lab", data={"policy": "name: x\n", "since": "", "limit": "5"},
                    headers=SAME_ORIGIN)
    assert r.status_code == 422 and "invalid_policy" in r.get_data(as_text=True)
    assert client.get("/dashboard/lab/jobs/" + "0" * 32).status_code == 404


def test_a_job_with_no_frames_is_a_note(make_app: Callable[..., Flask]) -> None:
    """An empty window as a job: done, with the inline note."""
    app = make_app()
    client = app.test_client()
    r = post_dry_run(client, since="2100-01-01", **{"async": "true"})
    job = wait_for_job(client, r.headers["Location"])
    assert job["state"] == "done" and job["result"]["decisions"] == 0
    assert "no stored decision" in job["result"]["note"]
    assert job["progress"] == {"done": 0, "total": 0}
    assert np.isfinite(job["result"]["seconds"])


# --- the real `moderation serve`: a job is run by a gunicorn worker's thread ---------------


@pytest.mark.server
def test_served_jobs_are_run_and_taken_over_by_the_workers(
        start_server: Callable[..., Any]) -> None:
    import requests

    from tests.service.conftest import TOKEN

    server = start_server(workers=2)
    admin = {"Authorization": f"Bearer {TOKEN}"}
    files = [("image", (f"{name}.png", data, "image/png")) for name, data in IMAGES.items()]
    assert requests.post(f"{server.base}/v1/moderate", files=files, timeout=60).ok
    deadline = time.monotonic() + 60
    while len(requests.get(f"{server.base}/v1/decisions", headers=READER_H,
                           timeout=10).json()["decisions"]) < len(IMAGES):
        assert time.monotonic() < deadline, "the decisions were not recorded"
        time.sleep(0.2)

    def finished(location: str) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while True:
            job: dict[str, Any] = requests.get(f"{server.base}{location}", headers=admin,
                                               timeout=10).json()
            if job["state"] in ("done", "failed"):
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.2)

    # a proposal names files inside the policy's folder only: the server's policy does too
    data = yaml.safe_load(server.policy_path.read_text())
    config = Path(data["model"]["config"])
    (server.policy_path.parent / config.name).write_bytes(config.read_bytes())
    data["model"]["config"] = config.name
    text = yaml.safe_dump(data, sort_keys=False)
    server.policy_path.write_text(text)
    assert requests.post(f"{server.base}/v1/policy/reload", headers=admin, timeout=60).ok
    r = requests.post(f"{server.base}/v1/policy/dry-run?async=true&since=1h", data=text,
                      headers={**admin, "Content-Type": "application/yaml"}, timeout=30)
    assert r.status_code == 202, r.text
    job = finished(r.headers["Location"])
    assert job["state"] == "done" and job["result"]["decisions"] == len(IMAGES)

    # a job whose worker died: a worker's poll finds its lease run out, and takes it over
    log = JobLog(DecisionStore(f"sqlite:///{server.database}", migrate_schema=False))
    job_id = log.submit("dry-run", {"policy": text, "since": "0", "until": None,
                                    "against": None, "limit": 5})
    assert log.claim("dead-worker", lease_s=60, now=time.time() - 600) is not None
    job = finished(f"/v1/jobs/{job_id}")
    assert job["state"] == "done" and job["result"]["decisions"] == len(IMAGES)
    assert not log.finish(job_id, "dead-worker", {})
