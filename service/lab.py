"""The policy lab behind ``POST /v1/policy/dry-run`` and the lab page: a proposed policy's
text → a dry-run against the active policy (or a stored version), with this server's encoder
and the decision log's stored embeddings. Nothing is activated or recorded: prompts the
text-embedding cache lacks are encoded (at most ``PolicyLimits.max_new_prompts`` per
dry-run) into the dry-run's memory, never into the cache the replicas share."""

from __future__ import annotations

from pathlib import Path

from decisionlog import DecisionStore
from decisionlog.lab import DryRun, dry_run
from moderation import ModerationError, PolicyError, PolicyLimitError
from moderation.policy import Policy, PolicyLimits, parse_policy
from moderation.prompts import OverlayCache

from .parsing import DryRunRequest, RequestError, time_field
from .state import PolicyHolder

__all__ = ["run_dry_run", "stored_policy"]


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _model(policy: Policy, base_dir: Path | None) -> str:
    """The policy's model as a message may show it: a checkpoint inside the policy folder
    by its relative path, one elsewhere by its file name, never by the path the server
    resolved."""
    pretrained = policy.model.pretrained
    if Path(pretrained).is_absolute():
        path = Path(pretrained)
        try:
            pretrained = str(path.relative_to(base_dir.resolve())) if base_dir else path.name
        except ValueError:
            pretrained = path.name
    return _cut(f"{policy.model.name}/{pretrained}")


def stored_policy(holder: PolicyHolder, version: str) -> Policy:
    """A version the log keeps, parsed; a 404 when the log never had it, a 422 (with the
    faults) when its text no longer validates here (e.g. its checkpoint file is gone)."""
    try:
        stored = holder.stored_policy(version)
    except PolicyError as e:
        raise RequestError(422, "invalid_policy", f"stored policy version {_cut(version)!r} "
                           "no longer validates on this server", faults=e.faults) from e
    if stored is None:
        raise RequestError(404, "not_found",
                           f"no policy version {_cut(version)!r} was ever active")
    return stored


def run_dry_run(holder: PolicyHolder, store: DecisionStore, request: DryRunRequest, *,
                limits: PolicyLimits | None = None) -> DryRun:
    """Raises :class:`RequestError`: 422 for a policy that is not valid (``invalid_policy``),
    over ``limits`` (``policy_too_large``: its size, nesting, aliases, counts, or more new
    prompts than ``limits.max_new_prompts``) or for another model (``model_mismatch``), 404
    for an unknown ``against`` version, 400 for a bad time.

    A checkpoint path in the proposed policy must stay inside the folder of the server's
    policy file; no message shows a path as the server resolved it."""
    limits = limits or PolicyLimits()
    active = holder.current()
    since, until = time_field("since", request.since), time_field("until", request.until)
    base_dir = holder.policy_path.parent if holder.policy_path is not None else None
    try:
        proposed = parse_policy(request.policy, source="proposed policy", base_dir=base_dir,
                                limits=limits, confine=True)
    except PolicyLimitError as e:
        raise RequestError(422, "policy_too_large", "the proposed policy asks for more than "
                           "this server allows", faults=e.faults) from e
    except PolicyError as e:
        raise RequestError(422, "invalid_policy", "the proposed policy is not valid",
                           faults=e.faults) from e
    before, before_source = active.policy, "active policy"
    if request.against:
        before = stored_policy(holder, request.against)
        before_source = f"stored version {_cut(request.against)}"
    for what, policy in (("the proposed policy", proposed), (before_source, before)):
        if policy.model != active.policy.model:
            raise RequestError(
                422, "model_mismatch",
                f"{what} names model {_model(policy, base_dir)}, but the stored embeddings "
                f"(and this server's encoder) belong to model {active.encoder.identity} "
                f"({_model(active.policy, base_dir)}): a dry-run re-scores stored "
                "embeddings, which only works with the model that made them",
            )
    try:
        after = active.with_policy(proposed, proposed=True,
                                   max_new_prompts=limits.max_new_prompts)
        current = active
        if before is not active.policy:  # a stored version: through the same overlay
            spent = after.cache.added if isinstance(after.cache, OverlayCache) else 0
            current = after.with_policy(before,
                                        max_new_prompts=limits.max_new_prompts - spent)
        return dry_run(
            store, current.scorer(), after.scorer(), model=active.encoder.identity,
            since=since, until=until, limit=request.limit, before_source=before_source,
            after_source="proposed policy",
        )
    except PolicyLimitError as e:
        raise RequestError(422, "policy_too_large", str(e), faults=e.faults) from e
    except ModerationError as e:  # thresholds calibrated with another model
        raise RequestError(422, "model_mismatch", str(e)) from e

