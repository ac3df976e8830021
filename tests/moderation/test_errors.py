"""Every error raised on purpose carries its answer (code, status, details) and survives
pickling (a scan's errors cross process boundaries on Ray)."""

from __future__ import annotations

import pickle

import pytest

from moderation import ImageError, InvalidRequest, PolicyError, PolicyLimitError, UnknownProfile


@pytest.mark.parametrize("error", [
    ImageError("too_many_pixels", "the image has 200 MP; at most 100 MP"),
    PolicyError("policy.yaml: 2 faults", faults=["a: unknown key", "b: missing"]),
    PolicyLimitError("too big", faults=["size"]),
    UnknownProfile("no profile 'x'"),
    InvalidRequest(413, "too_many_images", "at most 32", limit=32),
])
def test_errors_carry_their_answer_and_pickle(error: Exception) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    for name in ("code", "status", "message"):
        assert getattr(copy, name) == getattr(error, name)
    assert copy.details() == error.details()  # type: ignore[attr-defined]
    assert 400 <= error.status < 500  # type: ignore[attr-defined]


def test_statuses_are_the_one_table() -> None:
    assert (ImageError("too_many_pixels", "x").status, ImageError("corrupt_image", "x").status,
            ImageError("unsupported_format", "x").status) == (413, 400, 415)
    assert (PolicyError("x").status, PolicyError("x").code) == (422, "invalid_policy")
    assert (UnknownProfile("x").status, UnknownProfile("x").details()) == (400, {})
