"""Prompt ensembles: a policy's words → unit vectors, with an on-disk cache.

Each term (and each exception) is expanded through the category's templates; every prompt is
encoded and unit-normalised, then averaged and re-normalised (the CLIP paper's recipe):

* a **term embedding** averages one term over the templates;
* the **category embedding** averages every term × template of the category;
* an **exception embedding** averages one exception over the templates. Exceptions are kept
  apart, not averaged together: they are distinct allowed look-alikes (a toy gun, a kitchen
  knife), and their average would resemble neither.

Text embeddings are cached on disk, keyed by the model's identity and the prompt's exact text,
so a restart encodes nothing and editing one term encodes only the prompts that changed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .backends import TextEncoder  # what prompt ensembles need (a backend, or a fake)
from .policy import PLACEHOLDER, Policy

__all__ = [
    "EmbeddingCache",
    "OverlayCache",
    "PolicyEmbeddings",
    "TextEncoder",
    "VectorCache",
    "default_cache_path",
    "embed_policy",
    "embed_query",
    "encode_cached",
    "expand",
    "missing_prompts",
    "policy_prompts",
]


def default_cache_path() -> Path:
    """``$MODERATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/moderation``, else ``~/.cache/…``."""
    root = os.environ.get("MODERATION_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moderation"
    )
    return Path(root) / "embeddings"


class VectorCache(Protocol):
    """Where text embeddings are kept between runs: :class:`EmbeddingCache` (a folder), or
    one a layer above provides (the decision log's, shared by replicas)."""

    def get(self, model: str, keys: Iterable[str]) -> dict[str, np.ndarray]: ...

    def put(self, model: str, vectors: dict[str, np.ndarray]) -> None: ...


class EmbeddingCache:
    """Vectors on disk, keyed by ``(model identity, key)``; a key is a prompt's text (or, for
    calibration, an image's hash).

    One small ``.npy`` file per vector in a folder, named by a hash of model and key, written
    to a temporary name and renamed into place: several processes (gunicorn workers, a scan)
    share one folder safely, with no database in the core. A file that cannot be read counts
    as missing (it is encoded again).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.path.mkdir(parents=True, exist_ok=True)

    def _file(self, model: str, key: str) -> Path:
        digest = hashlib.sha256(f"{model}\0{key}".encode()).hexdigest()
        return self.path / digest[:2] / f"{digest}.npy"

    def get(self, model: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached vectors among ``keys`` (float32, shape (dim,)); missing keys are absent."""
        found: dict[str, np.ndarray] = {}
        for key in dict.fromkeys(keys):
            try:
                found[key] = np.load(self._file(model, key), allow_pickle=False)
            except (OSError, ValueError):
                continue
        return found

    def put(self, model: str, vectors: dict[str, np.ndarray]) -> None:
        for key, vector in vectors.items():
            target = self._file(model, key)
            target.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.asarray(vector, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, target)

    def close(self) -> None:
        """Nothing to release (kept for callers that close what they open)."""


class OverlayCache:
    """A view of ``base`` that never writes to it: what it is given to keep stays in this
    object's memory, as does what it read from ``base`` (read once).

    A dry-run encodes a proposed policy's new prompts through one: they serve the dry-run,
    and enter the shared cache (the folder, the decision log's) only if the policy is
    activated, when it is encoded again through the shared cache itself. Holds at most the
    prompts of the policies encoded through it: make one per dry-run.
    """

    def __init__(self, base: VectorCache | None) -> None:
        self.base = base
        self.vectors: dict[tuple[str, str], np.ndarray] = {}
        #: how many vectors were put (encoded) rather than read from ``base``
        self.added = 0

    def get(self, model: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
        keys = list(dict.fromkeys(keys))
        found = {k: self.vectors[model, k] for k in keys if (model, k) in self.vectors}
        rest = [k for k in keys if k not in found]
        if rest and self.base is not None:
            read = self.base.get(model, rest)
            self.vectors.update(((model, k), v) for k, v in read.items())
            found.update(read)
        return found

    def put(self, model: str, vectors: dict[str, np.ndarray]) -> None:
        self.added += sum((model, k) not in self.vectors for k in vectors)
        self.vectors.update(((model, k), v) for k, v in vectors.items())


def encode_cached(
    encoder: TextEncoder, texts: Sequence[str], cache: VectorCache | None
) -> np.ndarray:
    """Encode ``texts``, taking what it can from ``cache`` and adding what it had to encode.

    Returns ndarray of shape (n_texts, dim), float32, unit rows, in the order of ``texts``.
    """
    unique = list(dict.fromkeys(texts))
    known = cache.get(encoder.identity, unique) if cache is not None else {}
    missing = [t for t in unique if t not in known]
    if missing:
        encoded = encoder.encode_texts(missing)
        fresh = dict(zip(missing, encoded, strict=True))
        if cache is not None:
            cache.put(encoder.identity, fresh)
        known.update(fresh)
    return np.stack([known[t] for t in texts]).astype(np.float32, copy=False)


def expand(phrases: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every phrase in every template, phrase-major: ``[p0t0, p0t1, …, p1t0, …]``."""
    return [t.replace(PLACEHOLDER, p) for p in phrases for t in templates]


def embed_query(
    text: str,
    encoder: TextEncoder,
    templates: Sequence[str] | None = None,
    cache: VectorCache | None = None,
) -> np.ndarray:
    """A search text as one unit vector: the mean of its expansion through ``templates`` (a
    prompt ensemble, as a policy term is embedded), or the text alone (``templates=None``)."""
    prompts = expand([text], templates) if templates else [text]
    return _unit(encode_cached(encoder, prompts, cache).mean(axis=0))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class PolicyEmbeddings:
    """The text side of a policy, ready for scoring. All arrays are float32 with unit rows.

    ``categories``: ndarray of shape (n_categories, dim), one ensemble per category.
    ``terms[i]``: ndarray of shape (n_terms_i, dim), one ensemble per term of category i.
    ``exceptions[i]``: ndarray of shape (n_exceptions_i, dim), possibly with no rows.
    """

    model: str
    category_ids: list[str]
    categories: np.ndarray
    terms: list[np.ndarray]
    exceptions: list[np.ndarray]
    term_texts: list[list[str]]
    exception_texts: list[list[str]]


def policy_prompts(policy: Policy) -> list[str]:
    """Every prompt of ``policy``: per category, its terms then its exceptions, each through
    the category's templates (with repeats: the rows :func:`embed_policy` encodes)."""
    prompts: list[str] = []
    for cid, category in policy.categories.items():
        templates = policy.templates_for(cid)
        prompts += expand(category.terms, templates) + expand(category.exceptions, templates)
    return prompts


def missing_prompts(policy: Policy, model: str, cache: VectorCache | None) -> list[str]:
    """The distinct prompts of ``policy`` that ``cache`` has no vector of, for ``model``:
    what embedding the policy would encode."""
    unique = list(dict.fromkeys(policy_prompts(policy)))
    known = cache.get(model, unique) if cache is not None else {}
    return [p for p in unique if p not in known]


def embed_policy(
    policy: Policy, encoder: TextEncoder, cache: VectorCache | None = None
) -> PolicyEmbeddings:
    """Encode every category's terms and exceptions, reusing ``cache`` where it can."""
    ids = list(policy.categories)
    vectors = encode_cached(encoder, policy_prompts(policy), cache)

    dim = vectors.shape[1]
    categories, terms, exceptions = [], [], []
    offset = 0
    for cid in ids:
        category = policy.categories[cid]
        n_templates = len(policy.templates_for(cid))
        n_terms, n_exceptions = len(category.terms), len(category.exceptions)
        term_prompts = vectors[offset : offset + n_terms * n_templates]
        offset += n_terms * n_templates
        exception_prompts = vectors[offset : offset + n_exceptions * n_templates]
        offset += n_exceptions * n_templates
        categories.append(_unit(term_prompts.mean(axis=0)))
        terms.append(_unit(term_prompts.reshape(n_terms, n_templates, dim).mean(axis=1)))
        exceptions.append(
            _unit(exception_prompts.reshape(n_exceptions, n_templates, dim).mean(axis=1))
            if n_exceptions
            else np.zeros((0, dim), dtype=np.float32)
        )
    return PolicyEmbeddings(
        model=encoder.identity,
        category_ids=ids,
        categories=np.stack(categories),
        terms=terms,
        exceptions=exceptions,
        term_texts=[list(policy.categories[c].terms) for c in ids],
        exception_texts=[list(policy.categories[c].exceptions) for c in ids],
    )
