"""The one scorer, with vectors worked out on paper (see test_scoring.py for the hand policy):
per-category maximum over frames, the frame named per category, the most severe action."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from moderation import PolicyError
from moderation.policy import Action, parse_policy
from moderation.prompts import embed_policy
from moderation.scorer import Scorer
from tests.fakes import BEER, BETWEEN, HAND_POLICY, NOTHING, RIFLE, TOY, FakeEncoder


@pytest.fixture
def scorer(fake_encoder: FakeEncoder) -> Scorer:
    policy = parse_policy(yaml.safe_dump(HAND_POLICY, sort_keys=False))
    return Scorer(policy, embed_policy(policy, fake_encoder))


def test_a_still_image_is_an_animation_of_one_frame(scorer: Scorer) -> None:
    [rifle, beer] = scorer.decide([RIFLE[None], BEER[None]])
    assert rifle.action is Action.BLOCK and rifle.triggered == ["weapons"]
    assert rifle.categories["weapons"].frame == 0 and rifle.frame == 0
    assert beer.action is Action.FLAG and beer.triggered == ["alcohol"]


def test_each_category_takes_its_own_best_frame(scorer: Scorer) -> None:
    frames = np.stack([NOTHING, BEER, BETWEEN, NOTHING])
    [decision] = scorer.decide([frames], [[0, 7, 14, 21]])
    weapons, alcohol = decision.categories["weapons"], decision.categories["alcohol"]
    # weapons: frame 14 (between a gun and a toy gun) is in the review band
    assert weapons.frame == 14 and weapons.action is Action.REVIEW
    assert weapons.score == pytest.approx(6 / math.sqrt(20) - 1 / math.sqrt(2))
    # alcohol: frame 7 (a beer): cosine 1 with "a beer"
    assert alcohol.frame == 7 and alcohol.action is Action.FLAG
    assert decision.triggered == ["weapons", "alcohol"]  # review is more severe than flag
    assert decision.action is Action.REVIEW and decision.frame == 14


def test_scores_are_the_maximum_over_frames_and_match_the_decisions(scorer: Scorer) -> None:
    images = [np.stack([NOTHING, BEER, RIFLE]), TOY[None], np.stack([BETWEEN, TOY])]
    scores = scorer.scores(images)
    assert scores.shape == (3, 2)
    decisions = scorer.decide(images)
    for row, decision in zip(scores, decisions, strict=True):
        assert row.tolist() == pytest.approx(
            [decision.categories[c].score for c in ("weapons", "alcohol")]
        )
    assert scores[0].tolist() == pytest.approx([3 / math.sqrt(10), 1.0])  # (3, 1, 0)/sqrt(10)


def test_ties_name_the_first_frame_and_empty_input(scorer: Scorer) -> None:
    [decision] = scorer.decide([np.stack([RIFLE, RIFLE])], [[3, 9]])
    assert decision.categories["weapons"].frame == 3
    assert scorer.decide([]) == [] and scorer.scores([]).shape == (0, 2)
    with pytest.raises(ValueError, match="at least one frame"):
        scorer.decide([np.zeros((0, 3), np.float32)])


def test_a_profile_is_checked_when_the_scorer_is_built(fake_encoder: FakeEncoder) -> None:
    policy = parse_policy(yaml.safe_dump(HAND_POLICY, sort_keys=False))
    with pytest.raises(PolicyError, match="nope"):
        Scorer(policy, embed_policy(policy, fake_encoder), profile="nope")


def test_assess_decides_as_decide_does_for_every_image(fake_encoder: FakeEncoder) -> None:
    """The array path (dry-runs over the log) and the decision path (the service) give the
    same scores and actions, review band and profiles included."""
    data = dict(HAND_POLICY, profiles={"strict": {"alcohol": {"value": 0.2}}})
    policy = parse_policy(yaml.safe_dump(data, sort_keys=False))
    text = embed_policy(policy, fake_encoder)
    rng = np.random.default_rng(7)
    images = [rng.normal(size=(int(n), 3)).astype(np.float32) for n in rng.integers(1, 4, 300)]
    images = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in images]
    images += [RIFLE[None], BETWEEN[None], np.stack([TOY, BEER])]
    for profile in (None, "strict"):
        scorer = Scorer(policy, text, profile)
        decisions = scorer.decide(images)
        assessed = scorer.assess(np.concatenate(images), np.array([len(i) for i in images]))
        assert assessed.action.tolist() == [d.action.severity for d in decisions]
        assert assessed.severity.tolist() == [
            [d.categories[c].action.severity for c in ("weapons", "alcohol")] for d in decisions
        ]
        assert np.allclose(assessed.score, scorer.scores(images))
        assert np.allclose(assessed.margin, [
            [d.categories[c].margin for c in ("weapons", "alcohol")] for d in decisions])
        assert set(assessed.action.tolist()) == {0, 1, 2, 3}  # every action was exercised


def test_assess_checks_the_frame_counts(scorer: Scorer) -> None:
    assert scorer.assess(np.zeros((0, 3), np.float32), np.zeros(0, int)).action.shape == (0,)
    with pytest.raises(ValueError, match="add up to the 2 vectors"):
        scorer.assess(np.stack([RIFLE, TOY]), np.array([1, 2]))
    with pytest.raises(ValueError, match="positive"):
        scorer.assess(np.stack([RIFLE, TOY]), np.array([2, 0]))


def test_shared_product_gives_each_policy_the_scores_it_would_get_alone(
        scorer: Scorer, fake_encoder: FakeEncoder) -> None:
    from moderation.scorer import SharedProduct

    edited = yaml.safe_load(yaml.safe_dump(HAND_POLICY))
    edited["categories"]["weapons"]["exceptions"] = []  # a category loses its exceptions
    other = parse_policy(yaml.safe_dump(edited, sort_keys=False))
    second = Scorer(other, embed_policy(other, fake_encoder))
    frames = [np.stack([NOTHING, BEER, BETWEEN]), RIFLE[None], TOY[None], BEER[None]]
    vectors = np.concatenate(frames).astype(np.float16)
    counts = np.array([len(f) for f in frames])
    shared = SharedProduct([scorer, second])
    # rows the two policies share are multiplied once
    alone = sum(len(s.text.categories) + sum(len(e) for e in s.text.exceptions)
                for s in (scorer, second))
    assert len(shared.columns.matrix) < alone
    together = shared.scores(vectors.view(np.uint16), counts)
    stored = [f.astype(np.float16).astype(np.float32) for f in frames]
    for s, score in zip((scorer, second), together, strict=True):
        np.testing.assert_allclose(score, s.scores(stored), atol=1e-6)
        # and the same actions as assess, threshold for threshold
        np.testing.assert_array_equal(s.judge(score).action,
                                      s.assess(np.concatenate(stored), counts).action)
    assert [len(x) for x in shared.scores(vectors[:0].view(np.uint16), counts[:0])] == [0, 0]
