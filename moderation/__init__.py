"""Zero-shot image moderation: YAML policies, CLIP prompt ensembles, explained decisions.

    >>> from moderation import Moderator
    >>> moderator = Moderator.from_policy("policies/default.yaml")
    >>> [result] = moderator.moderate(["upload.jpg"])
    >>> result.to_dict()["action"]
    'allow'

The encoder (and so torch) is imported only when a model is loaded.
"""

from .backends import EncoderSpec
from .decision import CategoryDecision, Decision, TermMatch
from .errors import (
    ImageError,
    InvalidRequest,
    ModelError,
    ModelMismatchError,
    ModerationError,
    NotFound,
    PolicyError,
    PolicyLimitError,
    UnknownProfile,
    WeightsUnavailableError,
)
from .moderator import ModerationResult, Moderator
from .policy import Action, Policy, PolicyLimits, load_policy

__all__ = [
    "Action",
    "CategoryDecision",
    "Decision",
    "EncoderSpec",
    "ImageError",
    "InvalidRequest",
    "ModelError",
    "ModelMismatchError",
    "ModerationError",
    "ModerationResult",
    "NotFound",
    "Moderator",
    "Policy",
    "PolicyError",
    "PolicyLimitError",
    "UnknownProfile",
    "PolicyLimits",
    "TermMatch",
    "WeightsUnavailableError",
    "load_policy",
]
