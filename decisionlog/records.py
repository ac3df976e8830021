"""One record type for a stored decision, built from the typed moderation result.

``DecisionRecord`` is what is written (with every sampled frame's embedding) and what is read
back; its JSON view (``/v1/decisions``, the JSONL export), its CSV view (``csv_row``) and the
OpenAPI schema (``view_schema``) all come from the same fields.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, computed_field

from moderation import ModerationResult
from moderation.decision import CategoryDecision
from moderation.views import View

__all__ = [
    "CSV_COLUMNS",
    "CategoryOutcome",
    "DecisionRecord",
    "ImageRef",
    "PolicyRef",
    "TermScore",
    "spreadsheet_safe",
]

StoredAction = Literal["allow", "flag", "review", "block", "error"]


class TermScore(BaseModel):
    text: str
    similarity: float


class ViewOut(BaseModel):
    """A view of an upload: a frame (its index in the file; its time for a video), whole or
    a crop (``box``: left, top, right, bottom in source pixels, the image upright)."""

    frame: int = Field(ge=0, description="the frame's index in the file")
    time: float | None = Field(None, description="the frame's time in seconds (a video)")
    box: list[int] | None = Field(
        None, min_length=4, max_length=4,
        description="the crop's box [left, top, right, bottom] in source pixels (null: the "
        "whole frame)")

    @classmethod
    def of(cls, v: View) -> ViewOut:
        return cls(frame=v.frame, time=None if v.time is None else round(v.time, 6),
                   box=None if v.box is None else list(v.box))


class BankMatchOut(BaseModel):
    """A hash-bank entry the upload matched (README: hash banks)."""

    bank: str
    action: Literal["allow", "flag", "review", "block"]
    kind: Literal["pdq", "sha256"]
    hash: str = Field(description="the bank's hash (PDQ or SHA-256, hex)")
    distance: int = Field(ge=0, description="Hamming distance of the upload's frame (0: "
                                            "SHA-256, an exact copy)")
    frame: int = Field(0, ge=0, description="the upload's frame that matched")
    note: str | None = None
    source: str | None = None


class FrameHashOut(BaseModel):
    """The PDQ hash of one sampled frame (ThreatExchange/HMA hex)."""

    frame: int = Field(ge=0)
    pdq: str
    quality: int = Field(ge=0, le=100, description="PDQ's quality; under 50, too "
                                                   "featureless to match on")


class CategoryOutcome(BaseModel):
    """One category's outcome, as the response gave it."""

    score: float = Field(description="similarity minus the exception penalty (README)")
    probability: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["uncalibrated"] | None = Field(
        None, description="the score as a probability, by the map moderation calibrate "
        "--probabilities fitted on labelled images; 'uncalibrated' when the policy has none "
        "(null: a decision recorded before probabilities)")
    similarity: float = Field(description="cosine to the category")
    threshold: float
    review_from: float | None = None
    margin: float = Field(description="score - threshold")
    flagged: bool
    action: Literal["allow", "flag", "review", "block"]
    top_terms: list[TermScore]
    closest_exception: TermScore | None = None
    frame: int = Field(0, ge=0, description="the frame the score came from")
    view: ViewOut | None = Field(
        None, description="the view the score came from (null: a decision stored before "
        "views were named)")
    span: list[float] | None = Field(
        None, min_length=2, max_length=2,
        description="a video's category with a persistence rule: the seconds [start, end] of "
        "the sampled frames that crossed (null: no rule, an image, or it did not hold)")

    @classmethod
    def of(cls, c: CategoryDecision) -> CategoryOutcome:
        def term(t: Any) -> TermScore:
            return TermScore(text=t.text, similarity=round(t.similarity, 6))

        return cls(
            score=round(c.score, 6),
            probability="uncalibrated" if c.probability is None else round(c.probability, 6),
            similarity=round(c.similarity, 6),
            threshold=c.threshold,
            review_from=c.review_from,
            margin=round(c.margin, 6),
            flagged=c.flagged,
            action=c.action.value,
            top_terms=[term(t) for t in c.top_terms],
            closest_exception=term(c.closest_exception) if c.closest_exception else None,
            frame=c.frame,
            view=ViewOut.of(c.view or View(c.frame)),
            span=None if c.span is None else [round(t, 6) for t in c.span],
        )


class ImageRef(BaseModel):
    sha256: str
    size: int


class PolicyRef(BaseModel):
    name: str
    version: str


class DecisionRecord(BaseModel):
    """One stored result. ``embeddings`` (float16, one row per entry of ``frames``: every
    sampled frame) is stored beside it and is not part of its views."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    id: str
    created_at: float = Field(description="unix seconds")
    client_id: str | None
    image: ImageRef
    policy: PolicyRef
    model: str
    profile: str
    action: StoredAction
    triggered: list[str]
    categories: dict[str, CategoryOutcome]
    latency_ms: float
    error_code: str | None = None
    frame: int | None = Field(
        None, description="the frame of the most severe category that fired (null: an error)"
    )
    frames_scored: int | None = None
    frames: list[int] = Field(
        default_factory=list, description="the stored key of each view whose embedding is "
        "stored: a frame's index in the file, or -1 - k for the k-th crop"
    )
    views: list[ViewOut] = Field(
        default_factory=list, description="what each entry of frames is (frame, time, crop "
        "box), when the upload had crops or was a video (empty: whole frames only)"
    )
    pdq: list[FrameHashOut] = Field(
        default_factory=list, description="each sampled frame's PDQ hash (empty: not hashed, "
        "a video, or a decision from before hashes)")
    matches: list[BankMatchOut] = Field(
        default_factory=list, description="the hash-bank entries the upload matched, which "
        "joined the classifier's action")
    embeddings: np.ndarray | None = Field(default=None, exclude=True, repr=False)

    @classmethod
    def from_result(
        cls,
        result: ModerationResult,
        *,
        image_sha256: str,
        image_size: int,
        latency_ms: float,
        created_at: float | None = None,
    ) -> DecisionRecord:
        decision = result.decision
        embeddings = (
            np.asarray(result.embeddings, dtype=np.float16)
            if result.embeddings is not None else None
        )
        return cls(
            id=uuid.uuid4().hex,
            created_at=time.time() if created_at is None else created_at,
            client_id=result.id,
            image=ImageRef(sha256=image_sha256, size=image_size),
            policy=PolicyRef(name=result.policy, version=result.policy_version),
            model=result.model,
            profile=result.profile,
            action=decision.action.value if decision is not None else "error",
            triggered=list(decision.triggered) if decision is not None else [],
            categories=(
                {k: CategoryOutcome.of(c) for k, c in decision.categories.items()}
                if decision is not None else {}
            ),
            latency_ms=latency_ms,
            error_code=result.error.code if result.error is not None else None,
            frame=result.frame if decision is not None else None,
            frames_scored=result.frames_scored if decision is not None else None,
            frames=list(result.frames) if embeddings is not None else [],
            views=([ViewOut.of(v) for v in result.views]
                   if embeddings is not None and any(
                       v.is_crop or v.time is not None for v in result.views) else []),
            pdq=([FrameHashOut(frame=f, pdq=h.pdq, quality=h.quality) for f, h in zip(
                [v.frame for v in result.views if not v.is_crop], result.hashes.frames,
                strict=False)] if result.hashes is not None and decision is not None else []),
            matches=([BankMatchOut(**m.to_dict()) for m in decision.matches]
                     if decision is not None else []),
            embeddings=embeddings,
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def flagged(self) -> bool:
        """Whether the action is flag, review or block."""
        return self.action not in ("allow", "error")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DecisionRecord):
            return NotImplemented
        mine, theirs = self.embeddings, other.embeddings
        same_vectors = (mine is None and theirs is None) or (
            mine is not None and theirs is not None and np.array_equal(mine, theirs)
        )
        return same_vectors and self.view() == other.view()

    __hash__ = None  # type: ignore[assignment]  # mutable array inside: not hashable

    # --- views ---------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """The JSON view: ``/v1/decisions``, the JSONL export."""
        return self.model_dump(mode="json")

    def csv_row(self) -> list[Any]:
        """The CSV view, in the order of :data:`CSV_COLUMNS`; no text cell starts a formula
        (:func:`spreadsheet_safe`)."""
        return [spreadsheet_safe(cell) for cell in (
            self.id, self.created_at, self.client_id, self.image.sha256, self.image.size,
            self.policy.name, self.policy.version, self.model, self.profile, self.action,
            ";".join(self.triggered), self.latency_ms, self.error_code or "",
            "" if self.frame is None else self.frame,
            json.dumps({k: v.model_dump(mode="json") for k, v in self.categories.items()}),
            json.dumps([m.model_dump(mode="json") for m in self.matches]),
        )]

    @staticmethod
    def view_schema(ref_template: str = "#/components/schemas/{model}") -> dict[str, Any]:
        """The JSON schema of :meth:`view` and the schemas it refers to (``$defs``)."""
        return DecisionRecord.model_json_schema(mode="serialization", ref_template=ref_template)

    # --- the dead-letter file ------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The view plus the embeddings (base64 float16), for the dead-letter file."""
        out = self.view()
        if self.embeddings is not None:
            out["embeddings"] = base64.b64encode(self.embeddings.tobytes()).decode()
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DecisionRecord:
        if "policy_name" in d:  # a line the first release set aside
            return cls._from_first_release(d)
        d = dict(d)
        blob = d.pop("embeddings", None)
        if blob is not None:
            flat = np.frombuffer(base64.b64decode(blob), dtype=np.float16)
            d["embeddings"] = flat.reshape(len(d["frames"]), -1)
        return cls.model_validate(d)

    @classmethod
    def _from_first_release(cls, d: dict[str, Any]) -> DecisionRecord:
        blob = d.get("embedding")
        return cls(
            id=d["id"], created_at=d["created_at"], client_id=d["client_id"],
            image=ImageRef(sha256=d["image_sha256"], size=d["image_size"]),
            policy=PolicyRef(name=d["policy_name"], version=d["policy_version"]),
            model=d["model"], profile=d["profile"], action=d["action"],
            triggered=d["triggered"],
            categories=d["categories"], latency_ms=d["latency_ms"],
            error_code=d.get("error_code"),
            frame=None,  # the first release did not keep it
            frames=[0] if blob else [],
            embeddings=(
                np.frombuffer(base64.b64decode(blob), dtype=np.float16).reshape(1, -1)
                if blob else None
            ),
        )


#: What spreadsheets read as the start of a formula in a CSV cell (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: Any) -> Any:
    """``cell``, or, for a text cell a spreadsheet would run as a formula (a client id of
    ``=HYPERLINK(…)``), the text with a single quote in front, as OWASP advises. Numbers are
    left as they are (a negative margin stays a number)."""
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS):
        return "'" + cell
    return cell


CSV_COLUMNS = [
    "id", "created_at", "client_id", "image_sha256", "image_size", "policy_name",
    "policy_version", "model", "profile", "action", "triggered", "latency_ms", "error_code",
    "frame", "categories", "matches",
]
