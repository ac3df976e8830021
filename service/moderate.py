"""``POST /v1/moderate``: uploads in, decisions out, every one recorded before it is answered."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, current_app, g, has_request_context, jsonify, request, url_for

from decisionlog import DecisionRecord
from decisionlog.jobs import UPLOADS
from moderation import ImageError, Moderator, NotFound
from moderation.images import DecodedImage
from moderation.video import declared_duration, is_video

from . import jobs
from .auth import api_key_owner
from .contract import Access, Answer, Body, operation
from .jobs import Handler
from .parsing import (
    IMAGE_FIELD,
    ModerateRequest,
    RequestError,
    Upload,
    load_json,
    parse_json,
    parse_multipart,
)
from .resources import holder, metrics, recorder, settings, store
from .schemas import JobPath, ModerateJSON, ModerateQuery, ModerateResponse, ModerationJob

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
           query=ModerateQuery,
           body=Body({"multipart/form-data": MULTIPART, "application/json": ModerateJSON}),
           answers=(Answer(200, "Decisions, one per image",
                           {"application/json": ModerateResponse}),
                    Answer(202, "Queued as a job (a video longer than "
                                "MODERATION_VIDEO_INLINE_MAX_S, or async=true): poll GET "
                                "/v1/moderate/jobs/{job_id} (the Location header); its result "
                                "is this route's answer", {"application/json": ModerationJob})))
def moderate(query: ModerateQuery) -> Any:
    parsed = parse_moderate()
    active = holder().current()  # this request's policy, whatever reloads happen meanwhile
    active.policy.check_profile(parsed.profile)  # UnknownProfile: 400 unknown_profile
    if query.async_ or _long_video(parsed):
        return _submit(parsed)

    with active.encoder.expect():  # a batching encoder: this request's images are coming
        return jsonify(respond(active, parsed))


def _long_video(parsed: ModerateRequest) -> bool:
    """Whether an upload is a video longer than MODERATION_VIDEO_INLINE_MAX_S (its header's
    word): answered as a job."""
    limit = settings().video_inline_max_s
    for upload in parsed.uploads:
        if upload.error is None and is_video(upload.data[:64]):
            duration = declared_duration(upload.data)
            if duration is not None and duration > limit:
                return True
    return False


def _submit(parsed: ModerateRequest) -> Any:
    """The uploads queued as a job (their bytes in the log, so a worker restart loses
    nothing); each decision's id is fixed now, so that a job run again after a crash records
    each decision once."""
    runner = jobs.runner()
    request_ = {
        "profile": parsed.profile,
        "uploads": [{"id": u.id, "upload": i, "error": list(u.error) if u.error else None,
                     "decision_id": uuid.uuid4().hex} for i, u in enumerate(parsed.uploads)],
    }
    job_id = runner.jobs.submit(MODERATE, request_, created_by=api_key_owner(),
                                uploads=[u.data for u in parsed.uploads])
    runner.wake()
    job = runner.jobs.get(job_id)
    if job is None:  # deleted at once: only by hand
        raise NotFound(f"job {job_id} was deleted as it was submitted")
    answer = jsonify(job.model_dump(mode="json"))
    answer.status_code = 202
    answer.headers["Location"] = url_for("moderate.get_moderation_job", job_id=job.id)
    return answer


@operation(bp, "/v1/moderate/jobs/<job_id>", "GET", operation_id="get_moderation_job",
           access=Access.API_KEY, summary="A moderation job (a long video, async=true): its "
           "state, progress, and the answer once done",
           description="What POST /v1/moderate answered 202 for, read with the API key that "
           "submitted it (when the service has keys; another key's job is not found) "
           "(other jobs, such as dry-runs, are the admin's: GET /v1/jobs/{job_id}). With a "
           "webhook the answer is also posted (event job.done).", path=JobPath,
           answers=(Answer(200, "The job", {"application/json": ModerationJob}),))
def get_moderation_job(job_id: str) -> Any:
    log = jobs.runner().jobs
    found = log.get(job_id)
    if found is None or found.kind != MODERATE or log.created_by(job_id) != api_key_owner():
        raise NotFound(f"no moderation job {job_id!r} of this API key (jobs are kept 7 days)")
    return jsonify(found.model_dump(mode="json"))


#: The job kind of an upload answered off the request thread (a long video, ``async=true``).
MODERATE = "moderate"


def moderate_handler(app: Flask) -> Handler:
    """What a worker's job runner runs for an upload answered as a job: decided as
    ``/v1/moderate`` decides it, recorded straight into the log (durably, before the job is
    done) under the ids fixed at submission, skipping those already there: done once."""

    def run(stored: dict[str, Any], progress: Callable[[int, int], None]) -> dict[str, Any]:
        kept = stored.get(UPLOADS, [])  # (a job queued before migration 0012 has them as base64)
        uploads = [Upload(u["id"], kept[u["upload"]] if "upload" in u
                          else base64.b64decode(u["data"]),
                          tuple(u["error"]) if u["error"] else None)
                   for u in stored["uploads"]]
        parsed = ModerateRequest(uploads, stored["profile"])
        progress(0, len(uploads))
        ids = [u["decision_id"] for u in stored["uploads"]]

        def record(records: list[DecisionRecord]) -> None:
            missing = [r for r in records if store().get(r.id) is None]
            store().add_many(missing)

        with app.app_context():
            answer = respond(holder().current(), parsed, decision_ids=ids, record=record)
        progress(len(uploads), len(uploads))
        return answer

    return run


def respond(active: Moderator, parsed: ModerateRequest, *,
            decision_ids: list[str] | None = None,
            record: Callable[[list[DecisionRecord]], None] | None = None) -> dict[str, Any]:
    """Decide and record the uploads; the answer's JSON. ``decision_ids``: the records' ids
    (default: new ones); ``record``: how they are recorded (default: the recorder)."""
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
            image_sha256=(result.hashes.sha256 if result.hashes is not None  # the decoder's
                          else hashlib.sha256(upload.data).hexdigest()),
            image_size=len(upload.data),
            latency_ms=ms + model_ms,
        )
        for result, ms, upload in zip(results, decode_ms, parsed.uploads, strict=True)
    ] if log is not None or record is not None else []
    if decision_ids is not None:
        records = [r.model_copy(update={"id": i})
                   for r, i in zip(records, decision_ids, strict=True)]
    if record is not None:
        record(records)
    elif log is not None:
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

    if len(results) == 1 and results[0].error is not None and record is None:
        raise results[0].error  # a request whose only image failed: that error

    items = []
    for i, (result, ms) in enumerate(zip(results, decode_ms, strict=True)):
        item = {k: v for k, v in dicts[i].items() if k not in ("policy", "model", "profile")}
        if records:
            item = {"decision_id": records[i].id, **item}
        if result.decision is not None:
            item["processing_ms"] = round(ms + model_ms, 2)
        items.append(item)
    started = g.get("started", started) if has_request_context() else started
    return {
        "policy": {"name": active.policy.name, "version": active.policy.version},
        "model": active.encoder.identity,
        "profile": parsed.profile or "default",
        "processing_ms": round(1000 * (time.perf_counter() - started), 2),
        "results": items,
    }
