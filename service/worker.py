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

Errors gunicorn answers itself (a header over its limits, a malformed request line) are
written in the service's JSON shape instead of gunicorn's HTML page.

TLS is not handled here (terminate it at the proxy: see deploy/nginx.conf); with TLS
configured, the stock behaviour applies.
"""

from __future__ import annotations

import errno
import json
import re
import selectors
import socket
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from typing import IO, Any

from gunicorn import http
from gunicorn.workers.gthread import TConn, ThreadWorker

from .settings import load_settings

__all__ = ["BufferingThreadWorker", "RequestReader", "json_error_response"]

#: Header blocks past this many bytes are refused (gunicorn's own, finer limits apply below).
MAX_HEADER_BYTES = 64 * 1024
#: A body is held in memory up to this size, then spooled to a temporary file; and only while
#: the worker's requests being read hold less than MEMORY_BUDGET in memory between them.
SPOOL_BYTES = 8 * 1024 * 1024
MEMORY_BUDGET = 256 * 1024 * 1024
CHUNK = 256 * 1024

_REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout",
            411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
            417: "Expectation Failed", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented"}
_CODES = {400: "bad_request", 403: "forbidden", 408: "request_timeout",
          411: "length_required", 413: "request_too_large", 414: "request_line_too_long",
          417: "expectation_failed", 431: "headers_too_large", 500: "internal",
          501: "not_implemented"}


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


class RequestReader:
    """Collects the bytes of one HTTP/1.1 request as they arrive and says when it is whole.

    Only framing is parsed here (where the headers end, ``Content-Length`` or chunked
    transfer coding); gunicorn's parser reads the finished request as usual. Bytes past the
    end of the request (a pipelined next request) are kept in ``rest``.
    """

    def __init__(self, max_body: int, prefix: bytes = b"", in_memory: int = SPOOL_BYTES) -> None:
        self.max_body = max_body
        self.started = time.monotonic()
        self.head = bytearray()
        self.head_done = False
        self.in_memory = in_memory  # bytes of body held in memory before spooling to disk
        self.body: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=in_memory)
        self.body_size = 0
        self.remaining = 0  # Content-Length bytes still to come
        self.chunked = False
        self._chunk_state = "size"  # size | data | data_end | trailer
        self._line = bytearray()
        self._chunk_left = 0
        self.decoded = 0  # chunked: payload bytes so far
        self.expects_continue = False
        self.complete = False
        self.rest = b""
        if prefix:
            self.feed(prefix)

    def feed(self, data: bytes) -> None:
        """Take more bytes; raises :class:`RequestRefused` for a request that cannot be
        accepted. Sets ``complete`` once the whole request is here."""
        if not self.head_done:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEADER_BYTES:
                    raise RequestRefused(
                        431, f"the request headers are over {MAX_HEADER_BYTES:,} bytes"
                    )
                return
            data = bytes(self.head[end + 4 :])
            del self.head[end + 4 :]
            self.head_done = True
            self._frame()
            if self.complete:
                self.rest = data
                return
        self._feed_body(data)

    def _frame(self) -> None:
        lines = bytes(self.head).split(b"\r\n")
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        if b"expect" in headers:
            # gunicorn would answer "100 Continue" once the body is already here: send it
            # now (see BufferingThreadWorker) and drop the header.
            self.head = bytearray(
                re.sub(rb"(?im)^expect:[^\r\n]*\r\n", b"", bytes(self.head))
            )
            self.expects_continue = any(v.lower() == b"100-continue" for v in headers[b"expect"])
        else:
            self.expects_continue = False
        coding = b",".join(headers.get(b"transfer-encoding", [])).lower()
        if coding:
            if coding.replace(b" ", b"") != b"chunked":
                raise RequestRefused(
                    501, f"transfer coding {coding.decode('latin-1')!r} is not supported: send "
                    "Content-Length or Transfer-Encoding: chunked",
                )
            self.chunked = True
            return
        lengths = headers.get(b"content-length", [])
        if not lengths:
            self.complete = True
            return
        if len(set(lengths)) > 1 or not lengths[0].isdigit():
            raise RequestRefused(400, "the Content-Length header is not one whole number")
        self.remaining = int(lengths[0])
        self._check_size(self.remaining)
        self.complete = self.remaining == 0

    def _check_size(self, size: int) -> None:
        """A body over the limit, declared or (chunked) so far: refused unread."""
        if size > self.max_body:
            raise RequestRefused(
                413, f"the request is over {self.max_body:,} bytes "
                "(MODERATION_MAX_CONTENT_LENGTH)",
            )

    def _feed_body(self, data: bytes) -> None:
        if not self.chunked:
            take = data[: self.remaining]
            self.body.write(take)
            self.remaining -= len(take)
            self.body_size += len(take)
            if self.remaining == 0:
                self.complete = True
                self.rest = data[len(take) :]
            return
        self._feed_chunked(data)

    def _feed_chunked(self, data: bytes) -> None:
        i = 0
        while i < len(data) and not self.complete:
            if self._chunk_state == "data":
                take = data[i : i + self._chunk_left]
                self.body.write(take)
                self.body_size += len(take)
                self._chunk_left -= len(take)
                i += len(take)
                if self._chunk_left == 0:
                    self._chunk_state = "data_end"
                continue
            end = data.find(b"\n", i)
            piece = data[i:] if end < 0 else data[i : end + 1]
            self.body.write(piece)
            self.body_size += len(piece)
            self._line += piece
            i += len(piece)
            if len(self._line) > 4096:
                raise RequestRefused(400, "a chunk-size or trailer line is over 4,096 bytes")
            if end < 0:
                break
            line = bytes(self._line).strip()
            self._line.clear()
            if self._chunk_state == "size":
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise RequestRefused(400, "the chunked body has a bad chunk size") from None
                self.decoded += size
                self._check_size(self.decoded)
                self._chunk_left = size
                self._chunk_state = "data" if size else "trailer"
            elif self._chunk_state == "data_end":
                self._chunk_state = "size"
            elif self._chunk_state == "trailer" and not line:
                self.complete = True
        if self.complete:
            self.rest = data[i:]

    def chunks(self) -> Iterator[bytes]:
        """The whole request, for gunicorn's parser."""
        yield bytes(self.head)
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


class BufferingThreadWorker(ThreadWorker):
    """See the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = load_settings()  # MODERATION_READ_TIMEOUT_S, MODERATION_MAX_CONTENT_LENGTH
        self.reading: dict[TConn, RequestReader] = {}
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
        conn = TConn(self.cfg, client, address, listener.getsockname())  # non-blocking
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
            reader = RequestReader(self.max_body, prefix, in_memory)
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
        """Give the complete request to a thread, as gunicorn would a readable socket."""
        conn.parser = http.get_parser(self.cfg, reader.chunks(), conn.client)
        conn.data_ready = True
        conn.pending = reader.rest  # a pipelined next request, read after this one
        self.enqueue_req(conn)

    def finish_request(self, conn: TConn, fs: Any) -> None:
        super().finish_request(conn, fs)
        pending = getattr(conn, "pending", b"")
        if pending and conn in self.keepalived_conns:
            conn.pending = b""
            self.poller.unregister(conn.sock)
            self.keepalived_conns.remove(conn)
            self._start_reading(conn, pending)

    # --- the ends of a connection that never became a request ---------------------------

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
        self._drop(conn)

    def _drop(self, conn: TConn) -> None:
        self._stop_reading(conn)
        self.nr_conns -= 1
        conn.close()

    def murder_keepalived(self, force: bool = False) -> None:
        """Also cut off the requests that have not arrived in time (gunicorn calls this from
        its event loop at least once a second)."""
        super().murder_keepalived(force)
        now = time.monotonic()
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
