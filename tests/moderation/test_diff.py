"""Policy diffs in plain words: every decisive edit named once, cosmetic edits marked."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from moderation.diff import diff_policies
from moderation.policy import Policy, parse_policy
from tests.fakes import HAND_POLICY


def policy(data: dict[str, Any]) -> Policy:
    return parse_policy(yaml.safe_dump(data, sort_keys=False))


def edited(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(HAND_POLICY)
    data.update(changes)
    return data


def test_the_same_policy_has_no_differences() -> None:
    assert diff_policies(policy(HAND_POLICY), policy(HAND_POLICY)) == []


def test_each_edit_is_one_sentence() -> None:
    after = edited(templates=["a {}", "the {}", "a photo of {}"], top_terms=3)
    weapons = after["categories"]["weapons"]
    weapons["terms"] = ["gun", "machete"]
    weapons["exceptions"] = []
    weapons["threshold"] = {"value": 0.7}
    after["categories"]["alcohol"]["action"] = "review"
    after["categories"]["alcohol"]["description"] = "beer and wine"
    after["categories"]["drugs"] = {"description": "d", "terms": ["pills"], "action": "block",
                                    "threshold": {"value": 0.3}}
    after["profiles"] = {"strict": {"alcohol": {"value": 0.2}}}
    changes = diff_policies(policy(HAND_POLICY), policy(after))
    texts = [c.text for c in changes]
    assert texts == [
        "template added: “a photo of {}”",
        "weapons: term removed: “rifle”",
        "weapons: term added: “machete”",
        "weapons: exception removed: “toy gun”",
        "weapons: threshold 0.8 → 0.7 (flags more)",
        "weapons: review from 0.6 → none",
        "alcohol: action flag → review",
        "alcohol: description edited",
        "category added: drugs (block at 0.3, 1 terms, 0 exceptions)",
        "calibration profile added: strict (alcohol)",
        "top terms shown 2 → 3",
    ]
    cosmetic = {c.text for c in changes if not c.decisive}
    assert cosmetic == {"alcohol: description edited", "top terms shown 2 → 3"}
    removed = diff_policies(policy(after), policy(HAND_POLICY))
    assert "category removed: drugs (block at 0.3, 1 terms, 0 exceptions)" in [
        c.text for c in removed]
    assert "weapons: threshold 0.7 → 0.8 (flags less)" in [c.text for c in removed]


def test_profile_thresholds_and_model() -> None:
    a = edited(profiles={"strict": {"alcohol": {"value": 0.2}}})
    b = edited(profiles={"strict": {"alcohol": {"value": 0.4}, "weapons": {"value": 0.9}}},
               model={"name": "fake", "pretrained": "other"})
    texts = [c.text for c in diff_policies(policy(a), policy(b))]
    assert texts == [
        "model fake/hand-made → fake/other",
        "profiles.strict.alcohol: threshold 0.2 → 0.4 (flags less)",
        # weapons now has its own threshold in the profile instead of the category's
        "profiles.strict.weapons: threshold 0.8 → 0.9 (flags less)",
        "profiles.strict.weapons: review from 0.6 → none",
    ]
