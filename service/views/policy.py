"""The active policy: ``GET /v1/policy``, ``POST /v1/policy/reload`` (admin), and the history
of activations with each version's text: ``GET /v1/policy/versions[/<version>]`` (reader)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from moderation import ModerationError, PolicyError

from ..auth import admin_required, api_key_required, reader_required
from ..parsing import RequestError
from ..schemas import PolicyActivation, PolicyVersions, PolicyVersionText, ReloadResponse
from . import holder, int_arg

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
