"""The dashboard's pages share this blueprint (``dashboard``), registered by the area each
page belongs to, beside its API: the overview in :mod:`service.decisions`, search in
:mod:`service.search`, the policy history and the lab in :mod:`service.policy`, review in
:mod:`service.reviews`. Server-rendered HTML with inline SVG charts (no front-end build step;
one small script gives the review page its keys, and the page works without it)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Blueprint, Response

from .auth import sign_in

__all__ = ["bp", "page", "view_text", "when"]

bp = Blueprint("dashboard", __name__)


def page(html: str, status: int = 200) -> Response:
    return Response(html, status=status, mimetype="text/html")  # headers: service.security


def when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def view_text(view: Any) -> str:
    """A view (a record's ``view``: frame, time, box) in words: "frame 3 at 12.0 s, crop
    (900, 600)–(1060, 760)"."""
    get = view.get if isinstance(view, dict) else lambda k: getattr(view, k, None)
    text = f"frame {get('frame')}"
    if get("time") is not None:
        text += f" at {get('time'):.1f} s"
    box = get("box")
    if box:
        text += f", crop ({box[0]}, {box[1]})–({box[2]}, {box[3]})"
    return text


@bp.post("/dashboard/sign-in")
def sign_in_page() -> Any:
    """The answer to "which identity?" (a token link while signed in as someone else)."""
    return sign_in()
