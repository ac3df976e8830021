"""Misskey's sensitive-media detection (``POST /v1/detect-images``), tested against its
contract as Misskey's documentation and code state it (Misskey does not install here):
misskey-dev/sensitive-detector's docs/api-detect-images.md (multipart, one image a part,
answers in the parts' order, a bad part is that part's error) and Misskey's
SensitiveMediaDetectionService (parts as image/png, `Authorization: Bearer` only when a key is
set, a 5 s timeout, and its checks of a part's predictions: `safe` and `nsfw` each exactly
once, numbers in [0, 1])."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask

from service.schemas import DetectImagesAnswer
from tests.fakes import GREY, HAND_POLICY, PURPLE, RED, image_bytes
from tests.service.conftest import READER

READER_H = {"Authorization": f"Bearer {READER}"}

#: weapons' fitted map (as moderation calibrate --probabilities writes it)
MAP = {"method": "isotonic", "scores": [-1.0, 0.5, 0.9], "probabilities": [0.0, 0.2, 0.95],
       "model": "fake/hand-made", "date": "2026-12-01", "ece": 0.03,
       "dataset": {"name": "test", "fingerprint": "f", "positives": 40, "negatives": 60}}


def policy_with(misskey: Any = None, *, fitted: bool = True) -> dict[str, Any]:
    data = copy.deepcopy(HAND_POLICY)
    if fitted:
        data["categories"]["weapons"]["probability"] = copy.deepcopy(MAP)
    if misskey is not None:
        data["integrations"] = {"misskey": misskey}
    return data


@pytest.fixture
def misskey_app(make_app: Any, policy_path: Path) -> Flask:
    policy_path.write_text(yaml.safe_dump(policy_with({"classes": {"nsfw": ["weapons"]}}),
                                          sort_keys=False))
    return make_app()  # type: ignore[no-any-return]


def misskey_body(parts: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """The multipart body as Misskey's fetch (undici's FormData) writes it: one part per
    image, named image0, image1, …, a Blob's file name, the part's type."""
    boundary = "----formdata-undici-032119741425"
    out = b""
    for name, data, media_type in parts:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                f"filename=\"blob\"\r\nContent-Type: {media_type}\r\n\r\n").encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def detect(client: Any, parts: list[tuple[str, bytes, str]], **headers: str) -> Any:
    body, content_type = misskey_body(parts)
    return client.post("/v1/detect-images", data=body, content_type=content_type,
                       headers=headers)


def misskey_reads(part: dict[str, Any]) -> float | None:
    """What Misskey's client makes of a part: the nsfw probability, or None (undetectable)
    when the part failed or its predictions break its checks."""
    if not part.get("success"):
        return None
    predictions = part["predictions"]
    names = [p["className"] for p in predictions]
    if names.count("safe") != 1 or names.count("nsfw") != 1:
        return None
    for p in predictions:
        value = p["probability"]
        if not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= 1:
            return None
    return float(next(p["probability"] for p in predictions if p["className"] == "nsfw"))


def test_each_part_gets_its_calibrated_class_probabilities_in_order(
        misskey_app: Flask) -> None:
    client = misskey_app.test_client()
    r = detect(client, [("image0", image_bytes(RED), "image/png"),
                        ("image1", image_bytes(GREY), "image/png"),
                        ("image2", image_bytes(PURPLE), "image/png")],
               **{"X-Request-Id": "req-1.a"})
    assert r.status_code == 200 and r.headers["X-Request-Id"] == "req-1.a"
    body = r.get_json()
    DetectImagesAnswer.model_validate(body)
    parts = body["result"]["results"]
    assert len(parts) == 3 and all(p["success"] for p in parts)
    for part in parts:  # most probable first, safe = 1 - nsfw
        probs = [p["probability"] for p in part["predictions"]]
        assert probs == sorted(probs, reverse=True)
        found = {p["className"]: p["probability"] for p in part["predictions"]}
        assert set(found) == {"nsfw", "safe"}
        assert found["safe"] == pytest.approx(1 - found["nsfw"], abs=1e-6)
    nsfw = [misskey_reads(p) for p in parts]
    assert all(v is not None for v in nsfw)
    assert nsfw[0] > nsfw[2] > nsfw[1]  # type: ignore[operator]  (the rifle, the band, grey)

    # the same images through /v1/moderate: nsfw is weapons' probability of its score, by
    # the fitted map; every part was recorded under Misskey's request id and field
    moderated = client.post("/v1/moderate", data={"image": (io.BytesIO(image_bytes(RED)),
                                                            "r.png")},
                            content_type="multipart/form-data").get_json()
    weapons = moderated["results"][0]["categories"]["weapons"]
    from moderation.policy import ProbabilityMap

    assert weapons["probability"] == pytest.approx(
        ProbabilityMap.model_validate(MAP)(weapons["score"]), abs=1e-6)
    assert nsfw[0] == pytest.approx(weapons["probability"], abs=1e-6)
    assert moderated["results"][0]["categories"]["alcohol"]["probability"] == "uncalibrated"
    misskey_app.extensions["decisions"][1].flush()
    page = client.get("/v1/decisions?limit=10", headers=READER_H).get_json()
    ids = {d["client_id"] for d in page["decisions"]}
    assert {"misskey:req-1.a:image0", "misskey:req-1.a:image1",
            "misskey:req-1.a:image2"} <= ids


def test_a_bad_part_is_that_parts_error_and_the_others_are_answered(
        misskey_app: Flask) -> None:
    r = detect(misskey_app.test_client(), [
        ("image0", image_bytes(RED), "image/png"),
        ("image1", b"\x89PNG\r\n\x1a\nbroken", "image/png"),
        ("image2", image_bytes(GREY), "text/plain"),
        ("image3", b"", "image/png"),
        ("image4", image_bytes(GREY, "JPEG"), "image/jpeg"),
    ])
    assert r.status_code == 200
    body = r.get_json()
    DetectImagesAnswer.model_validate(body)
    parts = body["result"]["results"]
    assert [p["success"] for p in parts] == [True, False, False, False, True]
    assert [p["error"]["code"] for p in parts if not p["success"]] == [
        "IMAGE_DECODE_FAILED", "UNSUPPORTED_MEDIA_TYPE", "INVALID_REQUEST"]
    assert [misskey_reads(p) is None for p in parts] == [False, True, True, True, False]


def test_one_bad_part_alone_is_still_a_200_with_its_error(misskey_app: Flask) -> None:
    r = detect(misskey_app.test_client(), [("image0", b"GIF89a-not-really", "image/gif")])
    assert r.status_code == 200
    [part] = r.get_json()["result"]["results"]
    assert part == {"success": False, "error": {"code": "IMAGE_DECODE_FAILED",
                                                 "message": part["error"]["message"]}}


def test_the_bearer_key_is_required_when_the_service_has_keys(make_app: Any,
                                                              policy_path: Path) -> None:
    policy_path.write_text(yaml.safe_dump(policy_with({"classes": {"nsfw": ["weapons"]}})))
    client = make_app(API_KEYS="misskey-key").test_client()
    parts = [("image0", image_bytes(GREY), "image/png")]
    assert detect(client, parts).status_code == 401
    assert detect(client, parts, Authorization="Bearer wrong").status_code == 401
    assert detect(client, parts, Authorization="Bearer misskey-key").status_code == 200


@pytest.mark.parametrize(("misskey", "fitted", "says"), [
    (None, True, "integrations.misskey.classes"),
    ({"classes": {"nsfw": ["weapons", "alcohol"]}}, True, "no fitted probability: alcohol"),
    ({"classes": {"nsfw": ["weapons"]}}, False, "no fitted probability: weapons"),
])
def test_a_policy_without_classes_or_probabilities_answers_422_saying_what_to_do(
        make_app: Any, policy_path: Path, misskey: Any, fitted: bool, says: str) -> None:
    policy_path.write_text(yaml.safe_dump(policy_with(misskey, fitted=fitted)))
    r = detect(make_app().test_client(), [("image0", image_bytes(GREY), "image/png")])
    assert r.status_code == 422
    error = r.get_json()["error"]
    assert error["code"] == "misskey_unconfigured" and says in error["message"]


def test_request_level_faults(misskey_app: Flask) -> None:
    client = misskey_app.test_client()
    assert client.post("/v1/detect-images", data=image_bytes(GREY),
                       content_type="image/png").status_code == 415
    empty, content_type = misskey_body([])
    assert client.post("/v1/detect-images", data=empty,
                       content_type=content_type).status_code == 400
    many = [(f"image{i}", image_bytes(GREY), "image/png") for i in range(40)]
    assert detect(client, many).status_code == 413


def test_the_mapping_is_checked_when_the_policy_loads() -> None:
    from moderation.errors import PolicyError
    from moderation.policy import parse_policy

    with pytest.raises(PolicyError, match="no such category"):
        parse_policy(yaml.safe_dump(policy_with({"classes": {"nsfw": ["drugs"]}})))
    with pytest.raises(PolicyError, match="also one of the classes"):
        parse_policy(yaml.safe_dump(policy_with({"classes": {"safe": ["weapons"]}})))
    with_classes = parse_policy(yaml.safe_dump(policy_with({"classes": {"nsfw": ["weapons"]},
                                                            "rest": None})))
    assert with_classes.version != parse_policy(yaml.safe_dump(policy_with())).version


def test_a_video_is_not_decoded_here_whatever_its_label_and_names_are_cleaned(
        misskey_app: Flask) -> None:
    pytest.importorskip("av")
    from tests.fakes import video_bytes

    client = misskey_app.test_client()
    r = detect(client, [("image0", video_bytes([RED, RED]), "image/png"),
                        ("a\x1b[31mb\x7f", image_bytes(GREY), "image/png")],
               **{"X-Request-Id": "req-v"})
    parts = r.get_json()["result"]["results"]
    assert parts[0]["success"] is False
    assert parts[0]["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert "video" in parts[0]["error"]["message"]
    assert parts[1]["success"] is True
    misskey_app.extensions["decisions"][1].flush()
    page = client.get("/v1/decisions?limit=10", headers=READER_H).get_json()
    assert {d["client_id"] for d in page["decisions"]} == {"misskey:req-v:a[31mb"}
