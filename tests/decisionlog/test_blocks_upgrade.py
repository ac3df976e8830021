"""Upgrading a decision log the previous release wrote (commit ``eac6b53``: frames one row
each, no blocks) on SQLite and on PostgreSQL: the previous release's own code, extracted from
git, writes it in a subprocess; opening it with this code (migration 0006 fills the blocks
from the rows) gives every decision's frames from the blocks byte for byte as written and as
``decision_frames`` holds them; scans, exact search and a dry-run read them; downgrading to
0005 (where the previous release writes again) and upgrading once more gives the same."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import yaml

from decisionlog import DecisionStore, blocks
from decisionlog.database import head_revision, migrate, revision_of
from decisionlog.lab import dry_run
from decisionlog.search import ExactIndex, SearchFilters, search
from decisionlog.tables import frame_blocks
from moderation.policy import parse_policy
from moderation.prompts import embed_policy
from moderation.scorer import Scorer
from tests.decisionlog.test_blocks import (
    Stored,
    assert_intact,
    block_sizes,
    make_records,
    written,
)
from tests.fakes import HAND_POLICY, HAND_TEXTS, FakeEncoder

PREVIOUS_RELEASE = "eac6b53"
REPO = Path(__file__).resolve().parents[2]

#: Runs with the previous release's packages first on the path: writes decisions through its
#: DecisionStore.add_many and saves what it wrote (JSON lines). ``first``: the layout below;
#: ``more``: a few hundred more decisions, later. Decisions of FakeEncoder.identity have the
#: hand-made encoder's 3 dimensions (so that a dry-run can score them); ViT-L-14's begin with
#: more than a migration page (4096) of decisions without frames; the hand-made model has a
#: run of decisions made at one time across a page's end.
WRITER = r"""
import json, sys
import numpy as np
import decisionlog
from decisionlog import DecisionRecord, DecisionStore
from decisionlog.database import revision_of

root, url, plan, out = sys.argv[1:5]
assert decisionlog.__file__.startswith(root), f"not the previous release: {decisionlog.__file__}"
T0 = 1_790_000_000.0
SPECIALS = np.array([0x8000, 0x0001, 0x03FF, 0x8001, 0x0400], np.uint16)
rng = np.random.default_rng(7 if plan == "first" else 8)

def vectors(frames, dim):
    v = rng.standard_normal((frames, dim))
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
    bits = v.view(np.uint16)
    for row in bits:
        if dim > 8 and rng.random() < 0.3:  # -0, subnormals: bytes a conversion could change
            row[rng.choice(dim, len(SPECIALS), replace=False)] = SPECIALS
    return v

def record(i, model, dim, at, kind, frames):
    error, stored = kind == "error", kind == "stored"
    action = "error" if error else ("allow", "flag", "review", "block")[i % 4]
    triggered = [] if action in ("allow", "error") else ["weapons"]
    return DecisionRecord(
        id=f"{plan}-{model[-4:]}-{i:05d}-{int(rng.integers(2**32)):08x}", created_at=at,
        client_id=None if i % 7 == 0 else f"client-{i}",
        image={"sha256": "0" * 64, "size": 10}, policy={"name": "hand", "version": "v"},
        model=model, profile="default", action=action, triggered=triggered,
        categories={c: {"score": 0.3, "similarity": 0.3, "threshold": 0.2, "margin": 0.1,
                        "flagged": True, "action": action, "frame": frames[-1],
                        "top_terms": [{"text": f"{c} term", "similarity": 0.3}]}
                    for c in triggered},
        latency_ms=1.0, error_code="undecodable" if error else None,
        frame=None if error else frames[-1], frames_scored=None if error else len(frames),
        frames=frames if stored else [],
        embeddings=vectors(len(frames), dim) if stored else None)

FRAME_SETS = ([0], [0], [0, 7, 14], [0, 3], [0, 7, 14, 21, 28])

def kind(u):
    return "error" if u < 0.04 else "bare" if u < 0.08 else "stored"

records = []
def add(model, dim, n, times, kinds):
    for i in range(n):
        frames = list(FRAME_SETS[int(rng.integers(len(FRAME_SETS)))])
        records.append(record(i, model, dim, times(i), kinds(i), frames))

if plan == "first":
    # hand-made: 4400 decisions, 40 of them at one time across the first page's end
    add("fake/hand-made", 3, 4400, lambda i: T0 + 0.01 * (4080 if 4080 <= i < 4120 else i),
        lambda i: ("bare" if i % 3 == 0 else "stored") if 4080 <= i < 4120 else
                  "stored" if i < 4080 else kind(rng.random()))
    # ViT-L-14: a page and more of decisions without frames, then some with
    add("open_clip/ViT-L-14", 16, 4400, lambda i: T0 + 0.01 * i,
        lambda i: "bare" if i < 4200 else kind(rng.random()))
    # ViT-B-32: random times (ties too), animations, errors, decisions without frames
    add("open_clip/ViT-B-32", 40, 1500, lambda i: round(T0 + rng.uniform(0, 60), 2),
        lambda i: kind(rng.random()))
    add("broken/errors-only", 8, 20, lambda i: T0 + i, lambda i: "error")
else:
    add("fake/hand-made", 3, 200, lambda i: round(T0 + rng.uniform(-30, 90), 3),
        lambda i: kind(rng.random()))
    add("open_clip/ViT-B-32", 40, 200, lambda i: round(T0 + rng.uniform(-30, 90), 3),
        lambda i: kind(rng.random()))

order = rng.permutation(len(records))  # written as requests come, not in time order
store = DecisionStore(url)
for start in range(0, len(records), 250):
    store.add_many([records[i] for i in order[start:start + 250]])
with open(out, "w") as f:
    f.write(json.dumps({"revision": revision_of(store.engine)}) + "\n")
    for r in records:
        f.write(json.dumps({
            "id": r.id, "model": r.model, "created_at": r.created_at,
            "client_id": r.client_id, "profile": r.profile, "action": r.action,
            "error": r.error_code is not None, "frames": r.frames,
            "bits": None if r.embeddings is None else
                    np.asarray(r.embeddings, np.float16).view("<u2").tobytes().hex(),
        }) + "\n")
"""


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's decisionlog and moderation packages, from git."""
    def git(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True)

    if shutil.which("git") is None:
        pytest.fail("git is not installed: the upgrade test extracts the previous release "
                    f"({PREVIOUS_RELEASE}) from the repository's history")
    if git("rev-parse", "--git-dir").returncode != 0:
        pytest.fail(f"{REPO} is not a git repository: the upgrade test extracts the previous "
                    f"release ({PREVIOUS_RELEASE}) from git; run it in a full clone")
    if git("cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}").returncode != 0:
        pytest.fail(f"commit {PREVIOUS_RELEASE} (the previous release) is not in {REPO}'s "
                    "history: a shallow clone? `git fetch --unshallow`, or clone in full")
    root = tmp_path_factory.mktemp("previous-release")
    archive = git("archive", PREVIOUS_RELEASE, "decisionlog", "moderation")
    assert archive.returncode == 0, archive.stderr.decode()
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    assert not (root / "decisionlog" / "blocks.py").exists()
    return root


def write_with_previous_release(root: Path, url: str, plan: str, tmp_path: Path
                                ) -> tuple[str, list[dict[str, Any]]]:
    """Decisions written by the previous release's add_many: (its schema revision, what it
    wrote, one dict per decision)."""
    out = tmp_path / f"{plan}.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", WRITER, str(root), url, plan, str(out)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    header, *lines = out.read_text().splitlines()
    return json.loads(header)["revision"], [json.loads(line) for line in lines]


def expected(wrote: list[dict[str, Any]]) -> dict[str, Stored]:
    return {
        d["id"]: Stored(d["model"], d["frames"], np.frombuffer(
            bytes.fromhex(d["bits"]), "<u2").reshape(len(d["frames"]), -1))
        for d in wrote if d["bits"] is not None and d["frames"]}


def check_upgraded(store: DecisionStore, wrote: list[dict[str, Any]]) -> None:
    """The blocks hold each decision with frames once, byte for byte, with the fields a scan
    needs; blocks have at most 4096 decisions, in time order; scans count right; exact
    search finds decisions by their own frames; a dry-run re-decides every decision of the
    hand-made model that has frames."""
    want = expected(wrote)
    assert_intact(store, want)
    by_id = {d["id"]: d for d in wrote}
    models = sorted({d["model"] for d in wrote})
    assert {m for m, _, _, _ in block_sizes(store)} == {s.model for s in want.values()}
    assert all(n <= 4096 for _, n, _, _ in block_sizes(store))
    for model in models:
        mine = {i for i, s in want.items() if s.model == model}
        assert sum(len(b) for b in store.scan_frames(model=model)) == len(mine)
        for block in store.scan_frames(model=model, chunk=100_000):
            assert np.all(np.diff(block.created_at) >= 0)
            for i, decision_id in enumerate(block.ids):
                d = by_id[decision_id]
                assert (block.created_at[i], block.client_ids[i], block.profiles[i],
                        block.actions[i]) == (d["created_at"], d["client_id"], d["profile"],
                                              d["action"])
        times = sorted(by_id[i]["created_at"] for i in mine)
        if times:
            since, until = times[len(times) // 4], times[3 * len(times) // 4]
            assert sum(len(b) for b in store.scan_frames(
                model=model, since=since, until=until, chunk=500)) == sum(
                since <= by_id[i]["created_at"] < until for i in mine)

    rng = np.random.default_rng(11)
    b32 = sorted(i for i, s in want.items() if s.model == "open_clip/ViT-B-32")
    for decision_id in rng.choice(b32, 5, replace=False):
        stored = want[decision_id]
        k = int(rng.integers(len(stored.frames)))
        query = stored.bits[k].view(np.float16).astype(np.float32)
        page = search(store, query, model="open_clip/ViT-B-32", limit=3,
                      index=ExactIndex(store), filters=SearchFilters())
        assert page.hits[0].decision_id == decision_id and page.hits[0].frame == (
            stored.frames[k]), page.hits
        # its own frame: the cosine is that frame's length (about 1: the specials shorten it)
        assert page.hits[0].similarity == pytest.approx(float(np.linalg.norm(query)), abs=2e-3)

    hand = [d for d in wrote if d["model"] == FakeEncoder.identity and not d["error"]]
    policy = parse_policy(yaml.safe_dump(HAND_POLICY, sort_keys=False))
    scorer = Scorer(policy, embed_policy(policy, FakeEncoder(dict(HAND_TEXTS))))
    report = dry_run(store, scorer, scorer, model=FakeEncoder.identity)
    assert report.decisions == sum(d["id"] in want for d in hand)
    assert report.left_out.no_embedding == sum(d["id"] not in want for d in hand)
    assert report.changed_total == 0


def test_a_log_the_previous_release_wrote_is_upgraded_byte_for_byte(
        url: str, previous_release: Path, tmp_path: Path) -> None:
    revision, wrote = write_with_previous_release(previous_release, url, "first", tmp_path)
    assert revision == "0005"
    assert sum(1 for d in wrote if d["bits"] and len(d["frames"]) > 1) > 1000  # animations
    assert sum(1 for d in wrote if d["error"]) > 50
    assert sum(1 for d in wrote if not d["error"] and d["bits"] is None) > 4200

    store = DecisionStore(url)  # migrates to head, filling the blocks from the rows
    assert revision_of(store.engine) == head_revision()
    check_upgraded(store, wrote)
    assert store.count() == len(wrote)

    # this release writes and merges; then back to the previous release's schema, where
    # the previous release writes again (a roll-back), and forward once more
    rng = np.random.default_rng(12)
    mine = make_records(rng, 300, prefix="now-", models={FakeEncoder.identity: 3,
                                                         "open_clip/ViT-B-32": 40},
                        specials=False)
    mine = [r.model_copy(update={"profile": "default"}) for r in mine]
    for start in range(0, len(mine), 7):
        store.add_many(mine[start:start + 7])
    store.compact()
    assert all(n <= 1 for n in Counter(
        m for m, n, _, _ in block_sizes(store) if n < blocks.SMALL).values())
    wrote += [{"id": r.id, "model": r.model, "created_at": r.created_at,
               "client_id": r.client_id, "profile": r.profile, "action": r.action,
               "error": r.error_code is not None, "frames": r.frames,
               "bits": None if r.embeddings is None else
               np.asarray(r.embeddings, np.float16).view("<u2").tobytes().hex()}
              for r in mine]
    assert written(mine).keys() <= expected(wrote).keys()
    check_upgraded(store, wrote)

    assert migrate(url, "0005") == (head_revision(), "0005")
    with store.engine.connect() as conn:
        assert not sa.inspect(conn).has_table(frame_blocks.name)
    revision, more = write_with_previous_release(previous_release, url, "more", tmp_path)
    assert revision == "0005"
    wrote += more
    assert migrate(url) == ("0005", head_revision())
    check_upgraded(store, wrote)
    assert store.count() == len(wrote)
