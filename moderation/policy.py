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
import os
import reprlib
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
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

from .errors import PolicyError, PolicyLimitError, UnknownProfile

if TYPE_CHECKING:
    from .views import CropGrid

__all__ = [
    "Action",
    "Goal",
    "Target",
    "Category",
    "ModelSpec",
    "Policy",
    "PolicyLimits",
    "Threshold",
    "Persistence",
    "VideoViews",
    "Views",
    "load_policy",
    "parse_policy",
]

PLACEHOLDER = "{}"
DEFAULT_PROFILE = "default"

#: the longest excerpt of a value a fault message prints
EXCERPT_CHARS = 80
#: the longest key a key path prints
KEY_CHARS = 40

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = EXCERPT_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 8
_REPR.maxlevel = 3


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to at most ``limit`` characters, without ever building the whole
    repr: a fault message never prints more than a short excerpt of what a policy holds."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _key(key: Any) -> str:
    """A key as a key path prints it (cut to :data:`KEY_CHARS`)."""
    text = str(key) if isinstance(key, str) else excerpt(key, KEY_CHARS)
    return text if len(text) <= KEY_CHARS else text[: KEY_CHARS - 1] + "…"


@dataclass(frozen=True)
class PolicyLimits:
    """The work one policy may cost; past a limit it is refused with a
    :class:`~moderation.errors.PolicyLimitError`: its size before it is parsed, its nesting
    and aliases while its YAML is read (before any value is built), its counts before it is
    validated, and the new prompts of a dry-run before any is encoded.

    Each field is also a service setting: ``MODERATION_POLICY_`` + its name in capitals.
    The defaults leave room for a policy many times the size of ``policies/default.yaml``
    (5 KB, 9 categories, 83 terms and exceptions, 5 templates).
    """

    #: bytes of the policy text (UTF-8)
    max_bytes: int = 1_048_576
    #: nesting of YAML collections and values (the schema needs 8 at most)
    max_depth: int = 32
    #: YAML aliases (``*name``) in the text
    max_aliases: int = 100
    #: YAML nodes once every alias is expanded: what validation walks (nested anchors can
    #: make a few KB of text stand for gigabytes)
    max_nodes: int = 100_000
    #: categories of the policy
    max_categories: int = 200
    #: terms of one category
    max_terms: int = 500
    #: exceptions of one category
    max_exceptions: int = 500
    #: templates of the policy, and of one category
    max_templates: int = 50
    #: prompts of the whole policy (each category's terms and exceptions × its templates),
    #: each a vector held in memory and encoded once
    max_prompts: int = 20_000
    #: prompts a dry-run may encode (those not yet in the text-embedding cache); at ~0.1 s
    #: each on a CPU, the default keeps a dry-run's encoding under half a minute
    max_new_prompts: int = 256

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"PolicyLimits.{name} must be a positive integer; got {value!r}"
                )

    @staticmethod
    def setting(name: str) -> str:
        """The limit's name, and its service setting."""
        return f"PolicyLimits.{name}, setting MODERATION_POLICY_{name.upper()}"


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
                f"template {excerpt(template)} must contain the placeholder {{}} exactly once "
                "(it is replaced by each term)"
            )
    if len(set(templates)) != len(templates):
        raise ValueError("templates must not repeat")
    return templates


def _check_unique(items: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    repeated = [x for x in items if x in seen or seen.add(x)]  # type: ignore[func-returns-value]
    if repeated:
        raise ValueError(f"{what} listed more than once: {excerpt(sorted(set(repeated)))}")
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


class Views(_Strict):
    """What views of an upload are scored, besides each sampled frame whole (always one)."""

    crops: str = Field(
        default="none",
        description="a grid of crops of each frame, columns x rows (1 to 4 each), such as "
        "2x2; 'none': whole frames only. Each crop is encoded on its own: a 2x2 grid "
        "costs 5 encodings per frame instead of 1",
    )
    overlap: Annotated[float, Field(ge=0.0, le=0.5)] = Field(
        default=0.2, description="the share of a crop's side its neighbour also covers"
    )
    min_side: Annotated[int, Field(ge=32, le=100_000)] = Field(
        default=256, description="no crops are cut from an image whose crops would be "
        "narrower than this many source pixels (the whole image is still scored)"
    )

    @field_validator("crops")
    @classmethod
    def _grid(cls, v: str) -> str:
        from .views import CropGrid

        if v.strip().lower() == "none":
            return "none"
        return str(CropGrid.parse(v))

    def grid(self) -> CropGrid | None:
        from .views import CropGrid

        if self.crops == "none":
            return None
        return CropGrid.parse(self.crops, self.overlap, self.min_side)


class VideoViews(_Strict):
    """Which frames of a video are scored."""

    rate: float = Field(
        default=1.0, gt=0.0, le=30.0,
        description="frames a second sampled (at 0, 1/rate, 2/rate, … s), the last frame "
        "included")
    max_frames: int = Field(
        default=32, ge=1, le=256,
        description="frames scored at most; a longer video has this many spread evenly over "
        "its length, first and last included")
    keyframe_snap_s: float = Field(
        default=0.0, ge=0.0, le=60.0,
        description="seconds a sampled time may move to a keyframe: decoding from a keyframe "
        "skips the frames before it (about 4x less decoding at 1 s; the times reported stay "
        "those of the frames decoded); 0: the frames at the exact times")


class Persistence(_Strict):
    """A video's category fires only when at least ``frames`` sampled frames within
    ``within_s`` seconds cross its threshold (one blurry frame is not a clip)."""

    frames: Annotated[int, Field(ge=1, le=256)] = 1
    within_s: Annotated[float, Field(ge=0.0, le=86_400.0)] = 0.0


class ProbabilityMap(_Strict):
    """A category's score → the probability that an image shows it, fitted on labelled images
    (``moderation calibrate --probabilities``; scikit-learn's isotonic regression or Platt's
    sigmoid). Valid only for ``model`` and the scores of the policy it was fitted under.

    ``isotonic``: piecewise linear through (``scores[i]``, ``probabilities[i]``), flat beyond
    the ends; ``sigmoid``: ``1 / (1 + exp(-(slope * score + intercept)))``. Both never fall
    as the score rises."""

    method: Literal["isotonic", "sigmoid"]
    scores: Annotated[list[Similarity], Field(min_length=1, max_length=2000)] | None = None
    probabilities: Annotated[list[Fraction], Field(min_length=1, max_length=2000)] | None = None
    slope: Annotated[float, Field(gt=0.0, le=1e6)] | None = None
    intercept: Annotated[float, Field(ge=-1e6, le=1e6)] | None = None
    model: Text = Field(description="identity of the model the map was fitted with")
    date: dt.date
    dataset: DatasetInfo
    ece: Fraction = Field(description="expected calibration error on the held-out split")
    bins: Annotated[int, Field(ge=2, le=100)] = 10
    split: str | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> ProbabilityMap:
        if self.method == "isotonic":
            if self.scores is None or self.probabilities is None or (
                    self.slope is not None or self.intercept is not None):
                raise ValueError("an isotonic map has scores and probabilities (and no slope "
                                 "or intercept)")
            if len(self.scores) != len(self.probabilities):
                raise ValueError(f"scores ({len(self.scores)}) and probabilities "
                                 f"({len(self.probabilities)}) differ in length")
            if any(b <= a for a, b in zip(self.scores, self.scores[1:], strict=False)):
                raise ValueError("scores must rise strictly")
            if any(b < a for a, b in zip(self.probabilities, self.probabilities[1:],
                                         strict=False)):
                raise ValueError("probabilities must never fall as the score rises")
        elif self.slope is None or self.intercept is None or (
                self.scores is not None or self.probabilities is not None):
            raise ValueError("a sigmoid map has slope (> 0) and intercept (and no scores or "
                             "probabilities)")
        return self

    def of(self, scores: Any) -> np.ndarray:
        """The probabilities of ``scores`` (any shape), float64."""
        s = np.asarray(scores, dtype=np.float64)
        if self.method == "isotonic":
            assert self.scores is not None and self.probabilities is not None
            return np.interp(s, self.scores, self.probabilities)
        assert self.slope is not None and self.intercept is not None
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-(self.slope * s + self.intercept)))

    def __call__(self, score: float) -> float:
        return float(self.of(score))


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
    crops: bool | None = Field(
        default=None, description="whether this category's score also takes the policy's "
        "crops (views.crops) into its maximum; default: when the policy has crops"
    )
    persistence: Persistence | None = Field(
        default=None, description="videos: fire only when at least this many sampled frames "
        "within this many seconds cross the threshold (default: any one frame)"
    )
    probability: ProbabilityMap | None = Field(
        default=None, description="score → probability, fitted by moderation calibrate "
        "--probabilities (results say 'uncalibrated' without one)"
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
            raise ValueError(f"these are both terms and exceptions: {excerpt(sorted(overlap))}")
        return self


#: a Misskey class name (its sensitive-media detectors answer nsfw and safe, or nsfwjs's classes)
ClassName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")]


class MisskeyClasses(_Strict):
    """What ``POST /v1/detect-images`` answers Misskey: each class's probability is the
    largest fitted probability of its categories; ``rest`` (such as ``safe``), when named, is
    one minus the largest of the others."""

    classes: Annotated[dict[ClassName, Annotated[list[CategoryId], Field(min_length=1)]],
                       Field(min_length=1, max_length=32)] = Field(
        description="Misskey class name (nsfw; or Porn, Hentai, Sexy, …) → the categories "
        "whose probability it takes")
    rest: ClassName | None = Field(default="safe",
                                   description="the class of everything else (null: none)")

    @model_validator(mode="after")
    def _rest_is_its_own(self) -> MisskeyClasses:
        if self.rest is not None and self.rest in self.classes:
            raise ValueError(f"rest class {self.rest!r} is also one of the classes")
        return self


class Integrations(_Strict):
    """How platform hooks read this policy's decisions."""

    misskey: MisskeyClasses | None = None


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
    views: Views | None = Field(
        default=None, description="the views of an upload that are scored: crops of each "
        "frame for small objects (default: whole frames only)",
    )
    video: VideoViews | None = Field(
        default=None, description="which frames of a video are scored (default: 1 a second, "
        "at most 32)",
    )
    integrations: Integrations | None = Field(
        default=None, description="how platform hooks read decisions: Misskey's classes "
        "(README: platform integrations)",
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
                    faults.append(f"profiles.{_key(name)}.{_key(cid)}: no such category")
                elif threshold.review_from is not None and category.action != "block":
                    faults.append(
                        f"profiles.{_key(name)}.{_key(cid)}.review_from: only meaningful with "
                        "action "
                        f"'block' (the category's action is '{category.action}')"
                    )
        misskey = self.integrations.misskey if self.integrations is not None else None
        for name, cids in (misskey.classes.items() if misskey is not None else ()):
            for cid in cids:
                if cid not in self.categories:
                    faults.append(f"integrations.misskey.classes.{_key(name)}: no such "
                                  f"category {excerpt(cid)}")
        for cid, category in self.categories.items():
            if category.crops and self.crop_grid is None:
                faults.append(
                    f"categories.{_key(cid)}.crops: the policy cuts no crops; set views.crops "
                    "(such as 2x2) for the crops this category would take"
                )
        if faults:
            raise ValueError("; ".join(faults))
        return self

    @property
    def crop_grid(self) -> CropGrid | None:
        """The crops cut from each frame (``None``: whole frames only)."""
        return self.views.grid() if self.views is not None else None

    def uses_crops(self, category_id: str) -> bool:
        """Whether a category's score is its maximum over the crops as well as the frames."""
        if self.crop_grid is None:
            return False
        own = self.categories[category_id].crops
        return True if own is None else own

    def views_cost(self, category_id: str | None = None) -> int:
        """Encodings per frame: 1 (the frame) plus the crops (of ``category_id``: 0 when it
        takes none), when the image is large enough to be cut."""
        grid = self.crop_grid
        if grid is None or (category_id is not None and not self.uses_crops(category_id)):
            return 1
        return 1 + (grid.tiles if grid.tiles > 1 else 0)

    def _views_decisive(self, *, decisions: bool = False) -> dict[str, Any]:
        """What the views change in scores (and, with ``decisions``, in decisions: the
        persistence rules); nothing for what a policy leaves at its default, so that a policy
        without views keeps the version it always had."""
        out: dict[str, Any] = {}
        grid = self.crop_grid
        if grid is not None:
            out["views"] = [str(grid), grid.overlap, grid.min_side,
                            sorted(c for c in self.categories if self.uses_crops(c))]
        if self.video is not None:
            out["video"] = [self.video.rate, self.video.max_frames, self.video.keyframe_snap_s]
        persistence = {cid: [c.persistence.frames, c.persistence.within_s]
                       for cid, c in sorted(self.categories.items())
                       if c.persistence is not None and c.persistence.frames > 1}
        if decisions and persistence:
            out["persistence"] = persistence
        return out

    def persistence_of(self, category_id: str) -> Persistence | None:
        """A category's persistence rule for videos (``None``: any one frame fires)."""
        rule = self.categories[category_id].persistence
        return rule if rule is not None and rule.frames > 1 else None

    @property
    def video_views(self) -> VideoViews:
        """Which frames of a video are scored."""
        return self.video or VideoViews()

    def profile_names(self) -> list[str]:
        """``default`` (the categories' own thresholds), then the named profiles."""
        return [DEFAULT_PROFILE, *self.profiles]

    def check_profile(self, profile: str | None) -> None:
        """Raise :class:`PolicyError` unless ``profile`` is ``None``, ``default`` or one of
        the policy's calibration profiles."""
        if profile not in (None, DEFAULT_PROFILE) and profile not in self.profiles:
            raise UnknownProfile(
                f"unknown calibration profile {excerpt(profile)}; this policy has: "
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
                    **({"probability": c.probability.model_dump(
                        mode="json", include={"method", "scores", "probabilities", "slope",
                                              "intercept"})}
                       if c.probability is not None else {}),
                }
                for cid, c in sorted(self.categories.items())
            },
            **({"integrations": self.integrations.model_dump(mode="json")}
               if self.integrations is not None else {}),
            "profiles": {
                name: {cid: [t.value, t.review_from] for cid, t in sorted(thresholds.items())}
                for name, thresholds in sorted(self.profiles.items())
            },
            **self._views_decisive(decisions=True),
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
            **self._views_decisive(),
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
        for cid, c in self.categories.items():
            if c.probability is not None:
                found[f"{cid} probability"] = c.probability.model
        return found


# --- loading -------------------------------------------------------------------------------

#: the most faults one error lists (the count says how many more there were)
MAX_FAULTS = 50
#: the longest fault line
FAULT_CHARS = 400


class _Refused(Exception):
    """A limit was reached while reading the YAML (turned into a PolicyLimitError)."""


class _PolicyLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys instead of keeping the last silently,
    and refuses, while it composes the document and before it builds any value, nesting past
    ``limits.max_depth``, more than ``limits.max_aliases`` aliases, and a document that would
    be more than ``limits.max_nodes`` nodes once its aliases are expanded."""

    def __init__(self, stream: str, limits: PolicyLimits) -> None:
        super().__init__(stream)  # the reader refuses characters YAML forbids, here
        self.limits = limits
        self.duplicates: list[str] = []
        self.aliases = 0
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > self.limits.max_aliases:
                line = self.peek_event().start_mark.line + 1
                raise _Refused(
                    f"line {line}: more than {self.limits.max_aliases:,} aliases (*name); "
                    f"the limit is {self.limits.max_aliases:,} "
                    f"({PolicyLimits.setting('max_aliases')})"
                )
            return super().compose_node(parent, index)
        self.depth += 1
        try:
            if self.depth > self.limits.max_depth:
                line = self.peek_event().start_mark.line + 1
                raise _Refused(
                    f"line {line}: nested more than {self.limits.max_depth} levels deep; the "
                    f"limit is {self.limits.max_depth} ({PolicyLimits.setting('max_depth')})"
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self._measure(node)
        return self.construct_document(node)

    def _measure(self, root: yaml.Node) -> None:
        """Refuse a document whose expansion (every alias replaced by what it names) is
        deeper than ``max_depth`` or larger than ``max_nodes``, or refers to itself: sizes
        are summed once per node, not once per use, so this costs the text's size."""
        size: dict[int, int] = {}
        height: dict[int, int] = {}
        open_: set[int] = set()
        stack: list[tuple[yaml.Node, bool]] = [(root, False)]
        while stack:
            node, finished = stack.pop()
            key = id(node)
            children = _children(node)
            if finished:
                open_.discard(key)
                size[key] = 1 + sum(size[id(c)] for c in children)
                height[key] = 1 + max((height[id(c)] for c in children), default=0)
                if size[key] > self.limits.max_nodes:
                    raise _Refused(
                        f"line {node.start_mark.line + 1}: more than "
                        f"{self.limits.max_nodes:,} values once its aliases are expanded; "
                        f"the limit is {self.limits.max_nodes:,} "
                        f"({PolicyLimits.setting('max_nodes')})"
                    )
                if height[key] > self.limits.max_depth:
                    raise _Refused(
                        f"line {node.start_mark.line + 1}: nested more than "
                        f"{self.limits.max_depth} levels deep once its aliases are expanded; "
                        f"the limit is {self.limits.max_depth} "
                        f"({PolicyLimits.setting('max_depth')})"
                    )
                continue
            if key in size:
                continue
            if key in open_:
                raise yaml.composer.ComposerError(
                    None, None, "an alias names a collection that contains it",
                    node.start_mark,
                )
            open_.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as e:  # a date of month 13, an int
            raise yaml.constructor.ConstructorError(  # of 5,000 digits…
                None, None, f"cannot read this value: {e}", node.start_mark
            ) from e

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges, not a key
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: the SafeLoader says so below
                continue
            if repeated:
                self.duplicates.append(
                    f"line {key_node.start_mark.line + 1}: duplicate key {excerpt(key)}"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


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
            parts.append(("." if parts else "") + _key(item))
    return "".join(parts) or "(top level)"


def _format_error(err: Any) -> str:
    message = _MESSAGES.get(err["type"])
    if err["type"] == "string_pattern_mismatch" and err["loc"][-1] == "[key]":
        message = (
            f"{excerpt(err['input'])} is not snake_case (lowercase letters and digits, words "
            "joined by single underscores, starting with a letter)"
        )
    elif err["type"] == "union_tag_invalid":  # pydantic's message holds the tag in full
        ctx = err.get("ctx", {})
        message = (
            f"{ctx.get('discriminator', 'the tag')} is {excerpt(ctx.get('tag'))}; expected "
            f"one of {ctx.get('expected_tags')}"
        )
    elif message is None:
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("value_error", "assertion_error") and "input" in err:
            message += f" (got {excerpt(err['input'])})"
    return f"{_format_loc(err['loc'])}: {message}"


def _clip(text: str, limit: int = FAULT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _count_faults(data: dict[Any, Any], limits: PolicyLimits) -> list[str]:
    """What the raw document asks for past ``limits``: categories, terms, exceptions,
    templates and prompts, counted before validation (and so before any encoding). Values of
    the wrong type are left to validation."""
    faults: list[str] = []

    def over(where: str, n: int, what: str, name: str) -> None:
        limit = getattr(limits, name)
        if n > limit:
            faults.append(f"{where}: {n:,} {what}; the limit is {limit:,} "
                          f"({PolicyLimits.setting(name)})")

    def count(value: Any) -> int:
        return len(value) if isinstance(value, list) else 0

    templates = count(data.get("templates"))
    over("templates", templates, "templates", "max_templates")
    categories = data.get("categories")
    if not isinstance(categories, dict):
        return faults
    over("categories", len(categories), "categories", "max_categories")
    if faults:
        return faults
    prompts = 0
    for cid, category in categories.items():
        if not isinstance(category, dict):
            continue
        where = f"categories.{_key(cid)}"
        terms, exceptions = count(category.get("terms")), count(category.get("exceptions"))
        own = count(category.get("templates"))
        over(f"{where}.terms", terms, "terms", "max_terms")
        over(f"{where}.exceptions", exceptions, "exceptions", "max_exceptions")
        over(f"{where}.templates", own, "templates", "max_templates")
        prompts += (terms + exceptions) * (own or templates)
    over("categories", prompts, "prompts (terms and exceptions × their templates)",
         "max_prompts")
    return faults


def parse_policy(
    text: str,
    source: str = "<policy>",
    base_dir: Path | None = None,
    *,
    limits: PolicyLimits | None = None,
    confine: bool = False,
) -> Policy:
    """Validate policy YAML ``text``; ``source`` names it in error messages.

    ``base_dir``: the folder a checkpoint, export or architecture path in ``model`` is
    relative to. ``confine``: such a path must stay inside ``base_dir`` (a policy proposed
    over the network, not the operator's own file); one that leaves it is refused without
    looking at the file system. ``limits`` (default: :class:`PolicyLimits`'s) bound the work.

    Raises :class:`PolicyError` listing every fault as ``"<source>: <key path>: <message>"``
    (:class:`PolicyLimitError` when it is over a limit). A fault never prints more than a
    short excerpt of a value, nor a path as the server resolved it.
    """
    limits = limits or PolicyLimits()
    size = None
    if len(text) > limits.max_bytes:  # a character is at least a byte: not even encoded
        size = f"at least {len(text):,}"
    elif len(text) * 4 > limits.max_bytes:  # a character is at most four
        n_bytes = len(text.encode("utf-8", "surrogatepass"))
        size = f"{n_bytes:,}" if n_bytes > limits.max_bytes else None
    if size is not None:
        raise _limit_error(source, f"{source}: the policy is {size} bytes; the limit is "
                           f"{limits.max_bytes:,} ({PolicyLimits.setting('max_bytes')})")
    try:
        loader = _PolicyLoader(text, limits)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except _Refused as e:
        raise _limit_error(source, f"{source}: {e}") from None
    except yaml.YAMLError as e:  # a forbidden character comes with its position
        raise PolicyError(f"{source}: not valid YAML: {_clip(str(e))}") from e
    except RecursionError:
        raise PolicyError(f"{source}: not valid YAML: nested too deeply") from None
    except (ValueError, TypeError) as e:
        raise PolicyError(f"{source}: not valid YAML: {_clip(str(e))}") from e
    faults = [f"{source}: {d}" for d in loader.duplicates]
    if not isinstance(data, dict):
        faults.append(f"{source}: (top level): expected a mapping of policy keys, "
                      f"got {type(data).__name__}")
        raise PolicyError(_summary(source, faults), faults)
    over = _count_faults(data, limits)
    if over:
        over = [f"{source}: {f}" for f in over]
        raise PolicyLimitError(_summary(source, over), over)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        faults += [f"{source}: {_format_error(err)}" for err in e.errors()]
        raise PolicyError(_summary(source, faults), _shown(faults)) from e
    except RecursionError:
        faults.append(f"{source}: (top level): nested too deeply")
        raise PolicyError(_summary(source, faults), faults) from None
    if faults:
        raise PolicyError(_summary(source, faults), _shown(faults))
    if base_dir is not None:
        policy = _resolve_paths(policy, base_dir, source, confine)
    return policy


def _limit_error(source: str, fault: str) -> PolicyLimitError:
    return PolicyLimitError(_summary(source, [fault]), [fault])


def _probe(path: Path, backend: str) -> bool:
    """Whether ``path`` is a checkpoint file (or, for onnx, an export folder); a name the
    file system refuses (too long, a NUL byte) is not."""
    try:
        return path.is_file() or (backend == "onnx" and path.is_dir())
    except (OSError, ValueError):
        return False


def _confined(base_dir: Path, value: str, key: str, source: str) -> Path:
    """``base_dir / value``; a value that would leave ``base_dir`` is refused, naming the
    value as written (never as resolved) and without looking at the file system."""
    base = os.path.normpath(os.path.abspath(base_dir))
    joined = os.path.normpath(os.path.join(base, value))
    if value.startswith("~") or os.path.commonpath([base, joined]) != base:
        raise PolicyError(
            f"{source}: model.{key}: {excerpt(value)} is outside the policy's folder: a "
            "proposed policy may only name a file (or export folder) by a relative path that "
            "stays inside it, or a pretrained tag"
        )
    return Path(joined)


def _resolve_paths(policy: Policy, base_dir: Path, source: str = "<policy>",
                   confine: bool = False) -> Policy:
    """Make a checkpoint or config path in ``model`` absolute, relative to the policy file
    (inside ``base_dir`` only, when ``confine``)."""
    spec = policy.model
    pretrained = spec.pretrained
    candidate = (_confined(base_dir, pretrained, "pretrained", source) if confine
                 else base_dir / pretrained)
    if _probe(candidate, spec.backend):
        pretrained = str(candidate.resolve())
    config = spec.config
    if config is not None:
        config_path = (_confined(base_dir, config, "config", source) if confine
                       else base_dir / config)
        try:
            found = config_path.is_file()
        except (OSError, ValueError):
            found = False
        if not found:
            raise PolicyError(
                f"{source}: model.config: architecture file {excerpt(config)} does not "
                "exist (a path relative to the policy file's folder)",
            )
        config = str(config_path.resolve())
    model = spec.model_copy(update={"pretrained": pretrained, "config": config})
    return policy.model_copy(update={"model": model})


def _shown(faults: list[str]) -> list[str]:
    """At most :data:`MAX_FAULTS` faults, each cut to :data:`FAULT_CHARS`."""
    shown = [_clip(f) for f in faults[:MAX_FAULTS]]
    if len(faults) > MAX_FAULTS:
        shown.append(f"… and {len(faults) - MAX_FAULTS:,} more faults")
    return shown


def _summary(source: str, faults: list[str]) -> str:
    noun = "fault" if len(faults) == 1 else "faults"
    return f"{source} is not a valid policy ({len(faults)} {noun}):\n" + "\n".join(
        f"  - {f}" for f in _shown(faults)
    )


def load_policy(path: str | Path, *, limits: PolicyLimits | None = None) -> Policy:
    """Read and validate the policy file at ``path``.

    Raises :class:`PolicyError` (a ``ValueError``) listing every fault with its key path;
    :class:`PolicyLimitError` for a file over ``limits.max_bytes`` (read no further).
    """
    path = Path(path)
    limits = limits or PolicyLimits()
    try:
        with path.open("rb") as f:
            raw = f.read(limits.max_bytes + 1)  # a FIFO or /dev/zero stops here too
    except OSError as e:
        raise PolicyError(f"{path}: cannot read policy file: {e.strerror or e}") from e
    if len(raw) > limits.max_bytes:
        raise _limit_error(path.name, f"{path.name}: the policy file is over "
                           f"{limits.max_bytes:,} bytes; the limit is {limits.max_bytes:,} "
                           f"({PolicyLimits.setting('max_bytes')})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"{path}: policy file is not UTF-8 text: {e}") from e
    return parse_policy(text, source=path.name, base_dir=path.parent, limits=limits)
