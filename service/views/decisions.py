"""The decision log, read: ``/v1/decisions``, ``/v1/decisions/<id>``, ``/v1/stats`` (reader)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from decisionlog import DecisionFilters
from decisionlog.store import BUCKETS

from ..auth import reader_required
from ..parsing import RequestError
from ..schemas import DecisionPage, Stats
from . import int_arg, store, time_arg

bp = Blueprint("decisions", __name__)


@bp.get("/v1/decisions")
@reader_required
def decisions() -> Any:
    args = request.args
    limit = int_arg("limit", 50, 1, 500)
    try:
        page, cursor = store().query(
            DecisionFilters(
                since=time_arg("since"),
                until=time_arg("until"),
                action=args.get("action"),
                category=args.get("category"),
                policy_version=args.get("policy_version"),
                client_id=args.get("client_id"),
                flagged={"true": True, "false": False}.get(args.get("flagged", "")),
            ),
            limit=limit,
            cursor=args.get("cursor"),
        )
    except ValueError as e:
        raise RequestError(400, "invalid_field", str(e)) from e
    return jsonify(DecisionPage(decisions=page, next_cursor=cursor).model_dump(mode="json"))

@bp.get("/v1/decisions/<decision_id>")
@reader_required
def decision(decision_id: str) -> Any:
    found = store().get(decision_id)
    if found is None:
        raise RequestError(404, "not_found", f"no decision with id {decision_id!r}")
    return jsonify(found.view())

@bp.get("/v1/stats")
@reader_required
def stats() -> Any:
    bucket = request.args.get("bucket", "hour")
    if bucket not in BUCKETS:
        raise RequestError(400, "invalid_field", f"bucket must be one of {list(BUCKETS)}")
    return jsonify(Stats.model_validate({
        "bucket": bucket,
        "buckets": store().stats(
            since=time_arg("since"),
            until=time_arg("until"),
            bucket=bucket,
            policy_version=request.args.get("policy_version"),
        ),
    }).model_dump(mode="json"))
