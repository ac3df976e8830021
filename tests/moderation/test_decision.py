from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from moderation.decision import decide
from moderation.policy import Action, parse_policy
from moderation.prompts import embed_policy
from moderation.scoring import score_images
from tests.fakes import HAND_POLICY, FakeEncoder, unit


@pytest.fixture
def decisions(fake_encoder: FakeEncoder):  # type: ignore[no-untyped-def]
    policy = parse_policy(yaml.safe_dump(HAND_POLICY, sort_keys=False))
    text = embed_policy(policy, fake_encoder)
    images = np.stack([unit(1, 0, 0), unit(0, 0, 1), unit(1, 0, 1), unit(0, 1, 0)])
    return decide(score_images(images, text), text, policy)


def test_threshold_band_and_margin(decisions) -> None:  # type: ignore[no-untyped-def]
    rifle, toy, between, beer = decisions
    weapons = rifle.categories["weapons"]
    assert weapons.action is Action.BLOCK and weapons.flagged
    assert weapons.margin == pytest.approx(3 / math.sqrt(10) - 0.8)
    assert weapons.threshold == 0.8 and weapons.review_from == 0.6

    # 0.6345 is in the review band [0.6, 0.8): review, with a negative margin to 0.8
    middle = between.categories["weapons"]
    assert middle.action is Action.REVIEW and middle.flagged
    assert middle.margin == pytest.approx(6 / math.sqrt(20) - 1 / math.sqrt(2) - 0.8)
    assert middle.closest_exception is not None
    assert middle.closest_exception.text == "toy gun"

    assert toy.categories["weapons"].action is Action.ALLOW
    assert not toy.categories["weapons"].flagged
    assert beer.categories["alcohol"].action is Action.FLAG


def test_overall_action_is_the_most_severe(decisions) -> None:  # type: ignore[no-untyped-def]
    rifle, toy, between, beer = decisions
    assert [d.action for d in decisions] == [
        Action.BLOCK, Action.ALLOW, Action.REVIEW, Action.FLAG,
    ]
    assert rifle.triggered == ["weapons"] and rifle.flagged
    assert toy.triggered == [] and not toy.flagged
    assert beer.triggered == ["alcohol"]


def test_top_terms_explain_the_flag(decisions) -> None:  # type: ignore[no-untyped-def]
    top = decisions[0].categories["weapons"].top_terms
    assert [t.text for t in top] == ["rifle", "gun"]
    assert [t.similarity for t in top] == pytest.approx([1.0, 1 / math.sqrt(2)])
    as_json = decisions[0].categories["weapons"].to_dict()
    assert as_json["top_terms"][0] == {"text": "rifle", "similarity": 1.0}
    assert as_json["action"] == "block"
