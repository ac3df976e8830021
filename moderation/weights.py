"""Where a model's weights come from: a pretrained tag (the backend's registry of tags, its
cache, or the hub when it can be reached), or a checkpoint file. Backend-neutral: it returns
a path and an identity, and fails within seconds, saying how to provide the weights, when
there are none. The registry is the caller's (the torch backend passes open_clip's): this
module imports no runtime.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from .errors import WeightsUnavailableError

__all__ = ["PretrainedRegistry", "how_to_provide", "resolve_weights"]


class PretrainedRegistry(Protocol):
    """What the pretrained tags of an architecture are, and how to download one: open_clip's
    module-level functions of these names, for the torch backend."""

    def get_pretrained_cfg(self, model: str, tag: str) -> dict[str, Any]:
        """The tag's description (``hf_hub`` or ``url``, preprocessing); empty if unknown."""
        ...

    def list_pretrained_tags_by_model(self, model: str) -> list[str]: ...

    def download_pretrained(self, cfg: dict[str, Any], cache_dir: str | None = None) -> str:
        """Download the weights ``cfg`` describes; their local path."""
        ...


#: How long we wait to learn whether the model hub can be reached at all.
NETWORK_PROBE_SECONDS = 3.0


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _offline_requested() -> bool:
    return any(
        os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "MODERATION_OFFLINE")
    )


def _reachable(host: str, port: int = 443, timeout: float = NETWORK_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _cached_checkpoint(cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The local path of a pretrained tag's weights if already downloaded, without network."""
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hf_hub)
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        if filename == "open_clip_pytorch_model.bin":
            candidates.insert(0, "open_clip_model.safetensors")
        for name in candidates:
            path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(path, str) and os.path.isfile(path):
                return path
    url = cfg.get("url", "")
    if url:
        root = cache_dir or os.path.expanduser("~/.cache/clip")
        path = os.path.join(root, os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def _hub_host(cfg: dict[str, Any]) -> str:
    if cfg.get("hf_hub"):
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    return urlparse(cfg.get("url", "")).hostname or "huggingface.co"


def how_to_provide(name: str, tag: str) -> str:
    return (
        "To provide them, either:\n"
        "  1. on a machine with internet access, run\n"
        f"       python -c \"import open_clip; open_clip.create_model('{name}', "
        f"pretrained='{tag}')\"\n"
        "     then copy ~/.cache/huggingface (and ~/.cache/clip, if present) to this machine "
        "(or point HF_HOME at the copy); or\n"
        "  2. give a checkpoint file instead of the tag: --pretrained /path/to/checkpoint "
        "(.safetensors, .bin or .pt), or model.pretrained in the policy.\n"
        "For a smoke test or benchmark without real weights, pass --random-weights "
        "(scores are then meaningless)."
    )


def resolve_weights(
    name: str, pretrained: str, registry: PretrainedRegistry, cache_dir: str | None = None
) -> tuple[str, dict[str, Any], str]:
    """Find the checkpoint for ``pretrained`` (a file path, or a tag of ``registry``) without
    hanging.

    Returns ``(checkpoint_path, preprocess_overrides, identity)``. Raises
    :class:`WeightsUnavailableError` within seconds when the weights are neither a file, nor
    cached, nor downloadable because the hub cannot be reached.
    """
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), {}, f"{name}/sha256:{_sha256_file(path)[:16]}"
    cfg = registry.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = registry.list_pretrained_tags_by_model(name)
        looks_like_path = os.sep in pretrained or pretrained.endswith(
            (".pt", ".pth", ".bin", ".safetensors")
        )
        what = f"no checkpoint file at {path}" if looks_like_path else "not a known tag"
        raise WeightsUnavailableError(
            f"pretrained={pretrained!r} for model {name!r}: {what}. Known tags for {name}: "
            f"{', '.join(tags) if tags else '(none)'}; or give the path of a checkpoint file."
        )
    overrides = {
        key: cfg[key]
        for key in ("mean", "std", "interpolation", "resize_mode")
        if cfg.get(key) is not None
    }
    identity = f"{name}/{pretrained}"
    cached = _cached_checkpoint(cfg, cache_dir)
    if cached:
        return cached, overrides, identity
    host = _hub_host(cfg)
    if _offline_requested() or not _reachable(host):
        reason = (
            "offline mode is set (HF_HUB_OFFLINE or MODERATION_OFFLINE)"
            if _offline_requested()
            else f"{host} cannot be reached"
        )
        raise WeightsUnavailableError(
            f"Pretrained weights for {name} '{pretrained}' are not in the local cache and "
            f"{reason}.\n{how_to_provide(name, pretrained)}"
        )
    try:
        downloaded = registry.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as e:  # network failures come in many types
        raise WeightsUnavailableError(
            f"Downloading weights for {name} '{pretrained}' failed: {e}\n"
            f"{how_to_provide(name, pretrained)}"
        ) from e
    return downloaded, overrides, identity
