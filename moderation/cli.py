"""The ``moderation`` command line (click: subcommands, typed options and help for free)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import click

from .errors import ImageError, ModerationError, PolicyError
from .policy import load_policy

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_POLICY = os.environ.get("MODERATION_POLICY", "policies/default.yaml")


def _model_options(command: F) -> F:
    """The options every command that loads a model shares."""
    options = [
        click.option(
            "--policy",
            "policy_path",
            type=click.Path(dir_okay=False, path_type=Path),
            default=DEFAULT_POLICY,
            show_default=True,
            help="Policy YAML file ($MODERATION_POLICY sets the default).",
        ),
        click.option("--model", help="open_clip architecture; default: the policy's."),
        click.option(
            "--pretrained",
            help="open_clip pretrained tag or checkpoint file; default: the policy's.",
        ),
        click.option(
            "--random-weights",
            is_flag=True,
            help="Random weights instead of pretrained ones: scores are MEANINGLESS. "
            "For benchmarks and smoke tests only.",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Where text embeddings are cached (default: $MODERATION_CACHE_DIR or "
            "~/.cache/moderation).",
        ),
        click.option(
            "--batch-size", type=click.IntRange(1, 512), default=16, show_default=True
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load_moderator(
    policy_path: Path,
    model: str | None,
    pretrained: str | None,
    random_weights: bool,
    cache_dir: Path | None,
    batch_size: int,
) -> Any:
    from .backends import RandomWeightsWarning
    from .moderator import Moderator

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RandomWeightsWarning)
        try:
            moderator = Moderator.from_policy(
                policy_path,
                model=model,
                pretrained=pretrained,
                random_weights=random_weights,
                cache_dir=cache_dir,
                batch_size=batch_size,
            )
        except ModerationError as e:
            raise click.ClickException(str(e)) from e
    for warning in caught:
        if issubclass(warning.category, RandomWeightsWarning):
            _loud_warning(str(warning.message))
    return moderator


def _loud_warning(message: str) -> None:
    bar = "!" * 78
    click.secho(f"{bar}\n!! WARNING: {message}\n{bar}", fg="red", err=True)


@click.group()
@click.version_option(package_name="moderation")
def main() -> None:
    """Zero-shot image moderation with CLIP and YAML policies."""


@main.group()
def policy() -> None:
    """Work with policy files."""


@policy.command("check")
@click.argument("path", type=click.Path(path_type=Path))
def policy_check(path: Path) -> None:
    """Validate a policy file: exit 0 with a summary, or 1 with every fault."""
    try:
        p = load_policy(path)
    except PolicyError as e:
        click.echo(str(e), err=True)
        sys.exit(1)
    n_terms = sum(len(c.terms) for c in p.categories.values())
    n_exceptions = sum(len(c.exceptions) for c in p.categories.values())
    calibrated = len(p.calibrated_models())
    click.echo(
        f"{path}: OK: policy {p.name!r} version {p.version}, {len(p.categories)} categories, "
        f"{n_terms} terms, {n_exceptions} exceptions, model {p.model.name}/{p.model.pretrained}, "
        f"{calibrated} of {len(p.categories)} thresholds calibrated"
    )


@main.command()
@click.argument("images", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_model_options
def score(images: tuple[Path, ...], **model_options: Any) -> None:
    """Moderate IMAGES: one JSON object per image on stdout.

    Exits 1 if any image could not be read (its line carries the error); 2, before the model
    is loaded, if a path does not exist.
    """
    moderator = _load_moderator(**model_options)
    results = moderator.moderate(list(images), ids=[str(p) for p in images])
    for result in results:
        click.echo(json.dumps(result.to_dict()))
    if not all(r.ok for r in results):
        sys.exit(1)


def _files_under(root: Path) -> Iterator[Path]:
    """Regular files below ``root``, sorted, skipping hidden files and folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file():
                yield path


def _done_ids(out: Path) -> set[str]:
    """Ids already in a JSONL output; a line cut short by a crash is ignored (redone)."""
    done: set[str] = set()
    if not out.exists():
        return done
    with out.open(encoding="utf-8") as f:
        for line in f:
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                continue
    return done


def run_scan(
    moderator: Any,
    files: list[Path],
    out: Path,
    batch_size: int,
    on_batch: Callable[[int], Any] = lambda n: None,
) -> Counter[str]:
    """Moderate ``files`` in batches, appending one JSON line each to ``out``.

    Decoding the next batch (in threads) overlaps with the model working on this one. Returns
    how many results had each action (and ``error``).
    """
    counts: Counter[str] = Counter()
    if not files:
        return counts

    def decode(path: Path) -> Any:
        try:
            return moderator.decode(path)
        except ImageError as e:
            return e

    batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    cut_short = out.exists() and out.stat().st_size > 0 and not out.read_bytes().endswith(b"\n")
    with ThreadPoolExecutor(max_workers=2) as pool, out.open("a", encoding="utf-8") as sink:
        if cut_short:
            sink.write("\n")  # a line left unfinished by a crash stays apart
        upcoming = pool.map(decode, batches[0])
        for index, batch in enumerate(batches):
            decoded = list(upcoming)
            if index + 1 < len(batches):
                upcoming = pool.map(decode, batches[index + 1])
            results = moderator.moderate_decoded(decoded, ids=[str(p) for p in batch])
            for result in results:
                sink.write(json.dumps(result.to_dict()) + "\n")
                counts[result.decision.action.value if result.ok else "error"] += 1
            sink.flush()
            on_batch(len(batch))
    return counts


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL file: one line per image. Files already in it are skipped.",
)
@_model_options
def scan(directory: Path, out: Path, **model_options: Any) -> None:
    """Moderate every file under DIRECTORY, in batches, appending JSON lines to --out.

    A file that cannot be read becomes an error line and the scan goes on; the scan then exits
    1 and says how many failed. Running the same scan again skips the files already in --out.
    """
    from tqdm import tqdm

    try:  # fail before the model is loaded, not after
        out.open("a", encoding="utf-8").close()
    except OSError as e:
        raise click.BadParameter(
            f"cannot write {out}: {e.strerror or e}", param_hint="--out"
        ) from e
    done = _done_ids(out)
    todo = [p for p in _files_under(directory) if str(p) not in done]
    click.echo(
        f"{len(todo)} files to moderate under {directory} ({len(done)} already in {out})",
        err=True,
    )
    if not todo:
        return
    moderator = _load_moderator(**model_options)
    with tqdm(total=len(todo), unit="img", file=sys.stderr) as progress:
        counts = run_scan(moderator, todo, out, model_options["batch_size"], progress.update)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    click.echo(f"done: {summary}; results in {out}", err=True)
    if counts["error"]:
        click.secho(f"{counts['error']} of {len(todo)} files could not be moderated (their "
                    f"lines in {out} say why)", fg="red", err=True)
        sys.exit(1)


@main.group()
def decisions() -> None:
    """The decision log: export it, purge old decisions."""


_database_option = click.option(
    "--database-url",
    envvar="MODERATION_DATABASE_URL",
    help="sqlite:///path or postgresql://… ($MODERATION_DATABASE_URL; default: the service's "
    "default SQLite file).",
)


def _store(database_url: str | None) -> Any:
    from service.store import DecisionStore, default_database_url

    try:
        return DecisionStore(database_url or default_database_url())
    except ValueError as e:
        raise click.ClickException(str(e)) from e


def _time_option(value: str | None) -> float | None:
    from service.store import parse_time

    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


@decisions.command("export")
@click.option("--since", help="Unix seconds, ISO 8601, or an age (24h, 7d).")
@click.option("--until", help="Same forms as --since.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True)
@click.option("--out", type=click.File("w", encoding="utf-8"), default="-",
              help="Output file (default: standard output).")
@_database_option
def decisions_export(since: str | None, until: str | None, fmt: str, out: Any,
                     database_url: str | None) -> None:
    """Write recorded decisions, oldest first, for offline analysis."""
    import csv

    store = _store(database_url)
    rows = store.export(since=_time_option(since), until=_time_option(until))
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row) + "\n")
        return
    columns = ["id", "created_at", "client_id", "image_sha256", "image_size", "policy_name",
               "policy_version", "model", "profile", "action", "triggered", "latency_ms",
               "error_code", "categories"]
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([
            row["id"], row["created_at"], row["client_id"], row["image"]["sha256"],
            row["image"]["size"], row["policy"]["name"], row["policy"]["version"], row["model"],
            row["profile"], row["action"], ";".join(row["triggered"]), row["latency_ms"],
            row["error_code"] or "", json.dumps(row["categories"]),
        ])


@decisions.command("purge")
@click.option("--older-than-days", type=click.FloatRange(min=0), envvar="MODERATION_RETENTION_DAYS",
              default=90, show_default=True,
              help="Maximum age kept ($MODERATION_RETENTION_DAYS).")
@_database_option
def decisions_purge(older_than_days: float, database_url: str | None) -> None:
    """Delete decisions older than the retention period."""
    import time

    store = _store(database_url)
    removed = store.purge(time.time() - older_than_days * 86400)
    click.echo(f"purged {removed} decisions older than {older_than_days:g} days")


@decisions.command("replay")
@click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="MODERATION_DEAD_LETTER_PATH",
              help="The dead-letter file ($MODERATION_DEAD_LETTER_PATH; default: beside a SQLite "
                   "log, else under the data folder).")
@_database_option
def decisions_replay(path: Path | None, database_url: str | None) -> None:
    """Write decisions set aside in the dead-letter file into the log.

    Those the log already has are skipped; those it still cannot take stay in the file (exit 1).
    """
    from service.store import DeadLetters, default_dead_letter_path, replay_dead_letters

    store = _store(database_url)
    dead = DeadLetters(path or default_dead_letter_path(store.url))
    written, present, failing = replay_dead_letters(store, dead)
    click.echo(f"{dead.path}: {written} written, {present} already in the log, "
               f"{failing} still failing")
    if failing:
        sys.exit(1)


@main.command()
@click.option("--labels", required=True, type=click.Path(exists=True, path_type=Path),
              help="Labelled images: a CSV manifest (path,labels) or a folder per category.")
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
@_model_options
def calibrate(
    labels: Path,
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
    **model_options: Any,
) -> None:
    """Fit per-category thresholds on labelled images; write a new policy and a report.

    Exits 3 (after writing both) when a category with a target could not be calibrated.
    """
    from calibration.labels import LabelError
    from calibration.report import write_report
    from calibration.run import calibrate as run
    from calibration.run import threshold_diff, write_policy

    from .policy import Goal

    if target_precision is not None and target_recall is not None:
        raise click.UsageError("give --target-precision or --target-recall, not both")
    goal = None
    if target_precision is not None or target_recall is not None:
        goal = Goal(precision=target_precision, recall=target_recall)
    policy_path: Path = model_options["policy_path"]
    try:
        result = run(
            policy_path, labels, test=test, scan=scan, goal=goal, profile=profile,
            load_moderator=lambda: _load_moderator(**model_options), test_size=test_size,
            seed=seed, min_positives=min_positives,
        )
    except (LabelError, PolicyError) as e:
        raise click.ClickException(str(e)) from e
    write_policy(result, policy_path, out)
    index = write_report(result, report_dir)
    for line in threshold_diff(result):
        click.echo(line)
    for line in result.left_out:
        click.echo(f"left out: {line}", err=True)
    click.echo(f"wrote {out} (version {result.new_policy.version}) and {index}")
    if result.failed:
        names = ", ".join(o.category for o in result.failed)
        click.secho(f"NOT CALIBRATED: {names} (see above); their thresholds are unchanged",
                    fg="red", err=True)
        sys.exit(3)


@main.command()
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=DEFAULT_POLICY,
    show_default=True,
    help="Policy YAML file; POST /v1/policy/reload reads it again.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64),
              default=lambda: min(os.cpu_count() or 1, 4), show_default="cores, at most 4",
              help="Worker processes; each gets cores/workers torch threads (BENCHMARKS.md).")
@click.option("--threads", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Concurrent requests per worker.")
@click.option("--model", help="open_clip architecture; default: the policy's.")
@click.option("--pretrained", help="Pretrained tag or checkpoint file; default: the policy's.")
@click.option("--random-weights", is_flag=True,
              help="Random weights: scores are MEANINGLESS. Benchmarks and smoke tests only.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path))
def serve(
    policy_path: Path,
    host: str,
    port: int,
    workers: int,
    threads: int,
    model: str | None,
    pretrained: str | None,
    random_weights: bool,
    cache_dir: Path | None,
) -> None:
    """Serve the HTTP API with gunicorn (see service/gunicorn.conf.py).

    Admin routes need MODERATION_ADMIN_TOKEN; MODERATION_API_KEYS (comma-separated) makes
    /v1/moderate and /v1/policy require a key.
    """
    import service

    try:
        load_policy(policy_path)  # fail here, once, rather than in every worker
    except PolicyError as e:
        raise click.ClickException(str(e)) from e
    if random_weights:
        _loud_warning("serving with RANDOM WEIGHTS: every score is meaningless.")
    env = dict(os.environ)
    env.update(
        MODERATION_POLICY=str(policy_path.resolve()),
        MODERATION_WORKERS=str(workers),
        MODERATION_THREADS=str(threads),
        MODERATION_RANDOM_WEIGHTS="true" if random_weights else "false",
    )
    for key, value in (("MODEL", model), ("PRETRAINED", pretrained), ("CACHE_DIR", cache_dir)):
        if value is not None:
            env[f"MODERATION_{key}"] = str(value)
    conf = Path(service.__file__).parent / "gunicorn.conf.py"
    argv = [
        sys.executable, "-m", "gunicorn",
        "--config", str(conf),
        "--bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "service.app:create_app()",
    ]
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main()
