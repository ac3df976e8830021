"""Dry-runs of policy edits on stored decisions, with the hand-made encoder: every count is
worked out on paper (or by the scoring formula written out in numpy, for many vectors)."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from decisionlog import DecisionStore, PolicyLog
from decisionlog.lab import UnknownPolicyVersion, dry_run, dry_run_policy
from moderation import Moderator
from moderation.errors import ModelMismatchError, NotFound, PolicyError, PolicyLimitError
from moderation.policy import PolicyLimits, parse_policy
from moderation.prompts import EmbeddingCache, embed_policy
from moderation.scorer import Scorer
from tests.decisionlog.conftest import MODEL, put
from tests.fakes import (
    BEER,
    BETWEEN,
    HAND_POLICY,
    HAND_TEXTS,
    NOTHING,
    RIFLE,
    TOY,
    FakeEncoder,
    unit,
)


def scorer(data: dict[str, Any], encoder: FakeEncoder | None = None) -> Scorer:
    policy = parse_policy(yaml.safe_dump(data, sort_keys=False))
    return Scorer(policy, embed_policy(policy, encoder or FakeEncoder(dict(HAND_TEXTS))))


def edited(category: str, **fields: Any) -> dict[str, Any]:
    data = copy.deepcopy(HAND_POLICY)
    data["categories"][category].update(fields)
    return data


HAND_IMAGES = [RIFLE[None], TOY[None], BETWEEN[None], BEER[None], NOTHING[None]]
# under the hand policy: block (weapons), allow (the toy-gun exception wins), review (weapons'
# band), flag (alcohol), allow


def test_an_unchanged_policy_changes_nothing_and_counts_every_action(
        store: DecisionStore) -> None:
    put(store, HAND_IMAGES)
    report = dry_run(store, scorer(HAND_POLICY), scorer(HAND_POLICY), model=MODEL)
    assert report.decisions == 5 and report.changed_total == 0 and report.changed == []
    assert {a: e.before for a, e in report.actions.items()} == {
        "allow": 2, "flag": 1, "review": 1, "block": 1}
    assert report.categories["weapons"].before.flagged == 2  # type: ignore[union-attr]
    assert report.categories["alcohol"].after.rate == pytest.approx(0.2)  # type: ignore[union-attr]
    assert report.diff == [] and report.left_out.total == 0 and report.note is None


def test_a_threshold_below_every_score_flags_everything_and_above_clears_it(
        store: DecisionStore) -> None:
    put(store, HAND_IMAGES)
    low = dry_run(store, scorer(HAND_POLICY),
                  scorer(edited("weapons", threshold={"value": -1.0})), model=MODEL)
    weapons = low.categories["weapons"]
    assert (weapons.before.flagged, weapons.after.flagged, weapons.change) == (2, 5, 3)  # type: ignore[union-attr]
    assert low.actions["block"].after == 5 and low.actions["allow"].after == 0
    # toy gun and nothing: allow → block; beer: flag → block; between: review → block
    assert low.changed_by_kind == {"newly_flagged": 2, "newly_cleared": 0,
                                   "action_changed": 2, "categories_changed": 0}
    assert [c.change for c in low.changed][:2] == ["newly_flagged"] * 2  # allow→block first
    assert "weapons: threshold 0.8 → -1 (flags more)" in [d.text for d in low.diff]

    high = dry_run(store, scorer(HAND_POLICY),
                   scorer(edited("weapons", threshold={"value": 1.0})), model=MODEL)
    assert high.categories["weapons"].after.flagged == 0  # type: ignore[union-attr]
    assert high.changed_by_kind["newly_cleared"] == 2  # the rifle and the review band
    [rifle] = [c for c in high.changed if c.before.action == "block"]
    assert rifle.after.action == "allow" and rifle.before.triggered == ["weapons"]
    assert rifle.before.categories["weapons"].score == pytest.approx(3 / np.sqrt(10), abs=1e-3)
    assert [t.text for t in rifle.before.categories["weapons"].top_terms] == ["rifle", "gun"]
    assert rifle.client_id == "client-0"


def test_a_new_term_changes_exactly_the_decisions_whose_score_crosses(
        store: DecisionStore) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(400, 3))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = put(store, [v[None] for v in vectors])
    texts = dict(HAND_TEXTS, **{"a knife": unit(0, -1, 1), "the knife": unit(-1, 0, 1)})
    after = edited("weapons", terms=["gun", "rifle", "knife"])
    report = dry_run(store, scorer(HAND_POLICY), scorer(after, FakeEncoder(texts)),
                     model=MODEL, limit=500)

    # the scoring formula by hand: the ensemble is the normalised sum of the prompts' vectors
    def weapons_action(prompts: list[np.ndarray]) -> np.ndarray:
        category = np.sum(prompts, axis=0)
        category /= np.linalg.norm(category)
        stored = vectors.astype(np.float16).astype(np.float64)
        similarity, toy = stored @ category, stored @ TOY
        score = similarity - np.maximum(0, toy - similarity)
        return np.where(score >= 0.8, 3, np.where(score >= 0.6, 2, 0))

    hand = [HAND_TEXTS[f"{a} {t}"] for t in ("gun", "rifle") for a in ("a", "the")]
    knife = [texts["a knife"], texts["the knife"]]
    before, now = weapons_action(hand), weapons_action(hand + knife)
    expected = {ids[i] for i in np.flatnonzero(before != now)}
    assert 0 < len(expected) < 400
    assert report.changed_total == len(expected)
    assert {c.decision_id for c in report.changed} == expected
    assert report.categories["weapons"].after.flagged == int((now > 0).sum())  # type: ignore[union-attr]
    assert "weapons: term added: “knife”" in [d.text for d in report.diff]


def test_animations_are_dry_run_over_all_their_stored_frames(store: DecisionStore) -> None:
    [animation] = put(store, [np.stack([NOTHING, BEER, RIFLE])], frames=[0, 7, 14])
    report = dry_run(store, scorer(HAND_POLICY),
                     scorer(edited("weapons", threshold={"value": 0.95})), model=MODEL)
    [changed] = report.changed
    assert changed.decision_id == animation and changed.change == "action_changed"
    assert changed.before.action == "block" and changed.before.frame == 14
    assert changed.after.action == "flag" and changed.after.triggered == ["alcohol"]
    assert changed.after.categories["alcohol"].frame == 7


def test_another_model_is_refused_and_what_is_left_out_is_said(store: DecisionStore) -> None:
    put(store, [RIFLE[None]], model="ViT-B-32/laion2b_s34b_b79k")
    other = FakeEncoder(dict(HAND_TEXTS))
    with pytest.raises(ModelMismatchError, match="belong to model ViT-B-32/laion2b_s34b_b79k"):
        dry_run(store, scorer(HAND_POLICY, other), scorer(HAND_POLICY, other), model=MODEL)

    put(store, HAND_IMAGES)
    put(store, [RIFLE[None]], error=True)
    put(store, [RIFLE[None], BEER[None]], stored=False)
    put(store, [RIFLE[None]], profile="strict")
    report = dry_run(store, scorer(HAND_POLICY), scorer(HAND_POLICY), model=MODEL)
    assert report.decisions == 5
    assert report.left_out.model_dump() == {
        "total": 5, "other_model": {"ViT-B-32/laion2b_s34b_b79k": 1}, "errors": 1,
        "no_embedding": 2, "profile_missing": {"strict": 1}}


def test_profiles_decide_with_their_own_thresholds(store: DecisionStore) -> None:
    with_profile = dict(copy.deepcopy(HAND_POLICY),
                        profiles={"strict": {"alcohol": {"value": -1.0}}})
    put(store, HAND_IMAGES, profile="strict")
    report = dry_run(store, scorer(HAND_POLICY), scorer(with_profile), model=MODEL)
    assert report.left_out.profile_missing == {"strict": 5}  # the current policy lacks it
    report = dry_run(store, scorer(with_profile), scorer(with_profile), model=MODEL)
    assert report.categories["alcohol"].before.flagged == 5  # type: ignore[union-attr]


def test_an_empty_window_says_so(store: DecisionStore) -> None:
    put(store, HAND_IMAGES, at=time.time() - 30 * 86400)
    report = dry_run(store, scorer(HAND_POLICY), scorer(HAND_POLICY), model=MODEL,
                     since=time.time() - 7 * 86400)
    assert report.decisions == 0 and report.changed == []
    assert report.note is not None and "no stored decision of model fake/hand-made" in report.note


def test_chunks_add_up_to_the_whole_window(store: DecisionStore) -> None:
    rng = np.random.default_rng(5)
    images = [rng.normal(size=(int(n), 3)) for n in rng.integers(1, 4, 150)]
    images = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in images]
    put(store, images)
    args: dict[str, Any] = {"model": MODEL, "limit": 1000}
    after = scorer(edited("weapons", threshold={"value": 0.3}))
    whole = dry_run(store, scorer(HAND_POLICY), after, **args)
    pieces = dry_run(store, scorer(HAND_POLICY), after, chunk=7, **args)
    assert whole.decisions == pieces.decisions == 150
    assert whole.model_dump(exclude={"seconds"}) == pieces.model_dump(exclude={"seconds"})


def test_rescore_records_each_decision_under_the_policy_and_leaves_the_log_alone(
        store: DecisionStore) -> None:
    from decisionlog.rescore import export_rescore, rescore, rescore_runs_of

    ids = put(store, HAND_IMAGES)
    [animation] = put(store, [np.stack([NOTHING, BEER, RIFLE])], frames=[0, 7, 14])
    put(store, [RIFLE[None]], error=True)
    before = [store.get(i) for i in ids]
    run = rescore(store, scorer(edited("weapons", threshold={"value": 0.95})),
                  policy_text="(text)", policy_source="p.yaml")
    assert (run.decisions, run.left_out) == (6, 1) and run.finished_at is not None
    # put() logs "allow"; weapons at 0.95 without a review band blocks nothing, so the beer
    # and the clip's beer frame (alcohol flags) are the two that differ
    assert run.changed == 2
    exported = {r.id: (r, original) for r, original in export_rescore(store, run.id)}
    assert [exported[i][0].action for i in ids] == ["allow", "allow", "allow", "flag", "allow"]
    clip, original = exported[animation]
    assert clip.action == "flag" and clip.frame == 7 and original == "allow"
    assert clip.categories["weapons"].frame == 14  # its best frame, under the threshold now
    assert clip.policy.version == run.policy_version != "v"
    assert [store.get(i) for i in ids] == before  # the decisions themselves are untouched
    assert [r.id for r in rescore_runs_of(store)] == [run.id]
    store.purge(time.time())
    assert list(export_rescore(store, run.id)) == []


# --- the entry point the CLI and the service call ----------------------------------------


def text(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def test_the_entry_point_is_the_dry_run_of_the_parsed_policies(store: DecisionStore) -> None:
    put(store, HAND_IMAGES)
    low = edited("weapons", threshold={"value": -1.0})
    current = Moderator(parse_policy(text(HAND_POLICY)), FakeEncoder(dict(HAND_TEXTS)))
    report = dry_run_policy(store, current, text(low), limits=PolicyLimits())
    expected = dry_run(store, scorer(HAND_POLICY), scorer(low), model=MODEL)
    skip = {"seconds", "before", "after"}
    assert report.model_dump(exclude=skip) == expected.model_dump(exclude=skip)
    assert (report.before.source, report.after.source) == ("active policy", "proposed policy")

    # against a version the log keeps, or a parsed policy: the other way round
    PolicyLog(store.url).activate(version="v-low", name="hand", source="policy.yaml",
                                  text=text(low))
    back = dry_run_policy(store, current, text(HAND_POLICY), against="v-low")
    assert back.before.source == "stored version v-low"
    assert back.before.version == parse_policy(text(low)).version
    assert back.changed_by_kind["newly_cleared"] == expected.changed_by_kind["newly_flagged"]
    given = dry_run_policy(store, current, parse_policy(text(HAND_POLICY)),
                           against=parse_policy(text(low)), against_source="file low.yaml",
                           proposed_source="file hand.yaml")
    assert (given.before.source, given.after.source) == ("file low.yaml", "file hand.yaml")
    assert given.model_dump(exclude={"seconds"}) == back.model_dump(
        exclude={"seconds"}) | {"before": given.before.model_dump(),
                                "after": given.after.model_dump()}


@pytest.mark.parametrize(("proposed", "against", "error", "code", "says"), [
    ("name: x\n", None, PolicyError, "invalid_policy", "the proposed policy is not valid"),
    (text(HAND_POLICY), "nope", UnknownPolicyVersion, "not_found",
     "no policy version 'nope' was ever active"),
    (text(dict(HAND_POLICY, model={"name": "RN50", "pretrained": "openai"})), None,
     ModelMismatchError, "model_mismatch",
     "the proposed policy names model RN50/openai, but the stored embeddings (and this "
     "server's encoder) belong to model fake/hand-made (fake/hand-made)"),
    (text(HAND_POLICY), "v-broken", PolicyError, "invalid_policy",
     "stored policy version 'v-broken' no longer validates"),
    (text(HAND_POLICY), "v-other", ModelMismatchError, "model_mismatch",
     "stored version v-other names model RN50/openai"),
    ("x" * 5000, None, PolicyLimitError, "policy_too_large",
     "the proposed policy asks for more than this server allows"),
    (text(edited("weapons", terms=["knife"])), None, PolicyLimitError, "policy_too_large",
     "has 2 prompts (terms and exceptions × templates) that were never encoded"),
])
def test_the_entry_point_says_what_is_wrong(
        store: DecisionStore, tmp_path: Path, proposed: str, against: str | None,
        error: type[Exception], code: str, says: str) -> None:
    log = PolicyLog(store.url)
    log.activate(version="v-broken", name="hand", source="policy.yaml", text="name: x\n")
    log.activate(version="v-other", name="hand", source="policy.yaml",
                 text=text(dict(HAND_POLICY, model={"name": "RN50", "pretrained": "openai"})))
    encoder = FakeEncoder(dict(HAND_TEXTS))
    current = Moderator(parse_policy(text(HAND_POLICY)), encoder, EmbeddingCache(tmp_path))
    encoder.encoded_texts.clear()
    with pytest.raises(error) as info:
        dry_run_policy(store, current, proposed, against=against, policies=log,
                       limits=PolicyLimits(max_bytes=4000, max_new_prompts=1))
    assert says in str(info.value) and info.value.code == code  # type: ignore[attr-defined]
    if code == "invalid_policy":  # the faults apart from the message
        assert isinstance(info.value, PolicyError)
        assert info.value.faults and info.value.faults != [str(info.value)]
    assert isinstance(info.value, NotFound) == (code == "not_found")
    assert encoder.encoded_texts == []  # refused before anything was encoded
