"""Errors become responses here, and only here: views raise, handlers answer, always
``{"error": {"code", "message"}}`` and never a traceback."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from moderation import ModerationError

from .parsing import IMAGE_FIELD, MAX_ID_LENGTH
from .settings import current_settings

__all__ = ["error_response", "register_error_handlers"]

log = logging.getLogger(__name__)

def error_response(status: int, code: str, message: str, **extra: Any) -> tuple[Response, int]:
    body: dict[str, Any] = {"error": {"code": code, "message": message, **extra}}
    return jsonify(body), status


def _domain_error(e: ModerationError) -> tuple[Response, int]:
    """Every error raised on purpose carries its status, code and details (one base class:
    :class:`moderation.ModerationError`); a 5xx among them is logged and not explained."""
    if e.status >= 500:
        log.error("%s on %s %s: %s", type(e).__name__, request.method, request.path, e)
        return error_response(e.status, e.code, "internal error; the server log has the "
                                                "details")
    return error_response(e.status, e.code, e.message, **e.details())


def _http_error(e: HTTPException) -> tuple[Response, int]:
    if e.code == 413:
        settings = current_settings()
        limit = settings.max_content_length
        if request.content_length is None or request.content_length > limit:
            return error_response(
                413, "request_too_large",
                f"the request is over {limit:,} bytes (MODERATION_MAX_CONTENT_LENGTH)",
            )
        # werkzeug raises the same error for both form limits
        return error_response(
            413, "form_too_large",
            f"the form has more than {settings.max_form_parts:,} parts "
            "(MODERATION_MAX_FORM_PARTS) or a text field over "
            f"{settings.max_form_memory_size:,} bytes (MODERATION_MAX_FORM_MEMORY_SIZE): "
            f"send at most {settings.max_images} files in '{IMAGE_FIELD}', with at "
            f"most one 'id' field each, of at most {MAX_ID_LENGTH} characters",
        )
    code = (e.name or "error").lower().replace(" ", "_")
    response, status = error_response(e.code or 500, code, e.description or e.name)
    for name, value in e.get_headers():  # 405: Allow (RFC 9110 §15.5.6)
        if name.lower() != "content-type":
            response.headers[name] = value
    return response, status


def _internal_error(e: Exception) -> tuple[Response, int]:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(500, "internal", "internal error; the server log has the details")


#: One table from error types to the handler that gives their status and code.
HANDLERS: dict[type[Exception], Any] = {
    ModerationError: _domain_error,  # status, code and details carried by the error
    HTTPException: _http_error,  # werkzeug's: 404, 405, 413 (with the limit named), …
    Exception: _internal_error,  # anything else: 500, logged, no traceback to the client
}


def register_error_handlers(app: Flask) -> None:
    for kind, handler in HANDLERS.items():
        app.register_error_handler(kind, handler)
