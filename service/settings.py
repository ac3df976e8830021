"""Every setting of the service, declared once with its type, default and meaning.

Read from ``MODERATION_<NAME>`` environment variables (pydantic-settings), or from a mapping
(``create_app(config={...})``, names in any case). As strict as policies: a value of the wrong
type or range, or a ``MODERATION_*`` variable that names no setting (a typo silently ignored
is a classic production bug), stops the start with the variable's name.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from moderation import ModerationError
from moderation.images import ImageLimits
from moderation.policy import PolicyLimits
from moderation.video import VideoLimits

__all__ = ["Settings", "SettingsError", "current_settings", "load_settings"]

PREFIX = "MODERATION_"
#: Variables with the prefix that are not service settings: read by the library, or by tests.
NOT_SETTINGS = ("MODERATION_OFFLINE", "MODERATION_TEST_")
#: False while settings are built from a mapping: then the environment is not read at all.
_FROM_ENVIRONMENT: ContextVar[bool] = ContextVar("from_environment", default=True)


class SettingsError(ModerationError, ValueError):
    """The service's settings are not valid; ``faults`` names each variable and why."""

    def __init__(self, faults: list[str]) -> None:
        super().__init__(
            f"invalid settings ({len(faults)} fault{'s' if len(faults) > 1 else ''}):\n"
            + "\n".join(f"  - {f}" for f in faults)
        )
        self.faults = faults


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=PREFIX, case_sensitive=False, extra="forbid", frozen=True
    )

    # --- the policy and the model
    policy: Path = Field(default=Path("policies/default.yaml"), description="policy YAML file")
    model: str | None = Field(default=None, description="open_clip architecture")
    pretrained: str | None = Field(default=None, description="tag or checkpoint file")
    random_weights: bool = Field(default=False, description="smoke tests only: scores meaningless")
    backend: Literal["torch", "onnx"] | None = Field(
        default=None, description="default: the policy's; onnx: pretrained is an exported folder")
    device: Literal["cpu", "cuda", "auto"] = Field(default="cpu",
                                                   description="auto: CUDA when present")
    cache_dir: Path | None = Field(default=None, description="text-embedding cache folder")
    torch_threads: int | None = Field(default=None, ge=1,
                                      description="threads of a forward pass (torch or ONNX "
                                                  "Runtime); default: cores / workers")
    # --- throughput (BENCHMARKS.md)
    batch_max: int = Field(default=16, ge=1, description="images per shared forward pass; 1: off")
    batch_max_wait_ms: float = Field(default=20, ge=0, le=1000)
    trace: bool = Field(default=True, description="TorchScript-trace the image tower")
    gil_switch_interval: float = Field(default=0.0005, gt=0, le=1)
    workers: int = Field(default=min(os.cpu_count() or 1, 4), ge=1, le=64)
    threads: int = Field(default=4, ge=1, le=64, description="concurrent requests per worker")
    # --- what a request may cost
    max_content_length: int = Field(default=64 * 1024 * 1024, ge=1024)
    read_timeout_s: float = Field(default=30, gt=0, description="a request must arrive within this")
    max_form_parts: int = Field(default=100, ge=2)
    # werkzeug applies this to its 64 KiB read buffer too: below ~128 KiB it refuses files
    max_form_memory_size: int = Field(default=256 * 1024, ge=128 * 1024)
    max_images: int = Field(default=32, ge=1)
    max_pixels: int = Field(default=ImageLimits.max_pixels, ge=1)
    max_frames: int = Field(default=ImageLimits.max_frames, ge=1)
    max_animation_frames: int = Field(default=ImageLimits.max_animation_frames, ge=1)
    max_animation_pixels: int = Field(default=ImageLimits.max_animation_pixels, ge=1)
    max_jpeg_scans: int = Field(default=ImageLimits.max_jpeg_scans, ge=1)
    # --- platform hooks (moderation.integrations.IntegrationPolicy)
    integration_reject: str = Field(
        default="block", description="comma-separated actions a platform hook rejects")
    integration_review: Literal["accept", "reject"] = Field(
        default="accept", description="a review action: accepted (and queued) or rejected")
    integration_fail_mode: Literal["open", "closed"] = Field(
        default="closed", description="when the service cannot decide: accept or reject")
    hashes: bool = Field(default=True, description="hash every upload (SHA-256, PDQ of each "
                                                   "frame) for hash banks and hash search")
    video_inline_max_s: float = Field(
        default=60.0, ge=0, description="a video longer than this (its header's word) is "
        "answered as a job (202), not inline")
    job_lease_s: float = Field(
        default=60.0, ge=1, le=3600, description="seconds a job's worker holds it without "
        "renewing its lease (it renews it every third of this while the job runs); a worker "
        "that died is taken over by another this long after its last renewal")
    # --- what a video may cost (moderation.video.VideoLimits): video_ + its field's name
    video_max_duration_s: float = Field(default=VideoLimits.max_duration_s, gt=0)
    video_max_pixels: int = Field(default=VideoLimits.max_pixels, ge=1)
    video_max_decoded_pixels: int = Field(default=VideoLimits.max_decoded_pixels, ge=1)
    video_time_budget_s: float = Field(default=VideoLimits.time_budget_s, gt=0)
    video_max_stream_frames: int = Field(default=VideoLimits.max_stream_frames, ge=1)
    # --- what a policy may cost (a reload, a dry-run's proposal): moderation.policy.PolicyLimits
    policy_max_bytes: int = Field(default=PolicyLimits.max_bytes, ge=1)
    policy_max_depth: int = Field(default=PolicyLimits.max_depth, ge=1)
    policy_max_aliases: int = Field(default=PolicyLimits.max_aliases, ge=1)
    policy_max_nodes: int = Field(default=PolicyLimits.max_nodes, ge=1)
    policy_max_categories: int = Field(default=PolicyLimits.max_categories, ge=1)
    policy_max_terms: int = Field(default=PolicyLimits.max_terms, ge=1)
    policy_max_exceptions: int = Field(default=PolicyLimits.max_exceptions, ge=1)
    policy_max_templates: int = Field(default=PolicyLimits.max_templates, ge=1)
    policy_max_prompts: int = Field(default=PolicyLimits.max_prompts, ge=1)
    policy_max_new_prompts: int = Field(default=PolicyLimits.max_new_prompts, ge=1,
                                        description="prompts a dry-run may encode")
    # --- access
    admin_token: str | None = Field(default=None, description="enables the admin routes")
    reader_token: str | None = Field(default=None, description="decision log API and dashboard")
    api_keys: str | None = Field(default=None, description="comma-separated keys for /v1/moderate")
    # --- the decision log
    database_url: str | None = Field(default=None, description="sqlite:///… or postgresql://…")
    record_decisions: bool = True
    dead_letter_path: Path | None = None
    record_timeout_s: float = Field(default=10, gt=0)
    block_merge_interval_s: float = Field(
        default=5, gt=0, le=3600,
        description="how often each worker's recorder, when idle, merges the small frame "
                    "blocks written with decisions into blocks for scans (decisionlog.blocks)")
    retention_days: float = Field(default=90, ge=0)
    dry_run_inline_max_decisions: int = Field(
        default=250_000, ge=0,
        description="a dry-run of a window with more decisions (of the server's model) runs "
                    "as a job: the API answers 202, the lab page shows its progress")
    # --- set by `moderation serve` for its workers
    state_dir: Path | None = None

    search_ef_search: int = Field(default=100, ge=1, le=1000,
                                  description="pgvector: candidates per search (recall vs speed)")
    search_hnsw_m: int = Field(default=32, ge=2, le=100, description="pgvector: links per node")
    search_hnsw_ef_construction: int = Field(default=128, ge=4, le=1000,
                                             description="pgvector: candidates while building")
    image_url_template: str | None = Field(
        default=None, description="dashboard thumbnails, e.g. https://cdn.internal/{client_id}")
    # --- the review queue (README: "Review")
    reviewers: str | None = Field(default=None, description="name:token,… (enables review)")
    audit_rate: str = Field(default="0.01", description="share of decisions sampled for audit: "
                                                        "0.01, or 0.01,allow=0.02,block=0.05")
    audit_seed: int | None = Field(default=None, description="the same audit draws every run")
    review_priority: str = Field(default="appeal,review,audit",
                                 description="which items reviewers get first")
    review_lease_s: float = Field(default=600, gt=0, le=86400,
                                  description="a claimed item returns to the queue after this")
    webhook_url: str | None = Field(default=None, description="verdicts are POSTed here")
    webhook_secret: str | None = Field(default=None, description="signs them (HMAC-SHA256)")
    webhook_timeout_s: float = Field(default=10, gt=0, le=120)
    webhook_backoff_s: float = Field(default=5, gt=0, description="first retry; doubles to 10 min")
    webhook_give_up_h: float = Field(default=72, gt=0,
                                     description="a verdict not delivered by then: failed")
    quality_min_verdicts: int = Field(default=10, ge=1,
                                      description="fewer: 'not enough verdicts yet'")

    # --- browser safety (service/security.py)
    trusted_proxies: int = Field(
        default=0, ge=0, le=10,
        description="proxies in front whose X-Forwarded-For/-Proto are believed (0: none)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if not _FROM_ENVIRONMENT.get():
            return (init_settings,)
        return (init_settings, env_settings)

    @model_validator(mode="after")
    def _tokens_are_not_blank(self) -> Settings:
        for name in ("admin_token", "reader_token"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{name} is blank: unset it, or give a token")
        return self

    @field_validator("integration_reject")
    @classmethod
    def _integration_reject(cls, value: str) -> str:
        from moderation.integrations import IntegrationPolicy

        IntegrationPolicy.parse(value)  # its ValueError says what is accepted
        return value

    @field_validator("audit_rate")
    @classmethod
    def _audit_rate(cls, value: str) -> str:
        from decisionlog.reviews import AuditRates

        AuditRates.parse(value)  # its ValueError says what is accepted
        return value

    @field_validator("review_priority")
    @classmethod
    def _review_priority(cls, value: str) -> str:
        from decisionlog.reviews import REASONS

        if sorted(r.strip() for r in value.split(",")) != sorted(REASONS):
            raise ValueError(f"give {', '.join(REASONS)} in the order reviewers get them, "
                             "each once")
        return value

    @model_validator(mode="after")
    def _review_settings(self) -> Settings:
        # checked here, not by a field validator: a fault must never echo a token back
        self.reviewer_tokens  # noqa: B018  # raises on a malformed entry
        if self.webhook_url is not None:
            if not self.webhook_url.startswith(("http://", "https://")):
                raise ValueError(f"webhook_url {self.webhook_url!r} is not an http(s) URL")
            if not self.webhook_secret:
                raise ValueError("webhook_url needs webhook_secret: every delivery is signed")
        return self

    @property
    def reviewer_tokens(self) -> dict[str, str]:
        """Reviewer name → token, from ``name:token,…``."""
        found: dict[str, str] = {}
        for entry in (e.strip() for e in (self.reviewers or "").split(",")):
            if not entry:
                continue
            name, sep, token = entry.partition(":")
            if not sep or not name.strip() or not token.strip():
                raise ValueError("reviewers: each entry is name:token (a token is never shown "
                                 "back; check the entries' form)")
            if name.strip() in found:
                raise ValueError(f"reviewers: {name.strip()!r} is named twice")
            found[name.strip()] = token.strip()
        return found

    @property
    def review_order(self) -> list[str]:
        return [r.strip() for r in self.review_priority.split(",")]

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in (self.api_keys or "").split(",") if k.strip()]

    @property
    def policy_limits(self) -> PolicyLimits:
        """Every field of :class:`PolicyLimits` is a setting, ``policy_`` + its name."""
        return PolicyLimits(**{f.name: getattr(self, f"policy_{f.name}")
                               for f in fields(PolicyLimits)})

    @property
    def video_limits(self) -> VideoLimits:
        """Every field of :class:`VideoLimits` is a setting, ``video_`` + its name."""
        return VideoLimits(**{f.name: getattr(self, f"video_{f.name}")
                              for f in fields(VideoLimits)})

    @property
    def image_limits(self) -> ImageLimits:
        """Every field of :class:`ImageLimits` is a setting of the same name."""
        return ImageLimits(**{f.name: getattr(self, f.name) for f in fields(ImageLimits)})


def _faults(e: ValidationError, from_env: bool) -> list[str]:
    faults = []
    for error in e.errors():
        name = str(error["loc"][0]) if error["loc"] else "settings"
        where = f"{PREFIX}{name.upper()}" if from_env else name
        got = error.get("input")
        shown = "" if error["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        faults.append(f"{where}: {error['msg']}{shown}")
    return faults


def load_settings(config: Mapping[str, Any] | None = None) -> Settings:
    """The settings from ``config`` (names in any case; nothing from the environment), or
    else from ``MODERATION_*`` variables. Raises :class:`SettingsError` with every fault."""
    if config is not None:
        token = _FROM_ENVIRONMENT.set(False)
        try:
            return Settings(**{k.lower(): v for k, v in config.items()})
        except ValidationError as e:
            raise SettingsError(_faults(e, from_env=False)) from None
        finally:
            _FROM_ENVIRONMENT.reset(token)
    known = {f"{PREFIX}{name.upper()}" for name in Settings.model_fields}
    faults = []
    for name in sorted(os.environ):
        upper = name.upper()
        if upper.startswith(PREFIX) and upper not in known and not upper.startswith(NOT_SETTINGS):
            close = difflib.get_close_matches(upper, sorted(known), n=1)
            faults.append(f"{name}: not a setting" + (f"; did you mean {close[0]}?" if close
                                                      else ""))
    try:
        settings = Settings()  # pydantic-settings reads MODERATION_* from the environment
    except ValidationError as e:
        raise SettingsError(faults + _faults(e, from_env=True)) from None
    if faults:
        raise SettingsError(faults)
    return settings


def current_settings() -> Settings:
    """The settings of the app serving the current request."""
    from flask import current_app  # only here: the gunicorn master reads settings too

    found: Settings = current_app.extensions["settings"]
    return found
