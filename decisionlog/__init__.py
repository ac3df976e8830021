"""The decision log: every moderation result, with its policy version and image embedding,
never the image; shared by the service, the CLI and batch jobs. SQLite by default, PostgreSQL
for replicas. The only package that talks to a database."""

from .store import (
    DeadLetters,
    DecisionRecord,
    DecisionStore,
    Recorder,
    default_database_url,
    default_dead_letter_path,
    parse_time,
    replay_dead_letters,
)

__all__ = [
    "DeadLetters",
    "DecisionRecord",
    "DecisionStore",
    "Recorder",
    "default_database_url",
    "default_dead_letter_path",
    "parse_time",
    "replay_dead_letters",
]
