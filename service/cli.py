"""``moderation serve``: the HTTP service under gunicorn."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from moderation import PolicyError, load_policy
from moderation.backends import EncoderSpec
from moderation.command import DEFAULT_POLICY, loud_warning, weights_options
from moderation.policy import Policy

from .settings import Settings, SettingsError, load_settings


@click.command()
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=DEFAULT_POLICY,
    show_default=True,
    help="Policy YAML file; POST /v1/policy/reload reads it again.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64),
              default=lambda: min(os.cpu_count() or 1, 4), show_default="cores, at most 4",
              help="Worker processes; each gets cores/workers torch threads (BENCHMARKS.md).")
@click.option("--threads", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Concurrent requests per worker.")
@weights_options(batch_size=False)  # the workers batch requests (MODERATION_BATCH_MAX)
def serve(
    policy_path: Path, host: str, port: int, workers: int, threads: int, spec: EncoderSpec
) -> None:
    """Serve the HTTP API with gunicorn (see service/gunicorn.conf.py).

    Admin routes need MODERATION_ADMIN_TOKEN; MODERATION_API_KEYS (comma-separated) makes
    /v1/moderate and /v1/policy require a key.
    """
    if spec.random_weights:
        loud_warning("serving with RANDOM WEIGHTS: every score is meaningless.")
    # the workers' settings: checked here, then gunicorn is exec'ed with this environment
    os.environ.update(
        MODERATION_POLICY=str(policy_path.resolve()),
        MODERATION_WORKERS=str(workers),
        MODERATION_THREADS=str(threads),
        MODERATION_RANDOM_WEIGHTS="true" if spec.random_weights else "false",
    )
    for key, value in (("MODEL", spec.name), ("PRETRAINED", spec.pretrained),
                       ("CACHE_DIR", spec.cache_dir), ("BACKEND", spec.backend),
                       ("DEVICE", spec.device)):
        if value is not None:
            os.environ[f"MODERATION_{key}"] = str(value)
    try:  # every MODERATION_* variable, checked here rather than in each worker
        settings = load_settings()
    except SettingsError as e:
        raise click.ClickException(str(e)) from e
    try:  # fail here, once, rather than in every worker (with the limits the workers apply)
        policy = load_policy(policy_path, limits=settings.policy_limits)
    except PolicyError as e:
        raise click.ClickException(str(e)) from e
    _check_model(policy, settings)
    _open_decision_log(settings.database_url)
    conf = Path(__file__).parent / "gunicorn.conf.py"
    argv = [
        sys.executable, "-m", "gunicorn",
        "--config", str(conf),
        "--bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "service.app:create_app()",
    ]
    os.execve(sys.executable, argv, os.environ)


def _check_model(policy: Policy, settings: Settings) -> None:
    """An exported model that is not there, or a backend that is not installed: said once,
    here, rather than by every worker."""
    from moderation import ModerationError

    from .app import encoder_spec

    spec = EncoderSpec.for_policy(policy, encoder_spec(settings))  # as each worker has it
    try:
        if spec.backend == "onnx":
            from moderation.backends.onnx import providers_for, read_metadata

            if not spec.pretrained:
                raise click.ClickException("--backend onnx needs --pretrained DIR, a folder "
                                           "'moderation model export' wrote")
            read_metadata(Path(spec.pretrained).expanduser())
            providers_for(spec.device)
        else:
            import importlib.util

            if importlib.util.find_spec("torch") is None:
                raise click.ClickException(
                    "the torch backend is not installed: pip install 'moderation[torch]', or "
                    "serve an exported model with --backend onnx --pretrained DIR")
    except ModerationError as e:
        raise click.ClickException(str(e)) from e


def _open_decision_log(database_url: str | None) -> None:
    """Migrate the log's schema once, before any worker starts, and fail here, with the
    reason, when it cannot be opened (rather than in every worker)."""
    from decisionlog import DecisionStore, SchemaError, default_database_url

    url = database_url or default_database_url()
    try:
        DecisionStore(url).close()  # closed: nothing open crosses into gunicorn
    except (ValueError, SchemaError) as e:
        raise click.ClickException(str(e)) from e
    except Exception as e:  # the database refuses or is unreachable
        shown = url.split("@", 1)[-1] if "@" in url else url  # never print a password
        raise click.ClickException(
            f"cannot open the decision log at {shown}: {type(e).__name__}: {e}. Check "
            "MODERATION_DATABASE_URL (sqlite:///path or postgresql://user:password@host/db)"
        ) from e
