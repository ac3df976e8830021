"""Every number here can be worked out by hand from tests/fakes.py's HAND_* vectors.

weapons: term "gun" = unit(a gun, the gun) = (1,1,0)/√2; "rifle" = (1,0,0);
category = unit(mean of the 4 prompts) = unit(3,1,0) = (3,1,0)/√10; exception "toy gun" = (0,0,1).
alcohol: "beer" = (0,1,0) = its category; no exceptions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from moderation.policy import parse_policy
from moderation.prompts import embed_policy
from moderation.scoring import score_images
from tests.fakes import HAND_POLICY, FakeEncoder, unit


@pytest.fixture
def text(fake_encoder: FakeEncoder):  # type: ignore[no-untyped-def]
    return embed_policy(parse_policy(yaml.safe_dump(HAND_POLICY, sort_keys=False)), fake_encoder)


def test_prompt_ensembles_follow_the_clip_recipe(text) -> None:  # type: ignore[no-untyped-def]
    assert text.category_ids == ["weapons", "alcohol"]
    np.testing.assert_allclose(text.categories[0], unit(3, 1, 0), atol=1e-6)
    np.testing.assert_allclose(text.categories[1], unit(0, 1, 0), atol=1e-6)
    np.testing.assert_allclose(text.terms[0], [unit(1, 1, 0), unit(1, 0, 0)], atol=1e-6)
    np.testing.assert_allclose(text.exceptions[0], [unit(0, 0, 1)], atol=1e-6)
    assert text.exceptions[1].shape == (0, 3)
    assert text.categories.dtype == np.float32


def test_scores_by_hand(text) -> None:  # type: ignore[no-untyped-def]
    images = np.stack([unit(1, 0, 0), unit(0, 0, 1), unit(1, 0, 1), unit(0, 1, 0)])
    scores = score_images(images, text)
    s10 = math.sqrt(10)
    # rifle-like: no exception is closer, the score is the similarity
    assert scores.similarity[0, 0] == pytest.approx(3 / s10)
    assert scores.score[0, 0] == pytest.approx(3 / s10)
    # toy gun: similarity 0, exception 1 → loses the gap of 1
    assert scores.exception_similarity[1, 0] == pytest.approx(1.0)
    assert scores.score[1, 0] == pytest.approx(-1.0)
    # halfway: similarity 3/√20, exception 1/√2, score = 2·3/√20 − 1/√2
    assert scores.similarity[2, 0] == pytest.approx(3 / math.sqrt(20))
    assert scores.score[2, 0] == pytest.approx(6 / math.sqrt(20) - 1 / math.sqrt(2))
    assert scores.score[2, 0] < scores.similarity[2, 0]
    # beer: alcohol 1, weapons 1/√10; alcohol has no exception (NaN, index -1)
    assert scores.score[3, 1] == pytest.approx(1.0)
    assert scores.score[3, 0] == pytest.approx(1 / s10)
    assert np.isnan(scores.exception_similarity[3, 1]) and scores.closest_exception[3, 1] == -1
    # per-term similarities explain the weapons score
    np.testing.assert_allclose(scores.term_similarity[0][0], [1 / math.sqrt(2), 1.0], atol=1e-6)
    assert scores.score.shape == (4, 2) and scores.score.dtype == np.float32


def test_score_never_leaves_minus_one_to_one(text) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    images = rng.normal(size=(500, 3))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    scores = score_images(images.astype(np.float32), text)
    assert scores.score.min() >= -1.0 and scores.score.max() <= 1.0
    assert np.all(scores.score <= scores.similarity + 1e-6)


def test_wrong_embedding_width_is_refused(text) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"must have shape \(n_images, 3\); got \(2, 4\)"):
        score_images(np.zeros((2, 4), dtype=np.float32), text)


def test_one_blas_thread_limits_while_any_user_is_inside_and_restores_after():
    """Overlapping scans (two requests' searches) share the limit: the first to leave does not
    lift it under the other, the last restores the BLAS's own setting."""
    from threadpoolctl import threadpool_info

    from moderation.scoring import one_blas_thread

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    if not before:
        pytest.skip("numpy is linked to no BLAS threadpoolctl can see")
    outer = one_blas_thread()
    outer.__enter__()
    assert set(blas_threads()) == {1}
    with one_blas_thread():
        assert set(blas_threads()) == {1}
    assert set(blas_threads()) == {1}  # the outer user is still scanning
    outer.__exit__(None, None, None)
    assert blas_threads() == before
