"""The Flask application: ``create_app(config=None, moderator=None)``.

Settings come from ``config`` (a mapping), else from ``MODERATION_*`` environment variables:
:mod:`service.settings` declares each one, its type and its default.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, g, request
from flask.json.provider import DefaultJSONProvider

from decisionlog import (
    DeadLetters,
    DecisionStore,
    PolicyLog,
    Recorder,
    SharedEmbeddingCache,
    default_database_url,
    default_dead_letter_path,
)
from decisionlog.banks import BankMatcher, BankStore
from decisionlog.jobs import JobLog
from decisionlog.reviews import AuditRates, AuditSampler, ReviewQueue
from decisionlog.search import ensure_hnsw_index
from moderation import Moderator
from moderation.backends import EncoderSpec

from . import (
    banks,
    decisions,
    integrations,
    jobs,
    moderate,
    ops,
    pages,
    policy,
    reviews,
    search,
    security,
)
from .errors import register_error_handlers
from .metrics import Metrics
from .settings import Settings, load_settings
from .state import ModelOccupancy, PolicyHolder
from .webhooks import WebhookSender

__all__ = ["create_app"]

#: MODERATION_BATCH_MAX's default on a GPU (16 on the CPU)
GPU_BATCH_MAX = 64


def encoder_spec(settings: Settings) -> EncoderSpec:
    """The model the settings choose (``None`` where the policy decides)."""
    return EncoderSpec(name=settings.model, pretrained=settings.pretrained,
                       random_weights=settings.random_weights, backend=settings.backend,
                       device=settings.device, threads=settings.torch_threads,
                       cache_dir=settings.cache_dir)


def _load_moderator(settings: Settings, database_url: str) -> Moderator:
    moderator = Moderator.from_policy(
        settings.policy,
        encoder_spec(settings),
        # text embeddings in the log as well: what one replica encodes, the others read
        cache=SharedEmbeddingCache.with_folder(database_url, settings.cache_dir),
        limits=settings.image_limits,
        video_limits=settings.video_limits,
        hashes=settings.hashes,
    )
    if settings.trace:
        moderator.encoder.trace_image_tower()  # torch: a TorchScript trace
    on_gpu = moderator.encoder.device_type == "cuda"
    max_batch = settings.batch_max
    if "batch_max" not in settings.model_fields_set and on_gpu:
        max_batch = GPU_BATCH_MAX  # a GPU wants larger batches; the CPU workers decode
    if max_batch > 1:
        from moderation.batching import BatchingEncoder

        state_dir = settings.state_dir
        lone = None if on_gpu else os.cpu_count() or 1
        if lone is not None:
            moderator.encoder.prepare_threads(lone)  # ONNX Runtime: a session for all cores
        batching = BatchingEncoder(
            moderator.encoder,
            max_batch=max_batch,
            max_wait=settings.batch_max_wait_ms / 1000,
            lone_threads=lone,
            occupancy=ModelOccupancy(state_dir / "model-occupancy") if state_dir else None,
        )
        moderator = moderator.with_encoder(batching)
    return moderator


class StrictJSONProvider(DefaultJSONProvider):
    """Answers are JSON as RFC 8259 has it: a NaN or an infinity is an error (logged, a 500),
    never a bare ``NaN`` a client's parser refuses. Categories keep the policy's order."""

    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)


def create_app(
    config: Mapping[str, Any] | None = None, moderator: Moderator | None = None
) -> Flask:
    """Build the app. Without ``moderator``, load the policy and model the config names,
    before the app is returned (so a gunicorn worker is ready when it accepts requests)."""
    settings = load_settings(config)
    app = Flask(__name__)
    app.json = StrictJSONProvider(app)
    app.config.update(  # the limits werkzeug enforces while parsing
        MAX_CONTENT_LENGTH=settings.max_content_length,
        MAX_FORM_PARTS=settings.max_form_parts,
        MAX_FORM_MEMORY_SIZE=settings.max_form_memory_size,
    )
    app.extensions["settings"] = settings
    database_url = settings.database_url or default_database_url()
    store = DecisionStore(  # brings the log's schema up to date (once)
        database_url,
        audit=AuditSampler(AuditRates.parse(settings.audit_rate), seed=settings.audit_seed),
    )
    given = moderator is not None
    if moderator is None:
        sys.setswitchinterval(settings.gil_switch_interval)
        moderator = _load_moderator(settings, database_url)
    # the active policy lives in the log: this worker follows its latest activation
    holder = PolicyHolder(
        moderator, settings.policy, PolicyLog(database_url, migrate_schema=False),
        limits=settings.policy_limits,
    )  # the store migrated the schema just above
    holder.start(given=given)
    # pgvector: the search index of this model's vector dimension (built once, if missing)
    ensure_hnsw_index(store.engine, moderator.text.categories.shape[1],
                      m=settings.search_hnsw_m,
                      ef_construction=settings.search_hnsw_ef_construction)
    holder.follow_in_background()
    metrics = Metrics()
    app.extensions["metrics"] = metrics
    app.extensions["moderation"] = holder
    dead_letters = DeadLetters(settings.dead_letter_path or default_dead_letter_path(store.url))
    recorder = (
        Recorder(store, dead_letters, timeout=settings.record_timeout_s,
                 merge_every=settings.block_merge_interval_s)
        if settings.record_decisions else None
    )
    app.extensions["decisions"] = (store, recorder)
    # hash banks: in the log, followed by every worker and replica within ~1 s
    bank_store = BankStore(store.engine, migrate_schema=False)
    app.extensions["banks"] = (bank_store, BankMatcher(bank_store, follow_s=1.0))
    if recorder is not None:
        atexit.register(recorder.close)  # a worker that stops writes what it has queued
    app.extensions["reviews"] = review_queue = ReviewQueue(store)
    if settings.webhook_url and settings.webhook_secret:
        sender = WebhookSender(
            review_queue, settings.webhook_url, settings.webhook_secret,
            timeout_s=settings.webhook_timeout_s, backoff_s=settings.webhook_backoff_s,
            give_up_s=settings.webhook_give_up_h * 3600,
        )
        sender.start()
        app.extensions["webhook"] = sender
    # long work (a large dry-run) off the request threads, by the process's job thread
    # (which, at exit, gives a job in progress back to the queue)
    # a long video's answer also goes to the webhook, when there is one
    webhook = app.extensions.get("webhook")
    runner = jobs.JobRunner(JobLog(store), {
        policy.DRY_RUN: policy.dry_run_handler(holder, store, settings.policy_limits),
        moderate.MODERATE: moderate.moderate_handler(app),
    }, lease_s=settings.job_lease_s, webhook=webhook.wake if webhook is not None else None,
        notify=frozenset({moderate.MODERATE}))
    runner.start()
    app.extensions["jobs"] = runner

    @app.before_request
    def start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def count(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - g.get("started", 0))
        if response.status_code >= 400 and response.is_json:
            code = (response.get_json(silent=True) or {}).get("error", {}).get("code")
            if code:
                metrics.errors.labels(code).inc()
        return response

    register_error_handlers(app)
    security.init_app(app)
    for blueprint in (moderate.bp, banks.bp, integrations.bp, policy.bp, jobs.bp,
                      decisions.bp, search.bp, reviews.bp, pages.bp, ops.bp):
        app.register_blueprint(blueprint)
    return app
