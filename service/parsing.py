"""What the route models (:mod:`service.contract`, :mod:`service.schemas`) do not express,
in plain functions testable without Flask: the uploads of ``/v1/moderate`` (an image that
cannot be read, e.g. bad base64, is that image's error while the others are decided, which no
request schema says; multipart files with ids from fields or file names), the error every
refusal raises, and the typed values views hand on (a dry-run, a search)."""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from decisionlog.search import SearchFilters
from moderation import InvalidRequest

__all__ = [
    "MAX_ID_LENGTH",
    "DryRunRequest",
    "ModerateRequest",
    "RequestError",
    "SearchRequest",
    "Upload",
    "check_text",
    "decode_base64",
    "free_text",
    "load_json",
    "parse_json",
    "parse_multipart",
    "parse_search",
    "search_request",
    "time_field",
]

IMAGE_FIELD = "image"
#: Longest client id (or profile name) accepted, in characters: it is stored with every
#: decision and echoed back.
MAX_ID_LENGTH = 256


class RequestError(InvalidRequest):
    """A request the service refuses as a whole: ``status``, ``code`` and ``message`` (a
    :class:`moderation.ModerationError`, answered by the one error table)."""


@dataclass(frozen=True)
class Upload:
    """One image of a request: the client's id (if any) and its bytes, or why they are bad."""

    id: str | None
    data: bytes
    error: tuple[str, str] | None = None  # (code, message) for an item that cannot be read


@dataclass(frozen=True)
class ModerateRequest:
    uploads: list[Upload]
    profile: str | None


def _check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise RequestError(
            400,
            "missing_field",
            f"no image in the request: send multipart form files in the field "
            f"'{IMAGE_FIELD}' (repeatable), or JSON {{\"images\": [{{\"data\": "
            f"\"<base64>\", \"id\": \"...\"}}]}}",
        )
    if n > max_images:
        raise RequestError(
            413,
            "too_many_images",
            f"the request has {n} images; at most {max_images} are accepted per request",
        )


def check_text(value: str, where: str, *, max_length: int = MAX_ID_LENGTH,
               code: str = "invalid_id") -> str:
    """``value`` if it is fit to store and echo as an id: at most ``max_length``
    characters, no control characters, no unpaired surrogates (JSON lets ``"\\ud800"`` through,
    and no database can store it as text). Else a 400 (``code``) naming ``where``."""
    if len(value) > max_length:
        raise RequestError(
            400, code,
            f"{where} is {len(value):,} characters long; at most {max_length} are accepted",
        )
    for position, char in enumerate(value):
        kind = unicodedata.category(char)
        if kind in ("Cc", "Cs"):
            what = "an unpaired surrogate" if kind == "Cs" else "a control character"
            raise RequestError(
                400, code,
                f"{where} has {what} (U+{ord(char):04X}) at position {position}; it must be "
                "printable text",
            )
    return value


def _profile(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RequestError(400, "invalid_field", "'profile' must be a string")
    return check_text(value, "'profile'")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def load_json(data: bytes) -> Any:
    """The parsed body, or a 400 that says what is wrong with it."""
    try:
        return json.loads(data, parse_constant=_not_json)
    except RecursionError:
        raise RequestError(
            400, "invalid_json",
            "the JSON body is nested too deeply; send {\"images\": [{\"data\": \"<base64>\", "
            "\"id\": \"...\"}]}",
        ) from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise RequestError(400, "invalid_json", f"the body is not valid JSON: {e}") from None


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def decode_base64(text: str, where: str) -> bytes:
    """Standard base64 (RFC 4648, no line breaks) → bytes; a ``ValueError`` whose message
    says what is wrong (a data: URL, line breaks, the URL-safe alphabet, a stray character,
    a length that is not a multiple of 4)."""
    if text.startswith("data:"):
        raise ValueError(
            f"{where} is a data: URL; send only the base64 text after its comma "
            f"(without {text[: text.find(',') + 1 or 30]!r})"
        )
    match = _BASE64.match(text)
    end = match.end() if match else 0
    if end < len(text):
        char = text[end]
        if char in "\r\n":
            hint = "a line break (MIME-style base64); send it on one line"
        elif char.isspace():
            hint = "white space; send the base64 text without spaces"
        elif text[end - 1 : end] == "=":
            hint = "text after its '=' padding (two base64 strings joined?)"
        elif char in "-_":
            hint = (f"{char!r}, from the URL-safe alphabet; use the standard one "
                    "('+' and '/')")
        else:
            hint = f"{char!r}, which is not in the base64 alphabet (A-Z, a-z, 0-9, +, /, =)"
        raise ValueError(f"{where} is not valid base64: at position {end} it has {hint}")
    if len(text) % 4:
        raise ValueError(
            f"{where} is not valid base64: its length ({len(text):,}) is not a multiple of 4 "
            "(is its '=' padding missing?)"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{where} is not valid base64: {e}") from None


def parse_multipart(
    files: Sequence[tuple[str | None, bytes]],
    form: Mapping[str, Sequence[str]],
    max_images: int,
) -> ModerateRequest:
    """Files of the ``image`` field as ``(filename, bytes)``, and the other form fields.

    Ids come from repeated ``id`` fields in the order of the files, else from the filenames.
    """
    _check_count(len(files), max_images)
    ids = list(form.get("id", []))
    if ids and len(ids) != len(files):
        raise RequestError(
            400,
            "invalid_field",
            f"got {len(files)} images but {len(ids)} 'id' fields: give one id per image, "
            "in the same order, or none",
        )
    uploads = []
    for i, (filename, data) in enumerate(files):
        if ids:
            item_id: str | None = check_text(ids[i], f"'id' field {i + 1} (of image {i + 1})")
        else:
            item_id = check_text(filename, f"the file name of image {i + 1}") if filename else None
        uploads.append(Upload(item_id, data))
    profiles = form.get("profile", [])
    return ModerateRequest(uploads, _profile(profiles[0] if profiles else None))


def parse_json(body: Any, max_images: int) -> ModerateRequest:
    """``{"images": [{"data": base64, "id": str?}, ...], "profile": str?}``."""
    if not isinstance(body, dict):
        raise RequestError(400, "invalid_json", "the JSON body must be an object with 'images'")
    unknown = sorted(set(body) - {"images", "profile"})
    if unknown:
        raise RequestError(
            400, "invalid_field", f"unknown keys {unknown}; accepted: 'images', 'profile'"
        )
    images = body.get("images")
    if images is None:
        _check_count(0, max_images)
    if not isinstance(images, list):
        raise RequestError(400, "invalid_field", "'images' must be a list of objects")
    _check_count(len(images), max_images)
    uploads = []
    for i, item in enumerate(images):
        if not isinstance(item, dict) or not isinstance(item.get("data"), str):
            raise RequestError(
                400,
                "invalid_field",
                f"images[{i}] must be an object with 'data' (a base64 string) and an optional "
                "'id'",
            )
        item_id = item.get("id")
        if item_id is not None and not isinstance(item_id, str):
            raise RequestError(400, "invalid_field", f"images[{i}].id must be a string")
        if item_id is not None:
            check_text(item_id, f"images[{i}].id")
        unknown_item = sorted(set(item) - {"data", "id"})
        if unknown_item:
            raise RequestError(
                400, "invalid_field",
                f"images[{i}] has unknown keys {unknown_item}; accepted: 'data', 'id'",
            )
        try:
            data = decode_base64(item["data"], f"images[{i}].data")
        except ValueError as e:
            uploads.append(Upload(item_id, b"", ("invalid_base64", str(e))))
            continue
        uploads.append(Upload(item_id, data))
    return ModerateRequest(uploads, _profile(body.get("profile")))


# --- what the views hand on -------------------------------------------------------------


@dataclass(frozen=True)
class DryRunRequest:
    """A proposed policy's text and the window to try it on (times as given: unix seconds,
    ISO 8601 or an age; checked by the route's contract)."""

    policy: str
    since: str | None = "7d"
    until: str | None = None
    against: str | None = None
    limit: int = 20


def time_field(name: str, value: str | None) -> float | None:
    """A time parameter: unix seconds, ISO 8601, or an age (``24h``, ``7d``); blank: none."""
    from .contract import _time

    if value is None or value == "":
        return None
    try:
        return _time(value)
    except ValueError as e:
        raise RequestError(400, "invalid_field", f"{name} {e}") from e


@dataclass(frozen=True)
class SearchRequest:
    """A search as the query string gives it: the query (``q`` text, or ``like`` a decision
    id; neither when an image is uploaded), its filters (times as unix seconds) and its page."""

    q: str | None = None
    like: str | None = None
    raw: bool = False
    filters: SearchFilters = SearchFilters()
    limit: int = 20
    offset: int = 0
    min_similarity: float | None = None
    format: str = "json"


def search_request(query: Any) -> SearchRequest:
    """A validated search query string (:class:`service.schemas.SearchFiltersQuery`, or
    :class:`~service.schemas.SearchTextQuery` with ``q`` or ``like``) as a search."""
    filters = SearchFilters(
        since=query.since, until=query.until, action=query.action, category=query.category,
        policy_version=query.policy_version, client_id=query.client_id, flagged=query.flagged,
    )
    q = getattr(query, "q", None)
    return SearchRequest(q=q.strip() if q is not None else None,
                         like=getattr(query, "like", None), raw=getattr(query, "raw", False),
                         filters=filters, limit=query.limit, offset=query.offset,
                         min_similarity=query.min_similarity,
                         format=getattr(query, "format", "json"))


def parse_search(args: Mapping[str, str], *, image: bool = False) -> SearchRequest:
    """A search from a plain mapping (the dashboard's form), validated by the same models as
    ``/v1/search``: exactly one of ``q`` and ``like``, or neither with an ``image``."""
    from .contract import parse_query
    from .schemas import SearchFiltersQuery, SearchTextQuery

    if image and ("q" in args or "like" in args):
        raise RequestError(400, "invalid_field", "an uploaded image is the query: leave out "
                                                 "q and like")
    return search_request(parse_query(SearchFiltersQuery if image else SearchTextQuery, args))


# --- reviews -------------------------------------------------------------------------------

MAX_NOTE_LENGTH = 2000


def free_text(value: Any, where: str) -> str | None:
    """A note or a reason: text of at most MAX_NOTE_LENGTH characters, line breaks allowed;
    ``None`` when empty."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(400, "invalid_field", f"{where} must be a string")
    check_text(value.replace("\n", " ").replace("\r", " ").replace("\t", " "), where,
               max_length=MAX_NOTE_LENGTH, code="invalid_field")
    return value.strip() or None
