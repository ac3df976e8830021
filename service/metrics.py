"""Prometheus metrics (prometheus_client: the standard exposition format, and its
multiprocess mode aggregates gunicorn workers when PROMETHEUS_MULTIPROC_DIR is set)."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One set of metrics per app, on its own registry (so tests can build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moderation_http_requests", "HTTP requests", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "moderation_http_request_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "moderation_images", "Images moderated, by overall action", ["action"], registry=r
        )
        self.flags = Counter(
            "moderation_category_flags",
            "Categories that fired, by category and action",
            ["category", "action"],
            registry=r,
        )
        self.errors = Counter("moderation_errors", "Errors by code", ["code"], registry=r)
        self.integrations = Counter(
            "moderation_integration_answers", "Platform hooks' answers: accepted or rejected, "
            "by a decision or by the fail mode (the service could not decide)",
            ["hook", "answer", "by"], registry=r)

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
