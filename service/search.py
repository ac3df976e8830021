"""The search behind ``/v1/search`` and the search page: a text, a stored decision or an
uploaded image → query vectors, with this server's encoder and policy templates → the
decisions most like it (:func:`decisionlog.search.search`). Nothing is recorded."""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from decisionlog import DecisionStore
from decisionlog.search import (
    NoEmbedding,
    SearchPage,
    UnknownDecision,
    frames_like,
    index_for,
    search,
)
from moderation import Moderator
from moderation.prompts import OverlayCache, embed_query

from .parsing import RequestError, SearchRequest
from .state import PolicyHolder

__all__ = ["SearchResult", "run_search"]


class TextQueries:
    """Search texts' vectors, the ``size`` most recently used kept in this worker's memory.

    A search text is encoded through an overlay of the shared text cache (a prompt a policy
    already encoded is read from it) that is dropped after the query: readers never write
    to the log or the cache folder, whatever they search for."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._vectors: OrderedDict[tuple[str, str, bool, tuple[str, ...]], np.ndarray] = (
            OrderedDict())
        self._lock = threading.Lock()

    def embed(self, active: Moderator, text: str, *, raw: bool) -> np.ndarray:
        """The query vector, shape (1, dim)."""
        templates = () if raw else tuple(active.policy.templates)
        key = (active.encoder.identity, text, raw, templates)
        with self._lock:
            found = self._vectors.get(key)
            if found is not None:
                self._vectors.move_to_end(key)
                return found
        found = embed_query(text, active.encoder, list(templates) or None,
                            OverlayCache(active.cache))[None]
        with self._lock:
            self._vectors[key] = found
            while len(self._vectors) > self.size:
                self._vectors.popitem(last=False)
        return found


#: This worker's search texts (reads of the shared cache, never writes).
TEXT_QUERIES = TextQueries()


@dataclass(frozen=True)
class SearchResult:
    page: SearchPage
    query: dict[str, Any]  # what was searched for, as the answer repeats it

    def view(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "model": self.page.model,
            "index": self.page.index,
            "hits": [h.model_dump(mode="json") for h in self.page.hits],
            "next_offset": self.page.next_offset,
        }


def run_search(holder: PolicyHolder, store: DecisionStore, request: SearchRequest, *,
               image: bytes | None = None, ef_search: int = 100) -> SearchResult:
    """Raises :class:`RequestError` (404: an unknown ``like`` id; 422: a decision with no
    stored embedding) or :class:`moderation.ImageError` (an upload that cannot be read)."""
    active = holder.current()
    model = active.encoder.identity
    exclude: tuple[str, ...] = ()
    if request.q is not None:
        queries = TEXT_QUERIES.embed(active, request.q, raw=request.raw)
        query: dict[str, Any] = {"kind": "text", "q": request.q, "raw": request.raw,
                                 "prompts": 1 if request.raw else len(active.policy.templates)}
    elif request.like is not None:
        try:
            model, queries = frames_like(store, request.like)
        except UnknownDecision as e:
            raise RequestError(404, "not_found", str(e)) from e
        except NoEmbedding as e:
            raise RequestError(422, "no_embedding", str(e)) from e
        exclude = (request.like,)  # its model's vectors, not itself
        query = {"kind": "like", "like": request.like, "frames": len(queries)}
    elif image:
        queries = active.embed_image(image)
        query = {"kind": "image", "frames": len(queries)}
    else:
        raise RequestError(400, "empty" if image is not None else "missing_field",
                           "the uploaded image is empty" if image is not None else "no query")
    filters = dataclasses.replace(request.filters, exclude=exclude)
    page = search(store, queries, model=model, filters=filters, limit=request.limit,
                  offset=request.offset, min_similarity=request.min_similarity,
                  index=index_for(store, ef_search=ef_search))
    return SearchResult(page, query)
