"""What tests/platforms/test_matrix.py runs: virtual environments with Synapse (and this repo's
``[synapse]`` extra) and matrix-content-scanner, a Synapse on loopback with the module loaded,
a matrix-content-scanner in front of it, and the service's test app on a port chosen in
advance (so that a Synapse started once can be pointed at it while each test serves its own
app there, or nothing: the service stopped)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml
from flask import Flask
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[2]
SERVER_NAME = "localhost"

# matrix-content-scanner from 1.1 on builds a Rust extension whose crates come from crates.io
# and GitHub (no wheels on PyPI): 1.0.8 is the last one that installs from PyPI alone (it
# decrypts with mautrix and python-olm, whose wheels exist). Its mautrix[detect_mimetype] no
# longer brings python-magic (so: named here), and mautrix 0.21 needs base58, which nothing
# installs (so: below 0.21). python-magic needs libmagic1 from Debian.
MCS_REQUIREMENTS = ["matrix-content-scanner==1.0.8", "mautrix<0.21", "python-magic"]
#: Synapse comes with the [synapse] extra; no torch (the base install runs no model).
SYNAPSE_REQUIREMENTS = ["matrix-nio", "-e", f"{ROOT}[synapse]"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_venv(path: Path, *requirements: str) -> float:
    """A virtual environment at ``path`` with ``requirements`` (pip's arguments) installed:
    seconds it took (0 for one a previous call completed). Raises ``AssertionError`` with
    pip's output when pip fails."""
    if (path / "installed").exists():
        return 0.0
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    install = subprocess.run([str(path / "bin" / "pip"), "install", "-q", *requirements],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-4000:]
    (path / "installed").write_text(" ".join(requirements))
    return time.monotonic() - started


@contextmanager
def serve_on(app: Flask, port: int) -> Iterator[str]:
    """Serve ``app`` on loopback ``port`` until the block ends; yields its base URL."""
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name=f"app-{port}", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path,
                  timeout: float = 120) -> None:
    """Wait until ``url`` answers (any status); fail with ``log`` if the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n"
                                 + log.read_text(errors="replace")[-6000:])
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("not up in time:\n" + log.read_text(errors="replace")[-6000:])
        time.sleep(0.2)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 15 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@dataclass
class Synapse:
    base: str
    folder: Path
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def synapse_config(folder: Path, port: int, module_config: dict[str, Any]) -> dict[str, Any]:
    """A homeserver.yaml for a Synapse on loopback: SQLite, open registration without
    verification, no federation listener and no key servers, no rate limits that a test
    would hit, unauthenticated media endpoints on (matrix-content-scanner 1.0.8 downloads
    through them), and this module with ``module_config``."""
    unlimited = {"per_second": 1000, "burst_count": 1000}
    return {
        "server_name": SERVER_NAME,
        "pid_file": str(folder / "homeserver.pid"),
        "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"], "type": "http",
                       "tls": False, "x_forwarded": False,
                       "resources": [{"names": ["client"], "compress": False}]}],
        "database": {"name": "sqlite3", "args": {"database": str(folder / "homeserver.db")}},
        "media_store_path": str(folder / "media"),
        "signing_key_path": str(folder / "signing.key"),
        "macaroon_secret_key": secrets.token_hex(16),
        "form_secret": secrets.token_hex(16),
        "enable_registration": True,
        "enable_registration_without_verification": True,
        "report_stats": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "federation_domain_whitelist": [],
        "url_preview_enabled": False,
        "enable_authenticated_media": False,
        "rc_registration": unlimited,
        "rc_login": {"address": unlimited, "account": unlimited, "failed_attempts": unlimited},
        "rc_message": unlimited,
        "modules": [{"module": "platforms.synapse.ModerationModule", "config": module_config}],
    }


def launch(venv: Path, module: str, config: Path, log: Path, ready: str
           ) -> subprocess.Popen[bytes]:
    """``python -m module -c config`` from ``venv``, in the config's folder, its output in
    ``log``; returns once ``ready`` answers (stopped, and the error raised, if it never
    does)."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(venv / "bin" / "python"), "-m", module, "-c", str(config)],
            stdout=out, stderr=subprocess.STDOUT, cwd=config.parent)
    try:
        wait_until_up(ready, process, log)
    except BaseException:
        stop(process)
        raise
    return process


def start_synapse(venv: Path, folder: Path, module_config: dict[str, Any]) -> Synapse:
    """A Synapse (``venv``'s) running in ``folder`` with the module; up when this returns.
    Stop it with :func:`stop` on ``.process``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "homeserver.yaml"
    config.write_text(yaml.safe_dump(synapse_config(folder, port, module_config)))
    seed = base64.b64encode(os.urandom(32)).decode().rstrip("=")
    (folder / "signing.key").write_text(f"ed25519 a_test {seed}\n")
    log = folder / "synapse.log"
    base = f"http://127.0.0.1:{port}"
    process = launch(venv, "synapse.app.homeserver", config, log,
                     f"{base}/_matrix/client/versions")
    return Synapse(base, folder, process, log)


@dataclass
class ContentScanner:
    base: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_content_scanner(venv: Path, folder: Path, homeserver: str,
                          script: Path) -> ContentScanner:
    """matrix-content-scanner (``venv``'s) on loopback, downloading from ``homeserver`` and
    scanning with ``script`` (called with the path of the decrypted file); up when this
    returns. Exit 2 (``moderation check``: could not decide) is not cached."""
    (folder / "scan").mkdir(parents=True)
    port = free_port()
    config = folder / "mcs.yaml"
    config.write_text(yaml.safe_dump({
        "web": {"host": "127.0.0.1", "port": port},
        "scan": {"script": str(script), "temp_directory": str(folder / "scan")},
        "download": {"base_homeserver_url": homeserver},
        "crypto": {"pickle_path": str(folder / "mcs.pickle"), "pickle_key": "test-pickle-key"},
        "result_cache": {"exit_codes_to_ignore": [2]},
    }))
    log = folder / "mcs.log"
    base = f"http://127.0.0.1:{port}/_matrix/media_proxy/unstable"
    process = launch(venv, "matrix_content_scanner.mcs", config, log, f"{base}/public_key")
    return ContentScanner(base, process, log)


def run_client(venv: Path, homeserver: str, username: str,
               uploads: list[tuple[bytes, bool]]) -> list[dict[str, Any]]:
    """Register ``username`` with matrix-nio (``venv``'s) and upload each ``(data, encrypt)``
    (``encrypt``: with nio's ``encrypt_attachment``, as a client in an encrypted room does),
    then download what was stored. One dict per upload: ``content_uri`` or ``error``
    (``errcode``, ``message``), ``keys`` (the attachment's key, iv and hash when encrypted),
    ``downloaded`` (the stored bytes, base64), and ``user_id``."""
    request = {"homeserver": homeserver, "username": username,
               "uploads": [{"data": base64.b64encode(d).decode(), "encrypt": e}
                           for d, e in uploads]}
    run = subprocess.run([str(venv / "bin" / "python"), __file__, "client"],
                         input=json.dumps(request), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    answer: list[dict[str, Any]] = json.loads(run.stdout)
    return answer


async def _client(request: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`run_client`'s other half, run in the venv with matrix-nio."""
    import io

    from nio import AsyncClient, MemoryDownloadResponse, RegisterResponse, UploadResponse
    from nio.crypto.attachments import encrypt_attachment

    client = AsyncClient(request["homeserver"])
    try:
        registered = await client.register(request["username"], secrets.token_hex(12))
        assert isinstance(registered, RegisterResponse), registered
        answers = []
        for upload in request["uploads"]:
            data = base64.b64decode(upload["data"])
            keys = None
            if upload["encrypt"]:
                data, keys = encrypt_attachment(data)
            stored, _ = await client.upload(io.BytesIO(data), "application/octet-stream",
                                            "upload", filesize=len(data))
            answer: dict[str, Any] = {"user_id": client.user_id, "keys": keys}
            if isinstance(stored, UploadResponse):
                answer["content_uri"] = stored.content_uri
                downloaded = await client.download(mxc=stored.content_uri)
                assert isinstance(downloaded, MemoryDownloadResponse), downloaded
                answer["downloaded"] = base64.b64encode(downloaded.body).decode()
            else:
                answer["error"] = {"errcode": stored.status_code, "message": stored.message}
            answers.append(answer)
        return answers
    finally:
        await client.close()


if __name__ == "__main__" and sys.argv[1:] == ["client"]:
    import asyncio

    print(json.dumps(asyncio.run(_client(json.load(sys.stdin)))))
