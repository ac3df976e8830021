"""Hostile policy texts: each is refused with a PolicyError (a PolicyLimitError past a limit),
quickly, with a short message; never a crash, a traceback, or a server path."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from moderation import Moderator, PolicyError, PolicyLimitError, PolicyLimits, load_policy
from moderation.cli import main
from moderation.policy import parse_policy
from moderation.prompts import EmbeddingCache, OverlayCache
from tests.fakes import HAND_POLICY, FakeEncoder, unit

HAND_TEXT = yaml.safe_dump(HAND_POLICY, sort_keys=False)


def refused(text: str, error: type[PolicyError] = PolicyError, match: str = "",
            **kwargs: Any) -> PolicyError:
    """Parse ``text``, expecting ``error`` within a second, with a short message."""
    started = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        parse_policy(text, source="p.yaml", **kwargs)
    assert time.perf_counter() - started < 1.0
    assert len(str(info.value)) < 2_000 and sum(map(len, info.value.faults)) < 25_000
    return info.value


def laughs(levels: int, fan_out: int = 10) -> str:
    """Each anchor aliases the one below ``fan_out`` times: fan_out**levels strings."""
    text = "a0: &a0 [" + ", ".join(["lol"] * fan_out) + "]\n"
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan_out) + "]\n"
    return text


# --- reading the YAML --------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\x03", "\x00", "\ufffe", "\x7f"])
def test_a_character_yaml_forbids_is_a_policy_error_with_its_position(char: str) -> None:
    refused(f"name: a{char}b\n", match=r"p\.yaml: not valid YAML: unacceptable character "
                                       r"#x[0-9a-f]{4}.*\n.*position 7")


@pytest.mark.parametrize(("text", "says"), [
    ("name: " + "[" * 2000 + "]" * 2000, "flow sequences"),
    ("name: " + "{a: " * 2000 + "b" + "}" * 2000, "flow mappings"),
    ("".join("  " * i + "- \n" for i in range(40)), "block sequences"),
], ids=lambda x: x if len(x) < 20 else "")
def test_deep_nesting_is_refused_before_it_recurses(text: str, says: str) -> None:
    refused(text, PolicyLimitError, r"nested more than 32 levels deep; the limit is 32 "
                                    r"\(PolicyLimits\.max_depth, setting "
                                    r"MODERATION_POLICY_MAX_DEPTH\)")


def test_nesting_past_the_interpreter_s_stack_is_a_policy_error_even_with_no_depth_limit(
        ) -> None:
    limits = PolicyLimits(max_depth=1_000_000, max_bytes=10**8)
    with pytest.raises(PolicyError, match=r"p\.yaml: not valid YAML: nested too deeply"):
        parse_policy("name: " + "[" * 5000 + "]" * 5000, source="p.yaml", limits=limits)


@pytest.mark.parametrize(("levels", "fan_out"), [(6, 10), (9, 10), (30, 3)])
def test_nested_anchors_are_refused_before_any_value_is_built(levels: int,
                                                              fan_out: int) -> None:
    text = laughs(levels, fan_out) + f"name: *a{levels - 1}\n"  # a field that prints input
    error = refused(text, PolicyLimitError,
                    r"more than 100,000 values once its aliases are expanded; the limit is "
                    r"100,000 \(PolicyLimits\.max_nodes")
    assert "lol" not in str(error)


def test_aliases_are_counted() -> None:
    text = "x: &x lol\nname: [" + ", ".join(["*x"] * 101) + "]\n"
    refused(text, PolicyLimitError, r"line 2: more than 100 aliases \(\*name\); the limit is "
                                    r"100 \(PolicyLimits\.max_aliases")


def test_aliases_cannot_nest_deeper_than_the_text() -> None:
    text = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 40))
    refused(text, PolicyLimitError, r"nested more than 32 levels deep once its aliases are "
                                    r"expanded")


def test_an_alias_inside_what_it_names_is_refused() -> None:
    refused("a: &a [*a]\nname: x\n", PolicyError,
            r"not valid YAML: an alias names a collection that contains it")


def test_anchors_and_merge_keys_within_the_limits_still_work() -> None:
    text = (HAND_TEXT.replace("templates:", "templates: &t", 1)
            .replace("  alcohol:\n", "  alcohol: &alcohol\n    templates: *t\n", 1)
            + "  wine:\n    <<: *alcohol\n    description: wine\n    terms: [wine]\n")
    policy = parse_policy(text)
    assert policy.categories["alcohol"].templates == ["a {}", "the {}"]
    wine = policy.categories["wine"]
    assert (wine.action, wine.terms, wine.threshold.value) == ("flag", ["wine"], 0.5)


@pytest.mark.parametrize(("text", "says"), [
    ("name: 2024-13-45\n", r"line 1, column 7.*|cannot read this value: month must be in"),
    ("name: " + "1" * 5000 + "\n", r"cannot read this value: Exceeds the limit"),
    ("? [a, b]\n: c\n", r"found unhashable key"),
    ("name: !!python/object:os.system x\n", r"could not determine a constructor"),
])
def test_values_python_cannot_build_are_policy_errors(text: str, says: str) -> None:
    refused(text, PolicyError, says)


# --- size and counts ---------------------------------------------------------------------


def test_a_50_mib_policy_is_refused_without_being_read() -> None:
    refused("x" * (50 << 20), PolicyLimitError,
            r"the policy is at least 52,428,800 bytes; the limit is 1,048,576 "
            r"\(PolicyLimits\.max_bytes, setting MODERATION_POLICY_MAX_BYTES\)")


def test_the_size_is_counted_in_utf8_bytes() -> None:
    text = HAND_TEXT.replace("description: guns", "description: " + "é" * 400)
    limits = PolicyLimits(max_bytes=len(text) + 100)  # fewer characters, more bytes
    refused(text, PolicyLimitError, rf"the policy is {len(text.encode()):,} bytes",
            limits=limits)
    parse_policy(text, limits=PolicyLimits(max_bytes=len(text.encode())))


def test_a_policy_file_is_read_no_further_than_the_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(HAND_TEXT + "#" * 2_000)
    with pytest.raises(PolicyLimitError, match=r"big\.yaml: the policy file is over 1,000 "
                                               r"bytes"):
        load_policy(big, limits=PolicyLimits(max_bytes=1_000))
    if os.path.exists("/dev/zero"):  # endless: read up to the limit, then refused
        with pytest.raises(PolicyLimitError, match=r"over 1,048,576 bytes"):
            load_policy("/dev/zero")


def many(n: int, what: str) -> dict[str, Any]:
    data = copy.deepcopy(HAND_POLICY)
    if what == "categories":
        data["categories"].update({f"c{i}": {} for i in range(n)})
    elif what == "templates":
        data["templates"] = [f"{{}} {i}" for i in range(n)]
    elif what == "category templates":
        data["categories"]["alcohol"]["templates"] = [f"{{}} {i}" for i in range(n)]
    else:
        data["categories"]["weapons"][what] = [f"t{i}" for i in range(n)]
    return data


@pytest.mark.parametrize(("what", "n", "says"), [
    ("categories", 201, r"categories: 203 categories; the limit is 200 "
                        r"\(PolicyLimits\.max_categories, setting "
                        r"MODERATION_POLICY_MAX_CATEGORIES\)"),
    ("terms", 501, r"categories\.weapons\.terms: 501 terms; the limit is 500 "
                   r"\(PolicyLimits\.max_terms"),
    ("exceptions", 501, r"categories\.weapons\.exceptions: 501 exceptions; the limit is 500 "
                        r"\(PolicyLimits\.max_exceptions"),
    ("templates", 51, r"- p\.yaml: templates: 51 templates; the limit is 50 "
                      r"\(PolicyLimits\.max_templates"),
    ("category templates", 51, r"categories\.alcohol\.templates: 51 templates"),
])
def test_counts_are_refused_before_validation(what: str, n: int, says: str) -> None:
    error = refused(yaml.safe_dump(many(n, what), sort_keys=False), PolicyLimitError, says)
    assert len(error.faults) == 1  # the empty categories were not validated


def test_the_prompts_of_the_whole_policy_are_bounded() -> None:
    # weapons: (2 terms + 1 exception) × 2 templates, alcohol: 1 × 2: 8 prompts
    refused(HAND_TEXT, PolicyLimitError, r"categories: 8 prompts \(terms and exceptions × "
                                         r"their templates\); the limit is 7",
            limits=PolicyLimits(max_prompts=7))
    parse_policy(HAND_TEXT, limits=PolicyLimits(max_prompts=8))


def test_limits_must_be_positive_integers() -> None:
    with pytest.raises(ValueError, match=r"PolicyLimits\.max_aliases must be a positive "
                                         r"integer; got 0"):
        PolicyLimits(max_aliases=0)


# --- messages print excerpts -------------------------------------------------------------


@pytest.mark.parametrize(("data", "says"), [
    ({**HAND_POLICY, "name": "!" + "x" * 500_000}, r"name: String should match pattern .*"
                                                   r"\(got '!xxx.*'\)"),
    ({**HAND_POLICY, "x" * 500_000: 1}, r"p\.yaml: x{39}…: unknown key"),
    ({**HAND_POLICY, "categories": {"A" * 500_000: {}}}, r"'AAA.*' is not snake_case"),
    ({**HAND_POLICY, "templates": ["no placeholder " * 30_000]}, r"template 'no placeholder"),
    (dict(copy.deepcopy(HAND_POLICY), top_terms=["x" * 100] * 1_000),
     r"top_terms: Input should be a valid integer \(got \['xxx.*…\)"),
])
def test_a_fault_prints_only_an_excerpt_of_a_value(data: dict[str, Any], says: str) -> None:
    error = refused(yaml.safe_dump(data, sort_keys=False, width=10**9), PolicyError, says)
    assert max(len(f) for f in error.faults) <= 400


def test_a_long_discriminator_tag_is_cut() -> None:
    data = copy.deepcopy(HAND_POLICY)
    data["categories"]["weapons"]["threshold"]["provenance"] = {"source": "g" * 100_000}
    error = refused(yaml.safe_dump(data, sort_keys=False), PolicyError,
                    r"threshold\.provenance: 'source' is 'ggg.*'; expected one of "
                    r"'uncalibrated', 'calibrated'")
    assert len(error.faults[0]) < 300


def test_thousands_of_faults_are_listed_up_to_fifty() -> None:
    data = {**HAND_POLICY, **{f"k{i}": 1 for i in range(3000)}}
    error = refused(yaml.safe_dump(data, sort_keys=False), PolicyError,
                    r"\(3,000 faults\)|\(3000 faults\)")
    assert len(error.faults) == 51 and error.faults[-1] == "… and 2,950 more faults"


# --- checkpoint paths --------------------------------------------------------------------


def with_model(**model: str) -> str:
    return yaml.safe_dump({**HAND_POLICY, "model": {"name": "fake", **model}}, sort_keys=False)


@pytest.mark.parametrize("path", ["../../../../etc/passwd", "../../../../etc/no-such-file",
                                  "/etc/passwd", "~/.ssh/id_rsa", "sub/../../outside.pt"])
def test_a_confined_checkpoint_path_stays_in_the_policy_folder(tmp_path: Path,
                                                               path: str) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    (tmp_path / "outside.pt").write_bytes(b"x")
    error = refused(with_model(pretrained=path), PolicyError,
                    r"p\.yaml: model\.pretrained: '.*' is outside the policy's folder",
                    base_dir=folder, confine=True)
    # the same answer whether the file exists or not, and no path the server resolved
    assert str(tmp_path) not in str(error) and "/root" not in str(error)
    refused(with_model(pretrained="w.pt", config=path), PolicyError,
            r"model\.config: '.*' is outside the policy's folder", base_dir=folder,
            confine=True)


def test_a_confined_checkpoint_inside_the_folder_or_a_tag_is_resolved(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "w.pt").write_bytes(b"x")
    policy = parse_policy(with_model(pretrained="models/./w.pt"), base_dir=tmp_path,
                          confine=True)
    assert policy.model.pretrained == str((tmp_path / "models" / "w.pt").resolve())
    assert parse_policy(with_model(pretrained="laion2b"), base_dir=tmp_path,
                        confine=True).model.pretrained == "laion2b"


@pytest.mark.parametrize("path", ["a\x00b.pt", "x" * 300 + ".pt", "d/" * 3000 + "w.pt"])
def test_a_path_the_file_system_refuses_is_not_a_crash(tmp_path: Path, path: str) -> None:
    text = yaml.safe_dump({**HAND_POLICY, "model": {"name": "fake", "pretrained": path}})
    assert parse_policy(text, base_dir=tmp_path).model.pretrained == path  # a tag, then
    refused(yaml.safe_dump({**HAND_POLICY, "model": {"name": "f", "pretrained": "t",
                                                      "config": path}}),
            PolicyError, r"model\.config: architecture file '.*' does not exist",
            base_dir=tmp_path)


def test_a_missing_architecture_file_is_named_as_written(tmp_path: Path) -> None:
    error = refused(with_model(pretrained="t", config="../arch.json"), PolicyError,
                    r"model\.config: architecture file '\.\./arch\.json' does not exist",
                    base_dir=tmp_path)
    assert str(tmp_path.parent) not in str(error)


# --- `moderation policy check` -----------------------------------------------------------


@pytest.mark.parametrize("text", ["name: a\x03b\n", "name: " + "[" * 2000, laughs(9)],
                         ids=["control character", "deep", "anchors"])
def test_policy_check_exits_1_with_a_message_not_a_traceback(tmp_path: Path,
                                                             text: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["policy", "check", str(path)])
    assert result.exit_code == 1 and result.exception is not None
    assert isinstance(result.exception, SystemExit), result.exception
    assert "p.yaml" in result.output and "Traceback" not in result.output


# --- a proposed policy's new prompts -----------------------------------------------------


@pytest.fixture
def moderator(fake_encoder: FakeEncoder, tmp_path: Path) -> Moderator:
    return Moderator(parse_policy(HAND_TEXT), fake_encoder, EmbeddingCache(tmp_path / "c"))


def with_terms(*terms: str) -> Any:
    data = copy.deepcopy(HAND_POLICY)
    data["categories"]["weapons"]["terms"] += list(terms)
    return parse_policy(yaml.safe_dump(data, sort_keys=False))


def test_a_proposed_policy_s_new_prompts_stay_out_of_the_cache(
        moderator: Moderator, fake_encoder: FakeEncoder, tmp_path: Path) -> None:
    fake_encoder.texts.update({"a knife": unit(0, -1, 1), "the knife": unit(-1, 1, 1)})
    files = set((tmp_path / "c").rglob("*.npy"))
    fake_encoder.encoded_texts.clear()
    proposed = moderator.with_policy(with_terms("knife"), proposed=True, max_new_prompts=2)
    assert fake_encoder.encoded_texts == ["a knife", "the knife"]
    assert isinstance(proposed.cache, OverlayCache) and proposed.cache.added == 2
    assert set((tmp_path / "c").rglob("*.npy")) == files  # nothing written
    assert moderator.cache is not None and moderator.cache.get(
        fake_encoder.identity, ["a knife"]) == {}
    assert proposed.text.term_texts[0] == ["gun", "rifle", "knife"]
    # activating it (with_policy, as a reload does) is what writes them
    moderator.with_policy(with_terms("knife"))
    assert len(set((tmp_path / "c").rglob("*.npy")) - files) == 2


def test_too_many_new_prompts_are_refused_before_any_is_encoded(
        moderator: Moderator, fake_encoder: FakeEncoder) -> None:
    fake_encoder.encoded_texts.clear()
    with pytest.raises(PolicyLimitError, match=r"policy 'hand' has 4 prompts \(terms and "
                                               r"exceptions × templates\) that were never "
                                               r"encoded with fake/hand-made; the limit is 3 "
                                               r"\(PolicyLimits\.max_new_prompts"):
        moderator.with_policy(with_terms("knife", "sword"), proposed=True, max_new_prompts=3)
    assert fake_encoder.encoded_texts == []
    # prompts the cache has are free
    moderator.with_policy(with_terms(), proposed=True, max_new_prompts=0)
