"""``moderation calibrate``: labelled images → fitted thresholds → a new policy and a report."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from ruamel.yaml import YAML
from sklearn.model_selection import train_test_split

from moderation import Moderator
from moderation.errors import ImageError, PolicyError
from moderation.policy import DEFAULT_PROFILE, Goal, Policy, load_policy, parse_policy

from .fitting import Evaluation, ThresholdFitter, evaluate
from .labels import LabelError, LabelledImage, fingerprint, load_labels
from .probability import Method, Reliability, fit_map, reliability

__all__ = ["CalibrationResult", "CategoryOutcome", "ReviewedImages", "calibrate",
           "calibrate_from_reviews"]


class ReviewedImage(Protocol):
    key: str
    vectors: np.ndarray  # (frames, dim): the stored frames' image embeddings
    labels: frozenset[str]
    weight: float  # how many images of the traffic it stands for
    judged: frozenset[str] | None  # the categories its reviewer was asked about (None: all)
    keys: Sequence[int]  # each row's stored key (a frame's index; negative: a crop)


class ReviewedImages(Protocol):
    """A labelled set of stored image vectors with weights: reviewers' verdicts, read from
    the decision log by the caller (``decisionlog.quality.reviewed_set``)."""

    @property
    def images(self) -> Sequence[ReviewedImage]: ...
    name: str
    fingerprint: str
    weighting: str
    left_out: list[str]
    caveats: list[str]

DEFAULT_TEST_SIZE = 0.3


@dataclass
class CategoryOutcome:
    category: str
    goal: Goal | None
    status: str  # ok | no_target | unreachable | too_few_positives | too_few_negatives
    message: str
    old_value: float
    old_review_from: float | None
    value: float | None = None
    review_from: float | None = None
    review_message: str | None = None
    fit_positives: int = 0
    fit_negatives: int = 0
    test_positives: int = 0
    test_negatives: int = 0
    held_out: Evaluation | None = None
    fit_scores: np.ndarray | None = None
    fit_labels: np.ndarray | None = None
    test_scores: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    #: the fitted score → probability map (the policy's ``probability`` without provenance),
    #: its held-out reliability, or why there is none (``None``: not asked for)
    probability: dict[str, Any] | None = None
    reliability: Reliability | None = None
    probability_message: str | None = None

    @property
    def calibrated(self) -> bool:
        return self.status == "ok"


@dataclass
class CalibrationResult:
    policy: Policy
    new_policy: Policy
    model: str
    profile: str
    split: str
    dataset: str
    fingerprint: str
    outcomes: list[CategoryOutcome]
    left_out: list[str] = field(default_factory=list)
    date: dt.date = field(default_factory=dt.date.today)
    #: how the images were weighted (``None``: every image counts once), and what the
    #: sample cannot represent
    weighting: str | None = None
    caveats: list[str] = field(default_factory=list)
    #: the probability maps' method (``None``: none fitted)
    probabilities: Method | None = None

    @property
    def failed(self) -> list[CategoryOutcome]:
        return [o for o in self.outcomes if o.status not in ("ok", "no_target")]


def image_scores(
    moderator: Moderator, items: list[LabelledImage]
) -> tuple[np.ndarray, list[int], list[str]]:
    """Scores of each image against each category (max over an animation's frames).

    Image embeddings are cached (like text embeddings) under the image's SHA-256, so
    calibrating again encodes nothing. Returns the scores of the images that could be read,
    ndarray of shape (n_read, n_categories), their indices in ``items``, and one message per
    image that could not be read.
    """
    encoder, cache = moderator.encoder, moderator.cache
    scorer = moderator.scorer()
    rows: list[np.ndarray] = []
    kept: list[int] = []
    left_out: list[str] = []
    dim = moderator.text.categories.shape[1]
    for index, item in enumerate(items):
        try:
            data = item.path.read_bytes()
        except OSError as e:
            left_out.append(f"{item.path}: cannot read: {e.strerror or e}")
            continue
        grid = moderator.policy.crop_grid
        key = (f"image:{hashlib.sha256(data).hexdigest()}:frames<={moderator.limits.max_frames}"
               + (f":crops={grid}/{grid.overlap}/{grid.min_side}" if grid else ""))
        found = (cache.get(encoder.identity, [key, key + ":whole"])
                 if cache is not None else {})
        cached, whole = found.get(key), found.get(key + ":whole")
        if cached is None or (grid is not None and whole is None):
            try:
                decoded = moderator.decode(data)
            except ImageError as e:
                left_out.append(f"{item.path}: {e.message}")
                continue
            vectors = encoder.encode_images(decoded.view_images())
            n_whole = len(decoded.frames)
            if cache is not None:
                cache.put(encoder.identity, {
                    key: vectors.reshape(-1),
                    key + ":whole": np.array([n_whole], np.float32)})
        else:
            vectors = cached.reshape(-1, dim)
            n_whole = int(whole[0]) if whole is not None else len(vectors)
        # the service's rule, per category: the crops (rows past the whole frames) only
        # for the categories that take them
        views = [*range(n_whole), *(-1 - k for k in range(len(vectors) - n_whole))]
        rows.append(scorer.scores([vectors], [views])[0])
        kept.append(index)
    n_categories = len(moderator.text.category_ids)
    scores = np.stack(rows) if rows else np.zeros((0, n_categories), np.float32)
    return scores, kept, left_out


def scan_scores(
    scan: Path, items: list[LabelledImage], policy: Policy
) -> tuple[np.ndarray, list[int], list[str], str]:
    """Scores taken from a ``moderation scan`` output instead of encoding the images.

    The scan must have been made with the same terms, exceptions, templates and model
    (``scores_version``); thresholds may differ. Returns scores, kept indices, left-out
    messages and the model identity.
    """
    by_path: dict[str, dict[str, Any]] = {}
    for line in scan.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        by_path[str(Path(record["id"]).resolve())] = record
    ids = list(policy.categories)
    rows, kept, left_out, models = [], [], [], set()
    for index, item in enumerate(items):
        record = by_path.get(str(item.path))
        if record is None:
            left_out.append(f"{item.path}: not in {scan.name}")
            continue
        if "error" in record:
            left_out.append(f"{item.path}: {record['error']['message']}")
            continue
        got = record["policy"].get("scores_version")
        if got != policy.scores_version:
            raise LabelError(
                f"{scan}: scores were made with scores_version {got!r}, but the policy's terms, "
                f"exceptions, templates or model now give {policy.scores_version!r}: run "
                "'moderation scan' again, or calibrate without --scores"
            )
        rows.append([record["categories"][cid]["score"] for cid in ids])
        kept.append(index)
        models.add(record["model"])
    if len(models) > 1:
        raise LabelError(f"{scan}: scores from several models {sorted(models)}; use one")
    if not rows:
        raise LabelError(f"{scan}: none of the labelled images is in this scan output")
    return np.asarray(rows, dtype=np.float32), kept, left_out, models.pop()


def _split(
    n: int, keys: list[str], test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """Stratified by each image's label set; rare label sets are pooled so that every
    stratum has at least two members."""
    counts = {k: keys.count(k) for k in set(keys)}
    strata = [k if counts[k] >= 2 else "(rare label sets)" for k in keys]
    indices = np.arange(n)
    how = f"stratified by label set, {test_size:.0%} held out, seed {seed}"
    try:
        fit, test = train_test_split(
            indices, test_size=test_size, random_state=seed, stratify=strata
        )
    except ValueError:
        fit, test = train_test_split(indices, test_size=test_size, random_state=seed)
        how = f"random (too few images per label set to stratify), {test_size:.0%} held out, "
        how += f"seed {seed}"
    return np.sort(fit), np.sort(test), how


def _fit_categories(
    policy: Policy, categories: list[str], profile: str | None, goal: Goal | None,
    scores: np.ndarray, truth: np.ndarray, weights: np.ndarray | None, fit_rows: np.ndarray,
    test_rows: np.ndarray, min_positives: int, n_boot: int, seed: int,
    judged: np.ndarray | None = None, probabilities: Method | None = None,
) -> list[CategoryOutcome]:
    """Fit each category on the fitting rows and report on the held-out ones (``weights``:
    each image's inverse sampling probability, or ``None``; ``judged``: ndarray of shape
    (n_images, n_categories), bool, whether the image's label says anything of the category,
    or ``None``: every label does)."""
    outcomes = []
    all_fit, all_test = fit_rows, test_rows
    for col, cid in enumerate(categories):
        if judged is not None:
            fit_rows, test_rows = all_fit[judged[all_fit, col]], all_test[judged[all_test, col]]
        category = policy.categories[cid]
        old = policy.threshold_for(cid, profile if profile in policy.profiles else None)
        target = category.target
        this_goal = goal or (Goal(precision=target.precision, recall=target.recall)
                             if target else None)
        fs, fl = scores[fit_rows, col], truth[fit_rows, col]
        ts, tl = scores[test_rows, col], truth[test_rows, col]
        fw = weights[fit_rows] if weights is not None else None
        tw = weights[test_rows] if weights is not None else None
        outcome = CategoryOutcome(
            category=cid, goal=this_goal, status="no_target", message="", old_value=old.value,
            old_review_from=old.review_from, fit_positives=int(fl.sum()),
            fit_negatives=int((~fl).sum()), test_positives=int(tl.sum()),
            test_negatives=int((~tl).sum()), fit_scores=fs, fit_labels=fl, test_scores=ts,
            test_labels=tl,
        )
        outcomes.append(outcome)
        if probabilities is not None:
            _fit_probability(outcome, probabilities, fw, tw, min_positives)
        if this_goal is None:
            outcome.message = (
                "no target: set target in the policy, or pass --target-precision or "
                "--target-recall; threshold unchanged"
            )
            continue
        fitter = ThresholdFitter(this_goal, min_positives=min_positives).fit(fs, fl, fw)
        outcome.status, outcome.message = fitter.status_, fitter.message_
        if fitter.threshold_ is None:
            continue
        if outcome.test_positives < min_positives:
            outcome.status = "too_few_positives"
            outcome.message = (
                f"the held-out split has only {outcome.test_positives} positive images (at "
                f"least {min_positives} are needed to report on the threshold); not calibrated"
            )
            continue
        outcome.value = fitter.threshold_
        outcome.held_out = evaluate(ts, tl, fitter.threshold_, n_boot=n_boot, seed=seed,
                                    weights=tw)
        if target is not None and target.review is not None and category.action == "block":
            review = ThresholdFitter(target.review, min_positives=min_positives).fit(fs, fl,
                                                                                   fw)
            if review.threshold_ is None:
                outcome.review_message = f"review band: {review.message_}"
            elif review.threshold_ < fitter.threshold_:
                outcome.review_from = review.threshold_
                outcome.review_message = f"review band: {review.message_}"
            else:
                outcome.review_message = (
                    "review band: not needed, the block threshold already meets "
                    f"{target.review.model_dump(exclude_none=True)}"
                )
        elif old.review_from is not None:
            outcome.review_message = (
                f"review band: the previous review_from ({old.review_from}) was set for the "
                "previous threshold and is dropped; set target.review to calibrate one"
            )

    return outcomes


def _fit_probability(o: CategoryOutcome, method: Method, fit_weights: np.ndarray | None,
                     test_weights: np.ndarray | None, min_positives: int) -> None:
    """The category's score → probability map on the fitting split, its reliability on the
    held-out one; or why not (too few positives or negatives in a split)."""
    assert o.fit_scores is not None and o.fit_labels is not None
    assert o.test_scores is not None and o.test_labels is not None
    few = [f"{n} {what} in the {split} split" for n, what, split in (
        (o.fit_positives, "positives", "fitting"), (o.fit_negatives, "negatives", "fitting"),
        (o.test_positives, "positives", "held-out"), (o.test_negatives, "negatives", "held-out"))
        if n < min_positives]
    if few:
        o.probability_message = (f"probability: not fitted, only {', '.join(few)} (at least "
                                 f"{min_positives} each)")
        return
    try:
        fitted = fit_map(method, o.fit_scores, o.fit_labels, fit_weights)
    except ValueError as e:
        o.probability_message = f"probability: not fitted: {e}"
        return
    from moderation.policy import ProbabilityMap

    apply = ProbabilityMap.model_construct(**fitted).of  # (validated with the provenance)
    o.reliability = reliability(apply(o.test_scores), o.test_labels, test_weights)
    o.probability = fitted
    o.probability_message = (f"probability: {method} map, held-out expected calibration error "
                             f"{o.reliability.ece:.3f} ({o.reliability.bins} bins), Brier "
                             f"{o.reliability.brier:.3f}")


def calibrate(
    policy_path: Path,
    labels: Path,
    *,
    load_moderator: Callable[[], Moderator] | None = None,
    test: Path | None = None,
    scan: Path | None = None,
    goal: Goal | None = None,
    profile: str | None = None,
    test_size: float = DEFAULT_TEST_SIZE,
    seed: int = 0,
    min_positives: int = 10,
    n_boot: int = 1000,
    probabilities: Method | None = None,
) -> CalibrationResult:
    """Fit every category's threshold (and, with ``probabilities``, its score → probability
    map); see the README's "Calibration" for the method.

    ``load_moderator`` builds the model (not called when ``scan`` gives the scores).
    """
    policy = load_policy(policy_path)
    if profile == DEFAULT_PROFILE:
        profile = None
    if profile is not None and not re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", profile):
        raise PolicyError(f"profile name {profile!r} is not snake_case (e.g. 'marketplace')")
    categories = list(policy.categories)
    fit_items = load_labels(labels, set(categories))
    test_items = load_labels(test, set(categories)) if test is not None else []
    items = fit_items + test_items

    if scan is not None:
        scores, kept, left_out, model = scan_scores(scan, items, policy)
    else:
        if load_moderator is None:
            raise ValueError("give load_moderator, or scan scores")
        moderator = load_moderator()
        scores, kept, left_out = image_scores(moderator, items)
        model = moderator.encoder.identity
    position = {original: row for row, original in enumerate(kept)}
    truth = np.array(
        [[c in items[i].labels for c in categories] for i in kept], dtype=bool
    ).reshape(len(kept), len(categories))

    if test is not None:
        fit_rows = np.array([position[i] for i in range(len(fit_items)) if i in position], int)
        test_rows = np.array(
            [position[i] for i in range(len(fit_items), len(items)) if i in position], int
        )
        split = f"fitted on {labels.name}, reported on {test.name} (given by the user)"
    else:
        keys = [",".join(sorted(items[i].labels)) or "none" for i in kept]
        fit_rows, test_rows, how = _split(len(kept), keys, test_size, seed)
        split = f"fitted and reported on two splits of {labels.name}: {how}"

    outcomes = _fit_categories(policy, categories, profile, goal, scores, truth, None,
                               fit_rows, test_rows, min_positives, n_boot, seed,
                               probabilities=probabilities)
    result = CalibrationResult(
        policy=policy, new_policy=policy, model=model, profile=profile or DEFAULT_PROFILE,
        split=split, dataset=labels.name,
        fingerprint=fingerprint([items[i] for i in kept]),
        outcomes=outcomes, left_out=left_out, probabilities=probabilities,
    )
    result.new_policy = parse_policy(
        updated_policy_text(policy_path, result), source=policy_path.name,
        base_dir=policy_path.parent,
    )
    return result


def calibrate_from_reviews(
    policy_path: Path,
    moderator: Moderator,
    reviewed: ReviewedImages,
    *,
    goal: Goal | None = None,
    profile: str | None = None,
    test_size: float = DEFAULT_TEST_SIZE,
    seed: int = 0,
    min_positives: int = 10,
    n_boot: int = 1000,
    probabilities: Method | None = None,
) -> CalibrationResult:
    """Fit thresholds on reviewers' verdicts: each reviewed decision's stored frames scored
    by the service's scorer under the policy being calibrated (``moderator``'s), weighted by
    the inverse of its chance to be reviewed, split and fitted as :func:`calibrate` does."""
    policy = moderator.policy
    if profile == DEFAULT_PROFILE:
        profile = None
    categories = list(policy.categories)
    images = list(reviewed.images)
    if not images:
        raise LabelError(
            f"no usable verdicts in {reviewed.name}"
            + ("; " + "; ".join(reviewed.left_out) if reviewed.left_out else "")
            + ": review more items (or widen --since)")
    scores = moderator.scorer().scores(  # the service's rule: the views each category takes
        [i.vectors for i in images], [i.keys or range(len(i.vectors)) for i in images])
    truth = np.array([[c in i.labels for c in categories] for i in images], dtype=bool)
    weights = np.array([i.weight for i in images], dtype=np.float64)
    keys = [",".join(sorted(set(i.labels) & set(categories))) or "none" for i in images]
    fit_rows, test_rows, how = _split(len(images), keys, test_size, seed)
    split = f"fitted and reported on two splits of the verdicts: {how}; weighted"
    judged = np.array([[i.judged is None or c in i.judged for c in categories]
                       for i in images], dtype=bool)  # a verdict says nothing of a newer one
    outcomes = _fit_categories(policy, categories, profile, goal, scores, truth, weights,
                               fit_rows, test_rows, min_positives, n_boot, seed, judged,
                               probabilities=probabilities)
    result = CalibrationResult(
        policy=policy, new_policy=policy, model=moderator.encoder.identity,
        profile=profile or DEFAULT_PROFILE, split=split, dataset=reviewed.name,
        fingerprint=reviewed.fingerprint, outcomes=outcomes, left_out=list(reviewed.left_out),
        weighting=reviewed.weighting, caveats=list(reviewed.caveats),
        probabilities=probabilities,
    )
    result.new_policy = parse_policy(
        updated_policy_text(policy_path, result), source=policy_path.name,
        base_dir=policy_path.parent,
    )
    return result


def _provenance(result: CalibrationResult, o: CategoryOutcome) -> dict[str, Any]:
    assert o.held_out is not None and o.goal is not None
    e = o.held_out
    return {
        "source": "calibrated",
        "model": result.model,
        "date": result.date.isoformat(),
        "dataset": {
            "name": result.dataset,
            "fingerprint": result.fingerprint,
            "positives": o.fit_positives,
            "negatives": o.fit_negatives,
        },
        "target": o.goal.model_dump(exclude_none=True),
        "achieved": {
            "precision": round(e.precision, 4),
            "recall": round(e.recall, 4),
            "precision_interval": [round(x, 4) for x in e.precision_interval],
            "recall_interval": [round(x, 4) for x in e.recall_interval],
            "split": f"held out: {o.test_positives} positives, {o.test_negatives} negatives"
                     + (" (weighted)" if result.weighting else ""),
        },
        **({"note": result.weighting} if result.weighting else {}),
    }


def updated_policy_text(policy_path: Path, result: CalibrationResult) -> str:
    """The policy file with the calibrated thresholds replaced; comments and order kept
    (ruamel.yaml round-trips YAML, which PyYAML cannot)."""
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 100
    data = yaml.load(policy_path.read_text(encoding="utf-8"))
    for o in result.outcomes:
        if o.probability is not None and o.reliability is not None:
            data["categories"][o.category]["probability"] = {
                **o.probability, "model": result.model, "date": result.date.isoformat(),
                "dataset": {"name": result.dataset, "fingerprint": result.fingerprint,
                            "positives": o.fit_positives, "negatives": o.fit_negatives},
                "ece": round(o.reliability.ece, 4), "bins": o.reliability.bins,
                "split": f"held out: {o.test_positives} positives, {o.test_negatives} "
                         "negatives" + (" (weighted)" if result.weighting else ""),
            }
        if not o.calibrated:
            continue
        assert o.value is not None
        threshold: dict[str, Any] = {"value": o.value}
        if o.review_from is not None:
            threshold["review_from"] = o.review_from
        threshold["provenance"] = _provenance(result, o)
        if result.profile == DEFAULT_PROFILE:
            data["categories"][o.category]["threshold"] = threshold
        else:
            data.setdefault("profiles", {}).setdefault(result.profile, {})[o.category] = threshold
    buffer = io.StringIO()
    yaml.dump(data, buffer)
    return buffer.getvalue()


def threshold_diff(result: CalibrationResult) -> list[str]:
    """One line per category: old → new threshold and what was achieved, or why not."""
    lines = [f"thresholds ({result.profile} profile), model {result.model}:"]
    width = max(len(o.category) for o in result.outcomes)

    def band(value: float | None, review: float | None) -> str:
        text = f"{value:.4f}" if value is not None else "-"
        return text + (f" (review from {review:.4f})" if review is not None else "")

    for o in result.outcomes:
        before = band(o.old_value, o.old_review_from)
        if o.calibrated and o.held_out is not None:
            e = o.held_out
            lines.append(
                f"  {o.category:<{width}}  {before} -> {band(o.value, o.review_from)}   "
                f"held-out precision {e.precision:.3f} [{e.precision_interval[0]:.3f}, "
                f"{e.precision_interval[1]:.3f}], recall {e.recall:.3f} "
                f"[{e.recall_interval[0]:.3f}, {e.recall_interval[1]:.3f}]"
            )
        else:
            lines.append(f"  {o.category:<{width}}  {before} unchanged: {o.message}")
        if o.probability_message:
            lines.append(f"  {'':<{width}}  {o.probability_message}")
    return lines


def write_policy(result: CalibrationResult, policy_path: Path, out: Path) -> None:
    text = updated_policy_text(policy_path, result)
    try:
        parse_policy(text, source=out.name, base_dir=policy_path.parent)
    except PolicyError as e:  # a bug, never the user's fault: say so loudly
        raise RuntimeError(f"the calibrated policy does not validate: {e}") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
