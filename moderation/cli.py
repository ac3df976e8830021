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


@main.group()
def model() -> None:
    """Work with the model: export it to ONNX for the torch-free backend."""


def sample_images(n: int = 16, size: int = 320) -> list[Any]:
    """Photo-like stand-ins for the int8 gate when no --images are given: smooth gradients,
    shapes and noise at several scales (deterministic)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(20261124)
    images = []
    for i in range(n):
        y, x = np.mgrid[0:size, 0:size] / size
        base = rng.uniform(0, 255, 3)
        tilt = rng.uniform(-160, 160, (2, 3))
        pixels = base + x[..., None] * tilt[0] + y[..., None] * tilt[1]
        pixels += rng.normal(0, 4 + 6 * (i % 4), (size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(3 + i % 5):
            box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([box[0][0], box[1][0], box[0][1] + 4, box[1][1] + 4], fill=fill)
        images.append(image.filter(ImageFilter.GaussianBlur(i % 3)))
    return images


def _images_in(folder: Path, limit: int = 64) -> list[Any]:
    from PIL import Image

    found = []
    for path in _files_under(folder):
        try:
            with Image.open(path) as image:
                found.append(image.convert("RGB"))
        except (OSError, ValueError):
            continue  # not an image
        if len(found) >= limit:
            break
    if not found:
        raise click.ClickException(f"no readable image under {folder}")
    return found


@model.command("export")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The folder to write (must not hold a model already).")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32",
              show_default=True, help="int8: weights quantised dynamically; refused below the "
                                      "cosine gate.")
@click.option("--images", "images_folder", type=click.Path(exists=True, file_okay=False,
                                                             path_type=Path),
              help="Images to check the export on (up to 64; default: 16 generated ones).")
@click.option("--min-cosine", type=click.FloatRange(0, 1), default=0.99, show_default=True,
              help="int8: the lowest image-embedding cosine against fp32 accepted.")
@model_options
def model_export(out: Path, precision: str, images_folder: Path | None, min_cosine: float,
                 **model_options: Any) -> None:
    """Export the policy's model (or --model/--pretrained) to ONNX: both towers, the
    tokenizer, and model.json (source identity and weights checksum, preprocessing,
    tokenisation, precision). Needs torch; serving the result does not (--backend onnx
    --pretrained OUT)."""
    from .errors import ModelError

    if (out / "model.json").exists():
        raise click.ClickException(f"{out} already holds an exported model; choose another "
                                   "--out or remove it")
    if model_options.get("backend") == "onnx":
        raise click.UsageError("export reads a torch model: leave out --backend onnx")
    images = _images_in(images_folder) if images_folder else sample_images()
    moderator = load_moderator(**{**model_options, "device": "cpu", "backend": "torch"})
    from .backends.torch import export_onnx

    policy = moderator.policy
    prompts = [template.format(term) for c in policy.categories.values()
               for term in [*c.terms, *c.exceptions]
               for template in (c.templates or policy.templates)][:64]
    try:
        metadata = export_onnx(moderator.encoder, out, precision=precision, images=images,
                               prompts=prompts, min_cosine=min_cosine)
    except ModelError as e:
        raise click.ClickException(str(e)) from e
    checked = metadata["checked"]
    click.echo(f"wrote {out}: {metadata['source']['identity']} as ONNX {precision} "
               f"(embedding dim {metadata['embedding_dim']})")
    click.echo(f"checked on {checked['images']} images and {checked['prompts']} prompts: fp32 "
               f"differs from torch by at most {checked['fp32_max_difference']:.2e}"
               + ("; accepts thresholds calibrated on the source model"
                  if metadata["matches_source"] else ""))
    if precision == "int8":
        click.echo(f"int8 image-embedding cosine against fp32: min "
                   f"{checked['int8_image_cosine_min']:.4f}, mean "
                   f"{checked['int8_image_cosine_mean']:.4f} (gate {min_cosine}); a model of "
                   "its own: calibrate it before relying on its thresholds")


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
