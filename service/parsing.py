"""Requests → small typed values, in plain functions testable without Flask."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ModerateRequest", "RequestError", "Upload", "parse_json", "parse_multipart"]

IMAGE_FIELD = "image"


class RequestError(Exception):
    """A request the service refuses as a whole: ``status``, ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


@dataclass(frozen=True)
class Upload:
    """One image of a request: the client's id (if any) and its bytes, or why they are bad."""

    id: str | None
    data: bytes
    error: tuple[str, str] | None = None  # (code, message) for an item that cannot be read


@dataclass(frozen=True)
class ModerateRequest:
    uploads: list[Upload]
    profile: str | None


def _check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise RequestError(
            400,
            "missing_field",
            f"no image in the request: send multipart form files in the field "
            f"'{IMAGE_FIELD}' (repeatable), or JSON {{\"images\": [{{\"data\": "
            f"\"<base64>\", \"id\": \"...\"}}]}}",
        )
    if n > max_images:
        raise RequestError(
            413,
            "too_many_images",
            f"the request has {n} images; at most {max_images} are accepted per request",
        )


def _profile(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RequestError(400, "invalid_field", "'profile' must be a string")
    return value


def parse_multipart(
    files: Sequence[tuple[str | None, bytes]],
    form: Mapping[str, Sequence[str]],
    max_images: int,
) -> ModerateRequest:
    """Files of the ``image`` field as ``(filename, bytes)``, and the other form fields.

    Ids come from repeated ``id`` fields in the order of the files, else from the filenames.
    """
    _check_count(len(files), max_images)
    ids = list(form.get("id", []))
    if ids and len(ids) != len(files):
        raise RequestError(
            400,
            "invalid_field",
            f"got {len(files)} images but {len(ids)} 'id' fields: give one id per image, "
            "in the same order, or none",
        )
    uploads = [
        Upload(ids[i] if ids else (filename or None), data)
        for i, (filename, data) in enumerate(files)
    ]
    profiles = form.get("profile", [])
    return ModerateRequest(uploads, _profile(profiles[0] if profiles else None))


def parse_json(body: Any, max_images: int) -> ModerateRequest:
    """``{"images": [{"data": base64, "id": str?}, ...], "profile": str?}``."""
    if not isinstance(body, dict):
        raise RequestError(400, "invalid_json", "the JSON body must be an object with 'images'")
    unknown = sorted(set(body) - {"images", "profile"})
    if unknown:
        raise RequestError(
            400, "invalid_field", f"unknown keys {unknown}; accepted: 'images', 'profile'"
        )
    images = body.get("images")
    if images is None:
        _check_count(0, max_images)
    if not isinstance(images, list):
        raise RequestError(400, "invalid_field", "'images' must be a list of objects")
    _check_count(len(images), max_images)
    uploads = []
    for i, item in enumerate(images):
        if not isinstance(item, dict) or not isinstance(item.get("data"), str):
            raise RequestError(
                400,
                "invalid_field",
                f"images[{i}] must be an object with 'data' (a base64 string) and an optional "
                "'id'",
            )
        item_id = item.get("id")
        if item_id is not None and not isinstance(item_id, str):
            raise RequestError(400, "invalid_field", f"images[{i}].id must be a string")
        try:
            data = base64.b64decode(item["data"], validate=True)
        except (binascii.Error, ValueError):
            uploads.append(
                Upload(item_id, b"", ("invalid_base64", f"images[{i}].data is not valid base64"))
            )
            continue
        uploads.append(Upload(item_id, data))
    return ModerateRequest(uploads, _profile(body.get("profile")))
