"""The shapes of the API's requests and responses, as pydantic models: views shape their
answers with them, and :mod:`service.openapi` generates the document's schemas from them.

A stored decision is :class:`decisionlog.DecisionRecord` itself, and a category's outcome is
the same :class:`decisionlog.records.CategoryOutcome` in a moderation response and in the log.
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from decisionlog.jobs import Job as StoredJob
from decisionlog.lab import DryRun, PolicyChange
from decisionlog.records import BankMatchOut, CategoryOutcome, DecisionRecord, PolicyRef
from decisionlog.reviews import ReviewItem, Verdict
from decisionlog.search import SearchHit

from .contract import Flag, Note, Query, Text, Time, TimeText, printable

__all__ = [
    "MODELS",
    "DecisionPage",
    "DryRun",
    "DryRunJSON",
    "Error",
    "ImageDecision",
    "ImageFailure",
    "Job",
    "JobPath",
    "ModerateJSON",
    "ModerateResponse",
    "PolicyChange",
    "PolicyDiff",
    "PolicyResponse",
    "PolicyVersionText",
    "PolicyVersions",
    "QualityResponse",
    "ReloadResponse",
    "ReviewClaim",
    "ReviewItem",
    "SearchHit",
    "SearchResponse",
    "Stats",
    "Verdict",
    "VerdictPage",
]


class ErrorBody(BaseModel):
    code: str = Field(description="what went wrong, for programs (README: the error table)")
    message: str = Field(description="what went wrong and what is accepted, for people")
    faults: list[str] | None = Field(None, description="every fault of an invalid policy")


class Error(BaseModel):
    error: ErrorBody


class ImageInfo(BaseModel):
    format: str
    width: int
    height: int
    frames: int


class ImageDecision(BaseModel):
    decision_id: str | None = Field(None, description="look it up: /v1/decisions/{id}")
    id: str | None
    action: Literal["allow", "flag", "review", "block"]
    flagged: bool
    triggered: list[str] = Field(description="categories that fired, most severe first")
    frame: int = Field(description="the frame of the most severe category that fired")
    frames_scored: int
    views_scored: int = Field(description="views encoded: the frames whole, and their crops "
                                          "when the policy cuts them")
    image: ImageInfo
    matches: list[BankMatchOut] = Field(
        default_factory=list, description="the hash-bank entries the upload matched (README: "
        "hash banks): an allow-bank match clears the classifier, the others join its action")
    categories: dict[str, CategoryOutcome]
    processing_ms: float


class ImageFailure(BaseModel):
    decision_id: str | None = None
    id: str | None
    error: ErrorBody


class ModerateResponse(BaseModel):
    policy: PolicyRef
    model: str
    profile: str
    processing_ms: float
    results: list[ImageDecision | ImageFailure] = Field(description="one per image, in order")


class ImageData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(json_schema_extra={"contentEncoding": "base64"})
    id: str | None = Field(None, max_length=256)


class IntegrationAnswer(BaseModel):
    """A platform hook's acceptance (a refusal is the error shape: ``rejected``, 422, or
    ``undecided``, 503, with ``action`` and ``decision_id`` beside it)."""

    accept: bool
    reason: str = Field(description="why, in words a user can be shown")
    action: Literal["allow", "flag", "review", "block"] | None = Field(
        None, description="the decision's action (null: none was made)")
    decision_id: str | None = Field(None, description="the recorded decision")


class MisskeyPrediction(BaseModel):
    className: str = Field(description="a class of the policy's integrations.misskey")
    probability: float = Field(ge=0.0, le=1.0)


class MisskeyError(BaseModel):
    code: Literal["INVALID_REQUEST", "UNSUPPORTED_MEDIA_TYPE", "REQUEST_TOO_LARGE",
                  "IMAGE_DECODE_FAILED", "MODEL_UNAVAILABLE", "DETECTION_FAILED"]
    message: str


class MisskeyDetected(BaseModel):
    success: Literal[True]
    predictions: list[MisskeyPrediction] = Field(
        description="every class of the policy's mapping, most probable first")


class MisskeyFailed(BaseModel):
    success: Literal[False]
    error: MisskeyError


class MisskeyResults(BaseModel):
    results: list[MisskeyDetected | MisskeyFailed] = Field(
        description="one per part of the request, in order")


class DetectImagesAnswer(BaseModel):
    """Misskey's sensitive-media detection answer (misskey-dev/sensitive-detector's
    docs/api-detect-images.md): a failed part is that part's error, the others are answered."""

    success: Literal[True]
    result: MisskeyResults


class ModerateQuery(Query):
    async_: Flag = Field(False, alias="async",
                         description="answer 202 at once with a job (as a video longer than "
                                     "MODERATION_VIDEO_INLINE_MAX_S is); its result is the "
                                     "decisions")


class ModerateJSON(BaseModel):
    """The JSON form of ``POST /v1/moderate``."""

    model_config = ConfigDict(extra="forbid")

    images: list[ImageData]
    profile: str | None = None


class Threshold(BaseModel):
    value: float
    review_from: float | None
    provenance: dict[str, Any] = Field(description="where the value came from (source, …)")


class PolicyCategory(BaseModel):
    description: str | None
    action: Literal["flag", "review", "block"]
    terms: list[str]
    exceptions: list[str]
    thresholds: dict[str, Threshold] = Field(description="per profile")


class PolicyResponse(BaseModel):
    name: str
    version: str
    description: str | None
    model: dict[str, Any] = Field(description="spec (as in the policy) and identity")
    profiles: list[str]
    categories: dict[str, PolicyCategory]


class ReloadResponse(BaseModel):
    name: str
    version: str
    previous_version: str
    changed: bool


class PolicyActivation(BaseModel):
    version: str
    name: str
    activated_at: float = Field(description="unix seconds")
    reason: Literal["start", "reload"]
    host: str = Field(description="the replica that activated it")


class PolicyVersions(BaseModel):
    versions: list[PolicyActivation] = Field(description="newest first: the first is active")


class PolicyVersionText(BaseModel):
    version: str
    name: str
    source: str = Field(description="the file name it was read from")
    text: str = Field(description="the policy file, exactly as activated")
    recorded_at: float


def _seconds_as_text(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.6f}" if math.isfinite(value) else "not finite"
    return value


#: A time as text or as unix seconds (a JSON number): kept as text.
TimeOrSeconds = Annotated[
    TimeText, BeforeValidator(_seconds_as_text),
    WithJsonSchema({"type": ["string", "number"],
                    "description": "unix seconds (a number or text), an age before now (7d) "
                                   "or ISO 8601"}),
]


class DryRunJSON(BaseModel):
    """The JSON form of a dry-run request (the YAML body form takes the same options in the
    query string)."""

    model_config = ConfigDict(extra="forbid")
    policy: str = Field(description="the proposed policy, as policy YAML")
    since: TimeOrSeconds | None = Field(
        default="7d", description="unix seconds, ISO 8601 or an age (7d); null: no start")
    until: TimeOrSeconds | None = Field(default=None, description="default: now")
    against: Text | None = Field(default=None, description="a stored policy version to compare "
                                                           "with (default: the active policy)")
    limit: int = Field(default=20, ge=0, le=500, description="changed decisions to show")


class PolicyDiff(BaseModel):
    from_version: str
    to_version: str
    changes: list[PolicyChange]


class DecisionPage(BaseModel):
    decisions: list[DecisionRecord]
    next_cursor: str | None = Field(description="pass it as cursor for the next page")


class SearchQuery(BaseModel):
    kind: Literal["text", "like", "image"]
    q: str | None = Field(None, description="the text (kind text)")
    raw: bool | None = Field(None, description="the text encoded as it is, not through the "
                                               "policy's templates")
    prompts: int | None = Field(None, description="prompts in the text's ensemble")
    like: str | None = Field(None, description="the decision whose frames were the query")
    frames: int | None = Field(None, description="query vectors (an animation's frames)")


class SearchResponse(BaseModel):
    query: SearchQuery
    model: str = Field(description="whose vectors were searched")
    index: Literal["exact", "pgvector"]
    hits: list[SearchHit] = Field(description="best first, one per decision (its best frame)")
    next_offset: int | None = Field(description="pass it as offset for the next page")


class CategoryCount(BaseModel):
    flagged: int
    rate: float


class StatsBucket(BaseModel):
    start: int = Field(description="unix seconds")
    policy_version: str
    total: int
    actions: dict[str, int]
    categories: dict[str, CategoryCount]


class BucketSize(str, enum.Enum):
    """The width of a statistics bucket."""

    hour = "hour"
    day = "day"


class Stats(BaseModel):
    bucket: BucketSize
    buckets: list[StatsBucket]


class VerdictCategory(BaseModel):
    id: str
    action: Literal["flag", "review", "block"]
    description: str


class ReviewClaim(ReviewItem):
    """A claimed item: the item, the decision, what a verdict may name, the image."""

    decision: DecisionRecord | None = Field(description="null: the decision was purged")
    categories: list[VerdictCategory] = Field(
        description="the categories of the decision's policy version")
    image_url: str | None = Field(description="from MODERATION_IMAGE_URL_TEMPLATE")


class VerdictJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")

    violations: list[Annotated[Text, Field(max_length=100)]] = Field(
        max_length=100, description="category ids; [] when nothing is violated")
    note: Note | None = None
    add_to_bank: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$",
        description="also add the decision's hashes (its SHA-256 and each frame's PDQ) to this "
        "hash bank, so that the next upload of the image matches it")


class AppealJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Note | None = None


class VerdictPage(BaseModel):
    verdicts: list[Verdict]
    next_offset: int | None


class QueueState(BaseModel):
    waiting: int = 0
    claimed: int = 0
    decided: int = 0


class QueueCounts(BaseModel):
    queue: dict[str, QueueState]
    deliveries: dict[str, int]


class Metric(BaseModel):
    status: Literal["ok", "not_enough_verdicts"]
    estimate: float | None
    standard_error: float | None = None
    interval: tuple[float, float] | None = Field(None, description="95%")
    verdicts: int = Field(description="verdicts in the metric's denominator")
    effective_verdicts: float | None = None
    message: str | None = None


class CategoryQuality(BaseModel):
    precision: Metric
    recall: Metric


class QualityResponse(BaseModel):
    since: float
    until: float | None
    policy_version: str | None
    verdicts: int = Field(description="design verdicts (review actions and audits) used")
    appeals: dict[str, int] = Field(description="counted, not weighted: appeals are chosen")
    queued: dict[str, dict[str, int]] = Field(description="design items by reason and action")
    decided: dict[str, dict[str, int]]
    categories: dict[str, CategoryQuality]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    policy: PolicyRef
    model: str


# --- query strings and path parameters (service.contract validates requests with them) -----

ActionName = Literal["allow", "flag", "review", "block"]
#: The largest id a review item or verdict can have (SQLite's and PostgreSQL's BIGINT).
MAX_ROW_ID = 2**63 - 1
MAX_SEARCH_LIMIT = 500
MAX_SEARCH_DEPTH = 10_000  # offset + limit
MAX_QUERY_LENGTH = 1000  # characters of a search text (CLIP reads 77 tokens of it)


class DecisionFiltersQuery(Query):
    since: Time | None = Field(None, description="from this time")
    until: Time | None = Field(None, description="before this time (default: now)")
    action: Literal["allow", "flag", "review", "block", "error"] | None = Field(
        None, description="error: the uploads that could not be read")
    category: Text | None = Field(None, description="decisions where this category fired")
    policy_version: Text | None = None
    client_id: Text | None = None
    flagged: Flag | None = Field(None, description="only flagged (true) or unflagged (false)")


class DecisionsQuery(DecisionFiltersQuery):
    limit: int = Field(50, ge=1, le=500)
    cursor: str | None = Field(None, max_length=200, pattern=r"^[A-Za-z0-9_=-]+$",
                               description="next_cursor of the page before")


class DecisionPath(BaseModel):
    decision_id: Text


class StatsQuery(Query):
    since: Time | None = None
    until: Time | None = None
    bucket: BucketSize = BucketSize.hour
    policy_version: Text | None = None


class SearchPageQuery(DecisionFiltersQuery):
    """The filters and the page of a search."""

    action: ActionName | None = None  # errors have no vectors
    limit: int = Field(20, ge=1, le=MAX_SEARCH_LIMIT)
    offset: int = Field(0, ge=0, le=MAX_SEARCH_DEPTH - 1,
                        description=f"next_offset of the page before; offset + limit at most "
                                    f"{MAX_SEARCH_DEPTH:,}")
    min_similarity: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _depth(self) -> SearchPageQuery:
        if self.offset + self.limit > MAX_SEARCH_DEPTH:
            raise ValueError(f"offset + limit must be at most {MAX_SEARCH_DEPTH:,}; got "
                             f"{self.offset + self.limit:,}")
        return self


SearchFormat = Literal["json", "jsonl", "csv"]


class SearchFiltersQuery(SearchPageQuery):
    """A search with an uploaded image: the filters, the page, the answer's format."""

    format: SearchFormat = "json"


#: A search text: printable, not blank.
SearchText = Annotated[
    str, Field(min_length=1, max_length=MAX_QUERY_LENGTH,
               pattern=r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"),
    AfterValidator(printable),
]


class SearchExportQuery(SearchPageQuery):
    """Exactly one of ``q`` and ``like``, the filters and the page (the answer's format is
    the path's)."""

    q: SearchText | None = Field(None, description="a text to search for (not blank)")
    like: Text | None = Field(None, description="a decision id: decisions like it")
    raw: Flag = Field(False, description="the text as it is, not through the policy's "
                                         "templates")

    @model_validator(mode="after")
    def _one_query(self) -> SearchExportQuery:
        if (self.q is None) == (self.like is None):
            raise PydanticCustomError(
                "missing" if self.q is None else "too_many_queries",
                "give one query: q=<text> (text → image) or like=<decision id> (image → "
                "image), not both; or POST an image (multipart field 'image')")
        return self


class SearchTextQuery(SearchExportQuery):
    """Exactly one of ``q`` and ``like``, the filters, the page, the answer's format."""

    format: SearchFormat = "json"


class PolicyVersionsQuery(Query):
    limit: int = Field(100, ge=1, le=1000)


class VersionPath(BaseModel):
    version: Text


class DiffQuery(Query):
    from_: Text = Field(alias="from", description="a stored policy version")
    to: Text | None = Field(None, description="a stored policy version (default: the active "
                                              "policy)")


class DryRunQuery(Query):
    since: TimeText | None = None
    until: TimeText | None = None
    against: Text | None = Field(None, description="a stored policy version (default: the "
                                                   "active policy)")
    limit: int | None = Field(None, ge=0, le=500, description="changed decisions to show (20)")
    async_: Flag = Field(False, alias="async",
                         description="run it as a job: answer 202 at once (as a window of "
                                     "more than MODERATION_DRY_RUN_INLINE_MAX_DECISIONS "
                                     "decisions always does)")


class Job(StoredJob):
    """Long work off the request thread (a large dry-run, a long video): its state, its
    progress, and its result once done or its error once failed."""

    # the stored JSON, described for the document (and a generated client), by kind
    result: DryRun | ModerateResponse | None = Field(  # type: ignore[assignment]
        description="when done: a dry-run's report (kind dry-run), or the answer POST "
        "/v1/moderate would have given (kind moderate)")


class ModerationJob(StoredJob):
    """Uploads answered off the request thread (a long video, async=true): the job's state,
    its progress, and, once done, the answer POST /v1/moderate would have given."""

    result: ModerateResponse | None = Field(  # type: ignore[assignment]
        description="when done: the answer POST /v1/moderate would have given")


class JobPath(BaseModel):
    job_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="as a 202 answer gave it")


class ItemPath(BaseModel):
    item_id: int = Field(ge=1, le=MAX_ROW_ID)


class VerdictsQuery(Query):
    since: Time | None = None
    until: Time | None = None
    reviewer: Text | None = None
    reason: Literal["appeal", "review", "audit"] | None = None
    category: Text | None = None
    policy_version: Text | None = None
    decision_id: Text | None = None
    limit: int = Field(100, ge=1, le=500)
    offset: int = Field(0, ge=0, le=1_000_000)


class QualityQuery(Query):
    since: Time | None = Field(None, description="default: 30 days ago")
    until: Time | None = None
    policy_version: Text | None = None


#: Every model the document names, and whether it describes a request (validation) or a
#: response (serialization).
BankActionName = Literal["allow", "flag", "review", "block"]


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be an integer, not true or false")
    return value


#: A bank's distance and minimum quality: integers as JSON Schema has them (2.0 is one),
#: never booleans.
Distance = Annotated[int, Field(ge=0, le=128), BeforeValidator(_not_a_bool)]
Quality = Annotated[int, Field(ge=0, le=100), BeforeValidator(_not_a_bool)]


# --- hash banks ------------------------------------------------------------------------------


class BankOut(BaseModel):
    name: str
    action: BankActionName
    distance: int = Field(description="PDQ Hamming distance within which a hash matches")
    min_quality: int = Field(description="frames of a lower PDQ quality are not matched")
    description: str | None
    created_at: float
    updated_at: float
    hashes: int = Field(description="hashes in the bank")


class BankList(BaseModel):
    banks: list[BankOut]


class BankCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$",
                      description="lower-case letters, digits, '_', '.', '-'")
    action: BankActionName
    distance: Distance = 31
    min_quality: Quality = 50
    description: str | None = Field(None, max_length=2000)


class BankUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: BankActionName | None = Field(None, description="null or absent: unchanged")
    distance: Distance | None = Field(None, description="null or absent: unchanged")
    min_quality: Quality | None = Field(None, description="null or absent: unchanged")
    description: str | None = Field(None, max_length=2000, description="null: cleared")


class BankPath(BaseModel):
    name: Text


class HashIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["pdq", "sha256"] = "pdq"
    hash: str = Field(pattern=r"^\s*[0-9a-fA-F]{64}\s*$", description="64 hex digits")
    note: str | None = Field(None, max_length=2000)
    source: str | None = Field(None, max_length=2000)


class HashesAdd(BaseModel):
    """Hashes to add, or a stored decision whose hashes to add (its frames' PDQ and its
    SHA-256), or both."""

    model_config = ConfigDict(extra="forbid")

    hashes: list[HashIn] = Field(default_factory=list, max_length=10_000)
    decision_id: str | None = Field(None, max_length=64)
    note: str | None = Field(None, max_length=2000, description="for the decision's hashes")


class BankImport(BaseModel):
    """A file of hashes, as text: ``csv`` (ThreatExchange/HMA's PDQ layout, or ours) or
    ``jsonl``."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["csv", "jsonl"] = "csv"
    text: str = Field(description="the file's text (UTF-8)")


class BankDryRunJSON(BaseModel):
    """A file of hashes to try against the stored decisions of a window, as the bank would
    match them (nothing is written)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["csv", "jsonl"] = "csv"
    text: str = Field(description="the file's text (UTF-8), as /import takes it")
    since: Time | None = None
    until: Time | None = None
    limit: int = Field(20, ge=0, le=500, description="matched decision ids listed")


class BankDryRunOut(BaseModel):
    hashes: int = Field(description="hashes in the file")
    decisions: int = Field(description="stored decisions read (the window's, errors aside)")
    matched: int = Field(description="decisions a hash of the file matches")
    changed: int = Field(description="matched decisions whose action the bank would change")
    by_change: dict[str, int] = Field(description='"allow->block": how many')
    examples: list[str] = Field(description="matched decision ids, newest first")


class HashesRemove(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hashes: list[Annotated[str, Field(pattern=r"^\s*[0-9a-fA-F]{64}\s*$")]] = Field(
        min_length=1, max_length=10_000, description="PDQ or SHA-256 hashes, 64 hex digits")


class HashesAdded(BaseModel):
    added: int
    already_present: int


class HashesRemoved(BaseModel):
    removed: int


class BankDeleted(BaseModel):
    deleted: str
    hashes: int


class HashOut(BaseModel):
    id: int
    bank: str
    kind: Literal["pdq", "sha256"]
    hash: str
    note: str | None
    source: str | None
    added_at: float
    added_by: str | None


class HashPageOut(BaseModel):
    hashes: list[HashOut]
    next_after_id: int | None = Field(description="pass as after_id for the next page")


class HashPageQuery(Query):
    after_id: int | None = Field(None, ge=0)
    limit: int = Field(100, ge=1, le=1000)


class ExportQuery(Query):
    format: Literal["csv", "jsonl"] = "csv"


class FrameHashes(BaseModel):
    frame: int
    pdq: str
    quality: int


class UploadHashOut(BaseModel):
    id: str | None
    sha256: str | None = None
    frames: list[FrameHashes] = Field(default_factory=list)
    matches: list[dict[str, Any]] | None = Field(
        None, description="POST /v1/match: the bank entries the upload matched")
    error: dict[str, str] | None = None


class UploadHashesResponse(BaseModel):
    results: list[UploadHashOut]



MODELS: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
    (Error, "serialization"),
    (ModerateJSON, "validation"),
    (ModerateResponse, "serialization"),
    (PolicyResponse, "serialization"),
    (ReloadResponse, "serialization"),
    (PolicyVersions, "serialization"),
    (PolicyVersionText, "serialization"),
    (DryRunJSON, "validation"),
    (DryRun, "serialization"),
    (Job, "serialization"),
    (ModerationJob, "serialization"),
    (PolicyDiff, "serialization"),
    (DecisionRecord, "serialization"),
    (DecisionPage, "serialization"),
    (Stats, "serialization"),
    (SearchResponse, "serialization"),
    (ReviewItem, "serialization"),
    (ReviewClaim, "serialization"),
    (VerdictJSON, "validation"),
    (AppealJSON, "validation"),
    (Verdict, "serialization"),
    (VerdictPage, "serialization"),
    (QueueCounts, "serialization"),
    (QualityResponse, "serialization"),
    (IntegrationAnswer, "serialization"),
    (DetectImagesAnswer, "serialization"),
    (BankList, "serialization"),
    (BankOut, "serialization"),
    (BankCreate, "validation"),
    (BankUpdate, "validation"),
    (BankDeleted, "serialization"),
    (HashesAdd, "validation"),
    (HashesAdded, "serialization"),
    (HashesRemove, "validation"),
    (BankImport, "validation"),
    (BankDryRunJSON, "validation"),
    (BankDryRunOut, "serialization"),
    (HashesRemoved, "serialization"),
    (HashPageOut, "serialization"),
    (UploadHashesResponse, "serialization"),
    (Health, "serialization"),
    (Ready, "serialization"),
]
