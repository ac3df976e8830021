"""The decision log: every moderation result, with its policy version and the embeddings of
its sampled frames, never the image; the policy texts and their activations. Shared by the
service, the CLI and batch jobs. SQLite by default, PostgreSQL for replicas. The only package
that talks to a database."""

from .database import SchemaError, migrate
from .policies import Activation, PolicyLog, SharedEmbeddingCache
from .records import CSV_COLUMNS, DecisionRecord
from .store import (
    DeadLetters,
    DecisionFilters,
    DecisionStore,
    Recorder,
    default_database_url,
    default_dead_letter_path,
    parse_time,
    replay_dead_letters,
)

__all__ = [
    "CSV_COLUMNS",
    "Activation",
    "DeadLetters",
    "DecisionFilters",
    "DecisionRecord",
    "DecisionStore",
    "PolicyLog",
    "Recorder",
    "SchemaError",
    "SharedEmbeddingCache",
    "default_database_url",
    "default_dead_letter_path",
    "migrate",
    "parse_time",
    "replay_dead_letters",
]
