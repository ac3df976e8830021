"""For operators and machines: health, readiness, the OpenAPI document, Prometheus metrics."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from ..metrics import CONTENT_TYPE_LATEST
from ..openapi import openapi_document
from . import holder, metrics

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    return jsonify(status="ok")

@bp.get("/readyz")
def readyz() -> Any:
    active = holder().current()
    return jsonify(
        status="ready",
        policy={"name": active.policy.name, "version": active.policy.version},
        model=active.encoder.identity,
    )

@bp.get("/openapi.json")
def openapi() -> Any:
    return jsonify(openapi_document())

@bp.get("/metrics")
def prometheus() -> Response:
    return Response(metrics().exposition(), mimetype=CONTENT_TYPE_LATEST)
