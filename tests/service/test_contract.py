"""Every route keeps its declared contract (service/contract.py): the defects a hostile probe
found, each refused with its 4xx where it had answered 500, non-JSON, or silently ignored
what it was given."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient

from tests.fakes import HAND_POLICY, RED, image_bytes
from tests.service.conftest import ADMIN, READER, moderate_images

READER_H = {"Authorization": f"Bearer {READER}"}
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
ANN = "ann-token"


@pytest.fixture
def review_app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(REVIEWERS=f"ann:{ANN}", AUDIT_RATE="0")


def error(r: Any, status: int) -> dict[str, str]:
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.mimetype == "application/json"
    found: dict[str, str] = r.get_json()["error"]
    return found


@pytest.mark.parametrize("query", [
    "flagged=AAA", "acton=block", "flagged=1&flagged=0", "limit=1e400", "limit=Infinity",
    "since=nan", "since=inf", "until=-inf", "since=1e400", "since=10%5E30",
    "category=a%00b", "client_id=" + "x" * 300, "action=delete",
])
def test_decisions_refuse_what_they_would_have_ignored(client: FlaskClient,
                                                         query: str) -> None:
    """Before: /v1/decisions?flagged=AAA, or a misspelt acton=, answered every decision
    unfiltered."""
    found = error(client.get(f"/v1/decisions?{query}", headers=READER_H), 400)
    assert found["code"] == "invalid_field"
    name = query.split("=")[0]
    assert repr(name) in found["message"]


def test_flagged_filters_with_every_spelling_it_documents(client: FlaskClient,
                                                          app: Flask) -> None:
    moderate_images(client, app, {"red": image_bytes(RED)})
    for value in ("true", "1", "false", "0"):
        r = client.get(f"/v1/decisions?flagged={value}", headers=READER_H)
        assert r.status_code == 200
        flagged = {d["flagged"] for d in r.get_json()["decisions"]}
        assert flagged <= {value in ("true", "1")}


@pytest.mark.parametrize("path", [
    "/v1/stats?bucket=hour&colour=red", "/v1/quality?sinse=7d", "/v1/reviews?limt=5",
    "/v1/policy/versions?limit=5&x=1", "/v1/reviews/queue?x=1", "/v1/decisions/abc?x=1",
    "/healthz?x=1", "/v1/policy/diff?from=a&too=b",
])
def test_unknown_parameters_are_refused_everywhere(review_app: Flask, path: str) -> None:
    client = review_app.test_client()
    headers = {"Authorization": f"Bearer {ANN}"} if "/reviews" in path else READER_H
    found = error(client.get(path, headers=headers), 400)
    assert found["code"] == "invalid_field" and "unknown parameter" in found["message"]
    assert "accepted:" in found["message"]


@pytest.mark.parametrize("since", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_non_finite_times_are_refused_not_answered_as_bare_nan(client: FlaskClient,
                                                                since: str) -> None:
    """Before: since=nan on /v1/quality and the dry-run answered 200 with bare NaN."""
    error(client.get(f"/v1/quality?since={since}", headers=READER_H), 400)
    text = yaml.safe_dump(HAND_POLICY)
    r = client.post(f"/v1/policy/dry-run?since={since}", data=text,
                    content_type="application/yaml", headers=ADMIN_H)
    error(r, 400)
    r = client.post("/v1/policy/dry-run", headers=ADMIN_H, data=json.dumps(
        {"policy": text, "since": since}), content_type="application/json")
    error(r, 400)


@pytest.mark.parametrize("body", ['{"policy": "x", "since": NaN}',
                                  '{"policy": "x", "since": Infinity}'])
def test_json_bodies_with_nan_are_not_json(client: FlaskClient, body: str) -> None:
    found = error(client.post("/v1/policy/dry-run", data=body, content_type="application/json",
                              headers=ADMIN_H), 400)
    assert found["code"] == "invalid_json" and "not JSON" in found["message"]


@pytest.mark.parametrize("limit", ["Infinity", "1e400", "-1", "501", "2.5"])
def test_dry_run_limits_out_of_range_are_400(client: FlaskClient, limit: str) -> None:
    """Before: a limit of Infinity or 1e400 answered 500."""
    r = client.post(f"/v1/policy/dry-run?limit={limit}", data=yaml.safe_dump(HAND_POLICY),
                    content_type="application/yaml", headers=ADMIN_H)
    assert "limit" in error(r, 400)["message"]


def test_crafted_cursors_are_400(client: FlaskClient) -> None:
    """Before: a cursor of deep JSON, or a 1,000-digit number, answered 500."""
    for payload in ["[" * 5000 + "]" * 5000, "[" + "9" * 1000 + ", \"x\"]", "[NaN, \"x\"]",
                    "{\"a\": 1}", "[1e999, \"x\"]", "[true, \"x\"]"]:
        cursor = base64.urlsafe_b64encode(payload.encode()).decode()
        r = client.get("/v1/decisions", query_string={"cursor": cursor}, headers=READER_H)
        found = error(r, 400)
        assert "cursor" in found["message"] and len(found["message"]) < 400


@pytest.mark.parametrize("item", [str(2**63), "9" * 30, "0", "-1", "1.5", "x"])
def test_review_ids_no_row_can_have_are_404(review_app: Flask, item: str) -> None:
    """Before: item ids >= 2**63 answered 500 (SQLite overflow) on the verdict, release and
    the review page."""
    client = review_app.test_client()
    headers = {"Authorization": f"Bearer {ANN}"}
    r = client.post(f"/v1/reviews/{item}", json={"violations": []}, headers=headers)
    assert error(r, 404)["code"] == "not_found"
    error(client.post(f"/v1/reviews/{item}/release", headers=headers), 404)
    r = client.post(f"/dashboard/review/{item}", data={"do": "skip"}, headers=headers)
    assert r.status_code == 404


@pytest.mark.parametrize("done", ["²", "10^30", "9" * 30, str(2**63), "-1", ""])
def test_the_review_page_ignores_a_done_no_verdict_can_have(review_app: Flask,
                                                             done: str) -> None:
    """Before: /dashboard/review?done=² (a digit to str.isdigit, not to int) answered 500."""
    client = review_app.test_client()
    r = client.get("/dashboard/review", query_string={"done": done},
                   headers={"Authorization": f"Bearer {ANN}"})
    assert r.status_code == 200


def test_405_names_the_allowed_methods(client: FlaskClient) -> None:
    r = client.delete("/v1/decisions", headers=READER_H)
    assert error(r, 405)["code"] == "method_not_allowed"
    assert set(r.headers["Allow"].split(", ")) >= {"GET"}
    r = client.get("/v1/moderate")
    assert "POST" in r.headers["Allow"]


def test_every_operation_is_declared_once_with_an_id_and_a_tag(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    ids = [op["operationId"] for path in document["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)) == 43
    for path in document["paths"].values():
        for op in path.values():
            assert op["tags"] and "400" in op["responses"]
            assert {"408", "413", "414", "431"} <= set(op["responses"])
    # the constraints are in the document
    parameters = {p["name"]: p for p in document["paths"]["/v1/decisions"]["get"]["parameters"]}
    assert parameters["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 500,
                                             "default": 50}
    assert "pattern" in parameters["since"]["schema"]
    assert parameters["client_id"]["schema"]["maxLength"] == 256
