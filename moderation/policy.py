"""Policy files: the schema, strict validation, and the policy version.

A policy is data, never code: it names the model, the prompt templates, and per category the
terms that describe what is not allowed, the exceptions that look alike but are allowed, the
action to take and the threshold (with where that threshold came from). This is the only
module that reads policy YAML.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import PolicyError

__all__ = [
    "Action",
    "Goal",
    "Target",
    "Category",
    "ModelSpec",
    "Policy",
    "Threshold",
    "load_policy",
    "parse_policy",
]

PLACEHOLDER = "{}"
DEFAULT_PROFILE = "default"


class Action(str, Enum):
    """What happens to an image, from least to most severe.

    ``allow``: nothing fired. ``flag``: allowed but labelled (e.g. blur, age-gate).
    ``review``: held for a human. ``block``: rejected.
    """

    ALLOW = "allow"
    FLAG = "flag"
    REVIEW = "review"
    BLOCK = "block"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]

    @classmethod
    def of_severity(cls, severity: int) -> Action:
        """The action of a severity level (0: allow … 3: block)."""
        return _BY_SEVERITY[int(severity)]


_SEVERITY = {Action.ALLOW: 0, Action.FLAG: 1, Action.REVIEW: 2, Action.BLOCK: 3}
_BY_SEVERITY = {level: action for action, level in _SEVERITY.items()}

CategoryId = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Similarity = Annotated[float, Field(ge=-1.0, le=1.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which CLIP model scores images. Thresholds hold only for this model."""

    name: Text = Field(description="open_clip architecture, e.g. ViT-B-32")
    pretrained: Text = Field(
        description="open_clip pretrained tag (e.g. laion2b_s34b_b79k) or a checkpoint file "
        "path, relative to the policy file"
    )
    config: str | None = Field(
        default=None,
        description="optional open_clip architecture JSON for a custom architecture, "
        "relative to the policy file",
    )
    backend: Literal["torch", "onnx"] = Field(
        default="torch",
        description="torch: open_clip on PyTorch; onnx: a folder 'moderation model export' "
        "wrote (pretrained is its path, relative to the policy file)",
    )


class DatasetInfo(_Strict):
    name: str | None = None
    fingerprint: Text
    positives: Annotated[int, Field(ge=0)]
    negatives: Annotated[int, Field(ge=0)]


class CalibrationTarget(_Strict):
    precision: Fraction | None = None
    recall: Fraction | None = None


class Achieved(_Strict):
    precision: Fraction
    recall: Fraction
    precision_interval: tuple[Fraction, Fraction] | None = None
    recall_interval: tuple[Fraction, Fraction] | None = None
    split: str | None = None


class Uncalibrated(_Strict):
    """A hand-picked default: meaningful only as a starting point."""

    source: Literal["uncalibrated"] = "uncalibrated"
    note: str | None = None


class Calibrated(_Strict):
    """A threshold fitted on labelled data, valid only for ``model``."""

    source: Literal["calibrated"]
    model: Text = Field(description="identity of the model the threshold was fitted with")
    date: dt.date
    dataset: DatasetInfo
    target: CalibrationTarget
    achieved: Achieved
    note: str | None = None


class Threshold(_Strict):
    """Where a category's score starts to trigger its action.

    ``value`` is in score units (see ``moderation.scoring``): the action applies when
    ``score >= value``. ``review_from`` (only with action ``block``) opens a review band:
    scores in ``[review_from, value)`` are sent to review instead of being allowed.
    """

    value: Similarity
    review_from: Similarity | None = None
    provenance: Annotated[Uncalibrated | Calibrated, Field(discriminator="source")] = (
        Uncalibrated()
    )

    @model_validator(mode="after")
    def _band_is_ordered(self) -> Threshold:
        if self.review_from is not None and self.review_from >= self.value:
            raise ValueError(
                f"review_from ({self.review_from}) must be below value ({self.value}): "
                "the review band is [review_from, value)"
            )
        return self


def _check_templates(templates: list[str]) -> list[str]:
    for template in templates:
        if template.count(PLACEHOLDER) != 1:
            raise ValueError(
                f"template {template!r} must contain the placeholder {{}} exactly once "
                "(it is replaced by each term)"
            )
    if len(set(templates)) != len(templates):
        raise ValueError("templates must not repeat")
    return templates


def _check_unique(items: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    repeated = [x for x in items if x in seen or seen.add(x)]  # type: ignore[func-returns-value]
    if repeated:
        raise ValueError(f"{what} listed more than once: {sorted(set(repeated))}")
    return items


class Goal(_Strict):
    """One calibration target: a minimum precision (maximise recall subject to it) or a
    minimum recall (maximise precision subject to it)."""

    precision: Fraction | None = None
    recall: Fraction | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Goal:
        if (self.precision is None) == (self.recall is None):
            raise ValueError("give exactly one of precision or recall")
        return self


class Target(Goal):
    """What calibration aims for: the threshold ``value`` meets this goal; with action
    ``block``, ``review`` optionally places ``review_from`` to meet a second goal."""

    review: Goal | None = None


class Category(_Strict):
    description: Text
    terms: Annotated[list[Text], Field(min_length=1)]
    exceptions: list[Text] = Field(default_factory=list)
    templates: Annotated[list[str], Field(min_length=1)] | None = None
    action: Literal["flag", "review", "block"]
    threshold: Threshold
    target: Target | None = Field(
        default=None, description="calibration target for this category's threshold"
    )

    @field_validator("terms", "exceptions")
    @classmethod
    def _no_repeats(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return _check_unique(v, str(info.field_name))

    @field_validator("templates")
    @classmethod
    def _templates_have_placeholder(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _check_templates(v)

    @model_validator(mode="after")
    def _band_needs_block(self) -> Category:
        if self.target is not None and self.target.review is not None and self.action != "block":
            raise ValueError(
                f"target.review is only meaningful with action 'block' (got action "
                f"'{self.action}')"
            )
        if self.threshold.review_from is not None and self.action != "block":
            raise ValueError(
                f"threshold.review_from is only meaningful with action 'block' "
                f"(got action '{self.action}')"
            )
        overlap = set(self.terms) & set(self.exceptions)
        if overlap:
            raise ValueError(f"these are both terms and exceptions: {sorted(overlap)}")
        return self


class Policy(_Strict):
    """A validated policy. Build it with :func:`load_policy`; fields are read-only."""

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str | None = None
    model: ModelSpec
    templates: Annotated[list[str], Field(min_length=1)]
    top_terms: Annotated[int, Field(ge=1, le=20)] = 3
    categories: Annotated[dict[CategoryId, Category], Field(min_length=1)]
    profiles: dict[CategoryId, dict[CategoryId, Threshold]] = Field(
        default_factory=dict,
        description="named calibration profiles (e.g. marketplace, avatars): per category, a "
        "threshold that replaces the category's own when a request names the profile",
    )

    @field_validator("templates")
    @classmethod
    def _templates_have_placeholder(cls, v: list[str]) -> list[str]:
        return _check_templates(v)

    @model_validator(mode="after")
    def _profiles_name_known_categories(self) -> Policy:
        faults = []
        if DEFAULT_PROFILE in self.profiles:
            faults.append(
                f"profiles.{DEFAULT_PROFILE}: the name is reserved for the categories' own "
                "thresholds"
            )
        for name, thresholds in self.profiles.items():
            for cid, threshold in thresholds.items():
                category = self.categories.get(cid)
                if category is None:
                    faults.append(f"profiles.{name}.{cid}: no such category")
                elif threshold.review_from is not None and category.action != "block":
                    faults.append(
                        f"profiles.{name}.{cid}.review_from: only meaningful with action "
                        f"'block' (the category's action is '{category.action}')"
                    )
        if faults:
            raise ValueError("; ".join(faults))
        return self

    def profile_names(self) -> list[str]:
        """``default`` (the categories' own thresholds), then the named profiles."""
        return [DEFAULT_PROFILE, *self.profiles]

    def check_profile(self, profile: str | None) -> None:
        """Raise :class:`PolicyError` unless ``profile`` is ``None``, ``default`` or one of
        the policy's calibration profiles."""
        if profile not in (None, DEFAULT_PROFILE) and profile not in self.profiles:
            raise PolicyError(
                f"unknown calibration profile {profile!r}; this policy has: "
                f"{', '.join(self.profile_names())}"
            )

    def threshold_for(self, category_id: str, profile: str | None = None) -> Threshold:
        """The threshold of a category under ``profile`` (``None``: the default profile)."""
        self.check_profile(profile)
        if profile is not None and profile != DEFAULT_PROFILE:
            override = self.profiles[profile].get(category_id)
            if override is not None:
                return override
        return self.categories[category_id].threshold

    def templates_for(self, category_id: str) -> list[str]:
        """The templates a category's terms and exceptions are expanded with."""
        return self.categories[category_id].templates or self.templates

    @cached_property
    def version(self) -> str:
        """A stable hash of everything that affects decisions (not descriptions or notes)."""
        decisive: dict[str, Any] = {
            "model": self.model.model_dump(mode="json"),
            "categories": {
                cid: {
                    "terms": c.terms,
                    "exceptions": c.exceptions,
                    "templates": self.templates_for(cid),
                    "action": c.action,
                    "threshold": [c.threshold.value, c.threshold.review_from],
                }
                for cid, c in sorted(self.categories.items())
            },
            "profiles": {
                name: {cid: [t.value, t.review_from] for cid, t in sorted(thresholds.items())}
                for name, thresholds in sorted(self.profiles.items())
            },
        }
        blob = json.dumps(decisive, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @cached_property
    def scores_version(self) -> str:
        """A hash of what determines scores (model, templates, terms, exceptions), not
        thresholds: scores saved under one scores_version can be calibrated again."""
        decisive = {
            "model": self.model.model_dump(mode="json"),
            "categories": {
                cid: [c.terms, c.exceptions, self.templates_for(cid)]
                for cid, c in sorted(self.categories.items())
            },
        }
        blob = json.dumps(decisive, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def calibrated_models(self) -> dict[str, str]:
        """Where → model identity, for every threshold fitted on data.

        Keys are category ids for the default profile, ``profile/category`` for the others.
        """
        found = {
            cid: c.threshold.provenance.model
            for cid, c in self.categories.items()
            if isinstance(c.threshold.provenance, Calibrated)
        }
        for name, thresholds in self.profiles.items():
            for cid, t in thresholds.items():
                if isinstance(t.provenance, Calibrated):
                    found[f"{name}/{cid}"] = t.provenance.model
        return found


# --- loading -------------------------------------------------------------------------------


class _DuplicateKeyLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys instead of keeping the last silently."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                self.duplicates.append(
                    f"line {key_node.start_mark.line + 1}: duplicate key {key!r}"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "missing key",
    "too_short": "must not be empty",
}


def _format_loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item == "[key]":
            continue  # the key itself is at fault; the message says so
        elif item in ("uncalibrated", "calibrated") and parts and parts[-1] == ".provenance":
            continue  # pydantic's name for the union branch, not a key in the file
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _format_error(err: Any) -> str:
    message = _MESSAGES.get(err["type"])
    if err["type"] == "string_pattern_mismatch" and err["loc"][-1] == "[key]":
        message = (
            f"{err['input']!r} is not snake_case (lowercase letters and digits, words "
            "joined by single underscores, starting with a letter)"
        )
    elif message is None:
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("value_error", "assertion_error") and "input" in err:
            message += f" (got {err['input']!r})"
    return f"{_format_loc(err['loc'])}: {message}"


def parse_policy(text: str, source: str = "<policy>", base_dir: Path | None = None) -> Policy:
    """Validate policy YAML ``text``; ``source`` names it in error messages.

    Raises :class:`PolicyError` listing every fault as ``"<source>: <key path>: <message>"``.
    """
    loader = _DuplicateKeyLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        raise PolicyError(f"{source}: not valid YAML: {e}") from e
    finally:
        loader.dispose()
    faults = [f"{source}: {d}" for d in loader.duplicates]
    if not isinstance(data, dict):
        faults.append(f"{source}: (top level): expected a mapping of policy keys, "
                      f"got {type(data).__name__}")
        raise PolicyError(_summary(source, faults), faults)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        faults += [f"{source}: {_format_error(err)}" for err in e.errors()]
        raise PolicyError(_summary(source, faults), faults) from e
    if faults:
        raise PolicyError(_summary(source, faults), faults)
    if base_dir is not None:
        policy = _resolve_paths(policy, base_dir)
    return policy


def _resolve_paths(policy: Policy, base_dir: Path) -> Policy:
    """Make a checkpoint or config path in ``model`` absolute, relative to the policy file."""
    spec = policy.model
    pretrained = spec.pretrained
    if (base_dir / pretrained).is_file() or (
            spec.backend == "onnx" and (base_dir / pretrained).is_dir()):
        pretrained = str((base_dir / pretrained).resolve())
    config = spec.config
    if config is not None:
        config_path = (base_dir / config).resolve()
        if not config_path.is_file():
            raise PolicyError(
                f"model.config: architecture file {config_path} does not exist",
            )
        config = str(config_path)
    model = spec.model_copy(update={"pretrained": pretrained, "config": config})
    return policy.model_copy(update={"model": model})


def _summary(source: str, faults: list[str]) -> str:
    noun = "fault" if len(faults) == 1 else "faults"
    return f"{source} is not a valid policy ({len(faults)} {noun}):\n" + "\n".join(
        f"  - {f}" for f in faults
    )


def load_policy(path: str | Path) -> Policy:
    """Read and validate the policy file at ``path``.

    Raises :class:`PolicyError` (a ``ValueError``) listing every fault with its key path.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"{path}: cannot read policy file: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise PolicyError(f"{path}: policy file is not UTF-8 text: {e}") from e
    return parse_policy(text, source=path.name, base_dir=path.parent)
