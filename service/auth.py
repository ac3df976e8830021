"""Who may call what: decorators for views, as flaskr's ``login_required``.

Tokens and keys come from the settings; every comparison is constant-time and checks every
secret (no early exit on a match). A route whose token is not configured answers 403 (it is
disabled), a wrong or missing token 401.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from typing import Any, TypeVar

from flask import g, request

from .parsing import RequestError
from .settings import current_settings

__all__ = [
    "TOKEN_COOKIE", "admin_page_required", "admin_required", "api_key_required",
    "reader_or_reviewer_required", "reader_required", "reviewer_required",
]

F = TypeVar("F", bound=Callable[..., Any])
TOKEN_COOKIE = "moderation_token"


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer ") :].strip()
    return request.headers.get("X-API-Key")


def _matches(given: str | None, secrets: list[str]) -> bool:
    given_bytes = (given or "").encode()
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(given_bytes, secret.encode())
    return found and given is not None


def _require(tokens: list[str], given: str | None, setting: str, what: str, how: str) -> None:
    """403 while ``setting`` configures no token; 401 unless ``given`` matches one."""
    if not tokens:
        raise RequestError(
            403, f"{what}_disabled", f"{what} routes are disabled: set {setting} to enable them"
        )
    if not _matches(given, tokens):
        raise RequestError(401, "unauthorized", f"the {what} token is required ({how})")


def api_key_required(view: F) -> F:
    """When MODERATION_API_KEYS is set, one of its keys is required."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        keys = current_settings().api_key_list
        if keys and not _matches(_bearer(), keys):
            raise RequestError(
                401, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)"
            )
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def admin_required(view: F) -> F:
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        token = current_settings().admin_token
        _require([token] if token else [], _bearer(), "MODERATION_ADMIN_TOKEN", "admin",
                 "Authorization: Bearer <token>")
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def reader_required(view: F) -> F:
    """The reader token, or the admin token; also from ``?token=`` or the dashboard cookie."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        settings = current_settings()
        tokens = [t for t in (settings.reader_token, settings.admin_token) if t]
        given = _bearer() or request.args.get("token") or request.cookies.get(TOKEN_COOKIE)
        _require(tokens, given, "MODERATION_READER_TOKEN", "reader",
                 "Authorization: Bearer <token>, or ?token= for the dashboard")
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def admin_page_required(view: F) -> F:
    """The admin token for a dashboard page: also from ``?token=`` or the dashboard cookie
    (``SameSite=Strict``: another site's form cannot send it)."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        token = current_settings().admin_token
        given = _bearer() or request.args.get("token") or request.cookies.get(TOKEN_COOKIE)
        _require([token] if token else [], given, "MODERATION_ADMIN_TOKEN", "admin",
                 "Authorization: Bearer <token>, or ?token=<admin token> for the page")
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def _given() -> str | None:
    return _bearer() or request.args.get("token") or request.cookies.get(TOKEN_COOKIE)


def _reviewer(given: str | None) -> str | None:
    """The reviewer whose token ``given`` is: every token compared, in constant time."""
    found = None
    given_bytes = (given or "").encode()
    for name, token in current_settings().reviewer_tokens.items():
        if hmac.compare_digest(given_bytes, token.encode()) and given is not None:
            found = name
    return found


def reviewer_required(view: F) -> F:
    """A reviewer's token (MODERATION_REVIEWERS); the view finds the name in ``g.reviewer``.
    Also from ``?token=`` or the dashboard cookie, for the review page."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        tokens = list(current_settings().reviewer_tokens.values())
        given = _given()
        _require(tokens, given, "MODERATION_REVIEWERS", "reviewer",
                 "Authorization: Bearer <your reviewer token>")
        g.reviewer = _reviewer(given)
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def reader_or_reviewer_required(view: F) -> F:
    """What reviewers and readers both see (verdicts, the queue's counts)."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        settings = current_settings()
        tokens = [t for t in (settings.reader_token, settings.admin_token) if t]
        tokens += list(settings.reviewer_tokens.values())
        _require(tokens, _given(), "MODERATION_READER_TOKEN or MODERATION_REVIEWERS", "reader",
                 "Authorization: Bearer <reader or reviewer token>")
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
