"""A Synapse module that asks the service about every media file Synapse stores, through
Synapse's spam-checker callback ``check_media_file_for_spam``.

Install it in Synapse's environment (``pip install 'moderation[synapse]'``) and load it in
``homeserver.yaml``::

    modules:
      - module: platforms.synapse.ModerationModule
        config:
          url: http://127.0.0.1:8000   # the service's root (required)
          api_key: ...                 # a key of its MODERATION_API_KEYS, if it has any
          timeout: 10                  # seconds for the whole call (default 10)
          reject: block                # actions that refuse the upload (default block)
          review: accept               # what a review action does: accept or reject
          fail_mode: closed            # when the service cannot decide: open or closed
          unrecognised: accept         # a file that is not media (encrypted): accept or reject
          thumbnails: false            # also check the thumbnails Synapse makes (default no)

Unknown keys and bad values stop Synapse at start, every fault in one error.

**What Synapse gives the callback.** The file (a ``ReadableFileWrapper``) and a ``FileInfo``:
``file_id`` (the media id), ``server_name`` (``None`` for a local upload), ``url_cache`` (a
URL preview's file) and ``thumbnail`` (set for a thumbnail Synapse generated). Not the
uploader, not a room (an upload belongs to no room: a room only sees the ``mxc://`` URI in an
event sent later), not the content type or file name the client sent. The uploader is read,
best effort, from the request's logging context (``requester``, Synapse internals, not the
module API): a local upload has it; remote media, URL previews and thumbnails made in the
background do not. The decision's client id is the media's ``mxc://`` URI, followed by
`` by @user:server`` when the uploader is known, and ``#thumbnail`` / ``#url-preview`` for
those files: ``mxc://example.org/AbCdEf by @alice:example.org``.

**What comes back.** ``NOT_SPAM`` when the integration settings accept the file;
``(Codes.FORBIDDEN, {"reason": ..., "decision_id": ...})`` when they reject it. Synapse then
deletes the file and answers the upload with ``400 M_UNKNOWN "Bad content"`` (a remote file
fetched for a client: 404, as if quarantined); it drops the code and the dict, so the reason is
only in Synapse's log (logger ``platforms.synapse``, one line per file) and in the service's
decision log.

**Files that are not media.** Uploads to encrypted rooms reach Synapse as ciphertext
(AES-CTR: uniformly random bytes). The service's decoder refuses them with the code
``unsupported_format`` (``415``), which the integration settings would read as a decision
(rejected). This module asks the service anyway and reads *that* refusal as "not
recognisable media", decided by ``unrecognised``: ``accept`` (default: the scanner that
decrypts, matrix-content-scanner running ``moderation check``, decides on download) or
``reject`` (a server for media only: no encrypted rooms, no PDFs or archives; a URL
preview's page, which is never shown, is accepted all the same, and its image checked).
Asking rather than sniffing magic bytes here keeps one owner of what counts as media, the
service's decoder (video only where it has the ``[video]`` extra, …), at the cost of sending
every encrypted file to the service too; with the service down, such a file falls to the fail
mode like any other. Every other refusal (a recognised format that does not decode:
``corrupt_image``, too many pixels, …) still rejects: a file a browser might still show must
not pass unchecked. Since the decoder recognises formats by their first bytes, ciphertext
sometimes starts with a signature: most often BMP's two bytes ``BM``, about 1 in 65,536
encrypted files, refused as ``corrupt_image``; sent again, the file is encrypted with a new
key and passes.

Every file is sent, whatever it is (PDFs and archives too, answered ``unsupported_format``):
keep Synapse's ``max_upload_size`` (50M by default) at or under the service's
``MODERATION_MAX_CONTENT_LENGTH`` (64 MiB by default), or larger files are refused by the
service (``request_too_large``) and so rejected.

The check runs in Synapse's thread pool (:meth:`ModuleApi.defer_to_thread`) with the blocking
:class:`moderation.client.ModerationClient`: the reactor is never blocked, and ``timeout``
bounds how long a pool thread (and the upload) waits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from io import BytesIO
from typing import Any, Literal

from synapse.module_api import NOT_SPAM, ModuleApi
from synapse.module_api.errors import Codes, ConfigError

from moderation.client import MAX_TIMEOUT_S, Checked, ModerationClient
from moderation.integrations import IntegrationPolicy, Verdict

__all__ = ["UNRECOGNISED_CODE", "ModerationModule", "Settings", "SynapsePolicy", "client_id",
           "parse_settings"]

logger = logging.getLogger(__name__)

#: The service's refusal code for bytes that are no format its decoder knows.
UNRECOGNISED_CODE = "unsupported_format"

_KEYS = ("url", "api_key", "timeout", "reject", "review", "fail_mode", "unrecognised",
         "thumbnails")


@dataclass(frozen=True)
class SynapsePolicy(IntegrationPolicy):
    """The integration settings plus ``unrecognised``: what a file the decoder does not
    recognise as media (:data:`UNRECOGNISED_CODE`) gets."""

    unrecognised: Literal["accept", "reject"] = "accept"

    def of_refusal(self, code: str, message: str) -> Verdict:
        if code == UNRECOGNISED_CODE:
            if self.unrecognised == "accept":
                return Verdict(True, f"accepted unchecked, not recognisable media "
                                     f"(encrypted?): {message}")
            return Verdict(False, f"not recognisable media: {message}")
        return super().of_refusal(code, message)


@dataclass(frozen=True)
class Settings:
    """The module's ``config`` (see the module)."""

    url: str
    api_key: str | None = None
    timeout: float = 10.0
    policy: SynapsePolicy = SynapsePolicy()
    thumbnails: bool = False

    def client(self, *, url_preview: bool = False) -> ModerationClient:
        """The client for one file. A URL preview's file that is not media (the page itself:
        only its image is shown) is accepted whatever ``unrecognised`` says."""
        policy = replace(self.policy, unrecognised="accept") if url_preview else self.policy
        return ModerationClient(self.url, self.api_key, self.timeout, policy)


def parse_settings(config: dict[str, Any] | None) -> Settings:
    """``config`` from ``homeserver.yaml``. Raises ``ValueError`` naming every bad key."""
    config = dict(config or {})
    faults = [f"unknown key {key!r} (known: {', '.join(_KEYS)})"
              for key in sorted(set(config) - set(_KEYS), key=str)]
    url = config.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        faults.append(f"url must be the service's http(s) root; got {url!r}")
    api_key = config.get("api_key")
    if api_key is not None and not isinstance(api_key, str):
        faults.append("api_key must be text")
    timeout = config.get("timeout", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            0 < timeout <= MAX_TIMEOUT_S):  # (NaN and infinity fail the comparison)
        faults.append(f"timeout must be a number of seconds above 0 and at most "
                      f"{MAX_TIMEOUT_S:g}; got {timeout!r}")
    reject = config.get("reject", "block")
    if isinstance(reject, list) and all(isinstance(a, str) for a in reject):
        reject = ",".join(reject)
    policy: IntegrationPolicy | None = None
    try:
        policy = IntegrationPolicy.parse(str(reject), str(config.get("review", "accept")),
                                         str(config.get("fail_mode", "closed")))
    except ValueError as e:
        faults.append(f"{e} (keys reject, review, fail_mode)")
    unrecognised = config.get("unrecognised", "accept")
    if unrecognised not in ("accept", "reject"):
        faults.append(f"unrecognised must be accept or reject; got {unrecognised!r}")
    thumbnails = config.get("thumbnails", False)
    if not isinstance(thumbnails, bool):
        faults.append(f"thumbnails must be true or false; got {thumbnails!r}")
    if faults or policy is None:
        raise ValueError("; ".join(faults))
    return Settings(str(url), api_key, float(timeout), SynapsePolicy(
        policy.reject, policy.review, policy.fail_mode, unrecognised), thumbnails)


def client_id(server_name: str, file_info: Any, uploader: str | None) -> str:
    """The decision's client id for a file Synapse stores (see the module)."""
    uri = f"mxc://{file_info.server_name or server_name}/{file_info.file_id}"
    if uploader:
        uri += f" by {uploader}"
    if getattr(file_info, "thumbnail", None) is not None:
        uri += "#thumbnail"
    elif getattr(file_info, "url_cache", False):
        uri += "#url-preview"
    return uri


def _uploader() -> str | None:
    """The user whose request is storing the file, from Synapse's logging context (not part
    of the module API: ``None`` when it is absent or has changed)."""
    try:
        from synapse.logging.context import current_context

        request = getattr(current_context(), "request", None)
        requester = getattr(request, "requester", None)
    except Exception:  # internals: never let them break an upload
        return None
    return requester if isinstance(requester, str) and requester.startswith("@") else None


class ModerationModule:
    """The module Synapse loads (``module: platforms.synapse.ModerationModule``)."""

    def __init__(self, config: Settings, api: ModuleApi) -> None:
        self._settings = config
        self._api = api
        api.register_spam_checker_callbacks(
            check_media_file_for_spam=self.check_media_file_for_spam)
        logger.info("moderation: checking media with %s (fail %s, unrecognised files: %s)",
                    config.url, config.policy.fail_mode, config.policy.unrecognised)

    @staticmethod
    def parse_config(config: dict[str, Any]) -> Settings:
        """Called by Synapse at start: a bad ``config`` stops it with every fault."""
        try:
            return parse_settings(config)
        except ValueError as e:
            raise ConfigError(f"platforms.synapse.ModerationModule: {e}") from e

    async def check_media_file_for_spam(self, file_wrapper: Any,
                                        file_info: Any) -> Any:
        """Synapse's callback: ``NOT_SPAM``, or ``(Codes.FORBIDDEN, {reason, decision_id})``."""
        if getattr(file_info, "thumbnail", None) is not None and not self._settings.thumbnails:
            return NOT_SPAM  # its original was checked when it was stored
        cid = client_id(self._api.server_name, file_info, _uploader())  # in the request's context
        buffer = BytesIO()
        await file_wrapper.write_chunks_to(buffer.write)  # yields to the reactor per chunk
        client = self._settings.client(url_preview=bool(getattr(file_info, "url_cache", False)))
        checked: Checked = await self._api.defer_to_thread(
            client.check, buffer.getvalue(), client_id=cid, filename=file_info.file_id)
        decision_id = (checked.result or {}).get("decision_id")
        logger.info("moderation: %s %s (%d bytes): %s%s%s", cid,
                    "accepted" if checked.accept else "rejected", len(buffer.getvalue()),
                    checked.reason, f"; decision {decision_id}" if decision_id else "",
                    "; no decision" if checked.failed else "")
        if checked.accept:
            return NOT_SPAM
        return Codes.FORBIDDEN, {"reason": checked.reason, "decision_id": decision_id}
