"""/v1/search through the app, with the hand-made encoder: uploads are moderated (and so
recorded), then found again by text, by a stored decision and by an uploaded image."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.fakes import BLUE, GREEN, GREY, PURPLE, RED, animation_bytes, image_bytes
from tests.service.conftest import ADMIN, READER, moderate_images

READER_H = {"Authorization": f"Bearer {READER}"}

IMAGES = {
    "rifle": image_bytes(RED), "rifle-copy": image_bytes(RED), "toy": image_bytes(BLUE),
    "between": image_bytes(PURPLE), "beer": image_bytes(GREEN), "nothing": image_bytes(GREY),
    "clip": animation_bytes(GREY, GREEN, GREY),
}


@pytest.fixture
def logged(client: FlaskClient, app: Flask) -> dict[str, dict[str, Any]]:
    """Every image moderated once: its result, by client id."""
    return moderate_images(client, app, IMAGES)


def get(client: FlaskClient, **query: Any) -> dict[str, Any]:
    r = client.get("/v1/search", query_string=query, headers=READER_H)
    assert r.status_code == 200, r.get_data(as_text=True)
    body: dict[str, Any] = r.get_json()
    return body


def clients(body: dict[str, Any]) -> list[str]:
    return [h["client_id"] for h in body["hits"]]


def test_like_a_decision_finds_its_byte_identical_reupload_first(
        client: FlaskClient, logged: dict[str, dict[str, Any]]) -> None:
    body = get(client, like=logged["rifle"]["decision_id"])
    assert body["query"] == {"kind": "like", "like": logged["rifle"]["decision_id"], "frames": 1,
                             "q": None, "raw": None, "prompts": None}
    first = body["hits"][0]
    assert first["client_id"] == "rifle-copy" and first["similarity"] >= 0.999
    assert first["decision_id"] == logged["rifle-copy"]["decision_id"]
    assert first["action"] == "block" and first["triggered"] == ["weapons"]
    assert first["top_terms"] == {"weapons": [t["text"] for t in logged["rifle-copy"][
        "categories"]["weapons"]["top_terms"]]}
    assert "rifle" not in clients(body)  # the query itself is left out
    sims = [h["similarity"] for h in body["hits"]]
    assert sims == sorted(sims, reverse=True)


def test_an_uploaded_image_finds_its_duplicates_and_is_not_recorded(
        client: FlaskClient, app: Flask, logged: dict[str, dict[str, Any]]) -> None:
    store = app.extensions["decisions"][0]
    before = store.count()
    r = client.post("/v1/search", data={"image": (io.BytesIO(image_bytes(RED)), "q.png")},
                    content_type="multipart/form-data", headers=READER_H)
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert body["query"]["kind"] == "image" and body["query"]["frames"] == 1
    assert set(clients(body)[:2]) == {"rifle", "rifle-copy"}
    assert [h["similarity"] for h in body["hits"][:2]] == pytest.approx([1, 1], abs=1e-3)
    app.extensions["decisions"][1].flush()
    assert store.count() == before  # a search records nothing


def test_text_is_an_ensemble_of_the_policy_templates_or_raw(
        client: FlaskClient, logged: dict[str, dict[str, Any]]) -> None:
    # "a gun" is (1,0,0) and "the gun" (0,1,0): the ensemble sits between rifle and beer
    ensemble = get(client, q="gun", limit=50)
    assert ensemble["query"]["prompts"] == 2 and ensemble["index"] == "exact"
    top = {h["client_id"]: h["similarity"] for h in ensemble["hits"]}
    assert top["rifle"] == pytest.approx(0.7071, abs=1e-3)
    assert top["beer"] == pytest.approx(0.7071, abs=1e-3)
    raw = get(client, q="a gun", raw="true")  # (1,0,0): the rifles alone at 1
    assert raw["query"]["prompts"] == 1
    assert set(clients(raw)[:2]) == {"rifle", "rifle-copy"}
    assert raw["hits"][0]["similarity"] == pytest.approx(1, abs=1e-3)
    assert raw["hits"][2]["similarity"] < 0.9


def test_an_animation_is_found_by_its_matching_frame(
        client: FlaskClient, logged: dict[str, dict[str, Any]]) -> None:
    body = get(client, q="a beer", raw="true")
    best = {h["client_id"]: h for h in body["hits"][:2]}
    assert set(best) == {"beer", "clip"}
    assert best["clip"]["frame"] == 1 and best["clip"]["similarity"] == pytest.approx(1, abs=1e-3)
    assert clients(body).count("clip") == 1  # one hit per decision


def test_filters_pages_and_exports(client: FlaskClient,
                                   logged: dict[str, dict[str, Any]]) -> None:
    everything = clients(get(client, q="a gun", raw="true", limit=50))
    assert sorted(everything) == sorted(IMAGES)
    assert set(clients(get(client, q="a gun", raw="true", action="block"))) == {
        "rifle", "rifle-copy"}
    assert set(clients(get(client, q="a gun", raw="true", category="alcohol"))) == {
        "beer", "clip"}
    assert set(clients(get(client, q="a gun", raw="true", flagged="true"))) == {
        "rifle", "rifle-copy", "beer", "clip", "between"}
    assert clients(get(client, q="a gun", raw="true", client_id="toy")) == ["toy"]
    version = client.get(f"/v1/decisions/{logged['rifle']['decision_id']}",
                         headers=READER_H).get_json()["policy"]["version"]
    assert len(get(client, q="a gun", raw="true", policy_version=version)["hits"]) == 7
    assert get(client, q="a gun", raw="true", policy_version="v-none")["hits"] == []
    assert get(client, q="a gun", raw="true", until="2000-01-01T00:00:00Z")["hits"] == []
    assert len(get(client, q="a gun", raw="true", since="1h")["hits"]) == 7
    assert clients(get(client, q="a gun", raw="true", min_similarity=0.99)) == everything[:2]
    pages, offset = [], 0
    while offset is not None:
        body = get(client, q="a gun", raw="true", limit=3, offset=offset)
        pages += clients(body)
        offset = body["next_offset"]
    assert pages == everything
    r = client.get("/v1/search", query_string={"q": "a gun", "raw": "true", "format": "csv"},
                   headers=READER_H)
    assert r.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert [row["client_id"] for row in rows] == everything
    assert rows[0]["decision_id"] and float(rows[0]["similarity"]) == pytest.approx(1, abs=1e-3)
    r = client.get("/v1/search", query_string={"q": "a gun", "raw": "true", "format": "jsonl"},
                   headers=READER_H)
    lines = [json.loads(line) for line in r.get_data(as_text=True).splitlines()]
    assert [h["client_id"] for h in lines] == everything


@pytest.mark.parametrize(("query", "status", "code"), [
    ({}, 400, "missing_field"),
    ({"q": "a gun", "like": "x"}, 400, "invalid_field"),
    ({"q": "   "}, 400, "invalid_field"),
    ({"q": "x" * 1001}, 400, "invalid_field"),
    ({"q": "a gun", "limit": "0"}, 400, "invalid_field"),
    ({"q": "a gun", "limit": "501"}, 400, "invalid_field"),
    ({"q": "a gun", "limit": "ten"}, 400, "invalid_field"),
    ({"q": "a gun", "offset": "-1"}, 400, "invalid_field"),
    ({"q": "a gun", "offset": "9990", "limit": "20"}, 400, "invalid_field"),
    ({"q": "a gun", "action": "delete"}, 400, "invalid_field"),
    ({"q": "a gun", "flagged": "maybe"}, 400, "invalid_field"),
    ({"q": "a gun", "raw": "yes please"}, 400, "invalid_field"),
    ({"q": "a gun", "min_similarity": "2"}, 400, "invalid_field"),
    ({"q": "a gun", "min_similarity": "nan"}, 400, "invalid_field"),
    ({"q": "a gun", "since": "last tuesday"}, 400, "invalid_field"),
    ({"q": "a gun", "format": "xml"}, 400, "invalid_field"),
    ({"q": "a gun", "limt": "5"}, 400, "invalid_field"),
    ({"q": "a\x00gun"}, 400, "invalid_field"),
    ({"like": "no-such-decision"}, 404, "not_found"),
])
def test_bad_parameters_are_clean_errors(client: FlaskClient, query: dict[str, str],
                                         status: int, code: str) -> None:
    r = client.get("/v1/search", query_string=query, headers=READER_H)
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.get_json()["error"]["code"] == code
    assert r.get_json()["error"]["message"]


def test_like_a_decision_without_embedding_is_refused(client: FlaskClient, app: Flask) -> None:
    r = client.post("/v1/moderate", data={"image": (io.BytesIO(b"not an image"), "x.png")},
                    content_type="multipart/form-data")
    assert r.status_code == 415
    app.extensions["decisions"][1].flush()
    failed = app.extensions["decisions"][0].query(limit=1)[0][0]
    assert failed.action == "error"
    r = client.get("/v1/search", query_string={"like": failed.id}, headers=READER_H)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "no_embedding"


@pytest.mark.parametrize(("send", "status", "code"), [
    ({"data": {}, "content_type": "multipart/form-data"}, 400, "missing_field"),
    ({"data": {"image": [(io.BytesIO(image_bytes(RED)), "a.png"),
                         (io.BytesIO(image_bytes(RED)), "b.png")]},
      "content_type": "multipart/form-data"}, 400, "invalid_field"),
    ({"data": {"image": (io.BytesIO(b""), "a.png")}, "content_type": "multipart/form-data"},
     400, "empty"),
    ({"data": {"image": (io.BytesIO(b"GIF89a broken"), "a.gif")},
      "content_type": "multipart/form-data"}, 400, None),
    ({"data": {"image": (io.BytesIO(b"plain text"), "a.txt")},
      "content_type": "multipart/form-data"}, 415, "unsupported_format"),
    ({"json": {"image": "x"}}, 415, "unsupported_media_type"),
])
def test_bad_uploads_are_clean_errors(client: FlaskClient, send: dict[str, Any], status: int,
                                      code: str | None) -> None:
    r = client.post("/v1/search", headers=READER_H, **send)
    assert r.status_code == status, r.get_data(as_text=True)
    body = r.get_json()["error"]
    assert body["message"] and (code is None or body["code"] == code)


def test_an_upload_with_a_text_query_is_refused(client: FlaskClient) -> None:
    r = client.post("/v1/search", query_string={"q": "a gun"}, headers=READER_H,
                    data={"image": (io.BytesIO(image_bytes(RED)), "a.png")},
                    content_type="multipart/form-data")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_field"


def test_the_reader_token_is_required(client: FlaskClient, make_app: Any,
                                      logged: dict[str, dict[str, Any]]) -> None:
    assert client.get("/v1/search", query_string={"q": "a gun"}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.get("/v1/search", query_string={"q": "a gun"}, headers=wrong
                      ).status_code == 401
    assert client.post("/v1/search", headers=wrong).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert client.get("/v1/search", query_string={"q": "gun"}, headers=admin
                      ).status_code == 200
    closed = make_app(READER_TOKEN=None, ADMIN_TOKEN=None).test_client()
    r = closed.get("/v1/search", query_string={"q": "a gun"}, headers=READER_H)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "reader_disabled"


def test_search_texts_never_grow_the_shared_cache(fake_encoder: Any, policy_path: Any,
                                                  tmp_path: Any) -> None:
    """Before: each new search text wrote its prompts' vectors to the log's table and the
    cache folder, without bound. Now they stay in a bounded in-memory cache of the worker."""
    import numpy as np

    from decisionlog import SharedEmbeddingCache, migrate
    from moderation import Moderator
    from moderation.policy import parse_policy
    from service.app import create_app
    from service.search import TEXT_QUERIES

    url = f"sqlite:///{policy_path.parent / 'decisions.sqlite3'}"
    migrate(url)
    cache = SharedEmbeddingCache.with_folder(url, tmp_path / "cache")
    app = create_app({"POLICY": str(policy_path), "READER_TOKEN": READER, "DATABASE_URL": url},
                     moderator=Moderator(parse_policy(policy_path.read_text()), fake_encoder,
                                         cache))
    client = app.test_client()
    texts = [f"thing {i}" for i in range(5)]
    for i, text in enumerate(texts):
        fake_encoder.texts[text] = np.eye(3, dtype=np.float32)[i % 3]
    files = set((tmp_path / "cache").rglob("*.npy"))
    in_log = SharedEmbeddingCache(url)  # the log's table alone
    TEXT_QUERIES._vectors.clear()
    fake_encoder.encoded_texts.clear()
    for text in texts * 2:
        assert get(client, q=text, raw="true")["query"]["q"] == text
    assert fake_encoder.encoded_texts == texts  # the second round: from memory
    assert in_log.get(fake_encoder.identity, texts) == {}
    assert set((tmp_path / "cache").rglob("*.npy")) == files
    size, TEXT_QUERIES.size = TEXT_QUERIES.size, 2
    fake_encoder.texts["one more"] = np.eye(3, dtype=np.float32)[0]
    try:
        get(client, q="one more", raw="true")
        assert len(TEXT_QUERIES._vectors) == 2  # bounded
    finally:
        TEXT_QUERIES.size = size
