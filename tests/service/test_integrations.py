"""Platform hooks, tested against their contracts as the platforms' documentation states
them (pict-rs does not install here): pict-rs's external validation posts the upload's bytes
with its Content-Type and stores the upload on any 2xx, refuses it on anything else."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from tests.fakes import GREY, PURPLE, RED, image_bytes
from tests.service.conftest import READER

READER_H = {"Authorization": f"Bearer {READER}"}


def pict_rs(client: Any, data: bytes, content_type: str = "image/png") -> Any:
    """The request pict-rs sends (media.external_validation): the bytes, their type."""
    return client.post("/v1/integrations/pict-rs", data=data, content_type=content_type)


def test_an_allowed_upload_is_accepted_and_a_blocked_one_refused_with_a_reason(
        app: Flask) -> None:
    client = app.test_client()
    r = pict_rs(client, image_bytes(GREY))
    assert r.status_code == 200 and r.get_json()["accept"] is True
    r = pict_rs(client, image_bytes(RED, "JPEG"), "image/jpeg")
    assert r.status_code == 422
    body = r.get_json()
    assert body == {"error": {"code": "rejected", "message": "block (weapons)"},
                    "action": "block", "decision_id": body["decision_id"]}
    app.extensions["decisions"][1].flush()
    record = client.get(f"/v1/decisions/{body['decision_id']}", headers=READER_H).get_json()
    assert record["client_id"] == "pict-rs" and record["action"] == "block"


def test_review_is_accepted_and_queued_or_rejected_as_the_settings_say(make_app: Any) -> None:
    accepting = make_app().test_client()
    r = pict_rs(accepting, image_bytes(PURPLE))
    assert r.status_code == 200 and "queued for review" in r.get_json()["reason"]
    rejecting = make_app(INTEGRATION_REVIEW="reject").test_client()
    r = pict_rs(rejecting, image_bytes(PURPLE))
    assert r.status_code == 422
    assert r.get_json()["error"]["message"].startswith("held for review")


def test_a_file_the_decoder_refuses_is_a_decision_not_a_failure(make_app: Any) -> None:
    client = make_app(INTEGRATION_FAIL_MODE="open").test_client()
    r = pict_rs(client, b"\x89PNG\r\n\x1a\nnot really", "image/png")
    assert r.status_code == 422  # refused even failing open: the file is bad, not the service
    assert r.get_json()["error"]["message"].startswith("not an accepted file: corrupt_image")
    assert pict_rs(client, b"").status_code == 422


@pytest.mark.parametrize(("mode", "status", "accept"), [("open", 200, True),
                                                        ("closed", 503, False)])
def test_when_the_service_cannot_decide_the_fail_mode_does(
        make_app: Any, monkeypatch: pytest.MonkeyPatch, mode: str, status: int,
        accept: bool) -> None:
    app = make_app(INTEGRATION_FAIL_MODE=mode)
    encoder = app.extensions["moderation"].current().encoder

    def broken(images: Any) -> Any:
        raise RuntimeError("the model is gone")

    monkeypatch.setattr(encoder, "encode_images", broken)
    r = pict_rs(app.test_client(), image_bytes(GREY))
    assert r.status_code == status, r.get_data(as_text=True)
    body = r.get_json()
    reason = body["reason"] if accept else body["error"]["message"]
    assert body.get("accept", False) is accept and f"fail {mode}" in reason
    assert accept or body["error"]["code"] == "undecided"
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'moderation_integration_answers_total{answer="' in metrics and 'by="failure"' in (
        metrics)


def test_a_bad_integration_setting_is_refused_at_start(make_app: Any) -> None:
    from service.settings import SettingsError

    with pytest.raises(SettingsError):
        make_app(INTEGRATION_FAIL_MODE="sideways")
    with pytest.raises(SettingsError, match="flag, review, block"):
        make_app(INTEGRATION_REJECT="block,burn")


# --- moderation check: what matrix-content-scanner runs per file ------------------------------


def check(url: str, path: Any, *extra: str) -> Any:
    from click.testing import CliRunner

    from moderation.cli import main

    return CliRunner().invoke(main, ["check", str(path), "--url", url, *extra])


def test_moderation_check_exits_by_the_decision_with_one_line_why(app: Flask,
                                                                   tmp_path: Any) -> None:
    from tests.service.test_dashboard_browser import serving

    (tmp_path / "ok.png").write_bytes(image_bytes(GREY))
    (tmp_path / "gun.png").write_bytes(image_bytes(RED))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with serving(app) as url:
        ok = check(url, tmp_path / "ok.png")
        assert ok.exit_code == 0 and ok.output.strip() == "allow"
        gun = check(url, tmp_path / "gun.png")
        assert gun.exit_code == 1 and gun.output.strip() == "block (weapons)"
        bad = check(url, tmp_path / "bad.png")
        assert bad.exit_code == 1 and bad.output.startswith("not an accepted file")
        flagged = check(url, tmp_path / "gun.png", "--reject", "flag")  # block not listed
        assert flagged.exit_code == 0
        named = check(url, tmp_path / "gun.png", "--id", "mxc://example.org/AbC")
        assert named.exit_code == 1
    app.extensions["decisions"][1].flush()
    page = app.test_client().get("/v1/decisions", headers=READER_H,
                                 query_string={"client_id": "mxc://example.org/AbC"}).get_json()
    assert [d["action"] for d in page["decisions"]] == ["block"]


def test_moderation_check_without_a_service_follows_the_fail_mode(tmp_path: Any) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    (tmp_path / "x.png").write_bytes(image_bytes(GREY))
    closed = check(url, tmp_path / "x.png", "--timeout", "2")
    assert closed.exit_code == 2 and "fail closed" in closed.output
    opened = check(url, tmp_path / "x.png", "--fail-mode", "open", "--timeout", "2")
    assert opened.exit_code == 0 and "fail open" in opened.output


def test_moderation_check_waits_for_a_long_videos_job(make_app: Any, tmp_path: Any) -> None:
    """A video the service answers with a job (202) is decided when its job is done, not
    failed for want of a result."""
    pytest.importorskip("av")
    from tests.fakes import video_bytes
    from tests.service.test_dashboard_browser import serving

    (tmp_path / "long.mp4").write_bytes(video_bytes([GREY, RED, RED]))
    app = make_app(VIDEO_INLINE_MAX_S="1")
    with serving(app) as url:
        checked = check(url, tmp_path / "long.mp4", "--timeout", "60")
    assert checked.exit_code == 1 and checked.output.strip() == "block (weapons)"


def test_the_timeout_bounds_the_whole_call_and_must_be_finite(tmp_path: Any) -> None:
    import socket
    import threading
    import time

    from moderation.client import ModerationClient

    with pytest.raises(ValueError, match="timeout"):
        ModerationClient(timeout=float("inf"))
    (tmp_path / "x.png").write_bytes(image_bytes(GREY))
    assert check("http://127.0.0.1:9", tmp_path / "x.png", "--timeout", "inf").exit_code == 2

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def drip() -> None:  # an answer that never ends: a byte every 0.3 s
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{")
        while not stop.wait(0.3):
            try:
                conn.sendall(b" ")
            except OSError:
                return
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    started = time.monotonic()
    checked = ModerationClient(f"http://127.0.0.1:{server.getsockname()[1]}",
                               timeout=1.0).check(b"x", client_id="drip")
    stop.set()
    server.close()
    assert checked.failed and not checked.accept  # failing closed
    assert time.monotonic() - started < 2.5


def test_a_long_client_id_is_cut_not_refused(app: Flask) -> None:
    from moderation.client import ModerationClient
    from tests.service.test_dashboard_browser import serving

    long_id = "mxc://" + "s" * 200 + "/media by @" + "u" * 100 + ":server\x00"
    with serving(app) as url:
        checked = ModerationClient(url).check(image_bytes(RED), client_id=long_id)
    assert not checked.failed and checked.reason == "block (weapons)"
    assert checked.result is not None and checked.result["id"] == long_id[:256]
