"""The bulk scan as a library: inputs (a folder, a manifest, an object-store prefix), one batch
mapper that builds its model once and turns a batch of inputs into result rows (decode →
encode → decide), and the outputs (JSON lines, or a folder of Parquet files), resumable by id.

The same :class:`ScanMapper` runs under the local driver (``moderation scan``) and on a Ray
cluster (``--engine ray``, :mod:`moderation.scan_ray`), as clip-retrieval splits reader,
mapper and writer. Rows are columns of plain values: ``id``, ``path``, ``result`` (the JSON
object a local scan writes), ``action``, ``flagged``, ``triggered``, ``policy_name``,
``policy_version``, ``model``, ``error_code``, ``error_message`` and, per category of the
policy, ``score_<id>``, ``flagged_<id>`` and ``margin_<id>`` (null for an error row); and,
never written to an output, each row's typed :class:`~moderation.ModerationResult`
(:data:`TYPED_RESULT`), which a sink (``--record``) builds its records from.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .backends import EncoderSpec
from .errors import ImageError, ModerationError

__all__ = ["ScanMapper", "ScanSpec", "list_inputs", "read_bytes", "written_ids"]

COLUMNS = ["id", "path", "result", "action", "flagged", "triggered", "policy_name",
           "policy_version", "model", "error_code", "error_message", "image_sha256",
           "image_size", "frames", "latency_ms"]
#: carried for a sink (--record), never written to an output: the typed ModerationResult
#: (its decision, and every sampled frame's embedding)
TYPED_RESULT = "typed_result"


def _is_uri(path: str) -> bool:
    return "://" in path


def read_bytes(path: str) -> bytes:
    """A local file, or an object on a store pyarrow's filesystems read (``s3://``,
    ``gs://``, ``file://``, …)."""
    if not _is_uri(path):
        return Path(path).read_bytes()
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path)
    with filesystem.open_input_file(inner) as f:
        data: bytes = f.read()
    return data


def _files_under(root: Path) -> Iterator[Path]:
    """Regular files below ``root``, sorted, skipping hidden files and folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file():
                yield path


def list_inputs(source: str) -> list[tuple[str, str]]:
    """(id, path) of every input of ``source``: a local folder (ids are the paths, as the
    local scan's), a manifest (``.csv`` or ``.parquet`` with a ``path`` column and an
    optional ``id`` one; relative paths are relative to the manifest), or a prefix on an
    object store (``s3://bucket/prefix``; ids are the URIs). Raises ``ValueError``."""
    if _is_uri(source):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(source)
        scheme = source.split("://", 1)[0]
        infos = filesystem.get_file_info(fs.FileSelector(inner, recursive=True))
        found = sorted(i.path for i in infos if i.type == fs.FileType.File
                       and not Path(i.path).name.startswith("."))
        prefix = f"{scheme}://" if scheme != "file" else "file://"
        return [(prefix + p, prefix + p) for p in found]
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{source} does not exist: give a folder, a .csv or .parquet "
                         "manifest, or a URI (s3://…, gs://…)")
    if path.is_dir():
        return [(str(p), str(p)) for p in _files_under(path)]
    if path.suffix.lower() in (".csv", ".parquet"):
        return _manifest(path)
    raise ValueError(f"{source}: not a folder, a .csv or .parquet manifest, or a URI "
                     "(s3://…, gs://…)")


def _manifest(path: Path) -> list[tuple[str, str]]:
    import pyarrow.csv
    import pyarrow.parquet

    try:
        table = (pyarrow.parquet.read_table(path) if path.suffix.lower() == ".parquet"
                 else pyarrow.csv.read_csv(path))
    except Exception as e:  # pyarrow raises several kinds for a bad file
        raise ValueError(f"{path}: cannot read the manifest: {e}") from e
    if "path" not in table.column_names:
        raise ValueError(f"{path}: a manifest needs a 'path' column (and may have 'id'); "
                         f"it has {', '.join(table.column_names)}")
    paths = [str(p) for p in table.column("path").to_pylist()]
    paths = [p if _is_uri(p) or Path(p).is_absolute() else str(path.parent / p) for p in paths]
    ids = ([str(i) for i in table.column("id").to_pylist()] if "id" in table.column_names
           else paths)
    duplicates = [i for i, n in Counter(ids).items() if n > 1]
    if duplicates:
        raise ValueError(f"{path}: ids must be unique; repeated: {', '.join(duplicates[:5])}")
    return list(zip(ids, paths, strict=True))


@dataclass(frozen=True)
class ScanSpec:
    """What a mapper needs to build its moderator, wherever it runs (plain values: it is
    shipped to cluster workers): the policy file, the model, and the decoding threads."""

    policy_path: str
    encoder: EncoderSpec = EncoderSpec()
    decode_threads: int = 2

    def load(self) -> Any:
        import warnings

        from .backends import RandomWeightsWarning
        from .moderator import Moderator

        with warnings.catch_warnings():  # the driver has said it loudly already
            warnings.simplefilter("ignore", RandomWeightsWarning)
            return Moderator.from_policy(self.policy_path, self.encoder)


class ScanMapper:
    """A batch of inputs (columns ``id`` and ``path``) → result rows (see the module's
    docstring). Builds its moderator once, on the first batch (or takes ``moderator``).
    Reading and decoding run in ``spec.decode_threads`` threads; a file that cannot be read or
    decoded becomes an error row, never an exception."""

    def __init__(self, spec: ScanSpec, moderator: Any = None) -> None:
        self.spec = spec
        self.moderator = moderator
        self._pool = ThreadPoolExecutor(max_workers=max(1, spec.decode_threads))

    def categories(self) -> list[str]:
        return list(self._moderator().policy.categories)

    def _moderator(self) -> Any:
        if self.moderator is None:
            self.moderator = self.spec.load()
        return self.moderator

    def _decode(self, path: str) -> tuple[Any, str | None, int | None]:
        """(the decoded image or its error, the file's SHA-256, its size)."""
        import hashlib

        try:
            data = read_bytes(path)
        except (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or e
            return ImageError("unreadable", f"cannot read {path}: {reason}"), None, None
        digest = hashlib.sha256(data).hexdigest()
        try:
            return self._moderator().decode(data), digest, len(data)
        except ImageError as e:
            return e, digest, len(data)

    def decode_many(self, paths: Sequence[str]) -> list[tuple[Any, str | None, int | None]]:
        self._moderator()  # built once, before the decoding threads need it
        return list(self._pool.map(self._decode, paths))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        ids = [str(i) for i in list(batch["id"])]
        paths = [str(p) for p in list(batch["path"])]
        return self.rows(ids, paths, self.decode_many(paths))

    def rows(self, ids: Sequence[str], paths: Sequence[str],
             decoded: Sequence[tuple[Any, str | None, int | None]]) -> dict[str, list[Any]]:
        import time

        moderator = self._moderator()
        started = time.perf_counter()
        results = moderator.moderate_decoded([d for d, _, _ in decoded], ids=list(ids))
        latency = 1000 * (time.perf_counter() - started) / max(1, len(results))
        categories = list(moderator.policy.categories)
        out: dict[str, list[Any]] = {c: [] for c in [*COLUMNS, TYPED_RESULT]}
        for name in categories:
            for kind in ("score", "flagged", "margin"):
                out[f"{kind}_{name}"] = []
        for result, path, (_, digest, size) in zip(results, paths, decoded, strict=True):
            as_dict = result.to_dict()
            out["image_sha256"].append(digest)
            out["image_size"].append(size)
            out["latency_ms"].append(latency)
            out["frames"].append(",".join(map(str, result.frames)) if result.ok else "")
            out[TYPED_RESULT].append(_portable(result))
            out["id"].append(result.id)
            out["path"].append(path)
            out["result"].append(json.dumps(as_dict))
            out["policy_name"].append(result.policy)
            out["policy_version"].append(result.policy_version)
            out["model"].append(result.model)
            if result.ok:
                decision = result.decision
                out["action"].append(decision.action.value)
                out["flagged"].append(decision.flagged)
                out["triggered"].append(",".join(as_dict["triggered"]))
                out["error_code"].append(None)
                out["error_message"].append(None)
                for name in categories:
                    c = decision.categories[name]
                    out[f"score_{name}"].append(float(c.score))
                    out[f"flagged_{name}"].append(bool(c.flagged))
                    out[f"margin_{name}"].append(float(c.margin))
            else:
                out["action"].append("error")
                out["flagged"].append(None)
                out["triggered"].append("")
                out["error_code"].append(result.error.code)
                out["error_message"].append(result.error.message)
                for name in categories:
                    for kind in ("score", "flagged", "margin"):
                        out[f"{kind}_{name}"].append(None)
        return out


class _PortableImageError(ImageError):
    """Unpickled as the ImageError it stands for. Ray pickles the rows' typed results between
    processes, and an exception pickles as its class called with ``args`` (the message
    alone), which ImageError's ``(code, message)`` cannot take."""

    def __reduce__(self) -> tuple[Any, ...]:
        return ImageError, (self.code, self.message)


def _portable(result: Any) -> Any:
    """``result`` (a ModerationResult) in a form that survives pickling."""
    if type(result.error) is not ImageError:
        return result
    return replace(result, error=_PortableImageError(result.error.code, result.error.message))


# --- outputs -------------------------------------------------------------------------------


def is_jsonl(out: Path) -> bool:
    return out.suffix.lower() == ".jsonl"


def written_ids(out: Path) -> set[str]:
    """Ids already in an output: JSON lines (a line cut short by a crash is ignored), or the
    Parquet files of a folder (each written whole, then renamed into place)."""
    done: set[str] = set()
    if is_jsonl(out):
        if out.exists():
            with out.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        done.add(json.loads(line)["id"])
                    except (ValueError, KeyError, TypeError):
                        continue
        return done
    if out.is_dir():
        import pyarrow.parquet

        for part in sorted(out.glob("*.parquet")):
            done.update(str(i) for i in pyarrow.parquet.read_table(
                part, columns=["id"]).column("id").to_pylist())
    return done


class Writer:
    """Appends row batches to ``out``: JSON lines (the ``result`` column, as the local scan
    writes), or one Parquet file per batch in the folder ``out`` (written under a temporary
    name, then renamed: an interrupted scan leaves only whole files)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        if is_jsonl(out):
            cut_short = (out.exists() and out.stat().st_size > 0
                         and not out.read_bytes().endswith(b"\n"))
            self._sink: Any = out.open("a", encoding="utf-8")
            if cut_short:
                self._sink.write("\n")  # a line left unfinished by a crash stays apart
        else:
            out.mkdir(parents=True, exist_ok=True)
            self._sink = None

    def write(self, rows: dict[str, list[Any]]) -> None:
        if not rows["id"]:
            return
        if self._sink is not None:
            self._sink.write("".join(r + "\n" for r in rows["result"]))
            self._sink.flush()
            return
        import pyarrow as pa
        import pyarrow.parquet

        columns = [k for k in rows if k != TYPED_RESULT]
        schema = _schema(columns)
        table = pa.table({k: _coerce(rows[k], schema.field(k).type) for k in columns},
                         schema=schema)
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = self.out / f".{name}.tmp"
        pyarrow.parquet.write_table(table, tmp)
        os.replace(tmp, self.out / name)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()


def _schema(columns: Sequence[str]) -> Any:
    """One schema for every Parquet file of an output (a batch with no error would otherwise
    type ``error_code`` as null, and files would disagree)."""
    import pyarrow as pa

    def kind(name: str) -> Any:
        if name == "flagged" or name.startswith("flagged_"):
            return pa.bool_()
        if name.startswith(("score_", "margin_")) or name == "latency_ms":
            return pa.float64()
        if name == "image_size":
            return pa.int64()
        return pa.string()

    return pa.schema([(name, kind(name)) for name in columns])


def _coerce(values: Sequence[Any], kind: Any) -> list[Any]:
    """Values as the column's type wants them (rows that crossed Ray carry numpy types)."""
    import pyarrow as pa

    out: list[Any] = []
    for v in values:
        if v is None:
            out.append(None)
        elif kind == pa.string():
            out.append(v.decode() if isinstance(v, bytes) else str(v))
        elif kind == pa.bool_():
            out.append(bool(v))
        elif kind == pa.int64():
            out.append(int(v))
        else:
            out.append(float(v))
    return out


def count_actions(rows: dict[str, list[Any]], counts: Counter[str]) -> None:
    for action in rows["action"]:
        counts[str(action)] += 1


def require_writable(out: Path) -> None:
    """Fail before any model is loaded when ``out`` cannot be written."""
    try:
        if is_jsonl(out):
            out.open("a", encoding="utf-8").close()
        else:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as e:
        raise ModerationError(f"cannot write {out}: {e.strerror or e}") from e


def run_local(mapper: ScanMapper, inputs: Sequence[tuple[str, str]], writer: Any,
              batch_size: int, on_batch: Any = lambda n: None) -> Counter[str]:
    """The local driver: batches of ``inputs`` through ``mapper`` into ``writer`` (anything
    with ``write(rows)``: a :class:`Writer`, or one that records too), reading and
    decoding the next batch while the model works on this one. Returns the count of each
    action (and ``error``)."""
    counts: Counter[str] = Counter()
    batches = [list(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    if not batches:
        return counts
    with ThreadPoolExecutor(max_workers=1) as ahead:
        upcoming = ahead.submit(mapper.decode_many, [p for _, p in batches[0]])
        for index, batch in enumerate(batches):
            decoded = upcoming.result()
            if index + 1 < len(batches):
                upcoming = ahead.submit(mapper.decode_many, [p for _, p in batches[index + 1]])
            rows = mapper.rows([i for i, _ in batch], [p for _, p in batch], decoded)
            writer.write(rows)
            count_actions(rows, counts)
            on_batch(len(batch))
    return counts
