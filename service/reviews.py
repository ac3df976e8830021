"""Review: appeals (API key), claims and verdicts (reviewers), the verdicts and the queue's
counts (readers and reviewers), ``/v1/quality`` (readers), and the review page
(``/dashboard/review``: claim, see, decide, next); what a claimed item shows and how a
verdict is checked. The webhook that delivers verdicts is :mod:`service.webhooks`."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, g, jsonify, redirect, render_template, request, url_for

from decisionlog import DecisionStore
from decisionlog.quality import quality as estimate_quality
from decisionlog.reviews import (
    ReviewItem,
    ReviewQueue,
    UnknownItem,
    Verdict,
    VerdictFilters,
)
from moderation import ModerationError, PolicyError
from moderation.policy import Policy

from . import banks, pages
from .auth import reviewer_page_required
from .contract import Access, Answer, Body, json_body, operation
from .pages import page
from .parsing import RequestError, free_text
from .resources import holder, queue, sender, settings, store
from .schemas import (
    MAX_ROW_ID,
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
from .security import same_origin_required
from .state import PolicyHolder
from .webhooks import WebhookSender

__all__ = ["bp", "decision_policy", "image_url", "item_view", "quality_report",
           "record_verdict"]

bp = Blueprint("reviews", __name__)


def decision_policy(holder: PolicyHolder, version: str) -> Policy:
    """The policy a decision was made with (its categories are what a verdict names); the
    active one when the log does not have that version's text, or it no longer validates."""
    try:
        stored = holder.stored_policy(version)
    except PolicyError:
        stored = None
    return stored if stored is not None else holder.current().policy


def image_url(template: str | None, client_id: str | None, decision_id: str) -> str | None:
    """The image in the client's own store (MODERATION_IMAGE_URL_TEMPLATE, with
    ``{client_id}`` and ``{decision_id}`` filled in, URL-quoted), or ``None``."""
    from urllib.parse import quote

    if not template or (client_id is None and "{client_id}" in template):
        return None
    return (template.replace("{client_id}", quote(client_id or "", safe="/"))
            .replace("{decision_id}", quote(decision_id, safe="")))


def item_view(holder: PolicyHolder, store: DecisionStore, item: ReviewItem,
              image_template: str | None) -> dict[str, Any]:
    """A claimed item as a reviewer sees it: the item, the decision (scores, margins, top
    terms, the decided frame), the categories a verdict may name, and the image's address."""
    record = store.get(item.decision_id)
    policy = decision_policy(holder, item.policy_version)
    return {
        **item.model_dump(mode="json"),
        "decision": record.view() if record is not None else None,
        "categories": [{"id": cid, "action": c.action, "description": c.description}
                       for cid, c in policy.categories.items()],
        "image_url": image_url(image_template, record.client_id if record else None,
                               item.decision_id),
    }


def record_verdict(queue: ReviewQueue, holder: PolicyHolder, sender: WebhookSender | None,
                   item_id: int, reviewer: str, violations: list[str],
                   note: str | None) -> Verdict:
    """Validate against the decision's policy and record (into the outbox too when a webhook
    is set, and the sender is woken). Raises :class:`decisionlog.reviews.ReviewError`."""
    item = queue.item(item_id)
    if item is None:
        raise UnknownItem(f"no review item {item_id}")
    policy = decision_policy(holder, item.policy_version)
    actions = {cid: c.action for cid, c in policy.categories.items()}
    verdict = queue.decide(item_id, reviewer, violations, actions, note=note,
                           webhook=sender is not None)  # a ReviewError says which rule
    if sender is not None:
        sender.wake()
    return verdict


def quality_report(holder: PolicyHolder, store: DecisionStore, min_verdicts: int, *,
                   since: float | None, until: float | None,
                   policy_version: str | None) -> dict[str, Any]:
    """What /v1/quality answers and the dashboard's panel shows (default window: 30 days)."""
    since = time.time() - 30 * 86400 if since is None else since
    policy = (decision_policy(holder, policy_version) if policy_version is not None
              else holder.current().policy)
    report = estimate_quality(store.engine, list(policy.categories), since=since, until=until,
                     policy_version=policy_version, min_verdicts=min_verdicts)
    return QualityResponse.model_validate({
        "since": since, "until": until, "policy_version": policy_version,
        "verdicts": report.verdicts, "appeals": report.appeals, "queued": report.queued,
        "decided": report.decided, "categories": report.categories,
    }).model_dump(mode="json")


# --- the API ----------------------------------------------------------------------------


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
    if given.add_to_bank is not None:
        banks.bank_store().bank(given.add_to_bank)  # 404 before anything is recorded
    verdict = record_verdict(queue(), holder(), sender(), item_id, g.reviewer,
                             given.violations, note)
    if given.add_to_bank is not None:
        banks.add_decision(given.add_to_bank, verdict.decision_id, g.reviewer, note)
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


# --- the review page --------------------------------------------------------------------


@pages.bp.get("/dashboard/review")
@reviewer_page_required
@same_origin_required  # it claims an item
def review() -> Any:
    """Claim the next item (or the one held) and show it; ``?done=`` names the verdict just
    recorded."""
    item = queue().claim(g.reviewer, lease_s=settings().review_lease_s,
                                 priority=settings().review_order)
    shown = (item_view(holder(), store(), item, settings().image_url_template)
             if item is not None else None)
    done = None
    verdict_id = _row_id(request.args.get("done", ""))
    if verdict_id is not None:  # anything else is no verdict of this reviewer's
        found = queue().verdicts(VerdictFilters(reviewer=g.reviewer),
                                         verdict_id=verdict_id)
        done = found[0] if found else None
    return page(render_review(g.reviewer, shown, queue().counts(), done=done))


def _row_id(value: str) -> int | None:
    """An id a row can have (ASCII digits, 1 to 2**63 - 1), else ``None``."""
    if value.isascii() and value.isdigit() and len(value) <= 19 and 0 < int(value) <= MAX_ROW_ID:
        return int(value)
    return None


@pages.bp.post("/dashboard/review/<item_id>")
@reviewer_page_required
def review_decide(item_id: str) -> Any:
    """A plain form post: ``violation`` (repeated), ``note``, ``do=decide|skip``; then the
    next item (303 to the page)."""
    form = request.form
    try:
        if (found_id := _row_id(item_id)) is None:
            raise RequestError(404, "not_found", f"no review item {item_id[:40]!r}")
        if form.get("do") == "skip":
            queue().release(found_id, g.reviewer)
            return redirect(url_for("dashboard.review"), 303)
        bank = form.get("bank") or None
        if bank is not None:
            banks.bank_store().bank(bank)  # an unknown bank: shown, nothing recorded
        note = free_text(form.get("note"), "note")
        verdict = record_verdict(queue(), holder(), sender(), found_id,
                                 g.reviewer, form.getlist("violation"), note)
        if bank is not None:
            banks.add_decision(bank, verdict.decision_id, g.reviewer, note)
    except ModerationError as e:  # shown on the page
        error = {"code": e.code, "message": e.message}
        return page(render_review(g.reviewer, None, queue().counts(), error=error),
                     e.status)
    return redirect(url_for("dashboard.review", done=verdict.verdict_id), 303)


def render_review(reviewer: str, item: dict[str, Any] | None, counts: dict[str, Any], *,
                  done: Any = None, error: dict[str, Any] | None = None) -> str:
    return render_template("review.html", reviewer=reviewer, item=item, counts=counts,
                           done=done, error=error, when=pages.when,
                           view_text=pages.view_text, banks=banks.bank_store().banks())
