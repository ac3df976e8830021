"""``moderation decisions …`` (export, purge and replay the decision log) and the policy lab's
``moderation policy dry-run`` and ``moderation policy diff``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from moderation import ModerationError
from moderation.backends import EncoderSpec
from moderation.command import load_moderator, weights_options


@click.group()
def decisions() -> None:
    """The decision log: search it, export it, re-score it, purge old decisions."""


_database_option = click.option(
    "--database-url",
    envvar="MODERATION_DATABASE_URL",
    help="sqlite:///path or postgresql://… ($MODERATION_DATABASE_URL; default: the service's "
    "default SQLite file).",
)


def default_database_url() -> str:
    from .database import default_database_url as default

    return default()


def _store(database_url: str | None) -> Any:
    from .database import SchemaError
    from .store import DecisionStore

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
    from .database import SchemaError, default_database_url, migrate

    url = database_url or default_database_url()
    try:
        before, after = migrate(url, revision)
    except (ValueError, SchemaError) as e:
        raise click.ClickException(str(e)) from e
    except Exception as e:  # alembic: an unknown revision
        raise click.ClickException(f"cannot migrate to {revision!r}: {e}") from e
    click.echo(f"decision log schema: {before or 'none'} -> {after}")


def _time_option(value: str | None) -> float | None:
    from .windows import parse_time

    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


@decisions.command("export")
@click.option("--since", help="Unix seconds, ISO 8601, or an age (24h, 7d).")
@click.option("--until", help="Same forms as --since.")
@click.option("--rescore", "run_id", metavar="RUN_ID",
              help="Export a re-score run's decisions (moderation decisions rescore) instead: "
                   "each decision as the run's policy decides it; JSON lines also give the "
                   "action originally logged.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True)
@click.option("--out", type=click.File("w", encoding="utf-8"), default="-",
              help="Output file (default: standard output).")
@_database_option
def decisions_export(since: str | None, until: str | None, run_id: str | None, fmt: str,
                     out: Any, database_url: str | None) -> None:
    """Write recorded decisions, oldest first, for offline analysis."""
    import csv

    from .records import CSV_COLUMNS

    store = _store(database_url)
    if run_id is not None:
        from .rescore import export_rescore, rescore_runs_of

        if not rescore_runs_of(store, run_id):
            runs = ", ".join(r.id for r in rescore_runs_of(store, limit=5)) or "(none)"
            raise click.ClickException(f"no re-score run {run_id!r}; the latest: {runs}")
        rescored = export_rescore(store, run_id)
        if fmt == "jsonl":
            for record, original in rescored:
                out.write(json.dumps({**record.view(), "original_action": original}) + "\n")
            return
        records: Any = (record for record, _ in rescored)
    else:
        records = store.export(since=_time_option(since), until=_time_option(until))
    if fmt == "jsonl":
        for record in records:
            out.write(json.dumps(record.view()) + "\n")
        return
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for record in records:
        writer.writerow(record.csv_row())


@decisions.command("search")
@click.argument("text", required=False)
@click.option("--like", metavar="DECISION_ID",
              help="Search with a stored decision's frames (image → image; no model loaded).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Search with an image file, decoded and encoded as an upload.")
@click.option("--raw", is_flag=True,
              help="Encode TEXT as it is, not through the policy's prompt templates.")
@click.option("--policy", "policy_spec", metavar="VERSION|FILE",
              help="Whose templates and model encode TEXT or --image (default: the policy "
                   "in force, the log's latest activation).")
@click.option("--since", help="Unix seconds, ISO 8601, or an age (24h, 7d).")
@click.option("--until", help="Same forms as --since.")
@click.option("--action", type=click.Choice(["allow", "flag", "review", "block"]))
@click.option("--category", help="Only decisions where this category fired.")
@click.option("--policy-version", help="Only decisions made under this policy version.")
@click.option("--client-id", help="Only decisions of this client id.")
@click.option("--flagged/--not-flagged", default=None,
              help="Only flagged (flag, review, block) decisions, or only the others.")
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(0, 9_999), default=0, show_default=True)
@click.option("--min-similarity", type=click.FloatRange(-1, 1),
              help="Leave out hits below this cosine.")
@click.option("--ef-search", type=click.IntRange(1, 1000), default=100, show_default=True,
              envvar="MODERATION_SEARCH_EF_SEARCH",
              help="pgvector: candidates per search ($MODERATION_SEARCH_EF_SEARCH).")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "csv"]),
              default="table", show_default=True)
@click.option("--out", type=click.File("w", encoding="utf-8"), default="-",
              help="Output file (default: standard output).")
@_database_option
@weights_options
def decisions_search(text: str | None, like: str | None, image: Path | None, raw: bool,
                     policy_spec: str | None, since: str | None, until: str | None,
                     action: str | None, category: str | None, policy_version: str | None,
                     client_id: str | None, flagged: bool | None, limit: int, offset: int,
                     min_similarity: float | None, ef_search: int, fmt: str, out: Any,
                     database_url: str | None, spec: EncoderSpec) -> None:
    """The stored decisions most like TEXT (text → image), a stored decision (--like) or an
    image file (--image), best first, one per decision (its best frame). Nothing is recorded;
    ids are included, for a pipeline of your own to act on (--format jsonl or csv)."""
    from .search import SearchFilters, frames_like, index_for, search, write_csv

    if sum(x is not None for x in (text, like, image)) != 1:
        raise click.UsageError("give one query: TEXT, --like DECISION_ID or --image FILE")
    if offset + limit > 10_000:
        raise click.BadParameter("offset + limit must be at most 10000", param_hint="--offset")
    window = _time_option(since), _time_option(until)
    url = database_url or default_database_url()
    store = _store(url)
    exclude: tuple[str, ...] = ()
    if like is not None:
        try:
            model, queries = frames_like(store, like)
        except LookupError as e:
            raise click.ClickException(str(e)) from e
        exclude = (like,)
    else:
        from moderation import ImageError

        from .policies import SharedEmbeddingCache

        policy, _ = (_stored_or_file(policy_spec, url, Path.cwd()) if policy_spec
                     else _in_force(url, Path.cwd(), "give --policy VERSION or --policy FILE"))
        moderator = load_moderator(
            policy, spec, cache=SharedEmbeddingCache.with_folder(url, spec.cache_dir))
        model = moderator.encoder.identity
        if text is not None:
            queries = moderator.embed_text(text, raw=raw)
        else:
            assert image is not None
            try:
                queries = moderator.embed_image(image.read_bytes())
            except ImageError as e:
                raise click.ClickException(f"{image}: {e.message}") from e
    filters = SearchFilters(
        since=window[0], until=window[1], action=action, category=category,
        policy_version=policy_version, client_id=client_id, flagged=flagged, exclude=exclude,
    )
    page = search(store, queries, model=model, filters=filters, limit=limit, offset=offset,
                  min_similarity=min_similarity, index=index_for(store, ef_search=ef_search))
    if fmt == "jsonl":
        for hit in page.hits:
            out.write(hit.model_dump_json() + "\n")
    elif fmt == "csv":
        write_csv(page.hits, out)
    else:
        out.write(render_hits(page) + "\n")


def render_hits(page: Any) -> str:
    """Search hits as a table for a terminal."""
    if not page.hits:
        return f"no decisions of model {page.model} match ({page.index} search)"
    lines = [f"{'similarity':>10}  {'decision':<32}  {'frame':>5}  {'time':<20}  "
             f"{'action':<6}  client id / triggered (top terms)"]
    for h in page.hits:
        terms = "; ".join(f"{c} ({', '.join(t)})" for c, t in h.top_terms.items())
        lines.append(f"{h.similarity:>10.4f}  {h.decision_id:<32}  {h.frame:>5}  "
                     f"{_when(h.created_at, ''):<20}  {h.action:<6}  {h.client_id or '-'}"
                     + (f"  {terms}" if terms else ""))
    more = (f"; more from --offset {page.next_offset}" if page.next_offset is not None else "")
    lines.append(f"{len(page.hits)} hits ({page.index} search, model {page.model}){more}")
    return "\n".join(lines)


@decisions.command("rescore")
@click.option("--policy", "policy_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The policy to decide the stored decisions with.")
@click.option("--since", required=True,
              help="Start of the window: unix seconds, ISO 8601, or an age (30d).")
@click.option("--until", help="End of the window (default: now).")
@_database_option
@weights_options
def decisions_rescore(policy_path: Path, since: str, until: str | None,
                      database_url: str | None, spec: EncoderSpec) -> None:
    """Record what each stored decision of the window would get under --policy, in a re-score
    run of its own (the decisions themselves are not modified); export it with
    `moderation decisions export --rescore RUN_ID`."""
    from .policies import SharedEmbeddingCache
    from .rescore import rescore

    url = database_url or default_database_url()
    store = _store(url)
    window = _time_option(since), _time_option(until)
    moderator = load_moderator(
        policy_path, spec, cache=SharedEmbeddingCache.with_folder(url, spec.cache_dir))
    try:
        run = rescore(store, moderator.scorer(),
                      policy_text=policy_path.read_bytes().decode("utf-8"),
                      policy_source=policy_path.name, since=window[0], until=window[1])
    except ModerationError as e:
        raise click.ClickException(str(e)) from e
    click.echo(
        f"re-score run {run.id}: {run.decisions} decisions decided again under policy "
        f"{run.policy_name} {run.policy_version}; {run.changed} get another action than the "
        f"one logged; {run.left_out} left out (errors, other models, no stored embedding)\n"
        f"export it: moderation decisions export --rescore {run.id}"
    )


@decisions.command("rescores")
@_database_option
def decisions_rescores(database_url: str | None) -> None:
    """List re-score runs, newest first."""
    from .rescore import rescore_runs_of

    for run in rescore_runs_of(_store(database_url)):
        state = "finished" if run.finished_at else "unfinished"
        click.echo(
            f"{run.id}  {_when(run.created_at, '')}  {run.policy_name} {run.policy_version} "
            f"({run.policy_source})  window {_when(run.since, 'the beginning')} to "
            f"{_when(run.until, 'then')}  {run.decisions} decisions, {run.changed} changed, "
            f"{run.left_out} left out  {state}"
        )


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


@decisions.command("compact")
@_database_option
def decisions_compact(database_url: str | None) -> None:
    """Merge the small frame blocks written with decisions into blocks for scans (the
    service does it in the background; a log filled by `moderation scan` or a stopped
    service can be compacted here). Safe while services write to the log."""
    import time

    from .blocks import small_blocks

    store = _store(database_url)
    before = sum(small_blocks(store.engine).values())
    started = time.perf_counter()
    moved = store.compact()
    after = sum(small_blocks(store.engine).values())
    click.echo(f"merged {moved} decisions' frames: small blocks {before} -> {after} "
               f"({time.perf_counter() - started:.1f} s)")


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
    from .recorder import DeadLetters, default_dead_letter_path, replay_dead_letters

    store = _store(database_url)
    dead = DeadLetters(path or default_dead_letter_path(store.url))
    written, present, failing = replay_dead_letters(store, dead)
    click.echo(f"{dead.path}: {written} written, {present} already in the log, "
               f"{failing} still failing")
    if failing:
        sys.exit(1)


# --- the policy lab: `moderation policy dry-run` and `moderation policy diff` ------------


@click.group()
def policy() -> None:
    """Work with policy files."""


def _when(t: float | None, default: str) -> str:
    import datetime as dt

    if t is None:
        return default
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _stored_or_file(spec: str, database_url: str | None, base_dir: Path) -> tuple[Any, str]:
    """A policy file, or a version whose text the log keeps: (policy, where it came from)."""
    from moderation import PolicyError
    from moderation.policy import load_policy

    from .lab import UnknownPolicyVersion, stored_policy
    from .policies import PolicyLog

    try:
        if Path(spec).is_file():
            return load_policy(spec), f"file {spec}"
        log = PolicyLog(database_url or default_database_url())
        try:
            return stored_policy(log, spec, base_dir=base_dir), f"stored version {spec}"
        except UnknownPolicyVersion:
            recent = ", ".join(a.version for a in log.history(limit=5)) or "(none)"
            raise click.ClickException(
                f"{spec!r} is neither a policy file nor a policy version the decision log "
                f"has; its latest versions: {recent}"
            ) from None
    except PolicyError as e:
        shown = str(e)  # a stored version's faults are not in its message
        raise click.ClickException("\n".join(
            [shown, *(f"  - {f}" for f in e.faults if f not in shown)])) from e


def _in_force(database_url: str | None, base_dir: Path,
              instead: str = "give the policy to compare with, --against VERSION or "
                             "--against FILE") -> tuple[Any, str]:
    """The policy of the log's latest activation (``instead``: what to do without one)."""
    from .policies import PolicyLog

    latest = PolicyLog(database_url or default_database_url()).latest()
    if latest is None:
        raise click.ClickException(
            "the decision log has no active policy (the service records one when it starts): "
            + instead
        )
    found, _ = _stored_or_file(latest.version, database_url, base_dir)
    return found, f"active (activation {latest.id}, {latest.reason} on {latest.host})"


@policy.command("dry-run")
@click.argument("proposed", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--since", default="7d", show_default=True,
              help="Start of the window: unix seconds, ISO 8601, or an age (24h, 7d).")
@click.option("--until", help="End of the window (default: now); same forms as --since.")
@click.option("--against", metavar="VERSION|FILE",
              help="Compare with this stored policy version or file (default: the policy in "
                   "force, the log's latest activation).")
@click.option("--limit", type=click.IntRange(0, 10_000), default=20, show_default=True,
              help="How many changed decisions to show, most significant first.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@_database_option
@weights_options
def policy_dry_run(proposed: Path, since: str, until: str | None, against: str | None,
                   limit: int, fmt: str, database_url: str | None, spec: EncoderSpec) -> None:
    """What PROPOSED would decide for the stored decisions of a window, next to the policy in
    force: counts per category and action, the changed decisions, and the policies' diff.

    Both policies re-decide the stored frame embeddings (nothing is compared with the logged
    actions); prompts not in the text-embedding cache (the folder, then the log's) are
    encoded with PROPOSED's model for this run only. Nothing is recorded: a policy's prompts
    enter the shared cache when it is activated.
    """
    from moderation.prompts import OverlayCache

    from .lab import dry_run_policy, refuse_other_models
    from .policies import SharedEmbeddingCache

    url = database_url or default_database_url()
    store = _store(url)
    before, before_source = (
        _stored_or_file(against, url, proposed.parent) if against
        else _in_force(url, proposed.parent)
    )
    proposal, _ = _stored_or_file(str(proposed), url, proposed.parent)
    try:  # said before any weights are loaded
        refuse_other_models(before, [(str(proposed), proposal)], base_dir=proposed.parent)
    except ModerationError as e:
        raise click.ClickException(str(e)) from e
    after = load_moderator(
        proposed, spec,
        cache=OverlayCache(SharedEmbeddingCache.with_folder(url, spec.cache_dir)),
    )
    try:
        report = dry_run_policy(
            store, after, proposal, against=before, against_source=before_source,
            proposed_source=f"file {proposed}", since=_time_option(since),
            until=_time_option(until), limit=limit, base_dir=proposed.parent,
        )
    except ModerationError as e:
        raise click.ClickException(str(e)) from e
    if fmt == "json":
        click.echo(report.model_dump_json())
        return
    click.echo(render_dry_run(report))


def render_dry_run(report: Any) -> str:
    """A dry-run report as text for a terminal."""
    lines = [
        f"dry-run of {report.after.source} ({report.after.name} {report.after.version}) "
        f"against {report.before.source} ({report.before.name} {report.before.version})",
        f"model {report.model}; window {_when(report.since, 'the beginning')} to "
        f"{_when(report.until, 'now')}: {report.decisions} decisions re-decided in "
        f"{report.seconds:.2f} s",
    ]
    left = report.left_out
    if left.total:
        reasons = [f"{n} of model {m}" for m, n in left.other_model.items()]
        reasons += [f"{left.errors} errors"] if left.errors else []
        reasons += [f"{left.no_embedding} without a stored embedding"] if left.no_embedding else []
        reasons += [f"{n} with profile {p} (missing from a policy)"
                    for p, n in left.profile_missing.items()]
        lines.append(f"left out: {left.total} ({'; '.join(reasons)})")
    if report.note:
        lines.append(report.note)
    lines += ["", "policy changes:"]
    lines += [f"  - {c.text}{'' if c.decisive else ' (does not change decisions)'}"
              for c in report.diff] or ["  (none: the two policies decide alike)"]

    def side(count: Any) -> str:
        return "-" if count is None else f"{count.flagged} ({count.rate:.2%})"

    lines += ["", f"{'category':<20}{'before':>18}{'after':>18}{'change':>9}"]
    for cid, effect in report.categories.items():
        lines.append(f"{cid:<20}{side(effect.before):>18}{side(effect.after):>18}"
                     f"{effect.change:>+9}")
    lines += ["", f"{'action':<20}{'before':>18}{'after':>18}{'change':>9}"]
    for action, effect in report.actions.items():
        lines.append(
            f"{action:<20}{f'{effect.before} ({effect.rate_before:.2%})':>18}"
            f"{f'{effect.after} ({effect.rate_after:.2%})':>18}{effect.change:>+9}")
    kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in report.changed_by_kind.items()
                      if n)
    lines += ["", f"changed decisions: {report.changed_total}" + (f" ({kinds})" if kinds else "")]
    if report.changed:
        lines.append(f"the {len(report.changed)} most significant:")
    for c in report.changed:
        fired = c.after.triggered or c.before.triggered
        detail = "; ".join(
            f"{cid} score {_score(c.before, cid, 'score')} → {_score(c.after, cid, 'score')}"
            f" (threshold {_score(c.before, cid, 'threshold')} → "
            f"{_score(c.after, cid, 'threshold')})"
            + (f" top terms: {', '.join(t.text for t in c.after.categories[cid].top_terms)}"
               if cid in c.after.categories else "")
            for cid in fired
        )
        lines.append(f"  {_when(c.created_at, '')}  {c.decision_id}  {c.client_id or '-'}  "
                     f"{c.before.action} → {c.after.action}  {detail}")
    return "\n".join(lines)


def _score(outcome: Any, cid: str, field: str) -> str:
    found = outcome.categories.get(cid)
    return "-" if found is None else f"{getattr(found, field):.3f}"


@policy.command("diff")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@_database_option
def policy_diff(a: str, b: str, fmt: str, database_url: str | None) -> None:
    """What differs from policy A to policy B (each a file or a stored version), in plain
    words."""
    from moderation.diff import diff_policies

    first, _ = _stored_or_file(a, database_url, Path(a).parent)
    second, _ = _stored_or_file(b, database_url, Path(b).parent)
    changes = diff_policies(first, second)
    if fmt == "json":
        click.echo(json.dumps([c.to_dict() for c in changes]))
        return
    for c in changes:
        click.echo(f"{c.text}{'' if c.decisive else ' (does not change decisions)'}")
    if not changes:
        click.echo("no differences")
