"""``/dashboard`` (reader): the page itself is rendered by :mod:`service.dashboard`."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from ..auth import TOKEN_COOKIE, reader_required
from ..dashboard import render_dashboard
from . import holder, int_arg, store

bp = Blueprint("dashboard", __name__)


@bp.get("/dashboard")
@reader_required
def dashboard() -> Any:
    active = holder().current()
    page = render_dashboard(active, store(), hours=int_arg("hours", 48, 1, 24 * 90))
    response = Response(page, mimetype="text/html")
    token = request.args.get("token")
    if token:  # keep the page reloadable without the token in the address bar
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
    return response
