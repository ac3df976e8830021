"""The trust-and-safety dashboard: server-rendered HTML with inline SVG charts (no front-end
build step; one small inline script gives the review page its keys, and the page works
without it)."""

from __future__ import annotations

import datetime as dt
import io
import time
from typing import Any

from flask import render_template

from decisionlog import DecisionFilters, DecisionStore
from decisionlog.lab import DryRun
from decisionlog.search import SearchHit, write_csv
from moderation import ModerationError, Moderator
from moderation.diff import diff_policies
from moderation.policy import Policy

from . import reviews
from .search import SearchResult
from .state import PolicyHolder, read_policy_text

__all__ = ["active_text", "history_entries", "image_url", "render_dashboard", "render_history",
           "render_lab", "render_review", "render_search", "search_csv"]


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

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
        hours=hours, bucket=bucket, when=_when, quality=quality,
    )


def render_review(reviewer: str, item: dict[str, Any] | None, counts: dict[str, Any], *,
                  done: Any = None, error: dict[str, Any] | None = None) -> str:
    return render_template("review.html", reviewer=reviewer, item=item, counts=counts,
                           done=done, error=error, when=_when)


# --- policy history: what each activation changed, and what that did ----------------------

EFFECT_WINDOW_S = 24 * 3600


def _policy_at(holder: PolicyHolder, version: str, parsed: dict[str, Policy | None]
               ) -> Policy | None:
    if version not in parsed:
        try:
            parsed[version] = holder.stored_policy(version)
        except ModerationError:
            parsed[version] = None
    return parsed[version]


def history_entries(holder: PolicyHolder, store: DecisionStore, limit: int = 20
                    ) -> list[dict[str, Any]]:
    """The latest activations, newest first, each with what changed from the one before it
    and the flag rate of each category in the day before and the day after it (bounded by the
    neighbouring activations)."""
    if holder.policies is None:
        return []
    activations = holder.policies.history(limit=limit + 1)
    parsed: dict[str, Policy | None] = {}
    entries = []
    now = time.time()
    for i, a in enumerate(activations[:limit]):
        older = activations[i + 1] if i + 1 < len(activations) else None
        newer_at = activations[i - 1].activated_at if i > 0 else now
        policy = _policy_at(holder, a.version, parsed)
        changes = None
        if older is not None and policy is not None:
            previous = _policy_at(holder, older.version, parsed)
            changes = diff_policies(previous, policy) if previous is not None else None
        start = max(a.activated_at - EFFECT_WINDOW_S, older.activated_at if older else 0.0)
        end = min(a.activated_at + EFFECT_WINDOW_S, newer_at)
        n_before, flags_before = store.flag_counts(start, a.activated_at)
        n_after, flags_after = store.flag_counts(a.activated_at, end)
        categories = list(policy.categories) if policy is not None else []
        categories += [c for c in {**flags_before, **flags_after} if c not in categories]
        effect = [
            {"category": cid,
             "before": flags_before.get(cid, 0) / n_before if n_before else None,
             "after": flags_after.get(cid, 0) / n_after if n_after else None}
            for cid in categories
        ]
        entries.append({
            "activation": a, "previous": older, "changes": changes, "effect": effect,
            "n_before": n_before, "n_after": n_after,
            "hours_before": (a.activated_at - start) / 3600,
            "hours_after": (end - a.activated_at) / 3600,
        })
    return entries


def render_history(holder: PolicyHolder, store: DecisionStore) -> str:
    entries = history_entries(holder, store)
    scale = max([e for entry in entries for x in entry["effect"]
                 for e in (x["before"] or 0, x["after"] or 0)] + [0.01])
    return render_template("history.html", entries=entries, scale=scale, when=_when,
                           span=_span, policy=holder.current().policy)


def _span(hours: float) -> str:
    return f"{hours:.0f} h" if hours >= 1 else f"{hours * 60:.0f} min"


# --- the policy lab page -------------------------------------------------------------------


def render_lab(holder: PolicyHolder, *, text: str, since: str, until: str, limit: int,
               report: DryRun | None = None, error: dict[str, Any] | None = None) -> str:
    active = holder.current()
    return render_template(
        "lab.html", policy=active.policy, model=active.encoder.identity, text=text, since=since,
        until=until, limit=limit, report=report, error=error, when=_when,
    )


def active_text(holder: PolicyHolder) -> str:
    """The active policy's text, as the log keeps it (else the file's)."""
    version = holder.current().policy.version
    stored = holder.policies.text(version) if holder.policies is not None else None
    if stored is not None:
        return stored.text
    if holder.policy_path is not None and holder.policy_path.is_file():
        return read_policy_text(holder.policy_path)
    return ""


def image_url(template: str | None, hit: SearchHit) -> str | None:
    """A hit's thumbnail in the client's own store (MODERATION_IMAGE_URL_TEMPLATE)."""
    return reviews.image_url(template, hit.client_id, hit.decision_id)


def render_search(holder: PolicyHolder, *, form: dict[str, str],
                  result: SearchResult | None = None, error: dict[str, Any] | None = None,
                  image_template: str | None = None) -> str:
    active = holder.current()
    return render_template(
        "search.html", policy=active.policy, model=active.encoder.identity, form=form,
        result=result, error=error, when=_when,
        thumbnail=lambda hit: image_url(image_template, hit),
    )


def search_csv(result: SearchResult) -> str:
    """The search page's export: its hits as /v1/search?format=csv gives them."""
    out = io.StringIO()
    write_csv(result.page.hits, out)
    return out.getvalue()
