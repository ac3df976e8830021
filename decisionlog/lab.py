"""The policy lab: what a policy edit would do to past traffic, before it goes live.

:func:`dry_run_policy` is the entry point the CLI and the service both call: it parses the
proposed policy, resolves the one to compare with, refuses another model, builds both scorers
over one encoder and cache (new prompts into the run's memory only), then :func:`dry_run`.

A dry-run re-decides the stored decisions of a time window twice, under the policy in force
(or any stored version) and under the proposed one, from the stored frame embeddings and
through the service's own scorer (:meth:`moderation.scorer.Scorer.assess` for the counts,
:meth:`~moderation.scorer.Scorer.decide` for the decisions it shows). Both sides are
recomputed from the same float16 vectors, so a difference is the edit's, never rounding's;
the logged actions are not compared with. Chunks of stored vectors are scored with matrix
products: memory stays flat in the window's size.
"""

from __future__ import annotations

import heapq
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, Field

from moderation.diff import Change, diff_policies
from moderation.errors import ModelMismatchError, NotFound, PolicyError, PolicyLimitError
from moderation.policy import Action, Policy, PolicyLimits, parse_policy
from moderation.prompts import OverlayCache
from moderation.scorer import Assessment, Scorer, SharedProduct
from moderation.scoring import one_blas_thread
from moderation.views import View

from .blocks import BLOCK, Block
from .policies import PolicyLog
from .records import CategoryOutcome
from .store import DecisionStore

if TYPE_CHECKING:
    from moderation import Moderator

__all__ = [
    "DryRun",
    "UnknownPolicyVersion",
    "dry_run",
    "dry_run_policy",
    "refuse_other_models",
    "stored_policy",
]

ACTIONS = [a.value for a in Action]
Kind = Literal["newly_flagged", "newly_cleared", "action_changed", "categories_changed"]
KINDS: tuple[Kind, ...] = ("newly_flagged", "newly_cleared", "action_changed",
                           "categories_changed")
_MISSING = -1  # a category the policy of one side does not have


class PolicySide(BaseModel):
    """One side of a comparison: which policy, and where it came from."""

    name: str
    version: str
    source: str = Field(description="e.g. 'active (activation 12)', 'stored version …', "
                                    "'file proposed.yaml', 'request body'")


class Count(BaseModel):
    flagged: int = Field(description="decisions in which the category fired (any action)")
    rate: float = Field(description="flagged / decisions")


class CategoryEffect(BaseModel):
    """A category's flags before and after; a side is null when its policy has no such
    category."""

    before: Count | None
    after: Count | None
    change: int


class ActionEffect(BaseModel):
    before: int
    after: int
    change: int
    rate_before: float
    rate_after: float


class Outcome(BaseModel):
    """A decision under one policy, recomputed from its stored frames."""

    action: str
    triggered: list[str]
    frame: int
    categories: dict[str, CategoryOutcome]


class ChangedDecision(BaseModel):
    decision_id: str
    created_at: float
    client_id: str | None
    change: Kind
    before: Outcome
    after: Outcome


class PolicyChange(BaseModel):
    """One difference between the two policies (:class:`moderation.diff.Change`)."""

    where: str
    what: str
    change: str
    decisive: bool
    text: str

    @classmethod
    def of(cls, c: Change) -> PolicyChange:
        return cls(where=c.where, what=c.what, change=c.change, decisive=c.decisive,
                   text=c.text)


class LeftOut(BaseModel):
    """Decisions of the window that were not re-decided, and why."""

    total: int
    other_model: dict[str, int] = Field(description="decisions made with another model")
    errors: int = Field(description="inputs that could not be read (no decision)")
    no_embedding: int = Field(description="decisions stored without any frame embedding")
    profile_missing: dict[str, int] = Field(
        description="decisions made with a calibration profile that one of the policies lacks"
    )


class DryRun(BaseModel):
    """What the ``after`` policy would have decided, next to the ``before`` one, for every
    stored decision of the window."""

    model: str
    since: float | None
    until: float | None
    before: PolicySide
    after: PolicySide
    decisions: int = Field(description="decisions re-decided under both policies")
    categories: dict[str, CategoryEffect]
    actions: dict[str, ActionEffect]
    changed_total: int
    changed_by_kind: dict[Kind, int]
    changed: list[ChangedDecision] = Field(
        description="the most significant changes first: the largest change of action "
        "(allow↔block first), then the decisions whose deciding score lies furthest past "
        "its threshold; at most `limit`"
    )
    limit: int
    diff: list[PolicyChange]
    left_out: LeftOut
    seconds: float
    note: str | None = Field(default=None, description="e.g. why nothing was re-decided")


class _Side:
    """A policy's scorer, and where each of its categories sits in the union of both
    policies' categories."""

    def __init__(self, scorer: Scorer, union: list[str]) -> None:
        self.scorer = scorer
        self.columns = np.array(
            [scorer.text.category_ids.index(c) if c in scorer.text.category_ids else _MISSING
             for c in union]
        )

    def has(self, profile: str) -> bool:
        return profile in self.scorer.policy.profile_names()

    def spread(self, a: Assessment) -> tuple[np.ndarray, np.ndarray]:
        """Severity and margin per category of the union (a category the policy does not
        have: allow, -inf)."""
        n = len(a.action)
        severity = np.zeros((n, len(self.columns)), np.int8)
        margin = np.full((n, len(self.columns)), -np.inf)
        present = self.columns != _MISSING
        severity[:, present] = a.severity[:, self.columns[present]]
        margin[:, present] = a.margin[:, self.columns[present]]
        return severity, margin

    @property
    def persistent(self) -> bool:
        """Whether a category of this policy has a persistence rule (videos)."""
        policy = self.scorer.policy
        return any(policy.persistence_of(c) is not None for c in policy.categories)

    def persist(self, spread: tuple[np.ndarray, np.ndarray], part: Block, rows: np.ndarray,
                described: dict[str, dict[int, View]],
                profile: str) -> tuple[np.ndarray, np.ndarray]:
        """``spread`` with the videos among ``rows`` re-decided one by one (the persistence
        rule needs each frame's time, which the block's product does not carry): the one
        rule of :meth:`moderation.scorer.Scorer.decide`."""
        severity, margin = spread
        bounds = part.bounds
        scorer = Scorer(self.scorer.policy, self.scorer.text, profile)
        for r, i in enumerate(rows):
            named = described.get(part.ids[int(i)])
            if not named:
                continue
            keys = part.frames[bounds[i]:bounds[i + 1]].tolist()
            views: list[View | int] = [named.get(k, k) for k in keys]
            if all(isinstance(v, int) or v.time is None for v in views):
                continue
            [decision] = scorer.decide([part.vectors[bounds[i]:bounds[i + 1]]], [views])
            for j, column in enumerate(self.columns):
                if column != _MISSING:
                    cid = self.scorer.text.category_ids[column]
                    severity[r, j] = decision.categories[cid].action.severity
        return severity, margin

    def decide(self, vectors: np.ndarray, frames: list[View | int], profile: str) -> Outcome:
        scorer = Scorer(self.scorer.policy, self.scorer.text, profile)
        [decision] = scorer.decide([vectors], [frames])
        return Outcome(action=decision.action.value, triggered=decision.triggered,
                       frame=decision.frame,
                       categories={k: CategoryOutcome.of(v)
                                   for k, v in decision.categories.items()})


class _Tally:
    """Counts and the most significant changes, accumulated chunk by chunk."""

    def __init__(self, union: list[str], limit: int) -> None:
        self.decisions = 0
        self.flagged = np.zeros((2, len(union)), np.int64)
        self.actions = np.zeros((2, len(ACTIONS)), np.int64)
        self.kinds: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self.limit = limit
        # (|change of action|, strength, created_at, id, client id, profile, kind): a min-heap
        self.top: list[tuple[int, float, float, str, str, str, Kind]] = []

    def add(self, chunk: Block, rows: np.ndarray, profile: str,
            before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray]
            ) -> None:
        """``before``, ``after``: (severity, margin) per decision of ``rows`` and category
        of the union."""
        (sev_a, margin_a), (sev_b, margin_b) = before, after
        action_a, action_b = sev_a.max(axis=1), sev_b.max(axis=1)
        self.decisions += len(rows)
        self.flagged[0] += (sev_a > 0).sum(axis=0)
        self.flagged[1] += (sev_b > 0).sum(axis=0)
        self.actions[0] += np.bincount(action_a, minlength=len(ACTIONS))
        self.actions[1] += np.bincount(action_b, minlength=len(ACTIONS))
        differs = sev_a != sev_b
        changed = np.flatnonzero(differs.any(axis=1))
        if not len(changed):
            return
        kind = np.where(
            action_a[changed] == action_b[changed], 3,
            np.where(action_a[changed] == 0, 0, np.where(action_b[changed] == 0, 1, 2)),
        )
        for k, n in zip(*np.unique(kind, return_counts=True), strict=True):
            self.kinds[KINDS[int(k)]] += int(n)
        jump = np.abs(action_a[changed].astype(int) - action_b[changed].astype(int))
        # how clearly the side where a changed category fires fires: its margin
        firing = np.where(differs[changed], np.maximum(margin_a[changed], margin_b[changed]),
                          -np.inf)
        strength = firing.max(axis=1)
        best = np.lexsort((strength, jump))[::-1][: self.limit]
        for i in best:
            row = rows[changed[i]]
            entry = (int(jump[i]), float(strength[i]), float(chunk.created_at[row]),
                     chunk.ids[row], chunk.client_ids[row] or "", profile, KINDS[int(kind[i])])
            if len(self.top) < self.limit:
                heapq.heappush(self.top, entry)
            elif entry > self.top[0]:
                heapq.heapreplace(self.top, entry)

    @property
    def changed_total(self) -> int:
        return sum(self.kinds.values())


T = TypeVar("T")


def read_ahead(chunks: Iterator[T], depth: int = 2) -> Iterator[T]:
    """``chunks``, produced by a thread of their own up to ``depth`` ahead: reading the next
    chunk from the database (which releases the GIL) overlaps scoring this one."""
    ready: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stopped = threading.Event()

    def put(item: tuple[str, object]) -> bool:
        while not stopped.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not put(("chunk", chunk)):
                    return
            put(("done", None))
        except BaseException as e:  # handed to the consumer, raised there
            put(("error", e))

    thread = threading.Thread(target=produce, name="dry-run-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "done":
                return
            if kind == "error":
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
    finally:
        stopped.set()
        thread.join()


def window_of(store: DecisionStore, model: str, since: float | None, until: float | None
          ) -> tuple[list[tuple[str, bool, int]], dict[str, int]]:
    """The window's decisions per model (``store.window_counts``), and those made with
    another model than ``model``. Raises :class:`ModelMismatchError` when the window holds
    decisions, none of them of ``model``: stored embeddings are only comparable with text
    embeddings of the model that made them."""
    counts = store.window_counts(since, until)
    mine = sum(n for m, e, n in counts if m == model and not e)
    others: dict[str, int] = {}
    for m, e, n in counts:
        if m != model and not e:
            others[m] = others.get(m, 0) + n
    if mine == 0 and others:
        listed = ", ".join(f"{m} ({n} decisions)" for m, n in sorted(others.items()))
        raise ModelMismatchError(
            f"the stored embeddings in this window belong to model {listed}, not to "
            f"{model!r}, the model of the proposed policy: stored image embeddings can "
            "only be scored with the text embeddings of the model that made them. Use a "
            "policy for that model, or a window with decisions of this one."
        )
    return counts, others


def dry_run(
    store: DecisionStore,
    before: Scorer,
    after: Scorer,
    *,
    model: str,
    since: float | None = None,
    until: float | None = None,
    limit: int = 50,
    before_source: str = "before",
    after_source: str = "proposed",
    chunk: int = BLOCK,
    progress: Callable[[int, int], None] | None = None,
) -> DryRun:
    """Re-decide the stored decisions of ``model`` made in ``[since, until)`` under
    ``before`` and ``after`` (scorers of the same model's text embeddings), and report the
    difference: counts per category and action, the ``limit`` most significant changed
    decisions with their scores and top terms on both sides, and the policies' diff.

    Each decision is re-decided with the calibration profile it was made with. Both
    policies' scores come from one matrix product per block of stored vectors
    (:class:`moderation.scorer.SharedProduct`). ``progress(read, total)``: called as blocks
    are read (decisions re-decided or left out so far, and the window's decisions of
    ``model``). Raises :class:`ModelMismatchError` when the window holds decisions, none of
    them of ``model``.
    """
    started = time.perf_counter()
    if before.text.model != model or after.text.model != model:
        raise ModelMismatchError(
            f"both policies must be encoded with {model!r}; got {before.text.model!r} and "
            f"{after.text.model!r}"
        )
    counts, others = window_of(store, model, since, until)
    mine = sum(n for m, e, n in counts if m == model and not e)
    union = list(dict.fromkeys([*before.text.category_ids, *after.text.category_ids]))
    sides = (_Side(before, union), _Side(after, union))
    product = SharedProduct([before, after])
    persistent = any(side.persistent for side in sides)
    tally = _Tally(union, limit)
    read = 0
    profile_missing: dict[str, int] = {}
    if progress is not None:
        progress(0, mine)
    with one_blas_thread():  # a product per block; the read-ahead thread shares the cores
        for part in read_ahead(store.scan_frames(model=model, since=since, until=until,
                                                 chunk=chunk)):
            scores = product.scores(part.halves, part.frame_counts,
                                    part.frames)  # both sides, one product
            read += len(part)
            # videos under a persistence rule: their frames' times, kept with the decision
            described = store.views_of(part.ids) if persistent else {}
            profiles = np.array(part.profiles)
            for profile in np.unique(profiles):
                profile = str(profile)
                rows = np.flatnonzero(profiles == profile)
                if not all(side.has(profile) for side in sides):
                    profile_missing[profile] = profile_missing.get(profile, 0) + len(rows)
                    continue
                before_, after_ = (
                    side.spread(side.scorer.judge(score if len(rows) == len(profiles)
                                                  else score[rows], profile))
                    for side, score in zip(sides, scores, strict=True))
                if described:
                    before_, after_ = (
                        side.persist(spread, part, rows, described, profile)
                        if side.persistent else spread
                        for side, spread in ((sides[0], before_), (sides[1], after_)))
                tally.add(part, rows, profile, before_, after_)
            if progress is not None:
                progress(read, max(mine, read))
    # decisions of the model without a stored frame (counted, never in a block); decisions
    # recorded while the window was read may make ``read`` the larger
    without_frames = max(mine - read, 0)

    top = sorted(tally.top, reverse=True)
    stored = store.frames_of([t[3] for t in top])
    described = store.views_of([t[3] for t in top])
    changed = []
    for _, _, created_at, decision_id, client_id, profile, kind in top:
        keys, vectors = stored[decision_id]
        named = described.get(decision_id, {})
        frames: list[View | int] = [named.get(k, k) for k in keys]
        changed.append(ChangedDecision(
            decision_id=decision_id, created_at=created_at, client_id=client_id or None,
            change=kind,
            before=sides[0].decide(vectors, frames, profile),
            after=sides[1].decide(vectors, frames, profile),
        ))

    n = tally.decisions

    def rate(k: int) -> float:
        return k / n if n else 0.0

    categories = {}
    for j, cid in enumerate(union):
        a_has, b_has = (side.columns[j] != _MISSING for side in sides)
        fa, fb = int(tally.flagged[0, j]), int(tally.flagged[1, j])
        categories[cid] = CategoryEffect(
            before=Count(flagged=fa, rate=rate(fa)) if a_has else None,
            after=Count(flagged=fb, rate=rate(fb)) if b_has else None,
            change=(fb if b_has else 0) - (fa if a_has else 0),
        )
    actions = {
        name: ActionEffect(
            before=int(tally.actions[0, k]), after=int(tally.actions[1, k]),
            change=int(tally.actions[1, k] - tally.actions[0, k]),
            rate_before=rate(int(tally.actions[0, k])), rate_after=rate(int(tally.actions[1, k])),
        )
        for k, name in enumerate(ACTIONS)
    }
    errors = sum(n for _, e, n in counts if e)
    left_out = LeftOut(
        total=sum(others.values()) + errors + without_frames + sum(profile_missing.values()),
        other_model=others, errors=errors, no_embedding=without_frames,
        profile_missing=profile_missing,
    )
    note = None
    if n == 0:
        note = (f"no stored decision of model {model} to re-decide in this window"
                + (f" ({left_out.total} left out, see left_out)" if left_out.total else ""))
    return DryRun(
        model=model, since=since, until=until,
        before=PolicySide(name=before.policy.name, version=before.policy.version,
                          source=before_source),
        after=PolicySide(name=after.policy.name, version=after.policy.version,
                         source=after_source),
        decisions=n, categories=categories, actions=actions,
        changed_total=tally.changed_total, changed_by_kind=dict(tally.kinds), changed=changed,
        limit=limit,
        diff=[PolicyChange.of(c) for c in diff_policies(before.policy, after.policy)],
        left_out=left_out, seconds=round(time.perf_counter() - started, 3), note=note,
    )


# --- the entry point: from a proposed policy to a dry-run ------------------------------------


class UnknownPolicyVersion(NotFound):
    """A policy version the decision log never had (``version``: as it was asked for)."""

    def __init__(self, version: str) -> None:
        super().__init__(f"no policy version {_cut(version)!r} was ever active")
        self.version = version


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _model(policy: Policy, base_dir: Path | None) -> str:
    """The policy's model as a message may show it: a checkpoint inside ``base_dir`` by its
    relative path, one elsewhere by its file name, never by the path it was resolved to."""
    pretrained = policy.model.pretrained
    if Path(pretrained).is_absolute():
        path = Path(pretrained)
        try:
            pretrained = str(path.relative_to(base_dir.resolve())) if base_dir else path.name
        except ValueError:
            pretrained = path.name
    return _cut(f"{policy.model.name}/{pretrained}")


def stored_policy(policies: PolicyLog, version: str, *, base_dir: Path | None = None,
                  limits: PolicyLimits | None = None) -> Policy:
    """The policy ``version`` was (last) activated with, parsed from the text the log keeps
    (a relative checkpoint path resolved in ``base_dir``, under ``limits``).

    Raises :class:`UnknownPolicyVersion` when the log never had it, :class:`PolicyError`
    (with the faults) when its text no longer validates here (e.g. its checkpoint is gone).
    """
    recorded = policies.text(version)
    if recorded is None:
        raise UnknownPolicyVersion(version)
    try:
        return parse_policy(recorded.text, source=recorded.source, base_dir=base_dir,
                            limits=limits)
    except PolicyError as e:
        raise PolicyError(f"stored policy version {_cut(version)!r} no longer validates on "
                          "this server", faults=e.faults) from e


def refuse_other_models(reference: Policy, policies: Sequence[tuple[str, Policy]], *,
                        encoder: str | None = None, base_dir: Path | None = None) -> None:
    """Raise :class:`ModelMismatchError` for the first of ``policies`` (what it is, the
    policy) that names another model than ``reference``, whose model made the stored
    embeddings: they are only comparable with text embeddings of that model. ``encoder``: the
    identity of the encoder the run uses, when one is loaded. Checks only the policies, so
    it can run before any weights are loaded."""
    for what, policy in policies:
        if policy.model != reference.model:
            held = (f"(and this server's encoder) belong to model {encoder} "
                    f"({_model(reference, base_dir)})" if encoder is not None
                    else f"belong to model {_model(reference, base_dir)}")
            raise ModelMismatchError(
                f"{what} names model {_model(policy, base_dir)}, but the stored embeddings "
                f"{held}: a dry-run re-scores stored embeddings, which only works with the "
                "model that made them"
            )


def _parse_proposed(text: str, base_dir: Path | None, limits: PolicyLimits | None) -> Policy:
    try:
        return parse_policy(text, source="proposed policy", base_dir=base_dir, limits=limits,
                            confine=True)
    except PolicyLimitError as e:
        raise PolicyLimitError("the proposed policy asks for more than this server allows",
                               faults=e.faults) from e
    except PolicyError as e:
        raise PolicyError("the proposed policy is not valid", faults=e.faults) from e


def dry_run_policy(
    store: DecisionStore,
    current: Moderator,
    proposed: str | Policy,
    *,
    against: str | Policy | None = None,
    policies: PolicyLog | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 50,
    limits: PolicyLimits | None = None,
    base_dir: Path | None = None,
    current_source: str = "active policy",
    against_source: str | None = None,
    proposed_source: str = "proposed policy",
    progress: Callable[[int, int], None] | None = None,
) -> DryRun:
    """What ``proposed`` would decide for the stored decisions of ``[since, until)``, next
    to ``against`` (default: ``current``'s policy): :func:`dry_run` with the steps before
    it that the CLI and the service share. Nothing is activated or recorded.

    ``current``: the moderator whose encoder and text-embedding cache the run uses; its
    model must be the one that made the stored embeddings. ``proposed``: a policy's YAML
    text, untrusted (parsed under ``limits``, a checkpoint path confined to ``base_dir``),
    or a parsed policy. ``against``: a version the decision log keeps (read from
    ``policies``, default the log at ``store.url``; parsed under ``limits``, paths relative to
    ``base_dir``), or a parsed policy. ``limits`` also bounds the prompts the cache lacks that
    both sides together may encode (``max_new_prompts``), into the run's memory only, never
    into ``current``'s cache; ``None``: the default limits for a text, no bound on new prompts.
    ``*_source``: how the report names each side (a stored version: ``stored version …``).

    Raises :class:`PolicyLimitError` (``policy_too_large``) when ``proposed`` is over
    ``limits`` or the two policies need more new prompts than they allow;
    :class:`PolicyError` (``invalid_policy``, with the faults) when ``proposed`` is not valid
    or the stored ``against`` no longer validates; :class:`UnknownPolicyVersion`
    (``not_found``) when the log never had ``against``; :class:`ModelMismatchError`
    (``model_mismatch``) when either policy names another model than ``current``, has
    thresholds calibrated with another model, or the window holds decisions, none of them of
    ``current``'s model. No message shows a path as it was resolved.
    """
    if isinstance(proposed, str):
        proposed = _parse_proposed(proposed, base_dir, limits)
    before, before_source = current.policy, current_source
    if isinstance(against, str) and against:
        before = stored_policy(policies or PolicyLog(store.url, migrate_schema=False), against,
                               base_dir=base_dir, limits=limits)
        before_source = against_source or f"stored version {_cut(against)}"
    elif isinstance(against, Policy):
        before, before_source = against, against_source or "the policy to compare with"
    refuse_other_models(current.policy, [(f"the {proposed_source}", proposed),
                                         (before_source, before)],
                        encoder=current.encoder.identity, base_dir=base_dir)
    budget = limits.max_new_prompts if limits is not None else None
    after = current.with_policy(proposed, proposed=True, max_new_prompts=budget)
    base = current
    if before is not current.policy:  # through the same overlay, from the same budget
        spent = after.cache.added if isinstance(after.cache, OverlayCache) else 0
        base = after.with_policy(before,
                                 max_new_prompts=None if budget is None else budget - spent)
    return dry_run(
        store, base.scorer(), after.scorer(), model=current.encoder.identity, since=since,
        until=until, limit=limit, before_source=before_source, after_source=proposed_source,
        progress=progress,
    )
