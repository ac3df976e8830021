"""Who may call what: decorators for views, as flaskr's ``login_required``.

Two kinds. The API's (``api_key_required``, ``admin_required``, ``reader_required``,
``reviewer_required``, ``reader_or_reviewer_required``) take a token from ``Authorization:
Bearer`` (or ``X-API-Key``) only: never ``?token=`` (it would end up in logs and histories) nor
the dashboard cookie (a browser would send it to ``/v1`` on another site's behalf). The
dashboard pages' (``*_page_required``) also take a ``?token=`` link once, then the cookie it
leaves; they refuse a state-changing request another origin made (:mod:`service.security`), and
a link never silently replaces a different identity the browser is signed in with:

- a link followed from another site (``Sec-Fetch-Site: cross-site`` or ``same-site``: a
  ``SameSite=Strict`` cookie is not sent, so who is signed in cannot be seen) first gets a
  one-step continue page that opens the same address from this origin;
- when the cookie holds another valid token than the link, the page is not shown: a 409 page
  names both identities and asks (stay, or sign in with the link's token: a same-origin form
  post to ``/dashboard/sign-in``).

Tokens and keys come from the settings; every comparison is constant-time and checks every
secret (no early exit on a match). A route whose token is not configured answers 403 (it is
disabled), a wrong or missing token 401.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode

from flask import Response, g, redirect, render_template, request, url_for

from .parsing import RequestError
from .security import (
    SAFE_METHODS,
    TOKEN_COOKIE,
    cross_origin,
    refuse_cross_origin,
    remember_token,
)
from .settings import Settings, current_settings

__all__ = [
    "TOKEN_COOKIE", "admin_page_required", "admin_required", "api_key_required",
    "reader_or_reviewer_required", "reader_page_required", "reader_required",
    "reviewer_page_required", "reviewer_required", "sign_in",
]

F = TypeVar("F", bound=Callable[..., Any])
BEARER = "Authorization: Bearer <token>"


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


def _api_how(how: str) -> str:
    """How to authenticate, and why a ``?token=`` or the cookie did not count."""
    if _bearer() is None and ("token" in request.args or TOKEN_COOKIE in request.cookies):
        return f"{how}; ?token= and the dashboard cookie are for /dashboard pages only"
    return how


@dataclass(frozen=True)
class _Access:
    """Who may use a set of routes: their tokens, the setting that enables them."""

    what: str
    setting: str
    tokens: Callable[[Settings], list[str]]

    def require(self, given: str | None, how: str) -> None:
        _require(self.tokens(current_settings()), given, self.setting, self.what, how)


ADMIN = _Access("admin", "MODERATION_ADMIN_TOKEN",
                lambda s: [s.admin_token] if s.admin_token else [])
READER = _Access("reader", "MODERATION_READER_TOKEN",
                 lambda s: [t for t in (s.reader_token, s.admin_token) if t])
REVIEWER = _Access("reviewer", "MODERATION_REVIEWERS", lambda s: list(s.reviewer_tokens.values()))
READER_OR_REVIEWER = _Access(
    "reader", "MODERATION_READER_TOKEN or MODERATION_REVIEWERS",
    lambda s: READER.tokens(s) + REVIEWER.tokens(s))


def _reviewer(given: str | None) -> str | None:
    """The reviewer whose token ``given`` is: every token compared, in constant time."""
    found = None
    given_bytes = (given or "").encode()
    for name, token in current_settings().reviewer_tokens.items():
        if hmac.compare_digest(given_bytes, token.encode()) and given is not None:
            found = name
    return found


def _identity(token: str | None) -> str | None:
    """Who ``token`` signs in as ("admin", "reader", "reviewer ann"), or None."""
    settings = current_settings()
    known = [("admin", settings.admin_token), ("reader", settings.reader_token)]
    known += [(f"reviewer {name}", t) for name, t in settings.reviewer_tokens.items()]
    found = None
    for label, secret in known:
        if secret and _matches(token, [secret]) and found is None:
            found = label
    return found


# --- the API's decorators: bearer tokens only ----------------------------------------------


def _api(access: _Access, how: str) -> Callable[[F], F]:
    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            access.require(_bearer(), _api_how(how))
            return view(*args, **kwargs)

        return wrapped  # type: ignore[return-value]

    return decorator


def api_key_required(view: F) -> F:
    """When MODERATION_API_KEYS is set, one of its keys is required."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        keys = current_settings().api_key_list
        if keys and not _matches(_bearer(), keys):
            raise RequestError(
                401, "unauthorized",
                f"a valid API key is required ({_api_how('Authorization: Bearer <key>')})"
            )
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def api_key_owner() -> str:
    """Who submitted work with this request's API key, as a job records it: ``api`` when the
    service has no keys, else a fingerprint of the key (never the key)."""
    if not current_settings().api_key_list:
        return "api"
    digest = hashlib.sha256((_bearer() or "").encode()).hexdigest()[:16]
    return f"api-key:{digest}"


admin_required = _api(ADMIN, BEARER)
reader_required = _api(READER, BEARER)
reader_or_reviewer_required = _api(READER_OR_REVIEWER,
                                   "Authorization: Bearer <reader or reviewer token>")


def reviewer_required(view: F) -> F:
    """A reviewer's token (MODERATION_REVIEWERS); the view finds the name in ``g.reviewer``."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        given = _bearer()
        REVIEWER.require(given, _api_how("Authorization: Bearer <your reviewer token>"))
        g.reviewer = _reviewer(given)
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


# --- the dashboard pages' decorators: also ?token= once, then the cookie ------------------


def _without_token() -> str:
    """This page's address without its ``?token=``."""
    rest = [(k, v) for k, v in request.args.items(multi=True) if k != "token"]
    return request.path + (f"?{urlencode(rest)}" if rest else "")


def _page_credential(access: _Access) -> tuple[str | None, Response | None]:
    """The token this page request signs in with, or the page to answer instead of the view
    (the continue page, or the question when the link and the cookie disagree)."""
    if request.method not in SAFE_METHODS:
        refuse_cross_origin()
    given = _bearer()
    if given is not None:
        return given, None
    link, cookie = request.args.get("token"), request.cookies.get(TOKEN_COOKIE)
    if link is None:
        return cookie, None
    if cross_origin() is not None:  # followed from another site: the cookie may be withheld
        return None, Response(render_template("token_link.html", ask=False,
                                              again=request.full_path), mimetype="text/html")
    if link != cookie and _matches(link, access.tokens(current_settings())):
        signed_in = _identity(cookie)
        if signed_in is not None:
            page = render_template(
                "token_link.html", ask=True, signed_in=signed_in, link_identity=_identity(link),
                token=link, stay=_without_token())
            return None, Response(page, status=409, mimetype="text/html")
    access.require(link, f"?token=<{access.what} token> for the page")
    remember_token(link)
    return link, None


def _page(access: _Access) -> Callable[[F], F]:
    how = f"{BEARER}, or ?token=<{access.what} token> for the page"

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            given, answer = _page_credential(access)
            if answer is not None:
                return answer
            access.require(given, how)
            if access is REVIEWER:
                g.reviewer = _reviewer(given)
            return view(*args, **kwargs)

        return wrapped  # type: ignore[return-value]

    return decorator


#: A dashboard page for readers (the admin token works too).
reader_page_required = _page(READER)
#: A dashboard page for the admin.
admin_page_required = _page(ADMIN)
#: A dashboard page for a reviewer; the view finds the name in ``g.reviewer``.
reviewer_page_required = _page(REVIEWER)


def sign_in() -> Any:
    """The answer to the question page: sign in with the link's token (form fields ``token``
    and ``next``, a dashboard address), replacing the cookie; same origin only."""
    refuse_cross_origin()
    token = request.form.get("token", "")
    if _identity(token) is None:
        raise RequestError(401, "unauthorized", "the token is not one this server knows")
    after = request.form.get("next", "")
    if not after.startswith("/dashboard"):  # this server's pages only
        after = url_for("dashboard.dashboard")
    remember_token(token)
    return redirect(after, 303)
