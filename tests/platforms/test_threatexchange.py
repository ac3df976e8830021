"""The python-threatexchange classifier (platforms/threatexchange.py) inside the real pytx: a
fresh virtual environment with ``pip install -e '.[threatexchange]'`` (no torch), pytx's own
CLI adds the extension (``threatexchange config extensions add``), pytx's manifest loader
finds the classifier in it, and the classifier sends files to the service's test app served
over HTTP in this process: the red image comes back blocked as weapons, the grey one allowed,
a corrupt file rejected (a decision, not a failure), all in the service's log; with the
service down or refusing the key, the fail mode is the answer and no category is labelled.

Slow (a venv and an install): runs where MODERATION_TEST_PLATFORMS=1 (.ci/services sets it),
skipped elsewhere."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from tests.fakes import GREY, RED, image_bytes
from tests.platforms.conftest import ADMIN
from tests.service.live import serve_in_thread

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.server, pytest.mark.skipif(
    os.environ.get("MODERATION_TEST_PLATFORMS") != "1",
    reason="set MODERATION_TEST_PLATFORMS=1 (.ci/services does) to build a venv with "
           "python-threatexchange")]

# Run inside the venv: pytx loads the extensions its CLI added, as its CLI does
# (threatexchange.cli.main._get_extended_functionality), and classifies each file named on
# the command line through every classifier they bring; one JSON line per file.
DRIVER = """
import json, os, pathlib, sys

from threatexchange.classifier.classifier import Classifier
from threatexchange.cli.cli_config import CliState
from threatexchange.content_type.photo import PhotoContent
from threatexchange.extensions.manifest import ThreatExchangeExtensionManifest

state = pathlib.Path(os.environ["TX_STATEDIR"])
classifiers = []
for module in sorted(CliState([], state).get_persistent_config().extensions):
    manifest = ThreatExchangeExtensionManifest.load_from_module_name(module)
    classifiers.extend(getattr(manifest, "classifiers", ()))

from platforms.threatexchange import classifiers_from_config
assert classifiers_from_config() == classifiers, classifiers_from_config()
[cls] = classifiers
assert issubclass(cls, Classifier) and PhotoContent in cls.get_content_types()
classifier = cls.get_with_default_settings()
for path in sys.argv[1:]:
    result = classifier.classify(PhotoContent, path)
    print(json.dumps({
        "file": pathlib.Path(path).name, "classifier": cls.get_name(), "str": str(result),
        "has_match": result.has_match, "positive": sorted(result.positive_labels),
        "labels": {k: {"is_match": v.is_match, "weight": v.weight_str(),
                       "score": getattr(v, "score", None)} for k, v in result.labels.items()},
        "accept": result.accept, "failed": result.failed, "reason": result.reason,
        "action": result.action, "decision_id": result.decision_id}))
"""


@dataclass
class Pytx:
    """The venv with pytx and this repo, and the files the tests classify."""

    venv: Path
    home: Path
    files: dict[str, Path]

    def env(self, state: Path, **settings: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MODERATION_", "TX_"))}
        return {**base, "HOME": str(self.home), "TX_STATEDIR": str(state), **settings}

    def cli(self, state: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.venv / "bin" / "threatexchange"), *args],
                              capture_output=True, text=True, env=self.env(state, **settings),
                              cwd=self.home, timeout=120)

    def classify(self, state: Path, *names: str, **settings: str) -> dict[str, dict[str, Any]]:
        run = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", DRIVER,
             *(str(self.files[n]) for n in names)],
            capture_output=True, text=True, env=self.env(state, **settings), cwd=self.home,
            timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        answers = [json.loads(line) for line in run.stdout.splitlines()]
        return {a["file"].split(".")[0]: a for a in answers}


@pytest.fixture(scope="module")
def pytx(tmp_path_factory: pytest.TempPathFactory) -> Pytx:
    where = tmp_path_factory.mktemp("pytx")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "-e", f"{ROOT}[threatexchange]"],
        capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    absent = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"],
                            capture_output=True)
    assert absent.returncode != 0, "torch is installed in the [threatexchange] venv"
    home = where / "home"
    home.mkdir()
    files = {"red": where / "red.png", "grey": where / "grey.png",
             "broken": where / "broken.png"}
    files["red"].write_bytes(image_bytes(RED))
    files["grey"].write_bytes(image_bytes(GREY))
    files["broken"].write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return Pytx(venv, home, files)


@pytest.fixture
def state(pytx: Pytx, tmp_path: Path) -> Path:
    """A pytx state directory where its CLI has added the extension."""
    state = tmp_path / "threatexchange"
    added = pytx.cli(state, "config", "extensions", "add", "platforms.threatexchange")
    assert added.returncode == 0, added.stdout + added.stderr
    listed = pytx.cli(state, "config", "extensions", "list")
    assert listed.returncode == 0 and "platforms.threatexchange" in listed.stdout, (
        listed.stdout + listed.stderr)
    return state


@pytest.fixture
def served(make_app: Any) -> Iterator[tuple[Flask, str]]:
    """The service's test app, with an API key, over HTTP on loopback."""
    app = make_app(API_KEYS="tx-key")
    with serve_in_thread(app) as url:
        yield app, url


def test_pytx_loads_the_classifier_and_the_service_decides_and_records(
        pytx: Pytx, state: Path, served: tuple[Flask, str]) -> None:
    app, url = served
    answers = pytx.classify(state, "red", "grey", "broken", MODERATION_URL=url,
                            MODERATION_API_KEY="tx-key", MODERATION_TIMEOUT="20")

    red, grey, broken = answers["red"], answers["grey"], answers["broken"]
    assert red["classifier"] == "moderation_service"
    assert red["action"] == "block" and not red["accept"] and not red["failed"]
    assert red["positive"] == ["reject", "weapons"] and red["has_match"]
    assert red["labels"]["weapons"]["score"] > 0.8  # the hand policy's weapons threshold
    assert red["labels"]["alcohol"]["is_match"] is False
    assert red["labels"]["reject"]["weight"] == "block"
    assert red["reason"] == "block (weapons)"
    assert red["str"].startswith("weapons(") and red["str"].endswith(",reject(block)")
    assert grey["action"] == "allow" and grey["accept"] and not grey["has_match"]
    assert grey["str"] == "None" and set(grey["labels"]) == {"weapons", "alcohol", "reject"}
    # a file the decoder refuses is a decision (rejected), not a failure, and has no scores
    assert not broken["accept"] and not broken["failed"]
    assert broken["labels"] == {"reject": {"is_match": True, "weight": "refused", "score": None}}
    assert broken["reason"].startswith("not an accepted file: corrupt_image")

    app.extensions["decisions"][1].flush()
    page = requests.get(f"{url}/v1/decisions", params={"client_id": "threatexchange"},
                        headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert page.status_code == 200, page.text
    recorded = {d["id"]: d for d in page.json()["decisions"]}
    assert set(recorded) >= {red["decision_id"], grey["decision_id"]} and len(recorded) == 3
    [refused] = set(recorded) - {red["decision_id"], grey["decision_id"]}
    assert recorded[refused]["action"] == "error"
    assert recorded[refused]["error_code"] == "corrupt_image"
    assert {d["client_id"] for d in recorded.values()} == {"threatexchange"}
    assert recorded[red["decision_id"]]["action"] == "block"
    assert recorded[grey["decision_id"]]["action"] == "allow"


def test_a_hash_bank_match_is_a_label_of_its_own(
        pytx: Pytx, state: Path, served: tuple[Flask, str]) -> None:
    app, url = served
    admin, client = {"Authorization": f"Bearer {ADMIN}"}, app.test_client()
    r = client.post("/v1/banks", json={"name": "known_bad", "action": "block"}, headers=admin)
    assert r.status_code == 201, r.get_data(as_text=True)
    r = client.post("/v1/banks/known_bad/hashes", headers=admin, content_type="multipart/form-data",
                    data={"image": [(io.BytesIO(pytx.files["grey"].read_bytes()), "grey.png")]})
    assert r.status_code == 200, r.get_data(as_text=True)

    def moderated() -> str:
        r = client.post("/v1/moderate", headers={"Authorization": "Bearer tx-key"},
                        data={"image": [(io.BytesIO(pytx.files["grey"].read_bytes()), "g.png")]},
                        content_type="multipart/form-data")
        return str(r.get_json()["results"][0]["action"])

    deadline = time.monotonic() + 10
    while moderated() != "block":  # until the bank's change reaches the matcher
        assert time.monotonic() < deadline, "the bank's change never reached the matcher"
        time.sleep(0.1)

    grey = pytx.classify(state, "grey", MODERATION_URL=url, MODERATION_API_KEY="tx-key")["grey"]
    assert grey["action"] == "block" and not grey["accept"]
    assert grey["positive"] == ["bank:known_bad", "reject"]  # the classifier saw nothing
    assert grey["labels"]["bank:known_bad"]["weight"] == "block, sha256 d=0"


def test_a_wrong_api_key_is_a_failure_to_decide_not_a_label(
        pytx: Pytx, state: Path, served: tuple[Flask, str]) -> None:
    _, url = served
    answer = pytx.classify(state, "red", MODERATION_URL=url, MODERATION_API_KEY="wrong")["red"]
    assert answer["failed"] and not answer["accept"] and answer["action"] is None
    assert set(answer["labels"]) == {"reject"}
    assert "fail closed" in answer["reason"] and "401" in answer["reason"]


@pytest.mark.parametrize(("mode", "accept"), [("closed", False), ("open", True)])
def test_with_the_service_down_the_fail_mode_is_the_answer(
        pytx: Pytx, state: Path, mode: str, accept: bool) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answers = pytx.classify(state, "red", "grey", MODERATION_URL=f"http://127.0.0.1:{port}",
                            MODERATION_TIMEOUT="5", MODERATION_INTEGRATION_FAIL_MODE=mode)
    for answer in answers.values():
        assert answer["failed"] and answer["accept"] is accept
        assert answer["action"] is None and answer["decision_id"] is None
        # no category label, no score: only the fail mode's verdict
        assert answer["labels"] == {"reject": {"is_match": not accept, "score": None,
                                               "weight": f"no decision, fail {mode}"}}
        assert f"(fail {mode}): no answer from http://127.0.0.1:{port}" in answer["reason"]
        assert f"fail {mode}" in answer["str"]


def test_settings_the_classifier_cannot_use_are_refused_when_the_extension_is_added(
        pytx: Pytx, tmp_path: Path) -> None:
    state = tmp_path / "threatexchange"
    added = pytx.cli(state, "config", "extensions", "add", "platforms.threatexchange",
                     MODERATION_INTEGRATION_FAIL_MODE="shut")
    assert added.returncode != 0
    assert "Manifest failed verification" in added.stderr
    assert "fail mode must be open or closed; got 'shut'" in added.stderr
    listed = pytx.cli(state, "config", "extensions", "list")
    assert "platforms.threatexchange" not in listed.stdout
