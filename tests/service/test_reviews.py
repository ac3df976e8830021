"""The review queue over HTTP: appeals, claims, verdicts, the verdict list, the queue's
counts, /v1/quality, the webhook (signed, retried, delivered), and the OpenAPI document."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from flask import Flask
from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIResponse

from tests.fakes import GREEN, GREY, PURPLE, RED, image_bytes
from tests.service.conftest import READER, described, free_port, moderate_images

ANN, BOB = "ann-token", "bob-token"
REVIEWERS = f"ann:{ANN},bob:{BOB}"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def review_app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(REVIEWERS=REVIEWERS, AUDIT_RATE="0",
                    IMAGE_URL_TEMPLATE="https://img.internal/{client_id}")


def verdict(client: Any, item_id: int, token: str, violations: list[str],
            note: str | None = None) -> Any:
    return client.post(f"/v1/reviews/{item_id}", json={"violations": violations, "note": note},
                       headers=auth(token))


def test_claim_decide_and_the_queue_runs_dry(review_app: Flask) -> None:
    client = review_app.test_client()
    results = moderate_images(client, review_app, {
        "between": image_bytes(PURPLE), "rifle": image_bytes(RED), "beer": image_bytes(GREEN)})
    assert results["between"]["action"] == "review"
    claimed = client.post("/v1/reviews/claim", headers=auth(ANN))
    assert claimed.status_code == 200
    item = claimed.get_json()
    assert (item["reason"], item["decision_id"], item["claimed_by"]) == (
        "review", results["between"]["decision_id"], "ann")
    assert item["decision"]["categories"]["weapons"]["top_terms"]  # what drove it
    assert item["image_url"] == "https://img.internal/between"
    assert [c["id"] for c in item["categories"]] == ["weapons", "alcohol"]
    assert client.post("/v1/reviews/claim", headers=auth(BOB)).status_code == 204
    answer = verdict(client, item["item_id"], ANN, ["weapons"], "a real rifle")
    assert answer.status_code == 201, answer.get_json()
    body = answer.get_json()
    assert (body["action"], body["original_action"], body["reviewer"], body["delivery"]) == (
        "block", "review", "ann", None)
    assert client.post("/v1/reviews/claim", headers=auth(ANN)).status_code == 204
    listed = client.get("/v1/reviews", headers=auth(READER)).get_json()
    assert [v["verdict_id"] for v in listed["verdicts"]] == [body["verdict_id"]]
    assert client.get("/v1/reviews?reviewer=bob", headers=auth(BOB)).get_json()["verdicts"] == []
    counts = client.get("/v1/reviews/queue", headers=auth(BOB)).get_json()
    assert counts["queue"]["review"] == {"waiting": 0, "claimed": 0, "decided": 1}


@pytest.mark.parametrize(("body", "kind", "status", "code"), [
    ({"violations": ["drugs"]}, "json", 400, "unknown_category"),
    ({"note": "no violations field"}, "json", 400, "missing_field"),
    ({"violations": "weapons"}, "json", 400, "invalid_field"),
    ({"violations": [], "extra": 1}, "json", 400, "invalid_field"),
    ({"violations": [], "note": "x" * 3000}, "json", 400, "invalid_field"),
    ("{not json", "raw", 400, "invalid_json"),
    ("violations=weapons", "form", 415, "unsupported_media_type"),
])
def test_a_bad_verdict_gets_a_clean_error(review_app: Flask, body: Any, kind: str,
                                          status: int, code: str) -> None:
    client = review_app.test_client()
    moderate_images(client, review_app, {"between": image_bytes(PURPLE)})
    item = client.post("/v1/reviews/claim", headers=auth(ANN)).get_json()
    path = f"/v1/reviews/{item['item_id']}"
    if kind == "json":
        answer = client.post(path, json=body, headers=auth(ANN))
    elif kind == "raw":
        answer = client.post(path, data=body, content_type="application/json",
                             headers=auth(ANN))
    else:
        answer = client.post(path, data=body,
                             content_type="application/x-www-form-urlencoded", headers=auth(ANN))
    assert answer.status_code == status
    assert answer.get_json()["error"]["code"] == code
    assert verdict(client, item["item_id"], ANN, []).status_code == 201  # still decidable


def test_verdicts_on_unclaimed_others_and_decided_items_are_refused(review_app: Flask) -> None:
    client = review_app.test_client()
    moderate_images(client, review_app, {"a": image_bytes(PURPLE), "b": image_bytes(PURPLE)})
    counts = client.get("/v1/reviews/queue", headers=auth(ANN)).get_json()
    assert counts["queue"]["review"]["waiting"] == 2
    item = client.post("/v1/reviews/claim", headers=auth(ANN)).get_json()
    refused = verdict(client, item["item_id"] + 1, ANN, [])  # the other one: nobody holds it
    assert (refused.status_code, refused.get_json()["error"]["code"]) == (409, "not_claimed")
    refused = verdict(client, item["item_id"], BOB, [])
    assert (refused.status_code, refused.get_json()["error"]["code"]) == (409, "not_claimed")
    assert verdict(client, item["item_id"], ANN, []).status_code == 201
    twice = verdict(client, item["item_id"], ANN, [])
    assert (twice.status_code, twice.get_json()["error"]["code"]) == (409, "already_decided")
    missing = verdict(client, 999, ANN, [])
    assert (missing.status_code, missing.get_json()["error"]["code"]) == (404, "not_found")
    released = client.post(f"/v1/reviews/{item['item_id'] + 1}/release", headers=auth(ANN))
    assert released.status_code == 409


def test_reviewer_routes_need_a_reviewer_token(make_app: Callable[..., Flask],
                                               review_app: Flask) -> None:
    client = review_app.test_client()
    assert client.post("/v1/reviews/claim").status_code == 401
    assert client.post("/v1/reviews/claim", headers=auth(READER)).status_code == 401
    assert client.get("/v1/reviews").status_code == 401
    assert client.get("/v1/quality", headers=auth(ANN)).status_code == 401  # readers only
    disabled = make_app().test_client().post("/v1/reviews/claim", headers=auth(ANN))
    assert (disabled.status_code, disabled.get_json()["error"]["code"]) == (
        403, "reviewer_disabled")


def test_appeals_are_queued_first(make_app: Callable[..., Flask]) -> None:
    app = make_app(REVIEWERS=REVIEWERS, AUDIT_RATE="0", API_KEYS="key-1")
    client = app.test_client()
    results = moderate_images(client, app, {"between": image_bytes(PURPLE),
                                            "rifle": image_bytes(RED)}, auth("key-1"))
    rifle = results["rifle"]["decision_id"]
    path = f"/v1/decisions/{rifle}/appeal"
    assert client.post(path, json={"reason": "museum"}).status_code == 401
    answer = client.post(path, json={"reason": "a museum piece"}, headers=auth("key-1"))
    assert answer.status_code == 201
    assert answer.get_json()["reason"] == "appeal"
    again = client.post(path, headers=auth("key-1"))
    assert (again.status_code, again.get_json()["error"]["code"]) == (409, "already_appealed")
    unknown = client.post("/v1/decisions/nope/appeal", headers=auth("key-1"))
    assert unknown.status_code == 404
    bad = client.post(path, json={"why": 1}, headers=auth("key-1"))
    assert bad.status_code == 400
    first = client.post("/v1/reviews/claim", headers=auth(ANN)).get_json()
    assert (first["reason"], first["decision_id"], first["appeal_reason"]) == (
        "appeal", rifle, "a museum piece")
    overturned = verdict(client, first["item_id"], ANN, []).get_json()
    assert (overturned["appeal"], overturned["action"]) == ("overturned", "allow")


def test_audit_samples_enter_at_the_set_rate(make_app: Callable[..., Flask]) -> None:
    app = make_app(REVIEWERS=REVIEWERS, AUDIT_RATE="1,block=0", AUDIT_SEED="3")
    client = app.test_client()
    moderate_images(client, app, {"grey": image_bytes(GREY), "rifle": image_bytes(RED),
                                  "beer": image_bytes(GREEN)})
    counts = client.get("/v1/reviews/queue", headers=auth(ANN)).get_json()["queue"]
    assert counts["audit"]["waiting"] == 2  # allow and flag sampled at 1, block at 0


def test_quality_says_when_there_are_not_enough_verdicts(review_app: Flask) -> None:
    client = review_app.test_client()
    moderate_images(client, review_app, {f"b{i}": image_bytes(PURPLE) for i in range(3)})
    for _ in range(3):
        item = client.post("/v1/reviews/claim", headers=auth(ANN)).get_json()
        assert verdict(client, item["item_id"], ANN, ["weapons"]).status_code == 201
    body = client.get("/v1/quality?since=1d", headers=auth(READER)).get_json()
    assert body["verdicts"] == 3
    weapons = body["categories"]["weapons"]["precision"]
    assert (weapons["status"], weapons["verdicts"], weapons["estimate"]) == (
        "not_enough_verdicts", 3, None)
    assert "not enough verdicts yet" in weapons["message"]
    enough = review_app  # the same log, a lower bar
    enough.extensions["settings"] = enough.extensions["settings"].model_copy(
        update={"quality_min_verdicts": 3})
    body = client.get("/v1/quality", headers=auth(READER)).get_json()
    assert body["categories"]["weapons"]["precision"]["estimate"] == 1.0
    assert client.get("/v1/quality?since=junk", headers=auth(READER)).status_code == 400


def test_review_answers_match_the_document(review_app: Flask, spec: OpenAPI) -> None:
    client = review_app.test_client()
    results = moderate_images(client, review_app, {"between": image_bytes(PURPLE)})
    responses = [client.post(f"/v1/decisions/{results['between']['decision_id']}/appeal",
                             json={"reason": "why"})]
    responses.append(client.post("/v1/reviews/claim", headers=auth(ANN)))
    item_id = responses[-1].get_json()["item_id"]
    responses.append(client.post(f"/v1/reviews/{item_id}/release", headers=auth(ANN)))
    responses.append(client.post("/v1/reviews/claim", headers=auth(ANN)))
    responses.append(verdict(client, item_id, ANN, ["weapons"], "n"))
    responses.append(verdict(client, item_id, ANN, []))  # 409
    responses.append(client.post("/v1/reviews/claim", headers=auth(ANN)))
    responses.append(client.post("/v1/reviews/claim", headers=auth(ANN)))
    responses.append(client.get("/v1/reviews", headers=auth(READER)))
    responses.append(client.get("/v1/reviews/queue", headers=auth(READER)))
    responses.append(client.get("/v1/quality", headers=auth(READER)))
    assert [r.status_code for r in responses] == [201, 200, 200, 200, 201, 409, 200, 200, 200,
                                                  200, 200]
    for response in responses:
        spec.validate_response(described(response), WerkzeugOpenAPIResponse(response))


# --- the webhook ---------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on loopback that fails its first ``failures`` requests."""

    def __init__(self, port: int, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((dict(self.headers), body))
                status = 503 if len(outer.received) <= outer.failures else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_port() -> Iterator[int]:
    yield free_port()


def test_the_webhook_is_signed_retried_and_delivered_once_the_receiver_is_back(
        make_app: Callable[..., Flask], receiver_port: int) -> None:
    secret = "hook-secret"
    app = make_app(REVIEWERS=REVIEWERS, AUDIT_RATE="0",
                   WEBHOOK_URL=f"http://127.0.0.1:{receiver_port}/hook", WEBHOOK_SECRET=secret,
                   WEBHOOK_BACKOFF_S="0.05", WEBHOOK_TIMEOUT_S="2")
    client = app.test_client()
    results = moderate_images(client, app, {"between": image_bytes(PURPLE)})
    item = client.post("/v1/reviews/claim", headers=auth(ANN)).get_json()
    answer = verdict(client, item["item_id"], ANN, ["weapons"]).get_json()
    assert answer["delivery"]["status"] == "pending"

    def delivery() -> dict[str, Any]:
        found: dict[str, Any] = client.get("/v1/reviews", headers=auth(READER)).get_json()[
            "verdicts"][0]["delivery"]
        return found

    deadline = time.monotonic() + 10
    while delivery()["attempts"] < 2 and time.monotonic() < deadline:  # nobody listens yet
        time.sleep(0.05)
    down = delivery()
    assert down["status"] == "pending" and down["attempts"] >= 2
    assert "Connection refused" in down["last_error"] or "Errno" in down["last_error"]
    receiver = Receiver(receiver_port, failures=1)  # back, but its first answer is a 503
    try:
        deadline = time.monotonic() + 20
        while delivery()["status"] != "delivered" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert delivery()["status"] == "delivered"
        assert len(receiver.received) == 2  # the 503, then the delivery
        headers, body = receiver.received[-1]
        expected = hmac.new(secret.encode(), headers["X-Moderation-Timestamp"].encode() + b"."
                            + body, hashlib.sha256).hexdigest()
        assert headers["X-Moderation-Signature"] == f"sha256={expected}"
        payload = json.loads(body)
        assert (payload["decision_id"], payload["client_id"], payload["action"],
                payload["violations"]) == (results["between"]["decision_id"], "between", "block",
                                           ["weapons"])
        time.sleep(0.5)
        assert len(receiver.received) == 2  # delivered: never sent again
    finally:
        receiver.close()
        app.extensions["webhook"].stop()


def test_a_delivery_past_its_time_is_given_up_and_says_why(review_app: Flask) -> None:
    from service.webhooks import WebhookSender

    client = review_app.test_client()
    moderate_images(client, review_app, {"between": image_bytes(PURPLE)})
    queue = review_app.extensions["reviews"]
    item = queue.claim("ann")
    queue.decide(item.item_id, "ann", [], {"weapons": "block", "alcohol": "flag"},
                 webhook=True)
    sender = WebhookSender(queue, f"http://127.0.0.1:{free_port()}/hook", "s", timeout_s=1,
                           give_up_s=0)
    assert sender.deliver_due() == 0
    delivery = client.get("/v1/reviews", headers=auth(READER)).get_json()["verdicts"][0][
        "delivery"]
    assert (delivery["status"], delivery["attempts"], delivery["next_attempt_at"]) == (
        "failed", 1, None)
    assert delivery["last_error"]
    assert client.get("/v1/reviews/queue", headers=auth(ANN)).get_json()["deliveries"][
        "failed"] == 1
