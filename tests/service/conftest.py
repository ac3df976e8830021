from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from flask import Flask
from flask.testing import FlaskClient

from moderation import Moderator
from moderation.policy import parse_policy
from service.app import create_app
from tests.fakes import HAND_POLICY, TINY_ARCH, FakeEncoder

ADMIN = "admin-secret"
READER = "reader-secret"


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(HAND_POLICY, sort_keys=False))
    return path


@pytest.fixture
def make_app(fake_encoder: FakeEncoder, policy_path: Path) -> Callable[..., Flask]:
    def make(**config: Any) -> Flask:
        moderator = Moderator(parse_policy(policy_path.read_text()), fake_encoder)
        return create_app(
            {"POLICY": str(policy_path), "ADMIN_TOKEN": ADMIN, "READER_TOKEN": READER,
             "DATABASE_URL": f"sqlite:///{policy_path.parent / 'decisions.sqlite3'}", **config},
            moderator=moderator,
        )

    return make


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def moderate_images(client: FlaskClient, app: Flask, images: dict[str, bytes],
                    headers: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Moderate every image once, ids as the keys, and wait until they are in the log: the
    result per client id."""
    import io

    data = {"image": [(io.BytesIO(b), f"{k}.img") for k, b in images.items()],
            "id": list(images)}
    r = client.post("/v1/moderate", data=data, content_type="multipart/form-data",
                    headers=headers or {})
    assert r.status_code == 200, r.get_data(as_text=True)
    app.extensions["decisions"][1].flush()
    return {res["id"]: res for res in r.get_json()["results"]}


# --- the real `moderation serve` (gunicorn, the tiny test architecture) on loopback --------

TOKEN = "integration-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_policy_text(arch: Path, weapons_threshold: float) -> str:
    data = copy.deepcopy(HAND_POLICY)
    data["model"] = {"name": TINY_ARCH, "pretrained": "none", "config": str(arch)}
    data["categories"]["weapons"]["threshold"] = {"value": weapons_threshold}
    return yaml.safe_dump(data, sort_keys=False)


@dataclass
class Server:
    base: str
    port: int
    policy_path: Path
    database: Path
    process: subprocess.Popen[bytes]
    log: Path

    def workers(self) -> list[int]:
        """The pids of the gunicorn workers (children of the master)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                pids.append(int(stat.parent.name))
        return sorted(pids)


@pytest.fixture
def start_server(tiny_arch_file: Path, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``start_server(workers=2, **env)``: a ready `moderation serve` with its own policy
    file and SQLite log; stopped (SIGTERM) at the end of the test."""
    started: list[tuple[subprocess.Popen[bytes], Any]] = []

    def start(workers: int = 2, threads: int = 4, **env: str) -> Server:
        folder = tmp_path / f"server{len(started)}"
        folder.mkdir()
        policy_path = folder / "policy.yaml"
        policy_path.write_text(tiny_policy_text(tiny_arch_file, 0.5))
        port = free_port()
        database = folder / "decisions.sqlite3"
        environment = {
            **os.environ, "MODERATION_ADMIN_TOKEN": TOKEN, "MODERATION_READER_TOKEN": READER,
            "MODERATION_CACHE_DIR": str(folder / "cache"),  # each its own, as on two machines
            "MODERATION_DATABASE_URL": f"sqlite:///{database}", **env,
        }
        log_path = folder / "server.log"
        log = log_path.open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "moderation.cli", "serve", "--policy", str(policy_path),
             "--port", str(port), "--workers", str(workers), "--threads", str(threads),
             "--random-weights"],
            env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=folder,
        )
        started.append((process, log))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail("server exited:\n" + log_path.read_text())
            try:
                if requests.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # workers still loading
                pass
            if time.monotonic() > deadline:
                pytest.fail("server not ready:\n" + log_path.read_text())
            time.sleep(0.3)
        server = Server(base, port, policy_path, database, process, log_path)
        deadline = time.monotonic() + 60
        while len(server.workers()) < workers and time.monotonic() < deadline:
            time.sleep(0.2)
        return server

    yield start
    for process, log in started:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture
def server(start_server: Callable[..., Server]) -> tuple[str, Path]:
    """A server with 2 workers: its base URL and its policy file."""
    s = start_server()
    return s.base, s.policy_path


NGINX = os.environ.get("MODERATION_TEST_NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
DEPLOY_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx-moderation.conf"


@pytest.fixture
def nginx_in_front(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """``nginx_in_front(upstream_port, tls=False, http_port=None, **directives)``: Debian's
    nginx running the shipped deploy/nginx-moderation.conf in front of a server, with some
    directives' values replaced (e.g. ``client_body_timeout="2s"``); returns the port its
    main server listens on: plain http, or with ``tls`` https with a fresh self-signed
    certificate for 127.0.0.1 (``<tmp_path>/nginx/cert.pem``). The redirect to https listens
    on ``http_port`` (default: a free port)."""
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (.ci/services installs it)")
    prefix = tmp_path / "nginx"
    started: list[subprocess.Popen[bytes]] = []

    def start(upstream_port: int, tls: bool = False, http_port: int | None = None,
              **directives: str) -> int:
        prefix.mkdir(mode=0o777)
        (prefix / "logs").mkdir()
        port = free_port()
        site = DEPLOY_CONF.read_text()
        site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
        site = site.replace("listen 80;", f"listen 127.0.0.1:{http_port or free_port()};")
        site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{port}{' ssl' if tls else ''};")
        if tls:
            if shutil.which("openssl") is None:
                pytest.skip("no openssl command to make a test certificate")
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                 "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(prefix / "key.pem"),
                 "-out", str(prefix / "cert.pem")], check=True, capture_output=True)
            site, n = re.subn(r"ssl_certificate [^;]+;", f"ssl_certificate {prefix}/cert.pem;",
                              site)
            site, m = re.subn(r"ssl_certificate_key [^;]+;",
                              f"ssl_certificate_key {prefix}/key.pem;", site)
            assert n == m == 1
        else:
            site = re.sub(r"\n\s*ssl_\w+ [^;]+;", "\n", site)
        for name, value in directives.items():
            site, n = re.subn(rf"(\n\s*{name}) [^;]+;", rf"\1 {value};", site)
            assert n == 1, f"{name} is not in {DEPLOY_CONF.name}"
        (prefix / "site.conf").write_text(site)
        (prefix / "nginx.conf").write_text(
            ("user root;\n" if os.geteuid() == 0 else "")  # as CI runs: keep the tmp dirs
            + f"daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/logs/error.log warn;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n  access_log {prefix}/logs/access.log;\n"
            f"  client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n"
            f"  include {prefix}/site.conf;\n}}\n"
        )
        process = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        started.append(process)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return port
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("nginx did not start: " + (prefix / "logs" / "error.log")
                                .read_text(errors="replace"))
                time.sleep(0.1)

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


# --- the OpenAPI document, checked against real answers -----------------------------------


def described(response: Any) -> Any:
    """The request a response answered (method and path; its body was consumed already)."""
    from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    sent = response.request
    return WerkzeugOpenAPIRequest(Request(EnvironBuilder(
        path=sent.path, method=sent.method,
        query_string=sent.query_string.decode()).get_environ()))


@pytest.fixture
def spec(client: FlaskClient) -> Any:
    from openapi_core import OpenAPI

    return OpenAPI.from_dict(client.get("/openapi.json").get_json())
