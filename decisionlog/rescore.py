"""Re-scoring: what every stored decision of a window would get under another policy, kept in
tables of their own (``rescore_runs``, ``rescored_decisions``), never modifying the original
decisions, and exported like decisions. E.g. after a policy change, re-check last month's
traffic to find what should now come down.

Decisions are re-decided from their stored frames through the service's scorer, a chunk at
a time, each chunk written in one transaction.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from moderation.scorer import Scorer

from .lab import window_of
from .records import CategoryOutcome, DecisionRecord, ImageRef, PolicyRef
from .store import DecisionStore
from .tables import decisions, rescore_runs, rescored_decisions

__all__ = ["RescoreRun", "export_rescore", "rescore", "rescore_runs_of"]


@dataclass(frozen=True)
class RescoreRun:
    id: str
    created_at: float
    finished_at: float | None
    policy_name: str
    policy_version: str
    policy_source: str
    model: str
    since: float | None
    until: float | None
    decisions: int
    changed: int
    left_out: int


def _run(row: Any) -> RescoreRun:
    return RescoreRun(
        id=row.id, created_at=row.created_at, finished_at=row.finished_at,
        policy_name=row.policy_name, policy_version=row.policy_version,
        policy_source=row.policy_source, model=row.model, since=row.since, until=row.until,
        decisions=row.decisions, changed=row.changed, left_out=row.left_out,
    )


def rescore(
    store: DecisionStore,
    scorer: Scorer,
    *,
    policy_text: str,
    policy_source: str,
    since: float | None = None,
    until: float | None = None,
    chunk: int = 2048,
) -> RescoreRun:
    """Record, for each stored decision of ``scorer``'s model made in ``[since, until)``,
    the decision it would get under ``scorer``'s policy (each with the calibration profile
    it was made with; one the policy lacks leaves the decision out). Returns the finished
    run. Raises :class:`ModelMismatchError` when the window holds decisions, none of them of
    the scorer's model."""
    model = scorer.text.model
    counts, others = window_of(store, model, since, until)
    run_id = uuid.uuid4().hex[:16]
    policy = scorer.policy
    with store.engine.begin() as conn:
        conn.execute(rescore_runs.insert().values(
            id=run_id, created_at=time.time(), policy_name=policy.name,
            policy_version=policy.version, policy_source=policy_source, policy_text=policy_text,
            model=model, since=since, until=until, decisions=0, changed=0, left_out=0,
        ))
    scorers = {p: Scorer(policy, scorer.text, p) for p in policy.profile_names()}
    done = changed = left_out = read = 0
    for part in store.scan_frames(model=model, since=since, until=until, chunk=chunk):
        read += len(part)
        bounds = part.bounds
        described = store.views_of(part.ids)  # crops' boxes and videos' times, where kept
        rows = []
        for profile in dict.fromkeys(part.profiles):
            mine_ = [i for i, p in enumerate(part.profiles) if p == profile]
            if profile not in scorers:
                left_out += len(mine_)
                continue
            decided = scorers[profile].decide(
                [part.vectors[bounds[i]:bounds[i + 1]] for i in mine_],
                [[described.get(part.ids[i], {}).get(k, k)
                  for k in part.frames[bounds[i]:bounds[i + 1]].tolist()] for i in mine_],
            )
            for i, decision in zip(mine_, decided, strict=True):
                changed += decision.action.value != part.actions[i]
                rows.append({
                    "run_id": run_id, "decision_id": part.ids[i],
                    "created_at": float(part.created_at[i]), "action": decision.action.value,
                    "triggered": ",".join(decision.triggered),
                    "categories": json.dumps({
                        k: CategoryOutcome.of(v).model_dump(mode="json")
                        for k, v in decision.categories.items()
                    }),
                    "frame": decision.frame, "original_action": part.actions[i],
                })
        if rows:
            with store.engine.execution_options(immediate=True).begin() as conn:
                conn.execute(rescored_decisions.insert(), rows)
                done += len(rows)
                conn.execute(rescore_runs.update().where(rescore_runs.c.id == run_id)
                             .values(decisions=done, changed=changed, left_out=left_out))
    errors = sum(n for _, e, n in counts if e)
    # decisions of the model without a stored frame are in no block
    left_out += max(sum(n for m, e, n in counts if m == model and not e) - read, 0)
    with store.engine.begin() as conn:
        conn.execute(rescore_runs.update().where(rescore_runs.c.id == run_id).values(
            decisions=done, changed=changed, finished_at=time.time(),
            left_out=left_out + errors + sum(others.values()),
        ))
    found = rescore_runs_of(store, run_id)
    return found[0]


def rescore_runs_of(store: DecisionStore, run_id: str | None = None, limit: int = 50
                    ) -> list[RescoreRun]:
    """Runs, newest first (or the one ``run_id``)."""
    query = sa.select(*[c for c in rescore_runs.c if c.name != "policy_text"])
    if run_id is not None:
        query = query.where(rescore_runs.c.id == run_id)
    with store.engine.connect() as conn:
        rows = conn.execute(query.order_by(rescore_runs.c.created_at.desc()).limit(limit)).all()
    return [_run(r) for r in rows]


def export_rescore(store: DecisionStore, run_id: str
                   ) -> Iterator[tuple[DecisionRecord, str]]:
    """Each re-scored decision of a run, oldest first, as a decision record under the run's
    policy, with the action originally logged."""
    found = rescore_runs_of(store, run_id)
    if not found:
        raise LookupError(f"no re-score run {run_id!r}")
    run = found[0]
    r, d = rescored_decisions, decisions
    last: tuple[float, str] | None = None
    while True:
        where = [r.c.run_id == run_id]
        if last is not None:
            where.append(sa.or_(r.c.created_at > last[0],
                                sa.and_(r.c.created_at == last[0], r.c.decision_id > last[1])))
        with store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(r.c.decision_id, r.c.created_at, r.c.action, r.c.triggered,
                          r.c.categories, r.c.frame, r.c.original_action, d.c.client_id,
                          d.c.image_sha256, d.c.image_size, d.c.profile, d.c.latency_ms,
                          d.c.frames_scored)
                .join(d, d.c.id == r.c.decision_id)
                .where(*where).order_by(r.c.created_at, r.c.decision_id).limit(1000)
            ).all()
        if not rows:
            return
        for row in rows:
            yield DecisionRecord(
                id=row.decision_id, created_at=row.created_at, client_id=row.client_id,
                image=ImageRef(sha256=row.image_sha256, size=row.image_size),
                policy=PolicyRef(name=run.policy_name, version=run.policy_version),
                model=run.model, profile=row.profile, action=row.action,
                triggered=[c for c in row.triggered.split(",") if c],
                categories=json.loads(row.categories), latency_ms=row.latency_ms,
                frame=row.frame, frames_scored=row.frames_scored,
            ), row.original_action
        last = (rows[-1].created_at, rows[-1].decision_id)
