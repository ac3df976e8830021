"""Hash banks through the app: an image added to a block-bank is blocked on re-upload (and a
recompressed copy too), the decision names the bank and distance; an allow-bank clears a
classifier flag; a second replica sees a bank change; import and export round-trip byte for
byte; bad hashes and bad CSV rows are refused whole, naming the line."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from tests.service.conftest import ADMIN, READER

ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
READER_H = {"Authorization": f"Bearer {READER}"}


def photo(seed: int, red_corner: bool = False, quality: int = 92) -> bytes:
    """A noisy photo (PDQ quality high); ``red_corner``: the hand-made encoder, which reads
    the top-left pixel, sees a rifle (weapons: block)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((1600, 1200), Image.Resampling.BICUBIC)
    if red_corner:
        image.paste((255, 0, 0), (0, 0, 400, 300))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def moderate(client: FlaskClient, data: bytes, name: str = "a.jpg") -> dict[str, Any]:
    r = client.post("/v1/moderate", data={"image": [(io.BytesIO(data), name)], "id": [name]},
                    content_type="multipart/form-data")
    assert r.status_code == 200, r.get_data(as_text=True)
    result: dict[str, Any] = r.get_json()["results"][0]
    return result


def create(client: FlaskClient, name: str, action: str, **settings: Any) -> None:
    r = client.post("/v1/banks", json={"name": name, "action": action, **settings},
                    headers=ADMIN_H)
    assert r.status_code == 201, r.get_data(as_text=True)


def wait_for(check: Any, seconds: float = 5.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_an_image_in_a_block_bank_is_blocked_again_and_a_recompressed_copy_too(
        client: FlaskClient, app: Flask) -> None:
    original = photo(1)
    assert moderate(client, original)["action"] == "allow"
    create(client, "known-bad", "block")
    r = client.post("/v1/banks/known-bad/hashes", headers=ADMIN_H,
                    data={"image": [(io.BytesIO(original), "reported.jpg")]},
                    content_type="multipart/form-data")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json() == {"added": 2, "already_present": 0}  # its SHA-256 and its PDQ

    def blocked(data: bytes) -> dict[str, Any] | None:
        result = moderate(client, data)
        return result if result["action"] == "block" else None

    again = wait_for(lambda: blocked(original))
    assert again is not None, "the bank's change never reached the matcher"
    assert {m["kind"] for m in again["matches"]} == {"sha256", "pdq"}
    assert again["triggered"] == []  # the classifier saw nothing: the bank blocked it
    copy = blocked(photo(1, quality=40))  # recompressed: other bytes, a near PDQ
    assert copy is not None
    [pdq] = copy["matches"]
    assert pdq["bank"] == "known-bad" and pdq["kind"] == "pdq" and pdq["distance"] <= 31
    assert moderate(client, photo(2))["action"] == "allow"  # an unrelated photo

    app.extensions["decisions"][1].flush()
    page = client.get("/v1/decisions", headers=READER_H, query_string={"action": "block"})
    records = page.get_json()["decisions"]
    assert records and all(r["matches"] for r in records)
    assert records[0]["pdq"] and records[0]["pdq"][0]["quality"] >= 50
    # and the CSV export (moderation decisions export --format csv) says which bank blocked it
    import json

    from decisionlog import CSV_COLUMNS
    from decisionlog.store import DecisionStore

    store: DecisionStore = app.extensions["decisions"][0]
    rows = [dict(zip(CSV_COLUMNS, store.get(r["id"]).csv_row(), strict=True))  # type: ignore[union-attr]
            for r in records]
    assert all({m["bank"] for m in json.loads(row["matches"])} == {"known-bad"} for row in rows)


def test_an_allow_bank_clears_a_classifier_flag_and_a_decision_feeds_it(
        client: FlaskClient, app: Flask) -> None:
    image = photo(3, red_corner=True)
    first = moderate(client, image)
    assert first["action"] == "block" and first["triggered"] == ["weapons"]
    app.extensions["decisions"][1].flush()
    create(client, "known-good", "allow")
    r = client.post("/v1/banks/known-good/hashes", headers=ADMIN_H,
                    json={"decision_id": first["decision_id"], "note": "a museum piece"})
    assert r.status_code == 200, r.get_data(as_text=True)
    cleared = wait_for(lambda: (lambda x: x if x["action"] == "allow" else None)(
        moderate(client, image)))
    assert cleared is not None
    assert cleared["triggered"] == ["weapons"]  # what the classifier said, kept
    assert {m["bank"] for m in cleared["matches"]} == {"known-good"}
    assert cleared["matches"][0]["note"] == "a museum piece"


def test_a_second_replica_sees_a_bank_change(make_app: Any) -> None:
    one, two = make_app(), make_app()  # one log, two apps: two replicas
    image = photo(4)
    create(one.test_client(), "spam", "review")
    client_two = two.test_client()
    assert moderate(client_two, image)["action"] == "allow"
    r = one.test_client().post("/v1/banks/spam/hashes", headers=ADMIN_H,
                               data={"image": [(io.BytesIO(image), "x.jpg")]},
                               content_type="multipart/form-data")
    assert r.status_code == 200
    started = time.monotonic()
    seen = wait_for(lambda: moderate(client_two, image)["action"] == "review")
    assert seen, "the other replica never saw the hash"
    assert time.monotonic() - started < 5


def test_import_and_export_round_trip_byte_for_byte_and_bad_rows_name_their_line(
        client: FlaskClient) -> None:
    create(client, "shared", "flag")
    rng = np.random.default_rng(5)
    rows = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(5)]
    text = "".join(f"{h}\n" for h in rows)
    r = client.post("/v1/banks/shared/import", json={"format": "csv", "text": text},
                    headers=ADMIN_H)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["added"] == 5
    exported = client.get("/v1/banks/shared/export", headers=READER_H,
                          query_string={"format": "csv"})
    assert exported.status_code == 200 and exported.mimetype == "text/csv"
    create(client, "copy", "flag")
    r = client.post("/v1/banks/copy/import", headers=ADMIN_H,
                    json={"format": "csv", "text": exported.get_data(as_text=True)})
    assert r.status_code == 200, r.get_data(as_text=True)
    again = client.get("/v1/banks/copy/export", headers=READER_H,
                       query_string={"format": "csv"})
    assert again.get_data() == exported.get_data()
    jsonl = client.get("/v1/banks/shared/export", headers=READER_H,
                       query_string={"format": "jsonl"})
    assert jsonl.mimetype == "application/x-ndjson" and len(jsonl.get_data().splitlines()) == 5

    bad = text + "not-a-hash\n" + rows[0][:-1] + "\n"
    r = client.post("/v1/banks/copy/import", json={"format": "csv", "text": bad},
                    headers=ADMIN_H)
    assert r.status_code == 422, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == "invalid_hashes"
    assert any("line 6" in f for f in error["faults"]) and any(
        "line 7" in f for f in error["faults"])
    listed = client.get("/v1/banks/copy", headers=READER_H).get_json()
    assert listed["hashes"] == 5  # nothing half-imported

    r = client.post("/v1/banks/copy/hashes", json={"hashes": [{"hash": "zz"}]},
                    headers=ADMIN_H)
    assert r.status_code == 400 and "hash" in r.get_json()["error"]["message"]
    r = client.post("/v1/banks/copy/hashes", json={"hashes": [{"kind": "sha256",
                                                               "hash": "0" * 64}]},
                    headers=ADMIN_H)  # well-formed: added
    assert r.status_code == 200 and r.get_json()["added"] == 1


def test_hash_and_match_record_nothing(client: FlaskClient, app: Flask) -> None:
    image = photo(6)
    r = client.post("/v1/hash", data={"image": [(io.BytesIO(image), "x.jpg")]},
                    content_type="multipart/form-data")
    assert r.status_code == 200, r.get_data(as_text=True)
    [result] = r.get_json()["results"]
    assert len(result["sha256"]) == 64 and len(result["frames"][0]["pdq"]) == 64
    create(client, "b", "block")
    client.post("/v1/banks/b/hashes", headers=ADMIN_H,
                json={"hashes": [{"kind": "pdq", "hash": result["frames"][0]["pdq"]}]})
    found = wait_for(lambda: client.post(
        "/v1/match", data={"image": [(io.BytesIO(image), "x.jpg")]},
        content_type="multipart/form-data").get_json()["results"][0]["matches"])
    assert found and found[0]["bank"] == "b" and found[0]["distance"] == 0
    app.extensions["decisions"][1].flush()
    assert client.get("/v1/decisions", headers=READER_H).get_json()["decisions"] == []


def test_bank_writes_need_the_admin_and_names_are_checked(client: FlaskClient) -> None:
    r = client.post("/v1/banks", json={"name": "x", "action": "block"}, headers=READER_H)
    assert r.status_code in (401, 403)
    r = client.post("/v1/banks", json={"name": "Bad Name!", "action": "block"},
                    headers=ADMIN_H)
    assert r.status_code == 400, r.get_data(as_text=True)
    create(client, "once", "block")
    r = client.post("/v1/banks", json={"name": "once", "action": "block"}, headers=ADMIN_H)
    assert r.status_code == 409
    assert client.get("/v1/banks/nope", headers=READER_H).status_code == 404


def test_a_reviewers_verdict_adds_to_a_bank_and_another_replica_matches_next(
        make_app: Any) -> None:
    """An image goes to review (the hand-made encoder reads a purple corner: between a gun
    and a toy gun); the reviewer confirms it and puts it in a block-bank; the next upload of
    it, to another replica, is blocked by the bank."""
    one = make_app(REVIEWERS="ann:ann-token", AUDIT_RATE="0")
    two = make_app(REVIEWERS="ann:ann-token", AUDIT_RATE="0")
    rng = np.random.default_rng(8)
    image = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize(
        (1600, 1200), Image.Resampling.BICUBIC)
    image.paste((128, 0, 128), (0, 0, 400, 300))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = buffer.getvalue()
    client = one.test_client()
    first = moderate(client, data)
    assert first["action"] == "review", first
    one.extensions["decisions"][1].flush()
    create(client, "confirmed", "block")
    ann = {"Authorization": "Bearer ann-token"}
    item = client.post("/v1/reviews/claim", headers=ann).get_json()
    assert item["decision_id"] == first["decision_id"]
    r = client.post(f"/v1/reviews/{item['item_id']}", headers=ann,
                    json={"violations": ["weapons"], "add_to_bank": "nope"})
    assert r.status_code == 404  # an unknown bank: nothing recorded
    r = client.post(f"/v1/reviews/{item['item_id']}", headers=ann,
                    json={"violations": ["weapons"], "add_to_bank": "confirmed"})
    assert r.status_code == 201, r.get_data(as_text=True)
    assert client.get("/v1/banks/confirmed", headers=READER_H).get_json()["hashes"] == 2
    blocked = wait_for(lambda: (lambda x: x if x["action"] == "block" else None)(
        moderate(two.test_client(), data)))
    assert blocked is not None and blocked["matches"][0]["bank"] == "confirmed"
    assert blocked["matches"][0]["source"] == f"decision:{first['decision_id']}"


def test_a_lists_dry_run_counts_the_past_uploads_it_would_have_changed(
        client: FlaskClient, app: Flask) -> None:
    """Three past uploads, two of them the same photo (one recompressed) and one another:
    a list holding the photo's PDQ would have blocked two."""
    for data, name in ((photo(11), "a"), (photo(11, quality=50), "b"), (photo(12), "c")):
        assert moderate(client, data, name)["action"] == "allow"
    app.extensions["decisions"][1].flush()
    r = client.post("/v1/hash", data={"image": [(io.BytesIO(photo(11)), "x.jpg")]},
                    content_type="multipart/form-data")
    pdq = r.get_json()["results"][0]["frames"][0]["pdq"]
    create(client, "candidate", "block")
    r = client.post("/v1/banks/candidate/dry-run", headers=ADMIN_H,
                    json={"text": f"{pdq},,,mine,spam\n", "since": "1h"})
    assert r.status_code == 200, r.get_data(as_text=True)
    report = r.get_json()
    assert report["hashes"] == 1 and report["decisions"] == 3
    assert report["matched"] == 2 and report["changed"] == 2
    assert report["by_change"] == {"allow->block": 2} and len(report["examples"]) == 2
    assert client.get("/v1/banks/candidate", headers=READER_H).get_json()["hashes"] == 0
    r = client.post("/v1/banks/candidate/dry-run", headers=ADMIN_H, json={"text": "zz\n"})
    assert r.status_code == 422 and "line 1" in r.get_data(as_text=True)


def test_the_banks_page_lists_banks_and_their_hashes(client: FlaskClient) -> None:
    assert client.get("/dashboard/banks").status_code == 401
    page = client.get("/dashboard/banks", headers=READER_H)
    assert page.status_code == 200 and 'id="no-banks"' in page.get_data(as_text=True)
    create(client, "spam-memes", "review", description="a brigade's memes")
    client.post("/v1/banks/spam-memes/hashes", headers=ADMIN_H,
                json={"hashes": [{"hash": "ab" * 32, "note": "from a report"}]})
    html = client.get("/dashboard/banks", headers=READER_H).get_data(as_text=True)
    assert 'data-bank="spam-memes"' in html and "a brigade&#39;s memes" in html
    assert "abababababababab…" in html and "from a report" in html
