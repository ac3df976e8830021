"""The trust-and-safety dashboard: server-rendered HTML with inline SVG charts (no front-end
build step, no script)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from flask import render_template

from decisionlog import DecisionStore
from moderation import Moderator

__all__ = ["render_dashboard"]

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


def render_dashboard(moderator: Moderator, store: DecisionStore, hours: int = 48) -> str:
    policy = moderator.policy
    since = time.time() - hours * 3600
    bucket = "hour" if hours <= 72 else "day"
    buckets = store.stats(since=since, bucket=bucket)
    categories = list(policy.categories)
    chart = _rate_chart(buckets, categories, 1 if bucket == "hour" else 24)
    latest, _ = store.query(flagged=True, limit=20)
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
        hours=hours, bucket=bucket,
        when=lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S UTC"),
    )
