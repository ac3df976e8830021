"""The review queue over HTTP: appeals (API key), claims and verdicts (reviewers), the
verdicts and the queue's counts (readers and reviewers), and ``/v1/quality`` (readers)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from decisionlog.reviews import ReviewItem, ReviewQueue, Verdict, VerdictFilters

from ..contract import Access, Answer, Body, json_body, operation
from ..reviews import WebhookSender, item_view, quality_report, record_verdict
from ..schemas import (
    AppealJSON,
    DecisionPath,
    ItemPath,
    QualityQuery,
    QualityResponse,
    QueueCounts,
    ReviewClaim,
    VerdictJSON,
    VerdictPage,
    VerdictsQuery,
)
from . import holder, settings, store

bp = Blueprint("reviews", __name__)


def queue() -> ReviewQueue:
    found: ReviewQueue = current_app.extensions["reviews"]
    return found


def sender() -> WebhookSender | None:
    found: WebhookSender | None = current_app.extensions.get("webhook")
    return found


@operation(bp, "/v1/decisions/<decision_id>/appeal", "POST", operation_id="appeal_decision",
           access=Access.API_KEY, summary="Appeal a decision: a reviewer looks again (one "
           "appeal per decision)", path=DecisionPath,
           body=Body({"application/json": AppealJSON}, required=False,
                     description="optional: the reason"),
           answers=(Answer(201, "The appeal, queued", {"application/json": ReviewItem}),),
           errors=(409, 422))
def appeal(decision_id: str) -> Any:
    reason = None
    if request.get_data(cache=True).strip():  # an empty body: no reason
        reason = json_body(AppealJSON).reason
    reason = reason.strip() or None if reason else None
    item = queue().appeal(decision_id, reason)  # a ReviewError says which rule
    return jsonify(item.model_dump(mode="json")), 201


@operation(bp, "/v1/reviews/claim", "POST", operation_id="claim_review",
           access=Access.REVIEWER, summary="The next item for this reviewer, leased",
           description="Appeals, then review actions, then audit samples "
           "(MODERATION_REVIEW_PRIORITY), oldest first; an item you already hold is handed to "
           "you again. Never handed to two reviewers at once.",
           answers=(Answer(200, "The item, yours until its lease expires",
                           {"application/json": ReviewClaim}),
                    Answer(204, "Nothing waits")))
def claim() -> Any:
    item = queue().claim(g.reviewer, lease_s=settings().review_lease_s,
                         priority=settings().review_order)
    if item is None:
        return Response(status=204)
    return jsonify(item_view(holder(), store(), item, settings().image_url_template))


@operation(bp, "/v1/reviews/<int:item_id>", "POST", operation_id="record_verdict",
           access=Access.REVIEWER, summary="Record the verdict on an item you hold",
           path=ItemPath, body=Body({"application/json": VerdictJSON}),
           answers=(Answer(201, "The verdict", {"application/json": Verdict}),), errors=(409,))
def decide(item_id: int) -> Any:
    given = json_body(VerdictJSON)
    note = given.note.strip() or None if given.note else None
    verdict = record_verdict(queue(), holder(), sender(), item_id, g.reviewer,
                             given.violations, note)
    return jsonify(verdict.model_dump(mode="json")), 201


@operation(bp, "/v1/reviews/<int:item_id>/release", "POST", operation_id="release_review",
           access=Access.REVIEWER, summary="Give an item you hold back to the queue",
           path=ItemPath,
           answers=(Answer(200, "The item, waiting again", {"application/json": ReviewItem}),),
           errors=(409,))
def release(item_id: int) -> Any:
    item = queue().release(item_id, g.reviewer)  # a ReviewError says which rule
    return jsonify(item.model_dump(mode="json"))


@operation(bp, "/v1/reviews", "GET", operation_id="list_verdicts",
           access=Access.READER_OR_REVIEWER, summary="Verdicts, newest first",
           query=VerdictsQuery,
           answers=(Answer(200, "A page of verdicts, each with its webhook delivery",
                           {"application/json": VerdictPage}),))
def verdicts(query: VerdictsQuery) -> Any:
    found = queue().verdicts(VerdictFilters(
        since=query.since, until=query.until, reviewer=query.reviewer, reason=query.reason,
        category=query.category, policy_version=query.policy_version,
        decision_id=query.decision_id,
    ), limit=query.limit + 1, offset=query.offset)
    page = VerdictPage(verdicts=found[:query.limit],
                       next_offset=query.offset + query.limit if len(found) > query.limit
                       else None)
    return jsonify(page.model_dump(mode="json"))


@operation(bp, "/v1/reviews/queue", "GET", operation_id="review_queue",
           access=Access.READER_OR_REVIEWER,
           summary="Items by reason and state, and webhook deliveries by state",
           answers=(Answer(200, "Counts", {"application/json": QueueCounts}),))
def counts() -> Any:
    return jsonify(queue().counts())


@operation(bp, "/v1/quality", "GET", operation_id="get_quality", access=Access.READER,
           summary="Precision and recall per category on live traffic, from verdicts",
           description="Weighted by the inverse of each decision's chance to be reviewed "
           "(README: Quality); 95% intervals; appeals counted apart.", query=QualityQuery,
           answers=(Answer(200, "Estimates", {"application/json": QualityResponse}),))
def quality(query: QualityQuery) -> Any:
    return jsonify(quality_report(holder(), store(), settings().quality_min_verdicts,
                                  since=query.since, until=query.until,
                                  policy_version=query.policy_version))
