"""``moderation decisions …``: export, purge and replay the decision log."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click


@click.group()
def decisions() -> None:
    """The decision log: export it, purge old decisions."""


_database_option = click.option(
    "--database-url",
    envvar="MODERATION_DATABASE_URL",
    help="sqlite:///path or postgresql://… ($MODERATION_DATABASE_URL; default: the service's "
    "default SQLite file).",
)


def _store(database_url: str | None) -> Any:
    from .database import SchemaError
    from .store import DecisionStore, default_database_url

    try:
        return DecisionStore(database_url or default_database_url())
    except (ValueError, SchemaError) as e:
        raise click.ClickException(str(e)) from e


@decisions.command("migrate")
@click.option("--revision", default="head", show_default=True,
              help="The schema revision to reach (an older one migrates down, losing what "
                   "it cannot hold).")
@_database_option
def decisions_migrate(revision: str, database_url: str | None) -> None:
    """Bring the log's schema up to date (the service and the other commands do it on start;
    this does it alone, e.g. before a rolling upgrade of replicas)."""
    from .database import SchemaError, migrate
    from .store import default_database_url

    url = database_url or default_database_url()
    try:
        before, after = migrate(url, revision)
    except (ValueError, SchemaError) as e:
        raise click.ClickException(str(e)) from e
    except Exception as e:  # alembic: an unknown revision
        raise click.ClickException(f"cannot migrate to {revision!r}: {e}") from e
    click.echo(f"decision log schema: {before or 'none'} -> {after}")


def _time_option(value: str | None) -> float | None:
    from .store import parse_time

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

    from .records import CSV_COLUMNS

    store = _store(database_url)
    records = store.export(since=_time_option(since), until=_time_option(until))
    if fmt == "jsonl":
        for record in records:
            out.write(json.dumps(record.view()) + "\n")
        return
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for record in records:
        writer.writerow(record.csv_row())


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
    from .store import DeadLetters, default_dead_letter_path, replay_dead_letters

    store = _store(database_url)
    dead = DeadLetters(path or default_dead_letter_path(store.url))
    written, present, failing = replay_dead_letters(store, dead)
    click.echo(f"{dead.path}: {written} written, {present} already in the log, "
               f"{failing} still failing")
    if failing:
        sys.exit(1)
