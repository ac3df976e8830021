from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from moderation import PolicyError, load_policy
from moderation.policy import Action, parse_policy
from tests.fakes import HAND_POLICY

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"


@pytest.mark.parametrize("path", sorted(POLICY_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_policy_loads(path: Path) -> None:
    policy = load_policy(path)
    assert policy.categories
    for cid, category in policy.categories.items():
        assert len(category.terms) >= 3, cid
        assert category.exceptions, cid


def test_default_policy_covers_the_required_categories() -> None:
    policy = load_policy(POLICY_DIR / "default.yaml")
    assert {
        "weapons", "graphic_violence", "self_harm", "drugs", "alcohol", "tobacco", "nudity",
        "hate_symbols", "gambling",
    } <= set(policy.categories)


def bad(**changes: Any) -> dict[str, Any]:
    """HAND_POLICY with keys changed; ``a__b__c=v`` sets data["a"]["b"]["c"] = v."""
    data = copy.deepcopy(HAND_POLICY)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return data


DELETE = object()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bad(categories__weapons__treshold=0.3),
         r"p\.yaml: categories\.weapons\.treshold: unknown key"),
        (bad(categories__weapons__threshold__value="high"),
         r"categories\.weapons\.threshold\.value: Input should be a valid number"),
        (bad(categories__weapons__terms=[]), r"categories\.weapons\.terms: must not be empty"),
        (bad(categories__weapons__terms=DELETE), r"categories\.weapons\.terms: missing key"),
        (bad(templates=["a photo of"]),
         r"templates: template 'a photo of' must contain the placeholder \{\} exactly once"),
        (bad(categories__alcohol__templates=["{} and {}"]),
         r"categories\.alcohol\.templates: template '\{\} and \{\}' must contain"),
        (bad(categories__Weapons={}), r"categories\.Weapons: 'Weapons' is not snake_case"),
        ({**HAND_POLICY, "categories": {"self__harm": {}}}, r"'self__harm' is not snake_case"),
        (bad(categories__weapons__threshold__value=1.5),
         r"categories\.weapons\.threshold\.value: Input should be less than or equal to 1"),
        (bad(categories__weapons__threshold__review_from=-2),
         r"threshold\.review_from: Input should be greater than or equal to -1"),
        (bad(categories__weapons__threshold__review_from=0.9),
         r"review_from \(0\.9\) must be below value \(0\.8\)"),
        (bad(categories__alcohol__threshold={"value": 0.5, "review_from": 0.4}),
         r"review_from is only meaningful with action 'block' \(got action 'flag'\)"),
        (bad(categories__weapons__action="delete"),
         r"categories\.weapons\.action: Input should be 'flag', 'review' or 'block'"),
        (bad(categories__weapons__terms=["gun", "gun"]), r"terms listed more than once: \['gun'\]"),
        (bad(categories__weapons__exceptions=["gun"]),
         r"these are both terms and exceptions: \['gun'\]"),
        (bad(categories={}), r"categories: must not be empty"),
        (bad(model=DELETE), r"p\.yaml: model: missing key"),
        (bad(model={"name": "ViT-B-32", "pretrained": "x", "weights": "y"}),
         r"model\.weights: unknown key"),
        (bad(categories__weapons__threshold__provenance={"source": "calibrated", "model": "m"}),
         r"threshold\.provenance\.dataset: missing key"),
        (bad(categories__weapons__threshold__provenance={"source": "guessed"}),
         r"threshold\.provenance: .*'uncalibrated', 'calibrated'"),
    ],
)
def test_each_fault_is_named_with_its_key_path(data: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(yaml.safe_dump(data, sort_keys=False), source="p.yaml")


def test_every_fault_is_reported_at_once() -> None:
    data = bad(
        templates=["no placeholder"],
        categories__weapons__treshold=0.1,
        categories__alcohol__terms=[],
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(yaml.safe_dump(data, sort_keys=False), source="p.yaml")
    assert len(info.value.faults) == 3
    assert "3 faults" in str(info.value)
    assert all(f.startswith("p.yaml: ") for f in info.value.faults)


def test_duplicate_category_is_an_error_not_a_silent_overwrite() -> None:
    lines = yaml.safe_dump(HAND_POLICY, sort_keys=False).splitlines()
    at = lines.index("categories:") + 1
    lines[at:at] = ["  weapons:", "    description: first copy"]
    with pytest.raises(PolicyError, match=r"p\.yaml: line \d+: duplicate key 'weapons'"):
        parse_policy("\n".join(lines), source="p.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: [unclosed", r"p\.yaml: not valid YAML"),
        ("- a list", r"\(top level\): expected a mapping of policy keys, got list"),
        ("", r"expected a mapping of policy keys, got NoneType"),
    ],
)
def test_not_a_policy_at_all(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(text, source="p.yaml")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"nope\.yaml: cannot read policy file"):
        load_policy(tmp_path / "nope.yaml")


def test_version_changes_with_what_decides_and_only_that() -> None:
    base = parse_policy(yaml.safe_dump(HAND_POLICY, sort_keys=False))
    assert base.version == parse_policy(yaml.safe_dump(HAND_POLICY, sort_keys=False)).version
    assert len(base.version) == 12

    described = bad(description="new words", categories__weapons__description="other")
    assert parse_policy(yaml.safe_dump(described, sort_keys=False)).version == base.version

    for change in (
        bad(categories__weapons__terms=["gun", "rifle", "pistol"]),
        bad(categories__weapons__exceptions=[]),
        bad(categories__weapons__threshold__value=0.81),
        bad(categories__weapons__action="review", categories__weapons__threshold={"value": 0.8}),
        bad(templates=["a {}"]),
        bad(model={"name": "fake", "pretrained": "other"}),
    ):
        assert parse_policy(yaml.safe_dump(change, sort_keys=False)).version != base.version


def test_relative_checkpoint_path_is_resolved_next_to_the_policy(tmp_path: Path) -> None:
    (tmp_path / "weights.pt").write_bytes(b"x")
    data = bad(model={"name": "ViT-B-32", "pretrained": "weights.pt"})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert load_policy(path).model.pretrained == str(tmp_path / "weights.pt")


def test_missing_architecture_config_is_a_policy_error(tmp_path: Path) -> None:
    data = bad(model={"name": "x", "pretrained": "y", "config": "arch.json"})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(PolicyError, match=r"model\.config: architecture file .*arch\.json"):
        load_policy(path)


def test_actions_are_ordered_by_severity() -> None:
    order = [Action.ALLOW, Action.FLAG, Action.REVIEW, Action.BLOCK]
    assert [a.severity for a in order] == sorted(a.severity for a in order)
    assert len({a.severity for a in order}) == 4


def with_profiles(profiles: dict[str, Any]) -> dict[str, Any]:
    return {**copy.deepcopy(HAND_POLICY), "profiles": profiles}


def test_profiles_override_thresholds_by_name() -> None:
    policy = parse_policy(yaml.safe_dump(with_profiles(
        {"avatars": {"weapons": {"value": 0.5}}}
    ), sort_keys=False))
    assert policy.profile_names() == ["default", "avatars"]
    assert policy.threshold_for("weapons", "avatars").value == 0.5
    assert policy.threshold_for("alcohol", "avatars").value == 0.5  # falls back: the same here
    assert policy.threshold_for("weapons").value == 0.8
    assert policy.threshold_for("weapons", "default").value == 0.8
    with pytest.raises(PolicyError, match=r"unknown calibration profile 'kids'; this policy "
                                          r"has: default, avatars"):
        policy.threshold_for("weapons", "kids")
    base = parse_policy(yaml.safe_dump(HAND_POLICY, sort_keys=False))
    assert policy.version != base.version


@pytest.mark.parametrize(
    ("profiles", "message"),
    [
        ({"avatars": {"guns": {"value": 0.5}}}, r"profiles\.avatars\.guns: no such category"),
        ({"default": {"weapons": {"value": 0.5}}}, r"profiles\.default: the name is reserved"),
        ({"Avatars": {}}, r"'Avatars' is not snake_case"),
        ({"avatars": {"alcohol": {"value": 0.5, "review_from": 0.2}}},
         r"profiles\.avatars\.alcohol\.review_from: only meaningful with action 'block'"),
        ({"avatars": {"weapons": {"value": 3}}},
         r"profiles\.avatars\.weapons\.value: Input should be less than or equal to 1"),
    ],
)
def test_bad_profiles(profiles: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(yaml.safe_dump(with_profiles(profiles), sort_keys=False), source="p.yaml")
