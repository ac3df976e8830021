"""``/v1/search`` (reader): the decision log searched by text (``q=``), like a stored
decision (``like=``), or with an uploaded image (POST); nothing is recorded."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from flask import Blueprint, Response, jsonify, request

from decisionlog.search import CSV_COLUMNS

from ..auth import reader_required
from ..parsing import IMAGE_FIELD, RequestError, parse_search
from ..schemas import SearchResponse
from ..search import SearchResult, run_search
from . import holder, settings, store

bp = Blueprint("search", __name__)


def _answer(result: SearchResult, fmt: str) -> Any:
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(h.csv_row() for h in result.page.hits)
        return Response(out.getvalue(), mimetype="text/csv")
    if fmt == "jsonl":
        lines = "".join(json.dumps(h.model_dump(mode="json")) + "\n" for h in result.page.hits)
        return Response(lines, mimetype="application/x-ndjson")
    return jsonify(SearchResponse.model_validate(result.view()).model_dump(mode="json"))


@bp.get("/v1/search")
@reader_required
def search_get() -> Any:
    parsed = parse_search(request.args)
    return _answer(run_search(holder(), store(), parsed,
                              ef_search=settings().search_ef_search), parsed.format)


@bp.post("/v1/search")
@reader_required
def search_post() -> Any:
    parsed = parse_search(request.args, image=True)
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
