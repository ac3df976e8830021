"""``/v1/search`` (reader): the decision log searched by text (``q=``), like a stored
decision (``like=``), or with an uploaded image (POST); nothing is recorded."""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

from flask import Blueprint, Response, jsonify, request

from decisionlog.search import write_csv

from ..contract import Access, Answer, Body, Content, operation
from ..parsing import IMAGE_FIELD, RequestError, search_request
from ..schemas import SearchExportQuery, SearchFiltersQuery, SearchResponse, SearchTextQuery
from ..search import SearchResult, run_search
from . import holder, settings, store

bp = Blueprint("search", __name__)

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
