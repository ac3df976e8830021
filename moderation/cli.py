"""The ``moderation`` command line (click: subcommands, typed options and help for free)."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from .command import load_moderator, model_options
from .errors import ImageError, PolicyError
from .policy import load_policy


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
@model_options
def score(images: tuple[Path, ...], **model_options: Any) -> None:
    """Moderate IMAGES: one JSON object per image on stdout.

    Exits 1 if any image could not be read (its line carries the error); 2, before the model
    is loaded, if a path does not exist.
    """
    moderator = load_moderator(**model_options)
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
@model_options
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
    moderator = load_moderator(**model_options)
    with tqdm(total=len(todo), unit="img", file=sys.stderr) as progress:
        counts = run_scan(moderator, todo, out, model_options["batch_size"], progress.update)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    click.echo(f"done: {summary}; results in {out}", err=True)
    if counts["error"]:
        click.secho(f"{counts['error']} of {len(todo)} files could not be moderated (their "
                    f"lines in {out} say why)", fg="red", err=True)
        sys.exit(1)


def _add_package_commands() -> None:
    """Commands other packages contribute through the ``moderation.commands`` entry-point
    group (as packages add ``flask`` commands): ``decisions`` (decisionlog), ``calibrate``
    (calibration), ``serve`` (service), and subcommands of a group the core has (``policy
    dry-run`` and ``policy diff``, from decisionlog). The core imports none of them."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="moderation.commands"):
        existing = main.commands.get(entry.name)
        if existing is None:
            main.add_command(entry.load(), entry.name)
            continue
        contributed = entry.load()
        if isinstance(existing, click.Group) and isinstance(contributed, click.Group):
            for name, command in contributed.commands.items():
                existing.commands.setdefault(name, command)


_add_package_commands()

if __name__ == "__main__":
    main()
