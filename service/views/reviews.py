"""The review queue over HTTP: appeals (API key), claims and verdicts (reviewers), the
verdicts and the queue's counts (readers and reviewers), and ``/v1/quality`` (readers)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from decisionlog.reviews import REASONS, ReviewError, ReviewQueue, VerdictFilters

from ..auth import (
    api_key_required,
    reader_or_reviewer_required,
    reader_required,
    reviewer_required,
)
from ..parsing import RequestError, parse_appeal, parse_verdict
from ..reviews import WebhookSender, item_view, quality_report, record_verdict, request_error
from ..schemas import VerdictPage
from . import holder, int_arg, settings, store, time_arg

bp = Blueprint("reviews", __name__)


def queue() -> ReviewQueue:
    found: ReviewQueue = current_app.extensions["reviews"]
    return found


def sender() -> WebhookSender | None:
    found: WebhookSender | None = current_app.extensions.get("webhook")
    return found


@bp.post("/v1/decisions/<decision_id>/appeal")
@api_key_required
def appeal(decision_id: str) -> Any:
    reason = parse_appeal(request.mimetype, request.get_data(cache=False))
    try:
        item = queue().appeal(decision_id, reason)
    except ReviewError as e:
        raise request_error(e) from e
    return jsonify(item.model_dump(mode="json")), 201


@bp.post("/v1/reviews/claim")
@reviewer_required
def claim() -> Any:
    item = queue().claim(g.reviewer, lease_s=settings().review_lease_s,
                         priority=settings().review_order)
    if item is None:
        return Response(status=204)
    return jsonify(item_view(holder(), store(), item, settings().image_url_template))


@bp.post("/v1/reviews/<int:item_id>")
@reviewer_required
def decide(item_id: int) -> Any:
    violations, note = parse_verdict(request.mimetype, request.get_data(cache=False))
    verdict = record_verdict(queue(), holder(), sender(), item_id, g.reviewer, violations, note)
    return jsonify(verdict.model_dump(mode="json")), 201


@bp.post("/v1/reviews/<int:item_id>/release")
@reviewer_required
def release(item_id: int) -> Any:
    try:
        item = queue().release(item_id, g.reviewer)
    except ReviewError as e:
        raise request_error(e) from e
    return jsonify(item.model_dump(mode="json"))


@bp.get("/v1/reviews")
@reader_or_reviewer_required
def verdicts() -> Any:
    args = request.args
    reason = args.get("reason")
    if reason is not None and reason not in REASONS:
        raise RequestError(400, "invalid_field", f"reason must be one of {', '.join(REASONS)}")
    limit = int_arg("limit", 100, 1, 500)
    offset = int_arg("offset", 0, 0, 1_000_000)
    found = queue().verdicts(VerdictFilters(
        since=time_arg("since"), until=time_arg("until"), reviewer=args.get("reviewer"),
        reason=reason, category=args.get("category"),
        policy_version=args.get("policy_version"), decision_id=args.get("decision_id"),
    ), limit=limit + 1, offset=offset)
    page = VerdictPage(verdicts=found[:limit],
                       next_offset=offset + limit if len(found) > limit else None)
    return jsonify(page.model_dump(mode="json"))


@bp.get("/v1/reviews/queue")
@reader_or_reviewer_required
def counts() -> Any:
    return jsonify(queue().counts())


@bp.get("/v1/quality")
@reader_required
def quality() -> Any:
    return jsonify(quality_report(holder(), store(), settings().quality_min_verdicts,
                                  since=time_arg("since"), until=time_arg("until"),
                                  policy_version=request.args.get("policy_version")))
