"""``/dashboard`` (reader), ``/dashboard/policies`` (reader: the policy history),
``/dashboard/search`` (reader: search the log by text, decision or image),
``/dashboard/lab`` (admin: dry-run a policy edit) and ``/dashboard/review`` (a reviewer: claim,
see, decide, next); the pages are rendered by :mod:`service.dashboard`."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, redirect, request, url_for

from decisionlog.reviews import VerdictFilters
from moderation import ModerationError

from ..auth import admin_page_required, reader_page_required, reviewer_page_required, sign_in
from ..dashboard import (
    active_text,
    render_dashboard,
    render_history,
    render_lab,
    render_review,
    render_search,
    search_csv,
)
from ..lab import run_dry_run
from ..parsing import IMAGE_FIELD, DryRunRequest, RequestError, free_text, parse_search
from ..reviews import item_view, quality_report, record_verdict
from ..schemas import MAX_ROW_ID
from ..search import run_search
from ..security import same_origin_required
from . import holder, int_arg, reviews, settings, store

bp = Blueprint("dashboard", __name__)


def _page(html: str, status: int = 200) -> Response:
    return Response(html, status=status, mimetype="text/html")  # headers: service.security


@bp.get("/dashboard")
@reader_page_required
def dashboard() -> Any:
    active = holder().current()
    quality = quality_report(holder(), store(), settings().quality_min_verdicts, since=None,
                             until=None, policy_version=None)
    return _page(render_dashboard(active, store(), quality,
                                  hours=int_arg("hours", 48, 1, 24 * 90)))


@bp.get("/dashboard/policies")
@reader_page_required
def history() -> Any:
    return _page(render_history(holder(), store()))


@bp.route("/dashboard/search", methods=["GET", "POST"])
@reader_page_required
def search() -> Any:
    """GET: the form, and with ``q`` or ``like`` its hits (the query string of /v1/search).
    POST (a plain multipart form): an uploaded image as the query, the filters beside it."""
    fields = request.form if request.method == "POST" else request.args
    form = {k: v.strip() for k, v in fields.items() if k != "token" and v.strip()}
    image = request.files.get(IMAGE_FIELD) if request.method == "POST" else None
    if image is not None:  # the image is the query (the form's text box goes along)
        form = {k: v for k, v in form.items() if k not in ("q", "raw", "like", "offset")}
    if image is None and "q" not in form and "like" not in form:
        return _page(render_search(holder(), form=form))
    if "raw" in form:
        form["raw"] = "true"
    try:
        parsed = parse_search(form, image=image is not None)
        result = run_search(holder(), store(), parsed,
                            image=image.read() if image is not None else None,
                            ef_search=settings().search_ef_search)
    except ModerationError as e:  # a bad parameter, an unreadable image: shown on the page
        error = {"code": e.code, "message": e.message}
        return _page(render_search(holder(), form=form, error=error), e.status)
    if parsed.format == "csv":  # the page's export link (/v1/search takes bearer tokens only)
        return Response(search_csv(result), mimetype="text/csv")
    return _page(render_search(holder(), form=form, result=result,
                               image_template=settings().image_url_template))


@bp.route("/dashboard/lab", methods=["GET", "POST"])
@admin_page_required
def lab() -> Any:
    """GET: the form, with the active policy's text. POST (a plain form; the policy pasted,
    or uploaded as ``policy_file``): the same form with the dry-run's result below it."""
    if request.method == "GET":
        return _page(render_lab(holder(), text=active_text(holder()), since="7d", until="",
                                limit=20))
    form = request.form
    upload = request.files.get("policy_file")
    text = form.get("policy", "")
    if upload is not None and upload.filename:
        text = upload.read().decode("utf-8", errors="replace")
    since, until = form.get("since", "7d").strip(), form.get("until", "").strip()
    try:
        limit = min(max(int(form.get("limit", "20")), 0), 500)
    except ValueError:
        limit = 20
    shown: dict[str, Any] = {"text": text, "since": since, "until": until, "limit": limit}
    try:
        report = run_dry_run(holder(), store(), DryRunRequest(
            policy=text, since=since or None, until=until or None, limit=limit),
            limits=settings().policy_limits)
    except ModerationError as e:  # shown on the page, with a policy's faults
        error = {"code": e.code, "message": e.message,
                 "faults": e.details().get("faults", [])}
        return _page(render_lab(holder(), error=error, **shown), e.status)
    return _page(render_lab(holder(), report=report, **shown))


@bp.get("/dashboard/review")
@reviewer_page_required
@same_origin_required  # it claims an item
def review() -> Any:
    """Claim the next item (or the one held) and show it; ``?done=`` names the verdict just
    recorded."""
    item = reviews.queue().claim(g.reviewer, lease_s=settings().review_lease_s,
                                 priority=settings().review_order)
    shown = (item_view(holder(), store(), item, settings().image_url_template)
             if item is not None else None)
    done = None
    verdict_id = _row_id(request.args.get("done", ""))
    if verdict_id is not None:  # anything else is no verdict of this reviewer's
        found = reviews.queue().verdicts(VerdictFilters(reviewer=g.reviewer),
                                         verdict_id=verdict_id)
        done = found[0] if found else None
    return _page(render_review(g.reviewer, shown, reviews.queue().counts(), done=done))


def _row_id(value: str) -> int | None:
    """An id a row can have (ASCII digits, 1 to 2**63 - 1), else ``None``."""
    if value.isascii() and value.isdigit() and len(value) <= 19 and 0 < int(value) <= MAX_ROW_ID:
        return int(value)
    return None


@bp.post("/dashboard/review/<item_id>")
@reviewer_page_required
def review_decide(item_id: str) -> Any:
    """A plain form post: ``violation`` (repeated), ``note``, ``do=decide|skip``; then the
    next item (303 to the page)."""
    form = request.form
    try:
        if (found_id := _row_id(item_id)) is None:
            raise RequestError(404, "not_found", f"no review item {item_id[:40]!r}")
        if form.get("do") == "skip":
            reviews.queue().release(found_id, g.reviewer)
            return redirect(url_for("dashboard.review"), 303)
        verdict = record_verdict(reviews.queue(), holder(), reviews.sender(), found_id,
                                 g.reviewer, form.getlist("violation"),
                                 free_text(form.get("note"), "note"))
    except ModerationError as e:  # shown on the page
        error = {"code": e.code, "message": e.message}
        return _page(render_review(g.reviewer, None, reviews.queue().counts(), error=error),
                     e.status)
    return redirect(url_for("dashboard.review", done=verdict.verdict_id), 303)


@bp.post("/dashboard/sign-in")
def sign_in_page() -> Any:
    """The answer to "which identity?" (a token link while signed in as someone else)."""
    return sign_in()
