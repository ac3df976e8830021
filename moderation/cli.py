"""The ``moderation`` command line (click: subcommands, typed options and help for free)."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .backends import EncoderSpec
from .command import load_moderator, model_options
from .errors import ModerationError, PolicyError
from .policy import load_policy

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint


#: the entry-point group through which packages add commands to ``moderation``
COMMANDS = "moderation.commands"


def _entry_points() -> dict[str, EntryPoint]:
    from importlib.metadata import entry_points

    return {entry.name: entry for entry in entry_points(group=COMMANDS)}


class PackageCommands(click.Group):
    """``moderation``: the core's commands, and those other packages contribute through the
    ``moderation.commands`` entry points (as packages add ``flask`` commands): ``decisions``
    (decisionlog), ``calibrate`` (calibration), ``serve`` (service). The core imports none of
    them; each is imported when it is invoked, so that ``moderation score`` or ``moderation
    --help`` do not import Flask or SQLAlchemy."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_entry_points()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        own = super().get_command(ctx, cmd_name)  # policy: contributions go to it
        if own is not None:
            return own
        entry = _entry_points().get(cmd_name)
        return entry.load() if entry is not None else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click lists commands, with the help of a contributed command read from its
        module's source rather than by importing its package."""
        entries = _entry_points()
        commands: list[tuple[str, click.Command]] = []
        for name in self.list_commands(ctx):
            found = super().get_command(ctx, name)
            if found is None:
                help = _docstring(entries[name])
                found = (click.Command(name, help=help) if help is not None
                         else self.get_command(ctx, name))
            if found is not None and not found.hidden:
                commands.append((name, found))
        if commands:
            limit = formatter.width - 6 - max(len(name) for name, _ in commands)
            with formatter.section("Commands"):
                formatter.write_dl([(name, c.get_short_help_str(limit)) for name, c in commands])


def _docstring(entry: EntryPoint) -> str | None:
    """The docstring of the function an entry point names, from its module's source, without
    importing the module (and so its package); None when it cannot be read so."""
    import ast
    import importlib.util

    top, _, inner = entry.module.partition(".")
    found = importlib.util.find_spec(top)  # a top-level name: found, not imported
    if found is None or not found.submodule_search_locations:
        return None
    base = Path(next(iter(found.submodule_search_locations)), *inner.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                return None
            return next((ast.get_docstring(node) for node in tree.body
                         if isinstance(node, ast.FunctionDef) and node.name == entry.attr), None)
    return None


class ContributedGroup(click.Group):
    """A group of the core's to which another package adds subcommands: those of the group
    its ``moderation.commands`` entry point of the same name contributes (``policy dry-run``
    and ``policy diff``, from decisionlog), imported only when one of them is asked for."""

    def _contributed(self) -> click.Group | None:
        entry = _entry_points().get(self.name or "")
        group = entry.load() if entry is not None else None
        return group if isinstance(group, click.Group) else None

    def list_commands(self, ctx: click.Context) -> list[str]:
        contributed = self._contributed()
        theirs = contributed.list_commands(ctx) if contributed is not None else []
        return sorted({*super().list_commands(ctx), *theirs})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        own = super().get_command(ctx, cmd_name)
        if own is not None:
            return own
        contributed = self._contributed()
        return contributed.get_command(ctx, cmd_name) if contributed is not None else None


@click.group(cls=PackageCommands)
@click.version_option(package_name="moderation")
def main() -> None:
    """Zero-shot image moderation with CLIP and YAML policies."""


@main.group(cls=ContributedGroup)
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
    calibrated = sum(c.threshold.provenance.source == "calibrated"
                     for c in p.categories.values())
    fitted = [cid for cid, c in p.categories.items() if c.probability is not None]
    click.echo(
        f"{path}: OK: policy {p.name!r} version {p.version}, {len(p.categories)} categories, "
        f"{n_terms} terms, {n_exceptions} exceptions, model {p.model.name}/{p.model.pretrained}, "
        f"{calibrated} of {len(p.categories)} thresholds calibrated, {len(fitted)} with a "
        "fitted probability"
    )
    misskey = p.integrations.misskey if p.integrations is not None else None
    if misskey is not None:
        unfitted = sorted({cid for cids in misskey.classes.values() for cid in cids
                           if cid not in fitted})
        classes = "; ".join(f"{name} = the largest of {', '.join(cids)}"
                            for name, cids in misskey.classes.items())
        rest = f"; {misskey.rest} = 1 - the largest" if misskey.rest else ""
        click.echo(f"misskey: {classes}{rest}"
                   + (f" (NOT READY: no fitted probability for {', '.join(unfitted)}: "
                      "moderation calibrate --probabilities isotonic)" if unfitted else ""))
        if "nsfw" not in misskey.classes or misskey.rest != "safe":
            click.echo("  note: Misskey's sensitive-media detection (2026) reads the classes "
                       "nsfw and safe, each once (set classes: {nsfw: [...]} and rest: safe); "
                       "other names suit only a Misskey reading nsfwjs's classes (Porn, Hentai, "
                       "Sexy, Neutral, Drawing)")
    grid = p.crop_grid
    if grid is not None:
        takes = [cid for cid in p.categories if p.uses_crops(cid)]
        click.echo(
            f"views: each frame whole and a {grid} grid of crops (overlap {grid.overlap:g}, "
            f"none for images whose crops would be under {grid.min_side} px): "
            f"{p.views_cost()} encodings per frame instead of 1, for an image large enough "
            "to cut"
        )
        for cid in p.categories:
            cost = p.views_cost(cid)
            click.echo(f"  {cid}: " + (f"{cost} views per frame (the frame and its crops)"
                                       if cid in takes else "1 view per frame (no crops)"))


@main.command()
@click.argument("images", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@model_options
def score(images: tuple[Path, ...], policy_path: Path, spec: EncoderSpec) -> None:
    """Moderate IMAGES: one JSON object per image on stdout.

    Exits 1 if any image could not be read (its line carries the error); 2, before the model
    is loaded, if a path does not exist.
    """
    moderator = load_moderator(policy_path, spec)
    results = moderator.moderate(list(images), ids=[str(p) for p in images])
    for result in results:
        click.echo(json.dumps(result.to_dict()))
    if not all(r.ok for r in results):
        sys.exit(1)


def run_scan(moderator: Any, files: list[Path], out: Path, batch_size: int,
             on_batch: Callable[[int], Any] = lambda n: None) -> Counter[str]:
    """Moderate ``files`` in batches into ``out`` (JSON lines, or a Parquet folder) with
    ``moderator``: the local driver of :mod:`moderation.scan`. Returns the count of each
    action (and ``error``)."""
    return _scan_locally(moderator, [(str(p), str(p)) for p in files], out, batch_size,
                         on_batch)


def _scan_locally(moderator: Any, inputs: list[tuple[str, str]], out: Path, batch_size: int,
                  on_batch: Callable[[int], Any], sink: Any = None) -> Counter[str]:
    """``inputs`` ((id, path) pairs) through the local driver into ``out``, and into ``sink``
    (the decision log) when given."""
    from .scan import ScanMapper, ScanSpec, Writer, run_local

    writer = Writer(out)
    try:
        return run_local(ScanMapper(ScanSpec(""), moderator), inputs,
                         _recording(writer, sink), batch_size, on_batch)
    finally:
        writer.close()


@main.command()
@click.argument("source")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="A .jsonl file (one JSON line per input, as 'score' prints them), else a folder of "
         "Parquet files (one row per input). Inputs already in it are skipped.",
)
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="ray: a Ray Data pipeline (pip install "
                                      "'moderation[ray]'), on a cluster with --address.")
@click.option("--address", help="--engine ray: the cluster (auto, ray://host:10001); "
                                "default: a local Ray instance.")
@click.option("--actors", type=click.IntRange(1), help="--engine ray: model replicas (each "
                                                       "loads the model once); default 1.")
@click.option("--actor-cpus", type=click.IntRange(1), default=1, show_default=True,
              help="--engine ray: CPUs each actor reserves (its forward pass and decoding).")
@click.option("--actor-gpus", type=click.FloatRange(0), default=0, show_default=True,
              help="--engine ray: GPUs each actor reserves (with --device cuda).")
@click.option("--record", is_flag=True, help="Also write the decisions, with their frame "
                                             "embeddings, into the decision log.")
@click.option("--database-url", help="--record: the decision log (default: "
                                     "MODERATION_DATABASE_URL, else the local SQLite log).")
@model_options
def scan(source: str, out: Path, engine: str, address: str | None, actors: int | None,
         actor_cpus: int, actor_gpus: float, record: bool, database_url: str | None,
         policy_path: Path, spec: EncoderSpec) -> None:
    """Moderate every input of SOURCE, in batches: a folder (recursive), a manifest (.csv or
    .parquet with a 'path' column and an optional 'id'), or an object-store prefix
    (s3://bucket/prefix, gs://…).

    A file that cannot be read becomes an error row and the scan goes on; the scan then exits
    1 and says how many failed. Running the same scan again skips the inputs already in --out.
    """
    from .scan import ScanSpec, list_inputs, require_writable, written_ids

    if engine == "local" and (address or actors):
        raise click.UsageError("--address and --actors go with --engine ray")
    try:  # fail before the model is loaded, not after (and before --out is created)
        inputs = list_inputs(source)
        require_writable(out)
    except (ModerationError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="SOURCE or --out") from e
    done = written_ids(out)
    todo = [(i, p) for i, p in inputs if i not in done]
    click.echo(f"{len(todo)} inputs to moderate in {source} ({len(done)} already in {out})",
               err=True)
    if not todo:
        return
    sink = _record_sink(database_url) if record else None
    # checked here, loudly, before any worker; with Ray, on the driver's CPU (its actors may
    # have GPUs the driver lacks)
    moderator = load_moderator(policy_path,
                               spec if engine == "local" else replace(spec, device="cpu"))
    if engine == "ray":
        from .scan_ray import ray_scan

        try:
            counts = ray_scan(ScanSpec(str(policy_path.resolve()), spec), todo, out,
                              address=address, actors=actors or 1,
                              sink=sink, actor_cpus=actor_cpus, actor_gpus=actor_gpus)
        except ModerationError as e:
            raise click.ClickException(str(e)) from e
    else:
        from tqdm import tqdm

        with tqdm(total=len(todo), unit="img", file=sys.stderr) as progress:
            counts = _scan_locally(moderator, todo, out, spec.batch_size, progress.update,
                                   sink)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    click.echo(f"done: {summary}; results in {out}"
               + (f"; {sum(counts.values())} recorded in the decision log"
                  if sink is not None else ""), err=True)
    if counts["error"]:
        click.secho(f"{counts['error']} of {len(todo)} inputs could not be moderated (their "
                    f"rows in {out} say why)", fg="red", err=True)
        sys.exit(1)


def _record_sink(database_url: str | None) -> Any:
    """The decision log's sink for scan results: the 'log' entry of the
    ``moderation.sinks`` entry points (the core never imports the decision log)."""
    from importlib.metadata import entry_points

    found = entry_points(group="moderation.sinks", name="log")
    if not found:
        raise click.ClickException("--record needs the decision log package (pip install -e .)")
    return next(iter(found)).load()(database_url or os.environ.get("MODERATION_DATABASE_URL"))


class _recording:  # noqa: N801  # a writer that also records
    def __init__(self, writer: Any, sink: Any) -> None:
        self.writer, self.sink = writer, sink

    def write(self, rows: dict[str, list[Any]]) -> None:
        if self.sink is not None:
            self.sink.write(rows)
        self.writer.write(rows)


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

    from .scan import _files_under

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
                 policy_path: Path, spec: EncoderSpec) -> None:
    """Export the policy's model (or --model/--pretrained) to ONNX: both towers, the
    tokenizer, and model.json (source identity and weights checksum, preprocessing,
    tokenisation, precision). Needs torch; serving the result does not (--backend onnx
    --pretrained OUT)."""
    from .errors import ModelError

    if (out / "model.json").exists():
        raise click.ClickException(f"{out} already holds an exported model; choose another "
                                   "--out or remove it")
    if spec.backend == "onnx":
        raise click.UsageError("export reads a torch model: leave out --backend onnx")
    images = _images_in(images_folder) if images_folder else sample_images()
    moderator = load_moderator(policy_path, replace(spec, device="cpu", backend="torch"))
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


if __name__ == "__main__":
    main()


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--url", default="http://127.0.0.1:8000", show_default=True,
              help="The moderation service (its POST /v1/moderate decides and records).")
@click.option("--api-key", envvar="MODERATION_API_KEY", default=None,
              help="A key of MODERATION_API_KEYS, when the service has them "
                   "(env MODERATION_API_KEY).")
@click.option("--reject", default="block", show_default=True,
              help="Comma-separated actions that reject the file.")
@click.option("--review", type=click.Choice(["accept", "reject"]), default="accept",
              show_default=True, help="What a review action does.")
@click.option("--fail-mode", type=click.Choice(["open", "closed"]), default="closed",
              show_default=True, help="When the service cannot decide: exit 0 (open) or 2.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=3600), default=30.0,
              show_default=True, help="Seconds for the whole check (a long video: until its "
                                      "job is done).")
@click.option("--id", "client_id", default="check", show_default=True,
              help="The client id the decision is recorded with (such as the file's mxc:// "
                   "URI).")
def check(file: Path, url: str, api_key: str | None, reject: str, review: str,
          fail_mode: str, timeout: float, client_id: str) -> None:
    """Check one FILE through the service, for scanners that run a command per file
    (matrix-content-scanner): exit 0 allowed, 1 rejected, 2 could not decide (with
    --fail-mode open, exit 0 instead); one line on stdout saying why. A file the service's
    decoder refuses is rejected (a decision, not a failure)."""
    from .client import ModerationClient
    from .integrations import IntegrationPolicy

    try:
        policy = IntegrationPolicy.parse(reject, review, fail_mode)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    try:
        data = file.read_bytes()
    except OSError as e:
        click.echo(f"cannot read {file}: {e.strerror or e}")
        sys.exit(2)
    client = ModerationClient(url, api_key, timeout, policy)
    checked = client.check(data, client_id=client_id, filename=file.name)
    click.echo(checked.reason)
    sys.exit(0 if checked.accept else (2 if checked.failed else 1))
