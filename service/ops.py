"""For operators and machines: health, readiness, the OpenAPI document, Prometheus metrics."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from .contract import Access, Answer, operation
from .metrics import CONTENT_TYPE_LATEST
from .openapi import openapi_document
from .resources import holder, metrics
from .schemas import Health, Ready

bp = Blueprint("ops", __name__)


@operation(bp, "/healthz", "GET", operation_id="healthz", access=Access.PUBLIC,
           summary="The process is alive",
           description="Answered by the worker's event loop, never behind busy request "
           "threads (service/worker.py); this view answers it when the app runs elsewhere.",
           answers=(Answer(200, "Alive", {"application/json": Health}),))
def healthz() -> Any:
    return jsonify(status="ok")


@operation(bp, "/readyz", "GET", operation_id="readyz", access=Access.PUBLIC,
           summary="The model and the policy are loaded",
           answers=(Answer(200, "Ready", {"application/json": Ready}),))
def readyz() -> Any:
    active = holder().current()
    return jsonify(
        status="ready",
        policy={"name": active.policy.name, "version": active.policy.version},
        model=active.encoder.identity,
    )


@operation(bp, "/openapi.json", "GET", operation_id="openapi", access=Access.PUBLIC,
           summary="This document",
           answers=(Answer(200, "OpenAPI 3.1", {"application/json": {"type": "object"}}),))
def openapi() -> Any:
    return jsonify(openapi_document())


@operation(bp, "/metrics", "GET", operation_id="metrics", access=Access.PUBLIC,
           summary="Prometheus metrics",
           answers=(Answer(200, "Prometheus text format",
                           {"text/plain": {"type": "string"}}),))
def prometheus() -> Response:
    return Response(metrics().exposition(), mimetype=CONTENT_TYPE_LATEST)
