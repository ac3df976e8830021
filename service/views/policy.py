"""The active policy: ``GET /v1/policy``, ``POST /v1/policy/reload`` (admin), the history
of activations with each version's text: ``GET /v1/policy/versions[/<version>]`` (reader),
and the policy lab: ``POST /v1/policy/dry-run`` (admin), ``GET /v1/policy/diff`` (reader)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from moderation import ModerationError, PolicyError

from ..auth import admin_required, api_key_required, reader_required
from ..lab import run_dry_run, stored_policy
from ..parsing import RequestError, parse_dry_run
from ..schemas import (
    PolicyActivation,
    PolicyChange,
    PolicyDiff,
    PolicyVersions,
    PolicyVersionText,
    ReloadResponse,
)
from . import holder, int_arg, store

bp = Blueprint("policy", __name__)


@bp.get("/v1/policy")
@api_key_required
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

@bp.post("/v1/policy/reload")
@admin_required
def reload() -> Any:
    before = holder().current().policy.version
    try:
        active = holder().reload()
    except PolicyError as e:
        raise RequestError(
            422, "invalid_policy",
            "the policy file is not valid; the previous policy keeps serving", faults=e.faults,
        ) from e
    except ModerationError as e:
        raise RequestError(
            422, "invalid_policy", f"{e}; the previous policy keeps serving"
        ) from e
    except OSError as e:
        raise RequestError(422, "invalid_policy", f"cannot read the policy file: {e}") from e
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

@bp.get("/v1/policy/versions")
@reader_required
def versions() -> Any:
    """Activations, newest first: the first is the active policy."""
    history = _policies().history(limit=int_arg("limit", 100, 1, 1000))
    return jsonify(PolicyVersions(versions=[
        PolicyActivation.model_validate(a, from_attributes=True) for a in history
    ]).model_dump(mode="json"))

@bp.get("/v1/policy/versions/<version>")
@reader_required
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


@bp.post("/v1/policy/dry-run")
@admin_required
def dry_run() -> Any:
    """What a proposed policy would decide for the stored decisions of a window, next to the
    active policy (or ``against`` a stored version). Nothing is activated or recorded."""
    proposal = parse_dry_run(request.mimetype, request.get_data(cache=False), request.args)
    report = run_dry_run(holder(), store(), proposal)
    return jsonify(report.model_dump(mode="json"))


@bp.get("/v1/policy/diff")
@reader_required
def diff() -> Any:
    """What differs from stored version ``from`` to stored version ``to`` (default: the
    active policy), in plain words."""
    from moderation.diff import diff_policies

    _policies()  # 404 unless this server's policy is kept in the log
    names = {"from": request.args.get("from"), "to": request.args.get("to")}
    if not names["from"]:
        raise RequestError(400, "missing_field", "give the version to compare: ?from=VERSION"
                                                 "[&to=VERSION] (to: the active policy)")
    found = {}
    for key, version in names.items():
        if key == "to" and not version:
            found[key] = holder().current().policy
            continue
        found[key] = stored_policy(holder(), version or "")
    changes = diff_policies(found["from"], found["to"])
    return jsonify(PolicyDiff(
        from_version=found["from"].version, to_version=found["to"].version,
        changes=[PolicyChange.of(c) for c in changes],
    ).model_dump(mode="json"))
