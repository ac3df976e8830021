"""The bulk scan on Ray Data: the same :class:`~moderation.scan.ScanMapper` as the local scan,
run by ``map_batches`` on a pool of actors (each builds its model once), streamed back to the
driver, which writes the output (and records decisions) batch by batch as they arrive, so an
interrupted run leaves whole batches behind and a re-run skips them.

Ray is an optional extra (``pip install 'moderation[ray]'``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import ModerationError
from .scan import ScanMapper, ScanSpec, Writer, count_actions

__all__ = ["ray_scan"]


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ModerationError(
            "--engine ray needs Ray Data: pip install 'moderation[ray]' (on the cluster's "
            "workers too)") from None
    return ray


def ray_scan(spec: ScanSpec, inputs: Sequence[tuple[str, str]], out: Path, *,
             address: str | None = None, actors: int = 1, sink: Any = None,
             actor_cpus: int = 1, actor_gpus: float = 0) -> Counter[str]:
    """Moderate ``inputs`` ((id, path) pairs) on Ray into ``out``. ``address``: a cluster
    (``auto``, ``ray://host:10001``), default a local instance that is shut down at the end;
    ``actors``: model replicas, each reserving ``actor_cpus`` CPUs (its forward pass and
    decoding threads) and ``actor_gpus`` GPUs. Returns the count of each action (and
    ``error``)."""
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
    counts: Counter[str] = Counter()
    batch_size = spec.encoder.batch_size
    writer = Writer(out)
    try:
        dataset = ray.data.from_items([{"id": i, "path": p} for i, p in inputs],
                                      override_num_blocks=max(1, min(len(inputs) //
                                                                     batch_size, 200)))
        spec = replace(spec, encoder=replace(spec.encoder,
                                             threads=spec.encoder.threads or actor_cpus),
                       decode_threads=max(spec.decode_threads, actor_cpus))
        results = dataset.map_batches(
            ScanMapper, fn_constructor_args=(spec,), batch_size=batch_size,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=actor_cpus, num_gpus=actor_gpus, zero_copy_batch=False,
            # two batches in flight per actor: one decoding while the other is in the model,
            # as the local scan decodes ahead
            max_concurrency=2,
        )
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            rows = {k: [_plain(v) for v in values] for k, values in batch.items()}
            if sink is not None:
                sink.write(rows)
            writer.write(rows)
            count_actions(rows, counts)
    finally:
        writer.close()
        if started_here:
            ray.shutdown()
    return counts


def _plain(value: Any) -> Any:
    """numpy scalars from Ray's batches → Python values (JSON and Parquet); a missing value,
    which crosses Ray as NaN, is None again."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    return None if isinstance(value, float) and value != value else value
