"""gunicorn's threaded worker, reading each whole request before a thread is given it.

The stock gthread worker hands a connection to a thread as soon as its first bytes arrive,
and the thread then reads the rest: a dozen clients that send headers and part of a body,
then wait, hold every thread, and health checks go unanswered. Here the worker's event loop
reads requests itself, without blocking (the way nginx buffers a request before passing it
on): a thread only ever gets a request whose headers and body have fully arrived. A request
that has not fully arrived within ``MODERATION_READ_TIMEOUT_S`` seconds of its first byte is
answered 408 and closed; one that announces more than ``MODERATION_MAX_CONTENT_LENGTH`` bytes
is answered 413 without reading the body. Bodies are held in memory up to 8 MiB (while the
requests being read hold under 256 MiB between them), else spooled to a temporary file.

Framing (where the head ends, ``Content-Length``, chunked transfer coding, trailers, a
pipelined next request) is h11's, a maintained HTTP/1.1 state machine, not ours: a malformed
request (a bad chunk size, conflicting lengths, both ``Content-Length`` and
``Transfer-Encoding``, a bad line ending) is answered with a JSON 4xx as soon as its bytes
arrive. The thread then gets the request re-framed with one ``Content-Length``, which
gunicorn's parser reads as usual (and still applies its limits on the request line and
headers).

Two answers never wait for a thread: ``GET /healthz`` is answered by the event loop itself
(a health check must not queue behind busy request threads), and a connection that is
closing is drained by the event loop without blocking it (gunicorn's graceful close waits
up to 2 s for the client in the loop, which stalls every other connection of the worker
for as long as a client takes to hang up).

Errors gunicorn answers itself (a header over its limits, a malformed request line) are
written in the service's JSON shape instead of gunicorn's HTML page.

TLS is not handled here (terminate it at the proxy: see deploy/nginx-moderation.conf); with
TLS configured, the stock behaviour applies.
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import IO, Any

import h11
from gunicorn import http
from gunicorn.workers.gthread import TConn, ThreadWorker

from .settings import load_settings

__all__ = ["BufferingThreadWorker", "RequestReader", "RequestRefused", "json_error_response"]

#: Header blocks past this many bytes are refused (gunicorn's own, finer limits apply below).
MAX_HEADER_BYTES = 64 * 1024
#: A body is held in memory up to this size, then spooled to a temporary file; and only while
#: the worker's requests being read hold less than MEMORY_BUDGET in memory between them.
SPOOL_BYTES = 8 * 1024 * 1024
MEMORY_BUDGET = 256 * 1024 * 1024
CHUNK = 256 * 1024
#: A closing connection's unread bytes are drained for at most this long, then it is closed.
CLOSE_LINGER_S = 2.0
#: What the event loop answers to ``GET /healthz`` (the same body as the app's route).
HEALTH_PATH = b"/healthz"
HEALTH_BODY = b'{"status":"ok"}\n'

_REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout",
            411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
            417: "Expectation Failed", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented",
            505: "HTTP Version Not Supported"}
_CODES = {400: "bad_request", 403: "forbidden", 408: "request_timeout",
          411: "length_required", 413: "request_too_large", 414: "request_line_too_long",
          417: "expectation_failed", 431: "headers_too_large", 500: "internal",
          501: "not_implemented", 505: "http_version_not_supported"}
#: Headers that frame the request as it arrived; the re-framed request gets its own length.
_FRAMING = (b"content-length", b"transfer-encoding", b"expect")


def json_error_response(status: int, message: str, code: str | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with the service's error
    body ``{"error": {"code", "message"}}``."""
    body = json.dumps(
        {"error": {"code": code or _CODES.get(status, "error"), "message": message}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class RequestRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _refusal(error: h11.RemoteProtocolError, head_done: bool) -> RequestRefused:
    """h11's protocol error as the answer the client gets."""
    status = error.error_status_hint
    if status == 501:
        return RequestRefused(501, "the transfer coding is not supported: send Content-Length "
                                   "or Transfer-Encoding: chunked (once)")
    if status == 431 and head_done:  # a chunk-size or trailer line that never ends
        return RequestRefused(400, "the chunked body has a chunk-size or trailer line over "
                                   f"{MAX_HEADER_BYTES:,} bytes")
    if status == 431:
        return RequestRefused(431, f"the request headers are over {MAX_HEADER_BYTES:,} bytes")
    part = "body" if head_done else "head"
    return RequestRefused(400, f"the request {part} is not valid HTTP/1.1 ({error}); send "
                               "one request line, CRLF-terminated headers, and a body framed "
                               "by Content-Length or chunked transfer coding")


@dataclass(frozen=True)
class HeadLimits:
    """gunicorn's limits on a request's head (its ``limit_request_*`` settings), applied as
    the head arrives, so that what the event loop answers itself obeys them too."""

    line: int = 4094
    fields: int = 100
    field_size: int = 8190

    @classmethod
    def of(cls, cfg: Any) -> HeadLimits:
        return cls(cfg.limit_request_line, cfg.limit_request_fields,
                   cfg.limit_request_field_size)

    def check(self, request: h11.Request) -> None:
        line = len(request.method) + len(request.target) + len(request.http_version) + 7
        if self.line and line > self.line:
            raise RequestRefused(414, f"the request line is over {self.line:,} bytes")
        headers = request.headers.raw_items()
        too_big = self.field_size and any(len(n) + len(v) + 2 > self.field_size
                                          for n, v in headers)
        if (self.fields and len(headers) > self.fields) or too_big:
            raise RequestRefused(431, f"a request header is over {self.field_size:,} bytes, "
                                      f"or there are more than {self.fields} headers")


class RequestReader:
    """Collects one HTTP/1.1 request as its bytes arrive (framed by h11) and says when it is
    whole. Bytes past the end of the request (a pipelined next request) are kept in
    ``rest``; :meth:`chunks` gives the request, re-framed with one ``Content-Length``, to
    gunicorn's parser."""

    def __init__(self, max_body: int, prefix: bytes = b"", in_memory: int = SPOOL_BYTES,
                 limits: HeadLimits | None = None) -> None:
        self.max_body = max_body
        self.limits = limits or HeadLimits()
        self.started = time.monotonic()
        self.in_memory = in_memory  # bytes of body held in memory before spooling to disk
        self.body: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=in_memory)
        self.body_size = 0
        self.request: h11.Request | None = None
        self.complete = False
        self.rest = b""
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        if prefix:
            self.feed(prefix)

    @property
    def head_done(self) -> bool:
        return self.request is not None

    @property
    def expects_continue(self) -> bool:
        """The client waits for ``100 Continue`` before it sends the body."""
        return self._h11.they_are_waiting_for_100_continue

    @property
    def is_health_check(self) -> bool:
        return (self.request is not None and self.request.method == b"GET"
                and self.request.target == HEALTH_PATH and self.body_size == 0)

    @property
    def keep_alive(self) -> bool:
        """Whether the client lets the connection stay open after this request."""
        if self.request is None:
            return False
        tokens = {t.strip().lower() for name, value in self.request.headers
                  if name == b"connection" for t in value.split(b",")}
        if self.request.http_version == b"1.0":
            return b"keep-alive" in tokens
        return b"close" not in tokens

    def feed(self, data: bytes) -> None:
        """Take more bytes; raises :class:`RequestRefused` for a request that cannot be
        accepted. Sets ``complete`` once the whole request is here."""
        if self.complete:  # the next request's bytes
            self.rest += data
            return
        self._h11.receive_data(data)
        while not self.complete:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as e:
                raise _refusal(e, self.head_done) from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                # a chunk declared past the limit is refused now, not once it has arrived
                # (h11 keeps what is left of the current chunk in its reader; h11 is pinned)
                declared = getattr(getattr(self._h11, "_reader", None), "_bytes_in_chunk", 0)
                self._check_size(self.body_size + declared)
                return
            if isinstance(event, h11.Request):
                self._start(event)
            elif isinstance(event, h11.Data):
                self.body_size += len(event.data)
                self._check_size(self.body_size)
                self.body.write(event.data)
            elif isinstance(event, h11.EndOfMessage):  # trailers, if any, are dropped
                self.complete = True
                self.rest = self._h11.trailing_data[0]

    def _start(self, request: h11.Request) -> None:
        names = {name for name, _ in request.headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            # RFC 9112 §6.3: a request smuggling vector; refuse rather than pick one
            raise RequestRefused(400, "the request has both Content-Length and "
                                      "Transfer-Encoding: send one of them")
        if request.http_version not in (b"1.0", b"1.1"):
            raise RequestRefused(505, f"HTTP/{request.http_version.decode()} is not served "
                                      "here: send HTTP/1.1 (or 1.0)")
        self.limits.check(request)
        self.request = request
        for name, value in request.headers:
            if name == b"content-length":
                self._check_size(int(value))

    def _check_size(self, size: int) -> None:
        """A body over the limit, declared or (chunked) so far: refused unread."""
        if size > self.max_body:
            raise RequestRefused(
                413, f"the request is over {self.max_body:,} bytes "
                "(MODERATION_MAX_CONTENT_LENGTH)",
            )

    def head(self) -> bytes:
        """The request line and headers, with one ``Content-Length`` for the whole body."""
        request = self.request
        if request is None:
            raise RuntimeError("the request head has not arrived")
        lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)]
        lines += [name + b": " + value for name, value in request.headers.raw_items()
                  if name.lower() not in _FRAMING]
        if self.body_size or any(name in _FRAMING[:2] for name, _ in request.headers):
            lines.append(b"Content-Length: %d" % self.body_size)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def chunks(self) -> Iterator[bytes]:
        """The whole request, for gunicorn's parser."""
        yield self.head()
        self.body.seek(0)
        while True:
            block = self.body.read(4 * CHUNK)
            if not block:
                break
            yield block
        self.body.close()


class _JSONErrorSocket:
    """Stands for the client socket while gunicorn writes one of its own error pages: the
    status line is kept, the HTML body is replaced by the JSON error shape."""

    def __init__(self, sock: Any, exc: BaseException, cfg: Any) -> None:
        self._sock = sock
        self._exc = exc
        self._cfg = cfg

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def sendall(self, data: bytes) -> None:
        status_line = data.split(b"\r\n", 1)[0].decode("latin-1")
        status = int(status_line.split(" ", 2)[1])
        cfg = self._cfg
        if status == 431:
            message = (
                f"a request header is over {cfg.limit_request_field_size:,} bytes, or there "
                f"are more than {cfg.limit_request_fields} headers"
            )
        elif status == 414:
            message = f"the request line is over {cfg.limit_request_line:,} bytes"
        elif status < 500:
            message = f"{type(self._exc).__name__}: {self._exc}"
        else:
            message = "internal error; the server log has the details"
        self._sock.sendall(json_error_response(status, message))

    send = sendall


class _Conn(TConn):
    """A client connection whose graceful close is left to the worker's event loop."""

    def __init__(self, worker: BufferingThreadWorker, *args: Any) -> None:
        super().__init__(*args)
        self.worker = worker
        self.pending = b""  # a pipelined next request, read after this one

    def close(self, graceful: bool = False) -> None:
        if graceful:
            self.worker.close_later(self)
        else:
            super().close()


class BufferingThreadWorker(ThreadWorker):
    """See the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = load_settings()  # MODERATION_READ_TIMEOUT_S, MODERATION_MAX_CONTENT_LENGTH
        self.reading: dict[TConn, RequestReader] = {}
        self.closing: dict[socket.socket, float] = {}  # half-closed sockets: their deadline
        self.read_timeout = settings.read_timeout_s
        self.max_body = settings.max_content_length

    # --- connections come here instead of straight to a thread ----------------------------

    def accept(self, listener: socket.socket) -> None:
        if self.cfg.is_ssl:
            return super().accept(listener)
        try:
            client, address = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = _Conn(self, self.cfg, client, address, listener.getsockname())  # non-blocking
        self._start_reading(conn, b"")

    def on_client_socket_readable(self, conn: TConn, client: socket.socket) -> None:
        if self.cfg.is_ssl:
            return super().on_client_socket_readable(conn, client)
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._start_reading(conn, b"")

    def _start_reading(self, conn: TConn, prefix: bytes) -> None:
        held = sum(r.in_memory for r in self.reading.values())
        in_memory = SPOOL_BYTES if held + SPOOL_BYTES <= MEMORY_BUDGET else 0
        try:
            reader = RequestReader(self.max_body, prefix, in_memory, HeadLimits.of(self.cfg))
        except RequestRefused as e:
            self._refuse(conn, e.status, e.message)
            return
        if reader.complete:
            self._dispatch(conn, reader)
            return
        self.reading[conn] = reader
        conn.sock.setblocking(False)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn: TConn, sock: socket.socket) -> None:
        reader = self.reading[conn]
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:  # the client went away
            self._drop(conn)
            return
        had_head = reader.head_done
        try:
            reader.feed(data)
        except RequestRefused as e:
            self._refuse(conn, e.status, e.message)  # stops reading it too
            return
        if reader.head_done and not had_head and reader.expects_continue and not reader.complete:
            self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        if reader.complete:
            self._stop_reading(conn)
            self._dispatch(conn, reader)

    def _dispatch(self, conn: TConn, reader: RequestReader) -> None:
        """Give the complete request to a thread, as gunicorn would a readable socket; or
        answer a health check here."""
        if reader.is_health_check:
            self._answer_health(conn, reader)
            return
        conn.parser = http.get_parser(self.cfg, reader.chunks(), conn.client)
        conn.data_ready = True
        conn.pending = reader.rest
        self.enqueue_req(conn)

    def _answer_health(self, conn: TConn, reader: RequestReader) -> None:
        keep = reader.keep_alive and self.alive
        reader.body.close()
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                % len(HEALTH_BODY))
        answer = head + (b"\r\n" if keep else b"Connection: close\r\n\r\n") + HEALTH_BODY
        try:
            sent = conn.sock.send(answer)  # small: fits in the socket buffer
        except OSError:
            sent = -1
        if sent != len(answer) or not keep:
            self._drop(conn)
        elif reader.rest:
            self._start_reading(conn, reader.rest)
        else:  # back to waiting, as gunicorn keeps a connection alive
            conn.set_timeout()
            self.keepalived_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self.on_client_socket_readable, conn))

    def finish_request(self, conn: TConn, fs: Any) -> None:
        super().finish_request(conn, fs)
        pending = getattr(conn, "pending", b"")
        if pending and conn in self.keepalived_conns:
            conn.pending = b""
            self.poller.unregister(conn.sock)
            self.keepalived_conns.remove(conn)
            self._start_reading(conn, pending)

    # --- the ends of a connection ---------------------------------------------------------

    def close_later(self, conn: TConn) -> None:
        """Close as RFC 9112 §9.6 asks (send FIN, read what the client still sends until it
        hangs up, then close), without blocking the event loop: the socket is drained when
        it is readable, and closed after CLOSE_LINGER_S at the latest."""
        sock = conn.sock
        try:
            sock.setblocking(False)
            sock.shutdown(socket.SHUT_WR)
            self.poller.register(sock, selectors.EVENT_READ, self._drain)
        except (OSError, ValueError, KeyError):
            self._close_socket(sock)
            return
        self.closing[sock] = time.monotonic() + CLOSE_LINGER_S

    def _drain(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_socket(sock)

    def _close_socket(self, sock: socket.socket) -> None:
        self.closing.pop(sock, None)
        try:
            self.poller.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            sock.close()
        except OSError:
            pass

    def _stop_reading(self, conn: TConn) -> None:
        self.reading.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _send(self, conn: TConn, data: bytes) -> None:
        try:
            conn.sock.send(data)  # small: fits in the socket buffer, never blocks
        except OSError:
            pass

    def _refuse(self, conn: TConn, status: int, message: str) -> None:
        self.log.warning("refused a request from %s: %d %s", conn.client, status, message)
        self._send(conn, json_error_response(status, message))
        self._stop_reading(conn)
        self.nr_conns -= 1
        self.close_later(conn)  # what the client still sends must not reset the answer

    def _drop(self, conn: TConn) -> None:
        self._stop_reading(conn)
        self.nr_conns -= 1
        TConn.close(conn)

    def murder_keepalived(self, force: bool = False) -> None:
        """Also cut off the requests that have not arrived in time, and close the closing
        sockets past their linger (gunicorn calls this from its event loop at least once a
        second)."""
        super().murder_keepalived(force)
        now = time.monotonic()
        for sock, deadline in list(self.closing.items()):
            if force or now > deadline:
                self._close_socket(sock)
        for conn, reader in list(self.reading.items()):
            if force or (not self.alive and not reader.head_done):
                # stopping: a connection that has not even sent its headers is not a request
                # in progress, so it does not hold up the stop
                self._drop(conn)
            elif now - reader.started > self.read_timeout:
                part = "body" if reader.head_done else "headers"
                self._refuse(
                    conn, 408,
                    f"the request {part} did not arrive within {self.read_timeout:g} s "
                    "(MODERATION_READ_TIMEOUT_S)",
                )

    # --- gunicorn's own errors, in the JSON shape ----------------------------------------

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        super().handle_error(req, _JSONErrorSocket(client, exc, self.cfg), addr, exc)
