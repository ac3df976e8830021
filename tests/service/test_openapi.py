"""The OpenAPI document is checked against real responses (openapi-core validates each
request and response against it)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIResponse

from tests.fakes import BLUE, HAND_POLICY, RED, image_bytes
from tests.service.conftest import ADMIN, READER, described


def upload(*items: tuple[bytes, str]) -> dict[str, Any]:
    return {"data": {"image": [(io.BytesIO(d), n) for d, n in items]}}


B64 = base64.b64encode(image_bytes(RED)).decode()
CASES: list[tuple[str, str, dict[str, Any], int]] = [
    ("post", "/v1/moderate", upload((image_bytes(RED), "a.png"), (b"junk", "b")), 200),
    ("post", "/v1/moderate", {"json": {"images": [{"data": B64, "id": "x"}]}}, 200),
    ("post", "/v1/moderate", upload((b"junk", "b")), 415),
    ("post", "/v1/moderate", upload((image_bytes(BLUE, "JPEG")[:30], "c")), 400),
    ("post", "/v1/moderate", {"json": {"images": [{"data": B64}], "profile": "zzz"}}, 400),
    ("post", "/v1/moderate", {"json": {"images": [{"data": B64}] * 40}}, 413),
    ("get", "/v1/policy", {}, 200),
    ("post", "/v1/policy/reload", {"headers": {"Authorization": f"Bearer {ADMIN}"}}, 200),
    ("post", "/v1/policy/reload", {}, 401),
    ("get", "/v1/decisions", {"headers": {"Authorization": f"Bearer {READER}"}}, 200),
    ("get", "/v1/decisions", {"query_string": {"limit": "0"},
                              "headers": {"Authorization": f"Bearer {READER}"}}, 400),
    ("get", "/v1/decisions/nope", {"headers": {"Authorization": f"Bearer {READER}"}}, 404),
    ("get", "/v1/stats", {"headers": {"Authorization": f"Bearer {READER}"}}, 200),
    ("get", "/v1/policy/versions", {"headers": {"Authorization": f"Bearer {READER}"}}, 200),
    ("get", "/v1/policy/versions", {}, 401),
    ("get", "/v1/policy/versions/nope", {"headers": {"Authorization": f"Bearer {READER}"}},
     404),
    ("get", "/v1/stats", {}, 401),
    ("post", "/v1/policy/dry-run", {"data": yaml.safe_dump(HAND_POLICY),
                                    "content_type": "application/yaml",
                                    "headers": {"Authorization": f"Bearer {ADMIN}"}}, 200),
    ("post", "/v1/policy/dry-run", {"json": {"policy": yaml.safe_dump(HAND_POLICY),
                                             "since": "1h", "limit": 3},
                                    "headers": {"Authorization": f"Bearer {ADMIN}"}}, 200),
    ("post", "/v1/policy/dry-run", {"data": "name: x", "content_type": "application/yaml",
                                    "headers": {"Authorization": f"Bearer {ADMIN}"}}, 422),
    ("post", "/v1/policy/dry-run", {"data": "x", "content_type": "image/png",
                                    "headers": {"Authorization": f"Bearer {ADMIN}"}}, 415),
    ("get", "/v1/policy/diff", {"headers": {"Authorization": f"Bearer {READER}"}}, 400),
    ("get", "/v1/policy/diff", {"query_string": {"from": "nope"},
                                "headers": {"Authorization": f"Bearer {READER}"}}, 404),
    ("get", "/v1/search", {"query_string": {"q": "gun"},
                           "headers": {"Authorization": f"Bearer {READER}"}}, 200),
    ("get", "/v1/search", {"headers": {"Authorization": f"Bearer {READER}"}}, 400),
    ("get", "/v1/search", {"query_string": {"like": "nope"},
                           "headers": {"Authorization": f"Bearer {READER}"}}, 404),
    ("get", "/v1/search", {"query_string": {"q": "gun"}}, 401),
    ("post", "/v1/search", {**upload((b"junk", "b")),
                            "headers": {"Authorization": f"Bearer {READER}"}}, 415),
    ("get", "/healthz", {}, 200),
    ("get", "/readyz", {}, 200),
    ("get", "/metrics", {}, 200),
    ("get", "/openapi.json", {}, 200),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), CASES,
                         ids=[f"{m} {p} {s}" for m, p, _, s in CASES])
def test_real_responses_match_the_document(app: Flask, spec: OpenAPI, method: str, path: str,
                                           kwargs: dict[str, Any], status: int) -> None:
    response = getattr(app.test_client(), method)(path, **kwargs)
    assert response.status_code == status, response.get_data(as_text=True)
    spec.validate_response(described(response), WerkzeugOpenAPIResponse(response))


def test_invalid_policy_reload_matches_the_document(make_app: Callable[..., Flask],
                                                    policy_path: Path, spec: OpenAPI) -> None:
    client = make_app().test_client()
    policy_path.write_text("name: x\n")
    response = client.post(
        "/v1/policy/reload", headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 422
    spec.validate_response(described(response), WerkzeugOpenAPIResponse(response))


def test_a_response_that_breaks_the_document_is_caught(app: Flask, spec: OpenAPI) -> None:
    """The check can fail: a decision without its action does not validate."""
    from openapi_core.validation.response.exceptions import InvalidData

    response = app.test_client().post("/v1/moderate", **upload((image_bytes(RED), "a.png")))
    body = response.get_json()
    del body["results"][0]["action"]
    response.set_data(json.dumps(body))
    with pytest.raises(InvalidData):
        spec.validate_response(described(response), WerkzeugOpenAPIResponse(response))


def test_stored_decisions_match_the_document(app: Flask, spec: OpenAPI) -> None:
    client = app.test_client()
    body = client.post("/v1/moderate", **upload((image_bytes(RED), "a.png"))).get_json()
    app.extensions["decisions"][1].flush()
    headers = {"Authorization": f"Bearer {READER}"}
    for path in ("/v1/decisions", f"/v1/decisions/{body['results'][0]['decision_id']}",
                 "/v1/stats?bucket=day"):
        response = client.get(path, headers=headers)
        assert response.status_code == 200
        spec.validate_response(described(response), WerkzeugOpenAPIResponse(response))


def test_search_answers_match_the_document(app: Flask, spec: OpenAPI) -> None:
    client = app.test_client()
    body = client.post("/v1/moderate", **upload((image_bytes(RED), "a.png"),
                                                 (image_bytes(BLUE), "b.png"))).get_json()
    app.extensions["decisions"][1].flush()
    headers = {"Authorization": f"Bearer {READER}"}
    like = body["results"][0]["decision_id"]
    for query in ({"q": "gun"}, {"q": "a gun", "raw": "true", "format": "csv"},
                  {"like": like, "format": "jsonl"}, {"like": like, "action": "allow"}):
        response = client.get("/v1/search", query_string=query, headers=headers)
        assert response.status_code == 200
        if query.get("format") is None:
            assert response.get_json()["hits"]
        spec.validate_response(described(response), WerkzeugOpenAPIResponse(response))
    response = client.post("/v1/search", **upload((image_bytes(RED), "q.png")), headers=headers)
    assert response.status_code == 200 and response.get_json()["hits"]
    spec.validate_response(described(response), WerkzeugOpenAPIResponse(response))


def test_a_policy_version_matches_the_document(app: Flask, spec: OpenAPI) -> None:
    client = app.test_client()
    version = client.get("/v1/policy").get_json()["version"]
    headers = {"Authorization": f"Bearer {READER}"}
    for accept in ("application/json", "application/yaml"):
        response = client.get(f"/v1/policy/versions/{version}",
                              headers={**headers, "Accept": accept})
        assert response.status_code == 200 and response.mimetype == accept
        spec.validate_response(described(response), WerkzeugOpenAPIResponse(response))


def test_the_schemas_are_the_models() -> None:
    """Generated from the pydantic models that shape the responses: the stored decision's
    schema is the record type's view (its embeddings are stored, not shown)."""
    from decisionlog import DecisionRecord
    from service.openapi import openapi_document
    from service.schemas import MODELS

    schemas = openapi_document()["components"]["schemas"]
    assert {model.__name__ for model, _ in MODELS} <= set(schemas)
    record = schemas["DecisionRecord"]
    assert set(record["properties"]) == set(DecisionRecord.model_fields) - {"embeddings"} | {
        "flagged"}
    assert record["properties"]["categories"]["additionalProperties"] == {
        "$ref": "#/components/schemas/CategoryOutcome"}


def test_a_dry_run_with_changes_and_a_diff_match_the_document(app: Flask, spec: OpenAPI) -> None:
    client = app.test_client()
    client.post("/v1/moderate", **upload((image_bytes(RED), "a.png"), (image_bytes(BLUE), "b")))
    app.extensions["decisions"][1].flush()
    version = client.get("/v1/policy").get_json()["version"]
    edited = yaml.safe_load(yaml.safe_dump(HAND_POLICY))
    edited["categories"]["weapons"]["threshold"] = {"value": -1.0}
    response = client.post("/v1/policy/dry-run", data=yaml.safe_dump(edited),
                           content_type="application/yaml",
                           headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200 and response.get_json()["changed"]
    spec.validate_response(described(response), WerkzeugOpenAPIResponse(response))
    response = client.get(f"/v1/policy/diff?from={version}&to={version}",
                          headers={"Authorization": f"Bearer {READER}"})
    assert response.status_code == 200 and response.get_json()["changes"] == []
    spec.validate_response(described(response), WerkzeugOpenAPIResponse(response))


def test_a_moderation_job_matches_the_document(app: Flask, spec: OpenAPI) -> None:
    """A job's 202 and, once done, its result (the answer of POST /v1/moderate) as the
    document describes them: a generated client reads them."""
    import time

    client = app.test_client()
    response = client.post("/v1/moderate?async=true", **upload((image_bytes(RED), "a.png")))
    assert response.status_code == 202
    spec.validate_response(described(response), WerkzeugOpenAPIResponse(response))
    location = response.headers["Location"]
    deadline = time.monotonic() + 30
    while True:
        response = client.get(location)
        assert response.status_code == 200
        if response.get_json()["state"] == "done" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert response.get_json()["state"] == "done"
    spec.validate_response(described(response), WerkzeugOpenAPIResponse(response))
    admin = client.get(f"/v1/jobs/{response.get_json()['id']}",
                       headers={"Authorization": f"Bearer {ADMIN}"})
    spec.validate_response(described(admin), WerkzeugOpenAPIResponse(admin))
