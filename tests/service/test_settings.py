"""Typed settings: every MODERATION_* variable declared once, every fault named at start."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.settings import Settings, SettingsError, load_settings


def test_defaults_are_declared_once_and_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("MODERATION_") and not name.startswith("MODERATION_TEST_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.batch_max == 16 and settings.trace is True
    assert settings.max_content_length == 64 * 1024 * 1024
    assert settings.image_limits.max_jpeg_scans == 100
    assert settings.video_limits.max_duration_s == 600.0
    assert settings.policy == Path("policies/default.yaml")


def test_environment_values_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODERATION_BATCH_MAX", "4")
    monkeypatch.setenv("MODERATION_TRACE", "false")
    monkeypatch.setenv("MODERATION_API_KEYS", "k1, k2,")
    settings = load_settings()
    assert settings.batch_max == 4 and settings.trace is False
    assert settings.api_key_list == ["k1", "k2"]


def test_every_fault_is_named_with_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODERATION_BATCH_MAX", "0")
    monkeypatch.setenv("MODERATION_TRACE", "maybe")
    monkeypatch.setenv("MODERATION_ADMN_TOKEN", "x")  # a typo
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert e.value.faults == [
        "MODERATION_ADMN_TOKEN: not a setting; did you mean MODERATION_ADMIN_TOKEN?",
        "MODERATION_BATCH_MAX: Input should be greater than or equal to 1 (got '0')",
        "MODERATION_TRACE: Input should be a valid boolean, unable to interpret input "
        "(got 'maybe')",
    ]


def test_a_mapping_is_used_alone_and_checked_the_same_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODERATION_BATCH_MAX", "0")  # not read: the mapping is the config
    assert load_settings({"POLICY": "p.yaml", "admin_token": "a"}).batch_max == 16
    with pytest.raises(SettingsError, match="max_images: Input should be greater") as e:
        load_settings({"MAX_IMAGES": 0, "NOPE": 1, "ADMIN_TOKEN": "  "})
    assert any(f.startswith("nope: Extra inputs are not permitted") for f in e.value.faults)
    with pytest.raises(SettingsError, match="admin_token is blank"):
        load_settings({"ADMIN_TOKEN": "  "})


def test_form_memory_below_werkzeugs_buffer_is_refused() -> None:
    with pytest.raises(SettingsError, match="max_form_memory_size: Input should be greater"):
        load_settings({"MAX_FORM_MEMORY_SIZE": 65536})
    assert "max_form_memory_size" in Settings.model_fields


def test_serve_refuses_bad_settings_at_start_before_loading_a_model() -> None:
    import os

    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "moderation.cli", "serve", "--random-weights",
         "--policy", str(Path(__file__).resolve().parents[2] / "policies" / "default.yaml")],
        env=dict(os.environ, MODERATION_READ_TIMEOUT_S="-1", MODERATION_WORKRES="2"),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "MODERATION_READ_TIMEOUT_S: Input should be greater than 0" in result.stderr
    assert "MODERATION_WORKRES: not a setting; did you mean MODERATION_WORKERS?" in result.stderr
    assert time.monotonic() - started < 30
