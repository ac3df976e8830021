"""``POST /v1/moderate``: uploads in, decisions out, every one recorded before it is answered."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from flask import Blueprint, current_app, g, jsonify, request

from decisionlog import DecisionRecord
from moderation import ImageError, Moderator
from moderation.images import DecodedImage

from .contract import Access, Answer, Body, operation
from .parsing import (
    IMAGE_FIELD,
    ModerateRequest,
    RequestError,
    load_json,
    parse_json,
    parse_multipart,
)
from .resources import holder, metrics, recorder, settings
from .schemas import ModerateJSON, ModerateResponse

#: The multipart form of ``POST /v1/moderate`` (files are read by werkzeug, checked by
#: :func:`service.parsing.parse_multipart`).
MULTIPART = {
    "type": "object", "required": [IMAGE_FIELD],
    "properties": {
        IMAGE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "the images (repeat the field)"},
        "id": {"type": "array", "items": {"type": "string", "maxLength": 256},
               "description": "one per image, in the same order (default: the file names)"},
        "profile": {"type": "string", "maxLength": 256},
    },
}

bp = Blueprint("moderate", __name__)


def parse_moderate() -> ModerateRequest:
    max_images = settings().max_images
    if request.mimetype == "multipart/form-data":
        files = [(f.filename, f.read()) for f in request.files.getlist(IMAGE_FIELD)]
        form = {k: request.form.getlist(k) for k in request.form}
        return parse_multipart(files, form, max_images)
    if request.mimetype == "application/json":
        return parse_json(load_json(request.get_data(cache=False)), max_images)
    raise RequestError(
        415,
        "unsupported_media_type",
        f"send multipart/form-data (files in the field '{IMAGE_FIELD}') or "
        f"application/json; got {request.mimetype or 'no content type'}",
    )


@operation(bp, "/v1/moderate", "POST", operation_id="moderate", access=Access.API_KEY,
           summary="Moderate one or more images",
           description="A request with several images always answers 200, with a per-image "
           "error for any image that cannot be read. A request with one image that cannot be "
           "read answers with that error's status.",
           body=Body({"multipart/form-data": MULTIPART, "application/json": ModerateJSON}),
           answers=(Answer(200, "Decisions, one per image",
                           {"application/json": ModerateResponse}),))
def moderate() -> Any:
    parsed = parse_moderate()
    active = holder().current()  # this request's policy, whatever reloads happen meanwhile
    active.policy.check_profile(parsed.profile)  # UnknownProfile: 400 unknown_profile

    with active.encoder.expect():  # a batching encoder: this request's images are coming
        return respond(active, parsed)

def respond(active: Moderator, parsed: ModerateRequest) -> Any:
    decoded: list[DecodedImage | ImageError] = []
    decode_ms: list[float] = []
    for upload in parsed.uploads:
        started = time.perf_counter()
        if upload.error is not None:
            decoded.append(ImageError(*upload.error))
        else:
            try:
                decoded.append(active.decode(upload.data))
            except ImageError as e:
                decoded.append(e)
        decode_ms.append(1000 * (time.perf_counter() - started))
    started = time.perf_counter()
    results = active.moderate_decoded(
        decoded, ids=[u.id for u in parsed.uploads], profile=parsed.profile,
        banks=current_app.extensions["banks"][1],
    )
    model_ms = 1000 * (time.perf_counter() - started)

    dicts = [result.to_dict() for result in results]
    log, counters = recorder(), metrics()
    records = [
        DecisionRecord.from_result(
            result,
            image_sha256=hashlib.sha256(upload.data).hexdigest(),
            image_size=len(upload.data),
            latency_ms=ms + model_ms,
        )
        for result, ms, upload in zip(results, decode_ms, parsed.uploads, strict=True)
    ] if log is not None else []
    if log is not None:
        # failures too: every result is on record, before the client hears of it
        log.record(records)
    for result in results:
        decision = result.decision
        if decision is None:
            counters.images.labels("error").inc()
            continue
        counters.images.labels(decision.action.value).inc()
        for cid in decision.triggered:
            counters.flags.labels(cid, decision.categories[cid].action.value).inc()

    if len(results) == 1 and results[0].error is not None:
        raise results[0].error  # a request whose only image failed: that error

    items = []
    for i, (result, ms) in enumerate(zip(results, decode_ms, strict=True)):
        item = {k: v for k, v in dicts[i].items() if k not in ("policy", "model", "profile")}
        if records:
            item = {"decision_id": records[i].id, **item}
        if result.decision is not None:
            item["processing_ms"] = round(ms + model_ms, 2)
        items.append(item)
    return jsonify(
        policy={"name": active.policy.name, "version": active.policy.version},
        model=active.encoder.identity,
        profile=parsed.profile or "default",
        processing_ms=round(1000 * (time.perf_counter() - g.started), 2),
        results=items,
    )
