"""A small blocking client of the service's ``POST /v1/moderate``, for the hooks that run
somewhere else: ``moderation check`` (matrix-content-scanner), the Synapse module, the
ThreatExchange classifier. Standard library only (it is imported inside other programs), so
that every hook sends the same request and reads the answer by the same
:class:`~moderation.integrations.IntegrationPolicy`.

A hook that must not block (Synapse's reactor) runs :meth:`ModerationClient.check` in a
thread; the timeout bounds it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from .integrations import IntegrationPolicy

__all__ = ["Checked", "ModerationClient"]

#: A refusal the service answers about the request itself, not the file: a failure to decide.
_NOT_ABOUT_THE_FILE = (401, 403, 404, 405, 408, 429)


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
    any; ``timeout``: seconds for the whole call; ``policy``: what a decision means here."""

    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    timeout: float = 30.0
    policy: IntegrationPolicy = IntegrationPolicy()

    def moderate(self, data: bytes, *, client_id: str, filename: str = "upload") -> dict[str, Any]:
        """The service's result for one file (``{"id", "action", "categories", …}`` or
        ``{"id", "error"}`` when its decoder refused the file). Raises ``urllib.error.HTTPError``
        for an error answer and ``OSError``/``ValueError`` for no usable answer."""
        boundary = uuid.uuid4().hex
        name = "".join(ch for ch in filename if ch.isprintable() and ch not in '"\\') or "upload"
        body = b"".join([
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode(),
            data,
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="id"\r\n\r\n'.encode(),
            client_id.encode(),
            f"\r\n--{boundary}--\r\n".encode()])
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url.rstrip("/") + "/v1/moderate", data=body,
                                         headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
            answer = json.loads(response.read())
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
            if 400 <= e.code < 500 and e.code not in _NOT_ABOUT_THE_FILE and error.get("code"):
                verdict = self.policy.of_refusal(error["code"], error.get("message", ""))
                return Checked(verdict.accept, verdict.reason)
            what = f"the service answered {e.code} {error.get('code', '')}".strip()
            verdict = self.policy.of_failure(what)
            return Checked(verdict.accept, verdict.reason, failed=True)
        except (OSError, ValueError, KeyError, TypeError) as e:  # refused, timed out, not JSON
            verdict = self.policy.of_failure(f"no answer from {self.url}: {e}")
            return Checked(verdict.accept, verdict.reason, failed=True)
        if "error" in result:
            verdict = self.policy.of_refusal(result["error"].get("code", "refused"),
                                             result["error"].get("message", ""))
        else:
            verdict = self.policy.of_action(result.get("action", "allow"),
                                            list(result.get("triggered", [])))
        return Checked(verdict.accept, verdict.reason, result=result)
