"""The decision log through the service: recording, the query API, stats and the dashboard."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask

from tests.fakes import GREEN, GREY, HAND_POLICY, PURPLE, RED, image_bytes
from tests.service.conftest import ADMIN, READER


def reader() -> dict[str, str]:
    return {"Authorization": f"Bearer {READER}"}


def moderate(client: Any, *colours: tuple[int, int, int], ids: list[str] | None = None
             ) -> dict[str, Any]:
    data: dict[str, Any] = {"image": [(io.BytesIO(image_bytes(c)), f"{i}.png")
                                      for i, c in enumerate(colours)]}
    if ids:
        data["id"] = ids
    r = client.post("/v1/moderate", data=data)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def flushed(app: Flask) -> Any:
    store, recorder = app.extensions["decisions"]
    recorder.flush()
    return store


def test_every_decision_is_recorded_and_found(app: Flask) -> None:
    client = app.test_client()
    body = moderate(client, RED, GREEN, ids=["u-red", "u-green"])
    flushed(app)
    for result in body["results"]:
        r = client.get(f"/v1/decisions/{result['decision_id']}", headers=reader())
        assert r.status_code == 200
        found = r.get_json()
        assert found["policy"] == {"name": "hand", "version": body["policy"]["version"]}
        assert found["client_id"] == result["id"] and found["action"] == result["action"]
        assert found["categories"]["weapons"]["score"] == result["categories"]["weapons"]["score"]
        assert len(found["image"]["sha256"]) == 64 and found["image"]["size"] > 0
        assert "embedding" not in found


def test_the_image_itself_is_never_stored(app: Flask) -> None:
    client = app.test_client()
    data = image_bytes(RED)
    moderate(client, RED)
    store = flushed(app)
    raw = Path(store.url[len("sqlite:///"):]).read_bytes()
    assert data[40:80] not in raw  # a stretch of the encoded pixels appears nowhere


def test_embedding_is_kept_for_rescoring(app: Flask) -> None:
    body = moderate(app.test_client(), RED)
    store = flushed(app)
    vector = store.embedding(body["results"][0]["decision_id"])
    assert vector is not None and vector.shape == (3,)
    assert vector[0] == pytest.approx(1.0, abs=1e-3)  # the fake encoder's RED is (1, 0, 0)


def test_failed_images_are_recorded_as_errors(app: Flask) -> None:
    client = app.test_client()
    r = client.post("/v1/moderate", data={"image": [(io.BytesIO(image_bytes(RED)), "a.png"),
                                                    (io.BytesIO(b"junk"), "b.bin")]})
    flushed(app)
    page = client.get("/v1/decisions?action=error", headers=reader()).get_json()
    assert [d["client_id"] for d in page["decisions"]] == ["b.bin"]
    assert page["decisions"][0]["error_code"] == "unsupported_format"
    assert r.status_code == 200


def test_query_filters_pagination_and_stats(app: Flask) -> None:
    client = app.test_client()
    for _ in range(3):
        moderate(client, RED, GREEN, PURPLE, GREY)
    flushed(app)
    page = client.get("/v1/decisions?limit=5", headers=reader()).get_json()
    assert len(page["decisions"]) == 5 and page["next_cursor"]
    rest = client.get(f"/v1/decisions?limit=50&cursor={page['next_cursor']}",
                      headers=reader()).get_json()
    assert len(rest["decisions"]) == 7 and rest["next_cursor"] is None
    blocks = client.get("/v1/decisions?action=block", headers=reader()).get_json()
    assert {d["action"] for d in blocks["decisions"]} == {"block"}
    weapons = client.get("/v1/decisions?category=weapons", headers=reader()).get_json()
    assert len(weapons["decisions"]) == 6  # RED blocks, PURPLE reviews
    flagged = client.get("/v1/decisions?flagged=true", headers=reader()).get_json()
    assert len(flagged["decisions"]) == 9
    stats = client.get("/v1/stats?bucket=day", headers=reader()).get_json()
    [bucket] = stats["buckets"]
    assert bucket["total"] == 12 and bucket["actions"]["block"] == 3
    assert bucket["categories"]["weapons"]["rate"] == pytest.approx(0.5)
    since = client.get("/v1/decisions?since=2999-01-01T00:00:00Z", headers=reader())
    assert since.get_json()["decisions"] == []


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("/v1/decisions?since=yesterday", "parameter 'since' is not a time: give unix seconds"),
        ("/v1/decisions?limit=0", "parameter 'limit' must be an integer from 1 to 500; got '0'"),
        ("/v1/decisions?cursor=nope", "invalid cursor"),
        ("/v1/stats?bucket=week", "parameter 'bucket' must be 'hour' or 'day'; got 'week'"),
    ],
)
def test_bad_query_parameters(client: Any, query: str, message: str) -> None:
    r = client.get(query, headers=reader())
    assert r.status_code == 400 and message in r.get_json()["error"]["message"]


def test_reader_token_is_required(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    for path in ("/v1/decisions", "/v1/decisions/x", "/v1/stats", "/dashboard"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/decisions", headers={"Authorization": f"Bearer {ADMIN}"}
                      ).status_code == 200
    assert client.get("/v1/decisions/x", headers=reader()).status_code == 404
    closed = make_app(READER_TOKEN=None, ADMIN_TOKEN=None).test_client()
    r = closed.get("/v1/decisions", headers=reader())
    assert r.status_code == 403 and "MODERATION_READER_TOKEN" in r.get_json()["error"]["message"]


def test_recording_can_be_turned_off(make_app: Callable[..., Flask]) -> None:
    app = make_app(RECORD_DECISIONS=False)
    body = moderate(app.test_client(), RED)
    assert "decision_id" not in body["results"][0]
    store, recorder = app.extensions["decisions"]
    assert recorder is None and store.count() == 0


def test_dashboard_shows_policy_rates_changes_and_latest(app: Flask, policy_path: Path) -> None:
    client = app.test_client()
    moderate(client, RED, GREEN, GREY, ids=["first-red", "g", "x"])
    data = dict(HAND_POLICY, templates=["a {}"])
    policy_path.write_text(yaml.safe_dump(data, sort_keys=False))
    new = client.post("/v1/policy/reload", headers={"Authorization": f"Bearer {ADMIN}"})
    moderate(client, RED, ids=["second-red"])
    flushed(app)
    r = client.get(f"/dashboard?token={READER}")
    assert r.status_code == 200 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert new.get_json()["version"] in page
    assert 'id="flag-rates"' in page and 'data-category="weapons"' in page
    assert "first-red" in page and "second-red" in page and "“rifle”" in page
    assert "uncalibrated" in page and "review from" in page
    assert "moderation_token" in r.headers.get("Set-Cookie", "")
    again = client.get("/dashboard")  # the cookie carries the token now
    assert again.status_code == 200


def test_dashboard_with_no_decisions(client: Any) -> None:
    page = client.get("/dashboard", headers=reader()).get_data(as_text=True)
    assert "No decisions in this period." in page and "No flagged decisions yet." in page


def test_a_request_whose_only_image_fails_is_recorded_too(app: Flask) -> None:
    client = app.test_client()
    r = client.post("/v1/moderate", data={"image": [(io.BytesIO(b"junk"), "only.bin")]})
    assert r.status_code == 415
    flushed(app)
    page = client.get("/v1/decisions?client_id=only.bin", headers=reader()).get_json()
    assert [d["error_code"] for d in page["decisions"]] == ["unsupported_format"]
