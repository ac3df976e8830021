"""The Matrix hooks, run for real: a Synapse on loopback with ``platforms.synapse`` loaded, a
matrix-nio client uploading to it, and matrix-content-scanner in front of it running
``moderation check``, all against the service's test app (a red image is blocked as weapons,
a grey one allowed) served on a port chosen before Synapse starts: each test serves its own
app there, or nothing (the service stopped).

Slow (two virtual environments from the registry: Synapse, matrix-nio and this repo's
``[synapse]`` extra without torch; matrix-content-scanner): runs where
MODERATION_TEST_PLATFORMS=1 (.ci/services sets it), skipped elsewhere."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from tests.fakes import GREY, RED, image_bytes
from tests.platforms.conftest import ADMIN
from tests.platforms.matrix_env import (
    MCS_REQUIREMENTS,
    SYNAPSE_REQUIREMENTS,
    ContentScanner,
    Synapse,
    free_port,
    make_venv,
    run_client,
    serve_on,
    start_content_scanner,
    start_synapse,
    stop,
)

pytestmark = [pytest.mark.server, pytest.mark.skipif(
    os.environ.get("MODERATION_TEST_PLATFORMS") != "1",
    reason="set MODERATION_TEST_PLATFORMS=1 (.ci/services does) to install and run Synapse "
           "and matrix-content-scanner")]

ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}


@dataclass(frozen=True)
class Venvs:
    synapse: Path  # matrix-synapse, matrix-nio, this repo with [synapse]
    scanner: Path  # matrix-content-scanner
    seconds: dict[str, float]


@pytest.fixture(scope="module")
def venvs(tmp_path_factory: pytest.TempPathFactory) -> Venvs:
    """Built in a temporary folder, or kept in MODERATION_TEST_MATRIX_VENVS (built there when
    missing) to iterate without installing again."""
    kept = os.environ.get("MODERATION_TEST_MATRIX_VENVS")
    folder = Path(kept) if kept else tmp_path_factory.mktemp("venvs")
    with ThreadPoolExecutor(2) as pool:  # the two installs side by side
        synapse = pool.submit(make_venv, folder / "synapse", *SYNAPSE_REQUIREMENTS)
        scanner = pool.submit(make_venv, folder / "scanner", *MCS_REQUIREMENTS)
        seconds = {"synapse": synapse.result(), "scanner": scanner.result()}
    print(f"venvs installed in {seconds}")
    return Venvs(folder / "synapse", folder / "scanner", seconds)


@pytest.fixture(scope="module")
def service_port() -> int:
    """Where the service is when a test serves it (:func:`service`): Synapse and the
    scanner's script point there."""
    return free_port()


@pytest.fixture
def service(app: Flask, service_port: int) -> Iterator[str]:
    with serve_on(app, service_port) as url:
        yield url


#: The module's timeout (seconds): a hung service holds an upload this long.
TIMEOUT = 3


def started_synapse(venvs: Venvs, folder: Path, port: int, **config: Any) -> Iterator[Synapse]:
    synapse = start_synapse(venvs.synapse, folder, {
        "url": f"http://127.0.0.1:{port}", "timeout": TIMEOUT, **config})
    try:
        yield synapse
    finally:
        stop(synapse.process)


@pytest.fixture(scope="module")
def synapse(venvs: Venvs, service_port: int,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    yield from started_synapse(venvs, tmp_path_factory.mktemp("synapse"), service_port,
                               fail_mode="closed")


@pytest.fixture(scope="module")
def synapse_failing_open(venvs: Venvs, service_port: int,
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    yield from started_synapse(venvs, tmp_path_factory.mktemp("synapse-open"), service_port,
                               fail_mode="open")


@pytest.fixture(scope="module")
def scanner(venvs: Venvs, synapse: Synapse, service_port: int,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContentScanner]:
    """matrix-content-scanner in front of :func:`synapse`. Its ``scan.script`` is called with
    the file's path alone, so a wrapper gives ``moderation check`` its options; the reason it
    prints goes to stderr, which the scanner logs when the scan fails."""
    folder = tmp_path_factory.mktemp("mcs")
    script = folder / "moderation-check.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'exec {venvs.synapse / "bin" / "moderation"} check "$1" '
        f"--url http://127.0.0.1:{service_port} --fail-mode closed --timeout 10 1>&2\n")
    script.chmod(0o755)
    mcs = start_content_scanner(venvs.scanner, folder / "run", synapse.base, script)
    try:
        yield mcs
    finally:
        stop(mcs.process)


def decisions(service: str, app: Flask, **query: str) -> list[dict[str, Any]]:
    """The decision log's records matching ``query``, once the recorder has flushed."""
    app.extensions["decisions"][1].flush()
    page = requests.get(f"{service}/v1/decisions", params={"limit": "100", **query},
                        headers=ADMIN_H, timeout=10)
    assert page.status_code == 200, page.text
    found: list[dict[str, Any]] = page.json()["decisions"]
    return found


def module_lines(synapse: Synapse, needle: str) -> list[str]:
    """Synapse's log lines from the module that contain ``needle`` (the log is written as
    requests finish: waits up to 5 s for one)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in synapse.log_text().splitlines()
                 if " platforms.synapse " in line and needle in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_the_synapse_venv_has_the_module_and_the_check_command_without_torch(
        venvs: Venvs) -> None:
    python = str(venvs.synapse / "bin" / "python")
    assert subprocess.run([str(venvs.synapse / "bin" / "moderation"), "check", "--help"],
                          capture_output=True).returncode == 0
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    # a bad config stops Synapse at start, every fault in one error
    bad = subprocess.run([python, "-c", (
        "from platforms.synapse import ModerationModule as M\n"
        "M.parse_config({'url': 'ftp://x', 'timeout': 0, 'fail_mode': 'maybe', 'colour': 1,"
        " 'unrecognised': 'perhaps'})")], capture_output=True, text=True)
    assert "ConfigError" in bad.stderr, bad.stderr
    for fault in ("unknown key 'colour'", "url must be", "timeout must be",
                  "fail mode must be open or closed", "unrecognised must be"):
        assert fault in bad.stderr
    # what a refusal by the decoder means: only "not media at all" is `unrecognised`
    verdicts = subprocess.run([python, "-c", (
        "from platforms.synapse import parse_settings\n"
        "for setting in ('accept', 'reject'):\n"
        "    policy = parse_settings({'url': 'http://x', 'unrecognised': setting}).policy\n"
        "    print(setting, [policy.of_refusal(code, '').accept\n"
        "                    for code in ('unsupported_format', 'corrupt_image', 'empty')])\n"
        "settings = parse_settings({'url': 'http://x', 'unrecognised': 'reject'})\n"
        "print('preview', settings.client(url_preview=True).policy.of_refusal(\n"
        "    'unsupported_format', '').accept)")],
        capture_output=True, text=True)
    assert verdicts.stdout.splitlines() == [
        "accept [True, False, False]", "reject [False, False, False]", "preview True"
    ], verdicts.stderr


def test_synapse_refuses_a_blocked_upload_and_stores_an_allowed_one(
        venvs: Venvs, synapse: Synapse, service: str, app: Flask) -> None:
    red, grey = image_bytes(RED), image_bytes(GREY)
    refused, stored = run_client(venvs.synapse, synapse.base, "alice",
                                 [(red, False), (grey, False)])

    assert refused["error"] == {"errcode": "M_UNKNOWN", "message": "Bad content"}
    assert base64.b64decode(stored["downloaded"]) == grey
    user = stored["user_id"]
    [allowed] = decisions(service, app, client_id=f"{stored['content_uri']} by {user}")
    assert allowed["action"] == "allow"
    [blocked] = [d for d in decisions(service, app, action="block")
                 if d["client_id"].startswith("mxc://localhost/")
                 and d["client_id"].endswith(f" by {user}")]
    assert blocked["image"]["sha256"] == hashlib.sha256(red).hexdigest()
    [line] = module_lines(synapse, f"{blocked['client_id']} rejected")
    assert "block (weapons)" in line and blocked["id"] in line


def test_with_the_service_stopped_failing_closed_refuses_an_upload(
        venvs: Venvs, synapse: Synapse) -> None:
    [refused] = run_client(venvs.synapse, synapse.base, "bob", [(image_bytes(GREY), False)])
    assert refused["error"]["message"] == "Bad content"
    [line] = module_lines(synapse, f"by {refused['user_id']} rejected")
    assert "rejected without a decision (fail closed)" in line


def test_a_hung_service_times_out_and_fails_closed_while_synapse_answers_others(
        venvs: Venvs, synapse: Synapse, service_port: int) -> None:
    with socket.socket() as hung, ThreadPoolExecutor(1) as pool:
        hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hung.bind(("127.0.0.1", service_port))
        hung.listen(8)  # connections are made, and never answered
        upload = pool.submit(run_client, venvs.synapse, synapse.base, "erin",
                             [(image_bytes(GREY), False)])
        waits = []
        while not upload.done():  # the check waits in a thread: the reactor serves the rest
            started = time.monotonic()
            assert requests.get(f"{synapse.base}/_matrix/client/versions", timeout=5).ok
            waits.append(time.monotonic() - started)
            time.sleep(0.1)
        [refused] = upload.result()
    assert refused["error"]["message"] == "Bad content"
    [line] = module_lines(synapse, f"by {refused['user_id']} rejected")
    assert "rejected without a decision (fail closed)" in line and "timed out" in line
    # a blocked reactor would hold one of these for the whole TIMEOUT
    assert len(waits) >= 5 and max(waits) < TIMEOUT / 2, waits


def test_with_the_service_stopped_failing_open_stores_an_upload(
        venvs: Venvs, synapse_failing_open: Synapse) -> None:
    grey = image_bytes(GREY)
    [stored] = run_client(venvs.synapse, synapse_failing_open.base, "carol", [(grey, False)])
    assert base64.b64decode(stored["downloaded"]) == grey
    [line] = module_lines(synapse_failing_open, f"{stored['content_uri']} by")
    assert "accepted without a decision (fail open)" in line


def test_encrypted_uploads_pass_synapse_and_the_content_scanner_decides_after_decrypting(
        venvs: Venvs, synapse: Synapse, scanner: ContentScanner, service: str,
        app: Flask) -> None:
    red, grey = image_bytes(RED), image_bytes(GREY)
    uploads = run_client(venvs.synapse, synapse.base, "dave", [(red, True), (grey, True)])
    for upload in uploads:  # ciphertext: stored by Synapse, not recognisable as media
        assert "content_uri" in upload, upload
        [line] = module_lines(synapse, f"{upload['content_uri']} by")
        assert "accepted unchecked, not recognisable media" in line
        cid = f"{upload['content_uri']} by {upload['user_id']}"
        [record] = decisions(service, app, client_id=cid)
        assert record["action"] == "error" and record["error_code"] == "unsupported_format"

    red_upload, grey_upload = uploads
    # what a client in the room does before showing the file: ask the scanner
    dirty = requests.post(f"{scanner.base}/download_encrypted", timeout=30, json={
        "file": {**red_upload["keys"], "url": red_upload["content_uri"]}})
    assert dirty.status_code == 403, dirty.text
    assert dirty.json()["reason"] == "MCS_MEDIA_NOT_CLEAN"
    clean = requests.post(f"{scanner.base}/download_encrypted", timeout=30, json={
        "file": {**grey_upload["keys"], "url": grey_upload["content_uri"]}})
    assert clean.status_code == 200, clean.text
    assert clean.content == base64.b64decode(grey_upload["downloaded"])  # the ciphertext
    # the decrypted files were decided by the service (moderation check's client id)
    checked = {d["image"]["sha256"]: d["action"]
               for d in decisions(service, app, client_id="check")}
    assert checked == {hashlib.sha256(red).hexdigest(): "block",
                       hashlib.sha256(grey).hexdigest(): "allow"}
    assert "block (weapons)" in scanner.log_text()
