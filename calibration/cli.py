"""``moderation calibrate``: thresholds fitted on labelled images."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from moderation import PolicyError
from moderation.backends import EncoderSpec
from moderation.command import load_moderator, model_options


@click.command()
@click.option("--labels", type=click.Path(exists=True, path_type=Path),
              help="Labelled images: a CSV manifest (path,labels) or a folder per category.")
@click.option("--from-reviews", is_flag=True,
              help="Label with reviewers' verdicts from the decision log instead (review "
                   "actions and audit samples, weighted by 1/sampling probability).")
@click.option("--since", help="--from-reviews: decisions made since (unix seconds, ISO 8601, "
                                "or an age; default 30d).")
@click.option("--until", help="--from-reviews: decisions made before this.")
@click.option("--database-url",
              help="--from-reviews: the decision log (default: MODERATION_DATABASE_URL, else "
                   "the local SQLite log).")
@click.option("--test", type=click.Path(exists=True, path_type=Path),
              help="A held-out labelled set to report on (else a stratified split of --labels).")
@click.option("--scores", "scan", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A 'moderation scan' output with the images' scores: nothing is encoded.")
@click.option("--target-precision", type=click.FloatRange(0, 1),
              help="For every category: maximise recall subject to this precision.")
@click.option("--target-recall", type=click.FloatRange(0, 1),
              help="For every category: maximise precision subject to this recall.")
@click.option("--profile", help="Write the thresholds into this calibration profile "
                                "(default: the categories' own thresholds).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the calibrated policy.")
@click.option("--report", "report_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Report folder.")
@click.option("--test-size", type=click.FloatRange(0.05, 0.95), default=0.3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--min-positives", type=click.IntRange(1), default=10, show_default=True,
              help="Fewer positive images than this in a split: the category is not calibrated.")
@click.option("--probabilities", type=click.Choice(["none", "isotonic", "sigmoid"]),
              default="none", show_default=True,
              help="Also fit each category's score → probability map (scikit-learn's isotonic "
                   "regression or Platt's sigmoid), written into the policy; results then give "
                   "a probability beside each score (Misskey's detect-images needs them).")
@model_options
def calibrate(
    labels: Path | None,
    from_reviews: bool,
    since: str | None,
    until: str | None,
    database_url: str | None,
    test: Path | None,
    scan: Path | None,
    target_precision: float | None,
    target_recall: float | None,
    profile: str | None,
    out: Path,
    report_dir: Path,
    test_size: float,
    seed: int,
    min_positives: int,
    probabilities: str,
    policy_path: Path,
    spec: EncoderSpec,
) -> None:
    """Fit per-category thresholds on labelled images; write a new policy and a report.

    Exits 3 (after writing both) when a category with a target could not be calibrated.
    """
    from moderation.policy import Goal

    from .report import write_report
    from .run import threshold_diff, write_policy

    if target_precision is not None and target_recall is not None:
        raise click.UsageError("give --target-precision or --target-recall, not both")
    method = None if probabilities == "none" else probabilities
    goal = None
    if target_precision is not None or target_recall is not None:
        goal = Goal(precision=target_precision, recall=target_recall)
    if from_reviews:
        if labels is not None or test is not None or scan is not None:
            raise click.UsageError("--from-reviews takes its labels from the log: leave out "
                                   "--labels, --test and --scores")
        result = _from_reviews(policy_path, goal, profile, test_size, seed, min_positives,
                               since, until, database_url, spec, method)
    elif since is not None or until is not None or database_url is not None:
        raise click.UsageError("--since, --until and --database-url go with --from-reviews")
    elif labels is None:
        raise click.UsageError("give --labels (a labelled set), or --from-reviews")
    else:
        result = _from_labels(policy_path, labels, test, scan, goal, profile, test_size, seed,
                              min_positives, spec, method)
    write_policy(result, policy_path, out)
    index = write_report(result, report_dir)
    for line in threshold_diff(result):
        click.echo(line)
    for line in result.left_out:
        click.echo(f"left out: {line}", err=True)
    if result.weighting:
        click.echo(f"labels: {result.dataset}; {result.weighting}")
        for line in result.caveats:
            click.echo(f"cannot represent: {line}")
    click.echo(f"wrote {out} (version {result.new_policy.version}) and {index}")
    if result.failed:
        names = ", ".join(o.category for o in result.failed)
        click.secho(f"NOT CALIBRATED: {names} (see above); their thresholds are unchanged",
                    fg="red", err=True)
        sys.exit(3)


def _from_labels(policy_path: Path, labels: Path, test: Path | None, scan: Path | None,
                 goal: Any, profile: str | None, test_size: float, seed: int,
                 min_positives: int, spec: EncoderSpec, method: Any) -> Any:
    from .labels import LabelError
    from .run import calibrate as run

    try:
        return run(
            policy_path, labels, test=test, scan=scan, goal=goal, profile=profile,
            load_moderator=lambda: load_moderator(policy_path, spec), test_size=test_size,
            seed=seed, min_positives=min_positives, probabilities=method,
        )
    except (LabelError, PolicyError) as e:
        raise click.ClickException(str(e)) from e


def _from_reviews(policy_path: Path, goal: Any, profile: str | None, test_size: float,
                  seed: int, min_positives: int, since: str | None, until: str | None,
                  database_url: str | None, spec: EncoderSpec, method: Any) -> Any:
    """The verdicts come from the decision log, a sibling package this one never imports:
    it contributes them as the ``reviews`` label source (the ``moderation.label_sources``
    entry points), the way packages contribute commands."""
    from importlib.metadata import entry_points

    from .labels import LabelError
    from .run import calibrate_from_reviews

    found = entry_points(group="moderation.label_sources", name="reviews")
    if not found:
        raise click.ClickException("no 'reviews' label source is installed (the decisionlog "
                                   "package provides it: pip install -e .)")
    source = next(iter(found)).load()
    try:
        moderator = load_moderator(policy_path, spec)
        reviewed = source(database_url or os.environ.get("MODERATION_DATABASE_URL"),
                          model=moderator.encoder.identity, since=since or "30d", until=until)
        return calibrate_from_reviews(policy_path, moderator, reviewed, goal=goal,
                                      profile=profile, test_size=test_size, seed=seed,
                                      min_positives=min_positives, probabilities=method)
    except (LabelError, PolicyError, ValueError) as e:
        raise click.ClickException(str(e)) from e
