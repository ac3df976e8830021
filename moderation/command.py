"""Click helpers for the commands every package adds to ``moderation``: the model options
and loading a moderator with a loud warning for random weights. Public, so that sibling
packages' ``cli.py`` modules use them without importing one another."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .errors import ModerationError

__all__ = [
    "DEFAULT_POLICY", "load_moderator", "loud_warning", "model_options", "weights_options",
]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_POLICY = os.environ.get("MODERATION_POLICY", "policies/default.yaml")


def model_options(command: F) -> F:
    """The options every command that loads a model shares: ``--policy`` and
    :func:`weights_options`."""
    return click.option(
        "--policy",
        "policy_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=DEFAULT_POLICY,
        show_default=True,
        help="Policy YAML file ($MODERATION_POLICY sets the default).",
    )(weights_options(command))


def weights_options(command: F) -> F:
    """The model and weights options, for a command that takes its policy otherwise."""
    options = [
        click.option("--model", help="open_clip architecture; default: the policy's."),
        click.option(
            "--pretrained",
            help="open_clip pretrained tag or checkpoint file; default: the policy's.",
        ),
        click.option(
            "--random-weights",
            is_flag=True,
            help="Random weights instead of pretrained ones: scores are MEANINGLESS. "
            "For benchmarks and smoke tests only.",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Where text embeddings are cached (default: $MODERATION_CACHE_DIR or "
            "~/.cache/moderation).",
        ),
        click.option(
            "--batch-size", type=click.IntRange(1, 512), default=16, show_default=True
        ),
        click.option(
            "--backend", type=click.Choice(["torch", "onnx"]),
            help="torch (open_clip), or onnx: --pretrained is a folder 'moderation model "
                 "export' wrote; default: the policy's (torch).",
        ),
        click.option(
            "--device", type=click.Choice(["cpu", "cuda", "auto"]),
            default=lambda: os.environ.get("MODERATION_DEVICE", "cpu"),
            show_default="cpu, or $MODERATION_DEVICE",
            help="Where the model runs (auto: CUDA when present).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_moderator(
    policy_path: Path | Any,
    model: str | None,
    pretrained: str | None,
    random_weights: bool,
    cache_dir: Path | None,
    batch_size: int,
    cache: Any = None,
    backend: str | None = None,
    device: str = "cpu",
) -> Any:
    """The :class:`~moderation.Moderator` of a policy file (or a parsed policy), its errors as
    click's; ``cache``:
    a text-embedding cache a layer above provides (default: the folder cache)."""
    from .backends import RandomWeightsWarning
    from .moderator import Moderator

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RandomWeightsWarning)
        try:
            moderator = Moderator.from_policy(
                policy_path,
                model=model,
                pretrained=pretrained,
                random_weights=random_weights,
                cache_dir=cache_dir,
                cache=cache,
                batch_size=batch_size,
                backend=backend,
                device=device,
            )
        except ModerationError as e:
            raise click.ClickException(str(e)) from e
    for warning in caught:
        if issubclass(warning.category, RandomWeightsWarning):
            loud_warning(str(warning.message))
    return moderator


def loud_warning(message: str) -> None:
    bar = "!" * 78
    click.secho(f"{bar}\n!! WARNING: {message}\n{bar}", fg="red", err=True)
