"""A python-threatexchange :class:`~threatexchange.classifier.classifier.Classifier` that asks
the service, so that pytx and HMA users can A/B it against their stack (the purpose pytx gives
its classifier interface).

Register it as a pytx extension::

    pip install 'moderation[threatexchange]'
    threatexchange config extensions add platforms.threatexchange

and configure it from the environment, as every hook is (:func:`client_from_env`):
``MODERATION_URL`` (default ``http://127.0.0.1:8000``), ``MODERATION_API_KEY``,
``MODERATION_TIMEOUT`` (seconds, default 30) and what a decision means, with the service's own
names: ``MODERATION_INTEGRATION_REJECT`` (default ``block``), ``MODERATION_INTEGRATION_REVIEW``
(``accept``), ``MODERATION_INTEGRATION_FAIL_MODE`` (``closed``).

pytx 1.2.17 has the ``Classifier`` interface but no slot for one in its extension manifest (it
lists signal types, content types and exchanges; ``threatexchange classify`` calls OpenAI's
API only). :data:`TX_MANIFEST` is therefore a ``ThreatExchangeExtensionManifest`` (the CLI
loads, bootstraps and verifies it) that also carries ``classifiers``;
:func:`classifiers_from_config` collects them from the extensions the CLI has added, the way
the CLI loads manifests. HMA configures classes in Python: use
:class:`ModerationServiceClassifier` directly.

What comes back (:class:`ModerationClassification`): one label per policy category, matched
when the decision triggered it, with its score; one ``bank:<name>`` label per hash bank that
matched; and the label ``reject``, matched when the integration settings reject the file
(an action in ``MODERATION_INTEGRATION_REJECT``, a file the decoder refuses, or, failing
closed, no decision). When the service cannot decide, the result says so (``failed``) and
carries no category label: only the fail mode's ``reject``.
"""

from __future__ import annotations

import os
import pathlib
import typing as t
from dataclasses import dataclass, field

from threatexchange.classifier.classifier import (
    ClassificationInfo,
    ClassificationResult,
    Classifier,
)
from threatexchange.content_type.content_base import ContentType
from threatexchange.content_type.photo import PhotoContent
from threatexchange.extensions.manifest import ThreatExchangeExtensionManifest

from moderation.client import Checked, ModerationClient
from moderation.integrations import IntegrationPolicy

__all__ = [
    "CLIENT_ID", "REJECT_LABEL", "TX_MANIFEST", "CategoryInfo", "ModerationClassification",
    "ModerationExtensionManifest", "ModerationServiceClassifier", "VerdictInfo",
    "classifiers_from_config", "client_from_env",
]

#: The ``id`` every upload is sent with: the decision log's client id for this hook.
CLIENT_ID = "threatexchange"
#: The label that says what the integration settings make of the file.
REJECT_LABEL = "reject"


def client_from_env(environ: t.Mapping[str, str] | None = None) -> ModerationClient:
    """The client the environment describes (see the module). Raises ``ValueError`` naming
    the variable, the value and what is accepted."""
    env = os.environ if environ is None else environ
    raw_timeout = env.get("MODERATION_TIMEOUT", "30")
    try:
        timeout = float(raw_timeout)
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise ValueError(f"MODERATION_TIMEOUT must be a number of seconds above 0; got "
                         f"{raw_timeout!r}")
    try:
        policy = IntegrationPolicy.parse(
            env.get("MODERATION_INTEGRATION_REJECT", "block"),
            env.get("MODERATION_INTEGRATION_REVIEW", "accept"),
            env.get("MODERATION_INTEGRATION_FAIL_MODE", "closed"))
    except ValueError as e:
        raise ValueError(f"{e} (MODERATION_INTEGRATION_REJECT, _REVIEW, _FAIL_MODE)") from e
    url = env.get("MODERATION_URL", "http://127.0.0.1:8000")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"MODERATION_URL must be the service's http(s) root; got {url!r}")
    return ModerationClient(url, env.get("MODERATION_API_KEY") or None, timeout, policy)


@dataclass
class CategoryInfo(ClassificationInfo):
    """A policy category: ``is_match`` when the decision triggered it; ``score`` the
    category's score (not a probability: it is cut by ``threshold``, in the same units);
    ``action`` what the category asked for."""

    score: float = 0.0
    threshold: float | None = None
    action: str = "allow"

    def weight_str(self) -> str:
        return f"{self.score:.3f}"


@dataclass
class VerdictInfo(ClassificationInfo):
    """A label without a score: a hash bank's match or the integration settings' verdict;
    ``why`` says what it rests on (the action, the bank's, or the failure)."""

    why: str = ""

    def weight_str(self) -> str:
        return self.why


@dataclass
class ModerationClassification(ClassificationResult):
    """The labels (see the module) and the answer behind them: ``accept`` and ``reason`` as
    the integration settings read the decision; ``failed``: the service did not decide (the
    fail mode chose ``accept``); ``action`` and ``decision_id``: the service's decision and
    its record (``None`` without a decision); ``result``: the service's whole result."""

    accept: bool = True
    reason: str = ""
    failed: bool = False
    action: str | None = None
    decision_id: str | None = None
    result: dict[str, t.Any] | None = field(default=None, repr=False)

    @classmethod
    def from_checked(cls, checked: Checked) -> ModerationClassification:
        labels: dict[str, ClassificationInfo] = {}
        result = checked.result or {}
        triggered = set(result.get("triggered", []))
        for cid, category in result.get("categories", {}).items():
            labels[cid] = CategoryInfo(is_match=cid in triggered,
                                       score=float(category.get("score", 0.0)),
                                       threshold=category.get("threshold"),
                                       action=str(category.get("action", "allow")))
        for match in result.get("matches", []):
            labels.setdefault(f"bank:{match['bank']}", VerdictInfo(
                is_match=True, why=f"{match['action']}, {match['kind']} d={match['distance']}"))
        if checked.failed:
            why = "no decision, fail " + ("open" if checked.accept else "closed")
        else:
            why = str(result.get("action") or "refused")
        labels[REJECT_LABEL] = VerdictInfo(is_match=not checked.accept, why=why)
        return cls(labels, accept=checked.accept, reason=checked.reason, failed=checked.failed,
                   action=result.get("action"), decision_id=result.get("decision_id"),
                   result=checked.result)

    def __str__(self) -> str:
        labels = super().__str__()
        if self.failed:
            return f"{labels} [{self.reason}]"
        return labels


class ModerationServiceClassifier(Classifier):
    """Photos (a local path) through the service's ``POST /v1/moderate``: every call is a
    decision the service records (client id :data:`CLIENT_ID`). Never raises for the
    service's failures: they are the fail mode's answer, with ``failed`` set."""

    def __init__(self, client: ModerationClient | None = None) -> None:
        self.client = client if client is not None else ModerationClient()

    @classmethod
    def get_name(cls) -> str:
        return "moderation_service"

    @classmethod
    def get_content_types(cls) -> list[type[ContentType]]:
        return [PhotoContent]

    @classmethod
    def get_with_default_settings(cls) -> ModerationServiceClassifier:
        return cls(client_from_env())

    def classify(self, content_type: type[ContentType], content_val: str
                 ) -> ModerationClassification:
        """Classify the photo at path ``content_val``. Raises ``ValueError`` for another
        content type or a URL, ``OSError`` when the file cannot be read: faults of the call,
        not of the service."""
        if content_type not in self.get_content_types():
            raise ValueError(f"{self.get_name()} classifies "
                             f"{', '.join(c.get_name() for c in self.get_content_types())}; "
                             f"got {content_type.get_name()}")
        if "://" in content_val:
            raise ValueError(f"{self.get_name()} reads a local file; got the URL "
                             f"{content_val!r}: download it first")
        path = pathlib.Path(content_val)
        return self.classify_bytes(path.read_bytes(), filename=path.name)

    def classify_bytes(self, data: bytes, *, filename: str = "upload"
                       ) -> ModerationClassification:
        """Classify a file's bytes (what :meth:`classify` sends)."""
        checked = self.client.check(data, client_id=CLIENT_ID, filename=filename)
        return ModerationClassification.from_checked(checked)


@dataclass
class ModerationExtensionManifest(ThreatExchangeExtensionManifest):
    """pytx's manifest, plus the classifiers it has no slot for (see the module)."""

    classifiers: tuple[type[Classifier], ...] = ()

    @classmethod
    def verify(cls) -> None:
        """At ``threatexchange config extensions add``: the environment's settings parse."""
        client_from_env()


TX_MANIFEST = ModerationExtensionManifest(classifiers=(ModerationServiceClassifier,))


def classifiers_from_config(state_dir: str | os.PathLike[str] | None = None
                            ) -> list[type[Classifier]]:
    """The classifiers of the extensions the pytx CLI has added (``threatexchange config
    extensions add``), loaded as the CLI loads them. ``state_dir``: the CLI's (default:
    ``TX_STATEDIR``, else ``~/.threatexchange``). Raises ``ValueError`` for an extension that
    no longer loads, as the CLI does."""
    from threatexchange.cli.cli_config import CliState

    directory = pathlib.Path(state_dir if state_dir is not None
                             else os.getenv("TX_STATEDIR", "~/.threatexchange"))
    found: list[type[Classifier]] = []
    for module in sorted(CliState([], directory).get_persistent_config().extensions):
        manifest = ThreatExchangeExtensionManifest.load_from_module_name(module)
        found.extend(getattr(manifest, "classifiers", ()))
    return found
