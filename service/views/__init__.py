"""The service's blueprints, one per area, and what their views share: the objects
``create_app`` wires into the app, and query-string parsing."""

from __future__ import annotations

from flask import current_app, request

from decisionlog import DecisionStore, Recorder

from ..metrics import Metrics
from ..parsing import integer_field, time_field
from ..settings import current_settings as settings
from ..state import PolicyHolder

__all__ = ["holder", "int_arg", "metrics", "recorder", "settings", "store", "time_arg"]


def holder() -> PolicyHolder:
    found: PolicyHolder = current_app.extensions["moderation"]
    return found


def store() -> DecisionStore:
    found: DecisionStore = current_app.extensions["decisions"][0]
    return found


def recorder() -> Recorder | None:
    found: Recorder | None = current_app.extensions["decisions"][1]
    return found


def metrics() -> Metrics:
    found: Metrics = current_app.extensions["metrics"]
    return found


def time_arg(name: str) -> float | None:
    """A time query parameter: unix seconds, ISO 8601, or an age (``24h``, ``7d``)."""
    return time_field(name, request.args.get(name))


def int_arg(name: str, default: int, low: int, high: int) -> int:
    return integer_field(name, request.args.get(name), default, low, high)
