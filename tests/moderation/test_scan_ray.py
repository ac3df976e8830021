"""The scan on Ray Data, on a local Ray instance these tests start (2 CPUs, loopback only,
shut down at the end): the same rows as the local scan, manifests, resuming, --record.

The tiny test architecture with random weights; the actors register it themselves (the
policy names its architecture file)."""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from moderation.cli import main
from moderation.scan import ScanSpec, list_inputs, written_ids
from tests.fakes import HAND_POLICY, TINY_ARCH, animation_bytes, image_bytes

# starts a real server (gunicorn, nginx or Ray): left out of the quick loop
pytestmark = pytest.mark.server

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "uploads"
    (root / "sub").mkdir(parents=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90), (250, 250, 0)]
    for i, colour in enumerate(colours):
        (root / f"img{i}.png").write_bytes(image_bytes(colour))
    (root / "sub" / "photo.jpg").write_bytes(image_bytes((120, 60, 10), "JPEG"))
    (root / "sub" / "clip.gif").write_bytes(animation_bytes((255, 0, 0), (0, 255, 0)))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def policy(tiny_arch_file: Path, tmp_path: Path) -> Path:
    data = copy.deepcopy(HAND_POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "none", "config": str(tiny_arch_file)}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def scan(policy: Path, source: Path | str, out: Path, *extra: str) -> Any:
    return CliRunner().invoke(main, ["scan", str(source), "--policy", str(policy),
                                     "--random-weights", "--out", str(out), "--batch-size",
                                     "3", "--cache-dir", str(out.parent / "cache"), *extra])


def lines(path: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_the_ray_scan_gives_the_local_scans_rows(local_ray: None, folder: Path, policy: Path,
                                                 tmp_path: Path) -> None:
    local = scan(policy, folder, tmp_path / "local.jsonl")
    on_ray = scan(policy, folder, tmp_path / "ray.jsonl", "--engine", "ray", "--actors", "2")
    assert local.exit_code == on_ray.exit_code == 1  # the broken files, said
    a, b = lines(tmp_path / "local.jsonl"), lines(tmp_path / "ray.jsonl")
    assert set(a) == set(b) and len(a) == 9
    errors = {k for k, r in a.items() if "error" in r}
    assert errors == {str(folder / "broken.jpg"), str(folder / "notes.txt")}
    for key in a:
        assert a[key].get("action") == b[key].get("action")
        assert a[key].get("error") == b[key].get("error")
        for cid, category in a[key].get("categories", {}).items():
            assert abs(category["score"] - b[key]["categories"][cid]["score"]) <= 1e-5
    assert "1 error" in on_ray.stderr or "error" in on_ray.stderr


def test_parquet_output_manifests_and_resume(local_ray: None, folder: Path, policy: Path,
                                             tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "path"])
        for p in sorted(folder.rglob("*.png")):
            writer.writerow([f"upload-{p.stem}", str(p.relative_to(tmp_path))])
    assert [i for i, _ in list_inputs(str(manifest))][:2] == ["upload-img0", "upload-img1"]
    out = tmp_path / "out-parquet"
    first = scan(policy, manifest, out, "--engine", "ray")
    assert first.exit_code == 0, first.output
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == [f"upload-img{i}" for i in range(5)]
    for column in ("action", "flagged", "triggered", "policy_name", "policy_version", "model",
                   "error_code", "error_message", "score_weapons", "flagged_weapons",
                   "margin_alcohol"):
        assert column in table.column_names
    assert "embeddings" not in table.column_names

    # a Parquet manifest with more inputs: the five done are skipped, each input written once
    paths = [str(p) for p in sorted(folder.rglob("*")) if p.is_file()]
    ids = [f"upload-{Path(p).stem}" for p in paths]
    pq.write_table(pa.table({"id": ids, "path": paths}), tmp_path / "more.parquet")
    again = scan(policy, tmp_path / "more.parquet", out, "--engine", "ray")
    assert again.exit_code == 1  # the two broken inputs
    assert "5 already in" in again.stderr
    assert sorted(pq.read_table(out).column("id").to_pylist()) == sorted(ids)
    assert scan(policy, tmp_path / "more.parquet", out, "--engine", "ray").exit_code == 0
    assert sorted(pq.read_table(out).column("id").to_pylist()) == sorted(ids)


def test_an_interrupted_ray_scan_resumes_writing_each_input_once(
        local_ray: None, folder: Path, policy: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from moderation import scan as scan_module

    out = tmp_path / "out.jsonl"
    real_write = scan_module.Writer.write
    written = {"batches": 0}

    def write_then_die(self: Any, rows: dict[str, list[Any]]) -> None:
        if written["batches"] == 1:
            raise KeyboardInterrupt  # the driver is stopped after its first batch
        real_write(self, rows)
        written["batches"] += 1

    monkeypatch.setattr(scan_module.Writer, "write", write_then_die)
    interrupted = scan(policy, folder, out, "--engine", "ray")
    assert interrupted.exit_code != 0
    partial = written_ids(out)
    assert 0 < len(partial) < 9
    monkeypatch.setattr(scan_module.Writer, "write", real_write)
    resumed = scan(policy, folder, out, "--engine", "ray")
    assert f"{len(partial)} already in" in resumed.stderr
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 9


def test_record_puts_the_rows_in_the_log(local_ray: None, folder: Path, policy: Path,
                                         tmp_path: Path) -> None:
    from decisionlog import DecisionStore

    url = f"sqlite:///{tmp_path / 'log.sqlite3'}"
    result = scan(policy, folder, tmp_path / "out.jsonl", "--engine", "ray", "--record",
                  "--database-url", url)
    assert result.exit_code == 1 and "9 recorded in the decision log" in result.stderr
    store = DecisionStore(url)
    records = list(store.export())
    assert len(records) == 9
    by_client = {r.client_id: r for r in records}
    clip = by_client[str(folder / "sub" / "clip.gif")]
    assert clip.frames and clip.embeddings is None  # exported records carry no vectors
    frames = store.frames_of([clip.id])[clip.id]
    assert frames[0] == clip.frames and frames[1].shape == (len(clip.frames), 32)
    assert by_client[str(folder / "broken.jpg")].error_code is not None


def test_local_scan_records_too_and_a_uri_source_works(folder: Path, policy: Path,
                                                       tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.sqlite3'}"
    out = tmp_path / "out.jsonl"
    result = scan(policy, f"file://{folder}", out, "--record", "--database-url", url)
    assert result.exit_code == 1, result.output
    assert set(lines(out)) == {f"file://{p}" for p in folder.rglob("*") if p.is_file()}
    from decisionlog import DecisionStore

    assert DecisionStore(url).count() == 9


def test_ray_is_optional_and_says_how_to_install(folder: Path, policy: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_ray(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    result = scan(policy, folder, tmp_path / "out.jsonl", "--engine", "ray")
    assert result.exit_code == 1 and "pip install 'moderation[ray]'" in result.output
    bad = scan(policy, tmp_path / "nothing.txt", tmp_path / "o.jsonl")
    assert bad.exit_code == 2 and "manifest" in bad.output
    assert ScanSpec("p").encoder.batch_size == 16


def test_videos_and_crops_scan_alike_locally_and_on_ray(local_ray: None, folder: Path,
                                                        policy: Path, tmp_path: Path) -> None:
    """A video among the images, and a policy with crops: both engines give the same rows,
    and each row names the view that decided (a video's frame time, a crop's box)."""
    pytest.importorskip("av")
    from tests.fakes import video_bytes

    (folder / "sub" / "movie.mp4").write_bytes(
        video_bytes([(90, 90, 90), (200, 30, 30), (90, 90, 90)], size=(96, 64)))
    (folder / "large.png").write_bytes(image_bytes((10, 120, 200), size=(96, 96)))
    data = yaml.safe_load(policy.read_text())
    data["views"] = {"crops": "2x2", "min_side": 32}
    data["video"] = {"rate": 2, "max_frames": 8}
    policy.write_text(yaml.safe_dump(data, sort_keys=False))
    local = scan(policy, folder, tmp_path / "local.jsonl")
    on_ray = scan(policy, folder, tmp_path / "ray.jsonl", "--engine", "ray", "--actors", "2")
    assert local.exit_code == on_ray.exit_code == 1  # the broken files, said
    a, b = lines(tmp_path / "local.jsonl"), lines(tmp_path / "ray.jsonl")
    assert set(a) == set(b) and len(a) == 11
    movie = a[str(folder / "sub" / "movie.mp4")]
    assert "error" not in movie, movie
    assert movie["frames_scored"] == 7  # 0, 0.5, …, 2.5 s, and the last frame (2.8 s)
    assert movie["views_scored"] == 7 * 5  # each sampled frame whole, and its 2x2 crops
    for key in a:
        assert a[key].get("action") == b[key].get("action")
        for cid, category in a[key].get("categories", {}).items():
            other = b[key]["categories"][cid]
            assert abs(category["score"] - other["score"]) <= 1e-5
            assert category["view"] == other["view"]
    times = {c["view"]["time"] for c in movie["categories"].values()}
    assert times <= {0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 2.8}
    assert a[str(folder / "large.png")]["views_scored"] == 5  # whole, and its 2x2 crops
    assert a[str(folder / "img0.png")]["views_scored"] == 1  # 16 px: too small to cut
