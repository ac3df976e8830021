from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from moderation.cli import main
from tests.fakes import GREEN, HAND_POLICY, RED, TINY_ARCH, image_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def tiny_policy(tiny_arch_file: Path, tmp_path: Path) -> Path:
    data = copy.deepcopy(HAND_POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "none", "config": str(tiny_arch_file)}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_policy_check_ok(runner: CliRunner) -> None:
    result = runner.invoke(main, ["policy", "check", str(ROOT / "policies" / "default.yaml")])
    assert result.exit_code == 0, result.output
    assert "OK: policy 'default' version" in result.output
    assert "9 categories" in result.output and "0 of 9 thresholds calibrated" in result.output


def test_policy_check_lists_every_fault(runner: CliRunner, tmp_path: Path) -> None:
    data = copy.deepcopy(HAND_POLICY)
    data["categories"]["weapons"]["treshold"] = 0.2
    data["templates"] = ["nothing"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(main, ["policy", "check", str(path)])
    assert result.exit_code == 1
    assert "bad.yaml: categories.weapons.treshold: unknown key" in result.output
    assert "bad.yaml: templates: template 'nothing' must contain" in result.output


def test_policy_check_says_what_crops_cost_per_category(runner: CliRunner,
                                                      tmp_path: Path) -> None:
    data = copy.deepcopy(HAND_POLICY)
    data["views"] = {"crops": "3x2", "overlap": 0.1}
    data["categories"]["alcohol"]["crops"] = False
    path = tmp_path / "crops.yaml"
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(main, ["policy", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert "a 3x2 grid of crops (overlap 0.1" in result.output
    assert "7 encodings per frame instead of 1" in result.output
    assert "weapons: 7 views per frame" in result.output
    assert "alcohol: 1 view per frame (no crops)" in result.output


def test_score_prints_one_json_object_per_image(
    runner: CliRunner, tiny_policy: Path, tmp_path: Path
) -> None:
    (tmp_path / "a.jpg").write_bytes(image_bytes(RED, "JPEG"))
    (tmp_path / "b.png").write_bytes(image_bytes(GREEN))
    args = ["score", str(tmp_path / "a.jpg"), str(tmp_path / "b.png"),
            "--policy", str(tiny_policy), "--random-weights", "--cache-dir", str(tmp_path / "c")]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["id"] for line in lines] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]
    assert all("action" in line and "weapons" in line["categories"] for line in lines)
    assert "RANDOM WEIGHTS" in result.stderr


def test_score_exits_1_when_an_image_is_bad(
    runner: CliRunner, tiny_policy: Path, tmp_path: Path
) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    result = runner.invoke(main, ["score", str(tmp_path / "bad.jpg"), "--policy",
                                  str(tiny_policy), "--random-weights"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "unsupported_format"


def test_score_without_weights_explains_how_to_get_them(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "a.png").write_bytes(image_bytes(RED))
    result = runner.invoke(main, ["score", str(tmp_path / "a.png"), "--policy",
                                  str(ROOT / "policies" / "default.yaml")])
    assert result.exit_code == 1
    assert "not in the local cache" in result.output and "--random-weights" in result.output
    assert "Traceback" not in result.output


def test_scan_is_recursive_survives_bad_files_and_resumes(
    runner: CliRunner, tiny_policy: Path, tmp_path: Path
) -> None:
    root = tmp_path / "uploads"
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "a.jpg").write_bytes(image_bytes(RED, "JPEG"))
    (root / "nested" / "b.png").write_bytes(image_bytes(GREEN))
    (root / "nested" / "deeper" / "broken.jpg").write_bytes(image_bytes(RED, "JPEG")[:30])
    (root / ".hidden.jpg").write_bytes(image_bytes(RED, "JPEG"))
    out = tmp_path / "results.jsonl"
    args = ["scan", str(root), "--out", str(out), "--policy", str(tiny_policy),
            "--random-weights", "--batch-size", "2", "--cache-dir", str(tmp_path / "c")]

    result = runner.invoke(main, args)
    assert result.exit_code == 1, result.output  # a file failed: said, and not a success
    assert "1 of 3 inputs could not be moderated" in result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_id = {line["id"]: line for line in lines}
    assert sorted(by_id) == sorted(
        str(p) for p in [root / "a.jpg", root / "nested" / "b.png",
                         root / "nested" / "deeper" / "broken.jpg"]
    )
    assert by_id[str(root / "nested" / "deeper" / "broken.jpg")]["error"]["code"] == (
        "corrupt_image"
    )
    assert "2 allow" in result.stderr or "error" in result.stderr

    (root / "new.png").write_bytes(image_bytes(GREEN))
    again = runner.invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "1 inputs to moderate" in again.stderr and "3 already in" in again.stderr
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == 4 and ids[-1] == str(root / "new.png")


def test_scan_redoes_a_line_cut_short(
    runner: CliRunner, tiny_policy: Path, tmp_path: Path
) -> None:
    root = tmp_path / "uploads"
    root.mkdir()
    (root / "a.png").write_bytes(image_bytes(RED))
    out = tmp_path / "results.jsonl"
    out.write_text('{"id": "' + str(root / "a.png") + '", "acti')  # a crash mid-line
    result = runner.invoke(main, ["scan", str(root), "--out", str(out), "--policy",
                                  str(tiny_policy), "--random-weights"])
    assert result.exit_code == 0, result.output
    last = out.read_text().splitlines()[-1]
    assert json.loads(last)["id"] == str(root / "a.png")


def test_paths_are_checked_before_the_model_is_loaded(
    runner: CliRunner, tiny_policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: `score missing.jpg` loaded the model (~9 s for ViT-B-32) and only then failed."""
    import moderation.cli

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(moderation.cli, "load_moderator", no_model)
    result = runner.invoke(main, ["score", str(tmp_path / "missing.jpg"), "--policy",
                                  str(tiny_policy), "--random-weights"])
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(image_bytes(RED))
    result = runner.invoke(main, ["scan", str(tmp_path / "in"), "--out",
                                  str(tmp_path / "no" / "such" / "dir" / "out.jsonl"),
                                  "--policy", str(tiny_policy), "--random-weights"])
    assert result.exit_code == 2 and "cannot write" in result.output
    result = runner.invoke(main, ["scan", str(tmp_path / "missing"), "--out",
                                  str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_decisions_replay(runner: CliRunner, tmp_path: Path) -> None:
    import uuid

    from decisionlog import DeadLetters, DecisionRecord, DecisionStore

    url = f"sqlite:///{tmp_path / 'log.sqlite3'}"
    r = DecisionRecord(id=uuid.uuid4().hex, created_at=1.0, client_id="c",
                       image={"sha256": "a", "size": 1}, policy={"name": "p", "version": "v"},
                       model="m", profile="default", action="allow", triggered=[],
                       categories={}, latency_ms=1.0)
    DeadLetters(tmp_path / "dead.jsonl").add([r], "the database was down")
    result = runner.invoke(main, ["decisions", "replay", "--file", str(tmp_path / "dead.jsonl"),
                                  "--database-url", url])
    assert result.exit_code == 0, result.output
    assert "1 written, 0 already in the log, 0 still failing" in result.output
    assert DecisionStore(url).get(r.id) is not None


IMPORTED = """
import sys
from moderation.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
others = ("flask", "sqlalchemy", "service", "decisionlog", "calibration", "sklearn", "torch")
print("imported:", [m for m in others if m in sys.modules], file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["score", "--help"], ["scan", "--help"],
                                  ["policy", "check", str(ROOT / "policies" / "default.yaml")]])
def test_the_core_commands_import_no_other_package(args: list[str]) -> None:
    """Package commands are imported when invoked, as Flask loads its plugin commands:
    `moderation --help` had imported Flask, SQLAlchemy and every package's cli."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", IMPORTED, *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert "imported: []" in done.stderr, done.stderr
    assert "Usage:" in done.stdout or "OK: policy" in done.stdout


def test_contributed_commands_are_listed_with_their_own_help(runner: CliRunner) -> None:
    """`moderation --help` reads a contributed command's help from its module's source: the
    same lines as loading every command gives."""
    import click

    from moderation.cli import _entry_points

    loaded = click.Group(commands={name: entry.load() for name, entry in
                                   _entry_points().items()} | dict(main.commands))
    lazily, eagerly = click.HelpFormatter(), click.HelpFormatter()
    main.format_commands(click.Context(main), lazily)
    loaded.format_commands(click.Context(loaded), eagerly)
    assert lazily.getvalue() == eagerly.getvalue()
    assert "Serve the HTTP API" in lazily.getvalue()
    groups = runner.invoke(main, ["policy", "--help"]).output
    assert all(name in groups for name in ("check", "diff", "dry-run"))
    assert runner.invoke(main, ["decisions", "rescores", "--help"]).exit_code == 0
    unknown = runner.invoke(main, ["nonsense"])
    assert unknown.exit_code == 2 and "No such command" in unknown.output


def test_the_model_options_build_one_encoder_spec(
    runner: CliRunner, tiny_policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moderation.cli
    from moderation import EncoderSpec

    chosen: list[Any] = []

    def no_model(policy_path: Path, spec: EncoderSpec) -> None:
        chosen.append((policy_path, spec))
        raise SystemExit(0)

    monkeypatch.setattr(moderation.cli, "load_moderator", no_model)
    monkeypatch.setenv("MODERATION_DEVICE", "auto")
    (tmp_path / "a.png").write_bytes(image_bytes(RED))
    result = runner.invoke(main, ["score", str(tmp_path / "a.png"), "--policy", str(tiny_policy),
                                  "--model", "ViT-B-32", "--pretrained", "w.pt",
                                  "--batch-size", "3", "--backend", "torch",
                                  "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert chosen == [(tiny_policy, EncoderSpec(
        name="ViT-B-32", pretrained="w.pt", backend="torch", device="auto", batch_size=3,
        cache_dir=tmp_path / "c"))]


def test_policy_check_says_which_probabilities_misskey_lacks(runner: CliRunner,
                                                              tmp_path: Path) -> None:
    from tests.service.test_misskey import MAP

    data = copy.deepcopy(HAND_POLICY)
    data["integrations"] = {"misskey": {"classes": {"nsfw": ["weapons", "alcohol"]}}}
    data["categories"]["weapons"]["probability"] = copy.deepcopy(MAP)
    path = tmp_path / "misskey.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.invoke(main, ["policy", "check", str(path)])
    assert result.exit_code == 0, result.output
    # a fitted probability is not a calibrated threshold
    assert "0 of 2 thresholds calibrated, 1 with a fitted probability" in result.output
    assert ("misskey: nsfw = the largest of weapons, alcohol; safe = 1 - the largest (NOT "
            "READY: no fitted probability for alcohol") in result.output
    assert "note: Misskey" not in result.output
    data["integrations"] = {"misskey": {"classes": {"Porn": ["weapons"]}, "rest": "Neutral"}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.invoke(main, ["policy", "check", str(path)])
    assert result.exit_code == 0 and "reads the classes nsfw and safe" in result.output
