"""The decision log, read: ``/v1/decisions``, ``/v1/decisions/<id>``, ``/v1/stats`` (reader)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from decisionlog import DecisionFilters, DecisionRecord

from ..contract import Access, Answer, operation
from ..parsing import RequestError
from ..schemas import DecisionPage, DecisionPath, DecisionsQuery, Stats, StatsQuery
from . import store

bp = Blueprint("decisions", __name__)


def filters(query: DecisionsQuery) -> DecisionFilters:
    return DecisionFilters(
        since=query.since, until=query.until, action=query.action, category=query.category,
        policy_version=query.policy_version, client_id=query.client_id, flagged=query.flagged,
    )


@operation(bp, "/v1/decisions", "GET", operation_id="list_decisions", access=Access.READER,
           summary="Recorded decisions, newest first, a page at a time", query=DecisionsQuery,
           answers=(Answer(200, "A page of decisions", {"application/json": DecisionPage}),))
def decisions(query: DecisionsQuery) -> Any:
    try:
        page, cursor = store().query(filters(query), limit=query.limit, cursor=query.cursor)
    except ValueError as e:  # a cursor this log did not give
        raise RequestError(400, "invalid_field", str(e)) from e
    return jsonify(DecisionPage(decisions=page, next_cursor=cursor).model_dump(mode="json"))


@operation(bp, "/v1/decisions/<decision_id>", "GET", operation_id="get_decision",
           access=Access.READER, summary="One recorded decision", path=DecisionPath,
           answers=(Answer(200, "The decision", {"application/json": DecisionRecord}),))
def decision(decision_id: str) -> Any:
    found = store().get(decision_id)
    if found is None:
        raise RequestError(404, "not_found", f"no decision with id {decision_id!r}")
    return jsonify(found.view())


@operation(bp, "/v1/stats", "GET", operation_id="get_stats", access=Access.READER,
           summary="Counts and flag rates per time bucket and policy version", query=StatsQuery,
           answers=(Answer(200, "Statistics", {"application/json": Stats}),))
def stats(query: StatsQuery) -> Any:
    return jsonify(Stats.model_validate({
        "bucket": query.bucket,
        "buckets": store().stats(since=query.since, until=query.until,
                                 bucket=query.bucket.value,
                                 policy_version=query.policy_version),
    }).model_dump(mode="json"))
