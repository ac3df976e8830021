"""Known-image hash banks in the decision log: :class:`BankStore` keeps them (``banks``,
``bank_hashes``, ``bank_changes``), :class:`BankMatcher` matches uploads against them for the
core (:class:`moderation.banks.HashMatcher`).

A bank has an action (allow, flag, review, block), a Hamming distance within which a PDQ hash
matches (default 31, Meta's advice for PDQ) and a minimum PDQ quality below which an upload's
frame is not matched against it (default 50). Its hashes are PDQ (64 hex digits, laid out as
ThreatExchange and HMA write them: :mod:`moderation.hashing`) or the SHA-256 of an exact copy.

**Every worker and replica follows the banks.** Every write moves a counter (``bank_changes``,
one row, in the writing transaction; its row lock also serializes bank writers on
PostgreSQL, as SQLite's write lock does) and the written bank's ``updated_at``. A matcher
polls the counter (a point read, at most once per ``follow_s`` and in a thread of its own, never
on a request's path); when it moved, the matcher reads the banks again and rebuilds only the
banks whose ``updated_at`` moved, appending a bank's new hashes to its index when nothing was
removed from it (a bank's ids only grow: writers are serialized). All reads of one refresh see
one snapshot. A matcher holds each PDQ hash's id and bits, indexed (~150 MB a million); the
notes and sources of the hashes an upload matched are read when it matches (one query), so a
hash removed meanwhile is not reported even before the next refresh.

**Import and export** (all or nothing: every row is checked first; any bad row refuses the
whole file, nothing written, and the error names each bad row by its line number, up to
:data:`MAX_FAULTS`; hashes already in the bank are counted, not refused):

- CSV with our header, ``kind,hash,note,source,added_at`` (what :meth:`BankStore.export_csv`
  writes: rows by id, ``added_at`` in unix seconds as Python's shortest round-trip repr, empty
  note/source for none). Columns in any order; ``hash`` required; ``kind`` (pdq | sha256)
  defaults to pdq, ``added_at`` to the import time. Text that a spreadsheet would run as a
  formula (starting ``= + - @`` tab or CR) is written with a ``'`` in front, as the decision
  export does, and that one quote is taken off again on import (a text that itself starts
  with quotes before such a character gets one more), so export → import → export gives the
  same bytes.
- HMA's header-less PDQ files: the PDQ hex in the first column. HMA 1.0 reads its bank data
  files as ``hash,indicator_id,descriptor_id,timestamp,tags``
  (``hasher-matcher-actioner/hmalib/common/s3_adapters.py``, ``ThreatExchangeS3PDQAdapter``,
  rows written by python-threatexchange's ``SimpleDescriptorRollup.as_row``: descriptor id,
  ``added_on`` as ``2020-07-31T18:47:52+0000`` or ``mine``, labels separated by spaces); its
  sample banks (``hasher-matcher-actioner/sample_data/pdq.csv``,
  ``holidays-jpg1-pdq-hashes.csv``) are ``hash,id,timestamp,tags``, all in
  github.com/facebook/ThreatExchange. Read by the number of columns: 4,
  ``hash,id,timestamp,tags``, and 5, ``hash,indicator_id,descriptor_id,timestamp,tags``, as
  HMA's: source ``threatexchange:<id>`` (the indicator id), note the tags, ``added_at`` the
  timestamp (``mine`` or empty: the import time), the descriptor id not kept; 1 to 3, a plain
  list: the hash, then a note, then a source. Every row is PDQ.
- python-threatexchange's signal CSV, with its header ``collab,signal_type,signal_str,
  category,tags`` (``python-threatexchange/threatexchange/pdq_samples.csv``): ``signal_type``
  must be ``pdq``; ``signal_str`` is the hash, ``collab`` the source, category and tags the
  note.
- JSON lines, one object a line: ``{"kind", "hash", "note", "source", "added_at"}`` (only
  ``hash`` required; no other keys), as :meth:`BankStore.export_jsonl` writes them.

Export writes our CSV layout or JSON lines, never HMA's (it has no place for SHA-256 hashes).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from moderation import ModerationError
from moderation.banks import BANK_ACTIONS, BankAction, BankMatch
from moderation.errors import NotFound
from moderation.hashindex import HashIndex
from moderation.hashing import PDQ_BITS, UploadHashes, parse_pdq, pdq_to_bits, pdqs_to_bits
from moderation.policy import Action

from .database import connect, migrate
from .records import FORMULA_STARTS
from .tables import bank_changes, bank_hashes, banks

__all__ = [
    "CSV_HEADER",
    "HASH_KINDS",
    "MAX_FAULTS",
    "Bank",
    "BankError",
    "BankExists",
    "BankHash",
    "BankMatcher",
    "BankStore",
    "HashEntry",
    "HashPage",
    "HashesRefused",
    "UnknownBank",
]

log = logging.getLogger(__name__)

HASH_KINDS = ("pdq", "sha256")
HashKind = Literal["pdq", "sha256"]
#: our CSV layout's header, the columns :meth:`BankStore.export_csv` writes
CSV_HEADER = ("kind", "hash", "note", "source", "added_at")
#: an import or an add reports at most this many bad rows, then stops reading
MAX_FAULTS = 50
#: the longest note, source, description or added_by kept (characters)
MAX_TEXT = 4000
DEFAULT_DISTANCE = 31
DEFAULT_MIN_QUALITY = 50

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_BATCH = 10_000  # rows per INSERT executemany, and per read of an export
_READ_BATCH = 100_000  # rows a matcher converts at a time
_TE_HEADER = ("collab", "signal_type", "signal_str", "category", "tags")
_ACCEPTED_CSV = (
    "accepted: our header 'kind,hash,note,source,added_at' (what export writes); HMA's "
    "header-less rows with the PDQ hex first ('hash', 'hash,note', 'hash,note,source', "
    "'hash,id,timestamp,tags' or 'hash,indicator_id,descriptor_id,timestamp,tags'); or "
    "python-threatexchange's header 'collab,signal_type,signal_str,category,tags'"
)
_ACCEPTED_JSONL = (
    'accepted: one JSON object a line, {"kind": "pdq"|"sha256" (default pdq), "hash": "<64 '
    'hex digits>", "note": text|null, "source": text|null, "added_at": unix seconds|null}'
)
_SETTINGS = ("action", "distance", "min_quality", "description")


# --- errors ---------------------------------------------------------------------------------


class BankError(ModerationError, ValueError):
    """A bank request that cannot be done as asked (a bad name, action, distance, hash, …).
    ``faults`` lists every problem found."""

    code = "invalid_bank"
    status = 400

    def __init__(self, message: str, faults: list[str] | None = None) -> None:
        super().__init__(message)
        self.faults = list(faults) if faults else [message]

    def details(self) -> dict[str, object]:
        return {"faults": self.faults}


class BankExists(BankError):
    """A bank of that name is already there."""

    code = "bank_exists"
    status = 409

    def details(self) -> dict[str, object]:
        return {}


class HashesRefused(BankError):
    """Hashes to add or a file to import with bad entries: nothing was written. ``faults``
    names each bad entry (its line number, for a file)."""

    code = "invalid_hashes"
    status = 422


class UnknownBank(NotFound):
    """No bank of that name."""


# --- what the store gives -------------------------------------------------------------------


@dataclass(frozen=True)
class Bank:
    """A bank's settings, and how many hashes it holds (``hashes``)."""

    name: str
    action: BankAction
    distance: int
    min_quality: int
    description: str | None
    created_at: float
    updated_at: float
    hashes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "action": self.action, "distance": self.distance,
                "min_quality": self.min_quality, "description": self.description,
                "created_at": self.created_at, "updated_at": self.updated_at,
                "hashes": self.hashes}


@dataclass(frozen=True)
class HashEntry:
    """A hash to add: ``kind`` pdq (64 hex digits, as ThreatExchange and HMA write it) or
    sha256 (of an exact copy's bytes), and what to keep with it. ``added_at``: unix seconds
    (``None``: now; imports keep the file's)."""

    kind: str
    hash: str
    note: str | None = None
    source: str | None = None
    added_at: float | None = None


@dataclass(frozen=True)
class BankHash:
    """A stored hash of a bank."""

    id: int
    bank: str
    kind: HashKind
    hash: str
    note: str | None
    source: str | None
    added_at: float
    added_by: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "bank": self.bank, "kind": self.kind, "hash": self.hash,
                "note": self.note, "source": self.source, "added_at": self.added_at,
                "added_by": self.added_by}


@dataclass(frozen=True)
class HashPage:
    """A page of a bank's hashes, by id; ``next_after_id``: pass it as ``after_id`` for the
    next page (``None``: this was the last)."""

    hashes: list[BankHash]
    next_after_id: int | None


# --- checking what users give ---------------------------------------------------------------


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _setting_faults(action: object = "block", distance: object = DEFAULT_DISTANCE,
                    min_quality: object = DEFAULT_MIN_QUALITY,
                    description: object = None) -> list[str]:
    faults = []
    if action not in BANK_ACTIONS:
        faults.append(f"action must be one of {', '.join(BANK_ACTIONS)}; got {_shown(action)}")
    for key, value, top, meaning in (
        ("distance", distance, PDQ_BITS // 2,
         "the most bits a PDQ hash may differ in and match; 31 is Meta's advice"),
        ("min_quality", min_quality, 100,
         "the least PDQ quality of an upload's frame to match; 50 is Meta's advice"),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
            faults.append(f"{key} must be an integer in 0..{top} ({meaning}); "
                          f"got {_shown(value)}")
    if description is not None and (not isinstance(description, str)
                                    or len(description) > MAX_TEXT):
        faults.append(f"description must be text of at most {MAX_TEXT} characters or none; "
                      f"got {_shown(description)}")
    return faults


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BankError(
            f"a bank name is 1 to 64 characters: lower-case letters, digits, '_', '.' and "
            f"'-', starting with a letter or digit; got {_shown(name)}")
    return name


def _normal_hash(kind: object, value: object) -> tuple[HashKind, str]:
    """(kind, the hash as stored: 64 lower-case hex digits); ``ValueError`` saying what is
    wrong."""
    if kind == "pdq":
        return "pdq", parse_pdq(value)  # type: ignore[arg-type]  # it says what a str is
    if kind == "sha256":
        text = value.strip() if isinstance(value, str) else None
        if text is None or not _SHA256.fullmatch(text):
            raise ValueError(f"a SHA-256 is 64 hex digits (0-9, a-f, either case); got "
                             f"{_shown(value)}")
        return "sha256", text.lower()
    raise ValueError(f"kind must be one of {', '.join(HASH_KINDS)}; got {_shown(kind)}")


def _text(what: str, value: object) -> str | None:
    """A note, source or added_by as stored (empty: none); ``ValueError`` if not text."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text or none; got {_shown(value)}")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{what} must be at most {MAX_TEXT} characters; got {len(value)}")
    return value or None


def _time(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"added_at must be unix seconds (a number, 0 or more) or none; "
                         f"got {_shown(value)}")
    return float(value)


def _added_by(value: object) -> str | None:
    try:
        return _text("added_by", value)
    except ValueError as e:
        raise BankError(str(e)) from None


def _checked(entry: HashEntry) -> HashEntry:
    """``entry`` as stored (normal hash, empty texts as none); ``ValueError`` otherwise."""
    kind, value = _normal_hash(entry.kind, entry.hash)
    return HashEntry(kind, value, _text("note", entry.note), _text("source", entry.source),
                     _time(entry.added_at))


# --- files ----------------------------------------------------------------------------------

_Parsed = tuple[int, "HashEntry | str"]  # (line, the entry or what is wrong with it)


def _csv_cell(text: str | None) -> str:
    """A note or source as our CSV writes it (see the module: formulas get a quote)."""
    if not text:
        return ""
    return "'" + text if text.lstrip("'").startswith(FORMULA_STARTS) else text


def _csv_text(cell: str) -> str | None:
    """The inverse of :func:`_csv_cell`."""
    if cell.startswith("'") and cell.lstrip("'").startswith(FORMULA_STARTS):
        cell = cell[1:]
    return cell or None


def _te_time(cell: str, now: float) -> float:
    """An HMA/ThreatExchange ``added_on`` (``2020-07-31T18:47:52+0000``; ``mine`` or empty:
    ``now``) → unix seconds."""
    text = cell.strip()
    if text in ("", "mine"):
        return now
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"the timestamp column must be ISO 8601 like "
                         f"2020-07-31T18:47:52+0000 (or 'mine'); got {_shown(cell)}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _lines(text: str) -> Iterator[str]:
    """``text``'s lines, each with its line feed (a CR LF in a quoted field kept as it is),
    without a copy of the whole: ``io.StringIO`` would hold it as 4 bytes a character."""
    start = 0
    while start < len(text):
        end = text.find("\n", start) + 1 or len(text)
        yield text[start:end]
        start = end


def _parse_csv(text: str, now: float) -> Iterator[_Parsed]:
    """Each row of a bank CSV (see the module) as (its first line, entry or fault)."""
    reader = csv.reader(_lines(text.removeprefix("\ufeff")))
    layout: str | None = None
    columns: dict[str, int] = {}
    previous_end = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield reader.line_num, f"not readable as CSV ({e}); {_ACCEPTED_CSV}"
            return
        line, previous_end = previous_end + 1, reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line
        if layout is None:
            first = [c.strip().lower() for c in row]
            if first[0] in CSV_HEADER or first[0] == "collab" or "signal_str" in first:
                known = CSV_HEADER if first[0] in CSV_HEADER else _TE_HEADER
                unknown = [c for c in first if c not in known]
                twice = sorted({c for c in first if first.count(c) > 1})
                needed = "signal_str" if known is _TE_HEADER else "hash"
                if unknown or twice or needed not in first:
                    yield line, (
                        f"a header with columns {', '.join(known)} (in any order, "
                        f"{needed} required)" + (f"; unknown: {', '.join(unknown)}"
                                                 if unknown else "")
                        + (f"; twice: {', '.join(twice)}" if twice else "")
                        + (f"; no {needed} column" if needed not in first else "")
                        + f"; {_ACCEPTED_CSV}")
                    return
                layout = "te" if known is _TE_HEADER else "ours"
                columns = {c: i for i, c in enumerate(first)}
                continue
            layout = "hma"
        yield line, _csv_entry(layout, columns, row, now)


def _csv_entry(layout: str, columns: dict[str, int], row: list[str],
               now: float) -> HashEntry | str:
    """One CSV row as an entry, or what is wrong with it."""
    try:
        if layout == "hma":
            if len(row) > 5:
                return (f"{len(row)} columns; HMA's rows have 1 to 5 (the PDQ hex first); "
                        f"{_ACCEPTED_CSV}")
            pdq = row[0]
            if len(row) <= 3:
                return _checked(HashEntry(
                    "pdq", pdq, _csv_text(row[1]) if len(row) > 1 else None,
                    _csv_text(row[2]) if len(row) > 2 else None, now))
            tags, added_on = row[-1].strip(), row[-2]
            source = f"threatexchange:{row[1].strip()}" if row[1].strip() else None
            return _checked(HashEntry("pdq", pdq, tags or None, source,
                                      _te_time(added_on, now)))
        if len(row) != len(columns):
            return (f"{len(row)} columns where the header has {len(columns)}; "
                    f"{_ACCEPTED_CSV}")
        if layout == "te":
            kind = (row[columns["signal_type"]].strip().lower() if "signal_type" in columns
                    else "pdq")
            if kind != "pdq":
                return (f"signal_type must be pdq (the only signal type banks match); "
                        f"got {_shown(kind)}")
            note = " ".join(row[columns[c]].strip() for c in ("category", "tags")
                            if c in columns and row[columns[c]].strip())
            source = row[columns["collab"]].strip() if "collab" in columns else ""
            return _checked(HashEntry("pdq", row[columns["signal_str"]], note or None,
                                      source or None, now))
        cells = {c: row[i] for c, i in columns.items()}
        added_at, faults = cells.get("added_at", "").strip(), []
        try:
            when = float(added_at) if added_at else now
        except ValueError:
            faults.append(f"added_at must be unix seconds (a number); got {_shown(added_at)}")
            when = now
        try:
            entry = _checked(HashEntry(
                cells.get("kind", "").strip().lower() or "pdq", cells["hash"],
                _csv_text(cells.get("note", "")), _csv_text(cells.get("source", "")), when))
        except ValueError as e:
            faults.insert(0, str(e))
        return "; ".join(faults) if faults else entry
    except ValueError as e:
        return str(e)


def _parse_jsonl(text: str, now: float) -> Iterator[_Parsed]:
    """Each line of a bank's JSON lines (see the module) as (line, entry or fault)."""
    keys = set(CSV_HEADER)
    # split on newlines only: a JSON string may hold U+2028, which splitlines() cuts at
    for number, raw in enumerate(_lines(text.removeprefix("\ufeff")), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            yield number, f"not JSON ({e}); {_ACCEPTED_JSONL}"
            continue
        if not isinstance(item, dict):
            yield number, f"a JSON {type(item).__name__}, not an object; {_ACCEPTED_JSONL}"
            continue
        unknown = sorted(set(item) - keys)
        if unknown or "hash" not in item:
            yield number, ((f"unknown keys: {', '.join(unknown)}; " if unknown else "")
                           + ("no hash; " if "hash" not in item else "") + _ACCEPTED_JSONL)
            continue
        try:
            added_at = _time(item.get("added_at"))
            yield number, _checked(HashEntry(
                item.get("kind", "pdq"), item["hash"], item.get("note"), item.get("source"),
                now if added_at is None else added_at))
        except ValueError as e:
            yield number, str(e)


# --- the store ------------------------------------------------------------------------------


class BankStore:
    """Hash banks in the decision log at ``url_or_engine``: a URL (its engine is the
    process's, :func:`decisionlog.database.connect`; the schema is brought up to date, as
    :class:`~decisionlog.DecisionStore` does), or an engine whose database is already up to
    date. Thread-safe; safe across processes and replicas (writes are serialized)."""

    def __init__(self, url_or_engine: str | Engine, *, migrate_schema: bool = True) -> None:
        if isinstance(url_or_engine, Engine):
            self.engine = url_or_engine
            self.url = url_or_engine.url.render_as_string(hide_password=True)
        else:
            self.url = url_or_engine
            self.engine = connect(url_or_engine)
            if migrate_schema:
                migrate(url_or_engine)

    # --- transactions ------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A write transaction, one at a time across processes and replicas: SQLite's
        ``BEGIN IMMEDIATE``; on PostgreSQL, the lock on the ``bank_changes`` row."""
        with self.engine.execution_options(immediate=True).begin() as conn:
            found = conn.execute(
                sa.select(bank_changes.c.version).where(bank_changes.c.id == 1)
                .with_for_update()
            ).first()
            if found is None:  # the migration writes it; a log someone emptied gets it back
                conn.execute(bank_changes.insert().values(id=1, version=0))
            yield conn

    @staticmethod
    def _bump(conn: Connection) -> None:
        """Move the change counter (what matchers poll)."""
        conn.execute(bank_changes.update().where(bank_changes.c.id == 1)
                     .values(version=bank_changes.c.version + 1))

    @classmethod
    def _changed(cls, conn: Connection, name: str, updated_at: float) -> float:
        """Move the change counter and ``name``'s ``updated_at`` (always to a new value: a
        matcher compares it for equality, so clocks of replicas need not agree)."""
        cls._bump(conn)
        now = max(time.time(), updated_at + 1e-6)
        conn.execute(banks.update().where(banks.c.name == name).values(updated_at=now))
        return now

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """A read transaction whose reads all see one snapshot (SQLite in WAL mode: from its
        first read; PostgreSQL: repeatable read)."""
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":  # reset when the connection goes back
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    @staticmethod
    def _bank_row(conn: Connection, name: str) -> sa.Row[Any]:
        row = conn.execute(sa.select(banks).where(banks.c.name == name)).first()
        if row is None:
            known = [n for (n,) in conn.execute(
                sa.select(banks.c.name).order_by(banks.c.name).limit(20))]
            raise UnknownBank(f"no bank named {name!r}; the banks: "
                              f"{', '.join(known) or '(none)'}")
        return row

    def _require(self, name: str) -> None:
        """Raise :class:`UnknownBank` unless ``name`` is a bank (said before a file is
        read or entries are checked)."""
        with self.engine.connect() as conn:
            self._bank_row(conn, name)

    @staticmethod
    def _count(conn: Connection, name: str) -> int:
        return int(conn.execute(sa.select(sa.func.count()).select_from(bank_hashes)
                                .where(bank_hashes.c.bank == name)).scalar_one())

    @staticmethod
    def _bank(row: sa.Row[Any], count: int) -> Bank:
        return Bank(row.name, cast(BankAction, row.action), int(row.distance),
                    int(row.min_quality), row.description, float(row.created_at),
                    float(row.updated_at), count)

    def change_token(self) -> int:
        """What moves with every write to any bank (a point read: what matchers poll)."""
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.select(bank_changes.c.version).where(bank_changes.c.id == 1)).scalar()
        return int(found or 0)

    # --- banks -------------------------------------------------------------------------

    def create_bank(self, name: str, action: str, distance: int = DEFAULT_DISTANCE,
                    min_quality: int = DEFAULT_MIN_QUALITY,
                    description: str | None = None) -> Bank:
        """A new, empty bank. Raises :class:`BankError` naming every bad setting,
        :class:`BankExists` if the name is taken."""
        _check_name(name)
        faults = _setting_faults(action, distance, min_quality, description)
        if faults:
            raise BankError(f"bank {name!r} not created: {'; '.join(faults)}", faults)
        now = time.time()
        try:
            with self._writing() as conn:
                if conn.execute(sa.select(banks.c.name).where(banks.c.name == name)).first():
                    raise BankExists(f"a bank named {name!r} already exists: change it with "
                                     "update, or choose another name")
                conn.execute(banks.insert().values(
                    name=name, action=action, distance=distance, min_quality=min_quality,
                    description=description or None, created_at=now, updated_at=now))
                self._bump(conn)
                return self._bank(self._bank_row(conn, name), 0)
        except sa.exc.IntegrityError as e:  # a writer outside this class, meanwhile
            raise BankExists(f"a bank named {name!r} already exists") from e

    def update_bank(self, name: str, /, **changes: Any) -> Bank:
        """Change a bank's ``action``, ``distance``, ``min_quality`` or ``description``
        (``None`` clears it). Raises :class:`UnknownBank`, :class:`BankError`."""
        unknown = sorted(set(changes) - set(_SETTINGS))
        if unknown:
            raise BankError(f"bank {name!r} not changed: unknown settings "
                            f"{', '.join(unknown)}; a bank has {', '.join(_SETTINGS)}")
        with self._writing() as conn:
            row = self._bank_row(conn, name)
            settings = {key: getattr(row, key) for key in _SETTINGS} | changes
            faults = _setting_faults(**settings)
            if faults:
                raise BankError(f"bank {name!r} not changed: {'; '.join(faults)}", faults)
            if changes:
                conn.execute(banks.update().where(banks.c.name == name).values(
                    **{k: (v or None) if k == "description" else v
                       for k, v in changes.items()}))
                self._changed(conn, name, float(row.updated_at))
            return self._bank(self._bank_row(conn, name), self._count(conn, name))

    def delete_bank(self, name: str) -> int:
        """Delete a bank and its hashes (one transaction); how many hashes it had. Raises
        :class:`UnknownBank`."""
        with self._writing() as conn:
            self._bank_row(conn, name)
            removed = conn.execute(bank_hashes.delete().where(bank_hashes.c.bank == name))
            conn.execute(banks.delete().where(banks.c.name == name))
            self._bump(conn)
            return int(removed.rowcount)

    def banks(self) -> list[Bank]:
        """Every bank, by name, with how many hashes each holds."""
        count = (sa.select(sa.func.count()).select_from(bank_hashes)
                 .where(bank_hashes.c.bank == banks.c.name).scalar_subquery())
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(banks, count.label("n")).order_by(banks.c.name))
            return [self._bank(row, int(row.n)) for row in rows]

    def bank(self, name: str) -> Bank:
        """One bank; raises :class:`UnknownBank` (:class:`moderation.errors.NotFound`)."""
        with self.engine.connect() as conn:
            return self._bank(self._bank_row(conn, name), self._count(conn, name))

    # --- hashes ------------------------------------------------------------------------

    def add_hashes(self, bank: str, entries: Sequence[HashEntry],
                   added_by: str | None = None) -> tuple[int, int]:
        """Add ``entries`` to ``bank``: (how many were added, how many it already had, or
        that came twice). All or nothing: one bad entry refuses the call
        (:class:`HashesRefused`, naming each bad entry and what is accepted)."""
        self._require(bank)
        added_by = _added_by(added_by)
        checked: list[HashEntry] = []
        faults: list[str] = []
        for number, entry in enumerate(entries, start=1):
            try:
                if not isinstance(entry, HashEntry):
                    raise ValueError(f"not a HashEntry: {_shown(entry)}")
                checked.append(_checked(entry))
            except ValueError as e:
                faults.append(f"entry {number} of {len(entries)}: {e}")
                if len(faults) >= MAX_FAULTS:
                    faults.append(f"(stopped checking after {MAX_FAULTS} faults)")
                    break
        if faults:
            raise HashesRefused(self._refusal(bank, faults, "entries"), faults)
        return self._insert(bank, checked, added_by)

    def import_csv(self, bank: str, text: str,
                   added_by: str | None = None) -> tuple[int, int]:
        """Import a CSV of hashes (the layouts the module lists) into ``bank``, all or
        nothing: (added, already present). Raises :class:`HashesRefused` naming every bad
        row by its line number (up to :data:`MAX_FAULTS`), :class:`UnknownBank`."""
        return self._import(bank, lambda now: _parse_csv(text, now), added_by, "CSV")

    def import_jsonl(self, bank: str, text: str,
                     added_by: str | None = None) -> tuple[int, int]:
        """Import JSON lines of hashes (see the module) into ``bank``, as
        :meth:`import_csv` does."""
        return self._import(bank, lambda now: _parse_jsonl(text, now), added_by,
                            "JSON lines")

    def _import(self, bank: str, parse: Any, added_by: str | None,
                what: str) -> tuple[int, int]:
        """Read the file twice: checking every row (nothing held), then writing (nothing
        held but a batch): a million rows never sit in memory as objects."""
        self._require(bank)
        added_by = _added_by(added_by)
        now = time.time()
        faults, rows = [], 0
        for line, entry in parse(now):
            if isinstance(entry, str):
                faults.append(f"line {line}: {entry}")
                if len(faults) >= MAX_FAULTS:
                    faults.append(f"(stopped reading after {MAX_FAULTS} faults)")
                    break
            else:
                rows += 1
        if faults:
            raise HashesRefused(self._refusal(bank, faults, f"{what} rows"), faults)
        if rows == 0:  # an empty bank's export
            return 0, 0
        return self._insert(bank, (e for _, e in parse(now)), added_by)

    @staticmethod
    def _refusal(bank: str, faults: list[str], what: str) -> str:
        stopped = faults[-1].startswith("(stopped")
        count = f"{len(faults) - 1} or more" if stopped else str(len(faults))
        more = f"\n  … and {len(faults) - 5} more" if len(faults) > 5 else ""
        return (f"nothing was written to bank {bank!r}: {count} bad {what} (every one must "
                "be valid):\n" + "\n".join(f"  {f}" for f in faults[:5]) + more)

    def _insert(self, bank: str, entries: Iterable[HashEntry],
                added_by: str | None) -> tuple[int, int]:
        now = time.time()
        with self._writing() as conn:
            row = self._bank_row(conn, bank)
            before = self._count(conn, bank)
            insert = (postgresql.insert if conn.dialect.name == "postgresql"
                      else sqlite.insert)
            statement = insert(bank_hashes).on_conflict_do_nothing(
                index_elements=["bank", "kind", "hash"])
            given, batch = 0, []
            for e in entries:
                batch.append({"bank": bank, "kind": e.kind, "hash": e.hash, "note": e.note,
                              "source": e.source,
                              "added_at": now if e.added_at is None else e.added_at,
                              "added_by": added_by})
                if len(batch) == _BATCH:
                    conn.execute(statement, batch)
                    given, batch = given + len(batch), []
            if batch:
                conn.execute(statement, batch)
                given += len(batch)
            added = self._count(conn, bank) - before
            if added:
                self._changed(conn, bank, float(row.updated_at))
        return added, given - added

    def remove_hashes(self, bank: str, hashes: Sequence[str],
                      kind: str | None = None) -> int:
        """Remove these hashes (hex; of ``kind``, or of either kind) from ``bank``; how many
        were removed. Raises :class:`HashesRefused` for one that is not 64 hex digits
        (nothing removed), :class:`UnknownBank`."""
        if kind is not None and kind not in HASH_KINDS:
            raise BankError(f"kind must be one of {', '.join(HASH_KINDS)} or none; "
                            f"got {_shown(kind)}")
        values, faults = [], []
        for number, value in enumerate(hashes, start=1):
            try:
                values.append(_normal_hash("sha256", value)[1])  # 64 hex digits, either kind
            except ValueError:
                faults.append(f"hash {number} of {len(hashes)}: a hash is 64 hex digits "
                              f"(PDQ or SHA-256); got {_shown(value)}")
        if faults:
            raise HashesRefused(self._refusal(bank, faults[:MAX_FAULTS], "hashes"),
                                faults[:MAX_FAULTS])
        removed = 0
        with self._writing() as conn:
            row = self._bank_row(conn, bank)
            unique = sorted(set(values))
            for start in range(0, len(unique), 500):
                where = [bank_hashes.c.bank == bank,  # (bank, kind, hash): the unique index
                         bank_hashes.c.kind.in_([kind] if kind else HASH_KINDS),
                         bank_hashes.c.hash.in_(unique[start:start + 500])]
                removed += int(conn.execute(bank_hashes.delete().where(*where)).rowcount)
            if removed:
                self._changed(conn, bank, float(row.updated_at))
        return removed

    def hashes(self, bank: str, after_id: int | None = None, limit: int = 100) -> HashPage:
        """A page of ``bank``'s hashes, oldest first (by id), after ``after_id``; ``limit``
        1 to 1000."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise BankError(f"limit must be an integer in 1..1000; got {_shown(limit)}")
        if after_id is not None and (isinstance(after_id, bool)
                                     or not isinstance(after_id, int)):
            raise BankError(f"after_id must be a hash id (an integer) or none; "
                            f"got {_shown(after_id)}")
        h = bank_hashes
        with self.engine.connect() as conn:
            self._bank_row(conn, bank)
            query = sa.select(h).where(h.c.bank == bank).order_by(h.c.id).limit(limit + 1)
            if after_id is not None:
                query = query.where(h.c.id > after_id)
            rows = conn.execute(query).all()
        page = [BankHash(int(r.id), r.bank, r.kind, r.hash, r.note, r.source,
                         float(r.added_at), r.added_by) for r in rows[:limit]]
        return HashPage(page, page[-1].id if len(rows) > limit else None)

    def _rows(self, conn: Connection, bank: str) -> Iterator[Any]:
        h = bank_hashes
        result = conn.execution_options(yield_per=_BATCH).execute(
            sa.select(h.c.kind, h.c.hash, h.c.note, h.c.source, h.c.added_at)
            .where(h.c.bank == bank).order_by(h.c.id))
        yield from result

    def export_csv(self, bank: str) -> str:
        """``bank``'s hashes in our CSV layout (the module), by id: importing it into an empty
        bank and exporting that gives the same text."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        with self._snapshot() as conn:
            self._bank_row(conn, bank)
            for r in self._rows(conn, bank):
                writer.writerow((r.kind, r.hash, _csv_cell(r.note), _csv_cell(r.source),
                                 repr(float(r.added_at))))
        return out.getvalue()

    def export_jsonl(self, bank: str) -> str:
        """``bank``'s hashes as JSON lines (the module), by id; round-trips as
        :meth:`export_csv` does."""
        out = io.StringIO()
        with self._snapshot() as conn:
            self._bank_row(conn, bank)
            for r in self._rows(conn, bank):
                out.write(json.dumps({"kind": r.kind, "hash": r.hash, "note": r.note,
                                      "source": r.source, "added_at": float(r.added_at)},
                                     ensure_ascii=False) + "\n")
        return out.getvalue()


# --- matching -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BankView:
    """One bank as a matcher holds it: its PDQ rows' ids (sorted) and packed bits, indexed;
    its SHA-256 hashes → row id; how many rows of both kinds were read and the highest id
    (to tell appends from removals). Notes and sources stay in the log: they are read for
    the rows an upload matched (a million HMA rows would hold ~200 MB of them per worker)."""

    name: str
    action: BankAction
    distance: int
    min_quality: int
    updated_at: float
    index: HashIndex
    ids: np.ndarray
    bits: np.ndarray
    sha256: dict[str, int]
    rows: int
    max_id: int


@dataclass(frozen=True)
class _MatcherState:
    token: int | None
    banks: tuple[_BankView, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class _Found:
    bank: _BankView
    kind: HashKind
    row_id: int
    hash: str | None  # None: added after the view was published (read from the log)
    distance: int
    frame: int


class BankMatcher:
    """Matches uploads against every bank of a :class:`BankStore` (implements the core's
    :class:`moderation.banks.HashMatcher`): one :class:`~moderation.hashindex.HashIndex` per
    bank for PDQ, a dict per bank for SHA-256.

    Built from the store when made (:meth:`refresh`). ``match`` follows changes: at most
    once per ``follow_s`` seconds it starts a refresh in a thread of its own (``None``: never;
    call :meth:`refresh`), so a change reaches every worker and replica within about
    ``follow_s`` plus the time to read what changed, and no request waits for it. Matches
    run on one published set of indexes at a time (thread-safe: a refresh publishes a new
    set by replacing one attribute).

    A match reads the matched rows' notes and sources from the log (one query, only when
    something matched); a hash removed meanwhile is then not reported. With the log
    unreachable, matches are still reported, without note and source.
    """

    def __init__(self, store: BankStore, *, follow_s: float | None = 1.0) -> None:
        if follow_s is not None and not (isinstance(follow_s, (int, float))
                                         and follow_s >= 0):
            raise ValueError(f"BankMatcher follow_s must be 0 or more seconds, or None; "
                             f"got {follow_s!r}")
        self.store = store
        self.follow_s = follow_s
        self._state = _MatcherState(None)
        self._refresh_lock = threading.Lock()
        self._follow_lock = threading.Lock()
        self._following = False
        self._due = 0.0
        self.refresh()

    # --- following the store -----------------------------------------------------------

    def refresh(self) -> bool:
        """Read the banks again if they changed since the last read; whether they had. Only
        changed banks are read (a bank that only gained hashes: only those)."""
        with self._refresh_lock:
            with self.store._snapshot() as conn:
                token = int(conn.execute(sa.select(bank_changes.c.version)
                                         .where(bank_changes.c.id == 1)).scalar() or 0)
                if token == self._state.token:
                    return False
                held = {b.name: b for b in self._state.banks}
                views, pending = [], []
                for row in conn.execute(sa.select(banks).order_by(banks.c.name)).all():
                    old = held.get(row.name)
                    if old is not None and old.updated_at == float(row.updated_at):
                        views.append(old)
                        continue
                    view, appended = self._read(conn, row, old)
                    views.append(view)
                    if appended is not None:
                        pending.append((view.index, *appended))
            self._state = _MatcherState(token, tuple(views))
            # after publishing: a match on the old view reads an appended row from the log
            for index, ids, bits in pending:
                index.add(ids, bits)
            return True

    @staticmethod
    def _read(conn: Connection, row: sa.Row[Any], old: _BankView | None
              ) -> tuple[_BankView, tuple[np.ndarray, np.ndarray] | None]:
        """The bank of ``row``: ``old`` plus the rows added since (and those to add to its
        index, which it shares), or read whole when something was removed."""
        settings = {"name": row.name, "action": cast(BankAction, row.action),
                    "distance": int(row.distance), "min_quality": int(row.min_quality),
                    "updated_at": float(row.updated_at)}
        h = bank_hashes
        count, top = conn.execute(sa.select(sa.func.count(), sa.func.max(h.c.id))
                                  .where(h.c.bank == row.name)).one()
        if old is not None and top is not None and top > old.max_id:
            ids, bits, sha = _read_rows(conn, row.name, old.max_id)
            if old.rows + len(ids) + len(sha) == count:  # nothing removed: append
                view = replace(old, **settings, ids=np.concatenate([old.ids, ids]),
                               bits=np.concatenate([old.bits, bits]),
                               sha256={**old.sha256, **sha}, rows=count, max_id=int(top))
                return view, (ids, bits)
        if old is not None and count == old.rows and (top or 0) == old.max_id:
            return replace(old, **settings), None  # only its settings changed
        ids, bits, sha = _read_rows(conn, row.name, 0)
        index = HashIndex()
        index.add(ids, bits)
        return _BankView(**settings, index=index, ids=ids, bits=bits, sha256=sha,
                         rows=len(ids) + len(sha), max_id=int(top or 0)), None

    def _follow(self) -> None:
        """Start a refresh in the background when one is due and none runs."""
        if self.follow_s is None or time.monotonic() < self._due:
            return
        with self._follow_lock:
            if self._following or time.monotonic() < self._due:
                return
            self._following = True
            self._due = time.monotonic() + self.follow_s
        threading.Thread(target=self._follow_once, name="bank-follow", daemon=True).start()

    def _follow_once(self) -> None:
        try:
            self.refresh()
        except Exception:  # the log unreachable: keep matching with what is held
            log.warning("hash banks: could not read the banks' changes; matching with the "
                        "banks as last read", exc_info=True)
        finally:
            self._following = False

    # --- matching ----------------------------------------------------------------------

    @property
    def banks(self) -> list[str]:
        """The names of the banks held."""
        return [b.name for b in self._state.banks]

    def __len__(self) -> int:
        """How many hashes are held, over every bank."""
        return sum(len(b.ids) + len(b.sha256) for b in self._state.banks)

    def match(self, hashes: UploadHashes, frame_indices: list[int]) -> list[BankMatch]:
        """Every bank hash ``hashes`` match (see :class:`moderation.banks.HashMatcher`): a
        PDQ bank hash within its bank's distance of a frame whose quality is at least the
        bank's ``min_quality`` (once, at its nearest frame), a SHA-256 equal to the upload's.
        Most severe action first, then nearest."""
        if len(frame_indices) != len(hashes.frames):
            raise ValueError(f"BankMatcher.match: {len(frame_indices)} frame indices for "
                             f"{len(hashes.frames)} frame hashes")
        self._follow()
        sha256 = hashes.sha256.lower()
        bits: dict[int, np.ndarray] = {}
        found: list[_Found] = []
        for bank in self._state.banks:
            exact = bank.sha256.get(sha256)
            if exact is not None:
                found.append(_Found(bank, "sha256", exact, sha256, 0,
                                    frame_indices[0] if frame_indices else 0))
            nearest: dict[int, tuple[int, int]] = {}  # row id → (distance, frame)
            for i, frame in enumerate(hashes.frames):
                if frame.quality < bank.min_quality or not len(bank.index):
                    continue
                if i not in bits:
                    bits[i] = pdq_to_bits(frame.pdq)
                for row_id, distance in bank.index.match(bits[i], bank.distance):
                    if row_id not in nearest or distance < nearest[row_id][0]:
                        nearest[row_id] = (distance, frame_indices[i])
            for row_id, (distance, frame_index) in nearest.items():
                at = int(np.searchsorted(bank.ids, row_id))
                known = at < len(bank.ids) and bank.ids[at] == row_id
                found.append(_Found(bank, "pdq", row_id,
                                    bank.bits[at].tobytes().hex() if known else None,
                                    distance, frame_index))
        if not found:
            return []
        rows = self._details([f.row_id for f in found])
        matches = []
        for f in found:
            stored = rows.get(f.row_id) if rows is not None else None
            if rows is not None and stored is None:
                continue  # removed from the bank since this view was read
            value = f.hash if f.hash is not None else (stored[0] if stored else None)
            if value is None:
                continue  # appended after this view, and the log unreachable
            matches.append(BankMatch(f.bank.name, f.bank.action, f.kind, value, f.distance,
                                     f.frame, *(stored[1:] if stored else (None, None))))
        matches.sort(key=lambda m: (-Action(m.action).severity, m.distance, m.bank, m.hash))
        return matches

    def _details(self, row_ids: list[int]
                 ) -> dict[int, tuple[str, str | None, str | None]] | None:
        """id → (hash, note, source) of these rows, as the log has them now (``None``: the
        log is unreachable)."""
        h = bank_hashes
        try:
            with self.store.engine.connect() as conn:
                return {int(i): (value, note, source) for i, value, note, source in
                        conn.execute(sa.select(h.c.id, h.c.hash, h.c.note, h.c.source)
                                     .where(h.c.id.in_(sorted(set(row_ids)))))}
        except sa.exc.DBAPIError:
            log.warning("hash banks: could not read the notes of matched hashes; reporting "
                        "the matches without them", exc_info=True)
            return None


def _read_rows(conn: Connection, bank: str, after_id: int
               ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """``bank``'s rows after ``after_id``, by id: the PDQ rows' ids and packed bits, ndarray
    of shape (n, 32); and SHA-256 → id. Converted a batch at a time (no million strings
    held at once)."""
    h = bank_hashes
    result = conn.execution_options(yield_per=_READ_BATCH).execute(
        sa.select(h.c.id, h.c.kind, h.c.hash)
        .where(h.c.bank == bank, h.c.id > after_id).order_by(h.c.id))
    ids: list[np.ndarray] = [np.zeros(0, np.int64)]
    bits: list[np.ndarray] = [np.zeros((0, PDQ_BITS // 8), np.uint8)]
    sha: dict[str, int] = {}
    for part in result.partitions():
        pdq_ids, hexes = [], []
        for row_id, kind, value in part:
            if kind == "pdq":
                pdq_ids.append(row_id)
                hexes.append(value)
            else:
                sha[value] = row_id
        ids.append(np.array(pdq_ids, np.int64))
        bits.append(pdqs_to_bits(hexes))
    return np.concatenate(ids), np.concatenate(bits), sha


# --- what a list would have done ---------------------------------------------------------------


@dataclass(frozen=True)
class ImportDryRun:
    """What importing a file into a bank of ``action`` would have done to the stored decisions
    of a window: ``decisions`` read (those with hashes), ``matched`` (an upload a hash of the
    file matches), ``changed`` (whose action the bank would have changed), ``by_change``
    (``"allow->block"`` → count), and up to ``limit`` matched decision ids (newest first)."""

    hashes: int
    decisions: int
    matched: int
    changed: int
    by_change: dict[str, int]
    examples: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"hashes": self.hashes, "decisions": self.decisions, "matched": self.matched,
                "changed": self.changed, "by_change": self.by_change,
                "examples": self.examples}


def import_dry_run(engine: Engine, text: str, fmt: str = "csv", *, action: str = "block",
                   distance: int = DEFAULT_DISTANCE, min_quality: int = 50,
                   since: float | None = None, until: float | None = None,
                   limit: int = 20) -> ImportDryRun:
    """"This list would have blocked 312 past uploads": a file of hashes (as
    :meth:`BankStore.import_csv` / ``import_jsonl`` read it, refused the same way) matched
    against every stored decision of ``[since, until)`` (their SHA-256 and each frame's PDQ,
    as recorded), joined with each decision's action by the rule of
    :mod:`moderation.banks`. Nothing is written. One pass over the decisions, the file's
    hashes in a :class:`~moderation.hashindex.HashIndex`."""
    from .tables import decisions

    faults = list(_setting_faults(action, distance, min_quality))
    if faults:
        raise BankError("; ".join(faults), faults)
    now = time.time()
    parse = _parse_csv if fmt == "csv" else _parse_jsonl
    pdqs: list[str] = []
    shas: set[str] = set()
    bad = []
    for line, entry in parse(text, now):
        if isinstance(entry, str):
            bad.append(f"line {line}: {entry}")
            if len(bad) >= MAX_FAULTS:
                break
        elif entry.kind == "pdq":
            pdqs.append(entry.hash)
        else:
            shas.add(entry.hash)
    if bad:
        raise HashesRefused(f"the file has {len(bad)} bad rows (nothing was matched):\n"
                            + "\n".join(f"  {f}" for f in bad[:5]), bad)
    index = HashIndex()
    if pdqs:
        index.add(np.arange(len(pdqs)), pdqs_to_bits(pdqs))
    d = decisions.c
    where = [d.action != "error"]
    if since is not None:
        where.append(d.created_at >= since)
    if until is not None:
        where.append(d.created_at < until)
    read = matched = changed = 0
    by_change: dict[str, int] = {}
    examples: list[tuple[float, str]] = []
    bank_action = Action(action) if action != "allow" else Action.ALLOW
    with engine.connect() as conn:
        rows = conn.execution_options(yield_per=2000).execute(
            sa.select(d.id, d.created_at, d.action, d.image_sha256, d.pdq).where(*where))
        for row in rows:
            read += 1
            hit = row.image_sha256 in shas
            if not hit and row.pdq and len(index):
                for frame in json.loads(row.pdq):
                    if frame.get("quality", 0) >= min_quality and index.match(
                            pdq_to_bits(frame["pdq"]), distance):
                        hit = True
                        break
            if not hit:
                continue
            matched += 1
            old = Action(row.action)
            new = (Action.ALLOW if action == "allow"
                   else old if old.severity >= bank_action.severity else bank_action)
            if new is not old:
                changed += 1
                key = f"{old.value}->{new.value}"
                by_change[key] = by_change.get(key, 0) + 1
            examples.append((float(row.created_at), str(row.id)))
            if len(examples) > 4 * limit:
                examples = sorted(examples, reverse=True)[:limit]
    return ImportDryRun(len(pdqs) + len(shas), read, matched, changed, by_change,
                        [i for _, i in sorted(examples, reverse=True)[:limit]])
