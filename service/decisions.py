"""The decision log, read: ``/v1/decisions``, ``/v1/decisions/<id>``, ``/v1/stats``
(reader), and the overview page (``/dashboard``: the active policy and its thresholds, flag
rates per category over time with policy changes marked, the latest flagged decisions, and
precision and recall on live traffic)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from flask import Blueprint, jsonify, render_template

from decisionlog import DecisionFilters, DecisionRecord, DecisionStore
from moderation import Moderator

from . import pages
from .auth import reader_page_required
from .contract import Access, Answer, operation
from .pages import page
from .parsing import RequestError
from .resources import holder, int_arg, settings, store
from .reviews import quality_report
from .schemas import DecisionPage, DecisionPath, DecisionsQuery, Stats, StatsQuery

__all__ = ["bp", "render_dashboard"]

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
    # a cursor this log did not give: InvalidCursor, a 400
    page, cursor = store().query(filters(query), limit=query.limit, cursor=query.cursor)
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


# --- the overview page -----------------------------------------------------------------


@pages.bp.get("/dashboard")
@reader_page_required
def dashboard() -> Any:
    active = holder().current()
    quality = quality_report(holder(), store(), settings().quality_min_verdicts, since=None,
                             until=None, policy_version=None)
    return page(render_dashboard(active, store(), quality,
                                  hours=int_arg("hours", 48, 1, 24 * 90)))


PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]
WIDTH, HEIGHT, PAD = 860, 260, 40


def _rate_chart(buckets: list[dict[str, Any]], categories: list[str], width_h: int
                ) -> dict[str, Any]:
    """Flag rate per category per time bucket (versions summed), as SVG coordinates, and the
    buckets where a policy version first appears."""
    by_time: dict[int, dict[str, Any]] = {}
    for b in buckets:
        entry = by_time.setdefault(b["start"], {"total": 0, "flags": {}, "versions": []})
        entry["total"] += b["total"]
        entry["versions"].append(b["policy_version"])
        for cid, counts in b["categories"].items():
            entry["flags"][cid] = entry["flags"].get(cid, 0) + counts["flagged"]
    times = sorted(by_time)
    if not times:
        return {"lines": [], "changes": [], "ticks": [], "ymax": 0, "empty": True}
    rates = {cid: [by_time[t]["flags"].get(cid, 0) / by_time[t]["total"] for t in times]
             for cid in categories}
    ymax = max([max(r) for r in rates.values()] + [0.01])
    span = max(times[-1] - times[0], width_h * 3600)

    def x(t: int) -> float:
        return PAD + (WIDTH - 2 * PAD) * (t - times[0]) / span

    def y(v: float) -> float:
        return HEIGHT - PAD - (HEIGHT - 2 * PAD) * v / ymax

    lines = [
        {"category": cid, "colour": PALETTE[i % len(PALETTE)],
         "points": " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(times, rates[cid],
                                                                     strict=True)),
         "last": rates[cid][-1]}
        for i, cid in enumerate(categories)
        if any(rates[cid])
    ]
    changes, seen = [], set(by_time[times[0]]["versions"])
    for t in times[1:]:
        new = [v for v in by_time[t]["versions"] if v not in seen]
        if new:
            changes.append({"x": x(t), "label": ", ".join(new)})
            seen.update(new)
    step = max(1, len(times) // 6)
    ticks = [{"x": x(t), "label": dt.datetime.fromtimestamp(t, dt.timezone.utc)
              .strftime("%m-%d %H:%M")} for t in times[::step]]
    yticks = [{"y": y(v), "label": f"{v:.0%}"} for v in (0, ymax / 2, ymax)]
    return {"lines": lines, "changes": changes, "ticks": ticks, "yticks": yticks,
            "ymax": ymax, "empty": False, "totals": sum(by_time[t]["total"] for t in times)}


def render_dashboard(moderator: Moderator, store: DecisionStore, quality: dict[str, Any],
                     hours: int = 48) -> str:
    policy = moderator.policy
    since = time.time() - hours * 3600
    bucket = "hour" if hours <= 72 else "day"
    buckets = store.stats(since=since, bucket=bucket)
    categories = list(policy.categories)
    chart = _rate_chart(buckets, categories, 1 if bucket == "hour" else 24)
    latest, _ = store.query(DecisionFilters(flagged=True), limit=20)
    actions: dict[str, int] = {}
    for b in buckets:
        for action, n in b["actions"].items():
            actions[action] = actions.get(action, 0) + n
    thresholds = [
        {"category": cid, "action": c.action,
         "profiles": {name: policy.threshold_for(cid, name) for name in policy.profile_names()}}
        for cid, c in policy.categories.items()
    ]
    return render_template(
        "dashboard.html",
        policy=policy, model=moderator.encoder.identity, thresholds=thresholds,
        chart=chart, width=WIDTH, height=HEIGHT, pad=PAD, latest=latest, actions=actions,
        hours=hours, bucket=bucket, when=pages.when, quality=quality,
        view_text=pages.view_text,
    )
