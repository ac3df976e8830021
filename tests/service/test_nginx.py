"""deploy/nginx-moderation.conf, as shipped, in front of the real `moderation serve`: nginx
buffers slow clients, and its own errors come back in the service's JSON shape."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import pytest
import requests

from tests.fakes import RED, image_bytes
from tests.service.conftest import Server

# starts a real server (gunicorn, nginx or Ray): left out of the quick loop
pytestmark = pytest.mark.server


def answer(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while block := s.recv(65536):
            out += block
    return out


def error_of(response: bytes) -> tuple[int, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), response[:300]
    return int(head.split()[1]), json.loads(body)["error"]["code"]


def test_nginx_in_front(start_server: Callable[..., Server],
                        nginx_in_front: Callable[..., int]) -> None:
    server = start_server(workers=2)
    port = nginx_in_front(server.port, client_body_timeout="2s")
    base = f"http://127.0.0.1:{port}"
    r = requests.post(f"{base}/v1/moderate", files={"image": ("r.png", image_bytes(RED))},
                      timeout=10)
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "r.png"

    stalled = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v1/moderate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{\"images\": [")
        stalled.append(s)
    started = time.monotonic()
    for _ in range(10):
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
    assert time.monotonic() - started < 3
    for s in stalled:  # nginx closes a stalled body (it does not answer 408: its behaviour)
        assert s.recv(65536) == b""
        s.close()

    assert error_of(answer(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000
                           + b"\r\n\r\n")) == (431, "headers_too_large")
    assert error_of(answer(port, b"POST /v1/moderate HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Length: 999999999\r\n\r\n")) == (413, "request_too_large")
    assert error_of(answer(port, b"NONSENSE\r\n\r\n")) == (400, "bad_request")
    # the service's own errors pass through unchanged
    r = requests.post(f"{base}/v1/moderate", json={"images": [{"data": "a-b_"}]}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_base64"

    server.process.terminate()
    server.process.wait(30)
    r = requests.get(f"{base}/healthz", timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
