"""Precision and recall on live traffic, from reviewers' verdicts (the README's "Quality"
explains the estimators).

Verdicts on the queue's *design* items (every ``review`` action, sampled with probability 1,
and the audit sample of all traffic, each with the rate it was drawn with) estimate the whole
traffic without bias once each stands for ``1/π`` decisions, where ``π`` is the chance the
decision had to be reviewed: its sampling probability times the share of its stratum
(reason, action) that reviewers have decided so far in the window (items are not decided at
random, but in queue order; the share corrects for how far the queue has got). Appeals are
chosen by uploaders: they are counted, never weighted into the estimates.

Both metrics are ratios of weighted totals (Horvitz–Thompson); their variance is the
linearised one for Poisson sampling, ``Σ (1-π)/π² z²`` over the sample with
``z = numerator - R·denominator``, divided by the estimated denominator squared; the 95%
interval is Wilson's score interval at the effective sample size that variance implies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa

from .tables import review_items, review_verdicts

__all__ = ["DesignSample", "Estimate", "QualityReport", "ReviewedImage", "ReviewedSet",
           "design_sample", "estimate_ratio", "labelled_from_log", "quality", "reviewed_set"]

Z95 = 1.959963984540054
#: Fewer verdicts than this in a metric's denominator: "not enough verdicts yet".
MIN_VERDICTS = 10


@dataclass(frozen=True)
class Estimate:
    """A weighted ratio: ``value`` with its standard error, 95% interval, the number of
    verdicts it rests on and their effective number (after weighting)."""

    value: float
    standard_error: float
    interval: tuple[float, float]
    verdicts: int
    effective_verdicts: float

    def view(self) -> dict[str, Any]:
        return {"estimate": round(self.value, 4), "standard_error": round(self.standard_error, 4),
                "interval": [round(x, 4) for x in self.interval], "verdicts": self.verdicts,
                "effective_verdicts": round(self.effective_verdicts, 1)}


def _wilson(p: float, n: float) -> tuple[float, float]:
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def estimate_ratio(numerator: np.ndarray, denominator: np.ndarray,
                   probability: np.ndarray) -> Estimate | None:
    """``Σ num/π / Σ den/π`` over a sample drawn with inclusion probabilities ``π``
    (``num`` ≤ ``den``, both 0/1). ``None`` when no sampled unit is in the denominator."""
    num = np.asarray(numerator, np.float64)
    den = np.asarray(denominator, np.float64)
    pi = np.asarray(probability, np.float64)
    inside = den > 0
    n = int(inside.sum())
    if n == 0:
        return None
    w = 1 / pi
    total = float((w * den).sum())
    value = float((w * num).sum() / total)
    z = num - value * den
    variance = float(((1 - pi) / pi**2 * z * z).sum()) / total**2
    se = math.sqrt(variance)
    weights = w[inside]
    kish = float(weights.sum() ** 2 / (weights**2).sum())
    if np.all(pi[inside] >= 1):  # every unit of the population was looked at
        return Estimate(value, 0.0, (value, value), n, float(n))
    effective = value * (1 - value) / variance if variance > 0 else kish
    effective = min(max(effective, 1.0), float(n))
    return Estimate(value, se, _wilson(value, effective), n, effective)


@dataclass
class DesignSample:
    """The window's design verdicts, one per decision (its latest verdict, an appeal's
    included), with each decision's inclusion probability; and the appeals' tallies."""

    decision_ids: list[str]
    policy_versions: list[str]
    triggered: list[frozenset[str]]
    violations: list[frozenset[str]]
    probability: np.ndarray
    reasons: list[str]
    queued: dict[str, dict[str, int]] = field(default_factory=dict)  # reason → action → n
    decided: dict[str, dict[str, int]] = field(default_factory=dict)
    appeals: dict[str, int] = field(default_factory=dict)


def design_sample(engine: Any, *, since: float | None = None, until: float | None = None,
                  policy_version: str | None = None) -> DesignSample:
    """Read the design items of decisions made in the window, and their verdicts."""
    i, v = review_items.c, review_verdicts.c

    def window(c: Any) -> list[Any]:
        where = []
        if since is not None:
            where.append(c.decision_created_at >= since)
        if until is not None:
            where.append(c.decision_created_at < until)
        if policy_version is not None:
            where.append(c.policy_version == policy_version)
        return where

    decided_state = sa.case((i.status == "decided", 1), else_=0)
    with engine.connect() as conn:
        strata = conn.execute(
            sa.select(i.reason, i.action, decided_state, sa.func.count())
            .where(*window(i)).group_by(i.reason, i.action, decided_state)
        ).all()
        items = conn.execute(  # the decided design items: the sample
            sa.select(i.decision_id, i.reason, i.action, i.triggered, i.policy_version,
                      i.sample_probability)
            .where(*window(i), i.status == "decided", i.reason != "appeal")
        ).all()
        verdicts = conn.execute(
            sa.select(v.decision_id, v.violations, v.appeal)
            .where(*window(v)).order_by(v.decided_at, v.id)
        ).all()
    parsed: dict[str, frozenset[str]] = {}  # a few distinct lists, parsed once each

    def categories(text: str) -> frozenset[str]:
        found = parsed.get(text)
        if found is None:
            found = parsed[text] = frozenset(c for c in text.split(",") if c)
        return found

    # in time order: a decision's last verdict (an appeal's second look) is its label
    latest = {decision: violations for decision, violations, _ in verdicts}
    queued: dict[str, dict[str, int]] = {}
    decided: dict[str, dict[str, int]] = {}
    appeals = {"queued": 0, "decided": 0, "upheld": 0, "overturned": 0}
    for reason, action, is_decided, count in strata:
        if reason == "appeal":
            appeals["queued"] += int(count)
            continue
        queued.setdefault(reason, {}).setdefault(action, 0)
        queued[reason][action] += int(count)
        if is_decided:
            decided.setdefault(reason, {})[action] = int(count)
    for _, _, appeal in verdicts:
        if appeal is not None:
            appeals["decided"] += 1
            appeals[appeal] += 1
    sample = DesignSample([], [], [], [], np.zeros(0), [], queued, decided, appeals)
    probability = []
    for decision, reason, action, triggered, version, p in items:
        violations = latest.get(decision)
        if violations is None:
            continue
        probability.append(p * decided[reason][action] / queued[reason][action])
        sample.decision_ids.append(decision)
        sample.policy_versions.append(version)
        sample.triggered.append(categories(triggered))
        sample.violations.append(categories(violations))
        sample.reasons.append(reason)
    sample.probability = np.asarray(probability, np.float64)
    return sample


@dataclass(frozen=True)
class QualityReport:
    categories: dict[str, dict[str, Any]]
    verdicts: int
    appeals: dict[str, int]
    queued: dict[str, dict[str, int]]
    decided: dict[str, dict[str, int]]


def _metric(found: Estimate | None, min_verdicts: int, what: str) -> dict[str, Any]:
    if found is None or found.verdicts < min_verdicts:
        n = 0 if found is None else found.verdicts
        return {"estimate": None, "status": "not_enough_verdicts", "verdicts": n,
                "message": f"not enough verdicts yet: {n} {what} (at least {min_verdicts})"}
    return {"status": "ok", **found.view()}


def quality(engine: Any, categories: Sequence[str], *, since: float | None = None,
            until: float | None = None, policy_version: str | None = None,
            min_verdicts: int = MIN_VERDICTS) -> QualityReport:
    """Per category: precision (of the decisions it flagged, the share a reviewer found
    violating it) and recall (of the decisions violating it, the share it flagged)."""
    sample = design_sample(engine, since=since, until=until, policy_version=policy_version)
    found: dict[str, dict[str, Any]] = {}
    names = list(dict.fromkeys([*categories, *sorted(set().union(*sample.violations,
                                                                  *sample.triggered))]))
    for c in names:
        fired = np.fromiter((c in t for t in sample.triggered), bool, len(sample.triggered))
        truth = np.fromiter((c in v for v in sample.violations), bool, len(sample.violations))
        precision = estimate_ratio(fired & truth, fired, sample.probability)
        recall = estimate_ratio(fired & truth, truth, sample.probability)
        found[c] = {
            "precision": _metric(precision, min_verdicts, "verdicts on images it flagged"),
            "recall": _metric(recall, min_verdicts, "sampled images found violating it"),
        }
    return QualityReport(found, len(sample.decision_ids), sample.appeals, sample.queued,
                         sample.decided)


# --- verdicts as a labelled set, for calibration --------------------------------------------


@dataclass(frozen=True)
class ReviewedImage:
    """A decision a reviewer judged, as calibration reads it: its stored frames' vectors,
    the categories it violates, and how many decisions of the traffic it stands for."""

    key: str  # the decision id
    vectors: np.ndarray  # (frames, dim), float32
    labels: frozenset[str]
    weight: float  # 1 / its chance to be reviewed
    #: the categories the reviewer judged (those of the decision's policy version; ``None``:
    #: unknown, that version's text is not in the log): a verdict says nothing of the others
    judged: frozenset[str] | None = None
    #: each row's stored key (a frame's index; negative: a crop), for the crops rule
    keys: tuple[int, ...] = ()


@dataclass
class ReviewedSet:
    images: list[ReviewedImage]
    name: str  # names the source: reviews, the window, the counts
    fingerprint: str
    weighting: str
    left_out: list[str]
    caveats: list[str]


def reviewed_set(url: str, *, model: str, since: float | None = None,
                 until: float | None = None) -> ReviewedSet:
    """The design verdicts of the window (review actions and audit samples; appeals are
    chosen by uploaders and left out) with the stored embeddings of their decisions, each
    weighted by the inverse of its chance to be reviewed. Decisions of another model, purged,
    or without embeddings are left out and counted."""
    import datetime as dt
    import hashlib
    from collections import Counter

    from .store import DecisionStore
    from .tables import decisions

    store = DecisionStore(url)
    sample = design_sample(store.engine, since=since, until=until)
    models: dict[str, str] = {}
    ids = sample.decision_ids
    with store.engine.connect() as conn:
        for start in range(0, len(ids), 500):
            models.update({r.id: r.model for r in conn.execute(
                sa.select(decisions.c.id, decisions.c.model)
                .where(decisions.c.id.in_(ids[start:start + 500])))})
    mine = [n for n, d in enumerate(ids) if models.get(d) == model]
    frames = store.frames_of([ids[n] for n in mine])
    judged = _categories_of_versions(url, {sample.policy_versions[n] for n in mine})
    images = [ReviewedImage(ids[n], frames[ids[n]][1], sample.violations[n],
                            float(1 / sample.probability[n]),
                            judged.get(sample.policy_versions[n]),
                            tuple(frames[ids[n]][0]))
              for n in mine if ids[n] in frames]
    left_out = []
    other = Counter(m for d, m in models.items())
    other.pop(model, None)
    for m, count in sorted(other.items()):
        left_out.append(f"{count} reviewed decisions were made with another model ({m}): "
                        "their embeddings cannot be scored by this one")
    purged = len(ids) - len(models)
    if purged:
        left_out.append(f"{purged} reviewed decisions are no longer in the log (purged)")
    missing = len(mine) - len(images)
    if missing:
        left_out.append(f"{missing} reviewed decisions have no stored embedding")
    reasons = Counter(sample.reasons[n] for n in mine if ids[n] in frames)

    def day(t: float | None) -> str:
        return "…" if t is None else dt.datetime.fromtimestamp(
            t, dt.timezone.utc).date().isoformat()

    end = until if until is not None else dt.datetime.now().timestamp()
    name = (f"reviews {day(since)}..{day(end)}: {len(images)} verdicts "
            f"({reasons.get('review', 0)} review, {reasons.get('audit', 0)} audit)")
    digest = hashlib.sha256()
    for image in sorted(images, key=lambda i: i.key):
        digest.update(f"{image.key}:{','.join(sorted(image.labels))};".encode())
    caveats = [
        f"appeals are not used ({sample.appeals.get('decided', 0)} decided in the window): "
        "uploaders choose what to appeal, so they stand for nobody else",
        "verdicts are reviewers' judgements, taken as the truth",
    ]
    zero = [f"{r}/{a}" for r in sample.queued for a in sample.queued[r]
            if sample.decided.get(r, {}).get(a, 0) == 0]
    if zero:
        caveats.append("kinds of item (reason/action) queued but not yet decided stand for "
                       "nothing: " + ", ".join(zero))
    sampled = {a for r in sample.queued for a in sample.queued[r]}
    for action, count in sorted(_decisions_by_action(store, model, since, until).items()):
        if action not in sampled:
            caveats.append(f"{count} {action} decisions of the window had no chance to be "
                           f"reviewed (audit rate 0 for {action}): not represented")
    unknown = sorted({sample.policy_versions[n] for n in mine} - set(judged))
    if unknown:
        caveats.append(f"policy versions {', '.join(unknown)} are not in the log: their "
                       "verdicts are taken to judge every category of this policy")
    return ReviewedSet(
        images=images, name=name, fingerprint=digest.hexdigest()[:16],
        weighting="each verdict weighted by 1/π, π = its decision's chance to be reviewed "
                  "(1 for a review action, the audit rate for an audit sample) × the share of "
                  "its stratum (reason, action) decided in the window",
        left_out=left_out, caveats=caveats,
    )


def _categories_of_versions(url: str, versions: set[str]) -> dict[str, frozenset[str]]:
    """The category ids of each policy version whose text the log keeps."""
    import yaml

    from .policies import PolicyLog

    log = PolicyLog(url, migrate_schema=False)
    found = {}
    for version in versions:
        stored = log.text(version)
        if stored is None:
            continue
        try:
            data = yaml.safe_load(stored.text)
            found[version] = frozenset(data["categories"])
        except (yaml.YAMLError, KeyError, TypeError):
            continue
    return found


def _decisions_by_action(store: Any, model: str, since: float | None,
                         until: float | None) -> dict[str, int]:
    """Decisions of ``model`` made in the window, errors aside, per action."""
    from .store import DecisionFilters
    from .tables import decisions

    where = [*DecisionFilters(since=since, until=until).clauses(),
             decisions.c.model == model, decisions.c.error_code.is_(None)]
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(decisions.c.action, sa.func.count())
                            .where(*where).group_by(decisions.c.action)).all()
    return {str(a): int(n) for a, n in rows}


def labelled_from_log(database_url: str | None, *, model: str, since: str | None = "30d",
                      until: str | None = None) -> ReviewedSet:
    """The ``reviews`` label source of ``moderation calibrate --from-reviews`` (the
    ``moderation.label_sources`` entry point): :func:`reviewed_set` with the command's
    options as given (times as ``parse_time`` reads them; the default log when no URL).
    Raises ``ValueError`` for a time it cannot read."""
    from .database import default_database_url
    from .windows import parse_time

    return reviewed_set(
        database_url or default_database_url(), model=model,
        since=parse_time(since) if since else None,
        until=parse_time(until) if until else None,
    )
