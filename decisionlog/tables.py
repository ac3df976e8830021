"""The decision log's tables, as SQLAlchemy Core metadata: the schema the newest migration
(``decisionlog/migrations``) produces. Queries are built from these objects, so one query
runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = [
    "FrameVector",
    "bank_changes",
    "bank_hashes",
    "banks",
    "decision_flags",
    "decision_frames",
    "decisions",
    "frame_blocks",
    "jobs",
    "metadata",
    "policy_activations",
    "policy_versions",
    "rescore_runs",
    "rescored_decisions",
    "review_items",
    "review_verdicts",
    "text_embeddings",
    "webhook_outbox",
]


class FrameVector(TypeDecorator[np.ndarray]):
    """An image embedding stored as float16: pgvector's ``halfvec`` on PostgreSQL (searchable
    with its operators and indexes), the raw float16 bytes on SQLite. Reads give float32."""

    impl = sa.LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            from pgvector.sqlalchemy import HALFVEC

            return dialect.type_descriptor(HALFVEC())
        return dialect.type_descriptor(sa.LargeBinary())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        vector = np.asarray(value, dtype=np.float16).reshape(-1)
        return vector if dialect.name == "postgresql" else vector.tobytes()

    def process_result_value(self, value: Any, dialect: Dialect) -> np.ndarray | None:
        if value is None:
            return None
        if dialect.name == "postgresql":
            return np.asarray(value, dtype=np.float32)  # pgvector gives a list
        return np.frombuffer(bytes(value), dtype=np.float16).astype(np.float32)

    # Reading many vectors at once: one bytes value per row, decoded with one numpy call per
    # chunk instead of one conversion per row (pgvector's text form costs ~50 µs a vector).

    @staticmethod
    def raw(column: Any, dialect: str) -> Any:
        """``column`` selected as bytes: the float16 blob on SQLite, ``halfvec_send`` (pgvector's
        binary form: a 4-byte header, then big-endian float16) on PostgreSQL."""
        if dialect == "postgresql":
            return sa.func.halfvec_send(column, type_=sa.LargeBinary)
        return sa.type_coerce(column, sa.LargeBinary)

    @staticmethod
    def decode_many(blobs: list[bytes], dialect: str) -> np.ndarray:
        """What :meth:`raw` selected, for n rows → ndarray of shape (n, dim), float32."""
        if not blobs:
            return np.zeros((0, 0), np.float32)
        sizes = {len(b) for b in blobs}
        if len(sizes) != 1:
            raise ValueError(f"stored vectors of different sizes ({sorted(sizes)} bytes) were "
                             "read together: they belong to different models")
        joined = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), -1)
        if dialect == "postgresql":
            return joined[:, 4:].copy().view(">f2").astype(np.float32)
        return joined.view(np.float16).astype(np.float32)


metadata = sa.MetaData()

#: One row per result (an image, or an input that could not be read), as served.
decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Column("hour", sa.Integer, nullable=False),  # written at insert: no date SQL dialects
    sa.Column("client_id", sa.Text),
    sa.Column("image_sha256", sa.Text, nullable=False),
    sa.Column("image_size", sa.Integer, nullable=False),
    sa.Column("policy_name", sa.Text, nullable=False),
    sa.Column("policy_version", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("profile", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("triggered", sa.Text, nullable=False),  # comma-separated category ids
    sa.Column("categories", sa.Text, nullable=False),  # JSON: the per-category outcome
    sa.Column("latency_ms", sa.Float(precision=53), nullable=False),
    sa.Column("error_code", sa.Text),
    sa.Column("frame", sa.Integer),  # the decided frame (NULL: an error, or an older row)
    sa.Column("frames_scored", sa.Integer),
    # JSON: what each stored key is (frame, time, crop box), for crops and videos (NULL:
    # whole frames only)
    sa.Column("views", sa.Text),
    # JSON: each sampled frame's PDQ hash, and the hash-bank entries the upload matched
    sa.Column("pdq", sa.Text),
    sa.Column("matches", sa.Text),
    sa.Index("decisions_time", "created_at", "id"),
    sa.Index("decisions_version", "policy_version", "created_at"),
    sa.Index("decisions_client", "client_id", "created_at"),
)

#: One row per category that fired, for counting flags per category and time.
decision_flags = sa.Table(
    "decision_flags",
    metadata,
    sa.Column("decision_id", sa.Text, primary_key=True),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Column("hour", sa.Integer, nullable=False),
    sa.Column("policy_version", sa.Text, nullable=False),
    sa.Column("category", sa.Text, primary_key=True),
    sa.Column("action", sa.Text, nullable=False),
    sa.Index("flags_time", "created_at"),
    sa.Index("flags_category", "category", "created_at"),
)

#: Every sampled frame's image embedding: a decision can be re-scored under another policy.
decision_frames = sa.Table(
    "decision_frames",
    metadata,
    sa.Column("decision_id", sa.Text, primary_key=True),
    sa.Column("frame", sa.Integer, primary_key=True),  # its index in the file
    sa.Column("embedding", FrameVector, nullable=False),
)

#: The same frame vectors, stored for scans (:mod:`decisionlog.blocks`): blocks of decisions
#: of one model, each decision's frames contiguous, vectors as one little-endian float16
#: array. A block is written with its decisions (small), then merged into blocks of a few
#: thousand decisions in time order; a window is read a block at a time, never row by row.
frame_blocks = sa.Table(
    "frame_blocks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("first_at", sa.Float(precision=53), nullable=False),  # its oldest decision's
    sa.Column("last_at", sa.Float(precision=53), nullable=False),  # its newest decision's
    sa.Column("decisions", sa.Integer, nullable=False),
    sa.Column("frames", sa.Integer, nullable=False),
    # JSON: {"ids": [...], "client_ids": [...], "profiles": [...], "actions": [...]}
    sa.Column("meta", sa.Text, nullable=False),
    sa.Column("created_at", sa.LargeBinary, nullable=False),  # float64 LE, per decision
    sa.Column("frame_counts", sa.LargeBinary, nullable=False),  # int32 LE, per decision
    sa.Column("frame_index", sa.LargeBinary, nullable=False),  # int32 LE, per frame
    sa.Column("vectors", sa.LargeBinary, nullable=False),  # float16 LE, frames × dim
    sa.Index("frame_blocks_time", "model", "first_at"),
    sa.Index("frame_blocks_size", "decisions"),
)

#: Long work that leaves the request thread (a large dry-run): its request, its progress
#: and its result, where every worker and replica can read them. A job is run by the worker
#: that holds its lease; a lease that runs out (the worker died) lets another take it over.
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),  # dry-run
    sa.Column("state", sa.Text, nullable=False),  # queued | running | done | failed
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Column("created_by", sa.Text),  # the key's name, when known
    sa.Column("request", sa.Text, nullable=False),  # JSON: what to run
    sa.Column("started_at", sa.Float(precision=53)),
    sa.Column("finished_at", sa.Float(precision=53)),
    sa.Column("owner", sa.Text),  # host:pid of the worker running it
    sa.Column("lease_until", sa.Float(precision=53)),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("done", sa.Integer, nullable=False),  # units of work done (decisions read)
    sa.Column("total", sa.Integer),  # units in all, once known
    sa.Column("result", sa.Text),  # JSON, when done
    sa.Column("error", sa.Text),  # JSON {code, message, details}, when failed
    sa.Index("jobs_due", "state", "lease_until"),
    sa.Index("jobs_time", "created_at"),
)

#: The uploads a job decides (a long video answered 202), as bytes, in the order of its
#: request's uploads; deleted with their job.
job_uploads = sa.Table(
    "job_uploads",
    metadata,
    sa.Column("job_id", sa.Text, primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

#: The full text of every policy that was ever active, by version (and by text: an edit of
#: comments or descriptions keeps the version, and is kept too).
policy_versions = sa.Table(
    "policy_versions",
    metadata,
    sa.Column("version", sa.Text, primary_key=True),  # the policy's version (what decides)
    sa.Column("digest", sa.Text, primary_key=True),  # sha256 of the text (comments included)
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),  # the file name it was read from
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
)

#: When each version became active (a policy may become active again later).
policy_activations = sa.Table(
    "policy_activations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("digest", sa.Text, nullable=False),
    sa.ForeignKeyConstraint(
        ["version", "digest"], ["policy_versions.version", "policy_versions.digest"]
    ),
    sa.Column("activated_at", sa.Float(precision=53), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),  # start | reload
    sa.Column("host", sa.Text, nullable=False),
)

#: Text embeddings shared by every replica: one replica's encoding serves the others.
text_embeddings = sa.Table(
    "text_embeddings",
    metadata,
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("digest", sa.Text, primary_key=True),  # sha256 of the text
    sa.Column("vector", sa.LargeBinary, nullable=False),  # float32 bytes
)

#: A re-score: the decisions of a window decided again under another policy.
rescore_runs = sa.Table(
    "rescore_runs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Column("finished_at", sa.Float(precision=53)),  # NULL: running, or interrupted
    sa.Column("policy_name", sa.Text, nullable=False),
    sa.Column("policy_version", sa.Text, nullable=False),
    sa.Column("policy_source", sa.Text, nullable=False),
    sa.Column("policy_text", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("since", sa.Float(precision=53)),
    sa.Column("until", sa.Float(precision=53)),
    sa.Column("decisions", sa.Integer, nullable=False),
    sa.Column("changed", sa.Integer, nullable=False),  # with another action than logged
    sa.Column("left_out", sa.Integer, nullable=False),
)

#: What each decision of a run would get under the run's policy (the original is untouched).
rescored_decisions = sa.Table(
    "rescored_decisions",
    metadata,
    sa.Column("run_id", sa.Text, sa.ForeignKey("rescore_runs.id"), primary_key=True),
    sa.Column("decision_id", sa.Text, primary_key=True),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),  # the decision's
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("triggered", sa.Text, nullable=False),
    sa.Column("categories", sa.Text, nullable=False),  # JSON, as in decisions
    sa.Column("frame", sa.Integer, nullable=False),
    sa.Column("original_action", sa.Text, nullable=False),
    sa.Index("rescored_time", "run_id", "created_at", "decision_id"),
)


#: The review queue: one item per decision and reason (review: its action was ``review``;
#: audit: sampled at random from all traffic; appeal: its uploader asked for a second look).
review_items = sa.Table(
    "review_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("decision_id", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),  # review | audit | appeal
    sa.Column("created_at", sa.Float(precision=53), nullable=False),  # when it was queued
    # the decision's, kept here so that quality never depends on the decision's retention
    sa.Column("decision_created_at", sa.Float(precision=53), nullable=False),
    sa.Column("policy_version", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("triggered", sa.Text, nullable=False),  # comma-separated category ids
    # the chance the decision had to be queued by design (1: review; the audit rate); NULL
    # for an appeal, which the uploader chose
    sa.Column("sample_probability", sa.Float(precision=53)),
    sa.Column("note", sa.Text),  # an appeal's reason
    sa.Column("status", sa.Text, nullable=False),  # waiting | claimed | decided
    sa.Column("claimed_by", sa.Text),
    sa.Column("claimed_at", sa.Float(precision=53)),
    sa.Column("lease_until", sa.Float(precision=53)),
    sa.UniqueConstraint("decision_id", "reason", name="review_items_once"),
    sa.Index("review_items_waiting", "status", "reason", "created_at", "id"),
    sa.Index("review_items_decision_time", "decision_created_at"),
)

#: Reviewers' verdicts: one per decided item.
review_verdicts = sa.Table(
    "review_verdicts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("item_id", sa.Integer, sa.ForeignKey("review_items.id"), nullable=False,
              unique=True),
    sa.Column("decision_id", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("reviewer", sa.Text, nullable=False),
    sa.Column("decided_at", sa.Float(precision=53), nullable=False),
    sa.Column("decision_created_at", sa.Float(precision=53), nullable=False),
    sa.Column("policy_version", sa.Text, nullable=False),  # the decision's
    sa.Column("violations", sa.Text, nullable=False),  # comma-separated category ids
    sa.Column("action", sa.Text, nullable=False),  # what the violations call for
    sa.Column("original_action", sa.Text, nullable=False),
    sa.Column("appeal", sa.Text),  # upheld | overturned (appeals only)
    sa.Column("note", sa.Text),
    sa.Index("review_verdicts_time", "decided_at", "id"),
    sa.Index("review_verdicts_decision", "decision_id"),
)

#: Verdicts waiting to be POSTed to the webhook, kept until delivered (or given up).
webhook_outbox = sa.Table(
    "webhook_outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # what is delivered: a reviewer's verdict, or a job's result (a long video's answer)
    sa.Column("verdict_id", sa.Integer, sa.ForeignKey("review_verdicts.id")),
    sa.Column("job_id", sa.Text),
    sa.Column("payload", sa.Text, nullable=False),  # the JSON body, as signed
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Column("status", sa.Text, nullable=False),  # pending | delivered | failed
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", sa.Float(precision=53), nullable=False),
    sa.Column("delivered_at", sa.Float(precision=53)),
    sa.Column("last_error", sa.Text),
    sa.Index("webhook_outbox_due", "status", "next_attempt_at"),
    sa.Index("webhook_outbox_verdict", "verdict_id"),
    sa.Index("webhook_outbox_job", "job_id"),
)

#: Known-image hash banks (:mod:`decisionlog.banks`): what a match in each does, and how near
#: a PDQ hash must be to match.
banks = sa.Table(
    "banks",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),  # [a-z0-9][a-z0-9_.-]{0,63}
    sa.Column("action", sa.Text, nullable=False),  # allow | flag | review | block
    sa.Column("distance", sa.Integer, nullable=False, server_default=sa.text("31")),
    sa.Column("min_quality", sa.Integer, nullable=False, server_default=sa.text("50")),
    sa.Column("description", sa.Text),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    # changed by every write to the bank or its hashes (matchers rebuild a bank when it moves)
    sa.Column("updated_at", sa.Float(precision=53), nullable=False),
    sa.CheckConstraint("action IN ('allow', 'flag', 'review', 'block')", name="banks_action"),
    sa.CheckConstraint("distance BETWEEN 0 AND 128", name="banks_distance"),
    sa.CheckConstraint("min_quality BETWEEN 0 AND 100", name="banks_min_quality"),
)

#: The hashes of each bank: PDQ (64 hex digits, as ThreatExchange writes them) or the SHA-256
#: of an exact copy. Deleting a bank deletes its rows in the same transaction.
bank_hashes = sa.Table(
    "bank_hashes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("bank", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # pdq | sha256
    sa.Column("hash", sa.Text, nullable=False),  # 64 lower-case hex digits
    sa.Column("note", sa.Text),
    sa.Column("source", sa.Text),
    sa.Column("added_at", sa.Float(precision=53), nullable=False),
    sa.Column("added_by", sa.Text),
    sa.UniqueConstraint("bank", "kind", "hash", name="bank_hashes_once"),
    sa.Index("bank_hashes_bank", "bank", "id"),
)

#: One row (id 1): a counter every write to the banks moves, in the writing transaction (its
#: row lock also serializes bank writers on PostgreSQL). Matchers poll it (a point read).
bank_changes = sa.Table(
    "bank_changes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, nullable=False),
)
