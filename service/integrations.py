"""Platform hooks: what pict-rs (Lemmy's image server) calls before it stores an upload, and
Misskey's sensitive-media detection. Each hook decides through ``POST /v1/moderate``'s path
(recorded, banks matched); pict-rs's answer follows the one integration policy
(:class:`moderation.integrations.IntegrationPolicy`, from the ``MODERATION_INTEGRATION_*``
settings), Misskey's is the policy's calibrated probabilities (Misskey judges them itself)."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from flask import Blueprint, jsonify, request

from moderation import ModerationError
from moderation.integrations import IntegrationPolicy, Verdict
from moderation.video import is_video

from .contract import Access, Answer, Body, operation
from .moderate import respond
from .parsing import ModerateRequest, RequestError, Upload
from .resources import holder, metrics, settings
from .schemas import DetectImagesAnswer, IntegrationAnswer

__all__ = ["bp", "integration_policy"]

log = logging.getLogger(__name__)

bp = Blueprint("integrations", __name__)

#: A raw upload, as a platform sends it: its bytes, with its own media type.
RAW = {"type": "string", "format": "binary", "description": "the upload's bytes"}


def integration_policy() -> IntegrationPolicy:
    s = settings()
    return IntegrationPolicy.parse(s.integration_reject, s.integration_review,
                                   s.integration_fail_mode)


def _answer(verdict: Verdict, hook: str, decision: dict[str, Any] | None = None,
            *, failed: bool = False) -> Any:
    metrics().integrations.labels(hook, "accept" if verdict.accept else "reject",
                                  "failure" if failed else "decision").inc()
    body: dict[str, Any] = {"action": decision.get("action") if decision else None,
                            "decision_id": decision.get("decision_id") if decision else None}
    if verdict.accept:
        return jsonify(accept=True, reason=verdict.reason, **body), 200
    # refused: the error shape every route answers, with the decision beside it
    code, status = ("undecided", 503) if failed else ("rejected", 422)
    return jsonify(error={"code": code, "message": verdict.reason}, **body), status


@operation(bp, "/v1/integrations/pict-rs", "POST", operation_id="pict_rs_validate",
           access=Access.API_KEY, summary="pict-rs's external validation: the upload's bytes "
           "in, 2xx to store it, 4xx (or 503 when failing closed) to refuse it",
           description="pict-rs (media.external_validation) posts each upload with its "
           "Content-Type and refuses it on anything but 2xx. The decision is recorded (client "
           "id `pict-rs`, the image's SHA-256) and the answer follows the integration policy "
           "(MODERATION_INTEGRATION_REJECT, _REVIEW, _FAIL_MODE).",
           body=Body({"application/octet-stream": RAW}),
           answers=(Answer(200, "Accepted: pict-rs stores the upload",
                           {"application/json": IntegrationAnswer}),),
           errors=(422, 503))
def pict_rs() -> Any:
    policy = integration_policy()
    data = request.get_data(cache=False)
    if not data:
        return _answer(policy.of_refusal("empty", "the upload is empty (0 bytes)"), "pict-rs")
    try:
        answer = respond(holder().current(), ModerateRequest([Upload("pict-rs", data)], None))
    except ModerationError as e:  # the decoder refused the file: a decision
        if e.status < 500:
            return _answer(policy.of_refusal(e.code, e.message), "pict-rs")
        log.warning("pict-rs: could not decide: %s", e.message)
        return _answer(policy.of_failure(e.code), "pict-rs", failed=True)
    except Exception as e:  # noqa: BLE001 (any failure: the fail mode decides, logged)
        log.exception("pict-rs: could not decide")
        return _answer(policy.of_failure(type(e).__name__), "pict-rs", failed=True)
    [result] = answer["results"]
    if "error" in result:
        return _answer(policy.of_refusal(result["error"]["code"], result["error"]["message"]),
                       "pict-rs", result)
    return _answer(policy.of_action(result["action"], result["triggered"]), "pict-rs", result)


# --- Misskey ---------------------------------------------------------------------------------

#: the part media types Misskey's detection API takes (sensitive-detector's
#: docs/api-detect-images.md); another is that part's UNSUPPORTED_MEDIA_TYPE
MISSKEY_TYPES = ("image/png", "image/jpeg", "image/gif", "image/bmp")
#: our decoder's refusals as Misskey's part error codes
_MISSKEY_CODE = {"empty": "INVALID_REQUEST", "unsupported_format": "UNSUPPORTED_MEDIA_TYPE",
                 "too_many_pixels": "REQUEST_TOO_LARGE", "too_many_frames": "REQUEST_TOO_LARGE",
                 "animation_too_large": "REQUEST_TOO_LARGE",
                 "too_many_scans": "REQUEST_TOO_LARGE"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

MISSKEY_FORM = {
    "type": "object",
    "additionalProperties": {"type": "string", "format": "binary"},
    "description": "each part an image (any field name, such as image0, image1; the "
    "answers follow the parts' order), its Content-Type one of " + ", ".join(MISSKEY_TYPES),
}


def _misskey_failed(code: str, message: str) -> dict[str, Any]:
    return {"success": False, "error": {"code": code, "message": message}}


@operation(bp, "/v1/detect-images", "POST", operation_id="misskey_detect_images",
           access=Access.API_KEY, summary="Misskey's sensitive-media detection: images in, "
           "each one's class probabilities out",
           description="Misskey (sensitiveMediaDetectionApiUrl) posts up to its batch of "
           "normalised images as multipart parts and reads each one's `predictions`: the "
           "classes of the policy's `integrations.misskey`, each the largest calibrated "
           "probability of its categories (moderate calibrate --probabilities), and the "
           "`rest` class one minus the largest. Every image is recorded as a decision (client "
           "id `misskey:<X-Request-Id>:<field>`). A part that cannot be read is that part's "
           "error; a request-level fault is this service's error shape (Misskey reads only "
           "the status). 422 `misskey_unconfigured`: the policy maps no classes, or a mapped "
           "category has no fitted probability.",
           body=Body({"multipart/form-data": MISSKEY_FORM}),
           answers=(Answer(200, "One result per part, in order",
                           {"application/json": DetectImagesAnswer}),),
           errors=(413, 415, 422))
def misskey_detect_images() -> Any:
    active = holder().current()
    mapping = active.policy.integrations.misskey if active.policy.integrations else None
    if mapping is None:
        raise RequestError(422, "misskey_unconfigured", "the active policy maps no categories "
                           "to Misskey's classes: add integrations.misskey.classes (README: "
                           "platform integrations)")
    uncalibrated = sorted({cid for cids in mapping.classes.values() for cid in cids
                           if active.policy.categories[cid].probability is None})
    if uncalibrated:
        raise RequestError(422, "misskey_unconfigured", "these categories have no fitted "
                           f"probability: {', '.join(uncalibrated)}; run moderation calibrate "
                           "--probabilities isotonic and activate the calibrated policy")
    if request.mimetype != "multipart/form-data":
        raise RequestError(415, "unsupported_media_type", "send multipart/form-data, one image "
                           f"per part; got {request.mimetype or 'no content type'}")
    parts = list(request.files.items(multi=True))
    if request.form:
        raise RequestError(400, "invalid_field", "every part must be a file (an image); got "
                           f"the text field {next(iter(request.form))!r}")
    if not parts:
        raise RequestError(400, "missing_field", "send at least one image part" + (
            ": no part of this body could be read (check its boundary and each part's "
            "Content-Disposition)" if request.content_length else ""))
    if len(parts) > settings().max_images:
        raise RequestError(413, "too_many_images", f"at most {settings().max_images} images "
                           "a request (MODERATION_MAX_IMAGES)")
    given = request.headers.get("X-Request-Id", "")
    request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]

    answers: list[dict[str, Any] | None] = []
    uploads: list[Upload] = []
    for field, file in parts:
        data = file.read()
        video = is_video(data[:64])
        if file.mimetype not in MISSKEY_TYPES or video:
            answers.append(_misskey_failed("UNSUPPORTED_MEDIA_TYPE", "a part must be an image "
                                           f"({', '.join(MISSKEY_TYPES)}; Misskey sends a "
                                           "video's frames as images); got "
                                           f"{file.mimetype or 'no type'}"
                                           + (" holding a video" if video else "")))
        elif not data:
            answers.append(_misskey_failed("INVALID_REQUEST", "the part is empty"))
        else:
            answers.append(None)
            name = "".join(ch for ch in field if ch.isprintable())  # as ids are checked
            uploads.append(Upload(f"misskey:{request_id}:{name}"[:256], data))
    results: list[dict[str, Any]] = []
    if uploads:
        try:
            results = respond(active, ModerateRequest(uploads, None))["results"]
        except ModerationError as e:  # the request's only image was refused
            if e.status >= 500:
                raise
            results = [{"error": {"code": e.code, "message": e.message}}]
    found = iter(results)
    for i, answer in enumerate(answers):
        if answer is not None:
            continue
        result = next(found)
        if "error" in result:
            code = _MISSKEY_CODE.get(result["error"]["code"], "IMAGE_DECODE_FAILED")
            answers[i] = _misskey_failed(code, result["error"]["message"])
            continue
        probability = {cid: c["probability"] for cid, c in result["categories"].items()}
        classes = {name: max(probability[cid] for cid in cids)
                   for name, cids in mapping.classes.items()}
        if mapping.rest is not None:
            classes[mapping.rest] = round(1.0 - max(classes.values()), 6)
        answers[i] = {"success": True, "predictions": [
            {"className": name, "probability": p}
            for name, p in sorted(classes.items(), key=lambda kv: -kv[1])]}
    for answer in answers:
        assert answer is not None
        metrics().integrations.labels(
            "misskey", "detected" if answer["success"] else "refused", "decision").inc()
    response = jsonify(success=True, result={"results": answers})
    response.headers["X-Request-Id"] = request_id
    return response, 200
