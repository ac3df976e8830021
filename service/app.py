"""The Flask application: ``create_app(config=None, moderator=None)``.

Settings come from ``config`` (a mapping), else from ``MODERATION_*`` environment variables:
:mod:`service.settings` declares each one, its type and its default.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import hmac
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from decisionlog import (
    DeadLetters,
    DecisionRecord,
    DecisionStore,
    Recorder,
    default_database_url,
    default_dead_letter_path,
    parse_time,
)
from decisionlog.store import BUCKETS
from moderation import ImageError, ModerationError, Moderator, PolicyError
from moderation.images import DecodedImage

from .dashboard import render_dashboard
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .openapi import openapi_document
from .parsing import (
    IMAGE_FIELD,
    MAX_ID_LENGTH,
    ModerateRequest,
    RequestError,
    load_json,
    parse_json,
    parse_multipart,
)
from .settings import Settings, load_settings
from .state import ModelOccupancy, PolicyHolder

log = logging.getLogger(__name__)

__all__ = ["create_app"]


#: HTTP status for a request whose only image failed, by the image's error code.
IMAGE_ERROR_STATUS = {
    "unsupported_format": 415,
    "too_many_pixels": 413,
    "too_many_frames": 413,
    "animation_too_large": 413,
    "too_many_scans": 413,
}


def _error(status: int, code: str, message: str, **extra: Any) -> tuple[Response, int]:
    body: dict[str, Any] = {"error": {"code": code, "message": message, **extra}}
    return jsonify(body), status


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer ") :].strip()
    return request.headers.get("X-API-Key")


def _matches(given: str | None, secrets: list[str]) -> bool:
    """Constant-time comparison against every secret (no early exit on a match)."""
    given_bytes = (given or "").encode()
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(given_bytes, secret.encode())
    return found and given is not None


TOKEN_COOKIE = "moderation_token"


def _time_arg(name: str) -> float | None:
    """A time query parameter: unix seconds, ISO 8601, or an age (``24h``, ``7d``)."""
    value = request.args.get(name)
    if value is None or value == "":
        return None
    try:
        return parse_time(value)
    except ValueError as e:
        raise RequestError(400, "invalid_field", f"{name}: {e}") from e


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    value = request.args.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise RequestError(
            400, "invalid_field", f"{name} must be an integer from {low} to {high}; got {value!r}"
        )
    return number


def _load_moderator(settings: Settings) -> Moderator:
    moderator = Moderator.from_policy(
        settings.policy,
        model=settings.model,
        pretrained=settings.pretrained,
        random_weights=settings.random_weights,
        cache_dir=settings.cache_dir,
        threads=settings.torch_threads,
        limits=settings.image_limits,
    )
    if settings.trace:
        moderator.encoder.trace_image_tower()  # type: ignore[attr-defined]
    if settings.batch_max > 1:
        from moderation.batching import BatchingEncoder

        state_dir = settings.state_dir
        batching = BatchingEncoder(
            moderator.encoder,  # type: ignore[arg-type]
            max_batch=settings.batch_max,
            max_wait=settings.batch_max_wait_ms / 1000,
            lone_threads=os.cpu_count() or 1,
            occupancy=ModelOccupancy(state_dir / "model-occupancy") if state_dir else None,
        )
        moderator = moderator.with_encoder(batching)
    return moderator


def create_app(
    config: Mapping[str, Any] | None = None, moderator: Moderator | None = None
) -> Flask:
    """Build the app. Without ``moderator``, load the policy and model the config names,
    before the app is returned (so a gunicorn worker is ready when it accepts requests)."""
    settings = load_settings(config)
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # categories keep policy order
    app.config.update(  # the limits werkzeug enforces while parsing
        MAX_CONTENT_LENGTH=settings.max_content_length,
        MAX_FORM_PARTS=settings.max_form_parts,
        MAX_FORM_MEMORY_SIZE=settings.max_form_memory_size,
    )
    app.extensions["settings"] = settings
    api_keys = settings.api_key_list
    admin_token = settings.admin_token
    if moderator is None:
        sys.setswitchinterval(settings.gil_switch_interval)
        moderator = _load_moderator(settings)
    state_dir = settings.state_dir
    holder = PolicyHolder(
        moderator,
        settings.policy,
        state_dir / "policy-snapshot.json" if state_dir else None,
    )
    if holder.snapshot is not None:
        holder.current()  # catch up with a reload made before this worker was ready
        holder.follow_in_background()
    metrics = Metrics()
    app.extensions["moderation"] = holder
    reader_tokens = [t for t in (settings.reader_token, admin_token) if t]
    store = DecisionStore(settings.database_url or default_database_url())
    dead_letters = DeadLetters(settings.dead_letter_path or default_dead_letter_path(store.url))
    recorder = (
        Recorder(store, dead_letters, timeout=settings.record_timeout_s)
        if settings.record_decisions else None
    )
    app.extensions["decisions"] = (store, recorder)
    if recorder is not None:
        atexit.register(recorder.close)  # a worker that stops writes what it has queued

    @app.before_request
    def start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def count(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - g.get("started", 0))
        if response.status_code >= 400 and response.is_json:
            code = (response.get_json(silent=True) or {}).get("error", {}).get("code")
            if code:
                metrics.errors.labels(code).inc()
        return response

    @app.errorhandler(RequestError)
    def request_error(e: RequestError) -> tuple[Response, int]:
        return _error(e.status, e.code, e.message, **e.extra)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> tuple[Response, int]:
        code = (e.name or "error").lower().replace(" ", "_")
        if e.code == 413:
            limit = settings.max_content_length
            if request.content_length is None or request.content_length > limit:
                return _error(
                    413, "request_too_large",
                    f"the request is over {limit:,} bytes (MODERATION_MAX_CONTENT_LENGTH)",
                )
            # werkzeug raises the same error for both form limits
            return _error(
                413, "form_too_large",
                f"the form has more than {settings.max_form_parts:,} parts "
                "(MODERATION_MAX_FORM_PARTS) or a text field over "
                f"{settings.max_form_memory_size:,} bytes (MODERATION_MAX_FORM_MEMORY_SIZE): "
                f"send at most {settings.max_images} files in '{IMAGE_FIELD}', with at "
                f"most one 'id' field each, of at most {MAX_ID_LENGTH} characters",
            )
        return _error(e.code or 500, code, e.description or e.name)

    @app.errorhandler(Exception)
    def internal_error(e: Exception) -> tuple[Response, int]:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "internal", "internal error; the server log has the details")

    def require_api_key() -> None:
        if api_keys and not _matches(_bearer(), api_keys):
            raise RequestError(
                401, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)"
            )

    def require(
        tokens: list[str], given: str | None, setting: str, what: str, how: str
    ) -> None:
        """403 while ``setting`` configures no token; 401 unless ``given`` matches one."""
        if not tokens:
            raise RequestError(
                403, f"{what}_disabled", f"{what} routes are disabled: set {setting} to enable them"
            )
        if not _matches(given, tokens):
            raise RequestError(401, "unauthorized", f"the {what} token is required ({how})")

    def require_admin() -> None:
        tokens = [admin_token] if admin_token else []
        require(tokens, _bearer(), "MODERATION_ADMIN_TOKEN", "admin",
                "Authorization: Bearer <token>")

    def require_reader() -> None:
        given = _bearer() or request.args.get("token") or request.cookies.get(TOKEN_COOKIE)
        require(reader_tokens, given, "MODERATION_READER_TOKEN", "reader",
                "Authorization: Bearer <token>, or ?token= for the dashboard")

    def parse_moderate() -> ModerateRequest:
        max_images = settings.max_images
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

    @app.post("/v1/moderate")
    def moderate() -> Any:
        require_api_key()
        parsed = parse_moderate()
        active = holder.current()  # this request's policy, whatever reloads happen meanwhile
        try:
            active.policy.check_profile(parsed.profile)
        except PolicyError as e:
            raise RequestError(400, "unknown_profile", str(e)) from e

        # tell a batching encoder this request's images are on their way
        expect = getattr(active.encoder, "expect", contextlib.nullcontext)
        with expect():
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
            decoded, ids=[u.id for u in parsed.uploads], profile=parsed.profile
        )
        model_ms = 1000 * (time.perf_counter() - started)

        dicts = [result.to_dict() for result in results]
        records = [
            DecisionRecord.from_result(
                result,
                image_sha256=hashlib.sha256(upload.data).hexdigest(),
                image_size=len(upload.data),
                latency_ms=ms + model_ms,
                as_dict=d,
            )
            for result, ms, upload, d in zip(
                results, decode_ms, parsed.uploads, dicts, strict=True
            )
        ] if recorder is not None else []
        if recorder is not None:
            # failures too: every result is on record, before the client hears of it
            recorder.record(records)
        for result in results:
            decision = result.decision
            if decision is None:
                metrics.images.labels("error").inc()
                continue
            metrics.images.labels(decision.action.value).inc()
            for cid in decision.triggered:
                metrics.flags.labels(cid, decision.categories[cid].action.value).inc()

        if len(results) == 1 and results[0].error is not None:
            error = results[0].error
            return _error(IMAGE_ERROR_STATUS.get(error.code, 400), error.code, error.message)

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

    @app.get("/v1/policy")
    def policy() -> Any:
        require_api_key()
        active = holder.current()
        p = active.policy
        return jsonify(
            name=p.name,
            version=p.version,
            description=p.description,
            model={"spec": p.model.model_dump(mode="json"), "identity": active.encoder.identity},
            profiles=p.profile_names(),
            categories={
                cid: {
                    "description": c.description,
                    "action": c.action,
                    "terms": c.terms,
                    "exceptions": c.exceptions,
                    "thresholds": {
                        name: p.threshold_for(cid, name).model_dump(mode="json")
                        for name in p.profile_names()
                    },
                }
                for cid, c in p.categories.items()
            },
        )

    @app.post("/v1/policy/reload")
    def reload() -> Any:
        require_admin()
        before = holder.current().policy.version
        try:
            active = holder.reload()
        except PolicyError as e:
            return _error(
                422,
                "invalid_policy",
                "the policy file is not valid; the previous policy keeps serving",
                faults=e.faults,
            )
        except ModerationError as e:
            return _error(422, "invalid_policy", f"{e}; the previous policy keeps serving")
        except OSError as e:
            return _error(422, "invalid_policy", f"cannot read the policy file: {e}")
        return jsonify(
            name=active.policy.name,
            version=active.policy.version,
            previous_version=before,
            changed=before != active.policy.version,
        )

    @app.get("/v1/decisions")
    def decisions() -> Any:
        require_reader()
        args = request.args
        limit = _int_arg("limit", 50, 1, 500)
        try:
            page, cursor = store.query(
                since=_time_arg("since"),
                until=_time_arg("until"),
                action=args.get("action"),
                category=args.get("category"),
                policy_version=args.get("policy_version"),
                client_id=args.get("client_id"),
                flagged={"true": True, "false": False}.get(args.get("flagged", "")),
                limit=limit,
                cursor=args.get("cursor"),
            )
        except ValueError as e:
            raise RequestError(400, "invalid_field", str(e)) from e
        return jsonify(decisions=page, next_cursor=cursor)

    @app.get("/v1/decisions/<decision_id>")
    def decision(decision_id: str) -> Any:
        require_reader()
        found = store.get(decision_id)
        if found is None:
            raise RequestError(404, "not_found", f"no decision with id {decision_id!r}")
        return jsonify(found)

    @app.get("/v1/stats")
    def stats() -> Any:
        require_reader()
        bucket = request.args.get("bucket", "hour")
        if bucket not in BUCKETS:
            raise RequestError(400, "invalid_field", f"bucket must be one of {list(BUCKETS)}")
        return jsonify(
            bucket=bucket,
            buckets=store.stats(
                since=_time_arg("since"),
                until=_time_arg("until"),
                bucket=bucket,
                policy_version=request.args.get("policy_version"),
            ),
        )

    @app.get("/dashboard")
    def dashboard() -> Any:
        require_reader()
        active = holder.current()
        page = render_dashboard(active, store, hours=_int_arg("hours", 48, 1, 24 * 90))
        response = Response(page, mimetype="text/html")
        token = request.args.get("token")
        if token:  # keep the page reloadable without the token in the address bar
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        return response

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> Any:
        active = holder.current()
        return jsonify(
            status="ready",
            policy={"name": active.policy.name, "version": active.policy.version},
            model=active.encoder.identity,
        )

    @app.get("/openapi.json")
    def openapi() -> Any:
        return jsonify(openapi_document())

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.exposition(), mimetype=CONTENT_TYPE_LATEST)

    return app
