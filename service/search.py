"""Search (reader): the decision log searched by text (``q=``), like a stored decision
(``like=``) or with an uploaded image (``POST``), as ``/v1/search`` (JSON, JSON lines or
CSV) and the search page (``/dashboard/search``). A text, a stored decision or an uploaded
image → query vectors, with this server's encoder and policy templates → the decisions most
like it (:func:`decisionlog.search.search`). Nothing is recorded."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify, render_template, request

from decisionlog import DecisionStore
from decisionlog.search import (
    SearchHit,
    SearchPage,
    frames_like,
    index_for,
    write_csv,
)
from decisionlog.search import search as nearest_decisions
from moderation import ModerationError, Moderator
from moderation.prompts import OverlayCache, embed_query

from . import pages, reviews
from .auth import reader_page_required
from .contract import Access, Answer, Body, Content, operation
from .pages import page
from .parsing import IMAGE_FIELD, RequestError, SearchRequest, parse_search, search_request
from .resources import holder, settings, store
from .schemas import SearchExportQuery, SearchFiltersQuery, SearchResponse, SearchTextQuery
from .state import PolicyHolder

__all__ = ["TEXT_QUERIES", "SearchResult", "TextQueries", "bp", "run_search"]

bp = Blueprint("search", __name__)


class TextQueries:
    """Search texts' vectors, the ``size`` most recently used kept in this worker's memory.

    A search text is encoded through an overlay of the shared text cache (a prompt a policy
    already encoded is read from it) that is dropped after the query: readers never write
    to the log or the cache folder, whatever they search for."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._vectors: OrderedDict[tuple[str, str, bool, tuple[str, ...]], np.ndarray] = (
            OrderedDict())
        self._lock = threading.Lock()

    def embed(self, active: Moderator, text: str, *, raw: bool) -> np.ndarray:
        """The query vector, shape (1, dim)."""
        templates = () if raw else tuple(active.policy.templates)
        key = (active.encoder.identity, text, raw, templates)
        with self._lock:
            found = self._vectors.get(key)
            if found is not None:
                self._vectors.move_to_end(key)
                return found
        found = embed_query(text, active.encoder, list(templates) or None,
                            OverlayCache(active.cache))[None]
        with self._lock:
            self._vectors[key] = found
            while len(self._vectors) > self.size:
                self._vectors.popitem(last=False)
        return found


#: This worker's search texts (reads of the shared cache, never writes).
TEXT_QUERIES = TextQueries()


@dataclass(frozen=True)
class SearchResult:
    page: SearchPage
    query: dict[str, Any]  # what was searched for, as the answer repeats it

    def view(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "model": self.page.model,
            "index": self.page.index,
            "hits": [h.model_dump(mode="json") for h in self.page.hits],
            "next_offset": self.page.next_offset,
        }


def run_search(holder: PolicyHolder, store: DecisionStore, request: SearchRequest, *,
               image: bytes | None = None, ef_search: int = 100) -> SearchResult:
    """Raises :class:`RequestError` (404: an unknown ``like`` id; 422: a decision with no
    stored embedding) or :class:`moderation.ImageError` (an upload that cannot be read)."""
    active = holder.current()
    model = active.encoder.identity
    exclude: tuple[str, ...] = ()
    if request.q is not None:
        queries = TEXT_QUERIES.embed(active, request.q, raw=request.raw)
        query: dict[str, Any] = {"kind": "text", "q": request.q, "raw": request.raw,
                                 "prompts": 1 if request.raw else len(active.policy.templates)}
    elif request.like is not None:
        # UnknownDecision: 404; NoEmbedding (an error result): 422 no_embedding
        model, queries = frames_like(store, request.like)
        exclude = (request.like,)  # its model's vectors, not itself
        query = {"kind": "like", "like": request.like, "frames": len(queries)}
    elif image:
        queries = active.embed_image(image)
        query = {"kind": "image", "frames": len(queries)}
    else:
        raise RequestError(400, "empty" if image is not None else "missing_field",
                           "the uploaded image is empty" if image is not None else "no query")
    filters = dataclasses.replace(request.filters, exclude=exclude)
    page = nearest_decisions(store, queries, model=model, filters=filters, limit=request.limit,
                  offset=request.offset, min_similarity=request.min_similarity,
                  index=index_for(store, ef_search=ef_search))
    return SearchResult(page, query)


# --- the API ----------------------------------------------------------------------------


#: The answer in each format= (the same hits).
#: (OpenAPI 3.1: an empty schema is any bytes, which the CSV and JSON lines are.)
FORMATS: dict[str, Content] = {
    "application/json": SearchResponse,
    "application/x-ndjson": {"description": "format=jsonl: one hit (a SearchHit) per "
                             "line"},
    "text/csv": {"description": "format=csv: a header and one hit per row"},
}
ANSWER = Answer(200, "The decisions most like the query, best first: JSON (format=json), "
                     "JSON lines (format=jsonl) or CSV (format=csv)", FORMATS)


def _answer(result: SearchResult, fmt: str) -> Any:
    if fmt == "csv":
        out = io.StringIO()
        write_csv(result.page.hits, out)
        return Response(out.getvalue(), mimetype="text/csv")
    if fmt == "jsonl":
        lines = "".join(json.dumps(h.model_dump(mode="json")) + "\n" for h in result.page.hits)
        return Response(lines, mimetype="application/x-ndjson")
    return jsonify(SearchResponse.model_validate(result.view()).model_dump(mode="json"))


@operation(bp, "/v1/search", "GET", operation_id="search_decisions", access=Access.READER,
           summary="Search the decision log by text (q=) or like a stored decision (like=)",
           description="Exactly one of q and like. q: the text is encoded through the "
           "policy's prompt templates (an ensemble), or as it is with raw=true. like: the "
           "stored decision's frames are the query; the decision itself is left out. Hits "
           "are per decision, by its best frame; filters apply before ranking.",
           query=SearchTextQuery, answers=(ANSWER,), errors=(404, 422))
def search_get(query: SearchTextQuery) -> Any:
    parsed = search_request(query)
    return _answer(run_search(holder(), store(), parsed,
                              ef_search=settings().search_ef_search), parsed.format)


def _export(query: SearchExportQuery, fmt: str) -> Any:
    return _answer(run_search(holder(), store(), dataclasses.replace(
        search_request(query), format=fmt), ef_search=settings().search_ef_search), fmt)


# The same hits as CSV and as JSON lines, each at a path of its own: a client generated from
# the document (openapi-python-client reads one media type per answer) can reach them.
@operation(bp, "/v1/search.csv", "GET", operation_id="search_decisions_csv",
           access=Access.READER, summary="GET /v1/search?format=csv: the hits as CSV",
           description="A header, then one hit per row (cells that would start a "
           "spreadsheet formula are quoted).", query=SearchExportQuery,
           answers=(Answer(200, "A header and one hit per row",
                           {"text/csv": {"type": "string"}}),), errors=(404, 422))
def search_csv(query: SearchExportQuery) -> Any:
    return _export(query, "csv")


@operation(bp, "/v1/search.jsonl", "GET", operation_id="search_decisions_jsonl",
           access=Access.READER, summary="GET /v1/search?format=jsonl: the hits as JSON lines",
           query=SearchExportQuery,
           answers=(Answer(200, "One hit (a SearchHit) per line",
                           {"application/x-ndjson": {"type": "string"}}),),
           errors=(404, 422))
def search_jsonl(query: SearchExportQuery) -> Any:
    return _export(query, "jsonl")


@operation(bp, "/v1/search", "POST", operation_id="search_decisions_by_image",
           access=Access.READER, summary="Search the decision log with an uploaded image",
           description="The image is decoded and encoded as a moderation upload (an "
           "animation's sampled frames each ask); nothing is recorded.",
           query=SearchFiltersQuery,
           body=Body({"multipart/form-data": {
               "type": "object", "required": [IMAGE_FIELD],
               "properties": {IMAGE_FIELD: {"type": "string", "format": "binary"}},
           }}),
           answers=(ANSWER,))
def search_post(query: SearchFiltersQuery) -> Any:
    parsed = search_request(query)
    if request.mimetype != "multipart/form-data":
        raise RequestError(415, "unsupported_media_type",
                           f"send the image as multipart/form-data in the field '{IMAGE_FIELD}'; "
                           f"got {request.mimetype or 'no content type'}")
    files = request.files.getlist(IMAGE_FIELD)
    if len(files) != 1:
        raise RequestError(400, "missing_field" if not files else "invalid_field",
                           f"send exactly one image in the field '{IMAGE_FIELD}'; got "
                           f"{len(files)}")
    return _answer(run_search(holder(), store(), parsed, image=files[0].read(),
                              ef_search=settings().search_ef_search), parsed.format)


# --- the search page ----------------------------------------------------------------------


@pages.bp.route("/dashboard/search", methods=["GET", "POST"])
@reader_page_required
def search() -> Any:
    """GET: the form, and with ``q`` or ``like`` its hits (the query string of /v1/search).
    POST (a plain multipart form): an uploaded image as the query, the filters beside it."""
    fields = request.form if request.method == "POST" else request.args
    form = {k: v.strip() for k, v in fields.items() if k != "token" and v.strip()}
    image = request.files.get(IMAGE_FIELD) if request.method == "POST" else None
    if image is not None:  # the image is the query (the form's text box goes along)
        form = {k: v for k, v in form.items() if k not in ("q", "raw", "like", "offset")}
    if image is None and "q" not in form and "like" not in form:
        return page(render_search(holder(), form=form))
    if "raw" in form:
        form["raw"] = "true"
    try:
        parsed = parse_search(form, image=image is not None)
        result = run_search(holder(), store(), parsed,
                            image=image.read() if image is not None else None,
                            ef_search=settings().search_ef_search)
    except ModerationError as e:  # a bad parameter, an unreadable image: shown on the page
        error = {"code": e.code, "message": e.message}
        return page(render_search(holder(), form=form, error=error), e.status)
    if parsed.format == "csv":  # the page's export link (/v1/search takes bearer tokens only)
        return Response(csv_text(result), mimetype="text/csv")
    return page(render_search(holder(), form=form, result=result,
                               image_template=settings().image_url_template))


def image_url(template: str | None, hit: SearchHit) -> str | None:
    """A hit's thumbnail in the client's own store (MODERATION_IMAGE_URL_TEMPLATE)."""
    return reviews.image_url(template, hit.client_id, hit.decision_id)


def render_search(holder: PolicyHolder, *, form: dict[str, str],
                  result: SearchResult | None = None, error: dict[str, Any] | None = None,
                  image_template: str | None = None) -> str:
    active = holder.current()
    return render_template(
        "search.html", policy=active.policy, model=active.encoder.identity, form=form,
        result=result, error=error, when=pages.when,
        thumbnail=lambda hit: image_url(image_template, hit),
    )


def csv_text(result: SearchResult) -> str:
    """The search page's export: its hits as /v1/search?format=csv gives them."""
    out = io.StringIO()
    write_csv(result.page.hits, out)
    return out.getvalue()
