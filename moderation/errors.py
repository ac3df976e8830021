"""The exceptions this package raises: one base class, each also a matching builtin."""

from __future__ import annotations


class ModerationError(Exception):
    """Base class of every error raised on purpose by this package and those above it.

    Each error carries what a caller answers with: ``code``, a word a program can branch on,
    ``status``, the HTTP status the service answers it with (one table: the classes below and
    their subclasses in the other packages), and ``message`` for people. :meth:`details` adds
    what else the answer carries (a policy's faults)."""

    code: str = "internal"
    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> dict[str, object]:
        return {}

    def __reduce__(self) -> tuple[object, ...]:
        # whatever its constructor takes: rebuilt from its class, args and attributes (a
        # scan's errors cross process boundaries on Ray)
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(kind: type[ModerationError], args: tuple[object, ...],
             state: dict[str, object]) -> ModerationError:
    error = kind.__new__(kind)
    error.args = args
    error.__dict__.update(state)
    return error


class PolicyError(ModerationError, ValueError):
    """A policy file is missing, unreadable, or does not follow the schema.

    ``faults`` lists every problem found, each as ``"<file>: <key.path>: <message>"``.
    """

    code = "invalid_policy"
    status = 422

    def __init__(self, message: str, faults: list[str] | None = None) -> None:
        super().__init__(message)
        self.faults = list(faults) if faults else [message]

    def details(self) -> dict[str, object]:
        return {"faults": self.faults}


class PolicyLimitError(PolicyError):
    """A policy asks for more work than :class:`moderation.policy.PolicyLimits` allows (its
    size, nesting, aliases, categories, terms, templates, or the prompts a dry-run would have
    to encode). Refused before the work is done; the message names the limit."""

    code = "policy_too_large"


class UnknownProfile(PolicyError):
    """A request names a calibration profile the policy does not have."""

    code = "unknown_profile"
    status = 400

    def details(self) -> dict[str, object]:
        return {}


class ImageError(ModerationError, ValueError):
    """One image could not be decoded. ``code`` says why, in a word a client can branch on.

    Codes: ``empty``, ``unreadable``, ``unsupported_format``, ``corrupt_image``,
    ``too_many_pixels``, ``too_many_frames``, ``animation_too_large``, ``too_many_scans``;
    videos: ``corrupt_video``, ``video_unsupported``, ``video_too_long``,
    ``video_too_large``, ``video_time_budget`` (and the image codes above).
    """

    #: The status of a request whose only image failed, by the image's error code (else 400).
    STATUS_BY_CODE = {
        "unsupported_format": 415,
        "too_many_pixels": 413,
        "too_many_frames": 413,
        "animation_too_large": 413,
        "too_many_scans": 413,
        "video_unsupported": 415,
        "video_too_long": 413,
        "video_too_large": 413,
        "video_time_budget": 413,
    }

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = self.STATUS_BY_CODE.get(code, 400)


class ModelError(ModerationError, RuntimeError):
    """The CLIP model could not be built: unknown architecture, bad checkpoint."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights are neither cached nor downloadable nor a readable file."""


class ModelMismatchError(ModerationError, ValueError):
    """Calibrated thresholds are about to be used with a model they were not fitted on, or a
    policy with vectors another model made."""

    code = "model_mismatch"
    status = 422


class NotFound(ModerationError, LookupError):
    """A thing named by its id (a decision, a policy version, a review item) is not there."""

    code = "not_found"
    status = 404


class InvalidRequest(ModerationError, ValueError):
    """A request the caller must change: ``code`` and ``status`` per instance (a service's
    400s, 413s and 415s), and any ``extra`` fields for the answer."""

    def __init__(self, status: int, code: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.extra = extra

    def details(self) -> dict[str, object]:
        return dict(self.extra)
