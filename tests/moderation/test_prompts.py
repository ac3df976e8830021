from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import yaml

from moderation.policy import parse_policy
from moderation.prompts import EmbeddingCache, embed_policy, encode_cached, expand
from tests.fakes import HAND_POLICY, HAND_TEXTS, FakeEncoder, unit


def policy_with(**category_terms: list[str]):  # type: ignore[no-untyped-def]
    data = copy.deepcopy(HAND_POLICY)
    for cid, terms in category_terms.items():
        data["categories"][cid]["terms"] = terms
    return parse_policy(yaml.safe_dump(data, sort_keys=False))


def test_expand_is_phrase_major() -> None:
    assert expand(["x", "y"], ["a {}", "{}!"]) == ["a x", "x!", "a y", "y!"]


def test_a_warm_cache_encodes_nothing(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "e")
    first = FakeEncoder(dict(HAND_TEXTS))
    cold = embed_policy(policy_with(), first, cache)
    assert sorted(first.encoded_texts) == sorted(HAND_TEXTS)

    # a new process: a new cache object on the same file
    second = FakeEncoder(dict(HAND_TEXTS))
    warm = embed_policy(policy_with(), second, EmbeddingCache(tmp_path / "e"))
    assert second.encoded_texts == []
    np.testing.assert_array_equal(cold.categories, warm.categories)


def test_editing_one_term_encodes_only_its_prompts(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "e")
    texts = dict(HAND_TEXTS, **{"a pistol": unit(1, 0, 0), "the pistol": unit(1, 1, 1)})
    embed_policy(policy_with(), FakeEncoder(texts), cache)

    encoder = FakeEncoder(texts)
    edited = embed_policy(policy_with(weapons=["gun", "pistol"]), encoder, cache)
    assert encoder.encoded_texts == ["a pistol", "the pistol"]
    assert edited.term_texts[0] == ["gun", "pistol"]


def test_prompts_are_encoded_once_even_when_repeated(tmp_path: Path) -> None:
    encoder = FakeEncoder({"a": unit(1, 0), "b": unit(0, 1)})
    out = encode_cached(encoder, ["a", "b", "a"], None)
    assert encoder.encoded_texts == ["a", "b"]
    np.testing.assert_array_equal(out[0], out[2])


def test_cache_is_keyed_by_model_identity(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "e")
    a = FakeEncoder({"x": unit(1, 0)})
    b = FakeEncoder({"x": unit(0, 1)})
    b.identity = "fake/another-model"
    encode_cached(a, ["x"], cache)
    out = encode_cached(b, ["x"], cache)
    assert b.encoded_texts == ["x"]
    np.testing.assert_array_equal(out[0], unit(0, 1))
    assert cache.get("fake/hand-made", ["x", "y"]).keys() == {"x"}


def test_default_cache_location_follows_the_environment(
    tmp_path: Path, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    from moderation.prompts import default_cache_path

    monkeypatch.setenv("MODERATION_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_path() == tmp_path / "c" / "embeddings"
    monkeypatch.delenv("MODERATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_path() == tmp_path / "x" / "moderation" / "embeddings"
