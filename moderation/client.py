"""A small blocking client of the service's ``POST /v1/moderate``, for the hooks that run
somewhere else: ``moderation check`` (matrix-content-scanner), the Synapse module, the
ThreatExchange classifier. Standard library only (it is imported inside other programs), so
that every hook sends the same request and reads the answer by the same
:class:`~moderation.integrations.IntegrationPolicy`.

``timeout`` bounds the whole call: connecting, sending, the answer, and, when the service
answers a long video with a job (``202``), polling the job until it is done. A hook that must
not block (Synapse's reactor) runs :meth:`ModerationClient.check` in a thread."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from .integrations import IntegrationPolicy

__all__ = ["FILE_REFUSALS", "MAX_TIMEOUT_S", "Checked", "JobFailed", "ModerationClient"]

#: The error codes that refuse the *file* (the decoder's, and a file over the service's size
#: limit): a decision (rejected). Any other error is about the request or the service: the
#: fail mode decides.
FILE_REFUSALS = frozenset({
    "empty", "unreadable", "unsupported_format", "corrupt_image", "too_many_pixels",
    "too_many_frames", "animation_too_large", "too_many_scans", "corrupt_video",
    "video_unsupported", "video_too_long", "video_too_large", "video_time_budget",
    "request_too_large",
})
#: The longest ``timeout`` a client takes (an hour: a hook waits for one file).
MAX_TIMEOUT_S = 3600.0
#: The longest client id the service records (longer ones are cut, as it would refuse them).
MAX_ID_CHARS = 256
#: How often a job is polled.
_POLL_S = 0.25


class JobFailed(Exception):
    """The service's job for a file failed: its error's ``code`` and ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class Checked:
    """A hook's answer on one file.

    ``accept``: let it through; ``reason``: one line a user or admin can be shown; ``failed``:
    no decision was made (the fail mode chose ``accept``); ``result``: the service's result
    for the file when it decided (action, categories, decision id, …)."""

    accept: bool
    reason: str
    failed: bool = False
    result: dict[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ModerationClient:
    """``url``: the service's root; ``api_key``: a key of its ``MODERATION_API_KEYS``, if it has
    any; ``timeout``: seconds for the whole call (above 0, at most :data:`MAX_TIMEOUT_S`);
    ``policy``: what a decision means here. Raises ``ValueError`` for a bad timeout."""

    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    timeout: float = 30.0
    policy: IntegrationPolicy = IntegrationPolicy()

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout, int | float) and math.isfinite(self.timeout)
                and 0 < self.timeout <= MAX_TIMEOUT_S):
            raise ValueError(f"the timeout must be a number of seconds above 0 and at most "
                             f"{MAX_TIMEOUT_S:g}; got {self.timeout!r}")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _call(self, request: urllib.request.Request, deadline: float) -> tuple[int, Any]:
        """Status and JSON answer; the body read in pieces, each within what is left of
        ``deadline``. Raises ``urllib.error.HTTPError`` for an error status."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer within {self.timeout:g} s")
        with urllib.request.urlopen(request, timeout=remaining) as response:  # noqa: S310
            chunks = []
            while chunk := response.read1(65536):
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the answer took over {self.timeout:g} s")
            return response.status, json.loads(b"".join(chunks))

    def moderate(self, data: bytes, *, client_id: str, filename: str = "upload") -> dict[str, Any]:
        """The service's result for one file (``{"id", "action", "categories", …}`` or
        ``{"id", "error"}`` when its decoder refused the file), waiting for the job when the
        service answers one. Raises ``urllib.error.HTTPError`` for an error answer,
        ``OSError``/``ValueError``/``KeyError`` (``TimeoutError`` past the timeout) for no usable
        answer, and :class:`JobFailed` for a job that failed."""
        deadline = time.monotonic() + self.timeout
        boundary = uuid.uuid4().hex
        name = "".join(ch for ch in filename if ch.isprintable() and ch not in '"\\') or "upload"
        cleaned = "".join(ch for ch in client_id if ch.isprintable())[:MAX_ID_CHARS]
        body = b"".join([
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode(),
            data,
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="id"\r\n\r\n'.encode(),
            cleaned.encode(),
            f"\r\n--{boundary}--\r\n".encode()])
        root = self.url.rstrip("/")
        request = urllib.request.Request(
            root + "/v1/moderate", data=body, method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                     **self._headers()})
        status, answer = self._call(request, deadline)
        if status == 202:  # a long video: its job, polled until done
            job_url = f"{root}/v1/moderate/jobs/{urllib.parse.quote(str(answer['id']))}"
            while answer.get("state") not in ("done", "failed"):
                time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
                _, answer = self._call(urllib.request.Request(job_url,
                                                              headers=self._headers()),
                                       deadline)
            if answer["state"] == "failed":
                error = answer.get("error") or {}
                raise JobFailed(str(error.get("code", "job_failed")),
                                str(error.get("message", "")))
            answer = answer["result"]
        [result] = answer["results"]
        return dict(result)

    def check(self, data: bytes, *, client_id: str, filename: str = "upload") -> Checked:
        """Decide one file and say what the integration policy makes of it. Never raises for
        the service's failures: they are the fail mode's verdict, with ``failed`` set."""
        try:
            result = self.moderate(data, client_id=client_id, filename=filename)
        except urllib.error.HTTPError as e:
            try:
                error = json.loads(e.read()).get("error", {})
            except (ValueError, AttributeError, OSError):
                error = {}
            if error.get("code") in FILE_REFUSALS:
                verdict = self.policy.of_refusal(error["code"], error.get("message", ""))
                return Checked(verdict.accept, verdict.reason)
            return self._failure(f"the service answered {e.code} "
                                 f"{error.get('code', '')}".strip())
        except JobFailed as e:  # the decoder's refusal, or a failure
            if e.code in FILE_REFUSALS:
                verdict = self.policy.of_refusal(e.code, e.message)
                return Checked(verdict.accept, verdict.reason)
            return self._failure(f"the job failed: {e.code}")
        except (OSError, ValueError, TypeError, KeyError) as e:  # refused, timed out, not JSON
            return self._failure(f"no answer from {self.url}: {e}")
        if "error" in result:
            verdict = self.policy.of_refusal(result["error"].get("code", "refused"),
                                             result["error"].get("message", ""))
        else:
            verdict = self.policy.of_action(result.get("action", "allow"),
                                            list(result.get("triggered", [])))
        return Checked(verdict.accept, verdict.reason, result=result)

    def _failure(self, what: str) -> Checked:
        verdict = self.policy.of_failure(what)
        return Checked(verdict.accept, verdict.reason, failed=True)
