"""What differs between two policies, in plain words: the cause a policy editor reads next to
the effect (a dry-run's counts, an activation's flag rates). Pure data, no I/O."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .policy import DEFAULT_PROFILE, Calibrated, Category, Policy, Threshold

__all__ = ["Change", "diff_policies"]


@dataclass(frozen=True)
class Change:
    """One difference. ``where``: ``policy``, a category id, or ``profiles.<name>``;
    ``what``: the field (``term``, ``exception``, ``threshold``, ``review_from``, ``action``,
    ``templates``, ``category``, ``profile``, ``model``, …); ``change``: ``added``,
    ``removed`` or ``changed``; ``decisive``: whether it can change a decision (a
    description cannot); ``text``: the sentence to show."""

    where: str
    what: str
    change: str
    before: Any
    after: Any
    decisive: bool
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _q(text: str) -> str:
    return f"“{text}”"


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def _list_changes(where: str, what: str, before: list[str], after: list[str]) -> list[Change]:
    label = f"{where}: " if where != "policy" else ""
    out = [Change(where, what, "removed", t, None, True, f"{label}{what} removed: {_q(t)}")
           for t in before if t not in after]
    out += [Change(where, what, "added", None, t, True, f"{label}{what} added: {_q(t)}")
            for t in after if t not in before]
    return out


def _threshold_changes(where: str, before: Threshold, after: Threshold) -> list[Change]:
    out = []
    if before.value != after.value:
        effect = "flags more" if after.value < before.value else "flags less"
        out.append(Change(
            where, "threshold", "changed", before.value, after.value, True,
            f"{where}: threshold {_number(before.value)} → {_number(after.value)} ({effect})",
        ))
    if before.review_from != after.review_from:
        out.append(Change(
            where, "review_from", "changed", before.review_from, after.review_from, True,
            f"{where}: review from {_number(before.review_from)} → "
            f"{_number(after.review_from)}",
        ))
    if before.provenance != after.provenance:
        now = after.provenance
        detail = f" (model {now.model}, {now.date})" if isinstance(now, Calibrated) else ""
        out.append(Change(
            where, "provenance", "changed", before.provenance.source, now.source, False,
            f"{where}: threshold provenance now {now.source}{detail}",
        ))
    return out


def _category_summary(c: Category) -> str:
    return (f"{c.action} at {_number(c.threshold.value)}, {len(c.terms)} terms, "
            f"{len(c.exceptions)} exceptions")


def _category_changes(cid: str, a: Policy, b: Policy) -> list[Change]:
    before, after = a.categories[cid], b.categories[cid]
    out = _list_changes(cid, "term", before.terms, after.terms)
    out += _list_changes(cid, "exception", before.exceptions, after.exceptions)
    templates_a, templates_b = a.templates_for(cid), b.templates_for(cid)
    if templates_a != templates_b and (before.templates or after.templates):
        # a category's own templates (a change of the policy's is reported once, above)
        out += _list_changes(cid, "template", templates_a, templates_b) or [Change(
            cid, "template", "changed", templates_a, templates_b, False,
            f"{cid}: templates reordered",
        )]
    if before.action != after.action:
        out.append(Change(cid, "action", "changed", before.action, after.action, True,
                          f"{cid}: action {before.action} → {after.action}"))
    out += _threshold_changes(cid, before.threshold, after.threshold)
    if before.description != after.description:
        out.append(Change(cid, "description", "changed", before.description,
                          after.description, False, f"{cid}: description edited"))
    if before.target != after.target:
        out.append(Change(
            cid, "target", "changed",
            before.target.model_dump(exclude_none=True) if before.target else None,
            after.target.model_dump(exclude_none=True) if after.target else None, False,
            f"{cid}: calibration target edited",
        ))
    return out


def diff_policies(a: Policy, b: Policy) -> list[Change]:
    """Every difference from policy ``a`` to policy ``b``: the model, templates, categories
    (added, removed; terms, exceptions, action, thresholds), calibration profiles, and what
    does not decide (name, descriptions, targets, ``top_terms``) marked ``decisive=False``.
    Empty when the two are the same policy."""
    out: list[Change] = []
    if a.model != b.model:
        spec = lambda p: f"{p.model.name}/{p.model.pretrained}"  # noqa: E731
        out.append(Change("policy", "model", "changed", a.model.model_dump(),
                          b.model.model_dump(), True, f"model {spec(a)} → {spec(b)}"))
    if a.templates != b.templates:
        out += _list_changes("policy", "template", a.templates, b.templates) or [Change(
            "policy", "template", "changed", a.templates, b.templates, False,
            "templates reordered",
        )]
    for cid in a.categories:
        if cid not in b.categories:
            out.append(Change(cid, "category", "removed", cid, None, True,
                              f"category removed: {cid} ({_category_summary(a.categories[cid])})"))
    for cid, category in b.categories.items():
        if cid not in a.categories:
            out.append(Change(cid, "category", "added", None, cid, True,
                              f"category added: {cid} ({_category_summary(category)})"))
        else:
            out += _category_changes(cid, a, b)
    for name in dict.fromkeys([*a.profiles, *b.profiles]):
        where = f"profiles.{name}"
        if name not in b.profiles:
            out.append(Change(where, "profile", "removed", name, None, True,
                              f"calibration profile removed: {name}"))
            continue
        if name not in a.profiles:
            out.append(Change(where, "profile", "added", None, name, True,
                              f"calibration profile added: {name} "
                              f"({', '.join(b.profiles[name])})"))
            continue
        for cid in dict.fromkeys([*a.profiles[name], *b.profiles[name]]):
            ta, tb = a.profiles[name].get(cid), b.profiles[name].get(cid)
            at = f"{where}.{cid}"
            if ta is None or tb is None:
                # falls back to (or stops falling back to) the category's own threshold
                own_a = a.threshold_for(cid, DEFAULT_PROFILE) if cid in a.categories else None
                own_b = b.threshold_for(cid, DEFAULT_PROFILE) if cid in b.categories else None
                ta, tb = ta or own_a, tb or own_b
                if ta is None or tb is None:
                    continue  # the category itself was added or removed (said above)
            out += _threshold_changes(at, ta, tb)
    if a.top_terms != b.top_terms:
        out.append(Change("policy", "top_terms", "changed", a.top_terms, b.top_terms, False,
                          f"top terms shown {a.top_terms} → {b.top_terms}"))
    if a.name != b.name:
        out.append(Change("policy", "name", "changed", a.name, b.name, False,
                          f"name {a.name} → {b.name}"))
    if a.description != b.description:
        out.append(Change("policy", "description", "changed", a.description, b.description,
                          False, "policy description edited"))
    return out
