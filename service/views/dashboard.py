"""``/dashboard`` (reader), ``/dashboard/policies`` (reader: the policy history) and
``/dashboard/lab`` (admin: dry-run a policy edit); the pages are rendered by
:mod:`service.dashboard`."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from ..auth import TOKEN_COOKIE, admin_page_required, reader_required
from ..dashboard import active_text, render_dashboard, render_history, render_lab
from ..lab import run_dry_run
from ..parsing import DryRunRequest, RequestError
from . import holder, int_arg, store

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
