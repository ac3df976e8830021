"""What keeps the dashboard safe in a browser: requests another site made are refused where
they would change something, every answer carries the headers that keep pages from being
framed, sniffed or leaking their address, the pages run no script or style without this
request's nonce, and the dashboard cookie is ``Secure`` when the request came over https.

Whether it did is the request's own scheme, or ``X-Forwarded-Proto`` from as many proxies as
``MODERATION_TRUSTED_PROXIES`` says there are in front (werkzeug's ``ProxyFix``); no proxy
header is believed otherwise.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import Flask, Response, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from .parsing import RequestError
from .settings import current_settings

__all__ = ["TOKEN_COOKIE", "cross_origin", "csp_nonce", "init_app", "refuse_cross_origin",
           "remember_token", "same_origin_required"]

F = TypeVar("F", bound=Callable[..., Any])
TOKEN_COOKIE = "moderation_token"
#: Methods that change nothing; any other is refused from another origin where it is checked.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": "80", "https": "443"}
#: Every answer that is not an HTML page: nothing in it may load or be framed.
STRICT_CSP = "default-src 'none'; frame-ancestors 'none'"
COMMON_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # page addresses may carry ?token=
}


def _authority(scheme: str, netloc: str) -> str:
    """``host[:port]``, lower-case, without the scheme's default port."""
    host, port = netloc.lower(), ""
    if host.rfind(":") > host.rfind("]"):  # a port (an IPv6 address is in brackets)
        host, _, port = host.rpartition(":")
    return host if port in ("", DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"


def cross_origin() -> str | None:
    """Why this request came from another origin than this server's, or None when it came
    from this origin, or cannot tell (no ``Origin`` and no ``Sec-Fetch-Site``: curl, scripts).

    ``Origin`` is compared with the request's own ``Host`` (host and port: behind a proxy that
    terminates TLS the service may see http while the browser used https). Without it, or
    when it is ``null`` (what a browser sends for a form posted from a ``no-referrer`` page,
    as every page here is, and from sandboxed frames), ``Sec-Fetch-Site`` decides: it must be
    ``same-origin`` or ``none`` (typed, bookmarked); ``Origin: null`` alone is refused. A
    sibling subdomain is another origin: ``SameSite`` cookies do not keep it out."""
    origin = request.headers.get("Origin")
    site = request.headers.get("Sec-Fetch-Site")
    if origin is not None and origin != "null":
        parts = urlsplit(origin)
        if not parts.scheme or not parts.netloc:
            return f"Origin: {origin[:100]}"
        if _authority(parts.scheme, parts.netloc) != _authority(request.scheme, request.host):
            return f"Origin {origin[:100]} is not this server ({request.host[:100]})"
        return None
    if origin == "null" and site is None:
        return "Origin: null"
    if site in ("cross-site", "same-site"):
        return f"Sec-Fetch-Site: {site}"
    return None


def refuse_cross_origin() -> None:
    """403 ``cross_site_request`` for a request another origin made."""
    reason = cross_origin()
    if reason is not None:
        raise RequestError(
            403, "cross_site_request",
            f"refused: this request came from another site ({reason}); a dashboard form only "
            "works from the dashboard's own pages (open it on this server and submit it there)",
        )


def same_origin_required(view: F) -> F:
    """For a page that changes state even on GET (the review page claims an item): refused
    whatever its method when another origin asked for it. Put it below the auth decorator,
    which first passes a token link through its continue page."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        refuse_cross_origin()
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def csp_nonce() -> str:
    """This request's nonce for the page's inline ``<script>`` and ``<style>`` elements."""
    if "csp_nonce" not in g:
        g.csp_nonce = secrets.token_urlsafe(18)
    nonce: str = g.csp_nonce
    return nonce


def remember_token(token: str) -> None:
    """Have this answer set the dashboard cookie to ``token``."""
    g.remember_token = token


def _image_source(template: str | None) -> str:
    """Where the pages' thumbnails come from (MODERATION_IMAGE_URL_TEMPLATE), for img-src."""
    if not template:
        return ""
    parts = urlsplit(template)
    if parts.scheme not in ("http", "https"):
        return ""  # a path on this server: 'self'
    if "{" in parts.netloc:  # the host is filled in per image: the scheme is all we know
        return f" {parts.scheme}:"
    return f" {parts.scheme}://{parts.netloc}"


def _page_csp() -> str:
    nonce = g.get("csp_nonce")
    inline = f"'nonce-{nonce}'" if nonce else "'none'"
    images = "'self' data:" + _image_source(current_settings().image_url_template)
    return (f"default-src 'none'; script-src {inline}; style-src {inline}; img-src {images}; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def _finish(response: Response) -> Response:
    for name, value in COMMON_HEADERS.items():
        response.headers.setdefault(name, value)
    html = response.mimetype == "text/html"
    response.headers.setdefault("Content-Security-Policy", _page_csp() if html else STRICT_CSP)
    token = g.get("remember_token")
    if token is not None:  # keep the pages reloadable without the token in the address
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict",
                            secure=request.is_secure, path="/dashboard")
    return response


def init_app(app: Flask) -> None:
    """Trust the proxies MODERATION_TRUSTED_PROXIES counts; headers and cookie on every
    answer; the nonce in the templates (``csp_nonce()``)."""
    proxies = app.extensions["settings"].trusted_proxies
    if proxies:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=proxies, x_proto=proxies)
    app.after_request(_finish)
    app.context_processor(lambda: {"csp_nonce": csp_nonce})
