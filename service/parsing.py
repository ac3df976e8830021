"""Requests → small typed values, in plain functions testable without Flask."""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from decisionlog.search import MAX_DEPTH, SearchFilters

__all__ = [
    "MAX_ID_LENGTH",
    "DryRunRequest",
    "ModerateRequest",
    "RequestError",
    "SearchRequest",
    "Upload",
    "check_text",
    "decode_base64",
    "integer_field",
    "load_json",
    "parse_dry_run",
    "parse_json",
    "parse_multipart",
    "parse_search",
    "time_field",
]

IMAGE_FIELD = "image"
#: Longest client id (or profile name) accepted, in characters: it is stored with every
#: decision and echoed back.
MAX_ID_LENGTH = 256


class RequestError(Exception):
    """A request the service refuses as a whole: ``status``, ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


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


def load_json(data: bytes) -> Any:
    """The parsed body, or a 400 that says what is wrong with it."""
    try:
        return json.loads(data)
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


# --- POST /v1/policy/dry-run ---------------------------------------------------------------

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml",
              "text/plain")
MAX_DRY_RUN_LIMIT = 500
_DRY_RUN_FIELDS = ("policy", "since", "until", "against", "limit")


@dataclass(frozen=True)
class DryRunRequest:
    """A proposed policy's text and the window to try it on (times as given: unix seconds,
    ISO 8601 or an age)."""

    policy: str
    since: str | None = "7d"
    until: str | None = None
    against: str | None = None
    limit: int = 20


def _dry_run_option(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "limit":
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = -1
        if isinstance(value, bool) or not 0 <= number <= MAX_DRY_RUN_LIMIT:
            raise RequestError(400, "invalid_field", f"limit must be an integer from 0 to "
                                                     f"{MAX_DRY_RUN_LIMIT}; got {value!r}")
        return number
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RequestError(400, "invalid_field", f"{name} must be a string; got {value!r}")
    return check_text(str(value), name)


def parse_dry_run(mimetype: str, body: bytes, args: Mapping[str, str]) -> DryRunRequest:
    """The policy as a YAML body (options in the query string), or JSON ``{"policy":
    "<yaml>", "since": …, "until": …, "against": …, "limit": …}`` (options in either)."""
    options: dict[str, Any] = {k: args[k] for k in _DRY_RUN_FIELDS[1:] if k in args}
    if mimetype == "application/json":
        data = load_json(body)
        if not isinstance(data, dict) or not isinstance(data.get("policy"), str):
            raise RequestError(
                400, "missing_field",
                "send the proposed policy as JSON {\"policy\": \"<policy YAML>\", \"since\": "
                "\"7d\"}, or as the YAML body itself (Content-Type: application/yaml)",
            )
        unknown = sorted(set(data) - set(_DRY_RUN_FIELDS))
        if unknown:
            raise RequestError(400, "invalid_field", f"unknown fields {unknown}; accepted: "
                                                     f"{', '.join(_DRY_RUN_FIELDS)}")
        options.update({k: data[k] for k in _DRY_RUN_FIELDS[1:] if k in data})
        text = data["policy"]
    elif mimetype in YAML_TYPES:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(400, "invalid_policy", f"the policy is not UTF-8 text: {e}") from e
    else:
        raise RequestError(
            415, "unsupported_media_type",
            f"send the proposed policy as application/yaml (or text/plain), or as JSON "
            f"{{\"policy\": \"<yaml>\"}}; got Content-Type {mimetype or '(none)'!r}",
        )
    if not text.strip():
        raise RequestError(400, "missing_field", "the proposed policy is empty")
    return DryRunRequest(policy=text, **{k: _dry_run_option(k, v) for k, v in options.items()})


def time_field(name: str, value: str | None) -> float | None:
    """A time parameter: unix seconds, ISO 8601, or an age (``24h``, ``7d``); blank: none."""
    from decisionlog import parse_time

    if value is None or value == "":
        return None
    try:
        return parse_time(value)
    except ValueError as e:
        raise RequestError(400, "invalid_field", f"{name}: {e}") from e


#: The filters of a search, as the query string names them.
SEARCH_FILTERS = ("since", "until", "action", "category", "policy_version", "client_id",
                  "flagged")
_SEARCH_PARAMETERS = ("q", "like", "raw", "limit", "offset", "min_similarity", "format",
                      "token", *SEARCH_FILTERS)
SEARCH_ACTIONS = ("allow", "flag", "review", "block")
MAX_SEARCH_LIMIT = 500
MAX_SEARCH_DEPTH = MAX_DEPTH  # offset + limit
MAX_QUERY_LENGTH = 1000  # characters (CLIP reads 77 tokens of it)
SEARCH_FORMATS = ("json", "jsonl", "csv")


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


def _boolean(name: str, value: str | None) -> bool | None:
    if value is None or value == "":
        return None
    found = {"true": True, "1": True, "false": False, "0": False}.get(value.lower())
    if found is None:
        raise RequestError(400, "invalid_field", f"{name} must be true or false; got {value!r}")
    return found


def integer_field(name: str, value: str | None, default: int, low: int, high: int) -> int:
    """An integer query parameter from ``low`` to ``high`` (``default`` when absent)."""
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise RequestError(400, "invalid_field",
                           f"{name} must be an integer from {low} to {high}; got {value!r}")
    return number


def parse_search(args: Mapping[str, str], *, image: bool = False) -> SearchRequest:
    """The query string of ``/v1/search``: exactly one of ``q`` (text) and ``like`` (a
    decision id), or neither when the request uploads an ``image``."""
    unknown = sorted(set(args) - set(_SEARCH_PARAMETERS))
    if unknown:
        raise RequestError(400, "invalid_field", f"unknown parameters {unknown}; accepted: "
                                                 f"{', '.join(_SEARCH_PARAMETERS)}")
    q, like = args.get("q"), args.get("like")
    if image and (q is not None or like is not None):
        raise RequestError(400, "invalid_field", "an uploaded image is the query: leave out "
                                                 "q and like")
    if not image and (q is None) == (like is None):
        raise RequestError(400, "missing_field" if q is None else "invalid_field",
                           "give one query: q=<text> (text → image), like=<decision id> "
                           "(image → image), or POST an image (multipart field 'image')")
    if q is not None:
        q = check_text(q, "q", max_length=MAX_QUERY_LENGTH, code="invalid_field").strip()
        if not q:
            raise RequestError(400, "invalid_field", "q is blank: give a text to search for")
    if like is not None:
        like = check_text(like, "like")
    action = args.get("action") or None
    if action is not None and action not in SEARCH_ACTIONS:
        raise RequestError(400, "invalid_field", f"action must be one of "
                                                 f"{', '.join(SEARCH_ACTIONS)}; got {action!r}")
    min_similarity = None
    if args.get("min_similarity"):
        try:
            min_similarity = float(args["min_similarity"])
        except ValueError:
            min_similarity = float("nan")
        if not -1 <= min_similarity <= 1:
            raise RequestError(400, "invalid_field", "min_similarity must be a number from -1 "
                                                     f"to 1; got {args['min_similarity']!r}")
    fmt = args.get("format", "json")
    if fmt not in SEARCH_FORMATS:
        raise RequestError(400, "invalid_field", f"format must be one of "
                                                 f"{', '.join(SEARCH_FORMATS)}; got {fmt!r}")
    limit = integer_field("limit", args.get("limit"), 20, 1, MAX_SEARCH_LIMIT)
    offset = integer_field("offset", args.get("offset"), 0, 0, MAX_SEARCH_DEPTH - limit)
    def text(name: str) -> str | None:
        return check_text(args[name], name) if args.get(name) else None

    filters = SearchFilters(
        since=time_field("since", args.get("since")),
        until=time_field("until", args.get("until")),
        action=action, category=text("category"), policy_version=text("policy_version"),
        client_id=text("client_id"), flagged=_boolean("flagged", args.get("flagged")),
    )
    return SearchRequest(q=q, like=like, raw=bool(_boolean("raw", args.get("raw"))),
                         filters=filters, limit=limit, offset=offset,
                         min_similarity=min_similarity, format=fmt)


# --- reviews -------------------------------------------------------------------------------

MAX_NOTE_LENGTH = 2000
MAX_VIOLATIONS = 100


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


def _json_object(mimetype: str, body: bytes, fields: tuple[str, ...],
                 example: str) -> dict[str, Any]:
    if mimetype != "application/json":
        raise RequestError(415, "unsupported_media_type",
                           f"send JSON (Content-Type: application/json), e.g. {example}; got "
                           f"{mimetype or 'no content type'}")
    data = load_json(body)
    if not isinstance(data, dict):
        raise RequestError(400, "invalid_json", f"send a JSON object, e.g. {example}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RequestError(400, "invalid_field",
                           f"unknown fields {unknown}; accepted: {', '.join(fields)}")
    return data


def parse_verdict(mimetype: str, body: bytes) -> tuple[list[str], str | None]:
    """``{"violations": ["weapons"], "note": "…"}`` → (violations, note). ``violations`` is
    required (``[]``: the image violates nothing)."""
    example = '{"violations": ["weapons"], "note": "a replica, not a toy"}'
    data = _json_object(mimetype, body, ("violations", "note"), example)
    violations = data.get("violations")
    if violations is None:
        raise RequestError(400, "missing_field",
                           f"'violations' is required ([] when the image violates nothing), "
                           f"e.g. {example}")
    if (not isinstance(violations, list) or len(violations) > MAX_VIOLATIONS
            or not all(isinstance(v, str) for v in violations)):
        raise RequestError(400, "invalid_field",
                           f"'violations' must be a list of category ids, e.g. {example}")
    for v in violations:
        check_text(v, "a category id", max_length=100, code="invalid_field")
    return violations, free_text(data.get("note"), "note")


def parse_appeal(mimetype: str, body: bytes) -> str | None:
    """An empty body, or ``{"reason": "…"}``."""
    if not body.strip():
        return None
    data = _json_object(mimetype, body, ("reason",), '{"reason": "this is a museum piece"}')
    return free_text(data.get("reason"), "reason")
