"""The search behind ``/v1/search`` and the search page: a text, a stored decision or an
uploaded image → query vectors, with this server's encoder and policy templates → the
decisions most like it (:func:`decisionlog.search.search`). Nothing is recorded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from decisionlog import DecisionStore
from decisionlog.search import SearchPage, index_for, search
from moderation.prompts import embed_query

from .parsing import RequestError, SearchRequest
from .state import PolicyHolder

__all__ = ["SearchResult", "run_search"]


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
        templates = None if request.raw else active.policy.templates
        queries = embed_query(request.q, active.encoder, templates, active.cache)[None]
        query: dict[str, Any] = {"kind": "text", "q": request.q, "raw": request.raw,
                                 "prompts": len(templates) if templates else 1}
    elif request.like is not None:
        found = store.get(request.like)
        if found is None:
            raise RequestError(404, "not_found", f"no decision with id {request.like!r}")
        stored = store.frame_embeddings(request.like)
        if stored is None:
            raise RequestError(
                422, "no_embedding",
                f"decision {request.like!r} has no stored embedding (it is an error result, "
                "or was recorded without one): there is nothing to compare with",
            )
        model, exclude = found.model, (request.like,)  # its model's vectors, not itself
        queries = stored[1]
        query = {"kind": "like", "like": request.like, "frames": len(stored[0])}
    elif image is not None:
        decoded = active.decode(image)
        queries = np.asarray(active.encoder.encode_images(decoded.frames), np.float32)
        query = {"kind": "image", "format": decoded.format, "frames": len(decoded.frames)}
    else:
        raise RequestError(400, "missing_field", "no query")
    filters = dataclasses.replace(request.filters, exclude=exclude)
    page = search(store, queries, model=model, filters=filters, limit=request.limit,
                  offset=request.offset, min_similarity=request.min_similarity,
                  index=index_for(store, ef_search=ef_search))
    return SearchResult(page, query)
