from __future__ import annotations

import base64

import pytest

from service.parsing import RequestError, parse_json, parse_multipart


def test_multipart_ids_from_fields_or_filenames() -> None:
    req = parse_multipart([("a.jpg", b"1"), ("b.jpg", b"2")], {"id": ["x", "y"]}, 10)
    assert [(u.id, u.data) for u in req.uploads] == [("x", b"1"), ("y", b"2")]
    req = parse_multipart([("a.jpg", b"1"), (None, b"2")], {"profile": ["kids"]}, 10)
    assert [u.id for u in req.uploads] == ["a.jpg", None] and req.profile == "kids"


@pytest.mark.parametrize(
    ("files", "form", "status", "code", "message"),
    [
        ([], {}, 400, "missing_field", "no image in the request"),
        ([("a", b"")] * 3, {}, 413, "too_many_images", "the request has 3 images; at most 2"),
        ([("a", b"1")], {"id": ["x", "y"]}, 400, "invalid_field", "got 1 images but 2 'id'"),
    ],
)
def test_multipart_refusals(files, form, status, code, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestError, match=message) as e:
        parse_multipart(files, form, 2)
    assert (e.value.status, e.value.code) == (status, code)


def test_json_images_and_bad_base64_is_a_per_image_error() -> None:
    body = {"images": [{"data": base64.b64encode(b"abc").decode(), "id": "1"},
                       {"data": "not base64!"}], "profile": "kids"}
    req = parse_json(body, 10)
    assert req.uploads[0].data == b"abc" and req.uploads[0].id == "1"
    assert req.uploads[1].error == ("invalid_base64", "images[1].data is not valid base64")
    assert req.profile == "kids"


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ([], "invalid_json", "must be an object"),
        ({}, "missing_field", "no image in the request"),
        ({"images": "x"}, "invalid_field", "'images' must be a list"),
        ({"images": [{"id": "a"}]}, "invalid_field", r"images\[0\] must be an object with 'data'"),
        ({"images": [{"data": "", "id": 3}]}, "invalid_field", r"images\[0\]\.id must be a string"),
        ({"images": [{"data": ""}], "extra": 1}, "invalid_field", r"unknown keys \['extra'\]"),
        ({"images": [{"data": ""}], "profile": 5}, "invalid_field", "'profile' must be a string"),
    ],
)
def test_json_refusals(body, code, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestError, match=message) as e:
        parse_json(body, 10)
    assert e.value.code == code
