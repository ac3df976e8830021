"""The dashboard in a hostile browser: forms posted by another site, a state-changing GET, the
cookie kept away from /v1, a Secure cookie over https (and a proxy's word only when trusted),
token links that meet another signed-in identity, and the headers on every answer."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.security import TOKEN_COOKIE
from tests.fakes import PURPLE, RED, image_bytes
from tests.service.conftest import ADMIN, READER, moderate_images

ANN = "ann-token"
EVIL = {"Origin": "https://evil.example"}
SIBLING = {"Origin": "http://other.localhost"}
CROSS_SITE = {"Sec-Fetch-Site": "cross-site"}
SAME_SITE = {"Sec-Fetch-Site": "same-site"}
FOREIGN = [EVIL, SIBLING, CROSS_SITE, SAME_SITE, {"Origin": "null"},
           {"Origin": "http://localhost:8080"}]
OWN = [{}, {"Origin": "http://localhost"}, {"Origin": "http://LOCALHOST:80"},
       {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"},
       {"Origin": "null", "Sec-Fetch-Site": "same-origin"}]  # a form on a no-referrer page


@pytest.fixture
def review_app(make_app: Callable[..., Flask]) -> Flask:
    app = make_app(REVIEWERS=f"ann:{ANN}", AUDIT_RATE="0")
    moderate_images(app.test_client(), app, {"a": image_bytes(PURPLE), "b": image_bytes(PURPLE)})
    return app


def signed_in(app: Flask, token: str, path: str = "/dashboard") -> FlaskClient:
    """A browser holding the dashboard cookie for ``token`` (``path="/"``: as the first
    releases set it, for every route)."""
    client = app.test_client()
    client.set_cookie(TOKEN_COOKIE, token, path=path)
    return client


def refused(r: Any) -> bool:
    return r.status_code == 403 and r.get_json()["error"]["code"] == "cross_site_request"


def claimed(app: Flask) -> int:
    """Items held by a reviewer now."""
    return int(app.extensions["reviews"].counts()["queue"]["review"]["claimed"])


def verdicts(app: Flask) -> list[Any]:
    from decisionlog.reviews import VerdictFilters

    return list(app.extensions["reviews"].verdicts(VerdictFilters()))


# --- 1. state-changing requests from another origin --------------------------------------


@pytest.mark.parametrize("headers", FOREIGN)
def test_a_verdict_or_a_skip_posted_by_another_site_is_refused(review_app: Flask,
                                                               headers: dict[str, str]) -> None:
    item = review_app.extensions["reviews"].claim("ann")
    client = signed_in(review_app, ANN)
    for do in ("decide", "skip"):
        r = client.post(f"/dashboard/review/{item.item_id}", headers=headers,
                        data={"violation": ["weapons"], "do": do})
        assert refused(r), r.get_data(as_text=True)
        assert "another site" in r.get_json()["error"]["message"]
    assert verdicts(review_app) == []
    assert claimed(review_app) == 1  # still held
    assert review_app.extensions["reviews"].item(item.item_id).status == "claimed"


@pytest.mark.parametrize("headers", OWN)
def test_a_verdict_from_the_page_itself_or_a_script_is_taken(review_app: Flask,
                                                             headers: dict[str, str]) -> None:
    item = review_app.extensions["reviews"].claim("ann")
    r = signed_in(review_app, ANN).post(f"/dashboard/review/{item.item_id}", headers=headers,
                                        data={"violation": ["weapons"], "do": "decide"})
    assert r.status_code == 303, r.get_data(as_text=True)
    assert len(verdicts(review_app)) == 1


@pytest.mark.parametrize("headers", FOREIGN)
def test_the_lab_and_the_search_posted_by_another_site_are_refused(
        client: FlaskClient, app: Flask, headers: dict[str, str]) -> None:
    import io

    browser = signed_in(app, ADMIN)
    r = browser.post("/dashboard/lab", headers=headers, data={"policy": "name: x\n"})
    assert refused(r)
    r = browser.post("/dashboard/search", headers=headers, content_type="multipart/form-data",
                     data={"image": (io.BytesIO(image_bytes(RED)), "q.png")})
    assert refused(r)
    r = browser.post("/dashboard/sign-in", headers=headers, data={"token": READER})
    assert refused(r) and "Set-Cookie" not in r.headers
    # from the dashboard itself, the same posts work
    r = browser.post("/dashboard/lab", headers={"Origin": "http://localhost"},
                     data={"policy": "name: x\n"})
    assert r.status_code == 422 and "invalid_policy" in r.get_data(as_text=True)


@pytest.mark.parametrize("headers", [SAME_SITE, CROSS_SITE, EVIL])
def test_the_review_page_claims_nothing_for_another_site(review_app: Flask,
                                                         headers: dict[str, str]) -> None:
    """GET /dashboard/review claims an item: a sibling site's link or image cannot make a
    signed-in reviewer's browser claim one."""
    r = signed_in(review_app, ANN).get("/dashboard/review", headers=headers)
    assert refused(r)
    assert claimed(review_app) == 0
    r = signed_in(review_app, ANN).get("/dashboard/review", headers={"Sec-Fetch-Site": "none"})
    assert r.status_code == 200 and claimed(review_app) == 1


def test_other_pages_still_open_from_a_link(app: Flask) -> None:
    """Reading pages change nothing: a link from a sibling site (wiki, chat) still opens."""
    for path in ("/dashboard", "/dashboard/policies", "/dashboard/search", "/dashboard/lab"):
        r = signed_in(app, ADMIN).get(path, headers=SAME_SITE)
        assert r.status_code == 200, path


# --- 2. /v1 takes bearer tokens only ------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/decisions", "/v1/stats", "/v1/search?q=gun",
                                  "/v1/policy/versions", "/v1/quality", "/v1/reviews"])
def test_v1_refuses_the_dashboard_cookie_and_token_links(app: Flask, path: str) -> None:
    cookie = signed_in(app, READER, path="/").get(path)
    assert cookie.status_code == 401
    assert "?token= and the dashboard cookie are for /dashboard" in cookie.get_json()["error"][
        "message"]
    link = app.test_client().get(path + ("&" if "?" in path else "?") + f"token={READER}")
    assert link.status_code == 401
    bearer = app.test_client().get(path, headers={"Authorization": f"Bearer {READER}"})
    assert bearer.status_code == 200


def test_v1_reviewer_and_admin_routes_refuse_the_cookie(review_app: Flask) -> None:
    ann = signed_in(review_app, ANN, path="/")
    assert ann.post("/v1/reviews/claim").status_code == 401
    assert ann.post(f"/v1/reviews/claim?token={ANN}").status_code == 401
    admin = signed_in(review_app, ADMIN, path="/")
    assert admin.post("/v1/policy/reload").status_code == 401
    assert admin.post("/v1/policy/dry-run", json={"policy": "name: x"}).status_code == 401
    assert claimed(review_app) == 0
    r = review_app.test_client().post("/v1/reviews/claim", headers={"X-API-Key": ANN})
    assert r.status_code == 200


def test_the_cookie_is_only_sent_to_the_dashboard(app: Flask) -> None:
    r = app.test_client().get(f"/dashboard?token={READER}")
    cookie = r.headers["Set-Cookie"]
    assert "Path=/dashboard" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


# --- 3. Secure over https, a proxy's header only when trusted ---------------------------


def test_the_cookie_is_secure_over_https(app: Flask) -> None:
    over_https = app.test_client().get(f"/dashboard?token={READER}",
                                       base_url="https://localhost")
    assert "; Secure" in over_https.headers["Set-Cookie"]
    plain = app.test_client().get(f"/dashboard?token={READER}")
    assert "Secure" not in plain.headers["Set-Cookie"]


@pytest.mark.parametrize("proxies, secure", [(0, False), (1, True), (2, False)])
def test_x_forwarded_proto_only_from_the_proxies_configured(
        make_app: Callable[..., Flask], proxies: int, secure: bool) -> None:
    app = make_app(TRUSTED_PROXIES=proxies)
    r = app.test_client().get(f"/dashboard?token={READER}",
                              headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "1.2.3.4"})
    assert r.status_code == 200
    assert ("; Secure" in r.headers["Set-Cookie"]) is secure


def test_trusted_proxies_is_a_checked_setting(make_app: Callable[..., Flask]) -> None:
    from service.settings import SettingsError

    with pytest.raises(SettingsError, match="trusted_proxies"):
        make_app(TRUSTED_PROXIES=-1)


# --- 4. a token link never silently replaces another identity ---------------------------


def test_a_link_for_someone_else_asks_instead_of_replacing(review_app: Flask) -> None:
    reader = signed_in(review_app, READER)
    r = reader.get(f"/dashboard/review?token={ANN}")
    page = r.get_data(as_text=True)
    assert r.status_code == 409 and "Set-Cookie" not in r.headers
    assert re.search(r'id="signed-in">reader<', page)
    assert re.search(r'id="link-identity">reviewer ann<', page)
    assert claimed(review_app) == 0  # nothing done yet
    assert reader.get_cookie(TOKEN_COOKIE, path="/dashboard").value == READER
    assert 'href="/dashboard/review"' in page  # stay
    # the reader stays: the cookie still works, as the reader
    assert reader.get("/dashboard").status_code == 200
    # or switches, from the question page (same origin)
    switch = reader.post("/dashboard/sign-in", data={"token": ANN, "next": "/dashboard/review"},
                         headers={"Origin": "http://localhost"})
    assert switch.status_code == 303 and switch.headers["Location"] == "/dashboard/review"
    assert reader.get_cookie(TOKEN_COOKIE, path="/dashboard").value == ANN
    assert "Signed in as <b id=\"reviewer\">ann</b>" in reader.get("/dashboard/review").text


def test_sign_in_takes_known_tokens_and_dashboard_addresses_only(app: Flask) -> None:
    client = app.test_client()
    assert client.post("/dashboard/sign-in", data={"token": "guess"}).status_code == 401
    r = client.post("/dashboard/sign-in", data={"token": READER, "next": "https://evil.example/"})
    assert r.status_code == 303 and r.headers["Location"] == "/dashboard"


def test_a_link_with_the_same_token_or_over_a_stale_cookie_signs_in(app: Flask) -> None:
    same = signed_in(app, READER)
    assert same.get(f"/dashboard?token={READER}").status_code == 200
    stale = signed_in(app, "a-token-rotated-away")
    r = stale.get(f"/dashboard?token={READER}")
    assert r.status_code == 200 and stale.get_cookie(TOKEN_COOKIE, path="/dashboard").value \
        == READER


def test_a_link_followed_from_another_site_continues_from_this_one(review_app: Flask) -> None:
    """From another site a SameSite=Strict cookie is withheld: who is signed in cannot be
    seen, so the page is opened again from this origin (a refresh), and nothing is done."""
    r = review_app.test_client().get(f"/dashboard/review?token={ANN}&done=1", headers=CROSS_SITE)
    page = r.get_data(as_text=True)
    assert r.status_code == 200 and "Set-Cookie" not in r.headers
    assert f'http-equiv="refresh" content="0; url=/dashboard/review?token={ANN}&amp;done=1"' \
        in page
    assert claimed(review_app) == 0


def test_a_link_for_the_wrong_page_is_still_refused(review_app: Flask) -> None:
    r = signed_in(review_app, ANN).get(f"/dashboard/lab?token={READER}")
    assert r.status_code == 401 and "Set-Cookie" not in r.headers


# --- 5. headers on every answer ---------------------------------------------------------


def pages(review_app: Flask) -> dict[str, Any]:
    client = review_app.test_client()
    admin = {"Authorization": f"Bearer {ADMIN}"}
    return {
        "dashboard": client.get("/dashboard", headers=admin),
        "policies": client.get("/dashboard/policies", headers=admin),
        "search": client.get("/dashboard/search?q=a+gun&raw=true", headers=admin),
        "lab": client.post("/dashboard/lab", headers=admin, data={"policy": "name: x\n"}),
        "review": client.get("/dashboard/review", headers={"Authorization": f"Bearer {ANN}"}),
        "continue": client.get(f"/dashboard?token={READER}", headers=CROSS_SITE),
        "ask": signed_in(review_app, READER).get(f"/dashboard?token={ADMIN}"),
    }


def test_every_page_has_a_strict_policy_and_nothing_inline_without_its_nonce(
        review_app: Flask) -> None:
    for name, r in pages(review_app).items():
        assert r.mimetype == "text/html", name
        csp = r.headers["Content-Security-Policy"]
        nonce = re.search(r"script-src 'nonce-([^']+)'", csp)
        assert nonce is not None, (name, csp)
        assert f"style-src 'nonce-{nonce[1]}'" in csp
        for directive in ("default-src 'none'", "frame-ancestors 'none'", "base-uri 'none'",
                          "form-action 'self'", "img-src 'self' data:"):
            assert directive in csp, (name, directive)
        assert "unsafe-inline" not in csp
        html = r.get_data(as_text=True)
        assert re.search(r"<[^>]*\s(style|on[a-z]+)\s*=", html) is None, name
        for tag in re.findall(r"<(?:script|style)\b[^>]*>", html):
            assert f'nonce="{nonce[1]}"' in tag, (name, tag)
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"
    first, again = (review_app.test_client().get("/dashboard", headers={
        "Authorization": f"Bearer {READER}"}).headers["Content-Security-Policy"] for _ in "ab")
    assert first != again  # a fresh nonce per answer


def test_thumbnails_come_from_the_image_store_only(make_app: Callable[..., Flask]) -> None:
    for template, source in [("https://cdn.internal:8443/i/{client_id}",
                              "img-src 'self' data: https://cdn.internal:8443;"),
                             ("https://{client_id}.img.internal/", "img-src 'self' data: https:;"),
                             ("/images/{client_id}", "img-src 'self' data:;")]:
        app = make_app(IMAGE_URL_TEMPLATE=template)
        r = app.test_client().get("/dashboard", headers={"Authorization": f"Bearer {READER}"})
        assert source in r.headers["Content-Security-Policy"]


def test_json_and_other_answers_carry_the_headers_too(app: Flask) -> None:
    client = app.test_client()
    for r in (client.get("/v1/policy"), client.get("/v1/decisions"), client.get("/nowhere"),
              client.get("/metrics"), client.get("/openapi.json"),
              client.get("/dashboard")):  # the 401 of a page is JSON
        assert r.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"


# --- 6. the search page's CSV export ------------------------------------------------------


def test_the_search_page_exports_csv_with_its_cookie_and_no_formulas(app: Flask) -> None:
    """The page's export link stays on the dashboard (the cookie does not reach /v1/search),
    and a client id that would start a formula is neutralised."""
    import csv
    import io

    moderate_images(app.test_client(), app, {"=HYPERLINK(\"http://x\",\"y\")": image_bytes(RED),
                                             "@SUM(1)": image_bytes(RED), "-2": image_bytes(RED)})
    browser = signed_in(app, READER)
    page = browser.get("/dashboard/search?q=a+gun&raw=true").get_data(as_text=True)
    link = re.search(r'id="export" href="([^"]+)"', page)
    assert link is not None and link[1].startswith("/dashboard/search?")
    r = browser.get(link[1].replace("&amp;", "&"))
    assert r.status_code == 200 and r.mimetype == "text/csv"
    ids = {row["client_id"] for row in csv.DictReader(io.StringIO(r.get_data(as_text=True)))}
    assert ids == {"'=HYPERLINK(\"http://x\",\"y\")", "'@SUM(1)", "'-2"}


def test_the_api_search_csv_has_no_formulas(app: Flask) -> None:
    import csv
    import io

    moderate_images(app.test_client(), app, {"=1+1": image_bytes(RED), "+A1": image_bytes(RED),
                                             "plain": image_bytes(RED)})
    r = app.test_client().get("/v1/search", query_string={"q": "a gun", "raw": "true",
                                                          "format": "csv"},
                              headers={"Authorization": f"Bearer {READER}"})
    assert r.status_code == 200 and r.mimetype == "text/csv"
    ids = {row["client_id"] for row in csv.DictReader(io.StringIO(r.get_data(as_text=True)))}
    assert ids == {"'=1+1", "'+A1", "plain"}


# --- in a real browser --------------------------------------------------------------------


@pytest.fixture
def other_site(tmp_path: Any) -> Any:
    """Pages of another site on loopback: ``(folder, port)``; write files in the folder."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder = tmp_path / "other"
    folder.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, server.server_port
    server.shutdown()


@pytest.mark.browser
def test_in_chromium(make_app: Callable[..., Flask], other_site: Any) -> None:
    """Chromium, signed in as ann: an app on another port of the same host (same site, so
    the SameSite=Strict cookie goes along) posts a verdict and loads the claiming page: both
    refused. A token link for bob followed from another site passes through the continue
    page and asks; staying keeps ann; a link followed while signed out signs in."""
    from tests.service.test_dashboard_browser import CHROMIUM, open_page, serving

    if CHROMIUM is None:
        pytest.skip("no Chromium (.ci/run installs Debian's)")
    from playwright.sync_api import sync_playwright

    app = make_app(REVIEWERS=f"ann:{ANN},bob:bob-token", AUDIT_RATE="0")
    moderate_images(app.test_client(), app, {"a": image_bytes(PURPLE), "b": image_bytes(PURPLE)})
    folder, other_port = other_site
    problems: list[str] = []
    with serving(app) as served, sync_playwright() as p:
        browser, page = open_page(p, problems, height=700)
        assert page.goto(f"{served}/dashboard/review?token={ANN}").status == 200
        item = page.locator("#verdict").get_attribute("action")
        assert claimed(app) == 1
        (folder / "post.html").write_text(
            f'<form id="f" method="post" action="{served}{item}"><input name="do" value="decide">'
            '<input name="violation" value="weapons"></form>'
            '<script>document.getElementById("f").submit()</script>')
        with page.expect_navigation():
            page.goto(f"http://127.0.0.1:{other_port}/post.html")
        assert "cross_site_request" in page.content()
        assert verdicts(app) == []
        app.extensions["reviews"].release(int(item.rsplit("/", 1)[1]), "ann")
        (folder / "claim.html").write_text(f'<img src="{served}/dashboard/review">')
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(f"http://127.0.0.1:{other_port}/claim.html", wait_until="networkidle")
        assert f"{served}/dashboard/review" in requested  # sent, with the cookie: refused
        assert claimed(app) == 0

        # a link for bob, from another site (localhost is not 127.0.0.1's site)
        link = f"{served}/dashboard/review?token=bob-token"
        (folder / "link.html").write_text(f'<a id="go" href="{link}">review</a>')
        page.goto(f"http://localhost:{other_port}/link.html")
        page.click("#go")
        page.wait_for_selector("#conflict")  # after the continue page's refresh
        assert page.locator("#signed-in").inner_text() == "reviewer ann"
        assert page.locator("#link-identity").inner_text() == "reviewer bob"
        assert claimed(app) == 0
        page.click("#stay")
        assert page.locator("#reviewer").inner_text() == "ann"
        page.goto(f"http://localhost:{other_port}/link.html")
        page.click("#go")
        page.wait_for_selector("#conflict")
        page.click("#use-link")
        page.wait_for_selector("#reviewer")
        assert page.locator("#reviewer").inner_text() == "bob"
        browser.close()

        browser, page = open_page(p, problems, height=700)  # signed out
        page.goto(f"http://localhost:{other_port}/link.html")
        page.click("#go")
        page.wait_for_selector("#reviewer")
        assert page.locator("#reviewer").inner_text() == "bob"
        page.goto(f"{served}/dashboard/review")  # the cookie was set
        assert page.locator("#reviewer").inner_text() == "bob"
        browser.close()
    # the 403s above were asked for; nothing else went wrong (no CSP report among them)
    assert [m for m in problems if not m.startswith("Failed to load resource")] == []
