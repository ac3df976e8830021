"""What the service's views share: the objects ``create_app`` wires into the app (the active
policy, the decision log, the recorder, the review queue, the webhook sender, the metrics,
the settings)."""

from __future__ import annotations

from flask import current_app, request

from decisionlog import DecisionStore, Recorder
from decisionlog.reviews import ReviewQueue

from .metrics import Metrics
from .settings import current_settings as settings
from .state import PolicyHolder
from .webhooks import WebhookSender

__all__ = ["holder", "int_arg", "metrics", "queue", "recorder", "sender", "settings", "store"]


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



def int_arg(name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter of a page (pages keep their forms' own leniency: the API
    routes declare theirs with :func:`service.contract.operation`); a 400 outside
    ``low``..``high`` or for anything but ASCII digits."""
    from .parsing import RequestError

    value = request.args.get(name)
    if value is None or value == "":
        return default
    if not (value.isascii() and value.lstrip("-").isdigit() and len(value) <= 20
            and low <= int(value) <= high):
        raise RequestError(400, "invalid_field", f"{name} must be an integer from {low} to "
                                                 f"{high}; got {value[:40]!r}")
    return int(value)


def queue() -> ReviewQueue:
    found: ReviewQueue = current_app.extensions["reviews"]
    return found


def sender() -> WebhookSender | None:
    found: WebhookSender | None = current_app.extensions.get("webhook")
    return found
