"""The exceptions this package raises: one base class, each also a matching builtin."""

from __future__ import annotations


class ModerationError(Exception):
    """Base class of every error raised on purpose by this package."""


class PolicyError(ModerationError, ValueError):
    """A policy file is missing, unreadable, or does not follow the schema.

    ``faults`` lists every problem found, each as ``"<file>: <key.path>: <message>"``.
    """

    def __init__(self, message: str, faults: list[str] | None = None) -> None:
        super().__init__(message)
        self.faults = list(faults) if faults else [message]


class PolicyLimitError(PolicyError):
    """A policy asks for more work than :class:`moderation.policy.PolicyLimits` allows (its
    size, nesting, aliases, categories, terms, templates, or the prompts a dry-run would have
    to encode). Refused before the work is done; the message names the limit."""


class ImageError(ModerationError, ValueError):
    """One image could not be decoded. ``code`` says why, in a word a client can branch on.

    Codes: ``empty``, ``unreadable``, ``unsupported_format``, ``corrupt_image``,
    ``too_many_pixels``, ``too_many_frames``, ``animation_too_large``, ``too_many_scans``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ModelError(ModerationError, RuntimeError):
    """The CLIP model could not be built: unknown architecture, bad checkpoint."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights are neither cached nor downloadable nor a readable file."""


class ModelMismatchError(ModerationError, ValueError):
    """Calibrated thresholds are about to be used with a model they were not fitted on."""
