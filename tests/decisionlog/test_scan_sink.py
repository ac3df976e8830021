"""`moderation scan --record` (the decision log's scan sink): each scan row's typed result is
recorded as the service records a result, also after the rows have been pickled, as Ray hands
them from its workers to the driver."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import yaml

from decisionlog import DecisionRecord, DecisionStore
from decisionlog.scan_sink import LogSink
from moderation import Moderator
from moderation.policy import parse_policy
from moderation.scan import ScanMapper, ScanSpec
from tests.fakes import (
    BLUE,
    GREEN,
    HAND_COLOURS,
    HAND_POLICY,
    HAND_TEXTS,
    RED,
    FakeEncoder,
    animation_bytes,
    image_bytes,
)


@pytest.mark.parametrize("crossing", ["local", "pickled"])
def test_scan_rows_are_recorded_as_the_service_records_results(
        url: str, tmp_path: Path, crossing: str) -> None:
    files = {"red.png": image_bytes(RED), "clip.gif": animation_bytes(BLUE, GREEN, RED),
             "broken.jpg": b"\xff\xd8\xff not really a jpeg"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / name) for name in [*files, "missing.png"]]
    moderator = Moderator(parse_policy(yaml.safe_dump(HAND_POLICY)),
                          FakeEncoder(dict(HAND_TEXTS), dict(HAND_COLOURS)))
    mapper = ScanMapper(ScanSpec(policy_path="(given)"), moderator=moderator)
    rows = mapper.rows(paths, paths, mapper.decode_many(paths))
    if crossing == "pickled":
        rows = pickle.loads(pickle.dumps(rows))
    LogSink(url).write(rows)

    store = DecisionStore(url)
    recorded = {r.client_id: r for r in store.export()}
    assert set(recorded) == set(paths)
    results = moderator.moderate([*files.values(), str(tmp_path / "missing.png")], ids=paths)
    for path, result in zip(paths, results, strict=True):
        data = files.get(Path(path).name)
        expected = DecisionRecord.from_result(
            result, image_sha256=hashlib.sha256(data).hexdigest() if data else "0" * 64,
            image_size=len(data) if data else 0, latency_ms=0.0)
        skip = {"id", "created_at", "latency_ms"}
        assert recorded[path].view() | dict.fromkeys(skip) == expected.view() | dict.fromkeys(skip)
        stored = store.frames_of([recorded[path].id]).get(recorded[path].id)
        if expected.embeddings is None:
            assert stored is None
        else:
            assert stored is not None and stored[0] == expected.frames
            assert (stored[1] == expected.embeddings.astype("float32")).all()
    assert recorded[paths[1]].frames == [0, 1, 2] and recorded[paths[1]].action == "block"
    assert recorded[paths[2]].error_code == "corrupt_image"
    assert recorded[paths[3]].error_code == "unreadable"
