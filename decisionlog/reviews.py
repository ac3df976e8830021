"""The review queue: what waits for a human, who holds it, what they decided, and the
webhook outbox that tells the uploader's platform.

Items enter the queue in the transaction that records their decision (``review`` actions,
and the audit sample of all traffic: :class:`AuditSampler`), or by an appeal. A claim hands
out the next item with a lease; it runs in a write transaction that locks the row it takes
(SQLite: ``BEGIN IMMEDIATE``, one writer at a time; PostgreSQL: ``FOR UPDATE SKIP LOCKED``),
so no item is ever handed to two reviewers at once, across threads, workers and replicas.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, Field

from moderation import ModerationError
from moderation.policy import Action

from .tables import decisions, review_items, review_verdicts, webhook_outbox

__all__ = [
    "REASONS",
    "AlreadyAppealed",
    "AlreadyDecided",
    "AuditRates",
    "AuditSampler",
    "Delivery",
    "NotAppealable",
    "NotClaimed",
    "ReviewError",
    "ReviewItem",
    "ReviewQueue",
    "UnknownCategory",
    "UnknownItem",
    "Verdict",
    "VerdictFilters",
    "queue_rows",
    "verdict_action",
]

#: Why an item is in the queue; the default priority is this order.
REASONS = ("appeal", "review", "audit")
Reason = Literal["appeal", "review", "audit"]


class ReviewError(ModerationError, ValueError):
    """A review request that cannot be done; ``code`` says which rule it broke, ``status``
    what the service answers."""

    code = "review_error"
    status = 400


class UnknownItem(ReviewError, LookupError):
    code = "not_found"
    status = 404


class NotClaimed(ReviewError):
    code = "not_claimed"
    status = 409


class AlreadyDecided(ReviewError):
    code = "already_decided"
    status = 409


class AlreadyAppealed(ReviewError):
    code = "already_appealed"
    status = 409


class NotAppealable(ReviewError):
    code = "not_appealable"
    status = 422


class UnknownCategory(ReviewError):
    code = "unknown_category"
    status = 400


# --- audit sampling ------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRates:
    """The share of decisions sampled for audit: one rate, or one per action."""

    default: float = 0.01
    per_action: Mapping[str, float] = field(default_factory=dict)

    def rate(self, action: str) -> float:
        return self.per_action.get(action, self.default)

    @classmethod
    def parse(cls, text: str) -> AuditRates:
        """``0.01``, or ``0.01,block=0.05,allow=0.02`` (a default, then rates per action;
        either part may be left out). Raises ``ValueError`` saying what is accepted."""
        default: float | None = None
        per_action: dict[str, float] = {}
        actions = [a.value for a in Action]
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            name, _, value = part.rpartition("=")
            try:
                rate = float(value)
            except ValueError:
                rate = float("nan")
            if not 0 <= rate <= 1:
                raise ValueError(f"{part!r}: a rate is a number from 0 to 1")
            if not name:
                if default is not None:
                    raise ValueError(f"{text!r}: give one default rate")
                default = rate
            elif name.strip() not in actions:
                raise ValueError(f"{name.strip()!r} is not an action ({', '.join(actions)})")
            else:
                per_action[name.strip()] = rate
        return cls(default=0.01 if default is None else default, per_action=per_action)

    def __str__(self) -> str:
        return ",".join([f"{self.default:g}"]
                        + [f"{a}={r:g}" for a, r in self.per_action.items()])


class AuditSampler:
    """Draws each decision into the audit sample with its action's rate (``seed``: the same
    draws every run, for tests and reproducible audits). Thread-safe."""

    def __init__(self, rates: AuditRates, seed: int | None = None) -> None:
        self.rates = rates
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def draw(self, action: str) -> float | None:
        """The rate the decision was sampled with, or ``None`` when it was not."""
        rate = self.rates.rate(action)
        if rate <= 0:
            return None
        with self._lock:
            taken = self._random.random() < rate
        return rate if taken else None


def queue_rows(records: Iterable[Any], sampler: AuditSampler | None,
               now: float) -> list[dict[str, Any]]:
    """The queue items of freshly recorded decisions: every ``review`` action (sampled with
    probability 1), and the audit draws of the others (errors aside: there is no image)."""
    rows = []
    for r in records:
        if r.error_code is not None:
            continue
        if r.action == "review":
            reason, probability = "review", 1.0
        else:
            drawn = sampler.draw(r.action) if sampler is not None else None
            if drawn is None:
                continue
            reason, probability = "audit", drawn
        rows.append({
            "decision_id": r.id, "reason": reason, "created_at": now,
            "decision_created_at": r.created_at, "policy_version": r.policy.version,
            "action": r.action, "triggered": ",".join(r.triggered),
            "sample_probability": probability, "note": None, "status": "waiting",
        })
    return rows


# --- what the API shows --------------------------------------------------------------------


class ReviewItem(BaseModel):
    item_id: int
    decision_id: str
    reason: Reason
    queued_at: float = Field(description="unix seconds")
    decision_created_at: float
    policy_version: str = Field(description="the version the decision was made with")
    action: str = Field(description="the decision's action")
    triggered: list[str]
    sample_probability: float | None = Field(
        description="the chance the decision had to be queued (1: a review action; the "
                    "audit rate; null: an appeal)")
    appeal_reason: str | None = None
    status: Literal["waiting", "claimed", "decided"]
    claimed_by: str | None = None
    lease_expires_at: float | None = None


class Delivery(BaseModel):
    """The webhook delivery of a verdict."""

    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: float | None
    delivered_at: float | None
    last_error: str | None


class Verdict(BaseModel):
    verdict_id: int
    item_id: int
    decision_id: str
    reason: Reason
    reviewer: str
    decided_at: float
    decision_created_at: float
    policy_version: str
    violations: list[str] = Field(description="the categories the image violates (may be none)")
    action: str = Field(description="what the violations call for")
    original_action: str
    appeal: Literal["upheld", "overturned"] | None = None
    note: str | None = None
    delivery: Delivery | None = Field(None, description="null: no webhook was configured")


@dataclass(frozen=True)
class VerdictFilters:
    since: float | None = None  # decided at or after
    until: float | None = None
    reviewer: str | None = None
    reason: str | None = None
    category: str | None = None  # found violating
    policy_version: str | None = None
    decision_id: str | None = None


def verdict_action(violations: Sequence[str], actions: Mapping[str, str]) -> str:
    """The action the violations call for: the most severe of their categories' actions,
    where ``review`` becomes ``block`` (a human has now confirmed the violation); ``allow``
    when there is none."""
    severity = max((Action(actions[c]).severity for c in violations), default=0)
    action = Action.of_severity(severity)
    return Action.BLOCK.value if action is Action.REVIEW else action.value


def _item(row: Any) -> ReviewItem:
    return ReviewItem(
        item_id=row.id, decision_id=row.decision_id, reason=row.reason,
        queued_at=row.created_at, decision_created_at=row.decision_created_at,
        policy_version=row.policy_version, action=row.action,
        triggered=[c for c in row.triggered.split(",") if c],
        sample_probability=row.sample_probability, appeal_reason=row.note,
        status=row.status, claimed_by=row.claimed_by, lease_expires_at=row.lease_until,
    )


class ReviewQueue:
    """The queue and its verdicts, in the decision log of ``store``."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.engine = store.engine

    def _write(self) -> Any:
        return self.engine.execution_options(immediate=True).begin()

    # --- entering ----------------------------------------------------------------------

    def appeal(self, decision_id: str, reason: str | None = None,
               now: float | None = None) -> ReviewItem:
        """Queue an appeal of a decision (one per decision)."""
        now = time.time() if now is None else now
        with self._write() as conn:
            found = conn.execute(
                sa.select(decisions.c.created_at, decisions.c.policy_version,
                          decisions.c.action, decisions.c.triggered, decisions.c.error_code)
                .where(decisions.c.id == decision_id)
            ).first()
            if found is None:
                raise UnknownItem(f"no decision with id {decision_id!r}")
            if found.error_code is not None:
                raise NotAppealable(
                    f"decision {decision_id!r} is an error ({found.error_code}): no image was "
                    "judged, so there is nothing to appeal; upload the image again")
            taken = conn.execute(
                sa.select(review_items.c.id).where(review_items.c.decision_id == decision_id,
                                                   review_items.c.reason == "appeal")
            ).first()
            if taken is not None:
                raise AlreadyAppealed(
                    f"decision {decision_id!r} was already appealed (item {taken.id}): one "
                    "appeal per decision")
            item_id = conn.execute(review_items.insert().values(
                decision_id=decision_id, reason="appeal", created_at=now,
                decision_created_at=found.created_at, policy_version=found.policy_version,
                action=found.action, triggered=found.triggered, sample_probability=None,
                note=reason, status="waiting",
            )).inserted_primary_key[0]
        item = self.item(int(item_id))
        assert item is not None
        return item

    # --- handing out -------------------------------------------------------------------

    def claim(self, reviewer: str, *, lease_s: float = 600,
              priority: Sequence[str] = REASONS, now: float | None = None) -> ReviewItem | None:
        """The next item for ``reviewer``, leased for ``lease_s`` seconds: the item they
        already hold (its lease renewed), else the first waiting one by ``priority`` (the
        reasons, first first) then age. An item whose lease ran out waits again. ``None``:
        nothing waits."""
        now = time.time() if now is None else now
        i = review_items.c
        with self._write() as conn:
            row = conn.execute(
                sa.select(i.id).where(i.status == "claimed", i.claimed_by == reviewer,
                                      i.lease_until >= now)
                .order_by(i.id).limit(1).with_for_update()
            ).first()
            if row is None:
                # leases that ran out: those items wait again, in their old place (a few
                # rows at most: one claim per reviewer)
                conn.execute(review_items.update()
                             .where(i.status == "claimed", i.lease_until < now)
                             .values(status="waiting", claimed_by=None, claimed_at=None,
                                     lease_until=None))
                for reason in priority:  # one indexed lookup per reason, first first
                    row = conn.execute(
                        sa.select(i.id).where(i.status == "waiting", i.reason == reason)
                        .order_by(i.created_at, i.id).limit(1)
                        .with_for_update(skip_locked=True)
                    ).first()
                    if row is not None:
                        break
            if row is None:
                return None
            conn.execute(review_items.update().where(i.id == row.id).values(
                status="claimed", claimed_by=reviewer, claimed_at=now, lease_until=now + lease_s))
            claimed = conn.execute(sa.select(review_items).where(i.id == row.id)).one()
        return _item(claimed)

    def release(self, item_id: int, reviewer: str, now: float | None = None) -> ReviewItem:
        """Give a claimed item back to the queue (a reviewer skips it): it waits again at
        the back of its reason's line, so the next claim brings something else when
        something else waits."""
        now = time.time() if now is None else now
        with self._write() as conn:
            self._held(conn, item_id, reviewer)
            conn.execute(review_items.update().where(review_items.c.id == item_id).values(
                status="waiting", claimed_by=None, claimed_at=None, lease_until=None,
                created_at=now))
        item = self.item(item_id)
        assert item is not None
        return item

    def _held(self, conn: Any, item_id: int, reviewer: str) -> Any:
        """The item's row, locked, when ``reviewer`` holds it; else the error that says why.
        A lease that ran out still counts while nobody else has claimed the item."""
        row = conn.execute(
            sa.select(review_items).where(review_items.c.id == item_id).with_for_update()
        ).first()
        if row is None:
            raise UnknownItem(f"no review item {item_id}")
        if row.status == "decided":
            raise AlreadyDecided(f"item {item_id} was already decided")
        if row.status != "claimed":
            raise NotClaimed(f"item {item_id} is not claimed: claim it first "
                             "(POST /v1/reviews/claim)")
        if row.claimed_by != reviewer:
            raise NotClaimed(f"item {item_id} is claimed by another reviewer"
                             + (" (your lease ran out)" if row.lease_until else ""))
        return row

    # --- deciding ----------------------------------------------------------------------

    def decide(self, item_id: int, reviewer: str, violations: Sequence[str],
               category_actions: Mapping[str, str], *, note: str | None = None,
               webhook: bool = False, now: float | None = None) -> Verdict:
        """Record ``reviewer``'s verdict on an item they hold: the categories of the
        decision's policy (``category_actions``: id → configured action) the image violates.
        With ``webhook``, the verdict also goes into the outbox, in the same transaction."""
        now = time.time() if now is None else now
        unknown = [c for c in violations if c not in category_actions]
        if unknown:
            raise UnknownCategory(
                f"not categories of the decision's policy: {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(category_actions) or '(none)'}")
        violations = list(dict.fromkeys(violations))
        action = verdict_action(violations, category_actions)
        with self._write() as conn:
            row = self._held(conn, item_id, reviewer)
            appeal = None
            if row.reason == "appeal":
                kept = Action(action).severity >= Action(row.action).severity
                appeal = "upheld" if kept else "overturned"
            verdict_id = conn.execute(review_verdicts.insert().values(
                item_id=item_id, decision_id=row.decision_id, reason=row.reason,
                reviewer=reviewer, decided_at=now,
                decision_created_at=row.decision_created_at,
                policy_version=row.policy_version, violations=",".join(violations),
                action=action, original_action=row.action, appeal=appeal, note=note,
            )).inserted_primary_key[0]
            conn.execute(review_items.update().where(review_items.c.id == item_id)
                         .values(status="decided", lease_until=None))
            if webhook:
                client = conn.execute(sa.select(decisions.c.client_id)
                                      .where(decisions.c.id == row.decision_id)).first()
                payload = {
                    "event": "review.verdict", "verdict_id": int(verdict_id),
                    "item_id": item_id, "decision_id": row.decision_id,
                    "client_id": client.client_id if client is not None else None,
                    "reason": row.reason, "violations": violations, "action": action,
                    "original_action": row.action, "appeal": appeal,
                    "policy_version": row.policy_version, "decided_at": now,
                }
                conn.execute(webhook_outbox.insert().values(
                    verdict_id=verdict_id, payload=json.dumps(payload, sort_keys=True),
                    created_at=now, status="pending", attempts=0, next_attempt_at=now))
        found = self.verdicts(VerdictFilters(), verdict_id=int(verdict_id))
        return found[0]

    # --- reading -----------------------------------------------------------------------

    def item(self, item_id: int) -> ReviewItem | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(review_items)
                               .where(review_items.c.id == item_id)).first()
        return _item(row) if row is not None else None

    def items_of(self, decision_id: str) -> list[ReviewItem]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(review_items)
                                .where(review_items.c.decision_id == decision_id)
                                .order_by(review_items.c.id)).all()
        return [_item(r) for r in rows]

    def verdicts(self, filters: VerdictFilters, *, limit: int = 100, offset: int = 0,
                 verdict_id: int | None = None) -> list[Verdict]:
        """Newest first, with their webhook delivery (the latest outbox row)."""
        v, o = review_verdicts.c, webhook_outbox.c
        where: list[Any] = []
        if verdict_id is not None:
            where.append(v.id == verdict_id)
        if filters.since is not None:
            where.append(v.decided_at >= filters.since)
        if filters.until is not None:
            where.append(v.decided_at < filters.until)
        for name in ("reviewer", "reason", "policy_version", "decision_id"):
            value = getattr(filters, name)
            if value is not None:
                where.append(getattr(v, name) == value)
        if filters.category is not None:  # a whole entry of the comma-separated list
            where.append(sa.literal(",").op("||")(v.violations).op("||")(sa.literal(","))
                         .contains(f",{filters.category},", autoescape=True))
        outbox = (sa.select(o.verdict_id, sa.func.max(o.id).label("id"))
                  .group_by(o.verdict_id).subquery())
        statement = (
            sa.select(review_verdicts, o.status.label("d_status"), o.attempts,
                      o.next_attempt_at, o.delivered_at, o.last_error)
            .select_from(review_verdicts
                         .outerjoin(outbox, outbox.c.verdict_id == v.id)
                         .outerjoin(webhook_outbox, o.id == outbox.c.id))
            .where(*where).order_by(v.decided_at.desc(), v.id.desc())
            .limit(limit).offset(offset)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(statement).all()
        return [Verdict(
            verdict_id=r.id, item_id=r.item_id, decision_id=r.decision_id, reason=r.reason,
            reviewer=r.reviewer, decided_at=r.decided_at,
            decision_created_at=r.decision_created_at, policy_version=r.policy_version,
            violations=[c for c in r.violations.split(",") if c], action=r.action,
            original_action=r.original_action, appeal=r.appeal, note=r.note,
            delivery=None if r.d_status is None else Delivery(
                status=r.d_status, attempts=r.attempts,
                next_attempt_at=r.next_attempt_at if r.d_status == "pending" else None,
                delivered_at=r.delivered_at, last_error=r.last_error),
        ) for r in rows]

    def counts(self, now: float | None = None) -> dict[str, Any]:
        """Items by reason and state (a claim whose lease ran out waits again), and the
        webhook outbox by state."""
        now = time.time() if now is None else now
        i = review_items.c
        state = sa.case(
            (sa.and_(i.status == "claimed", i.lease_until < now), "waiting"),
            else_=i.status)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(i.reason, state, sa.func.count())
                                .group_by(i.reason, state)).all()
            outbox = conn.execute(sa.select(webhook_outbox.c.status, sa.func.count())
                                  .group_by(webhook_outbox.c.status)).all()
        queue: dict[str, dict[str, int]] = {
            r: {"waiting": 0, "claimed": 0, "decided": 0} for r in REASONS}
        for reason, status, n in rows:
            queue.setdefault(reason, {})[status] = int(n)
        deliveries = {"pending": 0, "delivered": 0, "failed": 0}
        deliveries.update({str(s): int(n) for s, n in outbox})
        return {"queue": queue, "deliveries": deliveries}

    # --- the webhook outbox ------------------------------------------------------------

    def take_due(self, *, lease_s: float, now: float | None = None,
                 limit: int = 20) -> list[tuple[int, str, int, float]]:
        """Deliveries due now, each taken for ``lease_s`` seconds (its next attempt moved
        on, compare-and-set: one sender per row across processes). Returns (outbox id,
        payload, attempts so far, created_at)."""
        now = time.time() if now is None else now
        o = webhook_outbox.c
        with self.engine.connect() as conn:
            due = conn.execute(
                sa.select(o.id, o.payload, o.attempts, o.created_at, o.next_attempt_at)
                .where(o.status == "pending", o.next_attempt_at <= now)
                .order_by(o.next_attempt_at, o.id).limit(limit)
            ).all()
        taken = []
        for row in due:
            with self._write() as conn:
                won = conn.execute(
                    webhook_outbox.update()
                    .where(o.id == row.id, o.status == "pending",
                           o.next_attempt_at == row.next_attempt_at)
                    .values(next_attempt_at=now + lease_s)
                ).rowcount
            if won:
                taken.append((int(row.id), str(row.payload), int(row.attempts),
                              float(row.created_at)))
        return taken

    def delivered(self, outbox_id: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        o = webhook_outbox.c
        with self._write() as conn:
            conn.execute(webhook_outbox.update().where(o.id == outbox_id).values(
                status="delivered", delivered_at=now, attempts=o.attempts + 1,
                last_error=None))

    def attempt_failed(self, outbox_id: int, error: str, *, retry_at: float | None) -> None:
        """Record a failed attempt: tried again at ``retry_at``, or given up (``None``)."""
        o = webhook_outbox.c
        values: dict[str, Any] = {"attempts": o.attempts + 1, "last_error": error[:500]}
        if retry_at is None:
            values["status"] = "failed"
        else:
            values["next_attempt_at"] = retry_at
        with self._write() as conn:
            conn.execute(webhook_outbox.update().where(o.id == outbox_id).values(**values))
