"""Known-image hash banks in the decision log (SQLite, and PostgreSQL when
MODERATION_TEST_POSTGRES_URL is set): the store's rules, imports that refuse bad files whole,
exports that round-trip byte for byte, HMA's CSV, the matcher, and a second replica
following a change."""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from PIL import Image

from decisionlog.banks import (
    MAX_FAULTS,
    BankError,
    BankExists,
    BankMatcher,
    BankStore,
    HashEntry,
    HashesRefused,
    UnknownBank,
)
from decisionlog.banks_cli import banks as banks_cli
from decisionlog.database import connect, head_revision, migrate, revision_of
from moderation.errors import NotFound
from moderation.hashing import FrameHash, UploadHashes, hamming

RNG = np.random.default_rng(7)


def random_pdq() -> str:
    return RNG.integers(0, 256, 32, dtype=np.uint8).tobytes().hex()


def flipped(pdq: str, n: int) -> str:
    """``pdq`` with ``n`` distinct bits flipped."""
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(pdq), np.uint8))
    bits[RNG.choice(256, n, replace=False)] ^= 1
    return np.packbits(bits).tobytes().hex()


def upload(*frames: tuple[str, int], sha256: str = "0" * 64) -> UploadHashes:
    return UploadHashes(sha256, [FrameHash(p, q) for p, q in frames])


@pytest.fixture
def store(url: str) -> BankStore:
    return BankStore(url)


# --- banks ----------------------------------------------------------------------------------


def test_create_read_update_delete(store: BankStore) -> None:
    made = store.create_bank("known-bad", "block", description="CSAM hash list")
    assert (made.name, made.action, made.distance, made.min_quality) == ("known-bad", "block",
                                                                         31, 50)
    assert made.created_at == made.updated_at and made.hashes == 0
    store.create_bank("fp.memes", "allow", distance=20, min_quality=70)
    store.add_hashes("known-bad", [HashEntry("pdq", random_pdq()) for _ in range(3)])
    assert [(b.name, b.hashes) for b in store.banks()] == [("fp.memes", 0), ("known-bad", 3)]

    changed = store.update_bank("known-bad", action="review", distance=24, description="")
    assert (changed.action, changed.distance, changed.description, changed.hashes) == (
        "review", 24, None, 3)
    assert changed.updated_at > made.updated_at
    assert store.bank("known-bad") == changed

    assert store.delete_bank("known-bad") == 3
    assert [b.name for b in store.banks()] == ["fp.memes"]
    with pytest.raises(UnknownBank, match="no bank named 'known-bad'; the banks: fp.memes") as e:
        store.bank("known-bad")
    assert isinstance(e.value, NotFound) and e.value.status == 404
    with pytest.raises(UnknownBank):
        store.delete_bank("known-bad")
    with pytest.raises(UnknownBank):
        store.update_bank("known-bad", action="flag")


def test_a_duplicate_bank_is_a_conflict(store: BankStore) -> None:
    store.create_bank("dup", "flag")
    with pytest.raises(BankExists, match="a bank named 'dup' already exists") as e:
        store.create_bank("dup", "block")
    assert (e.value.status, e.value.code) == (409, "bank_exists")
    assert store.bank("dup").action == "flag"


@pytest.mark.parametrize("name", ["", "Upper", "-lead", ".lead", "a b", "x" * 65, "é", 7])
def test_bad_bank_names_are_refused(store: BankStore, name: object) -> None:
    with pytest.raises(BankError, match="a bank name is 1 to 64 characters"):
        store.create_bank(name, "block")  # type: ignore[arg-type]


@pytest.mark.parametrize("settings, fault", [
    ({"action": "delete"}, "action must be one of allow, flag, review, block; got 'delete'"),
    ({"distance": -1}, r"distance must be an integer in 0\.\.128"),
    ({"distance": 129}, r"distance must be an integer in 0\.\.128 .*; got 129"),
    ({"distance": 3.5}, "distance must be an integer"),
    ({"distance": True}, "distance must be an integer"),
    ({"min_quality": 101}, r"min_quality must be an integer in 0\.\.100"),
    ({"description": 5}, "description must be text"),
])
def test_bad_settings_are_refused(store: BankStore, settings: dict[str, object],
                                  fault: str) -> None:
    given = {"action": "block", **settings}
    with pytest.raises(BankError, match=fault) as e:
        store.create_bank("b", **given)  # type: ignore[arg-type]
    assert e.value.status == 400
    store.create_bank("b", "block")
    with pytest.raises(BankError, match=fault):
        store.update_bank("b", **settings)
    assert store.bank("b").action == "block"


def test_every_bad_setting_is_named_at_once(store: BankStore) -> None:
    with pytest.raises(BankError) as e:
        store.create_bank("b", "nope", distance=500, min_quality=-3)
    assert len(e.value.faults) == 3 and e.value.details() == {"faults": e.value.faults}
    store.create_bank("b", "flag")
    with pytest.raises(BankError, match="unknown settings name, size; a bank has action"):
        store.update_bank("b", size=3, name="c")


# --- hashes ---------------------------------------------------------------------------------


def test_add_normalises_and_counts_what_was_there(store: BankStore) -> None:
    store.create_bank("b", "block")
    pdq = random_pdq()
    assert store.add_hashes("b", [
        HashEntry("pdq", f"  {pdq.upper()} \n", note="first", source="te:1"),
        HashEntry("sha256", "AB" * 32),
        HashEntry("pdq", pdq),  # the same hash twice in one call
    ], added_by="alice") == (2, 1)
    assert store.add_hashes("b", [HashEntry("pdq", pdq), HashEntry("sha256", "ab" * 32)]) == (
        0, 2)
    first, second = store.hashes("b").hashes
    assert (first.kind, first.hash, first.note, first.source, first.added_by) == (
        "pdq", pdq, "first", "te:1", "alice")
    assert (second.kind, second.hash) == ("sha256", "ab" * 32)


def test_a_bad_hash_refuses_the_whole_call(store: BankStore) -> None:
    store.create_bank("b", "block")
    entries = [HashEntry("pdq", random_pdq()), HashEntry("pdq", "0x" + "a" * 64),
               HashEntry("sha256", "a" * 63), HashEntry("md5", "a" * 32),
               HashEntry("pdq", random_pdq())]
    with pytest.raises(HashesRefused, match="nothing was written to bank 'b': 3 bad") as e:
        store.add_hashes("b", entries)
    assert e.value.faults[0].startswith("entry 2 of 5: a PDQ hash is 64 hex digits")
    assert "without a '0x' prefix" in e.value.faults[0]
    assert e.value.faults[1].startswith("entry 3 of 5: a SHA-256 is 64 hex digits")
    assert e.value.faults[2] == "entry 4 of 5: kind must be one of pdq, sha256; got 'md5'"
    assert (e.value.status, e.value.code) == (422, "invalid_hashes")
    assert store.bank("b").hashes == 0
    with pytest.raises(UnknownBank):
        store.add_hashes("nope", entries[:1])


def test_remove_and_pages(store: BankStore) -> None:
    store.create_bank("b", "block")
    pdqs = [random_pdq() for _ in range(7)]
    store.add_hashes("b", [HashEntry("pdq", p) for p in pdqs] + [HashEntry("sha256", pdqs[0])])
    first = store.hashes("b", limit=3)
    assert [h.hash for h in first.hashes] == pdqs[:3] and first.next_after_id is not None
    rest = store.hashes("b", after_id=first.next_after_id, limit=10)
    assert [h.hash for h in rest.hashes] == [*pdqs[3:], pdqs[0]] and rest.next_after_id is None
    assert store.remove_hashes("b", [pdqs[0].upper()], kind="sha256") == 1
    assert store.remove_hashes("b", [pdqs[0], pdqs[1], random_pdq()]) == 2
    with pytest.raises(HashesRefused, match="hash 2 of 2: a hash is 64 hex digits"):
        store.remove_hashes("b", [pdqs[2], "xyz"])
    assert store.bank("b").hashes == 5
    with pytest.raises(BankError, match="limit must be an integer in 1..1000"):
        store.hashes("b", limit=0)


def test_deleting_a_bank_deletes_its_hashes(store: BankStore) -> None:
    from decisionlog.tables import bank_hashes

    store.create_bank("gone", "block")
    store.create_bank("kept", "flag")
    pdq = random_pdq()
    store.add_hashes("gone", [HashEntry("pdq", pdq), HashEntry("sha256", "cd" * 32)])
    store.add_hashes("kept", [HashEntry("pdq", pdq)])
    assert store.delete_bank("gone") == 2
    with store.engine.connect() as conn:
        left = conn.execute(sa.select(bank_hashes.c.bank, sa.func.count())
                            .group_by(bank_hashes.c.bank)).all()
    assert [tuple(r) for r in left] == [("kept", 1)]
    store.create_bank("gone", "block")
    assert store.bank("gone").hashes == 0


# --- files ----------------------------------------------------------------------------------

TRICKY_NOTES = ["plain", "a, comma", 'say "hi"', "two\nlines", "cr\r\nlf", "=HYPERLINK(1)",
                "'=already quoted", "''=twice", "-2 bits", "'not a formula", "é ünï \u2028 ✓",
                None, "   spaced   "]


def tricky_bank(store: BankStore, name: str) -> None:
    store.create_bank(name, "review")
    entries = [HashEntry("pdq", random_pdq(), note=n, source=f"src {i}" if i % 3 else None,
                         added_at=1_790_000_000.123456789 + i / 7)
               for i, n in enumerate(TRICKY_NOTES)]
    entries.append(HashEntry("sha256", "ef" * 32, note="@SUM(A1)", source="+cmd",
                             added_at=0.1))
    entries.append(HashEntry("pdq", random_pdq()))  # added now
    store.add_hashes(name, entries, added_by="test")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_import_export_is_byte_for_byte(store: BankStore, fmt: str) -> None:
    tricky_bank(store, "a")
    export = store.export_csv if fmt == "csv" else store.export_jsonl
    read = store.import_csv if fmt == "csv" else store.import_jsonl
    first = export("a")
    store.create_bank("b", "block")
    assert read("b", first) == (len(TRICKY_NOTES) + 2, 0)
    assert export("b") == first
    assert read("b", first) == (0, len(TRICKY_NOTES) + 2)  # all already there
    assert [h.note for h in store.hashes("b").hashes][:len(TRICKY_NOTES)] == TRICKY_NOTES
    store.create_bank("empty", "block")
    store.create_bank("empty2", "block")
    assert read("empty2", export("empty")) == (0, 0)


def test_the_csv_export_neutralises_formulas(store: BankStore) -> None:
    tricky_bank(store, "a")
    import csv

    rows = list(csv.reader(io.StringIO(store.export_csv("a"))))
    assert rows[0] == ["kind", "hash", "note", "source", "added_at"]
    notes = [r[2] for r in rows[1:]]
    assert "'=HYPERLINK(1)" in notes and "''=already quoted" in notes
    assert "'''=twice" in notes and "'-2 bits" in notes and "'not a formula" in notes
    assert rows[-2][2:4] == ["'@SUM(A1)", "'+cmd"] and rows[-2][4] == "0.1"


def test_a_csv_with_bad_rows_names_their_lines_and_writes_nothing(store: BankStore) -> None:
    store.create_bank("b", "block")
    good = random_pdq()
    text = "\n".join([
        "kind,hash,note,source,added_at",     # line 1
        f"pdq,{good},fine,,",                 # 2
        f"pdq,{good[:-1]},short,,",           # 3
        "",                                   # 4: blank, skipped
        f'pdq,{random_pdq()},"a note',         # 5-6: a quoted field over two lines
        'on two lines",,',
        f"md5,{random_pdq()},,,",              # 7
        f"sha256,{'a' * 64},,,yesterday",      # 8
        f"pdq,{good},extra,,,column",          # 9
        f"pdq,{'g' * 64},,,soon",              # 10: two faults in one row
    ]) + "\n"
    with pytest.raises(HashesRefused) as e:
        store.import_csv("b", text)
    assert [f.split(":")[0] for f in e.value.faults] == [
        "line 3", "line 7", "line 8", "line 9", "line 10"]
    assert "got 63 digits" in e.value.faults[0]
    assert "kind must be one of pdq, sha256; got 'md5'" in e.value.faults[1]
    assert "added_at must be unix seconds (a number); got 'yesterday'" in e.value.faults[2]
    assert "6 columns where the header has 5" in e.value.faults[3]
    assert "'g' at position 1" in e.value.faults[4] and "added_at" in e.value.faults[4]
    assert "nothing was written to bank 'b': 5 bad CSV rows" in str(e.value)
    assert store.bank("b").hashes == 0


def test_a_bad_header_or_too_many_faults_stop_the_import(store: BankStore) -> None:
    store.create_bank("b", "block")
    with pytest.raises(HashesRefused, match="unknown: colour") as e:
        store.import_csv("b", "hash,colour\n" + random_pdq() + ",red\n")
    assert e.value.faults[0].startswith("line 1: a header with columns kind, hash")
    many = "".join(f"{i:064x}z\n" for i in range(200))
    with pytest.raises(HashesRefused) as e:
        store.import_csv("b", many)
    assert len(e.value.faults) == MAX_FAULTS + 1
    assert e.value.faults[-1] == f"(stopped reading after {MAX_FAULTS} faults)"
    assert e.value.faults[MAX_FAULTS - 1].startswith(f"line {MAX_FAULTS}: ")
    assert f"{MAX_FAULTS} or more bad CSV rows" in str(e.value)
    assert store.bank("b").hashes == 0


def test_jsonl_with_bad_lines_names_them_and_writes_nothing(store: BankStore) -> None:
    store.create_bank("b", "block")
    lines = [
        json.dumps({"hash": random_pdq(), "note": "ok"}),
        "{not json",
        json.dumps([random_pdq()]),
        json.dumps({"hash": random_pdq(), "colour": "red"}),
        "",
        json.dumps({"kind": "sha256", "hash": "ab" * 32, "added_at": "today"}),
        json.dumps({"note": "no hash"}),
        json.dumps({"hash": random_pdq(), "note": 5}),
    ]
    with pytest.raises(HashesRefused) as e:
        store.import_jsonl("b", "\n".join(lines))
    assert [f.split(":")[0] for f in e.value.faults] == [
        "line 2", "line 3", "line 4", "line 6", "line 7", "line 8"]
    assert "a JSON list, not an object" in e.value.faults[1]
    assert "unknown keys: colour" in e.value.faults[2]
    assert "added_at must be unix seconds" in e.value.faults[3]
    assert "no hash" in e.value.faults[4] and "note must be text" in e.value.faults[5]
    assert store.bank("b").hashes == 0


# Rows as HMA 1.0 keeps a bank (hasher-matcher-actioner/sample_data/pdq.csv: hash, id,
# ThreatExchange's added_on, labels; its S3 data files add the descriptor id before the time).
HMA_4 = """\
acecf3355e3125c8e24e2f30e0d4ec4f8482b878b3c34cdbdf063278db275992,2880742865368386,\
2020-07-31T18:47:52+0000,media_priority_pdq_samples disputed media_priority_samples \
media_type_photo
8fb70f36e1c4181e82fde7d0f80138430e1e31f07b628e31ccbb687e87e1f307,2888629371260007,\
2020-07-31T18:47:52+0000,media_priority_pdq_samples disputed media_priority_samples \
media_type_photo
"""
HMA_5 = """\
36b4665bca0c91f6aecb8948e3381e57e509ae7210e3cd1bd768288e56a95af9,3085240538237227,\
12345,mine,
"""
TE_SIGNALS = """\
collab,signal_type,signal_str,category,tags
Sample Signals,pdq,e875634b9df48df5bd7f1695c796287e8a0ec0603c0c478170fc9d0f81ea60f4,\
WORTH_INVESTIGATING,
"""


def test_hma_and_threatexchange_csvs_import(store: BankStore) -> None:
    store.create_bank("hma", "block")
    assert store.import_csv("hma", HMA_4) == (2, 0)
    first = store.hashes("hma").hashes[0]
    assert first.hash.startswith("acecf335") and first.kind == "pdq"
    assert first.source == "threatexchange:2880742865368386"
    assert first.note == ("media_priority_pdq_samples disputed media_priority_samples "
                          "media_type_photo")
    assert first.added_at == dt.datetime(2020, 7, 31, 18, 47, 52,
                                         tzinfo=dt.timezone.utc).timestamp()
    before = time.time()
    assert store.import_csv("hma", HMA_5) == (1, 0)
    third = store.hashes("hma").hashes[2]
    assert third.source == "threatexchange:3085240538237227" and third.note is None
    assert third.added_at >= before  # 'mine': no time of its own
    plain = random_pdq()
    assert store.import_csv("hma", f"{plain}\n{random_pdq()},a note\n"
                                   f"{random_pdq()},note,source\n") == (3, 0)
    assert store.hashes("hma").hashes[3].hash == plain
    assert store.import_csv("hma", TE_SIGNALS) == (1, 0)
    te = store.hashes("hma").hashes[-1]
    assert (te.source, te.note) == ("Sample Signals", "WORTH_INVESTIGATING")
    reordered = f"signal_str,signal_type\n{random_pdq()},pdq\n"  # its columns, any order
    assert store.import_csv("hma", reordered) == (1, 0)
    with pytest.raises(HashesRefused, match="line 1: the timestamp column must be ISO 8601"):
        store.import_csv("hma", f"{random_pdq()},1,yesterday,tags\n")
    with pytest.raises(HashesRefused, match="signal_type must be pdq"):
        store.import_csv("hma", TE_SIGNALS.replace(",pdq,", ",md5,"))


# --- matching -------------------------------------------------------------------------------


def test_matches_within_the_distance_and_quality(store: BankStore) -> None:
    store.create_bank("bad", "block")
    bank_pdq = random_pdq()
    store.add_hashes("bad", [HashEntry("pdq", bank_pdq, note="known", source="te:9")])
    matcher = BankMatcher(store, follow_s=None)
    near, far = flipped(bank_pdq, 10), flipped(bank_pdq, 40)
    assert (hamming(near, bank_pdq), hamming(far, bank_pdq)) == (10, 40)
    [m] = matcher.match(upload((near, 80)), [0])
    assert (m.bank, m.action, m.kind, m.hash, m.distance, m.frame, m.note, m.source) == (
        "bad", "block", "pdq", bank_pdq, 10, 0, "known", "te:9")
    assert matcher.match(upload((far, 80)), [0]) == []
    assert matcher.match(upload((near, 49)), [0]) == []  # under the bank's min_quality
    assert len(matcher.match(upload((near, 50)), [0])) == 1
    store.update_bank("bad", min_quality=10, distance=45)
    matcher.refresh()
    assert [m.distance for m in matcher.match(upload((far, 20)), [0])] == [40]
    with pytest.raises(ValueError, match="2 frame indices for 1 frame hashes"):
        matcher.match(upload((near, 80)), [0, 1])


def test_one_match_per_bank_hash_at_its_nearest_frame(store: BankStore) -> None:
    store.create_bank("bad", "review")
    bank_pdq = random_pdq()
    store.add_hashes("bad", [HashEntry("pdq", bank_pdq)])
    matcher = BankMatcher(store, follow_s=None)
    frames = upload((flipped(bank_pdq, 20), 90), (flipped(bank_pdq, 5), 90),
                    (flipped(bank_pdq, 12), 90), (bank_pdq, 30))
    [m] = matcher.match(frames, [0, 4, 8, 12])
    assert (m.distance, m.frame) == (5, 4)  # frame 12 is exact but under min_quality


def test_sha256_exact_and_banks_sorted_by_severity_then_distance(store: BankStore) -> None:
    store.create_bank("a-allow", "allow")
    store.create_bank("b-flag", "flag")
    store.create_bank("z-block", "block")
    pdq = random_pdq()
    data_sha = "5e" * 32
    store.add_hashes("a-allow", [HashEntry("pdq", flipped(pdq, 3))])
    store.add_hashes("b-flag", [HashEntry("pdq", flipped(pdq, 1)),
                                HashEntry("sha256", data_sha.upper(), note="exact")])
    store.add_hashes("z-block", [HashEntry("pdq", flipped(pdq, 9)),
                                 HashEntry("pdq", flipped(pdq, 2)),
                                 HashEntry("pdq", flipped(pdq, 60))])
    matcher = BankMatcher(store, follow_s=None)
    found = matcher.match(upload((pdq, 100), sha256=data_sha), [0])
    assert [(m.bank, m.kind, m.distance) for m in found] == [
        ("z-block", "pdq", 2), ("z-block", "pdq", 9), ("b-flag", "sha256", 0),
        ("b-flag", "pdq", 1), ("a-allow", "pdq", 3)]
    assert found[2].note == "exact" and found[2].hash == data_sha
    # no PDQ frame at all (a file the decoder could not hash): SHA-256 still matches
    assert [m.kind for m in matcher.match(upload(sha256=data_sha), [])] == ["sha256"]


def test_the_matcher_follows_adds_removals_and_deletes(store: BankStore) -> None:
    """Appends go to a bank's index; a removal rebuilds the bank; brute force agrees."""
    store.create_bank("big", "block")
    store.create_bank("other", "flag")
    pdqs = [random_pdq() for _ in range(300)]
    store.add_hashes("big", [HashEntry("pdq", p) for p in pdqs[:200]])
    matcher = BankMatcher(store, follow_s=None)
    index = matcher._state.banks[0].index
    assert not matcher.refresh()  # nothing moved
    store.add_hashes("big", [HashEntry("pdq", p) for p in pdqs[200:]])
    store.add_hashes("other", [HashEntry("pdq", pdqs[0])])
    assert matcher.refresh() and matcher._state.banks[0].index is index  # appended
    held = set(pdqs)
    for step in range(3):
        gone = pdqs[step * 50: step * 50 + 20]
        store.remove_hashes("big", gone)
        held -= set(gone)
        new = [random_pdq() for _ in range(10)]
        store.add_hashes("big", [HashEntry("pdq", p) for p in new])
        held |= set(new)
        matcher.refresh()
        for probe in [*gone[:5], *new[:5], pdqs[299]]:
            query = flipped(probe, 7)
            expected = sorted(hamming(query, p) for p in held if hamming(query, p) <= 31)
            got = sorted(m.distance for m in matcher.match(upload((query, 90)), [0])
                         if m.bank == "big")
            assert got == expected
    assert len(matcher) == len(held) + 1
    store.delete_bank("big")
    matcher.refresh()
    assert matcher.banks == ["other"]
    assert [m.bank for m in matcher.match(upload((pdqs[0], 90)), [0])] == ["other"]


def test_writers_at_once_count_exactly_and_a_matcher_appends_in_order(url: str) -> None:
    """Four writers add at once (each 40 hashes of its own, 10 everyone adds): the counts
    add up, and a matcher that appended while they wrote holds what a fresh one reads."""
    import threading

    store = BankStore(url)
    store.create_bank("b", "block")
    matcher = BankMatcher(store, follow_s=None)
    shared = [random_pdq() for _ in range(10)]
    own = [[random_pdq() for _ in range(40)] for _ in range(4)]
    results: list[tuple[int, int]] = []

    def write(k: int) -> None:
        for start in range(0, 40, 8):
            results.append(BankStore(url).add_hashes(
                "b", [HashEntry("pdq", p) for p in own[k][start:start + 8] + shared]))
            matcher.refresh()

    writers = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert sum(a for a, _ in results) == 170 == store.bank("b").hashes
    assert sum(p for _, p in results) == 4 * 5 * 18 - 170
    matcher.refresh()
    fresh = BankMatcher(store, follow_s=None)
    assert len(matcher) == len(fresh) == 170
    for view, other in zip(matcher._state.banks, fresh._state.banks, strict=True):
        assert np.array_equal(view.ids, other.ids) and np.array_equal(view.bits, other.bits)
        assert len(view.index) == 170
    probe = own[2][-1]
    assert [m.hash for m in matcher.match(upload((probe, 90)), [0])] == [probe]


def test_a_second_replica_sees_a_change_within_a_second(url: str) -> None:
    """Two stores and matchers on one database (two replicas): a hash added through one is
    matched by the other's matcher, which only polls (at most every follow_s)."""
    first = BankStore(url)
    second = BankStore(url)
    first.create_bank("live", "block")
    replica = BankMatcher(second, follow_s=0.05)
    pdq = random_pdq()
    query = upload((flipped(pdq, 4), 90))
    assert replica.match(query, [0]) == []
    first.add_hashes("live", [HashEntry("pdq", pdq)])
    added = time.monotonic()
    while not replica.match(query, [0]):
        assert time.monotonic() - added < 5, "the replica did not see the hash within 5 s"
        time.sleep(0.01)
    seen = time.monotonic() - added
    assert seen < 1.5, f"the replica took {seen:.2f} s"
    first.update_bank("live", action="allow")
    deadline = time.monotonic() + 5
    while replica.match(query, [0])[0].action != "allow":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.delete_bank("live")
    while replica.match(query, [0]):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_matcher_keeps_matching_when_the_log_is_unreachable(
        store: BankStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create_bank("b", "block")
    pdq = random_pdq()
    store.add_hashes("b", [HashEntry("pdq", pdq, note="n", source="s")])
    matcher = BankMatcher(store, follow_s=0.0)

    class Down:
        dialect = store.engine.dialect

        def connect(self) -> None:
            raise sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

        def execution_options(self, **_: object) -> Down:
            return self

    monkeypatch.setattr(store, "engine", Down())
    for _ in range(5):  # each match starts a refresh that fails (logged)
        [m] = matcher.match(upload((pdq, 90)), [0])
        assert (m.hash, m.note, m.source) == (pdq, None, None)
        time.sleep(0.01)


def test_a_removed_hash_stops_matching_before_the_next_refresh(store: BankStore) -> None:
    store.create_bank("b", "block")
    kept, removed = random_pdq(), random_pdq()
    store.add_hashes("b", [HashEntry("pdq", kept, note="k"), HashEntry("pdq", removed)])
    matcher = BankMatcher(store, follow_s=None)
    store.remove_hashes("b", [removed])
    assert matcher.match(upload((removed, 90)), [0]) == []
    assert [m.note for m in matcher.match(upload((kept, 90)), [0])] == ["k"]


# --- schema ---------------------------------------------------------------------------------


def test_migration_0010_up_and_down(url: str) -> None:
    store = BankStore(url)
    store.create_bank("b", "block")
    store.add_hashes("b", [HashEntry("pdq", random_pdq())])
    assert migrate(url, "0009") == (head_revision(), "0009")
    inspector = sa.inspect(connect(url))
    assert not {"banks", "bank_hashes", "bank_changes"} & set(inspector.get_table_names())
    assert migrate(url)[1] == head_revision() == revision_of(connect(url))
    assert BankStore(url).banks() == [] and BankStore(url).change_token() == 0
    columns = {c["name"]: c for c in sa.inspect(connect(url)).get_columns("banks")}
    assert set(columns) == {"name", "action", "distance", "min_quality", "description",
                            "created_at", "updated_at"}
    with connect(url).begin() as conn:  # the defaults are the database's too
        conn.execute(sa.text("INSERT INTO banks (name, action, created_at, updated_at) "
                             "VALUES ('raw', 'flag', 0, 0)"))
    assert (BankStore(url).bank("raw").distance, BankStore(url).bank("raw").min_quality) == (
        31, 50)
    with pytest.raises(sa.exc.IntegrityError), connect(url).begin() as conn:
        conn.execute(sa.text("INSERT INTO banks (name, action, created_at, updated_at) "
                             "VALUES ('bad', 'delete', 0, 0)"))


# --- the command line -----------------------------------------------------------------------


def noise_png(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((512, 384)).save(path)
    return path


def test_the_cli_round_trip(url: str, tmp_path: Path) -> None:
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> str:
        result = runner.invoke(banks_cli, [*args, "--database-url", url])
        assert (result.exit_code == 0) == ok, result.output
        return result.output

    assert "bank known created: block, distance 31" in run("create", "known", "--action",
                                                           "block")
    assert "already exists" in run("create", "known", "--action", "flag", ok=False)
    assert "distance must be an integer in 0..128" in run(
        "create", "x", "--action", "flag", "--distance", "300", ok=False)
    pdq = random_pdq()
    assert "2 added, 0 already there" in run("add", "known", pdq, "ab" * 32, "--note", "n1")
    out = run("add", "known", pdq, "zz", ok=False)
    assert "entry 2 of 2: a PDQ hash is 64 hex digits" in out and "nothing was written" in out
    image = noise_png(tmp_path / "photo.png", 1)
    assert "2 added" in run("add", "known", "--file", str(image), "--with-sha256")
    flat = tmp_path / "flat.png"
    Image.new("RGB", (300, 300), (90, 90, 90)).save(flat)
    assert "under the bank's min_quality 50" in run("add", "known", "--file", str(flat),
                                                    ok=False)
    listed = json.loads(run("list", "--format", "json"))
    assert [(b["name"], b["hashes"]) for b in listed] == [("known", 4)]
    assert "known" in run("update", "known", "--action", "review", "--min-quality", "60")

    exported = tmp_path / "known.csv"
    run("export", "known", "-o", str(exported))
    run("create", "copy", "--action", "flag")
    assert "4 added, 0 already there" in run("import", "copy", str(exported))
    assert run("export", "copy") == exported.read_bytes().decode()
    jsonl = run("export", "known", "--format", "jsonl")
    (tmp_path / "known.jsonl").write_text(jsonl)
    run("create", "copy2", "--action", "flag")
    run("import", "copy2", str(tmp_path / "known.jsonl"))
    assert run("export", "copy2", "--format", "jsonl") == jsonl

    bad = tmp_path / "bad.csv"
    bad.write_text(f"{pdq}\nnot-a-hash\n{random_pdq()}\n")
    out = run("import", "copy", str(bad), ok=False)
    assert "line 2: a PDQ hash is 64 hex digits" in out
    assert "1 removed" in run("remove", "copy", pdq)
    assert "no bank named 'nope'" in run("export", "nope", ok=False)
    assert "deleted, with its 3 hashes" in run("delete", "copy", "--yes")

    from moderation.hashing import pdq_of
    from moderation.images import decode_image

    decoded = decode_image(image, draft_size=512, hasher=pdq_of)
    matcher = BankMatcher(BankStore(url), follow_s=None)
    found = matcher.match(UploadHashes(decoded.sha256 or "", list(decoded.hashes)), [0])
    assert [(m.bank, m.action) for m in found] == [("known", "review")] * 2 + [
        ("copy2", "flag")] * 2  # review before flag
    assert sorted((m.bank, m.kind, m.distance, m.source) for m in found) == [
        ("copy2", "pdq", 0, "photo.png"), ("copy2", "sha256", 0, "photo.png"),
        ("known", "pdq", 0, "photo.png"), ("known", "sha256", 0, "photo.png")]


def test_moderation_banks_through_the_entry_point(url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`moderation banks …` as pyproject's entry point adds it (faked here: the installed
    metadata may predate the entry)."""
    from importlib.metadata import EntryPoint

    import moderation.cli as cli

    listed = cli._entry_points()
    listed.setdefault("banks", EntryPoint("banks", "decisionlog.banks_cli:banks",
                                          cli.COMMANDS))
    monkeypatch.setattr(cli, "_entry_points", lambda: listed)
    runner = CliRunner()
    assert "Known-image hash banks" in runner.invoke(cli.main, ["--help"]).output
    result = runner.invoke(cli.main, ["banks", "create", "b", "--action", "flag",
                                      "--database-url", url])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli.main, ["banks", "list", "--database-url", url])
    assert result.exit_code == 0 and result.output.splitlines()[1].startswith("b ")


def test_the_cli_dry_run_of_a_list_writes_nothing(tmp_path: Path) -> None:
    """``moderation banks dry-run``: a list against an empty log matches nothing, and makes
    no bank."""
    from click.testing import CliRunner

    from decisionlog.banks_cli import banks as banks_group

    url = f"sqlite:///{tmp_path / 'log.sqlite3'}"
    listed = tmp_path / "list.csv"
    listed.write_text("f" * 64 + "\n")
    result = CliRunner().invoke(banks_group, ["dry-run", str(listed), "--database-url", url])
    assert result.exit_code == 0, result.output
    assert "1 hashes against 0 stored decisions: 0 matched, 0 would change" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("nope\n")
    result = CliRunner().invoke(banks_group, ["dry-run", str(bad), "--database-url", url])
    assert result.exit_code == 1 and "line 1" in result.output
