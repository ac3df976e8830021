"""The webhook: verdicts delivered from the log's durable outbox to the platform's receiver,
signed (HMAC-SHA256), retried with backoff, each at most once delivered."""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from decisionlog.reviews import ReviewQueue

__all__ = ["WebhookSender", "signature"]

log = logging.getLogger(__name__)


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=`` and the hex HMAC-SHA256 of ``timestamp.body`` under ``secret``: what the
    receiver recomputes to trust a delivery (and, with the timestamp, refuse a replay)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is not a delivery: the attempt fails and is retried


@dataclass
class WebhookSender:
    """Delivers the outbox: each pending verdict POSTed as JSON, signed, retried with
    exponential backoff (``backoff_s``, doubling, at most ``max_backoff_s``, with jitter)
    until delivered or ``give_up_s`` after it was decided. Every worker runs one; a row is
    taken by one sender at a time (:meth:`ReviewQueue.take_due`)."""

    queue: ReviewQueue
    url: str
    secret: str
    timeout_s: float = 10
    backoff_s: float = 5
    max_backoff_s: float = 600
    give_up_s: float = 72 * 3600
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhook-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5)

    def wake(self) -> None:
        """A verdict was just recorded: deliver it now rather than at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:  # the log is down, say: try again at the next poll
                log.exception("the webhook sender failed; retrying")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def deliver_due(self, now: float | None = None) -> int:
        """Deliver what is due, one row at a time (each taken just before it is sent, so
        that a slow receiver never lets another sender's lease run out on a row waiting
        here); returns how many were delivered."""
        delivered = 0
        while not self._stop.is_set():
            taken = self.queue.take_due(lease_s=self.timeout_s + 30, now=now, limit=1)
            if not taken:
                return delivered
            [(outbox_id, payload, attempts, created_at)] = taken
            try:
                self._post(outbox_id, payload.encode())
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                now_ = time.time()
                delay = min(self.backoff_s * 2 ** attempts, self.max_backoff_s)
                retry_at: float | None = now_ + delay * random.uniform(0.8, 1.2)
                if now_ - created_at > self.give_up_s:
                    retry_at = None
                    log.error("webhook delivery %d failed %d times; giving up: %s",
                              outbox_id, attempts + 1, error)
                else:
                    log.warning("webhook delivery %d failed (attempt %d): %s", outbox_id,
                                attempts + 1, error)
                self.queue.attempt_failed(outbox_id, error, retry_at=retry_at)
                continue
            self.queue.delivered(outbox_id)
            delivered += 1
        return delivered

    def _post(self, outbox_id: int, body: bytes) -> None:
        timestamp = str(int(time.time()))
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json",
            "User-Agent": "moderation-webhook",
            "X-Moderation-Delivery": str(outbox_id),
            "X-Moderation-Timestamp": timestamp,
            "X-Moderation-Signature": signature(self.secret, timestamp, body),
        })
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                if not 200 <= response.status < 300:
                    raise OSError(f"the receiver answered {response.status}")
        except urllib.error.HTTPError as e:
            raise OSError(f"the receiver answered {e.code}") from None
