"""The review queue on SQLite and PostgreSQL: how items enter, the order they leave in, leases,
verdicts, the webhook outbox, and that no item is ever handed out twice at once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from decisionlog import DecisionStore
from decisionlog.reviews import (
    AlreadyAppealed,
    AlreadyDecided,
    AuditRates,
    AuditSampler,
    NotAppealable,
    NotClaimed,
    ReviewQueue,
    UnknownCategory,
    UnknownItem,
    VerdictFilters,
    verdict_action,
)
from tests.fakes import BEER, NOTHING, RIFLE

from .conftest import put

ACTIONS = {"weapons": "block", "alcohol": "flag", "gore": "review"}


def test_review_actions_enter_the_queue_with_probability_one(store: DecisionStore) -> None:
    [reviewed] = put(store, [RIFLE[None]], action="review", triggered=["weapons"])
    put(store, [NOTHING[None]] * 3)  # no audit sampler: allowed decisions stay out
    put(store, [NOTHING[None]], error=True, action="review")  # an error is never queued
    queue = ReviewQueue(store)
    [item] = queue.items_of(reviewed)
    assert (item.reason, item.sample_probability, item.status) == ("review", 1.0, "waiting")
    assert item.triggered == ["weapons"] and item.policy_version == "v"
    assert queue.counts()["queue"]["review"]["waiting"] == 1
    assert queue.counts()["queue"]["audit"]["waiting"] == 0


def test_audit_sampling_draws_the_set_share_with_its_probability(url: str) -> None:
    def sampled(seed: int) -> list[bool]:
        store = DecisionStore(url, audit=AuditSampler(AuditRates.parse("0.1,block=0.5"),
                                                      seed=seed))
        queue = ReviewQueue(store)
        allowed = put(store, [NOTHING[None]] * 1000, at=time.time() - 7200 - seed)
        blocked = put(store, [RIFLE[None]] * 200, action="block", triggered=["weapons"],
                      at=time.time() - 3600 - seed)
        flags = []
        for ids, rate in ((allowed, 0.1), (blocked, 0.5)):
            for decision in ids:
                items = queue.items_of(decision)
                if items:
                    assert items[0].reason == "audit" and items[0].sample_probability == rate
                flags.append(bool(items))
        return flags

    first = sampled(7)
    n_allowed, n_blocked = sum(first[:1000]), sum(first[1000:])
    # binomial: 100 ± 30 of 1000 at 0.1, and 100 ± 21 of 200 at 0.5 (more than 3 sd apart)
    assert 70 <= n_allowed <= 130 and 79 <= n_blocked <= 121
    assert sampled(7) == first  # the same seed draws the same decisions
    assert AuditRates.parse("block=0.2").rate("allow") == 0.01  # the default's default


def test_audit_rates_are_parsed_strictly() -> None:
    assert AuditRates.parse("0.05").rate("block") == 0.05
    for bad in ("2", "-0.1", "x", "0.1,0.2", "blocked=0.1"):
        with pytest.raises(ValueError):
            AuditRates.parse(bad)


def test_appeals_one_per_decision_and_never_of_an_error(store: DecisionStore) -> None:
    [blocked] = put(store, [RIFLE[None]], action="block", triggered=["weapons"])
    [failed] = put(store, [NOTHING[None]], error=True)
    queue = ReviewQueue(store)
    item = queue.appeal(blocked, "a museum piece")
    assert (item.reason, item.appeal_reason, item.sample_probability) == (
        "appeal", "a museum piece", None)
    with pytest.raises(AlreadyAppealed):
        queue.appeal(blocked)
    with pytest.raises(UnknownItem):
        queue.appeal("no-such-decision")
    with pytest.raises(NotAppealable):
        queue.appeal(failed)


def test_claims_come_in_priority_order_then_oldest_first(url: str) -> None:
    store = DecisionStore(url, audit=AuditSampler(AuditRates(default=1.0), seed=1))
    queue = ReviewQueue(store)
    [audited] = put(store, [NOTHING[None]], at=time.time() - 9000)
    old_review, new_review = put(store, [RIFLE[None]] * 2, action="review",
                                 triggered=["weapons"], at=time.time() - 8000)
    [blocked] = put(store, [RIFLE[None]], action="block", triggered=["weapons"])
    queue.appeal(blocked)  # the blocked decision was also audited (rate 1)
    order = []
    while (item := queue.claim("ann")) is not None:
        order.append((item.reason, item.decision_id))
        queue.decide(item.item_id, "ann", [], ACTIONS)
    assert order == [("appeal", blocked), ("review", old_review), ("review", new_review),
                     ("audit", audited), ("audit", blocked)]
    # another order, as MODERATION_REVIEW_PRIORITY sets it
    put(store, [RIFLE[None]], action="review", triggered=["weapons"], at=time.time() - 60)
    put(store, [NOTHING[None]])  # audited, and newer
    first = queue.claim("bob", priority=("audit", "review", "appeal"))
    assert first is not None and first.reason == "audit"


def test_a_lease_holds_the_item_until_it_expires(store: DecisionStore) -> None:
    put(store, [RIFLE[None]] * 2, action="review", triggered=["weapons"])
    queue = ReviewQueue(store)
    now = time.time()
    mine = queue.claim("ann", lease_s=60, now=now)
    assert mine is not None and mine.claimed_by == "ann"
    again = queue.claim("ann", lease_s=60, now=now + 1)  # held: the same one, lease renewed
    assert again is not None and again.item_id == mine.item_id
    other = queue.claim("bob", lease_s=60, now=now + 2)
    assert other is not None and other.item_id != mine.item_id
    assert queue.claim("cy", lease_s=60, now=now + 3) is None  # both are held
    back = queue.claim("cy", lease_s=60, now=now + 62)  # ann's lease (renewed at +1) ran out
    assert back is not None and back.item_id == mine.item_id and back.claimed_by == "cy"
    with pytest.raises(NotClaimed, match="another reviewer"):
        queue.decide(mine.item_id, "ann", [], ACTIONS)
    released = queue.release(other.item_id, "bob")
    assert released.status == "waiting" and released.claimed_by is None
    with pytest.raises(NotClaimed):
        queue.release(other.item_id, "bob")


def test_a_skipped_item_goes_to_the_back_of_its_line(store: DecisionStore) -> None:
    first, second = put(store, [RIFLE[None]] * 2, action="review", triggered=["weapons"])
    queue = ReviewQueue(store)
    skipped = queue.claim("ann")
    assert skipped is not None and skipped.decision_id == first
    queue.release(skipped.item_id, "ann")
    following = queue.claim("ann")
    assert following is not None and following.decision_id == second
    queue.decide(following.item_id, "ann", [], ACTIONS)
    again = queue.claim("ann")  # nothing else waits: the skipped one comes back
    assert again is not None and again.decision_id == first


def test_a_verdict_is_validated_and_recorded_once(store: DecisionStore) -> None:
    [decision] = put(store, [BEER[None]], action="review", triggered=["alcohol"])
    queue = ReviewQueue(store)
    [item] = queue.items_of(decision)
    with pytest.raises(NotClaimed, match="claim it first"):
        queue.decide(item.item_id, "ann", ["alcohol"], ACTIONS)
    queue.claim("ann")
    with pytest.raises(UnknownCategory, match="'drugs'"):
        queue.decide(item.item_id, "ann", ["drugs"], ACTIONS)
    with pytest.raises(NotClaimed):
        queue.decide(item.item_id, "bob", [], ACTIONS)
    with pytest.raises(UnknownItem):
        queue.decide(10_000, "ann", [], ACTIONS)
    verdict = queue.decide(item.item_id, "ann", ["alcohol", "weapons"], ACTIONS, note="both")
    assert (verdict.violations, verdict.action, verdict.original_action) == (
        ["alcohol", "weapons"], "block", "review")
    assert (verdict.reviewer, verdict.note, verdict.appeal, verdict.delivery) == (
        "ann", "both", None, None)
    with pytest.raises(AlreadyDecided):
        queue.decide(item.item_id, "ann", [], ACTIONS)
    assert queue.item(item.item_id).status == "decided"  # type: ignore[union-attr]
    assert [v.verdict_id for v in queue.verdicts(VerdictFilters(category="weapons"))] == [
        verdict.verdict_id]
    assert queue.verdicts(VerdictFilters(category="weapon")) == []  # whole ids only
    assert queue.verdicts(VerdictFilters(reviewer="bob")) == []


def test_verdict_actions_and_appeal_outcomes(store: DecisionStore) -> None:
    assert verdict_action([], ACTIONS) == "allow"
    assert verdict_action(["alcohol"], ACTIONS) == "flag"
    assert verdict_action(["gore"], ACTIONS) == "block"  # a confirmed review is a block
    upheld, overturned = put(store, [RIFLE[None]] * 2, action="block", triggered=["weapons"])
    queue = ReviewQueue(store)
    outcomes = {}
    for decision, violations in ((upheld, ["weapons"]), (overturned, [])):
        queue.appeal(decision)
        item = queue.claim("ann")
        assert item is not None and item.decision_id == decision
        outcomes[decision] = queue.decide(item.item_id, "ann", violations, ACTIONS).appeal
    assert outcomes == {upheld: "upheld", overturned: "overturned"}


def _claim_until_empty(queue: ReviewQueue, reviewers: list[str]) -> list[int]:
    taken: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while (item := queue.claim(name)) is not None:
            with lock:
                taken.append(item.item_id)
            queue.decide(item.item_id, name, [], ACTIONS)

    threads = [threading.Thread(target=work, args=(n,)) for n in reviewers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return taken


def test_concurrent_claims_never_hand_out_an_item_twice(store: DecisionStore) -> None:
    ids = put(store, [RIFLE[None]] * 60, action="review", triggered=["weapons"])
    queue = ReviewQueue(store)
    taken = _claim_until_empty(queue, [f"r{i}" for i in range(8)])
    assert len(taken) == len(ids) and len(set(taken)) == len(ids)


CLAIMER = """
import json, pathlib, sys, threading, time
from decisionlog import DecisionStore
from decisionlog.reviews import ReviewQueue
from tests.decisionlog.test_reviews import ACTIONS, _claim_until_empty
queue = ReviewQueue(DecisionStore(sys.argv[1]))
folder = pathlib.Path(sys.argv[3])
(folder / sys.argv[2]).touch()  # ready: imported and connected
while not (folder / "go").exists():  # both start claiming together
    time.sleep(0.01)
print(json.dumps(_claim_until_empty(queue, [f"{sys.argv[2]}-{i}" for i in range(4)])))
"""


def test_two_processes_claiming_at_once_take_every_item_once(store: DecisionStore,
                                                            tmp_path: Path) -> None:
    ids = put(store, [RIFLE[None]] * 80, action="review", triggered=["weapons"])
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, store.url, name, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True) for name in ("p1", "p2")]
    # a process that starts faster must not claim every item before the other has started
    deadline = time.monotonic() + 120
    while not all((tmp_path / n).exists() for n in ("p1", "p2")):
        assert time.monotonic() < deadline, "the claiming processes did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    taken = [json.loads(o) for o in outputs]
    assert all(taken), "both processes claimed items"
    counts = Counter(i for t in taken for i in t)
    assert len(counts) == len(ids) and set(counts.values()) == {1}
    reviewers = {v.reviewer.split("-")[0] for v in ReviewQueue(store).verdicts(
        VerdictFilters(), limit=100)}
    assert reviewers == {"p1", "p2"}


def test_the_outbox_hands_each_due_delivery_to_one_sender(store: DecisionStore) -> None:
    [decision] = put(store, [RIFLE[None]], action="review", triggered=["weapons"],
                     client_ids=["upload-7"])
    queue = ReviewQueue(store)
    item = queue.claim("ann")
    assert item is not None
    verdict = queue.decide(item.item_id, "ann", ["weapons"], ACTIONS, webhook=True)
    assert verdict.delivery is not None and verdict.delivery.status == "pending"
    now = time.time() + 1
    [(outbox_id, payload, attempts, _)] = queue.take_due(lease_s=30, now=now)
    assert queue.take_due(lease_s=30, now=now) == []  # taken: not handed out again
    body = json.loads(payload)
    assert (body["decision_id"], body["client_id"], body["action"], body["violations"]) == (
        decision, "upload-7", "block", ["weapons"])
    queue.attempt_failed(outbox_id, "ConnectionRefusedError", retry_at=now + 5)
    assert queue.take_due(lease_s=30, now=now + 4) == []
    [(again, _, attempts, _)] = queue.take_due(lease_s=30, now=now + 5)
    assert (again, attempts) == (outbox_id, 1)
    queue.delivered(outbox_id)
    [shown] = queue.verdicts(VerdictFilters())
    assert shown.delivery is not None
    assert (shown.delivery.status, shown.delivery.attempts) == ("delivered", 2)
    assert queue.counts()["deliveries"] == {"pending": 0, "delivered": 1, "failed": 0}


def test_purging_drops_undecided_items_and_keeps_verdicts(store: DecisionStore) -> None:
    at = time.time() - 10 * 86400
    decided, waiting = put(store, [RIFLE[None]] * 2, action="review", triggered=["weapons"],
                           at=at)
    queue = ReviewQueue(store)
    item = queue.claim("ann")
    assert item is not None and item.decision_id == decided
    queue.decide(item.item_id, "ann", ["weapons"], ACTIONS)
    assert store.purge(time.time() - 86400) == 2
    assert queue.items_of(waiting) == []
    assert [v.decision_id for v in queue.verdicts(VerdictFilters())] == [decided]


def test_quality_from_the_log_is_exact_on_a_census(store: DecisionStore) -> None:
    """Every review action decided (probability 1 each): precision is exactly the share of
    confirmed flags, with no uncertainty left."""
    from decisionlog.quality import quality

    ids = put(store, [RIFLE[None]] * 12, action="review", triggered=["weapons"])
    queue = ReviewQueue(store)
    for n, _ in enumerate(ids):
        item = queue.claim("ann")
        assert item is not None
        queue.decide(item.item_id, "ann", ["weapons"] if n < 9 else [], ACTIONS)
    report = quality(store.engine, ["weapons", "alcohol"], since=0)
    weapons = report.categories["weapons"]["precision"]
    assert weapons["estimate"] == 0.75 and weapons["interval"] == [0.75, 0.75]
    assert weapons["verdicts"] == 12
    assert report.categories["alcohol"]["precision"]["status"] == "not_enough_verdicts"
    recall = report.categories["weapons"]["recall"]  # 9 images found violating it: too few
    assert (recall["status"], recall["verdicts"], recall["estimate"]) == (
        "not_enough_verdicts", 9, None)
    recall = quality(store.engine, ["weapons"], since=0, min_verdicts=9).categories[
        "weapons"]["recall"]
    assert np.isclose(recall["estimate"], 1.0)
