"""Each route's contract, declared once: :func:`operation` registers a view with the pydantic
models of its query string, path and body, its access, and its answers. The same
declaration validates every request (a 400 that names the parameter, what was wrong and what
is accepted; unknown parameters refused everywhere) and generates the route's entry in the
OpenAPI document (:func:`openapi_paths`), so the two cannot drift apart.

Why not flask-openapi3 or spectree: both validate bodies of one content type per route, while
``/v1/moderate`` (multipart or JSON) and the dry-run (YAML or JSON) take two; flask-openapi3
also replaces Flask's app and blueprint classes. What they would do for us is pydantic's
validation and JSON schema, which this module calls directly, plus ~150 lines of wiring.
"""

from __future__ import annotations

import enum
import functools
import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from flask import Blueprint, request
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)
from werkzeug.datastructures import MultiDict

from . import auth
from .parsing import MAX_ID_LENGTH, RequestError, load_json

__all__ = [
    "JSON_BODY_TYPES", "OPERATIONS", "Access", "Answer", "Body", "Flag", "NoQuery", "Note",
    "Operation", "Query", "Text", "Time", "TimeText", "excerpt", "operation", "parse_body",
    "parse_query",
]

F = TypeVar("F", bound=Callable[..., Any])
Q = TypeVar("Q", bound=BaseModel)

#: A value quoted in an error message is cut to this many characters.
EXCERPT = 80
#: Printable text: no control characters (C0, DEL, C1).
PRINTABLE_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]*$"
#: Unix seconds, an age (36h, 7d, 30m) or an ISO 8601 date and time (UTC without a zone).
TIME_PATTERN = (
    r"^(?:\d{1,12}(?:\.\d{1,6})?"
    r"|\d{1,9}(?:\.\d{1,6})?[mhd]"
    r"|\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1\d|2[0-9])"  # (the 30th and 31st: below)
    r"(?:[T ](?:[01]\d|2[0-3])(?::[0-5]\d(?::[0-5]\d(?:\.\d{1,6})?)?)?)?"
    r"(?:Z|[+-](?:[01]\d|2[0-3]):?[0-5]\d)?"
    r"|\d{4}-(?:0[13-9]|1[0-2])-30"
    r"(?:[T ](?:[01]\d|2[0-3])(?::[0-5]\d(?::[0-5]\d(?:\.\d{1,6})?)?)?)?"
    r"(?:Z|[+-](?:[01]\d|2[0-3]):?[0-5]\d)?"
    r"|\d{4}-(?:0[13578]|1[02])-31"
    r"(?:[T ](?:[01]\d|2[0-3])(?::[0-5]\d(?::[0-5]\d(?:\.\d{1,6})?)?)?)?"
    r"(?:Z|[+-](?:[01]\d|2[0-3]):?[0-5]\d)?)$"
)
JSON_BODY_TYPES = ("application/json",)


def excerpt(value: Any) -> str:
    """``value`` quoted, cut to :data:`EXCERPT` characters (a fault never echoes megabytes)."""
    text = repr(value)
    return text if len(text) <= EXCERPT else text[: EXCERPT - 1] + "…"


def printable(value: str) -> str:
    """``value`` if it has no control character and no unpaired surrogate."""
    for position, char in enumerate(value):
        kind = unicodedata.category(char)
        if kind in ("Cc", "Cs"):
            what = "an unpaired surrogate" if kind == "Cs" else "a control character"
            raise ValueError(f"has {what} (U+{ord(char):04X}) at position {position}; it must "
                             "be printable text")
    return value


def _time(value: Any) -> float:
    from decisionlog import parse_time

    if not isinstance(value, str) or not re.fullmatch(TIME_PATTERN, value):
        raise ValueError("is not a time: give unix seconds (1764000000), an age (36h, 7d) or "
                         "ISO 8601 (2026-11-23T10:00:00Z)")
    try:
        found = parse_time(value)
    except (ValueError, OverflowError) as e:
        raise ValueError(str(e)) from None
    if not math.isfinite(found):
        raise ValueError("is not a finite time")
    return found


_FLAGS = {"true": True, "1": True, "false": False, "0": False}


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _FLAGS:
        return _FLAGS[value.lower()]
    raise ValueError("must be true or false")


#: Text that is stored or echoed (an id, a category, a version): printable, not empty,
#: bounded.
Text = Annotated[
    str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=PRINTABLE_PATTERN),
    AfterValidator(printable),
]
#: Free text (a reviewer's note, an appeal's reason): printable but for line breaks and tabs,
#: at most 2,000 characters; blank is none.
NOTE_PATTERN = r"^[^\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]*$"
Note = Annotated[
    str, Field(max_length=2000, pattern=NOTE_PATTERN),
    AfterValidator(lambda v: printable(re.sub(r"[\r\n\t]", " ", v)) and v),
]
#: A time: unix seconds, an age, or ISO 8601 (see TIME_PATTERN); unix seconds once parsed.
Time = Annotated[
    float, BeforeValidator(_time),
    WithJsonSchema({"type": "string", "pattern": TIME_PATTERN,
                    "description": "unix seconds, an age before now (36h, 7d) or ISO 8601 "
                                   "(2026-11-23T10:00:00Z; no zone: UTC)"}),
]
#: A time as given (checked as :data:`Time` is), for what parses it later against "now".
TimeText = Annotated[
    str, AfterValidator(lambda v: (_time(v), v)[1]),
    WithJsonSchema({"type": "string", "pattern": TIME_PATTERN,
                    "description": "unix seconds, an age before now (36h, 7d) or ISO 8601"}),
]
#: A yes/no parameter.
Flag = Annotated[
    bool, BeforeValidator(_flag),
    WithJsonSchema({"type": "string", "enum": ["true", "false", "1", "0"]}),
]


class Query(BaseModel):
    """Base of the query-string models: unknown parameters are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoQuery(Query):
    """A route that takes no query parameters: any is refused."""


class Access(enum.Enum):
    """Who may call a route: the decorator that checks it, the OpenAPI security, the errors
    it adds."""

    PUBLIC = ("", ())
    API_KEY = ("api_key_required", (401,))
    ADMIN = ("admin_required", (401, 403))
    READER = ("reader_required", (401, 403))
    REVIEWER = ("reviewer_required", (401, 403))
    READER_OR_REVIEWER = ("reader_or_reviewer_required", (401, 403))

    @property
    def decorator(self) -> Callable[[F], F] | None:
        return getattr(auth, self.value[0]) if self.value[0] else None

    @property
    def security(self) -> list[dict[str, list[str]]]:
        if self is Access.PUBLIC:
            return []
        if self is Access.API_KEY:
            return [{}, {"bearer": []}]  # a key only when MODERATION_API_KEYS is set
        return [{"bearer": []}]


#: What a media type's content is: a model, or a JSON schema written out (raw text, bytes).
Content = type[BaseModel] | dict[str, Any]


@dataclass(frozen=True)
class Body:
    """A request body: its media types and what each holds."""

    content: Mapping[str, Content]
    required: bool = True
    description: str | None = None


@dataclass(frozen=True)
class Answer:
    """A successful answer: its status, what it is, and its media types."""

    status: int
    description: str
    content: Mapping[str, Content] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    rule: str
    method: str
    operation_id: str
    tag: str
    summary: str
    description: str | None
    access: Access
    query: type[BaseModel] | None
    path: type[BaseModel] | None
    body: Body | None
    answers: tuple[Answer, ...]
    errors: tuple[int, ...]

    @property
    def path_template(self) -> str:
        return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", self.rule)


#: Every declared operation, in the order the views declared them.
OPERATIONS: list[Operation] = []


def _bounds(model: type[BaseModel], name: str) -> str | None:
    """"an integer from 1 to 500" for an integer field with bounds."""
    found = next((f for n, f in model.model_fields.items() if (f.alias or n) == name), None)
    if found is None or found.annotation not in (int, int | None):
        return None
    low = next((m.ge for m in found.metadata if getattr(m, "ge", None) is not None), None)
    high = next((m.le for m in found.metadata if getattr(m, "le", None) is not None), None)
    if low is None or high is None:
        return None
    return f"an integer from {low:,} to {high:,}"


def _member(part: int | str) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def _field_errors(error: ValidationError, what: str, model: type[BaseModel]) -> RequestError:
    """A pydantic error as the 400 the client gets: each fault with its parameter, what was
    wrong and what is accepted."""
    faults, missing = [], True
    for item in error.errors():
        # (a union's member is named in the location too: left out)
        name = ".".join(str(p) for p in item["loc"] if not _member(p))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"].startswith("missing"):
            faults.append(f"{what} {name!r} is required" if name else message)
            continue
        missing = False
        if item["type"] == "extra_forbidden":
            faults.append(f"unknown {what} {name!r}; accepted: "
                          f"{', '.join(_names(model)) or 'none'}")
            continue
        if not name:  # a rule of the whole (e.g. offset + limit)
            faults.append(message)
            continue
        bounds = _bounds(model, str(item["loc"][0]))
        if bounds:
            message = f"must be {bounds}"
        elif message.startswith("Input should be "):
            message = "must be " + message.removeprefix("Input should be ")
        elif message.startswith("String should "):
            message = "must " + message.removeprefix("String should ")
        faults.append(f"{what} {name!r} {message}" if message.startswith(("is ", "has "))
                      else f"{what} {name!r} {message}; got {excerpt(item.get('input'))}")
    return RequestError(400, "missing_field" if missing else "invalid_field", "; ".join(faults))


def _names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def parse_query(model: type[Q], args: MultiDict[str, str] | Mapping[str, str]) -> Q:
    """The query string as ``model``; a 400 naming each bad parameter."""
    values: dict[str, Any] = {}
    lists = {f.alias or n for n, f in model.model_fields.items()
             if getattr(f.annotation, "__origin__", None) is list}
    for name in args:
        given = args.getlist(name) if isinstance(args, MultiDict) else [args[name]]
        if len(given) > 1 and name not in lists:
            raise RequestError(400, "invalid_field", f"parameter {name!r} is given "
                                                     f"{len(given)} times; give it once")
        values[name] = given if name in lists else given[0]
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise _field_errors(e, "parameter", model) from None


def parse_body(model: type[Q], data: Any) -> Q:
    """Parsed JSON as ``model``; a 400 naming each bad field."""
    if not isinstance(data, dict):
        raise RequestError(400, "invalid_json", f"send a JSON object with the fields "
                                                f"{', '.join(_names(model))}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _field_errors(e, "field", model) from None


def json_body(model: type[Q]) -> Q:
    """This request's JSON body as ``model``: 415 for another media type, 400 for bad JSON."""
    if request.mimetype not in JSON_BODY_TYPES:
        raise RequestError(415, "unsupported_media_type",
                           f"send JSON (Content-Type: application/json); got "
                           f"{request.mimetype or 'no content type'}")
    return parse_body(model, load_json(request.get_data(cache=False)))


def operation(
    bp: Blueprint, rule: str, method: str, *, operation_id: str, summary: str,
    access: Access, description: str | None = None, query: type[BaseModel] | None = None,
    path: type[BaseModel] | None = None, body: Body | None = None,
    answers: tuple[Answer, ...], errors: tuple[int, ...] = (),
) -> Callable[[F], F]:
    """Register the view for ``method rule`` on ``bp`` and declare its contract. The view
    gets the validated ``query`` (when the route has one) and ``path`` parameters as
    keywords; access is checked first."""

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def validated(**kwargs: Any) -> Any:
            if path is not None:
                try:
                    kwargs = dict(path.model_validate(kwargs))
                except ValidationError:  # an id no row can have
                    raise RequestError(404, "not_found", "no such "
                                       + ", ".join(f"{k} {excerpt(v)}" for k, v in
                                                   kwargs.items())) from None
            parsed = parse_query(query or NoQuery, request.args)  # refuses unknown ones
            if query is not None:
                kwargs["query"] = parsed
            return view(**kwargs)

        checked = access.decorator(validated) if access.decorator else validated
        bp.add_url_rule(rule, endpoint=view.__name__, view_func=checked, methods=[method])
        OPERATIONS.append(Operation(
            rule=rule, method=method.lower(), operation_id=operation_id, tag=bp.name,
            summary=summary, description=description or (view.__doc__ or "").strip() or None,
            access=access, query=query, path=path, body=body, answers=answers,
            errors=errors,
        ))
        return view

    return decorate


# --- the document ---------------------------------------------------------------------------

#: Statuses every route can answer before the application sees the request (service/worker.py)
FRAMING_ERRORS = (408, 413, 414, 431)
ERROR_MEANINGS = {
    400: "Malformed request: the code says what (missing_field, invalid_field, invalid_json, "
    "unknown_profile, …) and the message names the parameter, what was wrong and what is "
    "accepted",
    401: "Missing or wrong API key or token (Authorization: Bearer <token>)",
    403: "The route is disabled (no MODERATION_ADMIN_TOKEN, MODERATION_READER_TOKEN or "
    "MODERATION_REVIEWERS set)",
    404: "No such decision, policy version or review item",
    405: "The method is not allowed on this path (the Allow header lists those that are)",
    408: "The request had not fully arrived MODERATION_READ_TIMEOUT_S seconds after its first "
    "byte (request_timeout)",
    409: "A review rule: not claimed by you (not_claimed), already decided (already_decided), "
    "already appealed (already_appealed)",
    413: "The request is over MODERATION_MAX_CONTENT_LENGTH (request_too_large), a form over its "
    "limits (form_too_large), too many images, or (single image) too many pixels or frames",
    414: "The request line is over 4,094 bytes (request_line_too_long)",
    415: "Unsupported media type, or (single image) unsupported image format",
    422: "Understood but not possible: an invalid policy (invalid_policy, with faults), another "
    "model (model_mismatch), no stored embedding (no_embedding), an error not appealable "
    "(not_appealable)",
    431: "A header over 8,190 bytes or more than 100 headers (headers_too_large)",
    503: "A platform hook could not decide and fails closed (undecided; "
    "MODERATION_INTEGRATION_FAIL_MODE): the message says why",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _schema(content: Content, schemas: dict[str, Any]) -> dict[str, Any]:
    if isinstance(content, dict):
        return content
    if content.__name__ not in schemas:
        raise KeyError(f"{content.__name__} is not in service.schemas.MODELS")
    return _ref(content.__name__)


def _parameters(model: type[BaseModel], where: str) -> list[dict[str, Any]]:
    schema = model.model_json_schema(mode="validation",
                                     ref_template="#/components/schemas/{model}")
    required = set(schema.get("required", []))
    found = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        if "anyOf" in prop:  # Optional[X]: absent is null; the parameter is X
            options = [o for o in prop.pop("anyOf") if o.get("type") != "null"]
            prop.update(options[0] if len(options) == 1 else {"anyOf": options})
        if prop.get("default") is None:
            prop.pop("default", None)
        elif isinstance(prop["default"], bool):  # a Flag: as the query string spells it
            prop["default"] = str(prop["default"]).lower()
        parameter: dict[str, Any] = {"name": name, "in": where,
                                     "required": where == "path" or name in required,
                                     "schema": prop}
        if description:
            parameter["description"] = description
        found.append(parameter)
    return found


def openapi_paths(schemas: dict[str, Any]) -> dict[str, Any]:
    """The document's ``paths``, from :data:`OPERATIONS`."""
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        entry: dict[str, Any] = {"operationId": op.operation_id, "tags": [op.tag],
                                 "summary": op.summary}
        if op.description:
            entry["description"] = op.description
        if op.access is not Access.PUBLIC:
            entry["security"] = op.access.security
        parameters = []
        if op.path is not None:
            parameters += _parameters(op.path, "path")
        if op.query is not None:
            parameters += _parameters(op.query, "query")
        if parameters:
            entry["parameters"] = parameters
        if op.body is not None:
            entry["requestBody"] = {
                "required": op.body.required,
                "content": {t: {"schema": _schema(c, schemas)}
                            for t, c in op.body.content.items()},
                **({"description": op.body.description} if op.body.description else {}),
            }
        responses: dict[str, Any] = {}
        for answer in op.answers:
            responses[str(answer.status)] = {"description": answer.description, **(
                {"content": {t: {"schema": _schema(c, schemas)}
                             for t, c in answer.content.items()}} if answer.content else {})}
        # 400: a parameter the route does not take is refused on every route
        statuses = set(op.errors) | set(op.access.value[1]) | set(FRAMING_ERRORS) | {400}
        if op.body is not None:
            statuses.add(415)
        if op.path is not None:
            statuses.add(404)
        for status in sorted(statuses):
            responses[str(status)] = {"$ref": f"#/components/responses/{status}"}
        entry["responses"] = responses
        paths.setdefault(op.path_template, {})[op.method] = entry
    return paths


def error_responses() -> dict[str, Any]:
    """``components.responses``: one per error status, each the error shape."""
    return {str(s): {"description": meaning,
                     "content": {"application/json": {"schema": _ref("Error")}}}
            for s, meaning in ERROR_MEANINGS.items()}

