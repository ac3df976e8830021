from __future__ import annotations

import base64

import pytest

from service.parsing import (
    MAX_ID_LENGTH,
    RequestError,
    decode_base64,
    load_json,
    parse_json,
    parse_multipart,
)


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
    assert req.uploads[1].error == (
        "invalid_base64",
        "images[1].data is not valid base64: at position 3 it has white space; send the "
        "base64 text without spaces",
    )
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


PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(200))).decode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data:image/png;base64," + PNG,
         r"x is a data: URL; send only the base64 text after its comma \(without "
         r"'data:image/png;base64,'\)"),
        (PNG[:76] + "\r\n" + PNG[76:],
         "at position 76 it has a line break \\(MIME-style base64\\); send it on one line"),
        (base64.urlsafe_b64encode(b"\xfb\xff" * 30).decode(),
         "at position 0 it has '-', from the URL-safe alphabet; use the standard one"),
        ("abc*", r"at position 3 it has '\*', which is not in the base64 alphabet"),
        ("abcde", r"its length \(5\) is not a multiple of 4 \(is its '=' padding missing\?\)"),
        ("YQ==YQ==", "at position 4 it has text after its '=' padding"),
    ],
)
def test_bad_base64_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_base64(text, "x")
    assert decode_base64(PNG, "x") == base64.b64decode(PNG)


@pytest.mark.parametrize(
    ("item_id", "message"),
    [
        ("x\ud800y", r"images\[0\]\.id has an unpaired surrogate \(U\+D800\) at position 1"),
        ("a\x00b", r"images\[0\]\.id has a control character \(U\+0000\) at position 1"),
        ("line\nbreak", r"has a control character \(U\+000A\) at position 4"),
        ("x" * (1 << 20), rf"images\[0\]\.id is 1,048,576 characters long; at most "
                          rf"{MAX_ID_LENGTH} are accepted"),
    ],
)
def test_bad_ids_are_refused_naming_the_item(item_id: str, message: str) -> None:
    with pytest.raises(RequestError, match=message) as e:
        parse_json({"images": [{"data": PNG, "id": item_id}]}, 10)
    assert (e.value.status, e.value.code) == (400, "invalid_id")


def test_ids_that_are_fine() -> None:
    ok = ["upload-17", "photo de l'été.jpg", "👩‍👩‍👧 family", "x" * MAX_ID_LENGTH]
    req = parse_json({"images": [{"data": PNG, "id": i} for i in ok]}, 10)
    assert [u.id for u in req.uploads] == ok


def test_multipart_ids_and_file_names_are_checked_too() -> None:
    with pytest.raises(RequestError, match=r"'id' field 2 \(of image 2\) has a control") as e:
        parse_multipart([("a", b"1"), ("b", b"2")], {"id": ["ok", "bad\x1b[31m"]}, 10)
    assert e.value.code == "invalid_id"
    with pytest.raises(RequestError, match="the file name of image 1 is 300 characters long"):
        parse_multipart([("a" * 300, b"1")], {}, 10)
    with pytest.raises(RequestError, match="'profile' is 257 characters"):
        parse_multipart([("a", b"1")], {"profile": ["p" * 257]}, 10)


def test_deeply_nested_json_is_a_400_not_a_recursion_error() -> None:
    with pytest.raises(RequestError, match="the JSON body is nested too deeply") as e:
        load_json(b"[" * 100_000 + b"]" * 100_000)
    assert (e.value.status, e.value.code) == (400, "invalid_json")
    with pytest.raises(RequestError, match="the body is not valid JSON: Expecting value"):
        load_json(b"{\"images\": }")
    with pytest.raises(RequestError, match="the body is not valid JSON"):
        load_json(b"\xff\xfe{}")
    assert load_json(b"[[[1]]]") == [[[1]]]


def test_unknown_keys_in_an_image_are_refused() -> None:
    with pytest.raises(RequestError, match=r"images\[0\] has unknown keys \['name'\]"):
        parse_json({"images": [{"data": PNG, "name": "x"}]}, 10)
