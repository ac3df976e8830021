"""``moderation banks …``: known-image hash banks in the decision log (list, create, update,
delete; add and remove hashes, from hex or from image files; import and export them)."""

from __future__ import annotations

import datetime as dt
import getpass
import json
from pathlib import Path
from typing import Any

import click

from moderation import ModerationError

_database_option = click.option(
    "--database-url",
    envvar="MODERATION_DATABASE_URL",
    help="sqlite:///path or postgresql://… ($MODERATION_DATABASE_URL; default: the service's "
    "default SQLite file).",
)
_FORMATS = ("csv", "jsonl")


def _store(database_url: str | None) -> Any:
    from .banks import BankStore
    from .database import SchemaError, default_database_url

    try:
        return BankStore(database_url or default_database_url())
    except (ValueError, SchemaError) as e:
        raise click.ClickException(str(e)) from e


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (a container)
        return "cli"


def _refused(e: ModerationError) -> click.ClickException:
    """A store's error as the command's: its message, then any faults it does not show."""
    faults = [f for f in getattr(e, "faults", []) if f not in e.message]
    return click.ClickException("\n".join([e.message, *(f"  {f}" for f in faults)]))


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@click.group()
def banks() -> None:
    """Known-image hash banks: PDQ and SHA-256 hashes whose matches allow, flag, review or
    block an upload whatever the classifier says (every worker and replica follows a change
    within about a second)."""


@banks.command("list")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@_database_option
def banks_list(fmt: str, database_url: str | None) -> None:
    """Every bank, with its action, distance, minimum quality and how many hashes it has."""
    found = _store(database_url).banks()
    if fmt == "json":
        click.echo(json.dumps([b.to_dict() for b in found]))
        return
    if not found:
        click.echo("no banks (moderation banks create NAME --action ACTION)")
        return
    click.echo(f"{'bank':<24}{'action':<8}{'distance':>9}{'min_quality':>12}{'hashes':>10}"
               f"  updated")
    for b in found:
        click.echo(f"{b.name:<24}{b.action:<8}{b.distance:>9}{b.min_quality:>12}"
                   f"{b.hashes:>10}  {_when(b.updated_at)}"
                   + (f"  {b.description}" if b.description else ""))


@banks.command("create")
@click.argument("name")
@click.option("--action", required=True, type=click.Choice(["allow", "flag", "review", "block"]),
              help="What a match does: allow clears the classifier (known false positives); "
                   "flag, review and block join its action, the most severe winning.")
@click.option("--distance", type=int, default=31, show_default=True,
              help="The most bits (0-128) an upload's PDQ may differ in and match.")
@click.option("--min-quality", type=int, default=50, show_default=True,
              help="The least PDQ quality (0-100) of an upload's frame to match on.")
@click.option("--description")
@_database_option
def banks_create(name: str, action: str, distance: int, min_quality: int,
                 description: str | None, database_url: str | None) -> None:
    """Create an empty bank NAME (lower-case letters, digits, '_', '.', '-')."""
    try:
        bank = _store(database_url).create_bank(name, action, distance, min_quality,
                                                description)
    except ModerationError as e:
        raise _refused(e) from e
    click.echo(f"bank {bank.name} created: {bank.action}, distance {bank.distance}, "
               f"min_quality {bank.min_quality}")


@banks.command("update")
@click.argument("name")
@click.option("--action", type=click.Choice(["allow", "flag", "review", "block"]))
@click.option("--distance", type=int)
@click.option("--min-quality", type=int)
@click.option("--description", help="The new description ('' clears it).")
@_database_option
def banks_update(name: str, action: str | None, distance: int | None,
                 min_quality: int | None, description: str | None,
                 database_url: str | None) -> None:
    """Change a bank's settings."""
    changes = {k: v for k, v in (("action", action), ("distance", distance),
                                 ("min_quality", min_quality),
                                 ("description", description)) if v is not None}
    if not changes:
        raise click.UsageError("nothing to change: give --action, --distance, --min-quality "
                               "or --description")
    try:
        bank = _store(database_url).update_bank(name, **changes)
    except ModerationError as e:
        raise _refused(e) from e
    click.echo(f"bank {bank.name}: {bank.action}, distance {bank.distance}, min_quality "
               f"{bank.min_quality}, {bank.hashes} hashes")


@banks.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask.")
@_database_option
def banks_delete(name: str, yes: bool, database_url: str | None) -> None:
    """Delete a bank and every hash in it."""
    store = _store(database_url)
    try:
        bank = store.bank(name)
        if not yes:
            click.confirm(f"delete bank {name} and its {bank.hashes} hashes?", abort=True)
        removed = store.delete_bank(name)
    except ModerationError as e:
        raise _refused(e) from e
    click.echo(f"bank {name} deleted, with its {removed} hashes")


def _hashes_of_file(path: Path, min_quality: int, keep_low_quality: bool,
                    with_sha256: bool, note: str | None, source: str | None) -> list[Any]:
    """The PDQ of each frame of an image file, decoded as the service decodes uploads for
    hashing (upright, before the cut to 2:1, JPEGs drafted at PDQ_MIN_SIDE), and its
    SHA-256 if asked."""
    from moderation.hashing import PDQ_MIN_SIDE, pdq_of
    from moderation.images import decode_image

    from .banks import HashEntry

    decoded = decode_image(path, draft_size=PDQ_MIN_SIDE, hasher=pdq_of,
                           hash_size=PDQ_MIN_SIDE)
    entries = []
    for index, frame in zip(decoded.frame_indices, decoded.hashes, strict=True):
        where = path.name + (f" frame {index}" if decoded.n_frames > 1 else "")
        if frame.quality < min_quality and not keep_low_quality:
            raise click.ClickException(
                f"{where}: PDQ quality {frame.quality} is under the bank's min_quality "
                f"{min_quality}: a featureless picture hashes near many others. Nothing was "
                "added; pass --keep-low-quality to add it anyway")
        entries.append(HashEntry("pdq", frame.pdq, note, source or where))
    if with_sha256 and decoded.sha256 is not None:
        entries.append(HashEntry("sha256", decoded.sha256, note, source or path.name))
    return entries


@banks.command("add")
@click.argument("bank")
@click.argument("hashes", nargs=-1)
@click.option("--kind", type=click.Choice(["pdq", "sha256"]), default="pdq",
              show_default=True, help="The kind of the HASHES given.")
@click.option("--file", "files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An image to hash (PDQ of each frame; repeat for several).")
@click.option("--with-sha256", is_flag=True,
              help="With --file: also add the SHA-256 of each file (exact copies).")
@click.option("--keep-low-quality", is_flag=True,
              help="With --file: add frames whose PDQ quality is under the bank's "
                   "min_quality (refused otherwise).")
@click.option("--note", help="Kept with each hash (shown with a match).")
@click.option("--source", help="Where the hashes came from (default for --file: its name).")
@click.option("--added-by", default=None, help="Who adds them (default: cli:<user>).")
@_database_option
def banks_add(bank: str, hashes: tuple[str, ...], kind: str, files: tuple[Path, ...],
              with_sha256: bool, keep_low_quality: bool, note: str | None,
              source: str | None, added_by: str | None, database_url: str | None) -> None:
    """Add HASHES (hex: PDQ as ThreatExchange and HMA write it, or --kind sha256) and the
    hashes of --file images to BANK. All or nothing: one bad hash adds none."""
    from .banks import HashEntry

    if not hashes and not files:
        raise click.UsageError("nothing to add: give HASHES or --file IMAGE")
    store = _store(database_url)
    try:
        target = store.bank(bank)
        entries = [HashEntry(kind, h, note, source) for h in hashes]
        for path in files:
            entries += _hashes_of_file(path, target.min_quality, keep_low_quality,
                                       with_sha256, note, source)
        added, present = store.add_hashes(bank, entries, added_by or _who())
    except ModerationError as e:
        raise _refused(e) from e
    click.echo(f"bank {bank}: {added} added, {present} already there")


@banks.command("remove")
@click.argument("bank")
@click.argument("hashes", nargs=-1, required=True)
@click.option("--kind", type=click.Choice(["pdq", "sha256"]),
              help="Remove only hashes of this kind (default: either).")
@_database_option
def banks_remove(bank: str, hashes: tuple[str, ...], kind: str | None,
                 database_url: str | None) -> None:
    """Remove HASHES (hex) from BANK."""
    try:
        removed = _store(database_url).remove_hashes(bank, list(hashes), kind)
    except ModerationError as e:
        raise _refused(e) from e
    click.echo(f"bank {bank}: {removed} removed")


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        return fmt
    guessed = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(path.suffix.lower())
    if guessed is None:
        raise click.UsageError(f"cannot tell the format of {path.name} from its name: give "
                               "--format csv or --format jsonl")
    return guessed


@banks.command("import")
@click.argument("bank")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(_FORMATS),
              help="csv (our export's header, HMA's header-less 'hash,…' rows, or "
                   "python-threatexchange's signal CSV) or jsonl (default: from the file "
                   "name).")
@click.option("--added-by", default=None, help="Who adds them (default: cli:<user>).")
@_database_option
def banks_import(bank: str, file: Path, fmt: str | None, added_by: str | None,
                 database_url: str | None) -> None:
    """Import FILE's hashes into BANK, all or nothing: every bad row is named by its line,
    and then nothing is written."""
    fmt = _format_of(file, fmt)
    try:
        text = file.read_bytes().decode("utf-8")  # as written: a note may hold "\r\n"
    except (OSError, UnicodeDecodeError) as e:
        raise click.ClickException(f"cannot read {file} as UTF-8 text: {e}") from e
    store = _store(database_url)
    try:
        read = store.import_csv if fmt == "csv" else store.import_jsonl
        added, present = read(bank, text, added_by or _who())
    except ModerationError as e:
        raise _refused(e) from e
    click.echo(f"bank {bank}: {added} added, {present} already there")


@banks.command("dry-run")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(_FORMATS),
              help="as import reads it (default: from the file name)")
@click.option("--action", type=click.Choice(["allow", "flag", "review", "block"]),
              default="block", show_default=True, help="the bank's action")
@click.option("--distance", type=int, default=31, show_default=True)
@click.option("--min-quality", type=int, default=50, show_default=True)
@click.option("--since", default=None, help="unix seconds, an age (30d) or ISO 8601")
@_database_option
def banks_dry_run(file: Path, fmt: str | None, action: str, distance: int, min_quality: int,
                  since: str | None, database_url: str | None) -> None:
    """What FILE's hashes, as a bank of ACTION, would have done to the stored decisions:
    how many past uploads they match and whose action they would have changed. Writes
    nothing."""
    from .banks import import_dry_run
    from .database import default_database_url
    from .windows import parse_time

    fmt = _format_of(file, fmt)
    try:
        text = file.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise click.ClickException(f"cannot read {file} as UTF-8 text: {e}") from e
    from . import DecisionStore

    engine = DecisionStore(database_url or default_database_url()).engine
    try:
        report = import_dry_run(engine, text, fmt, action=action, distance=distance,
                                min_quality=min_quality,
                                since=parse_time(since) if since else None)
    except (ModerationError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    changes = ", ".join(f"{k} {v}" for k, v in sorted(report.by_change.items())) or "none"
    click.echo(f"{report.hashes} hashes against {report.decisions} stored decisions: "
               f"{report.matched} matched, {report.changed} would change ({changes})")


@banks.command("export")
@click.argument("bank")
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="csv",
              show_default=True)
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (default: standard output).")
@_database_option
def banks_export(bank: str, fmt: str, out: Path | None, database_url: str | None) -> None:
    """Write BANK's hashes, oldest first (importing the file into an empty bank gives the
    same export)."""
    store = _store(database_url)
    try:
        text = store.export_csv(bank) if fmt == "csv" else store.export_jsonl(bank)
    except ModerationError as e:
        raise _refused(e) from e
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8", newline="")
        rows = text.count("\n") - (1 if fmt == "csv" else 0)  # the CSV's header
        click.echo(f"{out}: {rows} hashes of bank {bank}", err=True)
