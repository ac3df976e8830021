"""The active policy: ``GET /v1/policy``, ``POST /v1/policy/reload`` (admin), the history
of activations with each version's text: ``GET /v1/policy/versions[/<version>]`` (reader),
and the policy lab: ``POST /v1/policy/dry-run`` (admin), ``GET /v1/policy/diff`` (reader)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from ..contract import Access, Answer, Body, operation, parse_body
from ..lab import run_dry_run, stored_policy
from ..parsing import DryRunRequest, RequestError, load_json
from ..schemas import (
    DiffQuery,
    DryRun,
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
from . import holder, settings, store

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
           "(options in the query string), or JSON (options in either; the body's win).",
           query=DryRunQuery,
           body=Body({"application/yaml": POLICY_TEXT, "text/plain": POLICY_TEXT,
                      "application/json": DryRunJSON}),
           answers=(Answer(200, "Counts before and after, the changed decisions and the "
                                "policies' diff", {"application/json": DryRun}),),
           errors=(404, 422))
def dry_run(query: DryRunQuery) -> Any:
    """What a proposed policy would decide for the stored decisions of a window, next to the
    active policy (or ``against`` a stored version). Nothing is activated or recorded."""
    options: dict[str, Any] = query.model_dump(exclude_unset=True)
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
    report = run_dry_run(holder(), store(), DryRunRequest(policy=text, **options),
                         limits=settings().policy_limits)
    return jsonify(report.model_dump(mode="json"))


@operation(bp, "/v1/policy/diff", "GET", operation_id="diff_policies", access=Access.READER,
           summary="What differs between two stored policy versions, in plain words",
           query=DiffQuery,
           answers=(Answer(200, "The differences, one sentence each",
                           {"application/json": PolicyDiff}),), errors=(404, 422))
def diff(query: DiffQuery) -> Any:
    """What differs from stored version ``from`` to stored version ``to`` (default: the
    active policy), in plain words."""
    from moderation.diff import diff_policies

    _policies()  # 404 unless this server's policy is kept in the log
    before = stored_policy(holder(), query.from_)
    after = (stored_policy(holder(), query.to) if query.to is not None
             else holder().current().policy)
    changes = diff_policies(before, after)
    return jsonify(PolicyDiff(
        from_version=before.version, to_version=after.version,
        changes=[PolicyChange.of(c) for c in changes],
    ).model_dump(mode="json"))
