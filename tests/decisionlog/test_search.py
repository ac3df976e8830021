"""Search by meaning over stored frames: exact search (SQLite and PostgreSQL) and pgvector's
HNSW index (PostgreSQL), with hand-placed vectors whose order is known."""

from __future__ import annotations

import time

import numpy as np
import pytest

from decisionlog import DecisionStore
from decisionlog.search import (
    ExactIndex,
    HnswIndex,
    SearchFilters,
    ensure_hnsw_index,
    float16_dot,
    hnsw_index_name,
    index_for,
    search,
)
from tests.decisionlog.conftest import MODEL, put
from tests.fakes import unit

# Five stills, at known cosines to Q: 1.0, 0.96, 0.8, 0.6, 0.0 (in the plane of x and y).
Q = unit(1, 0, 0)
NEAR = [unit(1, 0, 0), unit(0.96, 0.28, 0), unit(0.8, 0.6, 0), unit(0.6, 0.8, 0),
        unit(0, 1, 0)]


def indexes(store: DecisionStore) -> list[object]:
    """Every index of this log: exact search, and pgvector's on PostgreSQL."""
    found: list[object] = [ExactIndex(store, chunk=2, readers=1),  # decisions span chunks
                           ExactIndex(store, readers=3)]  # blocks shared out to 3 readers
    if store.dialect == "postgresql":
        ensure_hnsw_index(store.engine, 3)
        found.append(HnswIndex(store))
    return found


def ids_of(page: object) -> list[str]:
    return [h.decision_id for h in page.hits]  # type: ignore[attr-defined]


def test_hits_come_best_first_with_their_cosine_and_record(store: DecisionStore) -> None:
    ids = put(store, [v[None] for v in NEAR], action="block", triggered=["weapons"])
    for index in indexes(store):
        page = search(store, Q, model=MODEL, limit=10, index=index)  # type: ignore[arg-type]
        assert ids_of(page) == ids, index
        assert [h.similarity for h in page.hits] == pytest.approx(
            [1.0, 0.96, 0.8, 0.6, 0.0], abs=1e-3)
        first = page.hits[0]
        assert (first.action, first.triggered, first.client_id, first.frame) == (
            "block", ["weapons"], "client-0", 0)
        assert first.top_terms == {"weapons": ["weapons term"]}
        assert page.next_offset is None


def test_an_animation_is_found_by_any_frame_once_with_that_frame(store: DecisionStore) -> None:
    [gif] = put(store, [np.stack([unit(0, 0, 1), unit(0.8, 0.6, 0), unit(0, 1, 0)])],
                frames=[0, 5, 10])
    [still] = put(store, [unit(0.6, 0.8, 0)[None]])
    for index in indexes(store):
        page = search(store, Q, model=MODEL, limit=5, index=index)  # type: ignore[arg-type]
        assert ids_of(page) == [gif, still], index
        assert page.hits[0].frame == 5
        assert page.hits[0].similarity == pytest.approx(0.8, abs=1e-3)
        # an animation as the query: each of its frames asks, the best answer counts
        both = search(store, np.stack([unit(0, 0, 1), unit(0.6, 0.8, 0)]), model=MODEL,
                      limit=5, index=index)  # type: ignore[arg-type]
        assert [h.similarity for h in both.hits] == pytest.approx([1.0, 1.0], abs=1e-3)


def test_every_filter_is_applied_before_ranking(store: DecisionStore) -> None:
    now = time.time()
    old = put(store, [NEAR[0][None]], at=now - 10 * 86400, version="v-old")
    blocked = put(store, [NEAR[1][None]], at=now - 3600, action="block",
                  triggered=["weapons"], client_ids=["cdn/a.jpg"])
    flagged = put(store, [NEAR[2][None]], at=now - 3500, action="flag", triggered=["drugs"])
    allowed = put(store, [NEAR[3][None]], at=now - 3400)
    put(store, [NEAR[0][None]], at=now - 3300, error=True)
    other_model = put(store, [NEAR[0][None]], at=now - 3200, model="another/model")
    cases = {
        SearchFilters(): old + blocked + flagged + allowed,
        SearchFilters(since=now - 86400): blocked + flagged + allowed,
        SearchFilters(until=now - 86400): old,
        SearchFilters(action="block"): blocked,
        SearchFilters(category="drugs"): flagged,
        SearchFilters(policy_version="v-old"): old,
        SearchFilters(client_id="cdn/a.jpg"): blocked,
        SearchFilters(flagged=True): blocked + flagged,
        SearchFilters(flagged=False): old + allowed,
        SearchFilters(exclude=(old[0], blocked[0])): flagged + allowed,
        SearchFilters(since=now - 86400, flagged=False): allowed,
    }
    for index in indexes(store):
        for filters, expected in cases.items():
            page = search(store, Q, model=MODEL, filters=filters, limit=10,
                          index=index)  # type: ignore[arg-type]
            assert ids_of(page) == expected, (index, filters)
        assert ids_of(search(store, Q, model="another/model", index=index)  # type: ignore[arg-type]
                      ) == other_model


def test_pages_follow_each_other_and_min_similarity_cuts_the_tail(
        store: DecisionStore) -> None:
    ids = put(store, [v[None] for v in NEAR])
    for index in indexes(store):
        pages, offset = [], 0
        while offset is not None:
            page = search(store, Q, model=MODEL, limit=2, offset=offset,
                          index=index)  # type: ignore[arg-type]
            pages.append(ids_of(page))
            offset = page.next_offset
        assert pages == [ids[0:2], ids[2:4], ids[4:5]]
        cut = search(store, Q, model=MODEL, limit=10, min_similarity=0.7,
                     index=index)  # type: ignore[arg-type]
        assert ids_of(cut) == ids[:3] and cut.next_offset is None
        assert search(store, Q, model=MODEL, limit=2, min_similarity=0.7,
                      index=index).next_offset == 2  # type: ignore[arg-type]


def test_bad_queries_are_refused(store: DecisionStore) -> None:
    with pytest.raises(ValueError, match="zero or not finite"):
        search(store, np.zeros(3), model=MODEL)
    with pytest.raises(ValueError, match="zero or not finite"):
        search(store, np.array([1.0, np.nan, 0]), model=MODEL)
    with pytest.raises(ValueError, match="at most 10000"):
        search(store, Q, model=MODEL, limit=500, offset=9600)


def test_the_log_picks_its_index(store: DecisionStore) -> None:
    expected = "pgvector" if store.dialect == "postgresql" else "exact"
    assert index_for(store).name == expected


def test_pgvector_finds_what_exact_search_finds(postgres_url: str) -> None:
    """Clustered vectors (so that neighbours exist), filtered and not: pgvector's hits are
    exact search's, and recall@10 on a larger log stays at least 0.9."""
    store = DecisionStore(postgres_url)
    rng = np.random.default_rng(7)
    dim, n = 32, 3000
    centres = rng.normal(size=(60, dim))
    vectors = centres[rng.integers(0, 60, n)] + 0.35 * rng.normal(size=(n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    actions = ["block" if i % 7 == 0 else "allow" for i in range(n)]
    for action in ("block", "allow"):
        put(store, [vectors[i][None] for i in range(n) if actions[i] == action],
            action=action, triggered=["weapons"] if action == "block" else ())
    assert ensure_hnsw_index(store.engine, dim) is True
    assert ensure_hnsw_index(store.engine, dim) is False  # there already
    with store.engine.connect() as conn:
        plan = "\n".join(conn.exec_driver_sql(
            "EXPLAIN SELECT decision_id FROM decision_frames WHERE vector_dims(embedding) = "
            f"{dim} ORDER BY embedding::halfvec({dim}) <=> '{vectors[0].tolist()}' LIMIT 10"
        ).scalars())
    assert hnsw_index_name(dim) in plan
    exact, hnsw = ExactIndex(store), HnswIndex(store, ef_search=100)
    queries = vectors[rng.choice(n, 30, replace=False)] + 0.1 * rng.normal(size=(30, dim))
    recalls = []
    for filters in (SearchFilters(), SearchFilters(action="block")):
        for q in queries:
            want = ids_of(search(store, q, model=MODEL, filters=filters, index=exact))
            got = ids_of(search(store, q, model=MODEL, filters=filters, index=hnsw))
            assert len(got) == 20  # filtered too: the iterative scan goes on until it has k
            recalls.append(len(set(got[:10]) & set(want[:10])) / 10)
    assert np.mean(recalls) >= 0.9


def test_float16_dot_is_the_float32_product() -> None:
    rng = np.random.default_rng(0)
    halves = (rng.normal(size=(1000, 64)) / 8).astype(np.float16)
    halves[0, :4] = [6e-8, -6e-8, -0.0, 60000]  # subnormals, a negative zero, a large value
    queries = rng.normal(size=(3, 64)).astype(np.float32)
    expected = halves.astype(np.float32) @ queries.T
    got = float16_dot(halves.view(np.uint16), queries, block=128)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
