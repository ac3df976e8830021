"""The policy: the active one (``GET /v1/policy``, ``POST /v1/policy/reload`` (admin)), the
history of activations with each version's text (``GET /v1/policy/versions[/<version>]``,
reader), and the policy lab: ``POST /v1/policy/dry-run`` (admin), ``GET /v1/policy/diff``
(reader), and their pages (``/dashboard/policies``: the history with each activation's
effect; ``/dashboard/lab``: try an edit). A dry-run decides the decision log's stored
embeddings with this server's encoder; nothing is activated or recorded: prompts the
text-embedding cache lacks are encoded (at most ``PolicyLimits.max_new_prompts`` per dry-run)
into the dry-run's memory, never into the cache the replicas share. A dry-run of a large
window (``MODERATION_DRY_RUN_INLINE_MAX_DECISIONS``), or one asked for with ``async=true``,
runs as a job (:mod:`service.jobs`): checked first, then answered 202 (the lab page: its
job's page, ``/dashboard/lab/jobs/<job_id>``)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, redirect, render_template, request, url_for

from decisionlog import DecisionStore
from decisionlog.jobs import Job
from decisionlog.lab import DryRun, dry_run_policy, refuse_other_models, window_of
from decisionlog.lab import stored_policy as read_stored_policy
from moderation import ModelMismatchError, ModerationError, NotFound, PolicyError
from moderation.diff import diff_policies
from moderation.errors import PolicyLimitError
from moderation.policy import Policy, PolicyLimits, excerpt, parse_policy
from moderation.prompts import missing_prompts

from . import pages
from .auth import admin_page_required, reader_page_required
from .contract import Access, Answer, Body, operation, parse_body
from .jobs import Handler, job_or_404, runner
from .pages import page
from .parsing import DryRunRequest, RequestError, load_json, time_field
from .resources import holder, settings, store
from .schemas import (
    DiffQuery,
    DryRunJSON,
    DryRunQuery,
    PolicyActivation,
    PolicyChange,
    PolicyDiff,
    PolicyResponse,
    PolicyVersions,
    PolicyVersionsQuery,
    PolicyVersionText,
    ReloadResponse,
    VersionPath,
)
from .schemas import Job as JobSchema
from .state import PolicyHolder, read_policy_text

__all__ = ["DRY_RUN", "bp", "check_dry_run", "dry_run_handler", "history_entries",
           "run_dry_run", "stored_policy"]

bp = Blueprint("policy", __name__)


#: A policy's YAML text as a body: its bytes (UTF-8).
POLICY_TEXT = {"type": "string", "format": "binary", "description": "policy YAML (UTF-8)"}
#: The media types a proposed policy's YAML text may come as.
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml",
              "text/plain")

bp = Blueprint("policy", __name__)


@operation(bp, "/v1/policy", "GET", operation_id="get_policy", access=Access.API_KEY,
           summary="The active policy, its version and thresholds with provenance",
           answers=(Answer(200, "The active policy", {"application/json": PolicyResponse}),))
def policy() -> Any:
    active = holder().current()
    p = active.policy
    return jsonify(
        name=p.name,
        version=p.version,
        description=p.description,
        model={"spec": p.model.model_dump(mode="json"), "identity": active.encoder.identity},
        profiles=p.profile_names(),
        categories={
            cid: {
                "description": c.description,
                "action": c.action,
                "terms": c.terms,
                "exceptions": c.exceptions,
                "thresholds": {
                    name: p.threshold_for(cid, name).model_dump(mode="json")
                    for name in p.profile_names()
                },
            }
            for cid, c in p.categories.items()
        },
    )

@operation(bp, "/v1/policy/reload", "POST", operation_id="reload_policy", access=Access.ADMIN,
           summary="Read the policy file again and activate it in every worker and replica",
           description="An invalid file answers 422 with every fault; the previous policy "
           "keeps serving.",
           answers=(Answer(200, "The new policy is active",
                           {"application/json": ReloadResponse}),), errors=(404, 422))
def reload() -> Any:
    before = holder().current().policy.version
    active = holder().reload()  # a PolicyError (422, with the faults) keeps the old policy
    return jsonify(ReloadResponse(
        name=active.policy.name,
        version=active.policy.version,
        previous_version=before,
        changed=before != active.policy.version,
    ).model_dump(mode="json"))


def _policies() -> Any:
    found = holder().policies
    if found is None:
        raise RequestError(
            404, "not_found",
            "this server's policy is not kept in the decision log (it was not started from a "
            "policy file)",
        )
    return found

@operation(bp, "/v1/policy/versions", "GET", operation_id="list_policy_versions",
           access=Access.READER, summary="The policy's activations, newest first (the first "
           "is active)", query=PolicyVersionsQuery,
           answers=(Answer(200, "Activations", {"application/json": PolicyVersions}),),
           errors=(404,))
def versions(query: PolicyVersionsQuery) -> Any:
    history = _policies().history(limit=query.limit)
    return jsonify(PolicyVersions(versions=[
        PolicyActivation.model_validate(a, from_attributes=True) for a in history
    ]).model_dump(mode="json"))

@operation(bp, "/v1/policy/versions/<version>", "GET", operation_id="get_policy_version",
           access=Access.READER, summary="The text a policy version was activated with",
           path=VersionPath,
           answers=(Answer(200, "The text: in JSON, or the file itself, byte for byte, when "
                                "asked for (Accept: application/yaml or text/plain)",
                           {"application/json": PolicyVersionText,
                            "application/yaml": {}, "text/plain": {}}),))
def version_text(version: str) -> Any:
    """The text the version was (last) activated with: JSON, or the file itself for a
    client that asks for YAML or plain text (``Accept: application/yaml``)."""
    found = _policies().text(version)
    if found is None:
        raise RequestError(404, "not_found", f"no policy version {version!r} was ever active")
    wanted = request.accept_mimetypes.best_match(
        ["application/json", "application/yaml", "text/yaml", "text/plain"],
        default="application/json",
    )
    if wanted != "application/json":
        return Response(found.text.encode("utf-8"), mimetype=wanted,
                        headers={"X-Policy-Version": found.version})
    return jsonify(PolicyVersionText(
        version=found.version, name=found.name, source=found.source, text=found.text,
        recorded_at=found.created_at,
    ).model_dump(mode="json"))


@operation(bp, "/v1/policy/versions/<version>/file", "GET", operation_id="get_policy_file",
           access=Access.READER, summary="The policy file a version was activated with, byte "
           "for byte", path=VersionPath,
           description="What GET /v1/policy/versions/{version} answers to Accept: "
           "application/yaml, at a path of its own (for clients that read one media type per "
           "answer).",
           answers=(Answer(200, "The policy file", {"application/yaml": {"type": "string"}}),))
def version_file(version: str) -> Any:
    found = _policies().text(version)
    if found is None:
        raise RequestError(404, "not_found", f"no policy version {version!r} was ever active")
    return Response(found.text.encode("utf-8"), mimetype="application/yaml",
                    headers={"X-Policy-Version": found.version})


@operation(bp, "/v1/policy/dry-run", "POST", operation_id="dry_run_policy",
           access=Access.ADMIN, summary="What a proposed policy would decide for past traffic",
           description="Re-decides the stored decisions of the window (their stored frame "
           "embeddings) under the active policy (or `against` a stored version) and under the "
           "proposed one; nothing is activated or recorded. The policy is the YAML body "
           "(options in the query string), or JSON (options in either; the body's win). "
           "With `async=true` (query string), or when the window holds more than "
           "MODERATION_DRY_RUN_INLINE_MAX_DECISIONS decisions, it runs as a job: the policy, "
           "`against` and the model are checked first (the same 4xx as inline), then the "
           "answer is 202 with the job, and a Location header to poll (GET "
           "/v1/jobs/{job_id}).",
           query=DryRunQuery,
           body=Body({"application/yaml": POLICY_TEXT, "text/plain": POLICY_TEXT,
                      "application/json": DryRunJSON}),
           answers=(Answer(200, "Counts before and after, the changed decisions and the "
                                "policies' diff", {"application/json": DryRun}),
                    Answer(202, "Started as a job (queued): poll GET /v1/jobs/{job_id} (the "
                                "Location header) for its progress and result",
                           {"application/json": JobSchema})),
           errors=(404, 422))
def dry_run(query: DryRunQuery) -> Any:
    """What a proposed policy would decide for the stored decisions of a window, next to the
    active policy (or ``against`` a stored version). Nothing is activated or recorded."""
    options: dict[str, Any] = query.model_dump(exclude_unset=True)
    asynchronous = bool(options.pop("async_", False))
    body = request.get_data(cache=False)
    if request.mimetype == "application/json":
        given = parse_body(DryRunJSON, load_json(body))
        options.update(given.model_dump(exclude_unset=True))
        text = given.policy
    elif request.mimetype in YAML_TYPES:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(400, "invalid_policy", f"the policy is not UTF-8 text: {e}") from e
    else:
        raise RequestError(
            415, "unsupported_media_type",
            f"send the proposed policy as application/yaml (or text/plain), or as JSON "
            f"{{\"policy\": \"<yaml>\"}}; got Content-Type {request.mimetype or '(none)'!r}",
        )
    if not text.strip():
        raise RequestError(400, "missing_field", "the proposed policy is empty")
    options.pop("policy", None)
    for name in ("since", "until"):
        if isinstance(options.get(name), float):
            options[name] = repr(options[name])
    if options.get("limit") is None:
        options.pop("limit", None)
    proposal = DryRunRequest(policy=text, **options)
    job = start_dry_run(proposal, always=asynchronous)
    if job is not None:
        answer = jsonify(job.model_dump(mode="json"))
        answer.status_code = 202
        answer.headers["Location"] = url_for("jobs.get_job", job_id=job.id)
        return answer
    report = run_dry_run(holder(), store(), proposal, limits=settings().policy_limits)
    return jsonify(report.model_dump(mode="json"))


@operation(bp, "/v1/policy/diff", "GET", operation_id="diff_policies", access=Access.READER,
           summary="What differs between two stored policy versions, in plain words",
           query=DiffQuery,
           answers=(Answer(200, "The differences, one sentence each",
                           {"application/json": PolicyDiff}),), errors=(404, 422))
def diff(query: DiffQuery) -> Any:
    """What differs from stored version ``from`` to stored version ``to`` (default: the
    active policy), in plain words."""
    _policies()  # 404 unless this server's policy is kept in the log
    before = stored_policy(holder(), query.from_)
    after = (stored_policy(holder(), query.to) if query.to is not None
             else holder().current().policy)
    changes = diff_policies(before, after)
    return jsonify(PolicyDiff(
        from_version=before.version, to_version=after.version,
        changes=[PolicyChange.of(c) for c in changes],
    ).model_dump(mode="json"))


# --- the dry-run ------------------------------------------------------------------------


def _base_dir(holder: PolicyHolder) -> Path | None:
    """Where the server's policy file is: relative checkpoint paths resolve there, and a
    proposed policy's must stay there."""
    return holder.policy_path.parent if holder.policy_path is not None else None


def stored_policy(holder: PolicyHolder, version: str) -> Policy:
    """A version the log keeps, parsed. Raises :class:`~decisionlog.lab.UnknownPolicyVersion`
    (404) when the log never had it, :class:`PolicyError` (422, with the faults) when its
    text no longer validates here (e.g. its checkpoint file is gone)."""
    if holder.policies is None:
        raise NotFound("this server's policy is not kept in the decision log (it was not "
                       "started from a policy file)")
    return read_stored_policy(holder.policies, version, base_dir=_base_dir(holder),
                              limits=holder.limits)


def run_dry_run(holder: PolicyHolder, store: DecisionStore, request: DryRunRequest, *,
                limits: PolicyLimits | None = None,
                progress: Callable[[int, int], None] | None = None) -> DryRun:
    """The dry-run of ``request`` with this server's encoder against the active policy (or
    the stored version ``request.against``): :func:`decisionlog.lab.dry_run_policy`, whose
    domain errors are the answers (422 ``invalid_policy``, ``policy_too_large``,
    ``model_mismatch``; 404 for an unknown ``against``). A checkpoint path in the proposed
    policy must stay inside the folder of the server's policy file; no message shows a path
    as the server resolved it. ``progress(read, total)``: called as the stored decisions are
    read."""
    return dry_run_policy(
        store, holder.current(), request.policy, against=request.against,
        policies=holder.policies, since=time_field("since", request.since),
        until=time_field("until", request.until), limit=request.limit,
        limits=limits or PolicyLimits(), base_dir=_base_dir(holder), progress=progress,
    )


# --- the dry-run as a job ---------------------------------------------------------------

#: The kind of a dry-run's job.
DRY_RUN = "dry-run"


def check_dry_run(holder: PolicyHolder, store: DecisionStore, request: DryRunRequest, *,
                  limits: PolicyLimits) -> None:
    """Raise what the dry-run of ``request`` would refuse, with the same errors, checked
    without running it (no prompt is encoded, no embedding read): the proposed policy
    (valid, under ``limits``, its checkpoint in the policy folder), ``against`` (kept, and
    valid), both policies' model and calibration, the prompts to encode, and a window with
    decisions of this model. What a job is started for then runs, barring the unforeseen.

    (The steps of :func:`decisionlog.lab.dry_run_policy` before its scan, minus encoding.)"""
    current = holder.current()
    base_dir, model = _base_dir(holder), current.encoder.identity
    try:
        proposed = parse_policy(request.policy, source="proposed policy", base_dir=base_dir,
                                limits=limits, confine=True)
    except PolicyLimitError as e:
        raise PolicyLimitError("the proposed policy asks for more than this server allows",
                               faults=e.faults) from e
    except PolicyError as e:
        raise PolicyError("the proposed policy is not valid", faults=e.faults) from e
    before, before_source = current.policy, "active policy"
    if request.against:
        before = stored_policy(holder, request.against)
        before_source = f"stored version {excerpt(request.against)}"
    refuse_other_models(current.policy, [("the proposed policy", proposed),
                                         (before_source, before)],
                        encoder=model, base_dir=base_dir)
    for policy in (proposed, before):
        other = {where: m for where, m in policy.calibrated_models().items()
                 if m not in current.encoder.accepts}
        if other:
            raise ModelMismatchError(
                f"policy {policy.name!r} has thresholds calibrated with another model than "
                f"{model!r}: " + ", ".join(f"{where} (calibrated with {m!r})"
                                                 for where, m in other.items())
                + ". A threshold on a similarity only holds for the model it was fitted on: "
                "use that model, or calibrate again with this one.")
    new = set(missing_prompts(proposed, model, current.cache))
    if before is not current.policy:
        new |= set(missing_prompts(before, model, current.cache))
    if len(new) > limits.max_new_prompts:
        raise PolicyLimitError(
            f"the two policies have {len(new):,} prompts (terms and exceptions × templates) "
            f"that were never encoded with {model}; the limit is {limits.max_new_prompts:,} "
            f"({PolicyLimits.setting('max_new_prompts')}): propose fewer new terms or "
            "templates at once, or activate the policy to encode them all")
    window_of(store, model, time_field("since", request.since),
              time_field("until", request.until))  # a window of another model's decisions


def _unix(t: float | None) -> str | None:
    """A time fixed as unix seconds, as the contract's pattern reads them (no decision was
    made before 1970: an earlier time is the same window as 0)."""
    return None if t is None else f"{max(t, 0.0):.6f}"


def start_dry_run(request: DryRunRequest, *, always: bool) -> Job | None:
    """The dry-run of ``request`` started as a job (checked first: a proposal it would refuse
    is refused now), when ``always`` or when its window holds more than
    ``MODERATION_DRY_RUN_INLINE_MAX_DECISIONS`` decisions of this server's model; ``None``:
    run it here. The job's window is fixed now (an age such as ``7d`` counts from now)."""
    since, until = time_field("since", request.since), time_field("until", request.until)
    if not always:
        model = holder().current().encoder.identity
        n = sum(k for m, error, k in store().window_counts(since, until)
                if m == model and not error)
        if n <= settings().dry_run_inline_max_decisions:
            return None
    check_dry_run(holder(), store(), request, limits=settings().policy_limits)
    fixed = DryRunRequest(policy=request.policy, since=_unix(since), until=_unix(until),
                          against=request.against, limit=request.limit)
    jobs = runner()
    job_id = jobs.jobs.submit(DRY_RUN, asdict(fixed), created_by="admin")
    jobs.wake()
    job = jobs.jobs.get(job_id)
    if job is None:  # deleted at once: only by hand
        raise NotFound(f"job {job_id} was deleted as it was submitted")
    return job


def dry_run_request(stored: dict[str, Any]) -> DryRunRequest:
    """A dry-run job's request, as :func:`start_dry_run` stored it."""
    return DryRunRequest(**{f.name: stored[f.name] for f in fields(DryRunRequest)
                            if f.name in stored})


def dry_run_handler(holder: PolicyHolder, store: DecisionStore, limits: PolicyLimits
                    ) -> Handler:
    """What a worker's :class:`~service.jobs.JobRunner` runs for a dry-run's job."""

    def run(stored: dict[str, Any], progress: Callable[[int, int], None]) -> dict[str, Any]:
        report = run_dry_run(holder, store, dry_run_request(stored), limits=limits,
                             progress=progress)
        return report.model_dump(mode="json")

    return run


# --- the pages --------------------------------------------------------------------------


@pages.bp.get("/dashboard/policies")
@reader_page_required
def history() -> Any:
    return page(render_history(holder(), store()))


@pages.bp.route("/dashboard/lab", methods=["GET", "POST"])
@admin_page_required
def lab() -> Any:
    """GET: the form, with the active policy's text. POST (a plain form; the policy pasted,
    or uploaded as ``policy_file``): the same form with the dry-run's result below it."""
    if request.method == "GET":
        return page(render_lab(holder(), text=active_text(holder()), since="7d", until="",
                                limit=20))
    form = request.form
    upload = request.files.get("policy_file")
    text = form.get("policy", "")
    if upload is not None and upload.filename:
        text = upload.read().decode("utf-8", errors="replace")
    since, until = form.get("since", "7d").strip(), form.get("until", "").strip()
    try:
        limit = min(max(int(form.get("limit", "20")), 0), 500)
    except ValueError:
        limit = 20
    shown: dict[str, Any] = {"text": text, "since": since, "until": until, "limit": limit}
    proposal = DryRunRequest(policy=text, since=since or None, until=until or None,
                             limit=limit)
    try:
        job = start_dry_run(proposal, always=False)  # a large window: a job, and its page
        if job is not None:
            return redirect(url_for("dashboard.lab_job", job_id=job.id), 303)
        report = run_dry_run(holder(), store(), proposal, limits=settings().policy_limits)
    except ModerationError as e:  # shown on the page, with a policy's faults
        return page(render_lab(holder(), error=_shown_error(e.code, e.message, e.details()),
                               **shown), e.status)
    return page(render_lab(holder(), report=report, **shown))


def _shown_error(code: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
    return {"code": code, "message": message, "faults": details.get("faults", [])}


def _form_time(value: str | None) -> str:
    """A job's fixed time (unix seconds) as the lab's form shows it: ISO 8601, UTC."""
    if value is None:
        return ""
    moment = dt.datetime.fromtimestamp(float(value), dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@pages.bp.get("/dashboard/lab/jobs/<job_id>")
@admin_page_required
def lab_job(job_id: str) -> Any:
    """A dry-run that runs as a job: its progress (the page refreshes itself every 2 s, no
    script), then the lab's result under its form, or its error."""
    job = job_or_404(job_id)
    stored = runner().jobs.request(job_id)
    if job.kind != DRY_RUN or stored is None:
        raise NotFound(f"no dry-run job {job_id!r}")
    proposal = dry_run_request(stored)
    shown: dict[str, Any] = {"text": proposal.policy, "since": _form_time(proposal.since),
                             "until": _form_time(proposal.until), "limit": proposal.limit}
    if job.state == "done" and job.result is not None:
        report = DryRun.model_validate(job.result)
        return page(render_lab(holder(), report=report, job=job, **shown))
    error = None
    if job.state == "failed" and job.error is not None:
        error = _shown_error(job.error.code, job.error.message, job.error.details)
    return page(render_lab(holder(), error=error, job=job, **shown))


# --- policy history: what each activation changed, and what that did ----------------------

EFFECT_WINDOW_S = 24 * 3600


def _policy_at(holder: PolicyHolder, version: str, parsed: dict[str, Policy | None]
               ) -> Policy | None:
    if version not in parsed:
        try:
            parsed[version] = holder.stored_policy(version)
        except ModerationError:
            parsed[version] = None
    return parsed[version]


def history_entries(holder: PolicyHolder, store: DecisionStore, limit: int = 20
                    ) -> list[dict[str, Any]]:
    """The latest activations, newest first, each with what changed from the one before it
    and the flag rate of each category in the day before and the day after it (bounded by the
    neighbouring activations)."""
    if holder.policies is None:
        return []
    activations = holder.policies.history(limit=limit + 1)
    parsed: dict[str, Policy | None] = {}
    entries = []
    now = time.time()
    for i, a in enumerate(activations[:limit]):
        older = activations[i + 1] if i + 1 < len(activations) else None
        newer_at = activations[i - 1].activated_at if i > 0 else now
        policy = _policy_at(holder, a.version, parsed)
        changes = None
        if older is not None and policy is not None:
            previous = _policy_at(holder, older.version, parsed)
            changes = diff_policies(previous, policy) if previous is not None else None
        start = max(a.activated_at - EFFECT_WINDOW_S, older.activated_at if older else 0.0)
        end = min(a.activated_at + EFFECT_WINDOW_S, newer_at)
        n_before, flags_before = store.flag_counts(start, a.activated_at)
        n_after, flags_after = store.flag_counts(a.activated_at, end)
        categories = list(policy.categories) if policy is not None else []
        categories += [c for c in {**flags_before, **flags_after} if c not in categories]
        effect = [
            {"category": cid,
             "before": flags_before.get(cid, 0) / n_before if n_before else None,
             "after": flags_after.get(cid, 0) / n_after if n_after else None}
            for cid in categories
        ]
        entries.append({
            "activation": a, "previous": older, "changes": changes, "effect": effect,
            "n_before": n_before, "n_after": n_after,
            "hours_before": (a.activated_at - start) / 3600,
            "hours_after": (end - a.activated_at) / 3600,
        })
    return entries


def render_history(holder: PolicyHolder, store: DecisionStore) -> str:
    entries = history_entries(holder, store)
    scale = max([e for entry in entries for x in entry["effect"]
                 for e in (x["before"] or 0, x["after"] or 0)] + [0.01])
    return render_template("history.html", entries=entries, scale=scale, when=pages.when,
                           span=_span, policy=holder.current().policy)


def _span(hours: float) -> str:
    return f"{hours:.0f} h" if hours >= 1 else f"{hours * 60:.0f} min"


# --- the policy lab page -------------------------------------------------------------------


def render_lab(holder: PolicyHolder, *, text: str, since: str, until: str, limit: int,
               report: DryRun | None = None, error: dict[str, Any] | None = None,
               job: Job | None = None) -> str:
    """The lab page: the form, and a dry-run's result or error; for a dry-run's ``job``,
    its progress until it has one."""
    active = holder.current()
    return render_template(
        "lab.html", policy=active.policy, model=active.encoder.identity, text=text, since=since,
        until=until, limit=limit, report=report, error=error, job=job, when=pages.when,
    )


def active_text(holder: PolicyHolder) -> str:
    """The active policy's text, as the log keeps it (else the file's)."""
    version = holder.current().policy.version
    stored = holder.policies.text(version) if holder.policies is not None else None
    if stored is not None:
        return stored.text
    if holder.policy_path is not None and holder.policy_path.is_file():
        return read_policy_text(holder.policy_path)
    return ""
