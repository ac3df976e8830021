"""`moderation calibrate --from-reviews`: reviewers' verdicts in the decision log, with the
stored embeddings of their decisions, become the labelled set (weighted by 1/π)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from decisionlog import DecisionRecord, DecisionStore
from decisionlog.quality import reviewed_set
from decisionlog.reviews import AuditRates, AuditSampler, ReviewQueue, VerdictFilters
from moderation import EncoderSpec, Moderator
from moderation.cli import main
from tests.fakes import HAND_POLICY, TINY_ARCH


def png(pixels: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def reviewed_log(tiny_arch_file: Path, tmp_path: Path) -> tuple[str, Path, dict[str, set[str]]]:
    """90 decisions of the tiny model (30 reddish = weapons, 30 greenish = alcohol, 30 bluish
    = nothing), audited at rates 1 (flag, review, block) and 0.8 (allow), every queued item
    decided by its true class. Returns the log, the policy and each decision's truth."""
    data = copy.deepcopy(HAND_POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "none", "config": str(tiny_arch_file)}
    data["categories"]["weapons"]["threshold"] = {"value": 0.5, "review_from": 0.4}
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(data, sort_keys=False))
    moderator = Moderator.from_policy(
        policy, EncoderSpec(random_weights=True, cache_dir=tmp_path / "cache"))
    rng = np.random.default_rng(0)
    images, truth = [], []
    for label, base in (("weapons", (200, 40, 40)), ("alcohol", (40, 200, 40)),
                        ("", (40, 40, 200))):
        for _ in range(30):
            images.append(png(np.clip(np.array(base) + rng.normal(0, 50, (32, 32, 3)), 0, 255)))
            truth.append({label} - {""})
    url = f"sqlite:///{tmp_path / 'log.sqlite3'}"
    store = DecisionStore(url, audit=AuditSampler(AuditRates.parse("1,allow=0.8"), seed=4))
    records = [DecisionRecord.from_result(r, image_sha256=str(i), image_size=1, latency_ms=1.0)
               for i, r in enumerate(moderator.moderate(images))]
    store.add_many(records)
    truths = {r.id: t for r, t in zip(records, truth, strict=True)}
    queue = ReviewQueue(store)
    actions = {"weapons": "block", "alcohol": "flag"}
    while (item := queue.claim("ann")) is not None:
        queue.decide(item.item_id, "ann", sorted(truths[item.decision_id]), actions)
    return url, policy, truths


def test_the_reviewed_set_weights_each_verdict_by_its_chance(
        reviewed_log: tuple[str, Path, dict[str, set[str]]], tmp_path: Path) -> None:
    url, policy, truths = reviewed_log
    model = Moderator.from_policy(
        policy, EncoderSpec(random_weights=True, cache_dir=tmp_path / "cache")).encoder.identity
    found = reviewed_set(url, model=model)
    assert found.name.startswith("reviews ") and f"{len(found.images)} verdicts" in found.name
    allowed = {r.decision_id for r in ReviewQueue(DecisionStore(url)).verdicts(
        VerdictFilters(), limit=100) if r.original_action == "allow"}
    assert allowed and len(found.images) < len(truths)  # some allowed decisions not drawn
    for image in found.images:
        assert image.labels == truths[image.key]
        assert image.weight == pytest.approx(1.25 if image.key in allowed else 1.0)
        assert image.vectors.shape[0] >= 1
    assert reviewed_set(url, model="another/model").images == []
    assert "another model" in reviewed_set(url, model="another/model").left_out[0]


def test_calibrate_from_reviews_end_to_end(reviewed_log: tuple[str, Path, dict[str, set[str]]],
                                           tmp_path: Path) -> None:
    url, policy, _ = reviewed_log
    out, report = tmp_path / "calibrated.yaml", tmp_path / "report"
    result = CliRunner().invoke(main, [
        "calibrate", "--policy", str(policy), "--from-reviews", "--since", "1d",
        "--database-url", url, "--out", str(out), "--report", str(report),
        "--target-recall", "0.8", "--min-positives", "3", "--random-weights",
        "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "labels: reviews " in result.stdout and "weighted by 1/π" in result.stdout
    assert "cannot represent: " in result.stdout and "appeal" in result.stdout
    written = yaml.safe_load(out.read_text())
    for cid in ("weapons", "alcohol"):
        provenance = written["categories"][cid]["threshold"]["provenance"]
        assert provenance["source"] == "calibrated"
        assert provenance["dataset"]["name"].startswith("reviews ")
        assert "verdicts (" in provenance["dataset"]["name"]
        assert "1/π" in provenance["note"]
        assert provenance["achieved"]["split"].endswith("(weighted)")
    summary = json.loads((report / "summary.json").read_text())
    assert "1/π" in summary["weighting"] and summary["cannot_represent"]
    page = (report / "index.html").read_text()
    assert "id='weighting'" in page and "id='caveats'" in page
    with pytest.warns(UserWarning):  # random weights: the written policy still serves
        served = Moderator.from_policy(
            out, EncoderSpec(random_weights=True, cache_dir=tmp_path / "cache"))
    assert served.policy.categories["weapons"].threshold.provenance.source == "calibrated"


def test_calibrate_needs_labels_or_reviews(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["calibrate", "--out", str(tmp_path / "o.yaml"),
                                       "--report", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--from-reviews" in result.output


def test_a_verdict_says_nothing_of_categories_its_policy_did_not_have(
        reviewed_log: tuple[str, Path, dict[str, set[str]]], tmp_path: Path) -> None:
    """The decisions were made (and judged) under a version with weapons only: calibrating a
    policy that also has alcohol must not take those verdicts as 'not alcohol'."""
    from calibration.run import calibrate_from_reviews
    from decisionlog import PolicyLog

    url, policy, _ = reviewed_log
    moderator = Moderator.from_policy(
        policy, EncoderSpec(random_weights=True, cache_dir=tmp_path / "cache"))
    older = yaml.safe_load(policy.read_text())
    del older["categories"]["alcohol"]
    PolicyLog(url).activate(version=moderator.policy.version, name="hand", source="old.yaml",
                            text=yaml.safe_dump(older))
    found = reviewed_set(url, model=moderator.encoder.identity)
    assert {i.judged for i in found.images} == {frozenset({"weapons"})}
    result = calibrate_from_reviews(policy, moderator, found, goal=None, min_positives=3)
    by_category = {o.category: o for o in result.outcomes}
    assert by_category["alcohol"].fit_positives + by_category["alcohol"].fit_negatives == 0
    weapons = by_category["weapons"]
    assert weapons.fit_positives + weapons.fit_negatives + weapons.test_positives + \
        weapons.test_negatives == len(found.images)


def test_review_options_need_from_reviews(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.setenv("MODERATION_DATABASE_URL", "sqlite:///elsewhere.sqlite3")  # no matter
    result = CliRunner().invoke(main, ["calibrate", "--labels", str(tmp_path), "--since", "7d",
                                       "--out", str(tmp_path / "o.yaml"),
                                       "--report", str(tmp_path / "r")])
    assert result.exit_code == 2 and "go with --from-reviews" in result.output
