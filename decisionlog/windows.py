"""Time windows and positions in them: the times a window is given in (:func:`parse_time`),
and the opaque cursor of a page of decisions, newest first (:func:`encode_cursor`,
:func:`decode_cursor`). Both take untrusted text (a query string, a command line): anything
that is not what they make is a ``ValueError``, never a non-finite time."""

from __future__ import annotations

import base64
import json
import math
import time

from moderation import ModerationError

__all__ = ["MAX_CURSOR_LENGTH", "InvalidCursor", "decode_cursor", "encode_cursor", "parse_time"]


def parse_time(value: str, now: float | None = None) -> float:
    """Unix seconds, ISO 8601 (``2026-11-23T10:00:00Z``; no zone means UTC), or an age such
    as ``36h`` or ``7d`` (that long before ``now``). Raises ``ValueError``."""
    import datetime as dt
    import re

    if re.fullmatch(r"-?\d+(?:\.\d+)?", value.strip()):
        found = float(value)
        if math.isfinite(found):
            return found
    age = re.fullmatch(r"(\d+(?:\.\d+)?)([mhd])", value.strip())
    if age:
        seconds = float(age.group(1)) * {"m": 60, "h": 3600, "d": 86400}[age.group(2)]
        if math.isfinite(seconds):
            return (time.time() if now is None else now) - seconds
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise ValueError(
            f"{value!r} is not a time: give unix seconds, ISO 8601 (2026-11-23T10:00:00Z) "
            "or an age (36h, 7d)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


def encode_cursor(created_at: float, decision_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, decision_id]).encode()).decode()


#: A cursor this log gives is well under this many characters.
MAX_CURSOR_LENGTH = 200


class InvalidCursor(ModerationError, ValueError):
    """A page cursor this log did not give."""

    code = "invalid_field"
    status = 400


def decode_cursor(cursor: str) -> tuple[float, str]:
    """``(created_at, decision_id)`` of a cursor :func:`encode_cursor` made;
    :class:`InvalidCursor` (a ``ValueError``) for anything else (too long, not base64, not
    a [finite time, id] pair)."""
    shown = cursor if len(cursor) <= 40 else cursor[:39] + "…"
    problem = InvalidCursor(f"invalid cursor {shown!r}: pass next_cursor as it was given")
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise problem
    try:
        found = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, TypeError, RecursionError):
        raise problem from None
    if not (isinstance(found, list) and len(found) == 2
            and isinstance(found[0], (int, float)) and not isinstance(found[0], bool)
            and isinstance(found[1], str)):
        raise problem
    try:
        created_at = float(found[0])
    except OverflowError:
        raise problem from None
    if not math.isfinite(created_at):
        raise problem
    return created_at, found[1]
