"""`moderation policy dry-run` and `moderation policy diff` on a log the tiny real model
filled (random weights): the counts of edits whose effect is known exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from decisionlog import DecisionRecord, DecisionStore, PolicyLog
from moderation import EncoderSpec, Moderator
from moderation.cli import main
from tests.fakes import BLUE, GREEN, GREY, HAND_POLICY, PURPLE, RED, TINY_ARCH, image_bytes

COLOURS = [RED, BLUE, PURPLE, GREEN, GREY, (10, 200, 30), (250, 250, 250)]


@pytest.fixture
def tiny(tiny_arch_file: Path, tmp_path: Path) -> dict[str, Any]:
    data = copy.deepcopy(HAND_POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "none", "config": str(tiny_arch_file)}
    return data


def write(data: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def log(tiny: dict[str, Any], tmp_path: Path) -> tuple[str, Path]:
    """A log with 7 decisions of the tiny model and the policy that made them active."""
    url = f"sqlite:///{tmp_path / 'log.sqlite3'}"
    path = write(tiny, tmp_path / "policy.yaml")
    moderator = Moderator.from_policy(
        path, EncoderSpec(random_weights=True, cache_dir=tmp_path / "cache"))
    results = moderator.moderate([image_bytes(c) for c in COLOURS])
    DecisionStore(url).add_many([
        DecisionRecord.from_result(r, image_sha256="0" * 64, image_size=1, latency_ms=1.0)
        for r in results
    ])
    PolicyLog(url).activate(version=moderator.policy.version, name="hand", source=path.name,
                            text=path.read_text())
    return url, path


def dry_run(url: str, proposed: Path, *extra: str) -> Any:
    result = CliRunner().invoke(main, [
        "policy", "dry-run", str(proposed), "--random-weights", "--database-url", url,
        "--format", "json", *extra,
    ])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_thresholds_at_the_ends_flag_everything_and_nothing(
        log: tuple[str, Path], tiny: dict[str, Any], tmp_path: Path) -> None:
    url, _ = log
    tiny["categories"]["weapons"]["threshold"] = {"value": -1.0}
    everything = dry_run(url, write(tiny, tmp_path / "low.yaml"))
    assert everything["decisions"] == 7
    assert everything["categories"]["weapons"]["after"]["flagged"] == 7
    assert everything["actions"]["block"]["after"] == 7
    tiny["categories"]["weapons"]["threshold"] = {"value": 1.0}
    tiny["categories"]["alcohol"]["threshold"] = {"value": 1.0}
    nothing = dry_run(url, write(tiny, tmp_path / "high.yaml"), "--limit", "100")
    assert nothing["actions"]["allow"]["after"] == 7
    before = nothing["actions"]
    flagged_before = 7 - before["allow"]["before"]
    assert nothing["changed_total"] == flagged_before == len(nothing["changed"])
    assert {c["change"] for c in nothing["changed"]} <= {"newly_cleared"}


def test_text_report_names_cause_and_effect(
        log: tuple[str, Path], tiny: dict[str, Any], tmp_path: Path) -> None:
    url, _ = log
    tiny["categories"]["weapons"]["threshold"] = {"value": -1.0}
    proposed = write(tiny, tmp_path / "low.yaml")
    result = CliRunner().invoke(main, ["policy", "dry-run", str(proposed), "--random-weights",
                                       "--database-url", url])
    assert result.exit_code == 0, result.output
    assert "against active (activation 1, reload on" in result.output
    assert "7 decisions re-decided" in result.output
    assert "  - weapons: threshold 0.8 → -1 (flags more)" in result.output
    assert "changed decisions:" in result.output and " → block  weapons " in result.output


def test_another_model_or_no_active_policy_is_refused(
        log: tuple[str, Path], tiny: dict[str, Any], tmp_path: Path) -> None:
    url, _ = log
    tiny["model"] = {"name": "RN50", "pretrained": "openai"}
    result = CliRunner().invoke(main, ["policy", "dry-run", str(write(tiny, tmp_path / "x.yaml")),
                                       "--database-url", url])
    assert result.exit_code == 1
    assert "names model RN50/openai" in result.output
    assert "stored embeddings belong to model tiny-test-clip/none" in result.output
    empty = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    result = CliRunner().invoke(main, ["policy", "dry-run", str(tmp_path / "x.yaml"),
                                       "--database-url", empty])
    assert result.exit_code == 1 and "has no active policy" in result.output


def test_against_a_stored_version_and_diff(
        log: tuple[str, Path], tiny: dict[str, Any], tmp_path: Path) -> None:
    url, path = log
    version = PolicyLog(url).latest().version  # type: ignore[union-attr]
    tiny["categories"]["alcohol"]["terms"] = ["beer", "wine"]
    proposed = write(tiny, tmp_path / "wine.yaml")
    report = dry_run(url, proposed, "--against", version, "--since", "1h")
    assert report["before"]["source"] == f"stored version {version}"
    assert [d["text"] for d in report["diff"]] == ["alcohol: term added: “wine”"]
    result = CliRunner().invoke(main, ["policy", "diff", version, str(proposed),
                                       "--database-url", url])
    assert result.exit_code == 0 and result.output == "alcohol: term added: “wine”\n"
    result = CliRunner().invoke(main, ["policy", "diff", "nope", str(proposed),
                                       "--database-url", url])
    assert result.exit_code == 1 and f"its latest versions: {version}" in result.output


def test_rescore_then_export_it(log: tuple[str, Path], tiny: dict[str, Any],
                                tmp_path: Path) -> None:
    url, _ = log
    tiny["categories"]["weapons"]["threshold"] = {"value": -1.0}
    proposed = write(tiny, tmp_path / "low.yaml")
    runner = CliRunner()
    result = runner.invoke(main, ["decisions", "rescore", "--policy", str(proposed), "--since",
                                  "1h", "--random-weights", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert "7 decisions decided again" in result.output
    run_id = result.output.split("re-score run ")[1].split(":")[0]
    result = runner.invoke(main, ["decisions", "export", "--rescore", run_id,
                                  "--database-url", url])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 7 and {line["action"] for line in lines} == {"block"}
    assert all(line["policy"]["name"] == "hand" and "original_action" in line for line in lines)
    result = runner.invoke(main, ["decisions", "export", "--rescore", run_id, "--format", "csv",
                                  "--database-url", url])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 8
    result = runner.invoke(main, ["decisions", "rescores", "--database-url", url])
    assert result.output.startswith(run_id) and "7 decisions" in result.output
    result = runner.invoke(main, ["decisions", "export", "--rescore", "nope",
                                  "--database-url", url])
    assert result.exit_code == 1 and f"the latest: {run_id}" in result.output


def search_cli(url: str, *args: str) -> Any:
    return CliRunner().invoke(main, ["decisions", "search", "--database-url", url, *args])


def test_search_by_image_text_and_decision(log: tuple[str, Path], tmp_path: Path) -> None:
    """The tiny model's random weights are seeded: the CLI's model is the one that filled the
    log, so an image's file finds its own decision first, at cosine 1."""
    url, _ = log
    picture = tmp_path / "red.png"
    picture.write_bytes(image_bytes(RED))
    result = search_cli(url, "--image", str(picture), "--random-weights", "--format", "jsonl")
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(hits) == len(COLOURS)
    assert hits[0]["similarity"] >= 0.999
    red = hits[0]["decision_id"]
    like = search_cli(url, "--like", red, "--format", "csv", "--limit", "3")
    assert like.exit_code == 0, like.output
    lines = like.stdout.splitlines()
    assert lines[0].startswith("decision_id,similarity,frame") and len(lines) == 4
    assert red not in like.stdout  # the query itself is left out
    text = search_cli(url, "gun", "--random-weights", "--action", "allow")
    assert text.exit_code == 0, text.output
    assert "hits (exact search, model tiny-test-clip/random-weights" in text.stdout
    assert "allow" in text.stdout and "block " not in text.stdout
    raw = search_cli(url, "a gun", "--raw", "--random-weights", "--format", "jsonl",
                     "--min-similarity", "1")
    assert raw.exit_code == 0 and raw.stdout == ""  # no image is a text


@pytest.mark.parametrize(("args", "message"), [
    ([], "give one query"),
    (["gun", "--like", "x"], "give one query"),
    (["--like", "no-such-id"], "no decision with id 'no-such-id'"),
    (["--like", "x", "--limit", "600"], "600 is not in the range"),
    (["--like", "x", "--since", "yesterday-ish"], "yesterday-ish"),
])
def test_search_refuses_bad_queries(log: tuple[str, Path], args: list[str],
                                    message: str) -> None:
    result = search_cli(log[0], *args)
    assert result.exit_code != 0
    assert message in result.output
