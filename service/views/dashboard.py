"""``/dashboard`` (reader), ``/dashboard/policies`` (reader: the policy history),
``/dashboard/search`` (reader: search the log by text, decision or image) and
``/dashboard/lab`` (admin: dry-run a policy edit); the pages are rendered by
:mod:`service.dashboard`."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from moderation import ImageError

from ..auth import TOKEN_COOKIE, admin_page_required, reader_required
from ..dashboard import active_text, render_dashboard, render_history, render_lab, render_search
from ..errors import IMAGE_ERROR_STATUS
from ..lab import run_dry_run
from ..parsing import IMAGE_FIELD, DryRunRequest, RequestError, parse_search
from ..search import run_search
from . import holder, int_arg, settings, store

bp = Blueprint("dashboard", __name__)


def _page(html: str, status: int = 200) -> Response:
    response = Response(html, status=status, mimetype="text/html")
    token = request.args.get("token")
    if token:  # keep the pages reloadable without the token in the address bar
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
    return response


@bp.get("/dashboard")
@reader_required
def dashboard() -> Any:
    active = holder().current()
    return _page(render_dashboard(active, store(), hours=int_arg("hours", 48, 1, 24 * 90)))


@bp.get("/dashboard/policies")
@reader_required
def history() -> Any:
    return _page(render_history(holder(), store()))


@bp.route("/dashboard/search", methods=["GET", "POST"])
@reader_required
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
    except (RequestError, ImageError) as e:
        status = (e.status if isinstance(e, RequestError)
                  else IMAGE_ERROR_STATUS.get(e.code, 400))
        error = {"code": e.code, "message": e.message}
        return _page(render_search(holder(), form=form, error=error), status)
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
            policy=text, since=since or None, until=until or None, limit=limit))
    except RequestError as e:
        error = {"code": e.code, "message": e.message, "faults": e.extra.get("faults", [])}
        return _page(render_lab(holder(), error=error, **shown), e.status)
    return _page(render_lab(holder(), report=report, **shown))
