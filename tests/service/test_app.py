"""Every endpoint and every error, through Flask's test client with a fake moderator."""

from __future__ import annotations

import base64
import copy
import io
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from moderation.images import ImageLimits
from service.app import create_app
from tests.fakes import (
    BLUE,
    GREEN,
    HAND_POLICY,
    PURPLE,
    RED,
    FakeEncoder,
    animation_bytes,
    image_bytes,
)
from tests.service.conftest import ADMIN, READER


def files(*items: tuple[bytes, str]) -> dict[str, Any]:
    return {"image": [(io.BytesIO(data), name) for data, name in items]}


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def reader() -> dict[str, str]:
    return {"Authorization": f"Bearer {READER}"}


def test_moderate_multipart(client: FlaskClient) -> None:
    r = client.post("/v1/moderate", data=files((image_bytes(RED), "r.png"),
                                               (image_bytes(GREEN, "JPEG"), "g.jpg")))
    assert r.status_code == 200
    body = r.get_json()
    assert body["policy"]["name"] == "hand" and len(body["policy"]["version"]) == 12
    assert body["model"] == "fake/hand-made" and body["profile"] == "default"
    red, green = body["results"]
    assert red["id"] == "r.png" and red["action"] == "block" and red["flagged"] is True
    assert list(red["categories"]) == ["weapons", "alcohol"]  # policy order
    weapons = red["categories"]["weapons"]
    assert weapons["threshold"] == 0.8 and weapons["action"] == "block"
    assert weapons["top_terms"][0]["text"] == "rifle"
    assert red["processing_ms"] > 0 and red["frame"] == 0
    assert green["action"] == "flag"


def test_moderate_json_with_ids_and_profile(make_app: Callable[..., Flask],
                                            policy_path: Path) -> None:
    data = dict(HAND_POLICY, profiles={"kids": {"weapons": {"value": 0.5}}})
    policy_path.write_text(yaml.safe_dump(data, sort_keys=False))
    client = make_app().test_client()
    payload = {
        "images": [{"id": "u1", "data": base64.b64encode(image_bytes(PURPLE)).decode()}],
        "profile": "kids",
    }
    r = client.post("/v1/moderate", json=payload)
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["profile"] == "kids"
    assert body["results"][0]["id"] == "u1" and body["results"][0]["action"] == "block"
    r = client.post("/v1/moderate", json=dict(payload, profile=None))
    assert r.get_json()["results"][0]["action"] == "review"


def test_one_bad_image_does_not_fail_the_batch(client: FlaskClient) -> None:
    r = client.post("/v1/moderate", data=files((image_bytes(RED), "ok.png"),
                                               (b"%PDF-1.4", "doc.pdf"),
                                               (image_bytes(BLUE, "JPEG")[:40], "cut.jpg")))
    assert r.status_code == 200
    ok, pdf, cut = r.get_json()["results"]
    assert ok["action"] == "block"
    assert len(pdf.pop("decision_id")) == 32  # failures are recorded too
    assert pdf == {"id": "doc.pdf", "error": {
        "code": "unsupported_format",
        "message": "not an image in a supported format; accepted: JPEG, PNG, GIF, WEBP, BMP, "
                   "TIFF"}}
    assert cut["error"]["code"] == "corrupt_image"


def test_animation_reports_its_worst_frame(client: FlaskClient) -> None:
    r = client.post("/v1/moderate",
                    data=files((animation_bytes(GREEN, BLUE, RED, duration=50), "a.gif")))
    result = r.get_json()["results"][0]
    assert result["action"] == "block" and result["frame"] == 2 and result["frames_scored"] == 3


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"just text", 415, "unsupported_format"),
        (image_bytes(RED, "JPEG")[:50], 400, "corrupt_image"),
        (b"", 400, "empty"),
    ],
)
def test_a_single_bad_image_is_an_http_error(client: FlaskClient, data: bytes, status: int,
                                             code: str) -> None:
    r = client.post("/v1/moderate", data=files((data, "x")))
    assert r.status_code == status
    assert r.get_json()["error"]["code"] == code


def test_pixel_limit_and_bombs(make_app: Callable[..., Flask], fake_encoder: FakeEncoder,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from moderation import Moderator
    from moderation.policy import parse_policy

    policy = parse_policy(yaml.safe_dump(HAND_POLICY))
    moderator = Moderator(policy, fake_encoder, limits=ImageLimits(max_pixels=100))
    client = create_app({"ADMIN_TOKEN": ADMIN}, moderator=moderator).test_client()
    r = client.post("/v1/moderate", data=files((image_bytes(RED, size=(20, 20)), "big.png")))
    assert r.status_code == 413 and r.get_json()["error"]["code"] == "too_many_pixels"
    assert "20x20 = 400 pixels; the limit is 100" in r.get_json()["error"]["message"]

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    client = create_app({"ADMIN_TOKEN": ADMIN}, moderator=Moderator(
        parse_policy(yaml.safe_dump(HAND_POLICY)), fake_encoder)).test_client()
    r = client.post("/v1/moderate", data=files((image_bytes(RED, size=(20, 20)), "bomb.png")))
    assert r.status_code == 413 and "decompression bomb" in r.get_json()["error"]["message"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "message"),
    [
        ({"data": "plain", "content_type": "text/plain"}, 415, "unsupported_media_type",
         "send multipart/form-data"),
        ({"data": b"{not json", "content_type": "application/json"}, 400, "invalid_json",
         "not valid JSON"),
        ({"data": {"other": (io.BytesIO(b"x"), "x")}}, 400, "missing_field",
         "no image in the request"),
        ({"json": {"images": [{"data": "aGk="}] * 5}}, 413, "too_many_images", "at most 4"),
        ({"json": {"images": [{"data": "aGk="}], "profile": "nope"}}, 400, "unknown_profile",
         "unknown calibration profile 'nope'"),
        ({"data": b"x" * 3000, "content_type": "application/json"}, 413, "request_too_large",
         "over 2,000 bytes"),
    ],
)
def test_malformed_requests(make_app: Callable[..., Flask], kwargs: dict[str, Any], status: int,
                            code: str, message: str) -> None:
    client = make_app(MAX_IMAGES=4, MAX_CONTENT_LENGTH=2000).test_client()
    r = client.post("/v1/moderate", **kwargs)
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.get_json()["error"]["code"] == code
    assert message in r.get_json()["error"]["message"]


def test_hostile_request_bodies_get_the_documented_error(make_app: Callable[..., Flask]) -> None:
    """Deep JSON, a form with too many parts or a huge text field, bad ids: each a 4xx in the
    JSON shape naming what was wrong."""
    app = make_app()
    client = app.test_client()
    png = image_bytes(RED)

    def error(r: Any) -> tuple[int, str, str]:
        body = r.get_json()
        return r.status_code, body["error"]["code"], body["error"]["message"]

    status, code, message = error(client.post(
        "/v1/moderate", data=b"[" * 100_000 + b"]" * 100_000, content_type="application/json"))
    assert (status, code) == (400, "invalid_json") and "nested too deeply" in message

    fields = {f"f{i}": "x" for i in range(1500)}
    status, code, message = error(client.post("/v1/moderate", data={
        **files((png, "r.png")), **fields}))
    assert (status, code) == (413, "form_too_large")
    assert "more than 100 parts (MODERATION_MAX_FORM_PARTS)" in message

    status, code, message = error(client.post("/v1/moderate", data={
        **files((png, "r.png")), "id": "x" * (1 << 20)}))
    assert (status, code) == (413, "form_too_large")
    assert "a text field over 262,144 bytes (MODERATION_MAX_FORM_MEMORY_SIZE)" in message

    # the form-field limit is not a file-size limit (werkzeug also applies it to its buffer)
    big = png + b"\0" * 3_000_000  # a valid PNG with trailing bytes, 3 MB
    r = client.post("/v1/moderate", data=files((big, "big.png")))
    assert r.status_code == 200, r.get_data(as_text=True)

    status, code, message = error(client.post("/v1/moderate", data={
        **files((png, "r.png")), "id": "x" * 10_000}))
    assert (status, code) == (400, "invalid_id") and "at most 256 are accepted" in message

    for bad in ("x\ud800y", "x" * (1 << 20)):
        status, code, message = error(client.post("/v1/moderate", json={
            "images": [{"data": base64.b64encode(png).decode(), "id": bad}]}))
        assert (status, code) == (400, "invalid_id") and message.startswith("images[0].id ")

    status, code, message = error(client.post("/v1/moderate", json={
        "images": [{"data": "data:image/png;base64," + base64.b64encode(png).decode()}]}))
    assert (status, code) == (400, "invalid_base64") and "is a data: URL" in message

    store, recorder = app.extensions["decisions"]
    recorder.flush()  # refused requests record nothing; a bad image is an error on record
    records = store.query()[0]
    assert sorted((r.action, r.client_id, r.error_code) for r in records) == [
        ("block", "big.png", None), ("error", None, "invalid_base64")]


def test_unknown_route_and_method_are_json(client: FlaskClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"
    r = client.get("/v1/moderate")
    assert r.status_code == 405 and r.get_json()["error"]["code"] == "method_not_allowed"


def test_an_internal_error_is_json_without_a_traceback(app: Flask,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    holder = app.extensions["moderation"]
    monkeypatch.setattr(holder.current().encoder, "encode_images",
                        lambda images: 1 / 0)
    r = app.test_client().post("/v1/moderate", data=files((image_bytes(RED), "r.png")))
    assert r.status_code == 500
    assert r.get_json() == {"error": {"code": "internal",
                                      "message": "internal error; the server log has the details"}}


def test_api_keys(make_app: Callable[..., Flask]) -> None:
    client = make_app(API_KEYS="k1, k2").test_client()
    upload = files((image_bytes(RED), "r.png"))
    r = client.post("/v1/moderate", data=upload)
    assert r.status_code == 401 and r.get_json()["error"]["code"] == "unauthorized"
    r = client.post("/v1/moderate", data=files((image_bytes(RED), "r.png")),
                    headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = client.post("/v1/moderate", data=files((image_bytes(RED), "r.png")),
                    headers={"Authorization": "Bearer k2"})
    assert r.status_code == 200
    r = client.get("/v1/policy", headers={"X-API-Key": "k1"})
    assert r.status_code == 200
    assert client.get("/healthz").status_code == 200  # probes stay open


def test_policy_endpoint_shows_thresholds_and_provenance(client: FlaskClient) -> None:
    body = client.get("/v1/policy").get_json()
    assert body["name"] == "hand" and body["profiles"] == ["default"]
    weapons = body["categories"]["weapons"]
    assert weapons["thresholds"]["default"] == {
        "value": 0.8, "review_from": 0.6,
        "provenance": {"source": "uncalibrated", "note": None},
    }
    assert weapons["exceptions"] == ["toy gun"]
    assert body["model"]["identity"] == "fake/hand-made"


def test_admin_routes_need_a_configured_token(make_app: Callable[..., Flask]) -> None:
    client = make_app(ADMIN_TOKEN=None).test_client()
    r = client.post("/v1/policy/reload", headers=admin())
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "admin_disabled"
    assert "MODERATION_ADMIN_TOKEN" in r.get_json()["error"]["message"]


def test_reload_needs_the_admin_token(client: FlaskClient) -> None:
    assert client.post("/v1/policy/reload").status_code == 401
    r = client.post("/v1/policy/reload", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


def test_reload_valid_then_invalid(client: FlaskClient, policy_path: Path) -> None:
    before = client.get("/v1/policy").get_json()["version"]
    data = dict(HAND_POLICY)
    data["categories"] = dict(HAND_POLICY["categories"])
    data["categories"]["weapons"] = dict(HAND_POLICY["categories"]["weapons"],
                                         threshold={"value": 0.99})
    policy_path.write_text(yaml.safe_dump(data, sort_keys=False))
    r = client.post("/v1/policy/reload", headers=admin())
    assert r.status_code == 200
    new = r.get_json()
    assert new["previous_version"] == before and new["changed"] and new["version"] != before
    r = client.post("/v1/moderate", data=files((image_bytes(RED), "r.png")))
    assert r.get_json()["policy"]["version"] == new["version"]
    assert r.get_json()["results"][0]["action"] == "allow"  # 0.95 < 0.99 now

    policy_path.write_text("name: broken\ncategories: {}\n")
    r = client.post("/v1/policy/reload", headers=admin())
    assert r.status_code == 422
    error = r.get_json()["error"]
    assert error["code"] == "invalid_policy" and "previous policy keeps serving" in error["message"]
    assert "policy.yaml: model: missing key" in error["faults"]
    assert client.get("/v1/policy").get_json()["version"] == new["version"]


def test_a_request_in_flight_finishes_on_its_policy(app: Flask, policy_path: Path) -> None:
    holder = app.extensions["moderation"]
    old = holder.current()
    entered, release = threading.Event(), threading.Event()
    real = old.encoder.encode_images

    def slow(images):  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(5)
        return real(images)

    old.encoder.encode_images = slow
    responses: list[Any] = []
    worker = threading.Thread(target=lambda: responses.append(app.test_client().post(
        "/v1/moderate", data=files((image_bytes(RED), "r.png")))))
    worker.start()
    assert entered.wait(5)
    data = dict(HAND_POLICY, templates=["a {}"])
    policy_path.write_text(yaml.safe_dump(data, sort_keys=False))
    reloaded = app.test_client().post("/v1/policy/reload", headers=admin()).get_json()
    release.set()
    worker.join(5)
    old.encoder.encode_images = real
    assert responses[0].get_json()["policy"] == {"name": "hand", "version": old.policy.version}
    assert reloaded["version"] != old.policy.version


def test_reload_reaches_every_worker(fake_encoder: FakeEncoder, policy_path: Path,
                                     tmp_path: Path) -> None:
    """Two apps sharing a decision log stand for two gunicorn workers."""
    from moderation import Moderator
    from moderation.policy import parse_policy

    def worker() -> FlaskClient:
        moderator = Moderator(parse_policy(policy_path.read_text()), fake_encoder)
        return create_app({"POLICY": str(policy_path), "ADMIN_TOKEN": ADMIN,
                           "STATE_DIR": str(tmp_path)}, moderator=moderator).test_client()

    a, b = worker(), worker()
    policy_path.write_text(yaml.safe_dump(dict(HAND_POLICY, name="next"), sort_keys=False))
    version = a.post("/v1/policy/reload", headers=admin()).get_json()["version"]
    assert b.get("/v1/policy").get_json()["version"] == version
    r = b.post("/v1/moderate", data=files((image_bytes(RED), "r.png")))
    assert r.get_json()["policy"] == {"name": "next", "version": version}


def test_a_worker_started_after_a_reload_serves_the_reloaded_policy(
    fake_encoder: FakeEncoder, policy_path: Path, tmp_path: Path
) -> None:
    """A worker still loading its model during a reload (or one gunicorn restarts later, after
    a crash) must serve the active policy, not whatever the policy file says by then."""
    from moderation import Moderator
    from moderation.policy import parse_policy

    def worker() -> FlaskClient:
        moderator = Moderator(parse_policy(policy_path.read_text()), fake_encoder)
        return create_app({"POLICY": str(policy_path), "ADMIN_TOKEN": ADMIN,
                           "STATE_DIR": str(tmp_path), "RECORD_DECISIONS": False},
                          moderator=moderator).test_client()

    first = worker()
    policy_path.write_text(yaml.safe_dump(dict(HAND_POLICY, name="reloaded"), sort_keys=False))
    version = first.post("/v1/policy/reload", headers=admin()).get_json()["version"]
    policy_path.write_text(yaml.safe_dump(dict(HAND_POLICY, name="edited-not-reloaded"),
                                          sort_keys=False))
    late = worker()  # built from the edited file, as a restarted worker would be
    body = late.post("/v1/moderate", data=files((image_bytes(RED), "r.png"))).get_json()
    assert body["policy"] == {"name": "reloaded", "version": version}


def test_once_reload_answers_every_worker_decides_with_the_new_policy(
    policy_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: requests sent at once to idle workers right after the reload answered were
    still decided with the old version (3 of 8), and a follower re-encoded on a request
    thread. Now: a request that starts after the answer waits for its worker's switch, and
    the switch only reads the cache the reloading worker filled."""
    from moderation import Moderator
    from moderation.policy import parse_policy
    from moderation.prompts import EmbeddingCache
    from tests.fakes import HAND_COLOURS, HAND_TEXTS, unit

    texts = dict(HAND_TEXTS, **{"a pistol": unit(1, 1, 0), "the pistol": unit(1, 1, 0)})
    encoders = [FakeEncoder(dict(texts), dict(HAND_COLOURS)) for _ in range(2)]

    def worker(encoder: FakeEncoder) -> Flask:
        cache = EmbeddingCache(tmp_path / "shared-cache")
        moderator = Moderator(parse_policy(policy_path.read_text()), encoder, cache)
        return create_app({"POLICY": str(policy_path), "ADMIN_TOKEN": ADMIN,
                           "STATE_DIR": str(tmp_path), "RECORD_DECISIONS": False},
                          moderator=moderator)

    a, b = (worker(e) for e in encoders)
    slow_with_policy = Moderator.with_policy

    def slow(self: Moderator, policy: Any) -> Moderator:
        time.sleep(0.3)  # a follower that is slow to switch
        return slow_with_policy(self, policy)

    monkeypatch.setattr(Moderator, "with_policy", slow)
    edited = copy.deepcopy(HAND_POLICY)
    edited["categories"]["weapons"]["terms"].append("pistol")
    policy_path.write_text(yaml.safe_dump(edited, sort_keys=False))
    for encoder in encoders:
        encoder.encoded_texts.clear()
    version = a.test_client().post("/v1/policy/reload", headers=admin()).get_json()["version"]

    seen: list[str] = []

    def request() -> None:
        r = b.test_client().post("/v1/moderate", data=files((image_bytes(RED), "r.png")))
        seen.append(r.get_json()["policy"]["version"])

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [version] * 8
    assert encoders[0].encoded_texts == ["a pistol", "the pistol"]  # the reloading worker
    assert encoders[1].encoded_texts == []  # the follower only read the shared cache


def test_health_ready_openapi_metrics(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz").get_json()
    assert ready["status"] == "ready" and ready["model"] == "fake/hand-made"
    assert client.get("/openapi.json").get_json()["openapi"].startswith("3.")
    client.post("/v1/moderate", data=files((image_bytes(RED), "r.png")))
    client.post("/v1/moderate", data=files((b"junk", "x")))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'moderation_images_total{action="block"} 1.0' in text
    assert 'moderation_category_flags_total{action="block",category="weapons"} 1.0' in text
    assert 'moderation_errors_total{code="unsupported_format"} 1.0' in text
    assert 'moderation_http_request_seconds_count{endpoint="/v1/moderate"} 2.0' in text


def test_tokens_and_image_bytes_are_never_logged(make_app: Callable[..., Flask],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    client = make_app(API_KEYS="topsecretkey").test_client()
    with caplog.at_level("DEBUG"):
        client.post("/v1/moderate", data=files((b"SECRETPIXELS", "x")),
                    headers={"Authorization": "Bearer topsecretkey"})
        client.post("/v1/policy/reload", headers=admin())
    assert "topsecretkey" not in caplog.text and ADMIN not in caplog.text
    assert "SECRETPIXELS" not in caplog.text


def test_policy_versions_history_and_text(client: FlaskClient, policy_path: Path) -> None:
    first = client.get("/v1/policy").get_json()["version"]
    original = policy_path.read_bytes()
    edited = copy.deepcopy(HAND_POLICY)
    edited["categories"]["weapons"]["threshold"] = {"value": 0.42}
    text = "# windows line ends survive\r\n" + yaml.safe_dump(edited, sort_keys=False)
    policy_path.write_bytes(text.encode())
    second = client.post("/v1/policy/reload", headers=admin()).get_json()["version"]
    policy_path.write_bytes(original)  # back to the first version: activated again
    assert client.post("/v1/policy/reload", headers=admin()).get_json()["version"] == first

    assert client.get("/v1/policy/versions").status_code == 401
    body = client.get("/v1/policy/versions", headers=reader()).get_json()
    assert [(v["version"], v["reason"]) for v in body["versions"]] == [
        (first, "reload"), (second, "reload"), (first, "start")]
    assert body["versions"][0]["activated_at"] >= body["versions"][1]["activated_at"]
    got = client.get(f"/v1/policy/versions/{second}", headers=reader())
    assert got.get_json()["text"] == text and got.get_json()["name"] == "hand"
    raw = client.get(f"/v1/policy/versions/{second}",
                     headers={**reader(), "Accept": "application/yaml"})
    assert raw.data == text.encode() and raw.mimetype == "application/yaml"
    missing = client.get("/v1/policy/versions/000000000000", headers=reader())
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"
    assert client.get("/v1/policy/versions?limit=1", headers=reader()).get_json()[
        "versions"][0]["version"] == first
