"""The decision log: every moderation result, with its policy version and the embeddings of
its sampled frames, never the image; the policy texts and their activations. Shared by the
service, the CLI and batch jobs. SQLite by default, PostgreSQL for replicas. The only package
that talks to a database."""

from .database import SchemaError, default_database_url, migrate
from .policies import Activation, PolicyLog, SharedEmbeddingCache
from .recorder import DeadLetters, Recorder, default_dead_letter_path, replay_dead_letters
from .records import CSV_COLUMNS, DecisionRecord
from .store import DecisionFilters, DecisionStore
from .windows import parse_time

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
