"""Click helpers for the commands every package adds to ``moderation``: the model options,
which build one :class:`~moderation.backends.EncoderSpec`, and loading a moderator with a loud
warning for random weights. Public, so that sibling packages' ``cli.py`` modules use them
without importing one another."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .backends import EncoderSpec
from .errors import ModerationError

__all__ = [
    "DEFAULT_POLICY", "load_moderator", "loud_warning", "model_options", "weights_options",
]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_POLICY = os.environ.get("MODERATION_POLICY", "policies/default.yaml")


def model_options(command: F) -> F:
    """The options every command that loads a model shares: ``--policy`` (the command gets
    ``policy_path``) and :func:`weights_options` (it gets ``spec``)."""
    return click.option(
        "--policy",
        "policy_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=DEFAULT_POLICY,
        show_default=True,
        help="Policy YAML file ($MODERATION_POLICY sets the default).",
    )(weights_options(command))


def weights_options(command: F | None = None, *, batch_size: bool = True) -> Any:
    """The model and weights options (``--model``, ``--pretrained``, ``--random-weights``,
    ``--cache-dir``, ``--batch-size``, ``--backend``, ``--device``), for a command that takes
    its policy otherwise: the command gets them as one ``spec``, an
    :class:`~moderation.backends.EncoderSpec` (``None`` where the policy decides).
    ``batch_size=False``: without ``--batch-size`` (``serve`` batches requests its own way);
    then used as ``@weights_options(batch_size=False)``."""
    if command is None:
        return functools.partial(weights_options, batch_size=batch_size)
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
        *([click.option(
            "--batch-size", type=click.IntRange(1, 512), default=16, show_default=True
        )] if batch_size else []),
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

    @functools.wraps(command)
    def with_spec(*args: Any, **kwargs: Any) -> Any:
        spec = EncoderSpec(
            name=kwargs.pop("model"), pretrained=kwargs.pop("pretrained"),
            random_weights=kwargs.pop("random_weights"), cache_dir=kwargs.pop("cache_dir"),
            backend=kwargs.pop("backend"), device=kwargs.pop("device"),
            **({"batch_size": kwargs.pop("batch_size")} if batch_size else {}),
        )
        return command(*args, spec=spec, **kwargs)

    decorated: Any = with_spec
    for option in reversed(options):
        decorated = option(decorated)
    return decorated


def load_moderator(policy_path: Path | Any, spec: EncoderSpec, cache: Any = None) -> Any:
    """The :class:`~moderation.Moderator` of a policy file (or a parsed policy) with the model
    ``spec`` chooses, its errors as click's; ``cache``: a text-embedding cache a layer above
    provides (default: the folder cache)."""
    from .backends import RandomWeightsWarning
    from .moderator import Moderator

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RandomWeightsWarning)
        try:
            moderator = Moderator.from_policy(policy_path, spec, cache=cache)
        except ModerationError as e:
            raise click.ClickException(str(e)) from e
    for warning in caught:
        if issubclass(warning.category, RandomWeightsWarning):
            loud_warning(str(warning.message))
    return moderator


def loud_warning(message: str) -> None:
    bar = "!" * 78
    click.secho(f"{bar}\n!! WARNING: {message}\n{bar}", fg="red", err=True)
