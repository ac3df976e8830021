"""The active policy: ``GET /v1/policy`` and ``POST /v1/policy/reload`` (admin)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from moderation import ModerationError, PolicyError

from ..auth import admin_required, api_key_required
from ..parsing import RequestError
from . import holder

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
    return jsonify(
        name=active.policy.name,
        version=active.policy.version,
        previous_version=before,
        changed=before != active.policy.version,
    )
