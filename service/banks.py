"""Hash banks over HTTP: ``/v1/banks`` (list, create, read, update, delete), their hashes
(add, remove, page, import, export), ``POST /v1/hash`` (an upload's hashes, nothing recorded)
and ``POST /v1/match`` (the banks an upload matches). Admin for writes, reader for reads; the
store and matcher are :mod:`decisionlog.banks`'s, matching in ``/v1/moderate`` too."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, render_template, request

from decisionlog.banks import BankMatcher, BankStore, HashEntry, import_dry_run
from moderation import ImageError
from moderation.banks import BankMatch
from moderation.hashing import UploadHashes

from . import pages
from .auth import reader_page_required
from .contract import Access, Answer, Body, json_body, operation
from .moderate import MULTIPART, parse_moderate
from .parsing import RequestError
from .resources import holder, store
from .schemas import (
    BankCreate,
    BankDeleted,
    BankDryRunJSON,
    BankDryRunOut,
    BankImport,
    BankList,
    BankOut,
    BankPath,
    BankUpdate,
    ExportQuery,
    HashesAdd,
    HashesAdded,
    HashesRemove,
    HashesRemoved,
    HashPageOut,
    HashPageQuery,
    ModerateJSON,
    UploadHashesResponse,
)

__all__ = ["bp", "matcher"]

bp = Blueprint("banks", __name__)

def bank_store() -> BankStore:
    found: BankStore = current_app.extensions["banks"][0]
    return found


def matcher() -> BankMatcher:
    found: BankMatcher = current_app.extensions["banks"][1]
    return found


def _bank(bank: Any) -> dict[str, Any]:
    return BankOut.model_validate(bank.to_dict()).model_dump(mode="json")


# --- banks ---------------------------------------------------------------------------------


@operation(bp, "/v1/banks", "GET", operation_id="list_banks", access=Access.READER,
           summary="Every hash bank, with its settings and size",
           answers=(Answer(200, "The banks", {"application/json": BankList}),))
def list_banks() -> Any:
    return jsonify(banks=[_bank(b) for b in bank_store().banks()])


@operation(bp, "/v1/banks", "POST", operation_id="create_bank", access=Access.ADMIN,
           summary="Create a hash bank", body=Body({"application/json": BankCreate}),
           answers=(Answer(201, "The bank", {"application/json": BankOut}),),
           errors=(409,))
def create_bank() -> Any:
    given = json_body(BankCreate)
    bank = bank_store().create_bank(given.name, given.action, given.distance,
                                    given.min_quality, given.description)
    return jsonify(_bank(bank)), 201


@operation(bp, "/v1/banks/<name>", "GET", operation_id="get_bank", access=Access.READER,
           summary="A hash bank", path=BankPath,
           answers=(Answer(200, "The bank", {"application/json": BankOut}),))
def get_bank(name: str) -> Any:
    return jsonify(_bank(bank_store().bank(name)))


@operation(bp, "/v1/banks/<name>", "PATCH", operation_id="update_bank", access=Access.ADMIN,
           summary="Change a bank's action, distance, minimum quality or description",
           path=BankPath, body=Body({"application/json": BankUpdate}),
           answers=(Answer(200, "The bank", {"application/json": BankOut}),))
def update_bank(name: str) -> Any:
    changes = {k: v for k, v in json_body(BankUpdate).model_dump(exclude_unset=True).items()
               if v is not None or k == "description"}  # null: unchanged, but a description
    return jsonify(_bank(bank_store().update_bank(name, **changes)))


@operation(bp, "/v1/banks/<name>", "DELETE", operation_id="delete_bank", access=Access.ADMIN,
           summary="Delete a bank and its hashes", path=BankPath,
           answers=(Answer(200, "Deleted", {"application/json": BankDeleted}),))
def delete_bank(name: str) -> Any:
    return jsonify(deleted=name, hashes=bank_store().delete_bank(name))


# --- a bank's hashes ---------------------------------------------------------------------------


@operation(bp, "/v1/banks/<name>/hashes", "GET", operation_id="list_bank_hashes",
           access=Access.READER, summary="A page of a bank's hashes, oldest first",
           path=BankPath, query=HashPageQuery,
           answers=(Answer(200, "The page", {"application/json": HashPageOut}),))
def list_hashes(name: str, query: HashPageQuery) -> Any:
    page = bank_store().hashes(name, after_id=query.after_id, limit=query.limit)
    return jsonify(hashes=[h.to_dict() for h in page.hashes], next_after_id=page.next_after_id)


@operation(bp, "/v1/banks/<name>/hashes", "POST", operation_id="add_bank_hashes",
           access=Access.ADMIN, summary="Add hashes to a bank: given, a stored decision's, "
           "an uploaded image's, or a whole file (CSV as ThreatExchange/HMA write PDQ, or "
           "JSON lines)", path=BankPath,
           description="All or nothing: a bad hash refuses the whole request (422, each "
           "fault named) and nothing is added.",
           body=Body({"application/json": HashesAdd, "multipart/form-data": MULTIPART}),
           answers=(Answer(200, "Added", {"application/json": HashesAdded}),),
           errors=(415, 422))
def add_hashes(name: str) -> Any:
    banks, who = bank_store(), "admin"
    banks.bank(name)  # 404 before reading a body
    if request.mimetype == "multipart/form-data":
        entries = []
        for upload in parse_moderate().uploads:
            hashes = _hash_upload(upload)
            if isinstance(hashes, ImageError):
                raise RequestError(hashes.status, hashes.code, hashes.message)
            entries += _entries(hashes, note=upload.id, source="upload")
    else:
        given = json_body(HashesAdd)
        entries = [HashEntry(h.kind, h.hash, h.note, h.source) for h in given.hashes]
        if given.decision_id is not None:
            entries += _decision_entries(given.decision_id, given.note)
        if not entries:
            raise RequestError(400, "missing_field", "give hashes, a decision_id, or both")
    added, present = banks.add_hashes(name, entries, added_by=who)
    return jsonify(added=added, already_present=present)


@operation(bp, "/v1/banks/<name>/import", "POST", operation_id="import_bank_hashes",
           access=Access.ADMIN, summary="Import a file of hashes into a bank: CSV (as "
           "ThreatExchange and HMA write PDQ, or as /export writes it) or JSON lines",
           description="All or nothing: every bad line is named by its number (up to 50) in "
           "a 422 and nothing is added. Larger files than a request may carry: `moderation "
           "banks import`.", path=BankPath, body=Body({"application/json": BankImport}),
           answers=(Answer(200, "Imported", {"application/json": HashesAdded}),),
           errors=(415, 422))
def import_hashes(name: str) -> Any:
    given = json_body(BankImport)
    banks = bank_store()
    importer = banks.import_csv if given.format == "csv" else banks.import_jsonl
    added, present = importer(name, given.text, added_by="admin")
    return jsonify(added=added, already_present=present)


@operation(bp, "/v1/banks/<name>/dry-run", "POST", operation_id="dry_run_bank_import",
           access=Access.ADMIN, summary="What importing a list of hashes into this bank "
           "would have done to past uploads: the stored decisions it matches, and whose action "
           "the bank (its action, distance and minimum quality) would have changed; nothing "
           "is written", path=BankPath,
           body=Body({"application/json": BankDryRunJSON}),
           answers=(Answer(200, "The counts", {"application/json": BankDryRunOut}),),
           errors=(415, 422))
def dry_run_bank(name: str) -> Any:
    bank = bank_store().bank(name)
    given = json_body(BankDryRunJSON)
    report = import_dry_run(store().engine, given.text, given.format, action=bank.action,
                            distance=bank.distance, min_quality=bank.min_quality,
                            since=given.since, until=given.until, limit=given.limit)
    return jsonify(report.to_dict())


@operation(bp, "/v1/banks/<name>/hashes", "DELETE", operation_id="remove_bank_hashes",
           access=Access.ADMIN, summary="Remove hashes from a bank", path=BankPath,
           body=Body({"application/json": HashesRemove}),
           answers=(Answer(200, "Removed", {"application/json": HashesRemoved}),))
def remove_hashes(name: str) -> Any:
    return jsonify(removed=bank_store().remove_hashes(name, json_body(HashesRemove).hashes))


@operation(bp, "/v1/banks/<name>/export", "GET", operation_id="export_bank",
           access=Access.READER, summary="A bank's hashes as a file (CSV or JSON lines); "
           "importing it into an empty bank and exporting again gives the same bytes",
           path=BankPath, query=ExportQuery,
           answers=(Answer(200, "The file", {"text/csv": {"type": "string"},
                                             "application/x-ndjson": {"type": "string"}}),))
def export_bank(name: str, query: ExportQuery) -> Any:
    banks = bank_store()
    if query.format == "csv":
        body, mimetype = banks.export_csv(name), "text/csv"
    else:
        body, mimetype = banks.export_jsonl(name), "application/x-ndjson"
    return Response(body, mimetype=mimetype, headers={
        "Content-Disposition": f'attachment; filename="{name}.{query.format}"'})


# --- hashing and matching uploads ------------------------------------------------------------


def _hash_upload(upload: Any) -> UploadHashes | ImageError:
    """An upload's hashes, decoded as ``/v1/moderate`` decodes it (no model runs)."""
    if upload.error is not None:
        return ImageError(*upload.error)
    try:
        decoded = holder().current().decode(upload.data)
    except ImageError as e:
        return e
    return UploadHashes(decoded.sha256 or "", list(decoded.hashes))


def _entries(hashes: UploadHashes, *, note: str | None, source: str) -> list[HashEntry]:
    entries = [HashEntry("sha256", hashes.sha256, note, source)] if hashes.sha256 else []
    return entries + [HashEntry("pdq", f.pdq, note, source) for f in hashes.frames]


def _decision_entries(decision_id: str, note: str | None) -> list[HashEntry]:
    record = store().get(decision_id)
    if record is None:
        raise RequestError(404, "not_found", f"no decision {decision_id!r}")
    source = f"decision:{decision_id}"
    return [HashEntry("sha256", record.image.sha256, note, source)] + [
        HashEntry("pdq", h.pdq, note, source) for h in record.pdq]


def add_decision(bank: str, decision_id: str, added_by: str,
                 note: str | None) -> tuple[int, int]:
    """Add a stored decision's hashes (its SHA-256, each frame's PDQ) to ``bank`` (a
    reviewer's verdict that feeds a bank): (added, already there)."""
    added, present = bank_store().add_hashes(bank, _decision_entries(decision_id, note),
                                             added_by=added_by)
    return int(added), int(present)


def _hash_results(match: bool) -> Any:
    results: list[dict[str, Any]] = []
    failures: list[ImageError] = []
    for upload in parse_moderate().uploads:
        hashes = _hash_upload(upload)
        if isinstance(hashes, ImageError):
            failures.append(hashes)
            results.append({"id": upload.id, "error": {"code": hashes.code,
                                                       "message": hashes.message}})
            continue
        frames = list(range(len(hashes.frames)))
        out: dict[str, Any] = {
            "id": upload.id, "sha256": hashes.sha256,
            "frames": [{"frame": i, "pdq": f.pdq, "quality": f.quality}
                       for i, f in zip(frames, hashes.frames, strict=True)]}
        if match:
            found: list[BankMatch] = matcher().match(hashes, frames)
            out["matches"] = [m.to_dict() for m in found]
        results.append(out)
    if len(results) == 1 and failures:
        raise failures[0]  # a request whose only upload failed: that error
    return jsonify(results=results)


@operation(bp, "/v1/hash", "POST", operation_id="hash_images", access=Access.API_KEY,
           summary="The hashes of uploads (SHA-256, each frame's PDQ), nothing recorded",
           body=Body({"multipart/form-data": MULTIPART, "application/json": ModerateJSON}),
           answers=(Answer(200, "One result per upload",
                           {"application/json": UploadHashesResponse}),))
def hash_images() -> Any:
    return _hash_results(match=False)


@operation(bp, "/v1/match", "POST", operation_id="match_images", access=Access.API_KEY,
           summary="The hash-bank entries uploads match, nothing recorded",
           body=Body({"multipart/form-data": MULTIPART, "application/json": ModerateJSON}),
           answers=(Answer(200, "One result per upload",
                           {"application/json": UploadHashesResponse}),))
def match_images() -> Any:
    return _hash_results(match=True)


# --- the dashboard page ------------------------------------------------------------------------


@pages.bp.get("/dashboard/banks")
@reader_page_required
def banks_page() -> Any:
    """Every bank, and the first hashes of each (20; the API pages through all)."""
    banks = bank_store().banks()
    recent = [h for b in banks for h in bank_store().hashes(b.name, limit=20).hashes]
    return pages.page(render_template("banks.html", banks=banks, recent=recent,
                                      when=pages.when))
