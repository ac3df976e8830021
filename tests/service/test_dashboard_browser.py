"""The dashboard in a real headless Chromium (Debian's, driven by Playwright: Playwright's own
browser download cannot work here). .ci/run installs Chromium; elsewhere the test is skipped
when no Chromium is found."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from decisionlog import DecisionRecord
from tests.service.conftest import ADMIN, READER

# drives a real Chromium: left out of the quick loop
pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("MODERATION_TEST_CHROMIUM") or shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def seed(app: Flask) -> str:
    """Two days of decisions under two policy versions; returns the new version."""
    store, _ = app.extensions["decisions"]
    active = app.extensions["moderation"].current()
    now = time.time()
    records = []
    for hour in range(40):
        version = "oldversion01" if hour < 25 else active.policy.version
        for i in range(6):
            flagged = (i + hour) % 4 == 0
            cats = {"weapons": {"score": 0.3, "similarity": 0.3, "threshold": 0.8,
                                "review_from": 0.6, "margin": 0.05 if flagged else -0.2,
                                "flagged": flagged, "action": "block" if flagged else "allow",
                                "top_terms": [{"text": "rifle", "similarity": 0.4}],
                                "closest_exception": None}}
            records.append(DecisionRecord(
                id=uuid.uuid4().hex, created_at=now - (40 - hour) * 3600 + i,
                client_id=f"upload-{hour}-{i}", image={"sha256": "0" * 64, "size": 100},
                policy={"name": "hand", "version": version}, model="fake/hand-made",
                profile="default", action="block" if flagged else "allow",
                triggered=["weapons"] if flagged else [], categories=cats, latency_ms=20.0))
    store.add_many(records)
    return active.policy.version


def open_page(playwright: Any, problems: list[str], height: int = 1400) -> tuple[Any, Any]:
    """Chromium and a page whose console errors and page errors go to ``problems``."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
    page = browser.new_page(viewport={"width": 1280, "height": height})
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return browser, page


@contextlib.contextmanager
def serving(app: Flask) -> Iterator[str]:
    """``app`` on loopback (werkzeug's threaded server) while the block runs: its address."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


@pytest.fixture
def served(app: Flask) -> Iterator[str]:
    with serving(app) as address:
        yield address


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (.ci/run installs Debian's)")
def test_dashboard_in_headless_chromium(app: Flask, served: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    version = seed(app)
    problems: list[str] = []
    with sync_playwright() as p:
        browser, page = open_page(p, problems)
        response = page.goto(f"{served}/dashboard?token={READER}")
        assert response is not None and response.status == 200
        assert page.locator("h1").inner_text().startswith("Moderation: policy")
        assert page.locator("svg#flag-rates polyline.rate").count() >= 1
        assert page.locator("svg#flag-rates line.policy-change").count() == 1
        assert version in page.locator("svg#flag-rates").inner_html()
        assert page.locator("table#latest tbody tr").count() == 20
        assert "rifle" in page.locator("table#latest").inner_text()
        assert page.locator("table#thresholds tbody tr").count() == 2
        assert "not enough verdicts yet" in page.locator("table#quality-table").inner_text()
        assert page.locator("#totals").inner_text().count("\n") >= 4
        shot = Path(os.environ.get("MODERATION_SCREENSHOT_DIR", tmp_path)) / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        page.reload()  # the cookie now carries the token
        assert page.locator("svg#flag-rates").count() == 1
        browser.close()
    assert problems == []
    assert shot.stat().st_size > 10_000


def moderate_colours(app: Flask, n: int = 40) -> None:
    """Real decisions, with their frame embeddings: n images of assorted colours."""
    import io

    import numpy as np

    from tests.fakes import image_bytes

    client = app.test_client()
    rng = np.random.default_rng(1)
    colours = [tuple(int(x) for x in rng.integers(0, 256, 3)) for _ in range(n)]
    for start in range(0, n, 10):
        batch = colours[start:start + 10]
        data = {"image": [(io.BytesIO(image_bytes(c)), f"{c}.png") for c in batch],
                "id": [f"upload-{start + i}" for i in range(len(batch))]}
        assert client.post("/v1/moderate", data=data).status_code == 200
    app.extensions["decisions"][1].flush()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (.ci/run installs Debian's)")
def test_policy_lab_and_history_in_headless_chromium(app: Flask, served: str, tmp_path: Path,
                                                     policy_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    moderate_colours(app)
    problems: list[str] = []
    shots = Path(os.environ.get("MODERATION_SCREENSHOT_DIR", tmp_path))
    with sync_playwright() as p:
        browser, page = open_page(p, problems)
        assert page.goto(f"{served}/dashboard/lab?token={READER}").status == 401  # admin only
        response = page.goto(f"{served}/dashboard/lab?token={ADMIN}")
        assert response is not None and response.status == 200
        text = page.locator("textarea#policy").input_value()
        assert text == policy_path.read_text()  # the active policy, as the log keeps it
        edited = text.replace("value: 0.8\n      review_from: 0.6", "value: 0.3")
        assert edited != text
        page.locator("textarea#policy").fill(edited)
        page.locator("input[name=since]").fill("1h")
        page.locator("button#run").click()
        page.wait_for_selector("#result")
        assert "weapons: threshold 0.8 → 0.3 (flags more)" in page.locator("#diff").inner_text()
        weapons = page.locator("table#categories tr[data-category=weapons] td")
        before, after = (int(weapons.nth(i).inner_text().split()[0]) for i in (1, 2))
        assert after > before
        rows = page.locator("table#changed tbody tr")
        assert 0 < rows.count() <= 20
        assert "40 decisions re-decided" in page.locator("#summary").inner_text()
        page.screenshot(path=str(shots / "policy-lab.png"), full_page=True)

        # a proposal that is not a policy: the faults, and the text kept in the form
        page.locator("textarea#policy").fill("name: x\n")
        page.locator("button#run").click()
        page.wait_for_selector("#error")
        assert "invalid_policy" in page.locator("#error").inner_text()
        assert page.locator("textarea#policy").input_value() == "name: x\n"

        # activate the edit, then the history shows what changed and its effect
        policy_path.write_text(edited)
        reload = app.test_client().post("/v1/policy/reload",
                                        headers={"Authorization": f"Bearer {ADMIN}"})
        assert reload.status_code == 200
        moderate_colours(app, 20)
        page.goto(f"{served}/dashboard/policies")  # the cookie carries the token
        sections = page.locator("section.activation")
        assert sections.count() == 2
        assert "weapons: threshold 0.8 → 0.3 (flags more)" in sections.nth(0).inner_text()
        assert "first activation" in sections.nth(1).inner_text()
        page.screenshot(path=str(shots / "policy-history.png"), full_page=True)
        browser.close()
    # (the 401 and the 422 above were asked for; a JSON error page has no favicon)
    assert [m for m in problems if not m.startswith("Failed to load resource")] == []


@pytest.fixture
def thumbnails(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A stand-in for the client's own image store: files of a folder, over HTTP."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder = tmp_path / "store"
    folder.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", folder
    finally:
        server.shutdown()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (.ci/run installs Debian's)")
def test_search_page_in_headless_chromium(make_app: Any, thumbnails: tuple[str, Path],
                                          tmp_path: Path) -> None:
    """Text → image, "more like this" and an uploaded image, with thumbnails from the
    client's store (MODERATION_IMAGE_URL_TEMPLATE)."""
    import io

    from playwright.sync_api import sync_playwright

    from tests.fakes import BLUE, GREEN, GREY, PURPLE, RED, animation_bytes, image_bytes

    store_url, folder = thumbnails
    app = make_app(IMAGE_URL_TEMPLATE=f"{store_url}/{{client_id}}")
    uploads = {"rifle.png": image_bytes(RED), "rifle-copy.png": image_bytes(RED),
               "toy.png": image_bytes(BLUE), "between.png": image_bytes(PURPLE),
               "beer.png": image_bytes(GREEN), "nothing.png": image_bytes(GREY),
               "clip.gif": animation_bytes(GREY, GREEN, RED)}
    for name, data in uploads.items():
        (folder / name).write_bytes(data)
    r = app.test_client().post("/v1/moderate", data={
        "image": [(io.BytesIO(b), n) for n, b in uploads.items()], "id": list(uploads)})
    assert r.status_code == 200
    app.extensions["decisions"][1].flush()
    query = tmp_path / "query.png"
    query.write_bytes(image_bytes(RED))
    problems: list[str] = []
    shots = Path(os.environ.get("MODERATION_SCREENSHOT_DIR", tmp_path))
    with serving(app) as served:
        with sync_playwright() as p:
            browser, page = open_page(p, problems, height=1000)
            assert page.goto(f"{served}/dashboard/search").status == 401  # reader only
            assert page.goto(f"{served}/dashboard/search?token={READER}").status == 200
            page.locator("input#q").fill("a gun")
            page.locator("input[name=raw]").check()
            page.locator("button#go").click()
            page.wait_for_selector("#result")
            rows = page.locator("table#hits tbody tr")
            assert rows.count() == len(uploads)
            # the rifles, and the animation by its red frame (frame 2), all at cosine 1
            best = {rows.nth(i).locator("td").nth(2).inner_text() for i in range(3)}
            assert best == {"rifle.png", "rifle-copy.png", "clip.gif (frame 2)"}
            assert "weapons" in rows.nth(0).inner_text()
            sims = [float(rows.nth(i).locator("td").nth(0).inner_text())
                    for i in range(rows.count())]
            assert sims == sorted(sims, reverse=True) and sims[0] == pytest.approx(1, abs=1e-3)
            page.wait_for_function(  # the thumbnails came from the client's store
                "[...document.querySelectorAll('img.thumb')].every(i => i.naturalWidth > 0)")
            assert page.locator("img.thumb").count() == len(uploads)
            page.screenshot(path=str(shots / "search-text.png"), full_page=True)

            # more like this: the rifle's re-upload first, the rifle itself left out
            rifle = page.locator("table#hits tbody tr", has_text="rifle.png").first
            rifle_id = rifle.get_attribute("data-decision")
            rifle.locator("a.more").click()
            page.wait_for_selector("#result")
            rows = page.locator("table#hits tbody tr")
            assert rows.nth(0).get_attribute("data-decision") != rifle_id
            best = {rows.nth(i).locator("td").nth(2).inner_text() for i in range(2)}
            assert best == {"rifle-copy.png", "clip.gif (frame 2)"}
            assert page.locator(f"tr[data-decision='{rifle_id}']").count() == 0

            # an uploaded image, filtered to blocked decisions
            page.goto(f"{served}/dashboard/search")  # the cookie carries the token
            page.locator("select[name=action]").select_option("block")
            page.locator("input#image").set_input_files(str(query))
            page.locator("button#go-image").click()
            page.wait_for_selector("#result")
            assert "like the uploaded image" in page.locator("#result h2").inner_text()
            rows = page.locator("table#hits tbody tr")
            assert rows.count() == 3  # the blocked ones: both rifles and the animation
            assert all(rows.nth(i).locator("td").nth(0).inner_text().startswith("1.000")
                       for i in range(3))
            assert page.locator("select[name=action]").input_value() == "block"
            page.screenshot(path=str(shots / "search-image.png"), full_page=True)

            # a bad filter: the error on the page, the form kept
            page.goto(f"{served}/dashboard/search?q=gun&since=last+week")
            assert "invalid_field" in page.locator("#error").inner_text()
            assert page.locator("input#q").input_value() == "gun"
            browser.close()
    assert [m for m in problems if not m.startswith("Failed to load resource")] == []


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (.ci/run installs Debian's)")
def test_review_page_driven_by_the_keyboard(make_app: Any, thumbnails: tuple[str, Path],
                                            tmp_path: Path) -> None:
    """A reviewer claims, sees the image and its scores, marks a category with its key,
    confirms with Enter, skips with s, and reaches the end of the queue; the verdicts are
    recorded as keyed. The same form also works as a plain post (no script)."""
    import io

    from playwright.sync_api import sync_playwright

    from tests.fakes import PURPLE, image_bytes

    store_url, folder = thumbnails
    app = make_app(REVIEWERS="ann:ann-token", AUDIT_RATE="0",
                   IMAGE_URL_TEMPLATE=f"{store_url}/{{client_id}}")
    uploads = {f"between-{i}.png": image_bytes(PURPLE) for i in range(3)}
    for name, data in uploads.items():
        (folder / name).write_bytes(data)
    r = app.test_client().post("/v1/moderate", data={
        "image": [(io.BytesIO(b), n) for n, b in uploads.items()], "id": list(uploads)})
    assert [x["action"] for x in r.get_json()["results"]] == ["review"] * 3
    app.extensions["decisions"][1].flush()
    problems: list[str] = []
    shots = Path(os.environ.get("MODERATION_SCREENSHOT_DIR", tmp_path))
    with serving(app) as served:
        with sync_playwright() as p:
            browser, page = open_page(p, problems, height=900)
            assert page.goto(f"{served}/dashboard/review").status == 401
            assert page.goto(f"{served}/dashboard/review?token={READER}").status == 401
            assert page.goto(f"{served}/dashboard/review?token=ann-token").status == 200
            problems.clear()  # the console's report of those 401s (and of their favicon)
            assert page.locator("#reviewer").inner_text() == "ann"
            first = page.locator("#decision-id").inner_text()
            page.wait_for_function("document.querySelector('img#image').naturalWidth > 0")
            assert "gun" in page.locator("table#scores").inner_text()  # the driving terms
            page.keyboard.press("1")  # weapons
            assert page.locator("#v-weapons").is_checked()
            page.screenshot(path=str(shots / "review.png"), full_page=True)
            page.keyboard.press("Enter")
            page.wait_for_selector("#done")
            assert "block" in page.locator("#done").inner_text().lower()
            second = page.locator("#decision-id").inner_text()
            assert second != first
            page.keyboard.press("2")  # alcohol, then cleared: nothing violated
            page.keyboard.press("0")
            page.keyboard.press("Enter")
            page.wait_for_selector("#done")
            third = page.locator("#decision-id").inner_text()
            page.keyboard.press("s")  # skip: back to the queue, and handed out again
            page.wait_for_load_state()
            assert page.locator("#decision-id").inner_text() == third
            page.locator("#note").fill("typed in the note: keys do not count here 1 s")
            page.keyboard.press("Enter")  # a new line in the note, no submit
            assert page.locator("#decision-id").inner_text() == third
            page.locator("#v-alcohol").check()
            page.locator("button#confirm").click()  # the mouse works too
            page.wait_for_selector("#empty")
            page.screenshot(path=str(shots / "review-empty.png"), full_page=True)
            browser.close()
    assert problems == []
    verdicts = app.test_client().get(
        "/v1/reviews", headers={"Authorization": f"Bearer {READER}"}).get_json()["verdicts"]
    by_decision = {v["decision_id"]: (v["violations"], v["action"]) for v in verdicts}
    assert by_decision == {first: (["weapons"], "block"), second: ([], "allow"),
                           third: (["alcohol"], "flag")}
    assert [v["note"] for v in verdicts if v["decision_id"] == third][0].startswith("typed")


def test_the_review_form_works_as_a_plain_post(make_app: Any) -> None:
    """No script: the form's own fields, posted, decide the item."""
    import io

    from tests.fakes import PURPLE, image_bytes

    app = make_app(REVIEWERS="ann:ann-token", AUDIT_RATE="0")
    client = app.test_client()
    client.post("/v1/moderate", data={"image": [(io.BytesIO(image_bytes(PURPLE)), "a.png")]})
    app.extensions["decisions"][1].flush()
    page = client.get("/dashboard/review?token=ann-token")
    assert page.status_code == 200 and 'name="violation" value="weapons"' in page.text
    item_id = app.extensions["reviews"].claim("ann").item_id  # the one the page showed
    answer = client.post(f"/dashboard/review/{item_id}",
                         data={"violation": ["weapons"], "note": "", "do": "decide"})
    assert answer.status_code == 303 and "done=" in answer.headers["Location"]
    assert "Nothing waits" in client.get(answer.headers["Location"]).text
    again = client.post(f"/dashboard/review/{item_id}", data={"do": "decide"})
    assert again.status_code == 409 and "already_decided" in again.text


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (.ci/run installs Debian's)")
def test_the_review_page_draws_the_crop_and_the_dashboard_a_videos_time(
        thumbnails: tuple[str, Path], tmp_path: Path) -> None:
    """A small marker found in a crop goes to review: the review page draws the crop's box
    over the image, where the marker is; a video decision's decided time and span are on the
    dashboard."""
    import copy
    import io

    import yaml
    from playwright.sync_api import sync_playwright

    from moderation import Moderator
    from moderation.policy import parse_policy
    from service.app import create_app
    from tests.fakes import MARKER_POLICY, MarkerEncoder, marker_photo

    data = copy.deepcopy(MARKER_POLICY)
    data["views"] = {"crops": "2x2", "overlap": 0.2, "min_side": 256}
    data["categories"]["marker"]["action"] = "review"
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    store_url, folder = thumbnails
    app = create_app(
        {"POLICY": str(path), "ADMIN_TOKEN": ADMIN, "READER_TOKEN": READER,
         "REVIEWERS": "ann:ann-token", "AUDIT_RATE": "0",
         "IMAGE_URL_TEMPLATE": f"{store_url}/{{client_id}}",
         "DATABASE_URL": f"sqlite:///{tmp_path / 'decisions.sqlite3'}"},
        moderator=Moderator(parse_policy(path.read_text()), MarkerEncoder()))
    photo = marker_photo()
    (folder / "photo.jpg").write_bytes(photo)
    r = app.test_client().post("/v1/moderate", data={"image": [(io.BytesIO(photo), "photo.jpg")],
                                                     "id": ["photo.jpg"]})
    [result] = r.get_json()["results"]
    assert result["action"] == "review", result
    box = result["categories"]["marker"]["view"]["box"]
    store, recorder = app.extensions["decisions"]
    recorder.flush()
    video = DecisionRecord(
        id=uuid.uuid4().hex, created_at=time.time(), client_id="clip.mp4",
        image={"sha256": "1" * 64, "size": 1000}, policy={"name": "markers", "version": "v"},
        model="fake/marker", profile="default", action="block", triggered=["marker"],
        categories={"marker": {
            "score": 0.3, "similarity": 0.3, "threshold": 0.07, "margin": 0.23,
            "flagged": True, "action": "block", "top_terms": [], "frame": 42,
            "view": {"frame": 42, "time": 12.5, "box": None}, "span": [11.0, 14.0]}},
        latency_ms=5.0)
    store.add_many([video])
    problems: list[str] = []
    shots = Path(os.environ.get("MODERATION_SCREENSHOT_DIR", tmp_path))
    with serving(app) as served, sync_playwright() as p:
        browser, page = open_page(p, problems, height=900)
        assert page.goto(f"{served}/dashboard?token={READER}").status == 200
        latest = page.locator("table#latest").inner_text()
        assert "frame 42 at 12.5 s" in latest and "crossed from 11.0 to 14.0 s" in latest
        page = browser.new_page(viewport={"width": 1280, "height": 900})  # ann's own session
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        assert page.goto(f"{served}/dashboard/review?token=ann-token").status == 200
        assert page.locator("#decision-id").inner_text() == result["decision_id"]
        page.wait_for_function("document.querySelector('img#image').naturalWidth > 0")
        crop = page.locator("#crop-box")
        crop.wait_for(state="visible")
        image_box, crop_box = page.locator("img#image").bounding_box(), crop.bounding_box()
        assert image_box is not None and crop_box is not None
        # the image is 1200x900, shown "contain"ed at the image element's width
        scale = min(image_box["width"] / 1200, image_box["height"] / 900)
        left = image_box["x"] + (image_box["width"] - 1200 * scale) / 2
        top = image_box["y"] + (image_box["height"] - 900 * scale) / 2
        assert crop_box["x"] == pytest.approx(left + box[0] * scale, abs=2)
        assert crop_box["y"] == pytest.approx(top + box[1] * scale, abs=2)
        assert crop_box["width"] == pytest.approx((box[2] - box[0]) * scale, abs=2)
        assert "crop (" in page.locator("#decided-view").inner_text()
        assert "crop (" in page.locator("table#scores").inner_text()
        page.screenshot(path=str(shots / "review-crop.png"), full_page=True)
        browser.close()
    assert problems == []
