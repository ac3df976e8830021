"""Platform hooks: what pict-rs (Lemmy's image server) calls before it stores an upload.
Each hook decides through ``POST /v1/moderate``'s path (recorded, banks matched) and answers
by the one integration policy (:class:`moderation.integrations.IntegrationPolicy`, from the
``MODERATION_INTEGRATION_*`` settings)."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, jsonify, request

from moderation import ModerationError
from moderation.integrations import IntegrationPolicy, Verdict

from .contract import Access, Answer, Body, operation
from .moderate import respond
from .parsing import ModerateRequest, Upload
from .resources import holder, metrics, settings
from .schemas import IntegrationAnswer

__all__ = ["bp", "integration_policy"]

log = logging.getLogger(__name__)

bp = Blueprint("integrations", __name__)

#: A raw upload, as a platform sends it: its bytes, with its own media type.
RAW = {"type": "string", "format": "binary", "description": "the upload's bytes"}


def integration_policy() -> IntegrationPolicy:
    s = settings()
    return IntegrationPolicy.parse(s.integration_reject, s.integration_review,
                                   s.integration_fail_mode)


def _answer(verdict: Verdict, hook: str, decision: dict[str, Any] | None = None,
            *, failed: bool = False) -> Any:
    metrics().integrations.labels(hook, "accept" if verdict.accept else "reject",
                                  "failure" if failed else "decision").inc()
    body: dict[str, Any] = {"action": decision.get("action") if decision else None,
                            "decision_id": decision.get("decision_id") if decision else None}
    if verdict.accept:
        return jsonify(accept=True, reason=verdict.reason, **body), 200
    # refused: the error shape every route answers, with the decision beside it
    code, status = ("undecided", 503) if failed else ("rejected", 422)
    return jsonify(error={"code": code, "message": verdict.reason}, **body), status


@operation(bp, "/v1/integrations/pict-rs", "POST", operation_id="pict_rs_validate",
           access=Access.API_KEY, summary="pict-rs's external validation: the upload's bytes "
           "in, 2xx to store it, 4xx (or 503 when failing closed) to refuse it",
           description="pict-rs (media.external_validation) posts each upload with its "
           "Content-Type and refuses it on anything but 2xx. The decision is recorded (client "
           "id `pict-rs`, the image's SHA-256) and the answer follows the integration policy "
           "(MODERATION_INTEGRATION_REJECT, _REVIEW, _FAIL_MODE).",
           body=Body({"application/octet-stream": RAW}),
           answers=(Answer(200, "Accepted: pict-rs stores the upload",
                           {"application/json": IntegrationAnswer}),),
           errors=(422, 503))
def pict_rs() -> Any:
    policy = integration_policy()
    data = request.get_data(cache=False)
    if not data:
        return _answer(policy.of_refusal("empty", "the upload is empty (0 bytes)"), "pict-rs")
    try:
        answer = respond(holder().current(), ModerateRequest([Upload("pict-rs", data)], None))
    except ModerationError as e:  # the decoder refused the file: a decision
        if e.status < 500:
            return _answer(policy.of_refusal(e.code, e.message), "pict-rs")
        log.warning("pict-rs: could not decide: %s", e.message)
        return _answer(policy.of_failure(e.code), "pict-rs", failed=True)
    except Exception as e:  # noqa: BLE001 (any failure: the fail mode decides, logged)
        log.exception("pict-rs: could not decide")
        return _answer(policy.of_failure(type(e).__name__), "pict-rs", failed=True)
    [result] = answer["results"]
    if "error" in result:
        return _answer(policy.of_refusal(result["error"]["code"], result["error"]["message"]),
                       "pict-rs", result)
    return _answer(policy.of_action(result["action"], result["triggered"]), "pict-rs", result)
