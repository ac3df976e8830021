"""Request framing in the worker's event loop (service/worker.py, h11): every malformed
request is refused with a JSON 4xx as soon as its bytes are in, and none stalls the loop.

The reader is tested directly (no server), then the cases are sent to a real one-worker
`moderation serve`, whose /healthz must keep answering."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import pytest

from service.worker import HeadLimits, RequestReader, RequestRefused
from tests.service.conftest import Server

POST = b"POST /v1/moderate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"

#: (name, request bytes, status): each refused as soon as it has arrived.
MALFORMED = [
    ("negative chunk size", CHUNKED + b"-1\r\n\r\n", 400),
    ("signed chunk size", CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk size with underscores", CHUNKED + b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", 400),
    ("chunk size with 0x", CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk size with a space inside", CHUNKED + b"1 0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
     400),
    ("chunk size past the body limit", CHUNKED + b"FFFFFFFFFFFFFFFF\r\n", 413),
    ("chunk size of 21 digits", CHUNKED + b"1" * 21 + b"\r\n", 400),
    ("chunk data without its CRLF", CHUNKED + b"5\r\nhelloXX0\r\n\r\n", 400),
    ("both Content-Length and Transfer-Encoding",
     POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     400),
    ("two different Content-Lengths", POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n",
     400),
    ("a signed Content-Length", POST + b"Content-Length: +5\r\n\r\nhello", 400),
    ("a hexadecimal Content-Length", POST + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("a Content-Length past the limit", POST + b"Content-Length: 99999999999999\r\n\r\n", 413),
    ("transfer coding gzip", POST + b"Transfer-Encoding: gzip\r\n\r\n", 501),
    ("two Transfer-Encoding headers",
     POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    ("no Host header", b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    ("a space before a header's colon", b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    ("a bare CR in a header", b"GET /healthz HTTP/1.1\r\nHost: x\rX: y\r\n\r\n", 400),
    ("not HTTP", b"NONSENSE\r\n\r\n", 400),
    ("HTTP/2 version in an HTTP/1 line", b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    ("a request line over the limit", b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
     414),
    ("a header over the limit", b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
     431),
    ("too many headers", b"GET / HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", 431),
]


def reader(data: bytes, max_body: int = 1 << 20) -> RequestReader:
    found = RequestReader(max_body, limits=HeadLimits())
    for i in range(0, len(data), 3):  # bytes trickle in
        found.feed(data[i : i + 3])
    return found


@pytest.mark.parametrize(("name", "data", "status"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_framing_is_refused(name: str, data: bytes, status: int) -> None:
    with pytest.raises(RequestRefused) as refused:
        reader(data)
    assert refused.value.status == status, refused.value.message
    assert refused.value.message


def test_chunked_body_with_trailers_is_reframed_with_one_length() -> None:
    found = reader(CHUNKED + b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert found.complete
    chunks = b"".join(found.chunks())
    head, _, body = chunks.partition(b"\r\n\r\n")
    assert body == b"hello world"
    assert b"Content-Length: 11" in head
    assert b"transfer-encoding" not in head.lower() and b"X-Trailer" not in head


def test_pipelined_requests_are_kept_for_later() -> None:
    second = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
    found = reader(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + second)
    assert found.complete and found.is_health_check and found.rest == second
    found = reader(POST + b"Content-Length: 2\r\n\r\n{}" + second)
    assert b"".join(found.chunks()).endswith(b"\r\n\r\n{}") and found.rest == second


def test_expect_continue_is_seen_and_not_passed_on() -> None:
    found = reader(POST + b"Content-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert found.head_done and found.expects_continue and not found.complete
    found.feed(b"{}")
    assert found.complete and b"expect" not in found.head().lower()


def raw(port: int, data: bytes, timeout: float = 5) -> tuple[int, dict[str, object], float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
            dict(
                line.split(b": ", 1) for line in answer.partition(b"\r\n\r\n")[0]
                .split(b"\r\n")[1:] if b": " in line
            ).get(b"Content-Length", b"0")
        ):
            block = s.recv(65536)
            if not block:
                break
            answer += block
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer[:300]
    return int(head.split()[1]), json.loads(body), time.monotonic() - started


@pytest.mark.server
def test_malformed_requests_on_a_real_server_answer_within_a_second(
    start_server: Callable[..., Server],
) -> None:
    """Before: a chunk size of -1 looped the one worker's event loop for good; /healthz went
    unanswered until gunicorn killed the worker 120 s later."""
    server = start_server(workers=1)
    for name, data, status in MALFORMED:
        # a connection left open after the request: the answer must not wait for its end
        got, body, seconds = raw(server.port, data)
        assert got == status, (name, body)
        error = body["error"]
        assert isinstance(error, dict) and error["code"] and error["message"], name
        assert seconds < 1, (name, seconds)
        health, _, seconds = raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert health == 200 and seconds < 1, (name, seconds)
    # pipelined: both answered, in order, on one connection
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n"
                  b"Connection: close\r\n\r\n")
        answer = b""
        while block := s.recv(65536):
            answer += block
    assert answer.count(b"HTTP/1.1 200") == 2 and b'"ready"' in answer.split(b"HTTP/1.1")[2]
